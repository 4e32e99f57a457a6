"""One BAGEL training step (forward + backward) per backend combination vs the upstream-equivalent path.

    python benchmarks/bench_model.py --out DIR [--quick] [--tiny]

Model: BAGEL-7B-MoT shapes (``BagelConfig.bagel_7b_mot``: hidden 3584, 28/4 heads of 128, intermediate
18944, vocab 152064; SigLIP so400m, 72-wide heads) cut to 2 LLM layers (MoT) and 2 ViT layers, bf16,
CUDA. Packs: realistic mixtures (``realistic_samples``) of understanding samples (text + ViT image of
~700-4900 patches), text-to-image samples (prompt + 1024-4096 noised latents) and edit samples (ViT
image + clean VAE image + instruction + noised latents), packed by ``bagel.pack_samples`` and padded
flex-style to 8k and 16k tokens (``sum(sample_lens)``; tokens/s counts the real tokens).

Variants (one model; the backend is switched between runs):

    upstream-equivalent  LM attention FlexAttention with its block mask built per batch, LM routing by
                         per-op gather/scatter (``bagel.model.qwen2_reference``, plain torch ops), torch patch
                         embedding; the ViT runs our Triton varlen kernel, standing in for the
                         flash-attn varlen call upstream makes there (no mask to build)
    ours (auto)          Triton attention, grouped MoT routing with Triton ops, fused patch embedding
    + attribution rows   one component at a time (full mode; --quick keeps the first three)

Reported: median step ms, tokens/s, speed-up vs upstream-equivalent, peak memory, the loss of one
seeded step relative to the upstream path (the paths compute the same function; bf16 noise only),
model TFLOP/s per GPU and MFU counted with BAGEL's own language-model FLOP formula (see
:func:`bagel_lm_flops`), the unit of the published BAGEL training figures, and the first step's seconds
apart (compiles: a flex variant gets ``--compile-share-s`` for them, past which its row says so).
The model is built on the meta device and materialised on the GPU in bf16 (:func:`build_model`): no
fp32 copy. Rows are written to ``DIR/bench_model.md`` / ``.jsonl`` as they are measured.

MFU run (``--mfu``, on by default on a GPU): BAGEL-7B layer shapes with as many LLM layers as fit one
GPU (``--mfu-layers``, default ``auto``: estimated from the free memory, halved once on OOM) and the ViT cut
in the same proportion (26 ViT layers per 28 LLM layers), one 16k pack, ours (auto) and the
upstream-equivalent path. Next to it, the published figures of 32xH100 runs: official BAGEL 176.9
TFLOP/s/GPU (17.9% MFU) and Megatron-Bridge's BAGEL 234.3 TFLOP/s/GPU (23.7% MFU). Differences that
remain: no FSDP communication (one GPU), no VAE encoding inside the step (latents come encoded), fewer
layers than the full model.
Without CUDA the script prints "needs CUDA" and exits 0; ``--tiny`` runs the same code on a tiny model
on the CPU (Triton under its interpreter) to check the script itself: its times mean nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

if "--tiny" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from common import (  # noqa: E402
    CompileTimeout,
    Report,
    Table,
    bagel_name,
    device_info,
    run_script,
    save_plot,
    sync,
    time_limit,
    time_ms,
    use_checkout,
    write_results,
)

use_checkout()
from bagel import (  # noqa: E402
    BagelBackendConfig,
    BagelConfig,
    BagelForUnifiedMultimodal,
    EditSample,
    Qwen2ForCausalLM,
    Qwen2ForCausalLMReference,
    SpecialTokens,
    T2ISample,
    TextSample,
    UnderstandingSample,
    pack_samples,
)
from bagel.train.metrics import lm_flops as bagel_lm_flops  # noqa: E402  (BAGEL's MFU formula, one copy)
from bagel.train.metrics import peak_tflops  # noqa: E402

sample_num_tokens = bagel_name("sample_num_tokens")

# (name, LM attention, MoT, patch_embed, gather/scatter LM, ViT attention or None = same as LM; "upstream":
# the path an upstream user has there, flash-attn's varlen function where installed, else SDPA per image)
VARIANTS = [
    ("upstream-equivalent", "flex", "torch", "torch", True, "upstream"),
    ("ours (auto)", "auto", "auto", "auto", False, None),
    ("ours, gather/scatter LM", "triton", "torch", "auto", True, None),
    ("triton attn + torch grouped MoT", "triton", "torch", "auto", False, None),
    ("flex attn + triton grouped MoT", "flex", "triton", "auto", False, "triton"),
    ("ours, torch patch embed", "auto", "auto", "torch", False, None),
]
QUICK_VARIANTS = 3


# ---------------------------------------------------------------------------------------------- FLOPs
# Published training throughput of BAGEL-7B-MoT, TFLOP/s per GPU (MFU), both on 32xH100, counted with the
# formula below: quoted for comparison, not measured here.
PUBLISHED = [
    ("official BAGEL (32xH100, published)", 176.9, 0.179),
    ("Megatron-Bridge BAGEL (32xH100, published)", 234.3, 0.237),
]


def flops_cells(flops: float, ms: float, peak: float | None) -> tuple[str, str]:
    tflops = flops / (ms * 1e-3) / 1e12
    return (f"{tflops:.1f}" if tflops >= 1 else f"{tflops:.3g}"), (
        "-" if not peak else f"{100 * tflops / peak:.1f}%"
    )


# ---------------------------------------------------------------------------------------------- data
def realistic_samples(total_tokens: int, config: BagelConfig, seed: int, tiny: bool = False) -> list:
    """Samples of BAGEL-7B scale (DESIGN.md sec. 8) adding up to at most ``total_tokens`` tokens."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    tok = SpecialTokens.for_config(config)
    hi = min(tok.bos, tok.eos, tok.start_of_image, tok.end_of_image)
    p, lp, C = config.vision_config.patch_size, config.latent_patch_size, config.latent_channels
    if tiny:
        text_r, vit_r, lat_sides, edit_vit = (2, 12), (2, 5), (2, 3, 4), (2, 4)
    else:
        text_r, vit_r, lat_sides, edit_vit = (16, 512), (26, 70), (32, 40, 48, 64), (26, 50)

    def text(lo=None, up=None):
        return [rng.randrange(hi) for _ in range(rng.randint(lo or text_r[0], up or text_r[1]))]

    def pixels(r):
        return torch.randn(3, rng.randint(*r) * p, rng.randint(*r) * p, generator=gen)

    def latent(sides):
        s = rng.choice(sides)
        return torch.randn(C, s * lp, s * lp, generator=gen)

    samples, used, misses = [], 0, 0
    while True:
        kind = rng.choice(("und", "und", "t2i", "t2i", "edit"))
        if kind == "und":
            s = UnderstandingSample(pixels(vit_r), text(), text())
        elif kind == "t2i":
            s = T2ISample(text(), latent(lat_sides))
        else:
            src = latent(lat_sides[:-1] if len(lat_sides) > 1 else lat_sides)
            s = EditSample(
                pixels(edit_vit),
                src,
                text(text_r[0], max(text_r[0], text_r[1] // 4)),
                torch.randn(src.shape, generator=gen),
            )
        n = sample_num_tokens(s, config)
        if used + n > total_tokens:
            misses += 1  # like upstream's buffer: try other samples before closing the pack
            if misses < 20:
                continue
            rest = total_tokens - used - 2  # a text sample fills the pack: [bos] + ids + [eos]
            if rest > 0:
                samples.append(TextSample([rng.randrange(hi) for _ in range(rest)]))
            return samples
        samples.append(s)
        used += n


def describe(batch: dict) -> str:
    n_vit = batch["packed_vit_tokens"].shape[0] if "packed_vit_tokens" in batch else 0
    n_vae = batch["packed_vae_token_indexes"].numel() if "packed_vae_token_indexes" in batch else 0
    n_ce = batch["ce_loss_indexes"].numel() if "ce_loss_indexes" in batch else 0
    return (
        f"{batch['sequence_length']} tokens in {len(batch['sample_lens']) - 1} samples + pad to {sum(batch['sample_lens'])}: "
        f"{n_vit} ViT, {n_vae} VAE, {n_ce} CE tokens"
    )


# ---------------------------------------------------------------------------------------------- timing


# ---------------------------------------------------------------------------------------------- the model
def build_model(cfg: BagelConfig, device: torch.device, dtype: torch.dtype) -> BagelForUnifiedMultimodal:
    """The model materialised directly on ``device`` in ``dtype``: built on the meta device (no memory,
    no initialisation), cast there, given storage on the device (``to_empty``) and initialised there by
    ``initialize_weights`` (which also recomputes the non-persistent RoPE buffers). No fp32 copy and no
    host copy ever exist. The storage is filled with NaN first and checked finite after: a parameter or
    buffer that ``initialize_weights`` does not write fails here, not as a silently wrong benchmark."""
    with torch.device("meta"):
        model = BagelForUnifiedMultimodal(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)

    def floating():  # read again after the init, which may replace buffers (RoPE tables)
        return [
            (n, t) for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_floating_point()
        ]

    with torch.no_grad():
        for _, t in floating():
            t.fill_(float("nan"))
        model.initialize_weights()
        tensors = floating()
        finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).tolist()
    missed = [n for (n, _), ok in zip(tensors, finite, strict=True) if not ok]
    if missed:
        raise RuntimeError(
            f"initialize_weights left {len(missed)} tensors unwritten after to_empty: {missed[:8]}"
        )
    return model


def upstream_vit_path() -> str:
    try:
        import flash_attn  # noqa: F401  (optional: the path upstream BAGEL's ViT takes)

        return "flash-attn varlen"
    except ImportError:
        return "SDPA per image"


def upstream_vit_attention_class(stock: type) -> type:
    """A subclass of the model's SigLIP attention whose forward is the one an upstream BAGEL user runs:
    ``flash_attn_varlen_func`` over the images where flash-attn is installed, else SDPA per image with no
    mask (each image attends only to itself). Same parameters and projections; only the attention call
    differs, so the swap is a class change on the module (``stock_class`` restores it)."""
    import torch.nn.functional as F

    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None

    def forward(self, x, mask, backend, rope=None):
        if rope is not None:
            raise NotImplementedError("the upstream ViT baseline has no 2-D RoPE (BAGEL's SigLIP uses none)")
        n = x.shape[0]
        q, k, v = (
            p(x).view(n, self.num_heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        bounds = [(s, e) for s, e in mask.sample_bounds() if e > s]
        if flash_attn_varlen_func is not None:
            cu = torch.tensor([0] + [e for _, e in bounds], dtype=torch.int32, device=x.device)
            longest = max(e - s for s, e in bounds)
            o = flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=False)
        else:
            o = torch.cat(
                [
                    F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1)[None] for t in (q, k, v)))[
                        0
                    ].transpose(0, 1)
                    for s, e in bounds
                ]
            )
        return self.out_proj(o.reshape(n, self.embed_dim))

    return type(f"Upstream{stock.__name__}", (stock,), {"forward": forward, "stock_class": stock})


_UPSTREAM_VIT: dict = {}  # stock attention class -> its upstream-path subclass


def set_vit_attention(model: BagelForUnifiedMultimodal, upstream: bool) -> int:
    """Switch every SigLIP attention module of the ViT to the upstream path (or back); returns how many."""
    count = 0
    for m in model.model.vit_model.modules():
        stock = getattr(type(m), "stock_class", type(m))
        if stock.__name__ != "SiglipAttention":
            continue
        if upstream:
            if stock not in _UPSTREAM_VIT:
                _UPSTREAM_VIT[stock] = upstream_vit_attention_class(stock)
            m.__class__ = _UPSTREAM_VIT[stock]
        else:
            m.__class__ = stock
        count += 1
    return count


def set_variant(model: BagelForUnifiedMultimodal, variant, cpu: bool) -> None:
    _, attn, mot, pe, gather_scatter, vit_attn = variant
    if cpu and attn == "flex":  # FlexAttention has no CPU backward: the --tiny script check uses SDPA instead
        attn = "sdpa"
    model.backend = BagelBackendConfig(attention=attn, mot=mot, patch_embed=pe)
    if vit_attn not in (None, "upstream"):
        model.model.vit_model.backend = BagelBackendConfig(attention=vit_attn, mot=mot, patch_embed=pe)
    set_vit_attention(model, vit_attn == "upstream")
    # the two LM classes share parameters and differ only in forward_train: switch the routing in place
    model.model.language_model.__class__ = Qwen2ForCausalLMReference if gather_scatter else Qwen2ForCausalLM


def make_step(model, batch):
    def step():
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        loss = out["ce"].float().mean() + out["mse"].float().mean()
        loss.backward()
        return loss

    return step


def time_step(step, device, reps: int, warmup: int) -> tuple[float, float]:
    """(median ms, peak MiB above the baseline) of ``step``."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    ms = time_ms(step, device, reps, 0, wall=True)  # a whole step, host work included
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else float("nan")
    return ms, peak


def seeded_loss(step) -> float:
    torch.manual_seed(1234)  # same flow-matching noise in every variant
    return float(step().detach())


def first_step(step, device, variant, share_s: float | None) -> tuple[float, float]:
    """(seeded loss, wall seconds) of the first step of a variant: its compiles (FlexAttention, Triton JIT)
    happen here and are reported apart from the step time; a variant that compiles (flex) gets at most
    ``share_s`` seconds for it (:class:`common.CompileTimeout` past that)."""
    compiles = variant[1] == "flex" and device.type == "cuda"
    t0 = time.perf_counter()
    with time_limit(share_s if compiles else None, f"{variant[0]}: compile"):
        loss = seeded_loss(step)
    return loss, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- MFU run
RECORDS: list[dict] = []  # every timed row of the last run (the tests check the arithmetic on them)


def _auto_llm_layers(tokens: int, device: torch.device) -> int:
    """LLM layers of BAGEL-7B shapes that fit the free memory of one GPU for a training step on a pack of
    ``tokens`` (bf16 weights and gradients of both experts, the activations a MoT layer keeps for the
    backward, the embedding and LM head), at most 28."""
    if device.type != "cuda":
        return 2
    c = BagelConfig.bagel_7b_mot(llm_layers=1, vit_layers=1).llm_config
    H, I, V = c.hidden_size, c.intermediate_size, c.vocab_size  # noqa: E741
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * (H // c.num_attention_heads)
    params = 2 * (3 * H * I + H * qkv + H * H)  # two experts
    per_layer = 2 * 2 * params + 2 * tokens * (10 * H + 3 * I + qkv)  # weights + grads, activations
    fixed = 2 * 2 * (2 * V * H) + 6 * 2**30  # embedding + LM head with grads, ViT, logits, workspace
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(28, int((0.85 * free - fixed) // per_layer)))


def mfu_run(args, device: torch.device, dtype: torch.dtype, report: Report | None = None):
    """Model TFLOP/s per GPU and MFU at BAGEL-7B layer shapes with as many LLM layers as fit one GPU."""
    t_start = time.perf_counter()
    size = 240 if args.tiny else 16384
    layers = args.mfu_layers
    peak_tf = peak_tflops(device, args.peak_tflops)
    title = "Model TFLOP/s per GPU and MFU (BAGEL's LM FLOP formula)" + (
        ", tiny CPU model (interpreter: times are meaningless)"
        if args.tiny
        else ", BAGEL-7B layer shapes, bf16"
    )
    columns = [
        "LLM layers",
        "ViT layers",
        "variant",
        "step ms (median)",
        "tokens/s",
        "model TFLOP/s/GPU",
        "MFU",
        "first step s (compile)",
    ]
    table = report.table(title, columns) if report is not None else Table(title, columns)
    variants = [v for v in VARIANTS if v[0] in ("ours (auto)", "upstream-equivalent")]
    reps, warmup = (1, 1) if args.tiny else (2, 1)
    share = getattr(args, "compile_share_s", None)
    n_layers = _auto_llm_layers(size, device) if layers == "auto" else int(layers)
    for attempt in range(2):
        vit_layers = max(1, round(26 * n_layers / 28))
        model = None
        try:
            torch.manual_seed(0)
            cfg = (
                BagelConfig.tiny(llm_layers=n_layers, vit_layers=vit_layers)
                if args.tiny
                else BagelConfig.bagel_7b_mot(llm_layers=n_layers, vit_layers=vit_layers)
            )
            model = build_model(cfg, device, dtype)
            samples = realistic_samples(size, cfg, seed=size, tiny=args.tiny)
            batch = pack_samples(samples, cfg, max_num_tokens=size, rng=0, device=device)
            batch["padded_latent"] = batch["padded_latent"].to(dtype)
            batch["packed_vit_tokens"] = batch["packed_vit_tokens"].to(dtype)
            L = batch["sequence_length"]
            flops = bagel_lm_flops(cfg.llm_config, L, batch["sample_lens"])
            for variant in variants:
                set_variant(model, variant, args.tiny)
                step = make_step(model, batch)
                try:
                    _, first_s = first_step(step, device, variant, share)
                except CompileTimeout as exc:
                    table.add(
                        [n_layers, vit_layers, variant[0], "-", "-", "-", "-", f"{exc}: not timed"], ok=False
                    )
                    continue
                ms, _ = time_step(step, device, reps, warmup)
                model.zero_grad(set_to_none=True)
                tf, mfu = flops_cells(flops, ms, peak_tf)
                record = {
                    "table": "mfu",
                    "variant": variant[0],
                    "layers": n_layers,
                    "size": size,
                    "ms": ms,
                    "flops": flops,
                    "tflops": tf,
                    "mfu": mfu,
                    "tokens": L,
                    "first_s": first_s,
                    "sample_lens": [int(n) for n in batch["sample_lens"]],
                }
                RECORDS.append(record)
                table.add(
                    [
                        n_layers,
                        vit_layers,
                        variant[0],
                        f"{ms:.1f}",
                        f"{L / ms * 1e3:,.0f}",
                        tf,
                        mfu,
                        f"{first_s:.1f}",
                    ],
                    raw=record,
                )
            break
        except torch.OutOfMemoryError:
            model = step = batch = None  # noqa: F841  (the step closure holds the model too)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if attempt == 1 or n_layers == 1:
                table.add([n_layers, vit_layers, "out of memory", "-", "-", "-", "-", "-"], ok=False)
                break
            table.rows = [r for r in table.rows if r[0] != str(n_layers)]
            table.note(f"{n_layers} LLM layers ran out of memory; retried with {max(1, n_layers // 2)}")
            n_layers = max(1, n_layers // 2)
    for name, tf, mfu in PUBLISHED:
        table.rows.append(
            ["28", "26", name, "-", "-", f"{tf:.1f}", f"{100 * mfu:.1f}%", "-"]
        )  # quoted, not measured
    table.note(
        "model TFLOP/s/GPU = BAGEL's language-model FLOPs of the pack (6 x LM weights per token + 12 D Hq L per "
        "squared sample length; bench_model.bagel_lm_flops, after upstream's train/pretrain_unified_navit.py) / step time"
    )
    table.note(
        f"MFU against {peak_tf} TFLOP/s (dense bf16 peak upstream uses for H100/H200)"
        if peak_tf
        else "MFU: peak unknown"
    )
    table.note(
        "published rows are 32xH100 runs of the full 28-layer model with FSDP and on-the-fly VAE encoding, "
        "quoted for comparison; this run is one GPU, fewer layers, latents pre-encoded; the model is built on "
        "the device in "
        f"{str(dtype)[6:]} (meta + to_empty + initialize_weights)"
    )
    table.note(device_info(device))
    table.note(f"{time.perf_counter() - t_start:.0f} s for this table")
    return table


# ---------------------------------------------------------------------------------------------- main
def run(args) -> Report:
    RECORDS.clear()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        cfg = BagelConfig.tiny()
        sizes = [160]  # the script check: one pack (the MFU run adds a second)
    else:
        cfg = BagelConfig.bagel_7b_mot(llm_layers=2, vit_layers=2)
        sizes = [8192, 16384]
    variants = VARIANTS[:QUICK_VARIANTS] if args.quick else VARIANTS
    reps, warmup = (1, 1) if args.tiny else ((3, 2) if args.quick else (6, 3))
    report = Report(args.out, "bench_model")
    t_start = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(cfg, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    shape = (
        "tiny CPU model (interpreter: times are meaningless)"
        if args.tiny
        else "BAGEL-7B-MoT shapes cut to 2 LLM + 2 ViT layers, bf16"
    )
    table = report.table(
        f"BAGEL training step (fwd+bwd), {shape}",
        [
            "pack",
            "variant",
            "step ms (median)",
            "tokens/s",
            "speed-up vs upstream-eq.",
            "peak GiB",
            "loss rel. diff",
            "model TFLOP/s/GPU",
            "MFU",
            "first step s (compile)",
        ],
    )
    peak_tf = peak_tflops(device, args.peak_tflops)
    series: dict[str, list] = {v[0]: [] for v in variants}
    png = lambda path: save_plot(  # noqa: E731
        path,
        series,
        "pack size (tokens incl. pad)",
        "training tokens/s (fwd+bwd)",
        "BAGEL training step: tokens/s per backend",
        logx=True,
    )
    for size in sizes:
        samples = realistic_samples(size, cfg, seed=size, tiny=args.tiny)
        batch = pack_samples(samples, cfg, max_num_tokens=size, rng=0, device=device)
        batch["padded_latent"] = batch["padded_latent"].to(dtype)
        batch["packed_vit_tokens"] = batch["packed_vit_tokens"].to(dtype)
        table.note(
            f"{size // 1024 if size >= 1024 else size}{'k' if size >= 1024 else ''} pack: {describe(batch)}"
        )
        L = batch["sequence_length"]
        base_ms = base_loss = None
        for variant in variants:
            name = variant[0]
            first_s = float("nan")
            try:
                set_variant(model, variant, args.tiny)
                step = make_step(model, batch)
                loss, first_s = first_step(step, device, variant, args.compile_share_s)
                ms, peak = time_step(step, device, reps, warmup)
            except Exception as exc:  # record and go on: one failing backend must not hide the others
                why = f"{type(exc).__name__}: {str(exc)[:120]}"
                table.add(
                    [f"{size}", name, "failed", "-", "-", "-", why, "-", "-", f"{first_s:.1f}"], ok=False
                )
                continue
            finally:
                model.zero_grad(set_to_none=True)
            if base_ms is None and name == "upstream-equivalent":
                base_ms, base_loss = ms, loss
            speed = f"{base_ms / ms:.2f}x" if base_ms else "-"
            rel = (
                f"{abs(loss - base_loss) / max(abs(base_loss), 1e-12):.1e}" if base_loss is not None else "-"
            )
            peak_s = "-" if peak != peak else f"{peak / 1024:.1f}"
            flops = bagel_lm_flops(cfg.llm_config, L, batch["sample_lens"])
            tf, mfu = flops_cells(flops, ms, peak_tf)
            record = {
                "table": "step",
                "variant": name,
                "size": size,
                "ms": ms,
                "flops": flops,
                "tflops": tf,
                "mfu": mfu,
                "first_s": first_s,
                "loss": loss,
                "peak_mib": peak,
                "tokens": L,
            }
            RECORDS.append(record)
            table.add(
                [
                    f"{size}",
                    name,
                    f"{ms:.1f}",
                    f"{L / ms * 1e3:,.0f}",
                    speed,
                    peak_s,
                    rel,
                    tf,
                    mfu,
                    f"{first_s:.1f}",
                ],
                raw=record,
            )
            series[name].append((size, L / ms * 1e3))
        write_results(args.out, "bench_model", None, png)  # the plot so far
    table.note(
        "upstream-equivalent: FlexAttention (block mask built per batch) + per-op gather/scatter routing in the "
        f"LM; its ViT takes the path an upstream user has: {upstream_vit_path()} (flash-attn's varlen function where "
        "installed, else SDPA per image)"
    )
    table.note(
        f"{n_params / 1e9:.2f} B parameters, built on the device in {str(dtype)[6:]} (meta + to_empty + "
        "initialize_weights); tokens/s counts the real tokens (sequence_length), not the pad"
    )
    table.note(
        f"median of {reps} timed steps after {warmup} warm-up steps; the first (seeded) step, compiles "
        "included, "
        f"is timed apart (first step s; a compiling variant gets {args.compile_share_s:.0f} s for it)"
    )
    table.note(
        f"model TFLOP/s/GPU: BAGEL's language-model FLOP formula (bench_model.bagel_lm_flops, as upstream's "
        f"training script logs it) for this {cfg.llm_config.num_hidden_layers}-layer LM over the step time; "
        f"MFU against {peak_tf if peak_tf else 'an unknown'} TFLOP/s dense bf16 peak"
    )
    table.note(device_info(device))
    table.note(f"{time.perf_counter() - t_start:.0f} s for this table")
    if args.mfu:
        model = step = batch = None  # noqa: F841  (free the 2-layer model: the MFU run sizes on free memory)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the MFU run sizes its layer count on the free memory
        mfu_run(args, device, dtype, report)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="directory for bench_model.md and bench_model.png")
    p.add_argument(
        "--quick", action="store_true", help="fewer variants and timed steps (~60-90 s on an H100)"
    )
    p.add_argument(
        "--tiny", action="store_true", help="tiny model on the CPU (script check; times meaningless)"
    )
    p.add_argument("--no-mfu", dest="mfu", action="store_false", help="skip the MFU run")
    p.add_argument(
        "--mfu-layers",
        default="auto",
        help="LLM layers of the MFU run (default auto: as many as fit the GPU)",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="peak TFLOP/s per GPU for MFU (default: by GPU name)"
    )
    p.add_argument(
        "--compile-share-s",
        type=float,
        default=60.0,
        help="seconds a compiling variant's first step may take before its row says so (default 60)",
    )
    return run_script(p, run, "bench_model", "a BAGEL-7B-shaped bf16 training step", argv)


if __name__ == "__main__":
    sys.exit(main())

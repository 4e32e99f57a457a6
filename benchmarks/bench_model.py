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
seeded step relative to the upstream path (the paths compute the same function; bf16 noise only), and
model TFLOP/s per GPU and MFU counted with BAGEL's own language-model FLOP formula (see
:func:`bagel_lm_flops`), the unit of the published BAGEL training figures.

MFU run (``--mfu``, on by default on a GPU): BAGEL-7B layer shapes with as many LLM layers as fit one
GPU (``--mfu-layers``, default ``auto``: estimated from free memory, halved once on OOM) and the ViT cut
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

from common import run_script, sync, time_ms, use_checkout, write_results  # noqa: E402

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
from bagel.data.packing import sample_num_tokens  # noqa: E402

# (name, LM attention, MoT, patch_embed, gather/scatter LM, ViT attention or None = same as LM)
VARIANTS = [
    ("upstream-equivalent", "flex", "torch", "torch", True, "triton"),
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


def bagel_lm_flops(llm_config, sequence_length: int, sample_lens) -> float:
    """Training FLOPs (forward + backward) of one pack, counted as upstream BAGEL's training script counts
    them for its MFU log: ``qwen2_flop_coefficients`` and the ``flops_all_token`` line of
    ``train/pretrain_unified_navit.py`` in github.com/ByteDance-Seed/Bagel (added by PR #274, "add MFU &
    gradient accumulation"). Written here from that definition:

        per-token weights  N = L * (3 * H * I  +  H * (Hq*D + 2 * Hkv*D + Hq*D))  +  2 * V * H
        FLOPs              = 6 * N * sequence_length  +  12 * D * Hq * L * sum(sample_len ** 2)

    (MLP gate/up/down, q/k/v/o projections, embedding and LM head; 6 = 2 forward + 4 backward per
    weight; the attention term counts every (query, key) pair of a sample as if unmasked, like the
    upstream log, with ``sample_lens`` as the batch carries them, pad sample included). Only the
    language model counts: the ViT, connector and flow-matching head are not in the formula. Each
    token goes through one expert's weights, so the MoT doubling of parameters does not appear."""
    H = llm_config.hidden_size
    V = llm_config.vocab_size
    L = llm_config.num_hidden_layers
    Hq = llm_config.num_attention_heads
    Hkv = llm_config.num_key_value_heads
    I = llm_config.intermediate_size  # noqa: E741
    D = getattr(llm_config, "head_dim", None) or H // Hq
    per_token = L * (3 * H * I + H * (2 * Hq * D + 2 * Hkv * D)) + 2 * V * H
    square = sum(int(n) ** 2 for n in sample_lens)
    return 6.0 * per_token * float(sequence_length) + 12.0 * D * Hq * L * float(square)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Dense bf16 peak per GPU used for MFU: the values upstream BAGEL's script uses (H100/H200/H800
    989, A100/A800 312), ``override`` when given, None when unknown (no MFU printed)."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    if any(t in name for t in ("H100", "H200", "H800")):
        return 989.0
    if any(t in name for t in ("A100", "A800")):
        return 312.0
    return None


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


def set_variant(model: BagelForUnifiedMultimodal, variant, cpu: bool) -> None:
    _, attn, mot, pe, gather_scatter, vit_attn = variant
    if cpu and attn == "flex":  # FlexAttention has no CPU backward: the --tiny script check uses SDPA instead
        attn = "sdpa"
    model.backend = BagelBackendConfig(attention=attn, mot=mot, patch_embed=pe)
    if vit_attn is not None:
        model.model.vit_model.backend = BagelBackendConfig(attention=vit_attn, mot=mot, patch_embed=pe)
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


def mfu_run(args, device: torch.device, dtype: torch.dtype):
    """Model TFLOP/s per GPU and MFU at BAGEL-7B layer shapes with as many LLM layers as fit one GPU."""
    from common import Table, device_info

    t_start = time.perf_counter()
    size = 240 if args.tiny else 16384
    layers = args.mfu_layers
    peak_tf = peak_tflops(device, args.peak_tflops)
    table = Table(
        "Model TFLOP/s per GPU and MFU (BAGEL's LM FLOP formula)"
        + (
            ", tiny CPU model (interpreter: times are meaningless)"
            if args.tiny
            else ", BAGEL-7B layer shapes, bf16"
        ),
        ["LLM layers", "ViT layers", "variant", "step ms (median)", "tokens/s", "model TFLOP/s/GPU", "MFU"],
    )
    variants = [v for v in VARIANTS if v[0] in ("ours (auto)", "upstream-equivalent")]
    reps, warmup = (1, 1) if args.tiny else (2, 1)
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
            with torch.device(device):
                model = BagelForUnifiedMultimodal(cfg)
            model = model.to(dtype)
            samples = realistic_samples(size, cfg, seed=size, tiny=args.tiny)
            batch = pack_samples(samples, cfg, max_num_tokens=size, rng=0, device=device)
            batch["padded_latent"] = batch["padded_latent"].to(dtype)
            batch["packed_vit_tokens"] = batch["packed_vit_tokens"].to(dtype)
            L = batch["sequence_length"]
            flops = bagel_lm_flops(cfg.llm_config, L, batch["sample_lens"])
            for variant in variants:
                set_variant(model, variant, args.tiny)
                ms, _ = time_step(make_step(model, batch), device, reps, warmup)
                model.zero_grad(set_to_none=True)
                tf, mfu = flops_cells(flops, ms, peak_tf)
                table.add([n_layers, vit_layers, variant[0], f"{ms:.1f}", f"{L / ms * 1e3:,.0f}", tf, mfu])
                RECORDS.append({"table": "mfu", "variant": variant[0], "layers": n_layers, "size": size, "ms": ms,
                                "flops": flops, "tflops": tf, "mfu": mfu, "tokens": L,
                                "sample_lens": [int(n) for n in batch["sample_lens"]]})  # fmt: skip
            break
        except torch.OutOfMemoryError:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if attempt == 1 or n_layers == 1:
                table.add([n_layers, vit_layers, "out of memory", "-", "-", "-", "-"])
                break
            table.note(f"{n_layers} LLM layers ran out of memory; retried with {max(1, n_layers // 2)}")
            table.rows = [r for r in table.rows if r[0] != str(n_layers)]
            n_layers = max(1, n_layers // 2)
    for name, tf, mfu in PUBLISHED:
        table.add(["28", "26", name, "-", "-", f"{tf:.1f}", f"{100 * mfu:.1f}%"])
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
        "published rows are 32xH100 runs of the full 28-layer model with FSDP and on-the-fly VAE encoding, quoted for "
        "comparison; this run is one GPU, fewer layers, latents pre-encoded"
    )
    table.note(device_info(device))
    table.note(f"{time.perf_counter() - t_start:.0f} s for this table")
    return table


# ---------------------------------------------------------------------------------------------- main
def run(args) -> str:
    RECORDS.clear()
    from common import Table, device_info, save_plot

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        cfg = BagelConfig.tiny()
        sizes = [160, 240]
    else:
        cfg = BagelConfig.bagel_7b_mot(llm_layers=2, vit_layers=2)
        sizes = [8192, 16384]
    variants = VARIANTS[:QUICK_VARIANTS] if args.quick else VARIANTS
    reps, warmup = (1, 1) if args.tiny else ((3, 2) if args.quick else (6, 3))
    t_start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = BagelForUnifiedMultimodal(cfg)
    model = model.to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    table = Table(
        f"BAGEL training step (fwd+bwd), {'tiny CPU model (interpreter: times are meaningless)' if args.tiny else 'BAGEL-7B-MoT shapes cut to 2 LLM + 2 ViT layers, bf16'}",
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
        ],
    )
    peak_tf = peak_tflops(device, args.peak_tflops)
    series: dict[str, list] = {v[0]: [] for v in variants}
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
            try:
                set_variant(model, variant, args.tiny)
                step = make_step(model, batch)
                loss = seeded_loss(step)
                ms, peak = time_step(step, device, reps, warmup)
            except Exception as exc:  # record and go on: one failing backend must not hide the others
                table.add(
                    [
                        f"{size}",
                        name,
                        "failed",
                        "-",
                        "-",
                        "-",
                        f"{type(exc).__name__}: {str(exc)[:120]}",
                        "-",
                        "-",
                    ]
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
            table.add([f"{size}", name, f"{ms:.1f}", f"{L / ms * 1e3:,.0f}", speed, peak_s, rel, tf, mfu])
            RECORDS.append(
                {
                    "table": "step",
                    "variant": name,
                    "size": size,
                    "ms": ms,
                    "flops": flops,
                    "tflops": tf,
                    "mfu": mfu,
                }
            )
            series[name].append((size, L / ms * 1e3))
    table.note(
        "upstream-equivalent: FlexAttention (block mask built per batch) + per-op gather/scatter routing in the LM; "
        "its ViT uses our Triton varlen kernel in place of upstream's flash-attn varlen call"
    )
    table.note(
        f"{n_params / 1e9:.2f} B parameters; tokens/s counts the real tokens (sequence_length), not the pad"
    )
    table.note(
        f"median of {reps} timed steps after {warmup} warm-up steps (plus one seeded step for the loss check)"
    )
    table.note(
        f"model TFLOP/s/GPU: BAGEL's language-model FLOP formula (bench_model.bagel_lm_flops, as upstream's "
        f"training script logs it) for this {cfg.llm_config.num_hidden_layers}-layer LM over the step time; "
        f"MFU against {peak_tf if peak_tf else 'an unknown'} TFLOP/s dense bf16 peak"
    )
    table.note(device_info(device))
    table.note(f"{time.perf_counter() - t_start:.0f} s for this table")
    text = table.render()
    if args.mfu:
        text += "\n" + mfu_run(args, device, dtype).render()
    write_results(
        args.out,
        "bench_model",
        text,
        lambda path: save_plot(
            path,
            series,
            "pack size (tokens incl. pad)",
            "training tokens/s (fwd+bwd)",
            "BAGEL training step: tokens/s per backend",
            logx=True,
        ),
    )
    return text


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
    return run_script(p, run, "bench_model", "a BAGEL-7B-shaped bf16 training step", argv)


if __name__ == "__main__":
    sys.exit(main())

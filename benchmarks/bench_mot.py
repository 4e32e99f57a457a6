"""MoT routing: one Qwen2 MoT decoder layer, grouped (ours) vs upstream's gather/scatter vs a dense layer.

    python benchmarks/bench_mot.py [--out DIR] [--quick] [--tokens 16384] [--tiny]

BAGEL-7B shapes (hidden 3584, intermediate 18944, 28 query / 4 KV heads, head_dim 128), bf16, CUDA,
on a realistic pack (``bagel_kernels.testing.realistic_pack``): generation tokens are the VAE latents
(inside noise splits, and the clean VAE image of edit samples), everything else (text, ViT patches,
image bracket tokens) is understanding. Forward+backward median ms of one layer:

    (a) grouped      bagel.model.qwen2 fast path: rows grouped by expert once, routed ops on two contiguous
                     slices (mot backend "triton"), Triton attention reading rows through the permutation
    (b) gather/scat. bagel.model.qwen2_reference layer: per-op x[und] / x[gen] gather and scatter (upstream),
                     plain torch ops, the SAME Triton attention in pack order (only routing differs)
    (c) dense        Qwen2DecoderLayer (one expert) on the same tokens, same kernels: the floor

Goal: (a) >= 1.25x faster than (b) and within 10% of (c). The grouped layout's one-time cost per
forward (grouping, rows permutation, RoPE tables, un-permute) is timed separately and shown amortised
over BAGEL-7B's 28 layers. A second table microbenchmarks every ``bagel_kernels.mot`` op (fwd+bwd)
against its torch backend and against upstream-style gather/scatter in torch.

Without CUDA the script prints "needs CUDA" and exits 0; ``--tiny`` runs the same code on tiny shapes
on the CPU (Triton under its interpreter) to check the script itself, and its times mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if "--tiny" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from common import (  # noqa: E402
    Report,
    bagel_name,
    device_info,
    no_gpu,
    sync,
    time_ms,
    use_checkout,
    write_results,
)

use_checkout()

BAGEL_7B = dict(hidden=3584, inter=18944, heads=28, kv_heads=4, layers=28, theta=1e6)
TINY = dict(hidden=128, inter=256, heads=4, kv_heads=2, layers=28, theta=1e4)


# ---------------------------------------------------------------------------------------------- pack
def gen_flags(layout) -> torch.Tensor:
    """Bool per token: True for VAE latent tokens (generation), False for text/ViT/brackets.

    Noise splits are VAE images being generated; in edit samples the second full split is the clean VAE
    image (the first is the ViT image); interleaved samples' images are VAE images. An image split's two
    bracket tokens are text."""
    flags = torch.zeros(sum(layout.sample_lens), dtype=torch.bool)
    pos = 0
    split_iter = iter(zip(layout.split_lens, layout.attn_modes, strict=True))
    for kind, slen in zip(layout.sample_kinds, layout.sample_lens, strict=True):
        used, fulls = 0, 0
        while used < slen:
            n, mode = next(split_iter)
            is_vae = mode == "noise" or (
                mode == "full" and (kind == "interleaved" or (kind == "edit" and fulls == 1))
            )
            fulls += mode == "full"
            if is_vae and n >= 3:
                flags[pos + 1 : pos + n - 1] = True
            pos += n
            used += n
        if slen == 0:  # zero-length pad sample: its (empty) split
            next(split_iter, None)
    return flags


def positions(layout) -> torch.Tensor:
    """RoPE positions: text advances by one per token, every token of an image shares one position."""
    out = torch.zeros(sum(layout.sample_lens), dtype=torch.long)
    start, split_idx = 0, 0
    for slen in layout.sample_lens:
        p, used = 0, 0
        while used < slen:
            n, mode = layout.split_lens[split_idx], layout.attn_modes[split_idx]
            split_idx += 1
            if mode == "causal":
                out[start : start + n] = torch.arange(p, p + n)
                p += n
            else:
                out[start : start + n] = p
                p += 1
            start += n
            used += n
        if slen == 0:
            split_idx += 1
    return out


def build_pack(tokens: int, tiny: bool, device):
    """(layout, mask, L, positions, und, gen, seed): for realistic packs, the seed among 0..31 whose
    generation fraction is closest to one half."""
    import random

    from bagel_kernels import PackedMask
    from bagel_kernels.testing import random_pack, realistic_pack

    if tiny:
        layout = random_pack(random.Random(0), 6, text=(2, 12), image=(3, 24), kinds=("und", "t2i", "edit"))
        seed = 0
    else:
        best = None
        for s in range(32):
            lay = realistic_pack(tokens, seed=s)
            frac = float(gen_flags(lay).float().mean())
            if best is None or abs(frac - 0.5) < abs(best[0] - 0.5):
                best = (frac, s, lay)
        _, seed, layout = best
    flags = gen_flags(layout)
    mask = PackedMask.from_splits(*layout.as_tuple(), device=device)
    L = mask.total_len
    und = torch.nonzero(~flags).flatten().to(device)
    gen = torch.nonzero(flags).flatten().to(device)
    return layout, mask, L, positions(layout).to(device), und, gen, seed


# ---------------------------------------------------------------------------------------------- timing


def peak_mib(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    if hasattr(fn, "reset"):
        fn.reset()  # free the previous call's gradients before taking the baseline
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def fwd_bwd(f, inputs: list[torch.Tensor], params: list[torch.Tensor], dy: torch.Tensor):
    """A closure running ``f(*inputs)`` forward and backward with gradient ``dy`` (grads reset each call)."""

    def reset():
        for t in (*inputs, *params):
            t.grad = None

    def step():
        reset()
        out = f(*inputs)
        if isinstance(out, tuple):
            torch.autograd.backward(out, dy)
        else:
            out.backward(dy)

    step.reset = reset
    return step


# ---------------------------------------------------------------------------------------------- layer benchmark
def run_layer(args, device, dims, table, layer_rows: list):
    """The layer table: rows added to ``table`` as measured ((b), (c), (a), (a')); ``layer_rows`` gets
    ``(name, ms, peak MiB)`` for the plot."""
    from transformers import Qwen2Config

    from bagel import BagelBackendConfig
    from bagel_kernels import mot

    PackContext = bagel_name("PackContext")
    Qwen2DecoderLayer = bagel_name("Qwen2DecoderLayer")
    Qwen2MoTDecoderLayer = bagel_name("Qwen2MoTDecoderLayer")
    reference_layer_forward = bagel_name("reference_layer_forward")

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = Qwen2Config(
        hidden_size=dims["hidden"],
        intermediate_size=dims["inter"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        num_hidden_layers=1,
        rope_theta=dims["theta"],
        vocab_size=128,
        qk_norm=True,
        layer_module="Qwen2MoTDecoderLayer",
    )
    D = dims["hidden"] // dims["heads"]
    layout, mask, L, pos, und, gen, seed = build_pack(args.tokens, args.tiny, device)
    n_gen = gen.numel()
    kinds = {k: layout.sample_kinds.count(k) for k in sorted(set(layout.sample_kinds))}
    table.note(
        f"pack: {L} tokens, {len(layout.sample_lens)} samples {kinds} "
        f"({'random_pack' if args.tiny else 'realistic_pack'} seed {seed}); "
        f"generation tokens {n_gen} = {n_gen / L:.1%} (VAE latents: noise images and edit samples' clean VAE images)"
    )
    fast = BagelBackendConfig(attention="triton", mot="triton")
    attn_backend = "triton"

    torch.manual_seed(0)
    with torch.device(device):  # build on the device: initialising 700M parameters on the CPU takes seconds
        mot_layer = Qwen2MoTDecoderLayer(cfg, 0).to(dtype=dtype)
        dense_layer = Qwen2DecoderLayer(cfg, 0).to(dtype=dtype)
    with torch.no_grad():  # HF-like init: small weights, distinct experts
        for layer in (mot_layer, dense_layer):
            for name, p in layer.named_parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.02)
                elif "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
    x = torch.randn(L, dims["hidden"], device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(L, dims["hidden"], device=device, dtype=dtype)

    # (a) grouped: the one-time entry work is outside the layer (done once per model forward)
    def entry():
        perm, inv, n_und = mot.grouped_order(und, gen, L)
        mask_g = mask.truncated(L).with_row_index(inv)
        cos, sin = mot.rope_cos_sin(pos[perm.long()], D, dims["theta"], dtype)
        return perm, inv, n_und, mask_g, cos, sin

    perm, inv, n_und, mask_g, cos_g, sin_g = entry()
    ctx = PackContext(n_und=n_und, cos=cos_g, sin=sin_g, mask=mask_g, backend=fast)
    x_g = mot.permute_rows(x.detach(), perm).requires_grad_(True)
    dy_g = mot.permute_rows(dy, perm)
    mot_params = list(mot_layer.parameters())
    grouped = fwd_bwd(lambda t: mot_layer.forward_grouped(t, ctx), [x_g], mot_params, dy_g)

    # (b) upstream gather/scatter with the same attention kernel, pack order
    cos, sin = mot.rope_cos_sin(pos, D, dims["theta"], dtype)
    mask_t = mask.truncated(L)
    reference = fwd_bwd(
        lambda t: reference_layer_forward(mot_layer, t, mask_t, cos, sin, und, gen, attention=attn_backend),
        [x],
        mot_params,
        dy,
    )

    # (c) dense layer, same kernels, same tokens, pack order (no row index)
    ctx_dense = PackContext(n_und=L, cos=cos, sin=sin, mask=mask_t, backend=fast)
    dense = fwd_bwd(
        lambda t: dense_layer.forward_grouped(t, ctx_dense), [x], list(dense_layer.parameters()), dy
    )

    # sanity: (a) and (b) compute the same layer
    with torch.no_grad():
        ya = mot.permute_rows(mot_layer.forward_grouped(x_g, ctx), inv)
        yb = reference_layer_forward(mot_layer, x, mask_t, cos, sin, und, gen, attention=attn_backend)
        rel = float((ya.float() - yb.float()).abs().max() / yb.float().abs().max())
    table.note(f"grouped vs gather/scatter layer output: max |diff| / max |ref| = {rel:.2e} ({dtype})")

    # the grouped layout's one-time cost per model forward: entry + x permute + final un-permute (fwd+bwd)
    def once():
        perm_, inv_, _, _, _, _ = entry()
        xx = mot.permute_rows(x, perm_)
        mot.permute_rows(xx, inv_).backward(dy)
        x.grad = None

    reps, warm = args.reps, args.warmup

    def add(name, ms, mib, speed, vs):
        layer_rows.append((name, ms, mib))
        table.add(
            [name, f"{ms:.3f}", "-" if mib != mib else f"{mib:.0f}", speed, vs],
            raw=dict(variant=name, ms=ms, peak_mib=mib),
        )

    # each row as soon as it is measured: the references first, so that every row has its ratios
    t_b = time_ms(reference, device, reps, warm)
    add("(b) gather/scatter MoT layer (upstream routing)", t_b, peak_mib(reference, device), "1.00x", "-")
    t_c = time_ms(dense, device, reps, warm)
    add("(c) dense layer (floor)", t_c, peak_mib(dense, device), f"{t_b / t_c:.2f}x", "+0.0%")
    t_a = time_ms(grouped, device, reps, warm)
    add(
        "(a) grouped MoT layer (ours)",
        t_a,
        peak_mib(grouped, device),
        f"{t_b / t_a:.2f}x",
        f"{t_a / t_c - 1:+.1%}",
    )
    t_once = time_ms(once, device, reps, warm)
    per_layer_once = t_once / dims["layers"]
    t_a_tot = t_a + per_layer_once
    add(
        f"(a') + one-time grouping / {dims['layers']} layers",
        t_a_tot,
        float("nan"),
        f"{t_b / t_a_tot:.2f}x",
        f"{t_a_tot / t_c - 1:+.1%}",
    )
    table.note(
        f"(b) vs dense: {t_b / t_c - 1:+.1%}; one-time grouping per forward (grouped_order + mask row index "
        "+ RoPE "
        f"tables + permute in/out, fwd+bwd): {t_once:.3f} ms"
    )
    goal_a = t_b / t_a_tot >= 1.25
    goal_c = t_a_tot / t_c <= 1.10
    table.note(
        f"goals: (a') >= 1.25x faster than (b): {'MET' if goal_a else 'NOT MET'} ({t_b / t_a_tot:.2f}x); "
        f"(a') within 10% of (c): {'MET' if goal_c else 'NOT MET'} ({t_a_tot / t_c - 1:+.1%})"
    )
    if args.upstream_flex and device.type == "cuda":
        flex_ref = fwd_bwd(
            lambda t: reference_layer_forward(mot_layer, t, mask_t, cos, sin, und, gen, attention="flex"),
            [x],
            mot_params,
            dy,
        )
        t_f = time_ms(flex_ref, device, reps, warm)
        add(
            "(u) gather/scatter + FlexAttention (upstream-like)",
            t_f,
            peak_mib(flex_ref, device),
            f"{t_b / t_f:.2f}x",
            f"{t_f / t_c - 1:+.1%}",
        )
    return dict(
        a=t_a,
        a_tot=t_a_tot,
        b=t_b,
        c=t_c,
        L=L,
        n_gen=n_gen,
        und=und,
        gen=gen,
        perm=perm,
        n_und=n_und,
        D=D,
        dtype=dtype,
    )


# ---------------------------------------------------------------------------------------------- op benchmarks
def run_ops(args, device, dims, info, table, rows: list):
    """The op table: one row per op added to ``table`` as measured; ``rows`` gets them for the plot."""
    import torch.nn.functional as F

    from bagel_kernels import mot
    from bagel_kernels.reference import apply_rope, gather_scatter, qwen2_rms_norm, swiglu_reference

    L, n, dtype, D = info["L"], info["n_und"], info["dtype"], info["D"]
    und, gen, perm = info["und"], info["gen"], info["perm"]
    H, inter, Hq, Hkv = dims["hidden"], dims["inter"], dims["heads"], dims["kv_heads"]
    eps = 1e-6
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0, grad=True):
        t = (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)
        return t.requires_grad_(grad)

    cos, sin = mot.rope_cos_sin(torch.arange(L, device=device), D, dims["theta"], dtype)

    cases = []
    # RMSNorm over the hidden size
    x, w1, w2 = rnd(L, H), rnd(H, scale=0.1), rnd(H, scale=0.1)
    dy = rnd(L, H, grad=False)
    cases.append(
        (
            f"mot_rms_norm [{L}, {H}]",
            lambda b: fwd_bwd(lambda t: mot.mot_rms_norm(t, n, w1, w2, eps, backend=b), [x], [w1, w2], dy),
            fwd_bwd(
                lambda t: gather_scatter(
                    t, und, gen, lambda u: qwen2_rms_norm(u, w1, eps), lambda v: qwen2_rms_norm(v, w2, eps)
                ),
                [x],
                [w1, w2],
                dy,
            ),
        )
    )
    # q/k per-head RMSNorm + RoPE
    q, k = rnd(L, Hq, D), rnd(L, Hkv, D)
    qw1, qw2, kw1, kw2 = (rnd(D, scale=0.1) for _ in range(4))
    dq, dk = rnd(L, Hq, D, grad=False), rnd(L, Hkv, D, grad=False)

    def qk_gs(qq, kk):
        outs = []
        for t, wa, wb in ((qq, qw1, qw2), (kk, kw1, kw2)):
            f_und, f_gen = (lambda u, w=w: qwen2_rms_norm(u, w, eps) for w in (wa, wb))
            outs.append(apply_rope(gather_scatter(t, und, gen, f_und, f_gen), cos, sin))
        return tuple(outs)

    cases.append(
        (
            f"mot_qk_norm_rope q [{L}, {Hq}, {D}], k [{L}, {Hkv}, {D}]",
            lambda b: fwd_bwd(
                lambda a, c: mot.mot_qk_norm_rope(a, c, n, qw1, qw2, kw1, kw2, cos, sin, eps, backend=b),
                [q, k],
                [qw1, qw2, kw1, kw2],
                (dq, dk),
            ),
            fwd_bwd(qk_gs, [q, k], [qw1, qw2, kw1, kw2], (dq, dk)),
        )
    )
    # SwiGLU (not routed: the gather/scatter column is plain torch)
    gt, up = rnd(L, inter), rnd(L, inter)
    dh = rnd(L, inter, grad=False)
    cases.append(
        (
            f"swiglu [{L}, {inter}]",
            lambda b: fwd_bwd(lambda a, c: mot.swiglu(a, c, backend=b), [gt, up], [], dh),
            fwd_bwd(swiglu_reference, [gt, up], [], dh),
        )
    )
    # routed linear: the q projection (bias) and the MLP gate projection
    for name, out_f, bias in (("q_proj", Hq * D, True), ("gate_proj", inter, False)):
        xx = rnd(L, H)
        wa, wb = rnd(out_f, H, scale=H**-0.5), rnd(out_f, H, scale=H**-0.5)
        ba, bb = (rnd(out_f, scale=0.1), rnd(out_f, scale=0.1)) if bias else (None, None)
        ps = [p for p in (wa, wb, ba, bb) if p is not None]
        dyo = rnd(L, out_f, grad=False)
        cases.append(
            (
                f"mot_linear {name} [{L}, {H}] -> {out_f}",
                lambda b, xx=xx, wa=wa, wb=wb, ba=ba, bb=bb, ps=ps, dyo=dyo: fwd_bwd(
                    lambda t: mot.mot_linear(t, n, wa, ba, wb, bb, backend=b), [xx], ps, dyo
                ),
                fwd_bwd(
                    lambda t, wa=wa, wb=wb, ba=ba, bb=bb, out_f=out_f: gather_scatter(
                        t, und, gen, lambda u: F.linear(u, wa, ba), lambda v: F.linear(v, wb, bb), out_f
                    ),
                    [xx],
                    ps,
                    dyo,
                ),
            )
        )
    # row permutation (the grouped layout pays it once per forward, not per op)
    xp = rnd(L, H)
    dyp = rnd(L, H, grad=False)
    cases.append(
        (
            f"permute_rows [{L}, {H}]",
            lambda b: (
                fwd_bwd(lambda t: mot.permute_rows(t, perm), [xp], [], dyp)
                if b == "triton"
                else fwd_bwd(lambda t: t[perm], [xp], [], dyp)
            ),
            None,
        )
    )

    for name, make, upstream in cases:
        try:
            t_tri = time_ms(make("triton"), device, args.reps, args.warmup)
            t_torch = time_ms(make("torch"), device, args.reps, args.warmup)
            t_gs = time_ms(upstream, device, args.reps, args.warmup) if upstream is not None else float("nan")
        except Exception as exc:  # one op failing must not hide the others
            table.add([name, f"failed: {type(exc).__name__}: {str(exc)[:100]}", "-", "-", "-"], ok=False)
            continue
        rows.append((name, t_tri, t_torch, t_gs))
        c = t_gs
        table.add(
            [
                name,
                f"{t_tri:.3f}",
                f"{t_torch:.3f}",
                "-" if c != c else f"{c:.3f}",
                "-" if c != c else f"{c / t_tri:.2f}x",
            ],
            raw=dict(op=name, triton_ms=t_tri, torch_ms=t_torch, gather_scatter_ms=t_gs),
        )


# ---------------------------------------------------------------------------------------------- main
def _plot(path, layer_rows, op_rows):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.6]})
    names = [r[0].split(" ")[0] for r in layer_rows]
    ax1.bar(
        names,
        [r[1] for r in layer_rows],
        color=["tab:green", "tab:olive", "tab:red", "tab:gray", "tab:purple"][: len(layer_rows)],
    )
    ax1.set_ylabel("fwd+bwd ms (median)")
    ax1.set_title("one MoT decoder layer")
    for i, r in enumerate(layer_rows):
        ax1.text(i, r[1], f"{r[1]:.1f}", ha="center", va="bottom", fontsize=8)
    labels = [
        r[0].split(" ")[0] + ("\n" + r[0].split(" ")[1] if r[0].startswith("mot_linear") else "")
        for r in op_rows
    ]
    xs = range(len(op_rows))
    wdt = 0.27
    for j, (lab, col) in enumerate(
        (("triton (grouped)", 1), ("torch (grouped)", 2), ("torch gather/scatter", 3))
    ):
        ax2.bar([i + (j - 1) * wdt for i in xs], [r[col] for r in op_rows], width=wdt, label=lab)
    ax2.set_xticks(list(xs))
    ax2.set_xticklabels(labels, fontsize=7)
    ax2.set_ylabel("fwd+bwd ms (median)")
    ax2.set_title("bagel_kernels.mot ops")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> Report:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dims = TINY if args.tiny else BAGEL_7B
    report = Report(args.out, "bench_mot")
    t0 = time.perf_counter()
    shape = "tiny CPU shapes (interpreter: times are meaningless)" if args.tiny else "BAGEL-7B shapes, bf16"
    t1 = report.table(
        f"MoT decoder layer, fwd+bwd, {'a tiny pack' if args.tiny else f'a {args.tokens}-token pack'}, "
        f"{shape}",
        ["variant", "ms (median)", "peak MiB", "speed-up vs (b)", "vs dense (c)"],
    )
    layer_rows: list = []
    op_rows: list = []
    plot = lambda path: _plot(path, layer_rows, op_rows)  # noqa: E731
    info = run_layer(args, device, dims, t1, layer_rows)
    t1.note(device_info(device))
    t1.note(f"median of {args.reps} timed calls after {args.warmup} warm-up calls")
    write_results(args.out, "bench_mot", None, plot)
    t2 = report.table(
        "bagel_kernels.mot ops, fwd+bwd ms (median)",
        [
            "op",
            "triton",
            "torch backend",
            "torch gather/scatter (upstream)",
            "triton speed-up vs gather/scatter",
        ],
    )
    run_ops(args, device, dims, info, t2, op_rows)
    t2.note(
        "permute_rows: the torch column is x[perm] (its backward an index_put); the grouped layout pays it once per forward"
    )
    t2.note(f"{time.perf_counter() - t0:.0f} s for the whole script")
    write_results(args.out, "bench_mot", None, plot)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="directory for bench_mot.md and bench_mot.png")
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--tokens", type=int, default=16384, help="pack size (realistic_pack)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny shapes on the CPU (Triton interpreter): checks the script only",
    )
    p.add_argument(
        "--upstream-flex",
        action="store_true",
        help="also time gather/scatter + FlexAttention (compiles: +30-60 s)",
    )
    args = p.parse_args(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.reps, args.warmup = 1, 1
    elif no_gpu("bench_mot", args.tiny, "BAGEL-7B shapes in bf16"):
        return 0
    else:
        args.reps, args.warmup = (5, 2) if args.quick else (15, 3)
    report = run(args)
    print(report.render())
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())

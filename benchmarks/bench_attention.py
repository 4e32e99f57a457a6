"""Packed attention benchmark: Triton kernels vs FlexAttention, the per-sample SDPA loop and a
dense-causal ceiling, on realistic BAGEL packs.

    python benchmarks/bench_attention.py --out DIR [--quick]

Cases (bf16 on CUDA):
    llm-{4k,8k,16k,32k}   ``realistic_pack`` (und / t2i / edit samples), Hq=28, Hkv=4, D=128 (BAGEL-7B)
    vit-{8k,16k}          SigLIP: one ``full`` split per image of 700-4900 patches, 16 heads, D=72
Backends:
    triton          ``packed_attention(backend="triton")`` (block tables built once per mask)
    triton+ridx     the same with a random ``row_index`` (the MoT expert-grouped layout; LLM only)
    flex            compiled ``flex_attention`` with a prebuilt block mask (BLOCK_SIZE 128)
    flex+mask       the same, building the block mask on every call (``flex_block_mask``), as
                    upstream BAGEL training pays for it
    sdpa-loop       ``packed_attention(backend="sdpa")``: SDPA per sample with its dense mask
    dense-causal    one causal attention over all tokens (flash-attn if importable, else SDPA's
                    flash kernel): a ceiling, reported in TFLOP/s on its own N(N+1)/2 pairs
FLOPs count visible pairs only: fwd = 4 * D * Hq * pairs, fwd+bwd = 3.5x fwd (bwd = 2.5x fwd).
Times are medians of CUDA-event-timed calls. A backend that fails (OOM, compile error) is reported
in the table, not fatal. ``--quick`` skips the 32k pack. Before timing, Triton is checked against
the SDPA backend in fp32 on the 4k pack (forward and the three gradients, bf16 tolerances).

Writes ``DIR/bench_attention.md`` (table + run header) and ``DIR/bench_attention.png``.
Without CUDA it runs a tiny CPU smoke version (Triton under TRITON_INTERPRET=1, no flex) whose
numbers are not performance figures and are labelled so.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch.nn.functional as F  # noqa: E402

from bagel_kernels import PackedMask, packed_attention  # noqa: E402
from bagel_kernels.attention import flex_block_mask  # noqa: E402
from bagel_kernels.testing import PackLayout, realistic_pack, tolerance  # noqa: E402

BACKENDS = ("triton", "triton+ridx", "flex", "flex+mask", "sdpa-loop", "dense-causal")


# ---------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    layout: PackLayout
    hq: int
    hkv: int
    d: int
    mask: PackedMask | None = None
    backends: tuple[str, ...] = BACKENDS

    @property
    def tokens(self) -> int:
        return self.layout.total_len


def vit_layout(total: int, seed: int, lo: int = 700, hi: int = 4900) -> PackLayout:
    """Images (one ``full`` split and sample each) of ``lo``-``hi`` patches, at most ``total`` in all."""
    rng = random.Random(seed)
    lens: list[int] = []
    while True:
        n = rng.randint(lo, hi)
        if sum(lens) + n > total:
            rest = total - sum(lens)
            if rest >= lo:
                lens.append(rest)
            break
        lens.append(n)
    return PackLayout(lens, list(lens), ["full"] * len(lens), ["vit"] * len(lens))


def build_cases(quick: bool) -> list[Case]:
    if not CUDA:  # smoke run: tiny shapes, the interpreter is slow
        small = PackLayout(
            [100, 60, 96],
            [20, 50, 30, 10, 50, 40, 56],
            ["causal", "full", "causal", "causal", "noise", "causal", "noise"],
            ["und", "t2i", "t2i"],
        )
        return [
            Case(
                "llm-256 (cpu smoke)",
                small,
                4,
                2,
                64,
                backends=("triton", "triton+ridx", "sdpa-loop", "dense-causal"),
            ),
            Case(
                "vit-256 (cpu smoke)",
                vit_layout(256, 0, 40, 120),
                4,
                4,
                72,
                backends=("triton", "sdpa-loop", "dense-causal"),
            ),
        ]
    sizes = [4096, 8192, 16384] + ([] if quick else [32768])
    cases = [Case(f"llm-{n // 1024}k", realistic_pack(n, seed=n), 28, 4, 128) for n in sizes]
    vit_backends = tuple(b for b in BACKENDS if b != "triton+ridx")
    cases += [
        Case(f"vit-{n // 1024}k", vit_layout(n, seed=n), 16, 16, 72, backends=vit_backends)
        for n in (8192, 16384)
    ]
    return cases


# ---------------------------------------------------------------------------------------------- timing
from common import time_ms  # noqa: E402  (the benchmarks' one timing helper)

# two warm-up calls, then at least 3 timed (CUDA events) for 250 ms, at most 40; on the CPU smoke run
# one warm-up and one timed call, the interpreter being slow
TIMING = dict(reps=3, warmup=2, budget_ms=250.0, max_reps=40) if CUDA else dict(reps=1, warmup=1)


_FLEX = {}


def _compiled_flex():
    """One compiled flex_attention for every shape (dynamic), falling back to static shapes."""
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=True)
        _FLEX["static"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _flex_call(q, k, v, block_mask, scale):
    fl = _compiled_flex()
    args = (q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0))
    kw = dict(block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if not _FLEX.get("use_static"):
        try:
            return fl["fn"](*args, **kw)[0].transpose(0, 1)
        except Exception:  # dynamic-shape flex unsupported here: static compile per size
            _FLEX["use_static"] = True
    return fl["static"](*args, **kw)[0].transpose(0, 1)


def make_fn(backend: str, case: Case, q, k, v):
    """A callable ``f(q, k, v) -> out`` for the backend (tables/block masks built on first use)."""
    mask = case.mask
    scale = case.d**-0.5
    if backend == "triton":
        return lambda q, k, v: packed_attention(q, k, v, mask, backend="triton")
    if backend == "triton+ridx":
        perm = torch.randperm(mask.total_len, device=q.device, generator=None)
        pmask = mask.with_row_index(perm.to(torch.int32))
        return lambda q, k, v: packed_attention(q, k, v, pmask, backend="triton")
    if backend == "flex":
        bm = flex_block_mask(mask)
        return lambda q, k, v: _flex_call(q, k, v, bm, scale)
    if backend == "flex+mask":
        return lambda q, k, v: _flex_call(q, k, v, flex_block_mask(mask), scale)
    if backend == "sdpa-loop":
        return lambda q, k, v: packed_attention(q, k, v, mask, backend="sdpa")
    if backend == "dense-causal":
        rep = case.hq // case.hkv
        try:
            from flash_attn import flash_attn_func  # optional extra

            return lambda q, k, v: flash_attn_func(q[None], k[None], v[None], causal=True)[0]
        except ImportError:
            pass

        def dense(q, k, v):
            kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
            vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
            qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, kk, vv))
            if CUDA:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)[0].transpose(0, 1)
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)[0].transpose(0, 1)

        return dense
    raise ValueError(f"unknown backend {backend!r}")


# ---------------------------------------------------------------------------------------------- run
@dataclass
class Row:
    case: str
    tokens: int
    pairs: int
    backend: str
    fwd_ms: float = math.nan
    fwd_tflops: float = math.nan
    fb_ms: float = math.nan
    fb_tflops: float = math.nan
    note: str = ""
    extra: dict = field(default_factory=dict)


def _short_error(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:120] if msg else ''}"


def bench_case(case: Case, dtype: torch.dtype, device: str) -> list[Row]:
    case.mask = PackedMask.from_splits(*case.layout.as_tuple(), device=device)
    n = case.tokens
    pairs = case.mask.num_visible_pairs()
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(n, case.hq, case.d, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(n, case.hkv, case.d, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(n, case.hkv, case.d, device=device, dtype=dtype, generator=g).requires_grad_()
    grad = torch.randn(n, case.hq, case.d, device=device, dtype=dtype, generator=g)
    rows = []
    for backend in case.backends:
        bp = n * (n + 1) // 2 if backend == "dense-causal" else pairs
        row = Row(case.name, n, bp, backend)
        fwd_flop = 4.0 * case.d * case.hq * bp
        try:
            fn = make_fn(backend, case, q, k, v)

            def fwd(fn=fn):
                with torch.no_grad():
                    fn(q, k, v)

            def fwd_bwd(fn=fn):
                q.grad = k.grad = v.grad = None
                fn(q, k, v).backward(grad)

            row.fwd_ms = time_ms(fwd, q.device, **TIMING)
            row.fwd_tflops = fwd_flop / row.fwd_ms / 1e9
            row.fb_ms = time_ms(fwd_bwd, q.device, **TIMING)
            row.fb_tflops = 3.5 * fwd_flop / row.fb_ms / 1e9
        except Exception as exc:  # report, never crash the run
            row.note = _short_error(exc)
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
        finally:
            q.grad = k.grad = v.grad = None
            if CUDA:
                torch.cuda.empty_cache()
        print(_format_row(row, rows), flush=True)
        rows.append(row)
    return rows


def correctness_check(dtype: torch.dtype, device: str) -> str:
    """Triton (dtype) vs the SDPA backend in fp32 on one pack: forward and the three gradients."""
    layout = realistic_pack(4096, seed=1) if CUDA else build_cases(True)[0].layout
    hq, hkv, d = (28, 4, 128) if CUDA else (4, 2, 64)
    mask = PackedMask.from_splits(*layout.as_tuple(), device=device)
    g = torch.Generator(device=device).manual_seed(1)
    n = mask.total_len
    base = [torch.randn(n, h, d, device=device, generator=g) for h in (hq, hkv, hkv)]
    grad = torch.randn(n, hq, d, device=device, generator=g)
    results = {}
    for name, dt, be in (("triton", dtype, "triton"), ("ref", torch.float32, "sdpa")):
        q, k, v = (t.to(dt).requires_grad_() for t in base)
        out = packed_attention(q, k, v, mask, backend=be)
        results[name] = (out, *torch.autograd.grad(out, (q, k, v), grad.to(dt)))
    lines, ok = [], True
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        a, b = results["triton"][i].float(), results["ref"][i].float()
        atol, rtol = tolerance(dtype, "fwd" if i == 0 else "bwd")
        err = (a - b).abs().max().item()
        good = bool(torch.isfinite(a).all()) and bool(((a - b).abs() <= atol + rtol * b.abs()).all())
        ok &= good
        lines.append(f"{what} max|err|={err:.2e} ({'ok' if good else 'FAIL'}, atol={atol}, rtol={rtol})")
    verdict = "PASS" if ok else "FAIL"
    return (
        f"correctness (triton {str(dtype)[6:]} vs sdpa fp32, {n} tokens, Hq={hq}, Hkv={hkv}, D={d}): {verdict}: "
        + "; ".join(lines)
    )


# ---------------------------------------------------------------------------------------------- report
def _fmt(x: float, spec: str = ".2f") -> str:
    return "-" if x != x else format(x, spec)


def _format_row(row: Row, previous: list[Row]) -> str:
    if row.note:
        return f"{row.case:>20s} {row.backend:>13s}  failed: {row.note}"
    return (
        f"{row.case:>20s} {row.backend:>13s}  fwd {_fmt(row.fwd_ms, '.3f')} ms {_fmt(row.fwd_tflops, '.1f')} TFLOP/s"
        f"   fwd+bwd {_fmt(row.fb_ms, '.3f')} ms {_fmt(row.fb_tflops, '.1f')} TFLOP/s"
    )


def _speedup(rows: list[Row], row: Row, attr: str) -> str:
    tri = next((r for r in rows if r.case == row.case and r.backend == "triton"), None)
    if tri is None or row.backend == "triton" or row.note or tri.note:
        return "-"
    if row.backend == "dense-causal":  # different work: compare throughput, not time
        key = "fwd_tflops" if attr == "fwd_ms" else "fb_tflops"
        return f"{getattr(tri, key) / getattr(row, key):.2f} (TFLOP/s)"
    return f"{getattr(row, attr) / getattr(tri, attr):.2f}x"


def _run_header(args, dtype) -> list[str]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:
        commit = "?"
    import triton

    card = (
        torch.cuda.get_device_name()
        if CUDA
        else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"
    )
    return [
        f"- card: {card}",
        f"- torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}",
        f"- commit: {commit or '?'}",
        f"- command: `{' '.join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if args is not None else []))}`",
        f"- dtype: {str(dtype)[6:]}; times are medians (ms); TFLOP/s on visible pairs (fwd 4*D*Hq*pairs, fwd+bwd 3.5x)",
    ] + _tile_lines(dtype)


def _tile_lines(dtype) -> list[str]:
    """The Triton tiles this run used per head dim, and where they came from (tuned table or default)."""
    if not CUDA:
        return ["- tiles: interpreter test tiles (CPU)"]
    from bagel_kernels.attention_configs import config_for, config_origin

    cap = torch.cuda.get_device_capability()
    return [f"- tiles D={d}: {config_for(cap, dtype, d)} ({config_origin(cap, dtype, d)})" for d in (128, 72)]


def write_markdown(path: str, rows: list[Row], header: list[str], check: str) -> None:
    lines = ["# bench_attention", ""]
    if not CUDA:
        lines += ["**CPU smoke run (Triton interpreter): these numbers are NOT performance figures.**", ""]
    lines += header + ["", check, ""]
    lines += [
        "| case | tokens | visible pairs | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | triton speed-up fwd | triton speed-up fwd+bwd | note |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.tokens} | {r.pairs:.3e} | {r.backend} | {_fmt(r.fwd_ms, '.3f')} | {_fmt(r.fwd_tflops, '.1f')} | "
            f"{_fmt(r.fb_ms, '.3f')} | {_fmt(r.fb_tflops, '.1f')} | {_speedup(rows, r, 'fwd_ms')} | {_speedup(rows, r, 'fb_ms')} | {r.note} |"
        )
    lines += [
        "",
        "Speed-up = backend time / triton time (> 1: triton is faster). For dense-causal the ratio is of "
        "TFLOP/s (triton / ceiling), since it does different work.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(path: str, rows: list[Row], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r.case for r in rows))
    backends = [b for b in BACKENDS if any(r.backend == b for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 2.2 * len(cases)), 4.5), sharey=False)
    width = 0.8 / max(1, len(backends))
    for ax, key, label in ((axes[0], "fwd_tflops", "forward"), (axes[1], "fb_tflops", "forward + backward")):
        for j, b in enumerate(backends):
            vals = []
            for c in cases:
                r = next((r for r in rows if r.case == c and r.backend == b), None)
                vals.append(getattr(r, key) if r is not None and not r.note else 0.0)
            xs = [i + (j - (len(backends) - 1) / 2) * width for i in range(len(cases))]
            ax.bar(xs, [0 if v != v else v for v in vals], width, label=b)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=20)
        ax.set_ylabel("TFLOP/s (visible pairs)")
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="packed attention benchmark (see module docstring)")
    ap.add_argument(
        "--out", default="benchmarks/results", help="output directory for bench_attention.md/.png"
    )
    ap.add_argument("--quick", action="store_true", help="skip the 32k pack")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    if not CUDA:
        print("bench_attention: no CUDA device; running a tiny CPU smoke version under TRITON_INTERPRET=1 "
              "(numbers are not performance figures; the real benchmark needs CUDA)")  # fmt: skip
    t0 = time.perf_counter()
    try:
        check = correctness_check(dtype, device)
    except Exception as exc:
        check = f"correctness check failed to run: {_short_error(exc)}"
    print(check, flush=True)
    rows: list[Row] = []
    for case in build_cases(args.quick):
        print(f"--- {case.name}: {case.tokens} tokens, Hq={case.hq}, Hkv={case.hkv}, D={case.d}", flush=True)
        try:
            rows += bench_case(case, dtype, device)
        except Exception as exc:  # e.g. OOM allocating the inputs
            print(f"case {case.name} failed: {_short_error(exc)}")
            rows.append(Row(case.name, case.tokens, 0, "-", note=_short_error(exc)))
    header = _run_header(args, dtype)
    md = os.path.join(args.out, "bench_attention.md")
    png = os.path.join(args.out, "bench_attention.png")
    write_markdown(md, rows, header, check)
    card = torch.cuda.get_device_name() if CUDA else "CPU smoke run (not performance)"
    write_plot(png, rows, f"packed attention, {str(dtype)[6:]}, {card}")
    print(f"wrote {md} and {png} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

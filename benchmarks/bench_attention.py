"""Packed attention benchmark: Triton kernels (both backward variants, the head-dim split against the
padded layout, TMA) vs FlexAttention, the per-sample SDPA loop and a dense-causal ceiling, on realistic
BAGEL packs.

    python benchmarks/bench_attention.py --out DIR [--quick] [--backends a,b,...] [--compile-share-s 60]

Cases (bf16 on CUDA):
    llm-{4k,8k,16k,32k}   ``realistic_pack`` (und / t2i / edit samples), Hq=28, Hkv=4, D=128 (BAGEL-7B)
    vit-{8k,16k}          SigLIP: one ``full`` split per image of 700-4900 patches, 16 heads, D=72
``--quick`` (what ``gpu_check.sh`` runs): llm-4k, llm-16k (the pack the goals of issue 15 name), vit-16k.
Backends (what each row times: fwd, bwd = the backward alone, fwd+bwd), in this order:
    triton          ``packed_attention(backend="triton")``: the configured kernels, ``deterministic=False``
                    (block tables built once per mask)
    triton-1pass    the one-pass backward (dK/dV programs adding dQ with fp32 atomics, 5 products per
                    tile pair): ``AttnConfig.onepass=1``; bwd and fwd+bwd (its forward is triton's)
    triton-2pass    the two-program backward (7 products, no atomics) that ``deterministic=True`` runs;
                    bwd and fwd+bwd. Whichever of the two is the configured default is not timed twice:
                    its row repeats the triton row's numbers, marked so.
    triton+ridx     triton with a random ``row_index`` (the MoT expert-grouped layout; LLM only)
    triton+tma      the forward reading K/V through tensor descriptors (``AttnConfig.tma=1``; sm_90+)
    triton-padD     ViT only: "today's kernel": head dim 72 padded to 128 with the padded layout's
                    built-in tiles (``default_for(..., dsplit=False)``), to compare with the 64 + 16 split
    sdpa-loop       ``packed_attention(backend="sdpa")``: SDPA per sample with its dense mask
    dense-causal    one causal attention over all tokens, GQA without copies (flash-attn if importable,
                    else SDPA's flash kernel with ``enable_gqa=True``): a ceiling, in TFLOP/s on its own
                    N(N+1)/2 pairs
    flex            ``packed_attention(backend="flex")``: ``flex_compiled()`` (compiled once for dynamic
                    lengths) with the BlockMask tables ``flex_kv_blocks(mask)`` prebuilt
    flex+mask       compiled ``flex_attention`` with the block mask built on every call by
                    ``create_block_mask`` (``flex_block_mask``), as upstream BAGEL training pays for it
    flex+tables     the backend's path with the pack's mask and tables built on every call
                    (``PackedMask.from_splits`` + ``flex_kv_blocks``)
``--backends`` keeps a subset (the correct phase of ``gpu_check.sh`` runs the quick rows without flex).
FLOPs count visible pairs only: fwd = 4 * D * Hq * pairs, bwd = 2.5x fwd, fwd+bwd = 3.5x fwd.
Times are medians of CUDA-event-timed calls. Compile cost is kept apart from run cost: a row's first
calls (forward+backward, then forward: inductor compiles, Triton JIT, block tables) are timed alone
("first calls s"); the compiled baselines (flex rows, last in the order) get ``--compile-share-s`` seconds
for them, past which the row says so and is not timed. A backend that fails (OOM, compile error) is
reported in the table, not fatal. Before timing, Triton (default, one-pass, and the SigLIP split) is
checked against the SDPA backend in fp32 (forward and the three gradients, bf16 tolerances). The
markdown ends with the goals of issue 15 next to what this run measured.

Writes ``DIR/bench_attention.md`` row by row as rows are measured (a run cut off keeps every row before
the cut), ``DIR/bench_attention.jsonl`` (the raw numbers of every row) and ``DIR/bench_attention.png``
(after every case). Exit status 1 when the correctness check does not pass or every row failed.
Without CUDA it runs a tiny CPU smoke version (Triton under TRITON_INTERPRET=1, no flex) whose
numbers are not performance figures and are labelled so.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import random
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from common import CompileTimeout, Report, first_call_s, git_commit, time_ms, use_checkout  # noqa: E402

use_checkout()
from bagel_kernels import PackedMask, packed_attention  # noqa: E402
from bagel_kernels import attention_configs as ac  # noqa: E402
from bagel_kernels.attention import flex_block_mask, flex_kv_blocks, triton_packed_attention  # noqa: E402
from bagel_kernels.attention_triton import default_config  # noqa: E402
from bagel_kernels.testing import PackLayout, realistic_pack, tolerance  # noqa: E402

# the compiled baselines come last: their compiles (timed apart, each within its share) cannot starve
# the rows before them
BACKENDS = (
    "triton", "triton-1pass", "triton-2pass", "triton+ridx", "triton+tma", "triton-padD",
    "sdpa-loop", "dense-causal", "flex", "flex+mask", "flex+tables",
)  # fmt: skip
COMPILED = ("flex", "flex+mask", "flex+tables")  # inductor compiles on first call
LLM_BACKENDS = tuple(b for b in BACKENDS if b != "triton-padD")
VIT_BACKENDS = tuple(b for b in BACKENDS if b != "triton+ridx")
# what each backend times (the others reuse the triton row's forward)
TIMES = {
    "triton-1pass": ("bwd", "fb"), "triton-2pass": ("bwd", "fb"), "triton+tma": ("fwd",),
    "flex+mask": ("fwd", "fb"), "flex+tables": ("fwd", "fb"), "sdpa-loop": ("fwd", "fb"),
    "dense-causal": ("fwd", "fb"),
}  # fmt: skip
ALL_TIMES = ("fwd", "bwd", "fb")


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
        llm = ("triton", "triton-1pass", "triton-2pass", "triton+ridx", "sdpa-loop", "dense-causal")
        vit = ("triton", "triton-1pass", "triton-padD", "sdpa-loop", "dense-causal")
        return [
            Case("llm-256 (cpu smoke)", small, 4, 2, 64, backends=llm),
            Case("vit-256 (cpu smoke)", vit_layout(256, 0, 40, 120), 4, 4, 72, backends=vit),
        ]
    sizes = [4096, 16384] if quick else [4096, 8192, 16384, 32768]
    cases = [
        Case(f"llm-{n // 1024}k", realistic_pack(n, seed=n), 28, 4, 128, backends=LLM_BACKENDS) for n in sizes
    ]
    cases += [
        Case(f"vit-{n // 1024}k", vit_layout(n, seed=n), 16, 16, 72, backends=VIT_BACKENDS)
        for n in ((16384,) if quick else (8192, 16384))
    ]
    return cases


# ---------------------------------------------------------------------------------------------- timing

# two warm-up calls, then at least 3 timed (CUDA events) for 250 ms, at most 40; on the CPU smoke run
# one timed call (the first calls, timed apart, are its warm-up), the interpreter being slow
TIMING = dict(reps=3, warmup=2, budget_ms=250.0, max_reps=40) if CUDA else dict(reps=1, warmup=0)


_FLEX_UPSTREAM = {}


def _flex_upstream(q, k, v, block_mask, scale):
    """``flex_attention`` compiled as upstream BAGEL compiles it (``torch.compile(flex_attention)``),
    called with a BlockMask from ``create_block_mask``."""
    if "fn" not in _FLEX_UPSTREAM:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX_UPSTREAM["fn"] = torch.compile(flex_attention)
    args = (q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0))
    out = _FLEX_UPSTREAM["fn"](*args, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def triton_config(backend: str, case: Case, q) -> ac.AttnConfig | None:
    """The configuration a Triton variant runs (None: the configured default, as the backend picks it)."""
    cfg = default_config(q.device, q.dtype, case.d)
    if backend == "triton-1pass":
        return dataclasses.replace(cfg, onepass=1)
    if backend == "triton+tma":
        return dataclasses.replace(cfg, tma=1)
    if backend == "triton-padD":  # "today's kernel": the padded layout with its own built-in tiles
        if not CUDA:
            return dataclasses.replace(cfg, dsplit=0)
        cap = torch.cuda.get_device_capability(q.device)
        return ac.default_for(cap[0] * 10 + cap[1], q.dtype == torch.float32, case.d, dsplit=False)
    return None


def same_as_default(backend: str, case: Case, q) -> bool:
    """A backward variant that is the configured default for ``deterministic=False`` (not timed twice)."""
    default = default_config(q.device, q.dtype, case.d).onepass
    return (backend == "triton-1pass" and default == 1) or (backend == "triton-2pass" and default == 0)


def make_fn(backend: str, case: Case, q, k, v):
    """A callable ``f(q, k, v) -> out`` for the backend (tables/block masks built on first use)."""
    mask = case.mask
    scale = case.d**-0.5
    if backend == "triton":
        return lambda q, k, v: packed_attention(q, k, v, mask, backend="triton")
    if backend == "triton-2pass":
        return lambda q, k, v: packed_attention(q, k, v, mask, backend="triton", deterministic=True)
    if backend in ("triton-1pass", "triton+tma", "triton-padD"):
        cfg = triton_config(backend, case, q)
        return lambda q, k, v: triton_packed_attention(q, k, v, mask, config=cfg)
    if backend == "triton+ridx":
        perm = torch.randperm(mask.total_len, device=q.device, generator=None)
        pmask = mask.with_row_index(perm.to(torch.int32))
        return lambda q, k, v: packed_attention(q, k, v, pmask, backend="triton")
    if backend == "flex":
        flex_kv_blocks(mask)  # prebuilt
        return lambda q, k, v: packed_attention(q, k, v, mask, backend="flex")
    if backend == "flex+mask":
        return lambda q, k, v: _flex_upstream(q, k, v, flex_block_mask(mask), scale)
    if backend == "flex+tables":
        layout = case.layout.as_tuple()
        return lambda q, k, v: packed_attention(
            q, k, v, PackedMask.from_splits(*layout, device=q.device), backend="flex"
        )
    if backend == "sdpa-loop":
        return lambda q, k, v: packed_attention(q, k, v, mask, backend="sdpa")
    if backend == "dense-causal":
        try:
            from flash_attn import flash_attn_func  # optional extra; native GQA

            return lambda q, k, v: flash_attn_func(q[None], k[None], v[None], causal=True)[0]
        except ImportError:
            pass

        def dense(q, k, v):  # SDPA with GQA in the kernel: no repeated K/V
            qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            gqa = case.hq != case.hkv
            if CUDA:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
                return out[0].transpose(0, 1)
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
            return out[0].transpose(0, 1)

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
    bwd_ms: float = math.nan
    bwd_tflops: float = math.nan
    fb_ms: float = math.nan
    fb_tflops: float = math.nan
    note: str = ""  # why there are no numbers (an error, a skip)
    info: str = ""  # where the numbers come from, when not from their own timing
    first_s: float = math.nan  # wall seconds of the first calls (compiles included), apart from the run times
    extra: dict = field(default_factory=dict)


def _short_error(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:120] if msg else ''}"


def _skip_reason(backend: str, q) -> str:
    if backend == "triton+tma" and CUDA and torch.cuda.get_device_capability(q.device)[0] < 9:
        return "TMA needs sm_90+: not timed"
    return ""


def bench_case(
    case: Case,
    dtype: torch.dtype,
    device: str,
    *,
    table=None,
    done: list[Row] | None = None,
    compile_share_s: float | None = None,
) -> list[Row]:
    """Every backend of ``case``, one row each, added to ``table`` (a ``common.Table``) as measured.
    The first calls of a backend (compiles, Triton JIT, block-mask builds) are timed apart as
    ``first_s``; for a compiled baseline they run under ``compile_share_s`` (past it the row says so and
    is not timed)."""
    done = [] if done is None else done
    case.mask = PackedMask.from_splits(*case.layout.as_tuple(), device=device)
    n = case.tokens
    pairs = case.mask.num_visible_pairs()
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(n, case.hq, case.d, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(n, case.hkv, case.d, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(n, case.hkv, case.d, device=device, dtype=dtype, generator=g).requires_grad_()
    grad = torch.randn(n, case.hq, case.d, device=device, dtype=dtype, generator=g)
    rows: list[Row] = []
    for backend in case.backends:
        bp = n * (n + 1) // 2 if backend == "dense-causal" else pairs
        row = Row(case.name, n, bp, backend)
        fwd_flop = 4.0 * case.d * case.hq * bp
        base = next((r for r in rows if r.backend == "triton"), None)
        try:
            row.note = _skip_reason(backend, q)
            if row.note:
                pass
            elif same_as_default(backend, case, q) and base is not None and not base.note:
                # the configured default backward: the triton row already timed these kernels
                row.bwd_ms, row.bwd_tflops, row.fb_ms, row.fb_tflops = (
                    base.bwd_ms, base.bwd_tflops, base.fb_ms, base.fb_tflops,
                )  # fmt: skip
                row.info = "the default backward: the triton row's numbers"
            else:
                fn = make_fn(backend, case, q, k, v)
                kinds = TIMES.get(backend, ALL_TIMES)
                if "fwd" not in kinds and base is not None:
                    row.info = "forward as triton's"

                def fwd(fn=fn):
                    with torch.no_grad():
                        fn(q, k, v)

                def fwd_bwd(fn=fn):
                    q.grad = k.grad = v.grad = None
                    fn(q, k, v).backward(grad)

                def first_calls(kinds=kinds):  # each graph a backend compiles: with grad, and without
                    if "bwd" in kinds or "fb" in kinds:
                        fwd_bwd()
                    if "fwd" in kinds:
                        fwd()

                share = compile_share_s if backend in COMPILED else None
                try:
                    row.first_s = first_call_s(first_calls, q.device, share, f"{backend} compile")
                except CompileTimeout as exc:
                    row.first_s = float(share)
                    row.note = f"{exc}: not timed"
                    raise _Reported() from None
                if "fwd" in kinds:
                    row.fwd_ms = time_ms(fwd, q.device, **TIMING)
                    row.fwd_tflops = fwd_flop / row.fwd_ms / 1e9
                if "bwd" in kinds:  # the backward alone, on one saved forward
                    out = fn(q, k, v)

                    def bwd(out=out):
                        torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

                    row.bwd_ms = time_ms(bwd, q.device, **TIMING)
                    row.bwd_tflops = 2.5 * fwd_flop / row.bwd_ms / 1e9
                    del out
                if "fb" in kinds:
                    row.fb_ms = time_ms(fwd_bwd, q.device, **TIMING)
                    row.fb_tflops = 3.5 * fwd_flop / row.fb_ms / 1e9
        except _Reported:
            pass
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
        if table is not None:
            table.add(row_cells(row, done + rows), ok=not row.note, raw=dataclasses.asdict(row))
    return rows


class _Reported(Exception):
    """A row whose note already says why it has no numbers."""


def correctness_check(dtype: torch.dtype, device: str) -> str:
    """Triton (dtype) vs the SDPA backend in fp32: forward and the three gradients, with the default
    configuration and the one-pass backward on an LLM pack, and the SigLIP head dim (72 = 64 + 16)."""
    llm = realistic_pack(4096, seed=1) if CUDA else build_cases(True)[0].layout
    vit = vit_layout(2048, 1, 700, 1100) if CUDA else vit_layout(160, 1, 40, 80)
    checks = [
        ("llm", llm, (28, 4, 128) if CUDA else (4, 2, 64), ("triton", "triton-1pass")),
        ("vit", vit, (16, 16, 72) if CUDA else (2, 2, 72), ("triton", "triton-1pass")),
    ]
    verdicts, lines = [], []
    for label, layout, (hq, hkv, d), variants in checks:
        mask = PackedMask.from_splits(*layout.as_tuple(), device=device)
        g = torch.Generator(device=device).manual_seed(1)
        n = mask.total_len
        base = [torch.randn(n, h, d, device=device, generator=g) for h in (hq, hkv, hkv)]
        grad = torch.randn(n, hq, d, device=device, generator=g)
        q, k, v = (t.requires_grad_() for t in base)
        ref = packed_attention(q, k, v, mask, backend="sdpa")
        ref = (ref, *torch.autograd.grad(ref, (q, k, v), grad))
        case = Case(label, layout, hq, hkv, d, mask=mask)
        for variant in variants:
            q, k, v = (t.detach().to(dtype).requires_grad_() for t in base)
            cfg = triton_config(variant, case, q)
            out = triton_packed_attention(q, k, v, mask, config=cfg)
            got = (out, *torch.autograd.grad(out, (q, k, v), grad.to(dtype)))
            ok, errs = True, []
            for i, what in enumerate(("out", "dq", "dk", "dv")):
                a, b = got[i].float(), ref[i].float()
                atol, rtol = tolerance(dtype, "fwd" if i == 0 else "bwd")
                good = bool(torch.isfinite(a).all()) and bool(((a - b).abs() <= atol + rtol * b.abs()).all())
                ok &= good
                errs.append(f"{what} {(a - b).abs().max().item():.2e}{'' if good else ' FAIL'}")
            verdicts.append(ok)
            what = f"{label} {n} tokens Hq={hq} Hkv={hkv} D={d} {variant}"
            lines.append(f"{what}: {'ok' if ok else 'FAIL'} ({', '.join(errs)})")
    atol, rtol = tolerance(dtype, "bwd")
    return (
        f"correctness (triton {str(dtype)[6:]} vs sdpa fp32, max|err|, bwd atol={atol} rtol={rtol}): "
        f"{'PASS' if all(verdicts) else 'FAIL'}: " + "; ".join(lines)
    )


# ---------------------------------------------------------------------------------------------- report
def _fmt(x: float, spec: str = ".2f") -> str:
    return "-" if x != x else format(x, spec)


def _format_row(row: Row, previous: list[Row]) -> str:
    if row.note:
        return f"{row.case:>20s} {row.backend:>13s}  -- {row.note}"
    return (
        f"{row.case:>20s} {row.backend:>13s}  fwd {_fmt(row.fwd_ms, '.3f')} ms {_fmt(row.fwd_tflops, '.1f')} TFLOP/s"
        f"   bwd {_fmt(row.bwd_ms, '.3f')} ms {_fmt(row.bwd_tflops, '.1f')} TFLOP/s"
        f"   fwd+bwd {_fmt(row.fb_ms, '.3f')} ms {_fmt(row.fb_tflops, '.1f')} TFLOP/s"
        + (f"   ({row.info})" if row.info else "")
    )


def _speedup(rows: list[Row], row: Row, attr: str) -> str:
    tri = next((r for r in rows if r.case == row.case and r.backend == "triton"), None)
    if tri is None or row.backend == "triton" or row.note or tri.note:
        return "-"
    mine, theirs = getattr(tri, attr), getattr(row, attr)
    if row.backend == "dense-causal":  # different work: compare throughput, not time
        key = attr.replace("_ms", "_tflops")
        mine, theirs = getattr(row, key), getattr(tri, key)
        return "-" if mine != mine or theirs != theirs else f"{theirs / mine:.2f} (TFLOP/s)"
    return "-" if mine != mine or theirs != theirs else f"{theirs / mine:.2f}x"


def _row(rows, case, backend):
    r = next((r for r in rows if r.case == case and r.backend == backend), None)
    return None if r is None or r.note else r


def goals(rows: list[Row]) -> list[str]:
    """The goals of issue 15 next to what this run measured (nothing here is an estimate: a goal whose
    rows are missing or failed says so)."""

    def pick(prefix, prefer):  # the goals' pack (16k), else the largest of the kind
        names = [r.case for r in rows if r.case.startswith(prefix) and _row(rows, r.case, "triton")]
        if prefer in names:
            return prefer
        return max(names, key=lambda c: next(r.tokens for r in rows if r.case == c), default=None)

    llm, vit = pick("llm", "llm-16k"), pick("vit", "vit-16k")
    out = ["| goal (issue 15) | target | this run | met |", "|---|---|---|---|"]

    def add(goal, target, value, ok):
        ok = ok if CUDA else None  # interpreter times decide nothing
        value = "-" if value in ("-", "-x") else value
        out.append(f"| {goal} | {target} | {value} | {'-' if ok is None else ('yes' if ok else 'no')} |")

    def ratio(a, b, attr):
        if a is None or b is None:
            return math.nan
        x, y = getattr(a, attr), getattr(b, attr)
        return x / y if x == x and y == y and y > 0 else math.nan

    if llm is None:
        add("LLM pack", "-", "no triton row", None)
    else:
        tri = _row(rows, llm, "triton")
        add(f"forward TFLOP/s ({llm})", ">= 450", _fmt(tri.fwd_tflops, ".1f"), tri.fwd_tflops >= 450)
        for b in ("triton-2pass", "triton-1pass"):
            r = _row(rows, llm, b)
            val = math.nan if r is None else r.bwd_tflops
            met = None if val != val else val >= 300
            add(f"backward TFLOP/s ({llm}, {b})", ">= 300", _fmt(val, ".1f"), met)
        flex = _row(rows, llm, "flex")
        for b in ("triton", "triton-2pass", "triton-1pass"):
            x = ratio(flex, _row(rows, llm, b), "fb_ms")
            met = None if x != x else x >= 1.6
            add(f"fwd+bwd vs flex prebuilt ({llm}, {b})", ">= 1.6x", _fmt(x, ".2f") + "x", met)
    if vit is None:
        add("SigLIP pack", "-", "no triton row", None)
    else:
        pad = _row(rows, vit, "triton-padD")
        for attr, what in (("fwd_ms", "forward"), ("fb_ms", "fwd+bwd")):
            x = ratio(pad, _row(rows, vit, "triton"), attr)
            met = None if x != x else x >= 1.5
            goal = f"SigLIP {what} vs today's kernel ({vit}, triton-padD / triton)"
            add(goal, ">= 1.5x", _fmt(x, ".2f") + "x", met)
    return out


def _run_header(args, dtype) -> list[str]:
    commit = git_commit()  # BAGEL_COMMIT where the tree has no .git (a device copy)
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
        f"- dtype: {str(dtype)[6:]}; times are medians (ms); TFLOP/s on visible pairs (fwd 4*D*Hq*pairs, bwd 2.5x, "
        "fwd+bwd 3.5x)",
    ] + _tile_lines(dtype)


def _tile_lines(dtype) -> list[str]:
    """The Triton tiles this run used per head dim, and where they came from (tuned table or default)."""
    if not CUDA:
        return ["- tiles: interpreter test tiles (CPU)"]
    from bagel_kernels.attention_configs import config_for, config_origin

    cap = torch.cuda.get_device_capability()
    return [f"- tiles D={d}: {config_for(cap, dtype, d)} ({config_origin(cap, dtype, d)})" for d in (128, 72)]


COLUMNS = [
    "case",
    "tokens",
    "visible pairs",
    "backend",
    "fwd ms",
    "fwd TFLOP/s",
    "bwd ms",
    "bwd TFLOP/s",
    "fwd+bwd ms",
    "fwd+bwd TFLOP/s",
    "triton speed-up fwd",
    "bwd",
    "fwd+bwd",
    "first calls s (compile)",
    "note",
]


def row_cells(r: Row, rows: list[Row]) -> list[str]:
    """The table cells of ``r``; the speed-ups against the triton row of its case among ``rows``."""
    return [
        r.case,
        str(r.tokens),
        f"{r.pairs:.3e}",
        r.backend,
        _fmt(r.fwd_ms, ".3f"),
        _fmt(r.fwd_tflops, ".1f"),
        _fmt(r.bwd_ms, ".3f"),
        _fmt(r.bwd_tflops, ".1f"),
        _fmt(r.fb_ms, ".3f"),
        _fmt(r.fb_tflops, ".1f"),
        _speedup(rows, r, "fwd_ms"),
        _speedup(rows, r, "bwd_ms"),
        _speedup(rows, r, "fb_ms"),
        _fmt(r.first_s, ".1f"),
        r.note or r.info,
    ]


def footer(rows: list[Row]) -> str:
    lines = [
        "Speed-up = backend time / triton time (> 1: triton is faster). For dense-causal the ratio is of "
        "TFLOP/s (triton / ceiling), since it does different work. bwd = the backward alone on a saved "
        "forward (2.5x the forward's FLOPs). first calls s = wall time of a backend's first forward+backward "
        "and forward calls (compiles, Triton JIT, block tables), kept apart from the run times.",
        "",
        "## Goals",
        "",
        *goals(rows),
        "",
    ]
    if not CUDA:
        lines += ["(CPU smoke run: the goal column compares interpreter times, which mean nothing.)", ""]
    return "\n".join(lines)


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
        "--out", default="benchmarks/results", help="output directory for bench_attention.md/.jsonl/.png"
    )
    ap.add_argument("--quick", action="store_true", help="skip the 32k pack")
    ap.add_argument("--backends", default=None, help=f"comma-separated subset of {','.join(BACKENDS)}")
    ap.add_argument(
        "--compile-share-s",
        type=float,
        default=60.0,
        help="seconds a compiled baseline's first calls may take before its row says so (default 60)",
    )
    args = ap.parse_args(argv)
    only = None
    if args.backends:
        only = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in only if b not in BACKENDS]
        if unknown or not only:
            ap.error(f"--backends: unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    if not CUDA:
        print("bench_attention: no CUDA device; running a tiny CPU smoke version under TRITON_INTERPRET=1 "
              "(numbers are not performance figures; the real benchmark needs CUDA)")  # fmt: skip
    t0 = time.perf_counter()
    report = Report(args.out, "bench_attention")
    head = ["# bench_attention", ""]
    if not CUDA:
        head += ["**CPU smoke run (Triton interpreter): these numbers are NOT performance figures.**", ""]
    report.text("\n".join(head + _run_header(args, dtype)))
    try:
        check = correctness_check(dtype, device)
    except Exception as exc:
        check = f"correctness check failed to run: {_short_error(exc)}"
    print(check, flush=True)
    report.text(check)
    table = report.table("Packed attention", COLUMNS)
    png = os.path.join(args.out, "bench_attention.png")
    card = torch.cuda.get_device_name() if CUDA else "CPU smoke run (not performance)"
    rows: list[Row] = []
    for case in build_cases(args.quick):
        if only is not None:
            case.backends = tuple(b for b in case.backends if b in only)
        print(f"--- {case.name}: {case.tokens} tokens, Hq={case.hq}, Hkv={case.hkv}, D={case.d}", flush=True)
        try:
            rows += bench_case(
                case, dtype, device, table=table, done=rows, compile_share_s=args.compile_share_s
            )
        except Exception as exc:  # e.g. OOM allocating the inputs
            print(f"case {case.name} failed: {_short_error(exc)}")
            row = Row(case.name, case.tokens, 0, "-", note=_short_error(exc))
            rows.append(row)
            table.add(row_cells(row, rows), ok=False, raw=dataclasses.asdict(row))
        try:  # the plot so far, after every case
            write_plot(png, rows, f"packed attention, {str(dtype)[6:]}, {card}")
        except Exception as exc:  # noqa: BLE001  (the numbers matter more than the picture)
            print(f"plot not drawn: {_short_error(exc)}")
    report.text(footer(rows))
    print(f"wrote {report.path('md')} and {png} in {time.perf_counter() - t0:.0f} s")
    if not check.startswith("correctness") or ": PASS:" not in check:
        print("bench_attention: the correctness check did not pass")
        return 1
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())

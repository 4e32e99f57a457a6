"""Equivalence report: every available attention backend against a float64 dense reference.

    python -m bagel_kernels.check [--device cuda] [--dtype bf16] [--tokens 384] [--seed 0]

Builds random BAGEL-like packs (understanding, text-to-image, edit and interleaved samples plus a pad
sample) and prints, per backend and case, the max abs and max relative error of the output and of the
q, k, v gradients. On a CPU-only machine the Triton backend runs under the Triton interpreter.
Exits non-zero if any error exceeds the tolerance table of ``bagel_kernels.testing``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

MAX_TOKENS = 8192  # tokens per pack: the float64 dense reference holds [tokens, tokens] per head
MAX_SEED = 2**32 - 1  # what every seeded generator here takes


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``prog: error: ...``, exit status 2), no usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse(argv):
    name = "bagel-kernels-check"
    prog = name if sys.argv[0].endswith(name) else "python -m bagel_kernels.check"
    p = _OneLineParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(
        "--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: bf16 on cuda, fp32 on cpu"
    )
    p.add_argument(
        "--tokens", type=int, default=None, help="approximate tokens per pack (default 384 cpu, 4096 cuda)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", default=None, help="comma-separated subset of triton,flex,sdpa")
    args = p.parse_args(argv)
    # every value checked before any work (the checks below import nothing new but torch for CUDA)
    from .attention import ATTENTION

    if args.backends is not None:
        names = [n.strip() for n in args.backends.split(",")]
        unknown = [n for n in names if n not in ATTENTION.backends]
        if unknown or not names:
            p.error(f"--backends: unknown backend(s) {unknown}; choose from {', '.join(ATTENTION.backends)}")
        args.backends = ",".join(names)
    if args.tokens is not None and not 1 <= args.tokens <= MAX_TOKENS:
        p.error(
            f"--tokens {args.tokens} must be in [1, {MAX_TOKENS}] (the dense float64 reference is quadratic in it)"
        )
    if not 0 <= args.seed <= MAX_SEED:
        p.error(f"--seed {args.seed} must be in [0, {MAX_SEED}]")
    if args.device not in (None, "cpu"):
        kind, _, index = args.device.partition(":")
        if kind != "cuda" or (index and not index.isdigit()):
            p.error(f"--device {args.device!r} is not supported: use cpu, cuda or cuda:N")
        import torch

        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: no CUDA device is visible")
    return args


def _attention_cases(rng: random.Random, tokens: int) -> list[tuple]:
    """``(name, hq, hkv, d, layout)``; layout None: the ViT case (all-``full`` images, lengths drawn after)."""
    from bagel_kernels.testing import random_pack

    scale_t = max(tokens // 40, 4)
    return [
        (
            "mixed pack, GQA 2, D=64",
            4,
            2,
            64,
            random_pack(rng, 8, text=(1, scale_t), image=(1, 2 * scale_t), pad=7),
        ),
        (
            "edit/t2i pack, GQA 7, D=128",
            7,
            1,
            128,
            random_pack(rng, 5, kinds=("edit", "t2i"), text=(1, scale_t), image=(1, 2 * scale_t), pad=0),
        ),
        ("ViT images (all full), D=72", 4, 4, 72, None),
    ]


def _case_mask(layout, vit_lens: list[int], device):
    """The case's mask and the tokens present (the pad sample's rows are not)."""
    from bagel_kernels import PackedMask

    if layout is None:
        mask = PackedMask.from_splits(vit_lens, vit_lens, ["full"] * len(vit_lens), device=device)
        return mask, mask.total_len
    mask = PackedMask.from_splits(*layout.as_tuple(), device=device)
    return mask, mask.total_len - (layout.sample_lens[-1] if layout.sample_kinds[-1] == "pad" else 0)


def _errors(got, ref, tol) -> tuple[float, float, bool]:
    """(max abs error, max relative error, within ``tol``) of ``got`` against the float64 ``ref``."""
    err = (got.detach().double() - ref).abs()
    ok = bool(got.isfinite().all()) and bool((err <= tol[0] + tol[1] * ref.abs()).all())
    return float(err.max()), float((err / (ref.abs() + tol[0])).max()), ok


def _check_backend(be: str, case: tuple, tols: tuple, label: str) -> int:
    """One row of the table: ``be`` on the case's inputs against the float64 reference; 1 on failure."""
    import torch

    from bagel_kernels import packed_attention
    from bagel_kernels.attention import ATTENTION
    from bagel_kernels.dispatch import Request

    (q, k, v, g, mask), (ref, rgrads) = case
    (fwd_tol, bwd_tol), T = tols, q.shape[0]
    sizes = {"head_dim": q.shape[-1]}
    probe_reasons = ATTENTION.backends[be].reasons(Request(q.device, q.dtype, sizes, backward=True))
    with_grad = not probe_reasons
    if not with_grad and ATTENTION.backends[be].reasons(Request(q.device, q.dtype, sizes)):
        why = "; ".join(ATTENTION.backends[be].reasons(Request(q.device, q.dtype, sizes)))
        print(f"{label:32s} {be:7s} {T:6d}  skipped: {why}")
        return 0
    qq, kk, vv = (t.clone().requires_grad_(with_grad) for t in (q, k, v))
    t0 = time.perf_counter()
    try:
        out = packed_attention(qq, kk, vv, mask, backend=be)
        grads = torch.autograd.grad(out, (qq, kk, vv), g) if with_grad else None
    except Exception as exc:  # report, keep going: the point is a full table
        print(f"{label:32s} {be:7s} {T:6d}  ERROR: {type(exc).__name__}: {exc}")
        return 1
    if q.device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    out_abs, out_rel, ok = _errors(out, ref, fwd_tol)
    cols = [f"{out_abs:9.2e}", f"{out_rel:9.2e}"]
    note = f" (forward only: {'; '.join(probe_reasons)})"
    if grads is not None:
        g_rel = 0.0
        for a, b in zip(grads, rgrads, strict=True):
            g_abs, rel, good = _errors(a, b, bwd_tol)
            cols.append(f"{g_abs:9.2e}")
            g_rel, ok = max(g_rel, rel), ok and good
        cols.append(f"{g_rel:9.2e}")
        note = ""
    else:
        cols += [f"{'-':>9s}"] * 4
    print(f"{label:32s} {be:7s} {T:6d} {' '.join(cols)} {ms:8.1f}  {'ok' if ok else 'FAIL'}{note}")
    return 0 if ok else 1


def main(argv=None) -> int:
    args = _parse(argv)
    import warnings

    import torch

    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    from bagel_kernels.attention import ATTENTION
    from bagel_kernels.reference import attention_reference
    from bagel_kernels.testing import tolerance

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    tokens = args.tokens or (4096 if device.type == "cuda" else 384)
    backends = args.backends.split(",") if args.backends else list(ATTENTION.backends)
    tol_name = "tf32" if (dtype == torch.float32 and device.type == "cuda") else dtype
    tols = tolerance(tol_name, "fwd"), tolerance(tol_name, "bwd")

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    cases = _attention_cases(rng, tokens)
    vit_lens = [rng.randint(1, 3 * max(tokens // 40, 4)) for _ in range(4)]

    print(
        f"bagel_kernels.check: device={device} dtype={str(dtype).removeprefix('torch.')} seed={args.seed} "
        f"torch={torch.__version__} interpret={os.environ.get('TRITON_INTERPRET', '0')}"
    )
    print(f"tolerances (atol, rtol): fwd {tols[0]}, grads {tols[1]}\n")
    header = f"{'case':32s} {'backend':7s} {'tokens':>6s} {'out abs':>9s} {'out rel':>9s} {'dq abs':>9s} {'dk abs':>9s} {'dv abs':>9s} {'grad rel':>9s} {'ms':>8s}  status"
    print(header)
    print("-" * len(header))
    failures = 0
    for name, hq, hkv, d, layout in cases:
        mask, T = _case_mask(layout, vit_lens, device)
        q, k, v, g = (torch.randn(T, h, d, device=device, dtype=dtype) for h in (hq, hkv, hkv, hq))
        qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
        ref = attention_reference(qd, kd, vd, mask)
        rgrads = torch.autograd.grad(ref, (qd, kd, vd), g.double())
        case = (q, k, v, g, mask), (ref.detach(), rgrads)
        failures += sum(_check_backend(be, case, tols, name) for be in backends)
    failures += _check_mot(device, dtype, *tols, rng)
    print(f"\n{'all within tolerance' if not failures else f'{failures} result(s) out of tolerance'}")
    return 1 if failures else 0


def _mot_cases(device, dtype, rng) -> tuple[int, int, dict]:
    """``(N, n_und, {op: (kernel, reference, inputs)})``: each op's Triton path and its reference
    (:mod:`bagel_kernels.reference`), called with the same inputs."""
    import torch

    from bagel_kernels import mot
    from bagel_kernels import reference as ref

    N, H, inter, hq, hkv, d = 203, 200, 344, 4, 2, 64
    n_und = rng.randint(1, N - 1)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    pos = torch.tensor(sorted(rng.randrange(4 * N) for _ in range(N)), device=device)
    cos, sin = mot.rope_cos_sin(pos, d, 10000.0, dtype)

    def qk(fn, q, k, *w, **kw):
        outs = fn(q, k, n_und, *w, cos.to(q.dtype), sin.to(q.dtype), 1e-6, **kw)
        return torch.cat([t.flatten(1) for t in outs], 1)

    tri = {"backend": "triton"}
    cases = {
        "mot_rms_norm": (
            lambda x, wu, wg: mot.mot_rms_norm(x, n_und, wu, wg, 1e-6, **tri),
            lambda x, wu, wg: ref.mot_rms_norm_reference(x, n_und, wu, wg, 1e-6),
            (rand(N, H), rand(H), rand(H)),
        ),
        "mot_qk_norm_rope": (
            lambda *a: qk(mot.mot_qk_norm_rope, *a, **tri),
            lambda *a: qk(ref.mot_qk_norm_rope_reference, *a),
            (rand(N, hq, d), rand(N, hkv, d), rand(d), rand(d), rand(d), rand(d)),
        ),
        "swiglu": (
            lambda a, b: mot.swiglu(a, b, **tri),
            ref.swiglu_reference,
            (rand(N, inter), rand(N, inter)),
        ),
        "mot_linear": (
            lambda x, wu, bu, wg, bg: mot.mot_linear(x, n_und, wu, bu, wg, bg, **tri),
            lambda x, wu, bu, wg, bg: ref.mot_linear_reference(x, n_und, wu, bu, wg, bg),
            (rand(N, H), rand(inter, H) / 16, rand(inter), rand(inter, H) / 16, rand(inter)),
        ),
    }
    perm = torch.randperm(N, device=device)
    cases["permute_rows"] = (
        lambda x: mot.permute_rows(x, perm, **tri),
        lambda x: ref.permute_rows_reference(x, perm),
        (rand(N, H),),
    )
    return N, n_und, cases


def _check_mot(device, dtype, fwd_tol, bwd_tol, rng) -> int:
    """The MoT routed ops (Triton backend) against their float64 references, forward and all
    gradients, on a grouped pack with an unaligned expert boundary. Returns the number of failures."""
    import torch

    N, n_und, cases = _mot_cases(device, dtype, rng)
    print(f"\nMoT ops, backend triton vs float64 torch reference ({N} rows, expert boundary at {n_und})")
    header = f"{'op':20s} {'out abs':>9s} {'grad abs':>9s}  status"
    print(header)
    print("-" * len(header))
    failures = 0
    for name, (kernel, reference, inputs) in cases.items():
        try:
            xs = [t.clone().requires_grad_() for t in inputs]
            out = kernel(*xs)
            g = torch.randn_like(out)
            grads = torch.autograd.grad(out, xs, g)
        except Exception as exc:
            print(f"{name:20s}  ERROR: {type(exc).__name__}: {exc}")
            failures += 1
            continue
        xd = [t.detach().double().requires_grad_() for t in inputs]
        ref = reference(*xd)
        rgrads = torch.autograd.grad(ref, xd, g.double())
        e_out, _, ok = _errors(out, ref.detach(), fwd_tol)
        g_abs = 0.0
        for a, b in zip(grads, rgrads, strict=True):
            e, _, good = _errors(a, b, bwd_tol)
            g_abs, ok = max(g_abs, e), ok and good
        failures += not ok
        print(f"{name:20s} {e_out:9.2e} {g_abs:9.2e}  {'ok' if ok else 'FAIL'}")
    return failures


if __name__ == "__main__":
    sys.exit(main())

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
    from .attention import BACKENDS

    if args.backends is not None:
        names = [n.strip() for n in args.backends.split(",")]
        unknown = [n for n in names if n not in BACKENDS]
        if unknown or not names:
            p.error(f"--backends: unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
        args.backends = ",".join(names)
    if args.tokens is not None and args.tokens < 1:
        p.error(f"--tokens {args.tokens} must be a positive int")
    if args.seed < 0:
        p.error(f"--seed {args.seed} must be >= 0")
    if args.device not in (None, "cpu"):
        kind, _, index = args.device.partition(":")
        if kind != "cuda" or (index and not index.isdigit()):
            p.error(f"--device {args.device!r} is not supported: use cpu, cuda or cuda:N")
        import torch

        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: no CUDA device is visible")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    import warnings

    import torch

    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    from bagel_kernels import BACKENDS, PackedMask, packed_attention
    from bagel_kernels.reference import attention_reference
    from bagel_kernels.testing import random_pack, tolerance

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    tokens = args.tokens or (4096 if device.type == "cuda" else 384)
    backends = args.backends.split(",") if args.backends else list(BACKENDS)
    tol_name = "tf32" if (dtype == torch.float32 and device.type == "cuda") else dtype
    fwd_tol, bwd_tol = tolerance(tol_name, "fwd"), tolerance(tol_name, "bwd")

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    scale_t = max(tokens // 40, 4)
    cases = [
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
    vit_lens = [rng.randint(1, 3 * scale_t) for _ in range(4)]

    print(
        f"bagel_kernels.check: device={device} dtype={str(dtype).removeprefix('torch.')} seed={args.seed} "
        f"torch={torch.__version__} interpret={os.environ.get('TRITON_INTERPRET', '0')}"
    )
    print(f"tolerances (atol, rtol): fwd {fwd_tol}, grads {bwd_tol}\n")
    header = f"{'case':32s} {'backend':7s} {'tokens':>6s} {'out abs':>9s} {'out rel':>9s} {'dq abs':>9s} {'dk abs':>9s} {'dv abs':>9s} {'grad rel':>9s} {'ms':>8s}  status"
    print(header)
    print("-" * len(header))
    failures = 0
    for name, hq, hkv, d, layout in cases:
        if layout is None:
            mask = PackedMask.from_splits(vit_lens, vit_lens, ["full"] * len(vit_lens), device=device)
            T = mask.total_len
        else:
            mask = PackedMask.from_splits(*layout.as_tuple(), device=device)
            T = mask.total_len - (layout.sample_lens[-1] if layout.sample_kinds[-1] == "pad" else 0)
        q = torch.randn(T, hq, d, device=device, dtype=dtype)
        k = torch.randn(T, hkv, d, device=device, dtype=dtype)
        v = torch.randn(T, hkv, d, device=device, dtype=dtype)
        g = torch.randn(T, hq, d, device=device, dtype=dtype)
        qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
        ref = attention_reference(qd, kd, vd, mask)
        rgrads = torch.autograd.grad(ref, (qd, kd, vd), g.double())
        ref = ref.detach()
        for be in backends:
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            probe_reasons = BACKENDS[be].reasons(qq, kk, vv, mask)
            with_grad = not probe_reasons
            if not with_grad:
                qq, kk, vv = q, k, v
                if BACKENDS[be].reasons(q, k, v, mask):
                    print(
                        f"{name:32s} {be:7s} {T:6d}  skipped: {'; '.join(BACKENDS[be].reasons(q, k, v, mask))}"
                    )
                    continue
            t0 = time.perf_counter()
            try:
                out = packed_attention(qq, kk, vv, mask, backend=be)
                grads = torch.autograd.grad(out, (qq, kk, vv), g) if with_grad else None
            except Exception as exc:  # report, keep going: the point is a full table
                print(f"{name:32s} {be:7s} {T:6d}  ERROR: {type(exc).__name__}: {exc}")
                failures += 1
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            err = (out.detach().double() - ref).abs()
            out_abs = float(err.max())
            out_rel = float((err / (ref.abs() + fwd_tol[0])).max())
            ok = bool(torch.isfinite(out).all()) and bool((err <= fwd_tol[0] + fwd_tol[1] * ref.abs()).all())
            cols = [f"{out_abs:9.2e}", f"{out_rel:9.2e}"]
            if grads is not None:
                g_abs, g_rel = [], 0.0
                for a, b in zip(grads, rgrads, strict=True):
                    e = (a.double() - b).abs()
                    g_abs.append(float(e.max()))
                    g_rel = max(g_rel, float((e / (b.abs() + bwd_tol[0])).max()))
                    ok &= bool((e <= bwd_tol[0] + bwd_tol[1] * b.abs()).all())
                cols += [f"{x:9.2e}" for x in g_abs] + [f"{g_rel:9.2e}"]
                note = ""
            else:
                cols += [f"{'-':>9s}"] * 4
                note = f" (forward only: {'; '.join(probe_reasons)})"
            failures += not ok
            print(f"{name:32s} {be:7s} {T:6d} {' '.join(cols)} {ms:8.1f}  {'ok' if ok else 'FAIL'}{note}")
    failures += _check_mot(device, dtype, fwd_tol, bwd_tol, rng)
    print(f"\n{'all within tolerance' if not failures else f'{failures} result(s) out of tolerance'}")
    return 1 if failures else 0


def _check_mot(device, dtype, fwd_tol, bwd_tol, rng) -> int:
    """The MoT routed ops (Triton backend) against their float64 torch references, forward and all
    gradients, on a grouped pack with an unaligned expert boundary. Returns the number of failures."""
    import torch

    from bagel_kernels import mot

    N, H, inter, hq, hkv, d = 203, 200, 344, 4, 2, 64
    n_und = rng.randint(1, N - 1)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    pos = torch.tensor(sorted(rng.randrange(4 * N) for _ in range(N)), device=device)
    cos, sin = mot.rope_cos_sin(pos, d, 10000.0, dtype)
    cases = {
        "mot_rms_norm": (
            lambda be, x, wu, wg: mot.mot_rms_norm(x, n_und, wu, wg, 1e-6, backend=be),
            (rand(N, H), rand(H), rand(H)),
        ),
        "mot_qk_norm_rope": (
            lambda be, q, k, a, b, c, e: torch.cat(
                [
                    t.flatten(1)
                    for t in mot.mot_qk_norm_rope(
                        q, k, n_und, a, b, c, e, cos.to(q.dtype), sin.to(q.dtype), 1e-6, backend=be
                    )
                ],
                1,
            ),
            (rand(N, hq, d), rand(N, hkv, d), rand(d), rand(d), rand(d), rand(d)),
        ),
        "swiglu": (lambda be, a, b: mot.swiglu(a, b, backend=be), (rand(N, inter), rand(N, inter))),
        "mot_linear": (
            lambda be, x, wu, bu, wg, bg: mot.mot_linear(x, n_und, wu, bu, wg, bg, backend=be),
            (rand(N, H), rand(inter, H) / 16, rand(inter), rand(inter, H) / 16, rand(inter)),
        ),
        "permute_rows": (lambda be, x: mot.permute_rows(x, perm, backend=be), (rand(N, H),)),
    }
    perm = torch.randperm(N, device=device)
    print(f"\nMoT ops, backend triton vs float64 torch reference ({N} rows, expert boundary at {n_und})")
    header = f"{'op':20s} {'out abs':>9s} {'grad abs':>9s}  status"
    print(header)
    print("-" * len(header))
    failures = 0
    for name, (fn, inputs) in cases.items():
        try:
            xs = [t.clone().requires_grad_() for t in inputs]
            out = fn("triton", *xs)
            g = torch.randn_like(out)
            grads = torch.autograd.grad(out, xs, g)
        except Exception as exc:
            print(f"{name:20s}  ERROR: {type(exc).__name__}: {exc}")
            failures += 1
            continue
        xd = [t.detach().double().requires_grad_() for t in inputs]
        ref = fn("torch", *xd)
        rgrads = torch.autograd.grad(ref, xd, g.double())
        e_out = (out.detach().double() - ref.detach()).abs()
        ok = bool((e_out <= fwd_tol[0] + fwd_tol[1] * ref.detach().abs()).all())
        g_abs = 0.0
        for a, b in zip(grads, rgrads, strict=True):
            e = (a.double() - b).abs()
            g_abs = max(g_abs, float(e.max()))
            ok &= bool((e <= bwd_tol[0] + bwd_tol[1] * b.abs()).all())
        failures += not ok
        print(f"{name:20s} {float(e_out.max()):9.2e} {g_abs:9.2e}  {'ok' if ok else 'FAIL'}")
    return failures


if __name__ == "__main__":
    sys.exit(main())

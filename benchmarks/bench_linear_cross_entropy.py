"""LM-head cross-entropy: chunked linear cross-entropy (ours) vs the full-logits path upstream BAGEL takes.

    python benchmarks/bench_linear_cross_entropy.py [--out DIR] [--quick] [--tiny]

BAGEL-7B's LM head (hidden 3584, vocabulary 152064) in bf16 on CUDA, over N CE tokens. Forward+backward
of the summed per-token loss (what the trainer does: ``ce.sum() * world_size / total_ce_tokens``), median
ms, and the peak memory the step adds on top of its inputs (hidden, weight and their gradients' final
buffers included):

    upstream      F.cross_entropy(lm_head(h), y, reduction="none").sum()  (bf16 logits, bf16 loss)
    mirror        F.cross_entropy(lm_head(h).float(), y, ...)             (what ours matches, full logits)
    ours-fused    linear_cross_entropy(reduction="none").sum(), Triton rows, gradients folded in the forward
    ours-recomp   the same with fuse_backward=False (the backward recomputes the logits chunk by chunk)
    ours-torch    the chunked algorithm with the row step in PyTorch (backend "torch")

The "max |dloss|" column is the largest per-token loss difference from the mirror (fp32 CE on the same
bf16 logits). Without CUDA the script prints "needs CUDA" and exits 0; ``--tiny`` runs the same code on
tiny shapes on the CPU (Triton under its interpreter) to check the script, and its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

if "--tiny" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from common import device_info, run_script, time_ms, write_results  # noqa: E402

from bagel_kernels.linear_cross_entropy import default_chunk_size, linear_cross_entropy  # noqa: E402

BAGEL_7B = dict(hidden=3584, vocab=152064)
TINY = dict(hidden=16, vocab=200)
FULL_TOKENS = [1024, 4096, 8192, 16384]
QUICK_TOKENS = [1024, 4096, 8192]
TINY_TOKENS = [24]


def _triton() -> str:
    """The backend of the Triton rows: "triton" on CUDA or under the interpreter, else "torch"."""
    return "triton" if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1" else "torch"


def _methods() -> dict:
    triton = _triton()

    def upstream(h, w, y):
        return F.cross_entropy(F.linear(h, w), y, reduction="none").sum()

    def mirror(h, w, y):
        return F.cross_entropy(F.linear(h, w).float(), y, reduction="none").sum()

    def ours(backend, fuse):
        return lambda h, w, y: linear_cross_entropy(
            h, w, y, reduction="none", fuse_backward=fuse, backend=backend
        ).sum()

    return {
        "upstream": upstream,
        "mirror": mirror,
        "ours-fused": ours(triton, None),
        "ours-recomp": ours(triton, False),
        "ours-torch": ours("torch", None),
    }


def _per_token(name: str, fn, h, w, y):
    """The per-token losses of one method, to compare with the mirror's."""
    if name == "upstream":
        return F.cross_entropy(F.linear(h, w), y, reduction="none").float()
    if name == "mirror":
        return F.cross_entropy(F.linear(h, w).float(), y, reduction="none")
    backend = "torch" if name == "ours-torch" else _triton()
    return linear_cross_entropy(h, w, y, reduction="none", backend=backend)


def run(args) -> str:
    tiny = args.tiny
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    dims = TINY if tiny else BAGEL_7B
    H, V = dims["hidden"], dims["vocab"]
    tokens = TINY_TOKENS if tiny else (QUICK_TOKENS if args.quick else FULL_TOKENS)
    reps, warmup = (1, 0) if tiny else ((5, 2) if args.quick else (10, 3))
    weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype).requires_grad_()
    lines = [
        f"# LM-head cross-entropy, H={H}, V={V}, {str(dtype).removeprefix('torch.')}",
        "",
        device_info(device),
        f"chunk: {default_chunk_size(V, dtype)} rows (256 MiB of logits)"
        + (" -- TINY: times mean nothing" if tiny else ""),
        "",
        "| tokens | method | fwd+bwd ms | peak extra MiB | max abs dloss vs mirror |",
        "|---|---|---|---|---|",
    ]
    for n in tokens:
        g = torch.Generator(device=device).manual_seed(n)
        hidden = torch.randn(n, H, device=device, generator=g, dtype=torch.float32).to(dtype).requires_grad_()
        labels = torch.randint(0, V, (n,), device=device, generator=g)
        labels[::17] = -100
        with torch.no_grad():
            ref = _per_token("mirror", None, hidden, weight, labels)
        for name, fn in _methods().items():

            def step(fn=fn, hidden=hidden, labels=labels):
                hidden.grad = None
                weight.grad = None
                fn(hidden, weight, labels).backward()

            try:
                with torch.no_grad():
                    diff = (_per_token(name, fn, hidden, weight, labels) - ref).abs().max().item()
                step()  # warm (compiles the kernel) before the memory baseline
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    hidden.grad = weight.grad = None
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    step()
                    torch.cuda.synchronize()
                    peak = f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f}"
                else:
                    peak = "n/a (CPU)"
                ms = time_ms(step, device, reps, warmup)
                lines.append(f"| {n} | {name} | {ms:.2f} | {peak} | {diff:.2e} |")
            except torch.OutOfMemoryError:
                lines.append(f"| {n} | {name} | OOM | OOM | |")
                hidden.grad = weight.grad = None
                torch.cuda.empty_cache()
            print(lines[-1], flush=True)
    md = "\n".join(lines) + "\n"
    write_results(args.out, "bench_linear_cross_entropy", md)
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out", help="folder for bench_linear_cross_entropy.md")
    ap.add_argument("--quick", action="store_true", help="3 token counts, fewer repetitions")
    ap.add_argument(
        "--tiny", action="store_true", help="tiny shapes on the CPU (checks the script; times mean nothing)"
    )
    return run_script(ap, run, "bench_linear_cross_entropy", "BAGEL-7B LM head in bf16", argv)


if __name__ == "__main__":
    sys.exit(main())

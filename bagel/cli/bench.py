"""``bagel-bench``: run the microbenchmarks that the current device supports and print their tables.

    bagel-bench [--device cpu|cuda] [--full] [--out DIR] [--only mask,attention,...]

On a CPU-only machine this runs the mask-construction benchmark (PackedMask against FlexAttention's
create_block_mask, compiled and not, and dense per-sample masks at 4k, 16k and 64k tokens). On a CUDA
machine it adds the attention, MoT, patch-embedding and model benchmarks. Each benchmark is a script in
``benchmarks/`` run in its own process; their markdown tables are gathered into one report.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

GPU_BENCHES = ("attention", "mot", "patch_embed", "model")
CPU_BENCHES = ("mask",)


def bench_dirs() -> list[str]:
    """Where the benchmark scripts may be, in order: the source checkout next to the package (an editable
    install), then the copy a wheel installs under ``<prefix>/share/bagel-kernels/benchmarks``."""
    here = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.join(os.path.dirname(os.path.dirname(here)), "benchmarks")
    installed = os.path.join(sys.prefix, "share", "bagel-kernels", "benchmarks")
    return [checkout, installed]


def find_bench_dir() -> str:
    for path in bench_dirs():
        if os.path.isfile(os.path.join(path, "common.py")):
            return path
    sys.stderr.write(
        "bagel-bench: error: the benchmark scripts were found neither in a source checkout nor in the "
        f"installed copy (looked in {', '.join(bench_dirs())}); reinstall bagel-kernels\n"
    )
    raise SystemExit(2)


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``prog: error: ...``, exit status 2), no usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def bench_main(argv=None) -> int:
    p = _OneLineParser(prog="bagel-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--full", action="store_true", help="long variants (default: --quick where a benchmark has it)"
    )
    p.add_argument(
        "--out", default=None, help="folder for the tables and plots (default: a temporary folder)"
    )
    p.add_argument(
        "--only", default=None, help="comma-separated subset of: " + ",".join(CPU_BENCHES + GPU_BENCHES)
    )
    args = p.parse_args(argv)
    # every value checked before any work: names, device, output folder (torch only for CUDA)
    only = None
    if args.only:
        only = [n.strip() for n in args.only.split(",")]
        unknown = [n for n in only if n not in CPU_BENCHES + GPU_BENCHES]
        if unknown:
            p.error(
                f"--only: unknown benchmark(s) {unknown}; choose from {', '.join(CPU_BENCHES + GPU_BENCHES)}"
            )
    if args.device not in (None, "cpu", "cuda"):
        p.error(f"--device {args.device!r} is not supported: use cpu or cuda")
    if args.out is not None:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            p.error(f"--out {args.out!r} exists and is not a folder")
        try:
            os.makedirs(args.out, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".bagel-bench-probe.", dir=args.out)
            os.close(fd)
            os.remove(probe)
        except OSError as exc:
            p.error(f"--out {args.out!r} is not a writable folder ({exc.strerror or exc})")
    bdir = find_bench_dir()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = only or (list(CPU_BENCHES) + (list(GPU_BENCHES) if device == "cuda" else []))
    out = args.out or tempfile.mkdtemp(prefix="bagel-bench-")
    report, failed = [], []
    for name in names:
        script = os.path.join(bdir, f"bench_{name}.py")
        if not os.path.exists(script):
            failed.append(f"{name} (script missing)")
            continue
        cmd = [sys.executable, script, "--out", out] + ([] if args.full else ["--quick"])
        if name == "mask":
            cmd += ["--device", device]
        print(f"[bagel-bench] {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        md = os.path.join(out, f"bench_{name}.md")
        if res.returncode != 0 or not os.path.exists(md):
            failed.append(f"{name} (exit {res.returncode})")
            sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
            continue
        with open(md) as f:
            report.append(f.read())
        print(f"[bagel-bench] {name}: {dt:.0f} s", flush=True)
    text = "\n".join(report)
    with open(os.path.join(out, "bagel-bench.md"), "w") as f:
        f.write(text)
    print()
    print(text)
    if device != "cuda" and not args.only:
        print("(GPU benchmarks skipped: no CUDA device; see benchmarks/RESULTS.md for recorded GPU runs)")
    print(f"tables and plots in {out}")
    if failed:
        print("failed: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(bench_main())

"""Mask construction: PackedMask.from_splits against FlexAttention's create_block_mask and dense masks.

    python benchmarks/bench_mask.py [--out DIR] [--quick] [--device cpu|cuda]

For realistic BAGEL packs of 4k, 16k and 64k tokens, times building the mask the way each backend
needs it, and the peak memory of the result:

- ``PackedMask.from_splits`` (interval vectors) plus the block tables the Triton kernels read;
- FlexAttention ``create_block_mask`` with a mask_mod over the interval vectors, eager and compiled
  (``_compile=True``), which is what upstream BAGEL pays per batch;
- upstream's per-sample dense float masks (``prepare_attention_mask_per_sample`` equivalent: one
  ``[L, L]`` float tensor per sample), and one dense ``[N, N]`` bool mask for the whole pack.

Runs on CPU (the default here) or CUDA. Median wall time of a few repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import threading
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from common import (  # noqa: E402
    CompileTimeout,
    Report,
    Table,
    device_info,
    first_call_s,
    save_plot,
    time_ms,
    use_checkout,
    write_results,
)

use_checkout()

from bagel_kernels import PackedMask  # noqa: E402
from bagel_kernels.attention import flex_block_mask  # noqa: E402
from bagel_kernels.testing import realistic_pack  # noqa: E402


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes(fn, device):
    """Peak extra memory while building: CUDA allocator stats on GPU; on CPU the process RSS sampled
    every 0.5 ms by a thread during the build (torch ops release the GIL), minus the RSS before."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        return peak, _tensor_bytes(out)
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = fn()
    peak[0] = max(peak[0], _rss())
    stop.set()
    th.join()
    return peak[0] - base, _tensor_bytes(out)


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o) for o in obj)
    if isinstance(obj, PackedMask):  # its two int32 interval vectors (block tables: returned beside it)
        return 2 * obj.total_len * 4
    if dataclasses.is_dataclass(obj):  # BlockTables
        return sum(_tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if hasattr(obj, "kv_num_blocks"):  # a flex BlockMask
        return sum(
            _tensor_bytes(getattr(obj, f))
            for f in (
                "kv_num_blocks",
                "kv_indices",
                "full_kv_num_blocks",
                "full_kv_indices",
                "q_num_blocks",
                "q_indices",
                "full_q_num_blocks",
                "full_q_indices",
            )
            if getattr(obj, f, None) is not None
        )
    return 0


def dense_per_sample(layout, device):
    """Upstream's nested masks: one float [L, L] per sample, 0 = attend, -inf = masked."""
    out = []
    split_iter = iter(zip(layout.split_lens, layout.attn_modes, strict=True))
    for L in layout.sample_lens:
        m = (
            torch.full((L, L), float("-inf"), device=device)
            .triu_(1)
            .masked_fill_(torch.ones(L, L, dtype=torch.bool, device=device).tril_(), 0.0)
        )
        start, used = 0, 0
        while used < L:
            n, mode = next(split_iter)
            if mode in ("full", "noise"):
                m[start : start + n, start : start + n] = 0.0
            if mode == "noise":
                m[start + n :, start : start + n] = float("-inf")
            start += n
            used += n
        out.append(m)
    return out


def _methods(layout, device, with_compile: bool) -> list[tuple[str, object]]:
    """``[(name, build)]``: each ``build()`` makes the mask of ``layout`` the way one backend needs it."""
    args3 = (layout.sample_lens, layout.split_lens, layout.attn_modes)
    n = layout.total_len

    def ours():  # the mask and the two tile tables the Triton kernels read
        m = PackedMask.from_splits(*args3, device=device)
        return m, m.block_tables(128, 64), m.block_tables(64, 128)

    def flex(compile: bool):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flex_block_mask(PackedMask.from_splits(*args3, device=device), compile=compile)

    methods = [
        ("PackedMask.from_splits + block tables", ours),
        ("flex create_block_mask (eager)", lambda: flex(False)),
    ]
    if with_compile:
        methods.append(("flex create_block_mask (compiled)", lambda: flex(True)))
    methods.append(("dense per-sample float masks", lambda: dense_per_sample(layout, device)))
    if n <= 16384 or device.type == "cuda":
        methods.append(
            ("dense [N, N] bool", lambda: PackedMask.from_splits(*args3, device=device).to_dense())
        )
    return methods


def run(args) -> Table:
    """The table (attached to its :class:`common.Report`, written row by row to ``args.out``)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else [4096, 16384, 65536]
    repeats = 3 if args.quick else 5
    share = getattr(args, "compile_share_s", None)
    report = Report(args.out, "bench_mask")
    table = report.table(
        "Mask construction (time per pack, peak memory of the build)",
        [
            "tokens",
            "method",
            "median ms",
            "vs PackedMask",
            "peak build MiB",
            "result MiB",
            "first call s (compile)",
        ],
    )
    plot = {}
    for n in sizes:
        layout = realistic_pack(n, seed=n)
        methods = _methods(layout, device, with_compile=not args.no_compile)
        base = None
        for name, fn in methods:
            first = float("nan")
            try:  # the first call (compiles, for the compiled variant) apart, within its share
                first = first_call_s(fn, device, share if "compiled" in name else None, f"{name} compile")
                ms = time_ms(fn, device, repeats, 0, wall=True)
                peak, kept = _peak_bytes(fn, device)
            except CompileTimeout as exc:
                table.add([n, name, f"not timed: {exc}", "", "", "", f"{share:.0f}"], ok=False)
                continue
            except Exception as exc:  # a baseline that cannot run is reported, not fatal
                msg = f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:80]}"
                table.add([n, name, msg, "", "", "", f"{first:.2f}"], ok=False)
                continue
            base = ms if base is None else base
            table.add(
                [
                    n,
                    name,
                    f"{ms:.2f}",
                    f"{ms / base:.1f}x",
                    f"{max(peak, 0) / 2**20:.1f}",
                    f"{kept / 2**20:.2f}",
                    f"{first:.2f}",
                ],
                raw=dict(tokens=n, method=name, ms=ms, first_s=first, peak_bytes=peak, result_bytes=kept),
            )
            plot.setdefault(name, []).append((n, ms))
    table.note(device_info(device))
    table.note(
        "peak build MiB: on CUDA the allocator's peak; on CPU the growth of the process RSS during one build "
        "after warm-up (memory the allocator kept from earlier builds is not counted: a lower bound). "
        "result MiB: what the built mask keeps. first call s: the first build (compiles included), apart "
        "from the median"
    )
    write_results(
        args.out,
        "bench_mask",
        None,  # written row by row
        lambda path: save_plot(
            path, plot, "tokens per pack", "build time (ms)", "Mask construction", logx=True, logy=True
        ),
    )
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--sizes", default=None, help="comma-separated pack sizes (default 4096,16384,65536)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled create_block_mask variant")
    p.add_argument(
        "--compile-share-s",
        type=float,
        default=120.0,
        help="seconds the compiled variant's first build may take before its row is reported as such",
    )
    args = p.parse_args(argv)
    table = run(args)
    print(table.render())
    return table.report.exit_code()


if __name__ == "__main__":
    sys.exit(main())

"""Shared helpers of the benchmark scripts: a markdown table, the timing helper, device info, a plot."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_checkout() -> None:
    """Put the repository root first on ``sys.path``, so that a script run from a checkout imports this
    checkout's ``bagel`` and ``bagel_kernels`` (not an installed copy)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


class Table:
    """A markdown table with a title and free-text notes."""

    def __init__(self, title: str, columns: list[str]):
        self.title = title
        self.columns = columns
        self.rows: list[list[str]] = []
        self.notes: list[str] = []

    def add(self, row) -> None:
        self.rows.append([str(c) for c in row])

    def note(self, text: str) -> None:
        self.notes.append(text)

    def render(self) -> str:
        lines = [
            f"### {self.title}",
            "",
            "| " + " | ".join(self.columns) + " |",
            "|" + "---|" * len(self.columns),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.render())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn, device: torch.device, wall: bool) -> float:
    """ms of one ``fn()``: CUDA events on a GPU, else (or with ``wall``) the wall clock with the device
    synchronised after the call. What ``fn`` returns is freed after the clock stops."""
    if device.type == "cuda" and not wall:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _out = fn()  # held until the clock has stopped
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    _out = fn()
    sync(device)
    ms = (time.perf_counter() - t0) * 1e3
    del _out
    return ms


def time_ms(
    fn,
    device: torch.device,
    reps: int,
    warmup: int,
    *,
    budget_ms: float = 0.0,
    max_reps: int | None = None,
    wall: bool = False,
) -> float:
    """Median ms of ``fn()`` over ``reps`` timed calls after ``warmup`` untimed ones; with ``budget_ms``,
    more calls while the timed ones total less than it (``max_reps`` at most). The one timing helper of
    every benchmark: CUDA events on a GPU (device time), the wall clock elsewhere; ``wall=True`` takes
    the wall clock with a sync after each call on the GPU too (host work included: mask building, a
    whole training step)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    limit = max(reps, max_reps or reps)
    times: list[float] = []
    while len(times) < limit and (len(times) < reps or sum(times) < budget_ms):
        times.append(_timed_call(fn, device, wall))
    return statistics.median(times)


def no_gpu(script: str, tiny: bool, what: str) -> bool:
    """True, after saying so, when a GPU benchmark has nothing to measure: no CUDA device and no ``--tiny``
    (which runs the same code on tiny shapes on the CPU to check the script)."""
    if tiny or torch.cuda.is_available():
        return False
    print(
        f"{script}: needs CUDA ({what}); no GPU here, nothing measured. Use --tiny to check the script on CPU."
    )
    return True


def run_script(parser, run, script: str, what: str, argv=None) -> int:
    """``main`` of a GPU benchmark: parse ``argv``; without a GPU and ``--tiny`` say so and measure
    nothing (:func:`no_gpu`), else print ``run(args)`` (its markdown). Exit status 0 either way."""
    args = parser.parse_args(argv)
    if not no_gpu(script, args.tiny, what):
        print(run(args))
    return 0


def write_results(out: str | None, name: str, markdown: str, plot=None) -> None:
    """``{name}.md`` (the markdown) and ``{name}.png`` (``plot(path)`` draws it) in the folder ``out``,
    created if needed; nothing when ``out`` is None."""
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(markdown)
    if plot is not None:
        plot(os.path.join(out, f"{name}.png"))


def git_commit() -> str:
    if os.environ.get("BAGEL_COMMIT"):  # set by gpu_check.sh callers whose copy of the tree has no .git
        return os.environ["BAGEL_COMMIT"][:12]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True, stderr=subprocess.DEVNULL
        ).strip()
    except Exception:
        return "unknown"


def device_info(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "absent"
    return f"device: {name}; torch {torch.__version__}; triton {tv}; commit {git_commit()}"


def save_plot(path: str, series: dict, xlabel: str, ylabel: str, title: str, logx=False, logy=False) -> None:
    """``series``: name -> [(x, y)]. Needs matplotlib (the ``bench`` extra); silently skipped without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in series.items():
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

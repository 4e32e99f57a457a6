"""Shared helpers of the benchmark scripts: a markdown table written row by row (with its raw numbers),
the timing helper, a bound on compile time, device info, a plot."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_checkout() -> None:
    """Put the repository root first on ``sys.path``, so that a script run from a checkout imports this
    checkout's ``bagel`` and ``bagel_kernels`` (not an installed copy)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


# where the names that the top-level ``bagel`` package does not export live: the package's modules move
# into sub-packages (bagel.model, bagel.data, ...); the first module that has the name wins
_BAGEL_MODULES = (
    "bagel.model.qwen2", "bagel.model.qwen2_reference", "bagel.model.backend", "bagel.data.packing",
    "bagel.qwen2", "bagel.qwen2_reference", "bagel.backend", "bagel.packing",
)  # fmt: skip


def bagel_name(name: str):
    """``name`` from the top-level ``bagel`` package, else from the first of its modules that defines it
    (so that a benchmark keeps working while modules move into sub-packages)."""
    import bagel

    try:
        return getattr(bagel, name)
    except AttributeError:
        pass
    for module in _BAGEL_MODULES:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, name):
            return getattr(mod, name)
    raise ImportError(f"bagel has no public name {name!r} (looked in bagel and {', '.join(_BAGEL_MODULES)})")


class Table:
    """A markdown table with a title and free-text notes. Attached to a :class:`Report`, every added row
    (and note) rewrites the report's markdown at once, so that a run cut off by a timeout keeps every row
    measured before the cut."""

    def __init__(self, title: str, columns: list[str], report: Report | None = None):
        self.title = title
        self.columns = columns
        self.rows: list[list[str]] = []
        self.notes: list[str] = []
        self.report = report

    def add(self, row, *, ok: bool = True, raw: dict | None = None) -> None:
        """Append ``row`` (one cell per column). ``ok``: the row holds a measurement (False: it records
        a failure). ``raw``: numbers to keep unrounded in the report's raw records."""
        cells = [str(c) for c in row]
        self.rows.append(cells)
        if self.report is not None:
            self.report.row(self, cells, ok=ok, raw=raw)

    def note(self, text: str) -> None:
        self.notes.append(text)
        if self.report is not None:
            self.report.flush()

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


class Report:
    """One benchmark's results, written as they are measured: ``DIR/{name}.md`` (markdown blocks and
    tables, rewritten whole after every row: the file is always complete up to the last row) and
    ``DIR/{name}.jsonl`` (one JSON record per row, appended: the raw numbers). Without ``out`` nothing is
    written (the report still counts rows).

    :meth:`exit_code` is the benchmark's exit status: 1 when rows were recorded and none of them holds a
    measurement (a benchmark whose every measurement failed is a failed benchmark), else 0."""

    def __init__(self, out: str | None, name: str):
        self.out, self.name = out, name
        self.blocks: list = []  # str (markdown) or Table
        self.n_ok = self.n_failed = 0
        if out:
            os.makedirs(out, exist_ok=True)
            for ext in ("md", "jsonl"):  # a fresh run: no rows of an earlier one
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out, f"{name}.{ext}"))

    def path(self, ext: str) -> str | None:
        return os.path.join(self.out, f"{self.name}.{ext}") if self.out else None

    def text(self, markdown: str) -> None:
        self.blocks.append(markdown)
        self.flush()

    def table(self, title: str, columns: list[str]) -> Table:
        table = Table(title, columns, report=self)
        self.blocks.append(table)
        self.flush()
        return table

    def row(self, table: Table, cells: list[str], *, ok: bool, raw: dict | None) -> None:
        if ok:
            self.n_ok += 1
        else:
            self.n_failed += 1
        record = {"bench": self.name, "table": table.title, "ok": ok}
        record.update(zip(table.columns, cells, strict=False))
        if raw:
            record["raw"] = raw
        self.record(record)
        self.flush()

    def record(self, record: dict) -> None:
        """Append one JSON line to ``{name}.jsonl`` (NaN and infinities written as null: strict JSON)."""
        path = self.path("jsonl")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(_finite(record), default=str, allow_nan=False) + "\n")

    def render(self) -> str:
        return "\n".join(b.render() if isinstance(b, Table) else b.rstrip("\n") + "\n" for b in self.blocks)

    def flush(self) -> None:
        path = self.path("md")
        if path:
            write_atomic(path, self.render())

    def exit_code(self) -> int:
        return 1 if self.n_failed and not self.n_ok else 0


def _finite(obj):
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name and a rename: readers never see half a file."""
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class CompileTimeout(TimeoutError):
    """A compile (or first call) ran past the seconds it was given."""


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str = "compile"):
    """Raise :class:`CompileTimeout` in the block after ``seconds`` of wall time (SIGALRM; main thread
    only, elsewhere or with ``seconds`` None/<= 0 no limit). Used around the first call of a compiled
    baseline, so that a compile that exceeds its share is reported as such instead of eating the run's
    budget."""
    if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise CompileTimeout(f"{what} took more than its share of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def first_call_s(fn, device, limit_s: float | None = None, what: str = "compile") -> float:
    """Seconds of wall time of the first ``fn()`` (compiles included, device synchronised), under
    :func:`time_limit`. The compile cost of a row, reported apart from its run time."""
    t0 = time.perf_counter()
    with time_limit(limit_s, what):
        fn()
        sync(torch.device(device))
    return time.perf_counter() - t0


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
    """``main`` of a GPU benchmark: parse ``argv``; without a GPU and ``--tiny`` say so, measure nothing
    and return 0 (:func:`no_gpu`); else print what ``run(args)`` returns (a :class:`Report` or markdown)
    and return the report's exit code (1 when every measurement failed), 0 for markdown."""
    args = parser.parse_args(argv)
    if no_gpu(script, args.tiny, what):
        return 0
    result = run(args)
    if isinstance(result, Report):
        print(result.render())
        return result.exit_code()
    print(result)
    return 0


def write_results(out: str | None, name: str, markdown: str | None, plot=None) -> None:
    """``{name}.md`` (the markdown; None: left as it is, e.g. written row by row by a :class:`Report`)
    and ``{name}.png`` (``plot(path)`` draws it) in the folder ``out``, created if needed; nothing when
    ``out`` is None. A plot that fails is reported on stderr, never fatal (the numbers matter more)."""
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    if markdown is not None:
        with open(os.path.join(out, f"{name}.md"), "w") as f:
            f.write(markdown)
    if plot is not None:
        try:
            plot(os.path.join(out, f"{name}.png"))
        except Exception as exc:  # noqa: BLE001
            print(f"{name}: plot not drawn ({type(exc).__name__}: {exc})", file=sys.stderr)


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

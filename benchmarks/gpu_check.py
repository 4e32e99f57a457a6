"""One GPU lend, two phases, each one command of about 5 minutes that is useful alone.

    bash benchmarks/gpu_check.sh --phase correct OUT     install, GPU tests, equivalence, quick attention rows
    bash benchmarks/gpu_check.sh --phase fast OUT        tuning, attention, model MFU, MoT, patch embed, mask
    bash benchmarks/gpu_check.sh --phase P OUT --dry-run the same sequence with CPU stand-ins (no GPU needed)
    bash benchmarks/gpu_check.sh --phase P --plan        the time plan and the file rule, nothing run

(``gpu_check.sh`` runs this file.) Facts of a lend this is built for: about 15 minutes of device time,
machine start included; one command at most 10 minutes; at most 8 files come back from ``$OUT``, each at
most 16 MiB, at most two folders down, names of letters, digits, ``.``, ``_``, ``-``.

Inside a phase, steps run in a fixed order, what we know least first. Each step has a cap: the time it is
guaranteed. A step may also use what earlier steps left unused, but never time that a later step's cap
needs, so ``sum(caps) + RESERVE_S <= budget`` (checked by ``--plan`` and by ``tests/test_gpu_check.py``)
means every step gets at least its cap and the phase ends inside its budget. A step past its limit is
killed (its whole process group) and recorded as TIMEOUT; a step that exits non-zero is FAILED; a step
whose every measurement failed exits non-zero (the benchmarks and the tuner say so themselves).

Results survive a timeout: every benchmark writes each row to its table as it is measured, and the
folder ``OUT`` is refreshed every few seconds and after every step. ``OUT`` receives at most 6 files:

    {phase}_results.md      every table, the step table, versions, card, commit, test failure summary
    {phase}_steps.tsv       status, seconds, cap and limit of every step
    {phase}_log.txt         everything printed (the last 4 MiB when longer)
    {phase}_raw.json        raw numbers: every benchmark row, every GPU test outcome, the steps, the plan
    {phase}_plots.png       all the benchmarks' plots in one image
    attention_tuned.json    (fast) the tuned tile table: commit it as bagel_kernels/attention_tuned.json

The install (``pip install -e .`` offline, the CUDA kernel of the patch-embedding extension required) is
skipped when the CUDA extension of the same sources is already built: the fast phase on a machine still
warm from the correct phase reuses it. No compile check by default (CI compiles every kernel for sm_90
already); ``--compile-check`` adds it to the correct phase.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

BUDGET_S = 300  # one phase: one device command of about 5 minutes
RESERVE_S = 15  # machine facts before the first step, the final collect
MIN_STEP_S = 8  # a step that would get less is skipped and recorded so
REFRESH_S = 10  # OUT is refreshed this often while a step runs
MAX_FILES = 6  # of the 8 a lend returns: room to spare
MAX_FILE_BYTES = 16 * 2**20
MAX_DEPTH = 2  # folders below OUT
LOG_TAIL_BYTES = 4 * 2**20
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
PHASES = ("correct", "fast")


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a phase: ``name`` (also its label in the tables), ``cap_s`` (seconds guaranteed), what it
    runs (``kind``: install, gpu_tests, equivalence, tune, compile_check, bench with ``bench`` naming the
    script and ``args`` its options, or command: ``args`` run as given, ``{py}`` and ``{bench_dir}``
    filled in), and ``show_output``: its last printed lines go into the results. A benchmark finishes
    when it is done; the tuner's sweep is bounded by its cap, plus at most ``stretch_s`` of the time
    earlier steps left unused (a reused install)."""

    name: str
    cap_s: int
    kind: str
    bench: str = ""
    args: tuple[str, ...] = ()
    show_output: bool = False
    stretch_s: int = 0  # seconds of what earlier steps left unused that the tuner may spend on its sweep


QUICK_ATTENTION_BACKENDS = "triton,triton-1pass,triton-2pass,triton-padD,sdpa-loop,dense-causal"
DRY_ATTENTION_BACKENDS = (
    "triton,triton-2pass,triton-padD,dense-causal"  # CPU stand-in: fewer interpreter rows
)


def plan(phase: str, compile_check: bool = False) -> list[Step]:
    """The steps of ``phase`` in order, with their caps (seconds)."""
    if phase == "correct":
        steps = [
            Step("install", 120, "install", show_output=True),
            Step("gpu_tests", 100, "gpu_tests"),
            Step("equivalence", 25, "equivalence", show_output=True),
            Step(
                "attention_quick",
                40,
                "bench",
                "attention",
                ("--quick", "--backends", QUICK_ATTENTION_BACKENDS),
            ),
        ]
        if compile_check:
            steps.append(Step("compile_check", 70, "compile_check", show_output=True))
        return steps
    if phase == "fast":
        return [
            Step("install", 100, "install", show_output=True),  # reused when the machine is still warm
            Step("tune", 40, "tune", stretch_s=60),
            Step("bench_model", 55, "bench", "model", ("--quick",)),
            Step("bench_mot", 20, "bench", "mot", ("--quick",)),
            Step("bench_attention", 45, "bench", "attention", ("--quick", "--compile-share-s", "45")),
            Step("bench_patch_embed", 10, "bench", "patch_embed", ("--quick",)),
            Step(
                "bench_mask",
                15,
                "bench",
                "mask",
                ("--quick", "--sizes", "4096,16384", "--compile-share-s", "10"),
            ),
        ]
    raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")


def out_files(phase: str) -> list[str]:
    """Every file a phase can write to OUT (the file rule: at most MAX_FILES, names of NAME_RE)."""
    files = [f"{phase}_{n}" for n in ("results.md", "steps.tsv", "log.txt", "raw.json", "plots.png")]
    if any(s.kind == "tune" for s in plan(phase, compile_check=True)):
        files.append("attention_tuned.json")
    return files


def plan_problems(phase: str, budget_s: int = BUDGET_S, compile_check: bool = False) -> list[str]:
    """Why the plan of ``phase`` breaks the time budget or the file rule ([] when it keeps both)."""
    steps = plan(phase, compile_check)
    problems = []
    total = sum(s.cap_s for s in steps) + RESERVE_S
    if total > budget_s:
        problems.append(f"caps + reserve = {total} s > budget {budget_s} s")
    if any(s.cap_s < MIN_STEP_S for s in steps):
        problems.append(f"a cap below the {MIN_STEP_S} s minimum")
    if len({s.name for s in steps}) != len(steps):
        problems.append("two steps share a name")
    files = out_files(phase)
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files > {MAX_FILES}")
    bad = [f for f in files if not NAME_RE.match(f)]
    if bad:
        problems.append(f"file names outside [A-Za-z0-9._-]: {bad}")
    return problems


def format_plan(phase: str, budget_s: int = BUDGET_S, compile_check: bool = False) -> str:
    steps = plan(phase, compile_check)
    lines = [
        f"time plan, phase {phase} (budget {budget_s} s)",
        f"  {'step':22s} {'cap s':>6s} {'ends by s':>10s}",
    ]
    t = RESERVE_S
    lines.append(f"  {'(machine facts, collect)':22s} {RESERVE_S:6d} {'':>10s}")
    for s in steps:
        t += s.cap_s
        lines.append(f"  {s.name:22s} {s.cap_s:6d} {t:10d}")
    problems = plan_problems(phase, budget_s, compile_check)
    lines.append(f"  {'sum':22s} {t:6d} / {budget_s} s: {'ok' if t <= budget_s else 'OVER BUDGET'}")
    files = out_files(phase)
    lines.append(f"  files to OUT ({len(files)} of at most {MAX_FILES}): {', '.join(files)}")
    lines.append(f"  plan {'ok' if not problems else 'BROKEN: ' + '; '.join(problems)}")
    return "\n".join(lines)


def check_out_dir(out: str, allowed: list[str] | None = None) -> list[str]:
    """Why the folder ``out`` would not come back whole from a lend ([] when it would): more than
    MAX_FILES files, a name outside NAME_RE, a file over 16 MiB, deeper than two folders, a link or a
    special file; with ``allowed``, a file that is not one of those names."""
    problems, files = [], []
    for dirpath, dirnames, filenames in os.walk(out):
        rel = os.path.relpath(dirpath, out)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        for d in dirnames:
            if depth + 1 > MAX_DEPTH:
                problems.append(f"{os.path.join(rel, d)}: more than {MAX_DEPTH} folders down")
        for name in filenames:
            path = os.path.join(dirpath, name)
            files.append(os.path.normpath(os.path.join(rel, name)))
            if not NAME_RE.match(name):
                problems.append(f"{name}: a name outside [A-Za-z0-9._-]")
            if os.path.islink(path) or not os.path.isfile(path):
                problems.append(f"{name}: not a plain file")
            elif os.path.getsize(path) > MAX_FILE_BYTES:
                problems.append(f"{name}: {os.path.getsize(path)} bytes > 16 MiB")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files > {MAX_FILES}: {sorted(files)}")
    if allowed is not None:
        extra = sorted(set(files) - set(allowed))
        if extra:
            problems.append(f"files outside the phase's list: {extra}")
    return problems


# ---------------------------------------------------------------------------------------------- commands
def install_script(py: str, work: str) -> str:
    """The install step (bash): reuse a CUDA extension built from the same sources, else pip install -e
    offline with the CUDA kernel required; on failure, the CPU kernel in place so that later steps run."""
    log = shlex.quote(os.path.join(work, "pip_install.log"))
    py = shlex.quote(py)
    return f"""
set -u
src_hash=$(find csrc setup.py -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)
stamp=build/gpu_check_install.stamp
if [ "$(cat "$stamp" 2>/dev/null)" = "$src_hash" ] && {py} -c "
from bagel_kernels import patch_embed
raise SystemExit(0 if patch_embed.extension_status().cuda else 1)" 2>/dev/null; then
  echo "install: reused (CUDA extension of sources $src_hash already built: a warm machine)"
  {py} -c "from bagel_kernels import patch_embed as pe; print('extension:', pe.extension_status())"
  exit 0
fi
echo "install: pip install -e . (offline, CUDA kernel required), sources $src_hash"
if BAGEL_KERNELS_REQUIRE_EXT=1 BAGEL_KERNELS_REQUIRE_CUDA=1 MAX_JOBS=${{MAX_JOBS:-16}} \\
    {py} -m pip install -v --no-deps --no-build-isolation --no-index -e . >{log} 2>&1; then
  grep -E "\\[bagel-kernels setup\\]" {log} | tail -n 12
  {py} -c "
from bagel_kernels import patch_embed
st = patch_embed.extension_status()
print('patch_embed extension:', st)
raise SystemExit(0 if st.cuda else 1)" || exit 1
  mkdir -p build && echo "$src_hash" > "$stamp"
else
  echo "INSTALL FAILED (the CUDA kernel is required); the build's messages:"
  grep -E "\\[bagel-kernels setup\\]|error|Error" {log} | tail -n 40
  echo "building the CPU kernel in place so that the remaining steps run from the source tree"
  MAX_JOBS=${{MAX_JOBS:-16}} {py} setup.py build_ext --inplace >>{log} 2>&1 | tail -n 3
  exit 1
fi
"""


def _has_module(py: str, name: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({name!r}) else 1)"
    return subprocess.run([py, "-c", probe], capture_output=True, timeout=60).returncode == 0


def tune_budget_s(step: Step, limit_s: int) -> int:
    """Seconds of the tuner's sweep: its cap, plus what it may take of the time earlier steps left
    unused (``stretch_s`` at most), less 15 s for its start and the table it writes."""
    return max(10, min(limit_s, step.cap_s + step.stretch_s) - 15)


def step_command(step: Step, ctx: dict) -> list[str] | None:
    """The command of ``step`` (None: nothing to run, e.g. the install in a dry run)."""
    py, dry, work = ctx["py"], ctx["dry"], ctx["work"]
    bench_dir = os.path.join(work, "bench")
    if step.kind == "install":
        return None if dry else ["bash", "-c", install_script(py, work)]
    if step.kind == "gpu_tests":
        cmd = [
            py,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-rfE",
            "--continue-on-collection-errors",  # a module needing a missing extra must not stop the others
            "-p",
            "no:cacheprovider",
            "-p",
            "pytest_outcomes",
            "--outcomes-jsonl",
            os.path.join(work, "gpu_tests.jsonl"),
            "tests",
        ]
        workers = int(os.environ.get("GPU_TEST_WORKERS", "4"))
        if not dry and workers > 1 and _has_module(py, "xdist"):  # Triton compiles are CPU-bound: in parallel
            cmd[3:3] = ["-n", str(workers)]
        return cmd
    if step.kind == "equivalence":  # flex is left to the GPU tests: its inductor compiles would eat the cap
        return [py, "-m", "bagel_kernels.check"] + (
            ["--device", "cpu", "--tokens", "128"]
            if dry
            else ["--device", "cuda", "--dtype", "bf16", "--backends", "triton,sdpa"]
        )
    if step.kind == "compile_check":
        base = ["env", "-u", "TRITON_INTERPRET", py, "-m", "bagel_kernels.compile_check", "--report"]
        if dry:
            return base + [
                "--arch",
                "90",
                "--module",
                "bagel_kernels.attention_triton",
                "--only",
                "attn_fwd_bf16_d72",
            ]
        return base + ["--arch", str(ctx["arch"])]
    if step.kind == "tune":
        return [
            py,
            os.path.join(HERE, "tune_attention.py"),
            "--out",
            os.path.join(work, "attention_tuned.json"),
            "--md",
            os.path.join(bench_dir, "tune_attention.md"),
            "--jsonl",
            os.path.join(bench_dir, "tune_attention.jsonl"),
            "--budget-s",
            str(tune_budget_s(step, step.cap_s if dry else ctx.get("limit", step.cap_s))),
        ] + (["--dry-run"] if dry else [])
    if step.kind == "bench":
        args = list(step.args)
        if ctx["full"]:
            args = [a for a in args if a != "--quick"]
        if dry:  # CPU stand-ins: tiny shapes under the Triton interpreter
            if step.bench in ("model", "mot", "patch_embed"):
                args.append("--tiny")
            if step.bench == "attention":  # the interpreter is slow: the rows of the correct phase only
                args = [a for a in args if a != "--backends" and a != QUICK_ATTENTION_BACKENDS]
                args += ["--backends", DRY_ATTENTION_BACKENDS]
            if step.bench == "mask":
                args = ["--quick", "--sizes", "1024", "--no-compile"]
        return [py, os.path.join(HERE, f"bench_{step.bench}.py"), "--out", bench_dir] + args
    if step.kind == "command":
        return [a.replace("{py}", py).replace("{bench_dir}", bench_dir) for a in step.args]
    raise ValueError(f"unknown step kind {step.kind!r}")


# ---------------------------------------------------------------------------------------------- the run
@dataclasses.dataclass
class StepResult:
    name: str
    status: str
    seconds: float
    cap_s: int
    limit_s: int


class Phase:
    """Runs one phase: the steps, the log, and the collection of OUT (see the module docstring)."""

    def __init__(
        self,
        phase: str,
        out: str,
        *,
        dry: bool,
        full: bool,
        compile_check: bool,
        budget_s: int,
        py: str,
        steps: list[Step] | None = None,
        argv: list[str] | None = None,
        facts: bool = True,
    ):
        self.phase, self.out, self.dry, self.full, self.budget_s, self.py = (
            phase,
            out,
            dry,
            full,
            budget_s,
            py,
        )
        self.custom = steps is not None
        self.compile_check = compile_check
        self.steps = steps if steps is not None else plan(phase, compile_check)
        self.argv = argv or []
        self.facts = facts  # False: no probe of the machine (tests of the driver itself)
        self.work = tempfile.mkdtemp(prefix=f"gpu_check_{phase}_")
        os.makedirs(os.path.join(self.work, "bench"), exist_ok=True)
        os.makedirs(out, exist_ok=True)
        self.log_path = os.path.join(self.work, "log.txt")
        self.log = open(self.log_path, "a", buffering=1)
        self.results: list[StepResult] = []
        self.outputs: dict[str, list[str]] = {}  # step name -> its printed lines
        self.meta: dict = {}
        self.lock = threading.Lock()  # the log and the step outputs
        self.collect_lock = threading.Lock()  # one refresh of OUT at a time (the refresher and the steps)
        self.t0 = time.monotonic()
        self.child: subprocess.Popen | None = None
        self.env = dict(os.environ)
        self.env.update(
            PYTHONUNBUFFERED="1", TRITON_DEFAULT_FP_FUSION=self.env.get("TRITON_DEFAULT_FP_FUSION", "1")
        )
        self.env["PYTHONPATH"] = os.pathsep.join(
            [ROOT, HERE] + [p for p in [self.env.get("PYTHONPATH")] if p]
        )

    # -- output
    def say(self, text: str, step: str | None = None) -> None:
        with self.lock:
            for line in text.splitlines() or [""]:
                self.log.write(line + "\n")
                if step is not None:
                    self.outputs.setdefault(step, []).append(line)
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
            sys.stdout.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # -- facts
    def machine(self) -> None:
        probe = (
            "import json, platform, torch, numpy\n"
            "try:\n import triton; tv = triton.__version__\nexcept ImportError: tv = 'absent'\n"
            "d = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,"
            " triton=tv, numpy=numpy.__version__)\n"
            "if torch.cuda.is_available():\n"
            " p = torch.cuda.get_device_properties(0)\n"
            " d.update(card=p.name, arch=p.major * 10 + p.minor, sms=p.multi_processor_count,"
            " memory_gib=round(p.total_memory / 2**30, 1))\n"
            "else:\n d.update(card='no GPU (CPU: ' + platform.machine() + ')', arch=90)\n"
            "print(json.dumps(d))\n"
        )
        try:
            if not self.facts:
                raise RuntimeError("machine facts not probed")
            res = subprocess.run(
                [self.py, "-c", probe], capture_output=True, text=True, timeout=60, env=self.env
            )
            self.meta.update(json.loads(res.stdout.strip().splitlines()[-1]))
        except Exception as exc:  # noqa: BLE001  (the steps still run; the facts say why they are missing)
            self.meta["facts_error"] = f"{type(exc).__name__}: {exc}"
            self.meta.setdefault("arch", 90)
        commit = os.environ.get("BAGEL_COMMIT")
        if not commit:
            try:
                commit = subprocess.run(
                    ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
                ).stdout.strip()
            except Exception:  # noqa: BLE001
                commit = ""
        self.meta.update(
            commit=commit or "unknown (no .git here: pass BAGEL_COMMIT=<sha>)",
            phase=self.phase,
            dry_run=self.dry,
            budget_s=self.budget_s,
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            command="bash benchmarks/gpu_check.sh " + " ".join(self.argv),
        )
        if commit:
            self.env["BAGEL_COMMIT"] = commit
        self.say(f"machine: {json.dumps(self.meta)}")

    # -- one step
    def limit_for(self, index: int) -> int:
        later = sum(s.cap_s for s in self.steps[index + 1 :])
        return int(self.budget_s - RESERVE_S / 2 - self.elapsed() - later)

    def run_step(self, index: int) -> None:
        step = self.steps[index]
        limit = self.limit_for(index)
        ctx = dict(
            py=self.py,
            dry=self.dry,
            work=self.work,
            full=self.full,
            arch=self.meta.get("arch", 90),
            limit=limit,
        )
        self.say(f"\n=== [{self.elapsed():.0f} s] {step.name} (cap {step.cap_s} s, limit {limit} s)")
        try:
            cmd = step_command(step, ctx)
        except Exception as exc:  # noqa: BLE001  (a broken step is a failed step, not a failed phase)
            self.say(f"{step.name}: FAILED (no command: {type(exc).__name__}: {exc})")
            self.results.append(StepResult(step.name, "FAILED (no command)", 0.0, step.cap_s, limit))
            return
        if cmd is None:
            self.say(f"{step.name}: skipped (dry run)")
            self.results.append(StepResult(step.name, "skipped (dry run)", 0.0, step.cap_s, 0))
            return
        if limit < MIN_STEP_S:
            self.say(f"{step.name}: SKIPPED (the {self.budget_s} s budget is spent)")
            self.results.append(StepResult(step.name, "skipped (budget)", 0.0, step.cap_s, limit))
            return
        self.say("$ " + " ".join(shlex.quote(c) for c in cmd if "\n" not in c), step=None)
        t = time.monotonic()
        status = "ok"
        try:
            self.child = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                bufsize=1,
                start_new_session=True,
            )
            reader = threading.Thread(target=self._pump, args=(self.child, step.name), daemon=True)
            reader.start()
            try:
                rc = self.child.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                self._kill(self.child)
                rc, status = None, f"TIMEOUT ({limit} s)"
            except BaseException:  # the phase itself is stopped (SIGTERM, Ctrl-C): stop the step too
                self._kill(self.child)
                self.results.append(
                    StepResult(step.name, "INTERRUPTED", round(time.monotonic() - t, 1), step.cap_s, limit)
                )
                raise
            reader.join(timeout=10)
            if rc:
                status = f"FAILED (exit {rc})"
        except OSError as exc:
            status = f"FAILED ({exc})"
        finally:
            self.child = None
        secs = time.monotonic() - t
        self.say(f"{step.name}: {status} in {secs:.0f} s")
        self.results.append(StepResult(step.name, status, round(secs, 1), step.cap_s, limit))
        if step.kind == "tune":
            table = os.path.join(self.work, "attention_tuned.json")
            if os.path.exists(table):
                self.env["BAGEL_KERNELS_ATTN_TABLE"] = table
                self.say(f"later steps read the tile table {table}")

    def _pump(self, proc: subprocess.Popen, name: str) -> None:
        for line in proc.stdout:
            self.say(line.rstrip("\n"), step=name)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    # -- collection
    def bench_names(self) -> list[str]:
        names = []
        for s in self.steps:
            if s.kind == "tune":
                names.append("tune_attention")
            elif s.bench:
                names.append(f"bench_{s.bench}")
        return list(dict.fromkeys(names))

    def gpu_tests(self) -> list[dict]:
        path = os.path.join(self.work, "gpu_tests.jsonl")
        return _read_jsonl(path)

    def results_markdown(self) -> str:
        m = self.meta
        lines = [
            f"# GPU check, phase {self.phase}"
            + (" (DRY RUN on the CPU: no number here is a GPU measurement)" if self.dry else ""),
            "",
        ]
        lines += [
            f"- card: {m.get('card', '?')}"
            + (f" (sm_{m['arch']}, {m['sms']} SMs, {m['memory_gib']} GiB)" if "sms" in m else ""),
            f"- commit: {m.get('commit', '?')}",
            f"- versions: python {m.get('python', '?')}, torch {m.get('torch', '?')} (CUDA {m.get('cuda')}), "
            f"triton {m.get('triton', '?')}, numpy {m.get('numpy', '?')}",
            f"- command: `{m.get('command', '')}`; date {m.get('date', '?')}",
            f"- budget {self.budget_s} s; elapsed {self.elapsed():.0f} s"
            + (
                f"; attention tiles from this run's tuning "
                f"({os.path.basename(self.env['BAGEL_KERNELS_ATTN_TABLE'])})"
                if "BAGEL_KERNELS_ATTN_TABLE" in self.env
                else ""
            ),
            "",
            "| step | status | seconds | cap s | limit s |",
            "|---|---|---:|---:|---:|",
        ]
        done = {r.name for r in self.results}
        lines += [
            f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.cap_s} | {r.limit_s} |" for r in self.results
        ]
        lines += [f"| {s.name} | not reached | - | {s.cap_s} | - |" for s in self.steps if s.name not in done]
        lines.append("")
        if any(s.kind == "gpu_tests" for s in self.steps):
            lines += gpu_test_summary(self.gpu_tests()) + [""]
        for s in self.steps:
            out = self.outputs.get(s.name)
            if s.show_output and out:
                lines += [f"### {s.name}: output (last lines)", "", "```", *out[-40:], "```", ""]
        for name in self.bench_names():
            path = os.path.join(self.work, "bench", f"{name}.md")
            if os.path.exists(path):
                with open(path) as f:
                    lines += [f.read().rstrip("\n"), ""]
        return "\n".join(lines) + "\n"

    def collect(self, plots: bool) -> None:
        """Refresh OUT: results, steps, raw numbers, log tail (and the plot image when ``plots``)."""
        with self.collect_lock:
            self._collect(plots)

    def _collect(self, plots: bool) -> None:
        from common import write_atomic

        p = self.phase
        with self.lock:
            results = list(self.results)
        tsv = "step\tstatus\tseconds\tcap_s\tlimit_s\n" + "".join(
            f"{r.name}\t{r.status}\t{r.seconds:.0f}\t{r.cap_s}\t{r.limit_s}\n" for r in results
        )
        write_atomic(os.path.join(self.out, f"{p}_steps.tsv"), tsv)
        write_atomic(os.path.join(self.out, f"{p}_results.md"), self.results_markdown())
        rows = []
        for name in self.bench_names():
            rows += _read_jsonl(os.path.join(self.work, "bench", f"{name}.jsonl"))
        raw = dict(
            meta=self.meta,
            plan=[dataclasses.asdict(s) for s in self.steps],
            steps=[dataclasses.asdict(r) for r in results],
            gpu_tests=self.gpu_tests(),
            rows=rows,
        )
        write_atomic(os.path.join(self.out, f"{p}_raw.json"), json.dumps(raw, indent=1, default=str) + "\n")
        write_atomic(os.path.join(self.out, f"{p}_log.txt"), _log_tail(self.log_path))
        table = os.path.join(self.work, "attention_tuned.json")
        if os.path.exists(table):
            with open(table) as f:
                write_atomic(os.path.join(self.out, "attention_tuned.json"), f.read())
        if plots:
            pngs = [os.path.join(self.work, "bench", f"{n}.png") for n in self.bench_names()]
            pngs = [q for q in pngs if os.path.exists(q)]
            if pngs:
                try:
                    _tile_pngs(pngs, os.path.join(self.out, f"{p}_plots.png"))
                except Exception as exc:  # noqa: BLE001  (the numbers matter more than the picture)
                    self.say(f"plots not combined: {type(exc).__name__}: {exc}")

    def _refresher(self, stop: threading.Event) -> None:
        while not stop.wait(REFRESH_S):
            try:
                self.collect(plots=False)
            except Exception as exc:  # noqa: BLE001
                self.say(f"refresh of {self.out} failed: {type(exc).__name__}: {exc}")

    def run(self) -> int:
        def on_term(signum, frame):  # the outer command's timeout: stop the step, keep what is done
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, on_term)
        stop = threading.Event()
        interrupted = ""
        try:
            if self.dry:
                self.say("gpu_check: DRY RUN (CPU stand-ins; no number from this run is a GPU measurement)")
            self.say(
                "custom steps: " + ", ".join(f"{s.name} ({s.cap_s} s)" for s in self.steps)
                if self.custom
                else format_plan(self.phase, self.budget_s, self.compile_check)
            )
            self.machine()
            threading.Thread(target=self._refresher, args=(stop,), daemon=True).start()
            for i in range(len(self.steps)):
                self.run_step(i)
                self.collect(plots=True)
        except KeyboardInterrupt as exc:
            interrupted = str(exc) or "interrupted"
            if self.child is not None:
                self._kill(self.child)
            self.say(f"gpu_check: {interrupted}: stopping; what is measured so far is kept")
        finally:
            stop.set()
            failed = [r for r in self.results if r.status != "ok" and not r.status.startswith("skipped (dry")]
            self.say(
                f"\ndone in {self.elapsed():.0f} s (budget {self.budget_s} s): "
                + (
                    "every step ok"
                    if not failed and not interrupted
                    else f"NOT ALL OK: {', '.join(f'{r.name} {r.status}' for r in failed) or interrupted}"
                )
            )
            self.collect(plots=True)
            problems = check_out_dir(self.out, out_files(self.phase))
            self.say(
                f"file rule ({self.out}): "
                + (
                    "ok: " + ", ".join(sorted(os.listdir(self.out)))
                    if not problems
                    else "BROKEN: " + "; ".join(problems)
                )
            )
            self.collect(plots=False)  # the log with the last lines
            self.log.close()
            if not os.environ.get("GPU_CHECK_KEEP_WORK"):
                shutil.rmtree(self.work, ignore_errors=True)
        return 1 if failed or problems or interrupted else 0


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill
                    pass
    return rows


def gpu_test_summary(outcomes: list[dict]) -> list[str]:
    lines = ["### GPU tests (pytest -m gpu)", ""]
    if not outcomes:
        return lines + ["no test outcome recorded (the step did not run, or no test finished)"]
    calls = [o for o in outcomes if o["when"] == "call" or o["outcome"] != "passed"]
    count: dict[str, int] = {}
    for o in calls:
        key = "error" if o["outcome"] == "failed" and o["when"] != "call" else o["outcome"]
        count[key] = count.get(key, 0) + 1
    lines.append("outcomes: " + ", ".join(f"{n} {k}" for k, n in sorted(count.items())))
    bad = [o for o in outcomes if o["outcome"] == "failed"]
    if bad:
        lines += ["", "| test | phase | message |", "|---|---|---|"]
        for o in bad[:40]:
            msg = o["message"].replace("|", "\\|")
            lines.append(f"| `{o['nodeid']}` | {o['when']} | {msg} |")
        if len(bad) > 40:
            lines.append(f"| ... {len(bad) - 40} more in the raw JSON | | |")
    slow = sorted((o for o in outcomes if o["when"] == "call"), key=lambda o: -o["seconds"])[:5]
    if slow:
        lines += [
            "",
            "slowest: " + ", ".join(f"`{o['nodeid'].split('::')[-1]}` {o['seconds']:.1f} s" for o in slow),
        ]
    return lines


def _log_tail(path: str) -> str:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size > LOG_TAIL_BYTES:
            f.seek(size - LOG_TAIL_BYTES)
            f.readline()  # from a line start
            head = f"(the last {LOG_TAIL_BYTES // 2**20} MiB of a {size / 2**20:.1f} MiB log)\n"
        else:
            head = ""
        return head + f.read().decode("utf-8", "replace")


def _tile_pngs(pngs: list[str], path: str) -> None:
    """All the benchmarks' PNGs as the panels of one image (matplotlib; written through a rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = [plt.imread(p) for p in pngs]
    cols = 1 if len(images) == 1 else 2
    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(8 * cols, 5.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, p in zip(axes.flat, images, pngs, strict=False):
        ax.imshow(img)
        ax.set_title(os.path.splitext(os.path.basename(p))[0], fontsize=10)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=None, help="the output folder ($OUT); not needed with --plan")
    ap.add_argument("--phase", required=True, choices=PHASES)
    ap.add_argument("--dry-run", action="store_true", help="CPU stand-ins (no install; --tiny benchmarks)")
    ap.add_argument(
        "--plan", action="store_true", help="print the time plan and check the file rule; run nothing"
    )
    ap.add_argument(
        "--compile-check", action="store_true", help="add the Triton compile check (correct phase)"
    )
    ap.add_argument("--full", action="store_true", help="the long benchmark variants (over the budget)")
    ap.add_argument(
        "--budget-s",
        type=int,
        default=None,
        help=f"seconds for the phase (default {BUDGET_S}, plus the compile check's cap with --compile-check)",
    )
    args = ap.parse_args(argv)
    if args.dry_run or os.environ.get("DRY_RUN"):
        args.dry_run = True
    if args.compile_check and args.phase != "correct":
        ap.error("--compile-check belongs to the correct phase")
    if args.budget_s is None:
        extra = sum(s.cap_s for s in plan(args.phase, args.compile_check)) - sum(
            s.cap_s for s in plan(args.phase)
        )
        args.budget_s = BUDGET_S + extra
    if args.budget_s < RESERVE_S + MIN_STEP_S:
        ap.error(f"--budget-s {args.budget_s} is too small (at least {RESERVE_S + MIN_STEP_S})")
    if args.plan:
        print(format_plan(args.phase, args.budget_s, args.compile_check))
        return 1 if plan_problems(args.phase, args.budget_s, args.compile_check) else 0
    if args.out is None:
        ap.error("the output folder is required (or --plan)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"{args.out!r} exists and is not a folder")
    sys.path.insert(0, HERE)
    phase = Phase(
        args.phase,
        os.path.abspath(args.out),
        dry=args.dry_run,
        full=args.full,
        compile_check=args.compile_check,
        budget_s=args.budget_s,
        py=os.environ.get("PYTHON", sys.executable),
        argv=argv,
    )
    return phase.run()


if __name__ == "__main__":
    sys.exit(main())

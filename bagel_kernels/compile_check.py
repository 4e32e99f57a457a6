"""Compile every Triton kernel of the package for the GPU (sm_90 and sm_80) on a machine without one,
exactly as the runtime would compile the launches the model makes, and check the machine code.

    python -m bagel_kernels.compile_check [--arch 90 --arch 80] [--module NAME ...] [--only SUBSTRING]
                                          [--report] [--json PATH] [-v]
    python -m bagel_kernels.compile_check --merge A.json B.json ...   (one table from several runs)

Catches what the interpreter accepts and the GPU compiler rejects (``break`` in a loop, ``tl.exp`` on
bf16, a pipeliner that gives up, ...) and checks resources. A kernel FAILS when it does not compile,
needs more shared memory than one block may have on the architecture (sm_90 227 KiB, sm_80 163 KiB),
spills registers inside a loop (local-memory stores or loads between a loop's head and its backward
branch in the SASS), or, where its spec asks for it (``expect_mma``), has a loop without tensor-core
MMA (wgmma ``HGMMA`` on sm_90, ``HMMA`` on sm_80). ``--report`` prints, per kernel, architecture and
Triton version: registers, spill bytes (ptxas ``-v``), shared memory, whether the loops use MMA and
asynchronous copies, and resident CTAs per SM. Must run WITHOUT ``TRITON_INTERPRET=1`` (the
interpreter replaces the kernels; the script refuses to run then). Exit code 0 when all is well.

Where the specs come from
-------------------------
Each kernel module in :data:`MODULES` (read from the op families' registries: a backend's
``compile_specs``) defines ``compile_specs(arch) -> list[tuple]`` (a module without
it is skipped with a note). Our modules build them with
:func:`specs_from_launches`: the module's launchers run on ``meta`` tensors shaped and strided as the
model produces them at BAGEL-7B sizes, with ``JITFunction.run`` intercepted, and each intercepted launch
goes through Triton's own argument binder, the code the runtime uses to specialise a launch (pointers
16-byte aligned and integers divisible by 16 get ``tt.divisibility=16``, integers equal to 1 become
constants). So the tiles, warps, stages, constexprs and alignment are those the launchers pick on
that architecture, and the kernel compiled here is the kernel that runs.

A spec is ``(name, jit_fn, signature, constexprs, options)``:

    name        unique label, e.g. "attn_fwd_bf16_d128"
    jit_fn      the ``@triton.jit`` kernel (a ``triton.runtime.JITFunction``)
    signature   ``{arg_name: type}`` over ALL kernel arguments: "*bf16", "*i32", ... for pointers,
                "i32", "i64", "fp32" for scalars, "constexpr" for constexpr arguments
    constexprs  ``{arg_name: value}`` for every argument typed "constexpr"
    options     compile options (``num_warps``, ``num_stages``, ...) plus keys of our own:
                ``"divisible_by_16"``: argument names compiled as multiples of 16 (when absent: every
                pointer and every ``stride*`` argument, for hand-written specs), ``"expect_mma"``:
                the kernel's loops must use tensor cores

A module that does not exist, or has no specs, is skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field

from .backends import interpreting

__all__ = [
    "ARCHS",
    "MAX_SHARED",
    "MODULES",
    "SM90_MAX_SHARED",
    "KernelReport",
    "analyse",
    "collect_specs",
    "compile_spec",
    "specs_from_launches",
    "main",
]


def kernel_modules() -> list[str]:
    """The modules whose ``compile_specs(arch)`` list kernels, read from the op families' registries
    (each backend's ``compile_specs``, :mod:`bagel_kernels.dispatch`), in declaration order."""
    from .dispatch import families

    out = []
    for fam in families().values():
        for be in fam.backends.values():
            if be.compile_specs is not None and be.compile_specs not in out:
                out.append(be.compile_specs)
    return out


MODULES = kernel_modules()
ARCHS = (90, 80)
# bytes of shared memory one block may use (opt-in maximum), and one SM has, per architecture
MAX_SHARED = {90: 232448, 80: 166912}
SM_SHARED = {90: 233472, 80: 167936}
SM90_MAX_SHARED = MAX_SHARED[90]
_REGS_PER_SM = 65536
_MAX_THREADS_PER_SM = 2048
_MAX_CTAS_PER_SM = 32
_SMEM_RESERVED_PER_CTA = 1024


# ------------------------------------------------------------------------------------------ specs
def _short(fn) -> str:
    name = getattr(getattr(fn, "fn", None), "__name__", None) or getattr(fn, "__name__", "kernel")
    return name.strip("_").removesuffix("_kernel")


@contextlib.contextmanager
def _intercept_launches(record: list):
    """``kernel[grid](...)`` records ``(jit_fn, args, kwargs)`` instead of launching (also for the
    interpreter's kernels, so that the specs can be listed, not compiled, under TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def fake_run(self, *args, grid, warmup, **kwargs):
        record.append((self, args, kwargs))
        return None

    originals = [(cls, cls.run) for cls in (JITFunction, InterpretedFunction)]
    for cls, _ in originals:
        cls.run = fake_run
    try:
        yield
    finally:
        for cls, run in originals:
            cls.run = run


def _bind(fn, args: tuple, kwargs: dict, arch: int) -> tuple[dict, dict, list[str], dict]:
    """``(signature, constexprs, divisible_by_16, options)`` of one launch, from Triton's runtime binder."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not hasattr(fn, "params"):  # an interpreter kernel: bind with a JITFunction of the same code
        fn = JITFunction(fn.fn)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, _ = binder(*args, **kwargs)
    names = [p.name for p in fn.params]
    signature, constexprs, divisible = {}, {}, []
    for name, (ty, attr) in zip(names, specialization, strict=True):
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = bound[name] if not hasattr(bound[name], "value") else bound[name].value
        elif isinstance(attr, str) and "D" in attr:
            divisible.append(name)
    options = {k: v for k, v in kwargs.items() if k not in names}
    parsed = backend.parse_options(options)  # the runtime's defaults for what the launch leaves out
    options.setdefault("num_warps", parsed.num_warps)
    options.setdefault("num_stages", parsed.num_stages)
    return signature, constexprs, divisible, options


def specs_from_launches(cases, arch: int) -> list[tuple]:
    """Specs of every kernel launch the ``(tag, thunk, extra_options)`` cases make for ``arch``.

    Each thunk calls the module's launchers on ``meta`` tensors; it runs under
    :func:`bagel_kernels.attention_configs.compile_target` (so launchers pick the configuration of
    ``arch``) with the launches intercepted. A launch is named ``<kernel>_<tag>`` (kernel name without
    leading underscore and ``_kernel`` suffix) unless the tag contains ``{kernel}``. ``extra_options``
    (e.g. ``{"expect_mma": True}``) is added to the options of every launch of the case; a dict keyed
    by kernel short name applies per kernel."""
    from .attention_configs import compile_target

    specs = []
    for tag, thunk, extra in cases:
        record: list = []
        with compile_target(arch), _intercept_launches(record):
            thunk()
        for fn, args, kwargs in record:
            sig, const, div, opts = _bind(fn, args, kwargs, arch)
            short = _short(fn)
            more = (
                extra.get(short, {}) if extra and all(isinstance(v, dict) for v in extra.values()) else extra
            )
            opts = {**opts, **(more or {}), "divisible_by_16": div}
            name = tag.format(kernel=short) if "{kernel}" in tag else f"{short}_{tag}"
            specs.append((name, fn, sig, const, opts))
    return specs


def collect_specs(modules: list[str], arch: int = 90) -> tuple[list[tuple], list[str], list[str]]:
    """``(specs, notes, errors)`` for ``arch``: every module's specs (5-tuples, names prefixed with the
    module's short name), a note per module skipped, and an error per module that failed."""
    specs, notes, errors = [], [], []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                notes.append(f"skip {name}: module not found")
            else:
                errors.append(f"FAIL {name}: import error: {exc}")
            continue
        except Exception as exc:  # a broken module must not hide the others
            errors.append(f"FAIL {name}: import error: {type(exc).__name__}: {exc}")
            continue
        fn = getattr(mod, "compile_specs", None)
        if fn is None:
            notes.append(f"skip {name}: no compile_specs()")
            continue
        try:
            mod_specs = list(fn(arch))
        except Exception as exc:
            errors.append(f"FAIL {name}: compile specs raised {type(exc).__name__}: {exc}")
            continue
        short = name.rsplit(".", 1)[-1]
        for spec in mod_specs:
            if len(spec) == 4:
                spec = (*spec, {})
            if len(spec) != 5:
                errors.append(
                    f"FAIL {name}: a spec must be (name, jit_fn, signature, constexprs[, options]), got {len(spec)} items"
                )
                continue
            specs.append((f"{short}:{spec[0]}", *spec[1:]))
    return specs, notes, errors


def _ast_source(fn, signature: dict, constexprs: dict, divisible: list[str] | None = None):
    import triton

    order = list(fn.arg_names)
    missing = [a for a in order if a not in signature]
    if missing:
        raise ValueError(f"signature lacks arguments {missing} of {fn.__name__}")
    extra = [a for a in signature if a not in order]
    if extra:
        raise ValueError(f"signature names unknown arguments {extra} of {fn.__name__}")
    unset = [a for a in order if signature[a] == "constexpr" and a not in constexprs]
    if unset:
        raise ValueError(f"constexpr arguments {unset} of {fn.__name__} have no value")
    sig = {a: signature[a] for a in order}
    if divisible is None:
        divisible = [
            a for a in order if sig[a].startswith("*") or (a.startswith("stride") and sig[a] != "constexpr")
        ]
    attrs = {(order.index(a),): [["tt.divisibility", 16]] for a in divisible}
    consts = {(order.index(a),): v for a, v in constexprs.items()}
    return triton.compiler.ASTSource(fn, sig, consts, attrs)


def _target(arch: int = 90):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def compile_spec(spec: tuple, arch: int = 90):
    """Compile one 5-tuple spec for ``arch``; returns the compiled kernel (raises on failure)."""
    import triton

    _, fn, signature, constexprs, options = spec
    options = {k: v for k, v in options.items() if k not in ("divisible_by_16", "expect_mma")}
    src = _ast_source(fn, signature, constexprs, spec[4].get("divisible_by_16"))
    return triton.compile(src, target=_target(arch), options=options)


# ------------------------------------------------------------------------------------------ analysis
@dataclass
class KernelReport:
    name: str
    arch: int
    triton: str
    ok: bool = False
    error: str = ""
    warps: int = 0
    stages: int = 0
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    loops: int = 0
    loop_spill_insts: int = 0
    loop_mma: bool | None = None
    loop_async_copy: bool | None = None
    expect_mma: bool = False
    ctas_per_sm: int | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


_NV_BIN = None


def _nv_tool(name: str) -> str:
    """A tool triton ships under triton/backends/nvidia/bin (ptxas, cuobjdump)."""
    global _NV_BIN
    if _NV_BIN is None:
        import triton.backends.nvidia as nv

        _NV_BIN = os.path.join(os.path.dirname(nv.__file__), "bin")
    return os.path.join(_NV_BIN, name)


_PTXAS_RE = {
    "spill": re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads"),
    "regs": re.compile(r"Used (\d+) registers"),
}


def _parse_ptxas(log: str) -> tuple[int | None, int | None, int | None]:
    regs = _PTXAS_RE["regs"].search(log)
    spill = _PTXAS_RE["spill"].search(log)
    return (
        int(regs.group(1)) if regs else None,
        int(spill.group(1)) if spill else None,
        int(spill.group(2)) if spill else None,
    )


def _ptxas_for(arch: int) -> tuple[str, list[str]]:
    """The ptxas the installed Triton runs for ``arch`` and the extra flags it passes: triton 3.9
    assembles sm_90 with its CUDA 13 ``ptxas-blackwell`` (the plain ``ptxas`` it ships is 12.9 and
    rejects that PTX) and adds ``--regAllocOptLevel=2``."""
    try:
        import triton.backends.nvidia.compiler as nvc

        path = nvc.get_ptxas(arch).path
        with open(nvc.__file__) as f:
            extra = ["--regAllocOptLevel=2"] if "--regAllocOptLevel=2" in f.read() else []
        return path, extra
    except (ImportError, AttributeError, TypeError, OSError):
        return _nv_tool("ptxas"), []


def _ptxas_log(ptx: str) -> str:
    """``ptxas -v`` on a kernel's PTX with the ptxas and flags triton uses (when the compile came
    from the cache, triton printed no log)."""
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M)
    arch = int(re.sub(r"\D", "", target.group(1)))
    tool, extra = _ptxas_for(arch)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [tool, "-lineinfo", "-v", *extra, f"--gpu-name={target.group(1)}", src, "-o", src + ".o"],
            capture_output=True,
            text=True,
        )
    return proc.stdout + proc.stderr


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"\bBRA\s+(?:\w+\s+)?0x([0-9a-f]+)")


def sass_loops(sass: str) -> tuple[list[tuple[int, int]], list[tuple[int, str]]]:
    """Loops as ``[head, backward branch]`` address ranges, and ``(address, instruction)`` pairs."""
    insts = []
    for line in sass.splitlines():
        m = _SASS_LINE.search(line)
        if m:
            insts.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for addr, text in insts:
        b = _BRA.search(text)
        if b:
            target = int(b.group(1), 16)
            if target < addr:
                loops.append((target, addr))
    return loops, insts


def _ctas_per_sm(arch: int, regs: int | None, warps: int, shared: int | None) -> int | None:
    if regs is None:
        return None
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = (_REGS_PER_SM // max(regs_per_warp, 1)) // warps
    by_threads = _MAX_THREADS_PER_SM // (warps * 32)
    by_smem = SM_SHARED[arch] // ((shared or 0) + _SMEM_RESERVED_PER_CTA)
    return max(0, min(by_regs, by_threads, by_smem, _MAX_CTAS_PER_SM))


def analyse(kernel, arch: int, ptxas_log: str, rep: KernelReport) -> None:
    """Fill ``rep`` from a compiled kernel: resources, loops, MMA, spills in loops, occupancy."""
    meta = kernel.metadata
    rep.shared = int(getattr(meta, "shared", 0) or 0)
    rep.warps = int(getattr(meta, "num_warps", 0) or 0)
    rep.stages = int(getattr(meta, "num_stages", 0) or 0)
    if not ptxas_log:
        ptxas_log = _ptxas_log(kernel.asm["ptx"])
    rep.registers, rep.spill_stores, rep.spill_loads = _parse_ptxas(ptxas_log)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([_nv_tool("cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
    loops, insts = sass_loops(sass)
    rep.loops = len(loops)

    def in_loop(addr):
        return any(lo <= addr <= hi for lo, hi in loops)

    mma = "HGMMA" if arch >= 90 else "HMMA"
    loop_insts = [t for a, t in insts if in_loop(a)]
    rep.loop_spill_insts = sum(1 for t in loop_insts if re.search(r"\b(STL|LDL)\b", t))
    if loops:
        rep.loop_mma = any(mma in t or (arch >= 90 and "HMMA" in t) for t in loop_insts)
        rep.loop_async_copy = any(re.search(r"\b(LDGSTS|UTMALDG|UBLKCP)\b", t) for t in loop_insts)
    rep.ctas_per_sm = _ctas_per_sm(arch, rep.registers, rep.warps or 4, rep.shared)
    if rep.shared > MAX_SHARED[arch]:
        rep.problems.append(f"needs {rep.shared} B of shared memory, sm_{arch} allows {MAX_SHARED[arch]}")
    if rep.loop_spill_insts:
        rep.problems.append(
            f"spills inside a loop ({rep.loop_spill_insts} local-memory instructions; "
            f"{rep.spill_stores} B spill stores, {rep.spill_loads} B spill loads in all)"
        )
    if rep.expect_mma and loops and not rep.loop_mma:
        rep.problems.append(f"no tensor-core MMA ({mma}) in its loops")


def check_spec(spec: tuple, arch: int, version: str) -> KernelReport:
    import triton

    rep = KernelReport(name=spec[0], arch=arch, triton=version, expect_mma=bool(spec[4].get("expect_mma")))
    t0 = time.perf_counter()
    knobs = getattr(triton, "knobs", None)
    nv = getattr(knobs, "nvidia", None)
    buf = io.StringIO()
    try:
        old = getattr(nv, "dump_ptxas_log", None)
        if nv is not None:
            nv.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(buf):
                kernel = compile_spec(spec, arch)
        finally:
            if nv is not None:
                nv.dump_ptxas_log = old
        analyse(kernel, arch, buf.getvalue() if "Used" in buf.getvalue() else "", rep)
        rep.ok = not rep.problems
    except Exception as exc:  # report every kernel, then fail
        first = str(exc).strip().splitlines()
        rep.error = f"{type(exc).__name__}: {first[0] if first else ''}"
        rep.problems.append(rep.error)
    rep.seconds = time.perf_counter() - t0
    return rep


# ------------------------------------------------------------------------------------------ output
_COLUMNS = [
    ("arch", lambda r: f"sm_{r.arch}"),
    ("triton", lambda r: r.triton),
    ("kernel", lambda r: r.name),
    ("warps", lambda r: str(r.warps or "-")),
    ("stages", lambda r: str(r.stages or "-")),
    ("regs", lambda r: "-" if r.registers is None else str(r.registers)),
    ("spill st/ld B", lambda r: "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"),
    ("spill in loop", lambda r: "-" if not r.ok and r.error else ("YES" if r.loop_spill_insts else "no")),
    ("smem B", lambda r: "-" if r.shared is None else str(r.shared)),
    ("MMA in loop", lambda r: "-" if r.loop_mma is None else ("yes" if r.loop_mma else "no")),
    (
        "cp.async in loop",
        lambda r: "-" if r.loop_async_copy is None else ("yes" if r.loop_async_copy else "no"),
    ),
    ("CTAs/SM", lambda r: "-" if r.ctas_per_sm is None else str(r.ctas_per_sm)),
    ("status", lambda r: "OK" if r.ok else "FAIL"),
]


def format_report(reports: list[KernelReport]) -> str:
    rows = [[f(r) for _, f in _COLUMNS] for r in reports]
    head = [c for c, _ in _COLUMNS]
    widths = [
        max(len(head[i]), *(len(row[i]) for row in rows)) if rows else len(head[i]) for i in range(len(head))
    ]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _read_reports(path: str) -> list[KernelReport]:
    """The reports of one ``--json`` file; ValueError naming the file when it is missing or not one."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise ValueError(f"--merge {path}: cannot be read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--merge {path}: not a JSON file ({exc})") from None
    try:
        if not isinstance(data, list):
            raise TypeError(f"a list of kernel reports, got {type(data).__name__}")
        return [KernelReport(**r) for r in data]
    except TypeError as exc:
        raise ValueError(f"--merge {path}: not a compile_check --json report ({exc})") from None


def _merge(paths: list[str]) -> int:
    reports = []
    for p in paths:
        try:
            reports += _read_reports(p)
        except ValueError as exc:
            print(f"compile_check: {exc}", file=sys.stderr)
            return 2
    reports.sort(key=lambda r: (-r.arch, r.name, r.triton))
    print(format_report(reports))
    bad = [r for r in reports if not r.ok]
    for r in bad:
        print(f"FAIL sm_{r.arch} triton {r.triton} {r.name}: {'; '.join(r.problems)}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", action="append", help="kernel module to check (repeatable; default: MODULES)")
    ap.add_argument(
        "--arch", action="append", type=int, help="compute capability, 90 or 80 (repeatable; default: both)"
    )
    ap.add_argument("--only", default=None, help="compile only specs whose name contains this substring")
    ap.add_argument("--report", action="store_true", help="print the resource table")
    ap.add_argument("--json", default=None, help="write the per-kernel results to this JSON file")
    ap.add_argument(
        "--merge", nargs="+", default=None, help="print one table from JSON files of earlier runs"
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="print full tracebacks of failures")
    args = ap.parse_args(argv)
    if args.merge:
        return _merge(args.merge)
    if args.json:  # checked now, not after minutes of compiling
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            why = (
                "is a folder"
                if os.path.isdir(args.json)
                else f"its folder {folder} does not exist or is not writable"
            )
            print(f"compile_check: --json {args.json}: {why}", file=sys.stderr)
            return 2

    if interpreting():
        print(
            "compile_check: unset TRITON_INTERPRET; the interpreter replaces the kernels that must be compiled"
        )
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a 3.9 warning, keeps the 3.6 default
    import triton

    version = triton.__version__
    archs = args.arch or list(ARCHS)
    bad_arch = [a for a in archs if a not in MAX_SHARED]
    if bad_arch:
        print(f"compile_check: unsupported --arch {bad_arch}; choose from {sorted(MAX_SHARED)}")
        return 2
    failures, total, reports = 0, 0, []
    t_all = time.perf_counter()
    for arch in archs:
        try:
            specs, notes, errors = collect_specs(args.module or MODULES, arch)
        except Exception:
            traceback.print_exc()
            return 1
        for line in notes + errors:
            print(f"sm_{arch}: {line}")
        failures += len(errors)
        if args.only:
            specs = [s for s in specs if args.only in s[0]]
        total += len(specs)
        for spec in specs:
            rep = check_spec(spec, arch, version)
            reports.append(rep)
            if rep.ok:
                extra = f"regs={rep.registers}, spill={rep.spill_stores}/{rep.spill_loads} B, shared={rep.shared} B"
                print(f"OK   sm_{arch} {spec[0]} ({extra}, {rep.seconds:.1f} s)")
            else:
                failures += 1
                print(f"FAIL sm_{arch} {spec[0]}: {'; '.join(rep.problems)} ({rep.seconds:.1f} s)")
                if args.verbose and rep.error:
                    traceback.print_exc()
    if not total:
        print("compile_check: no kernels to compile")
        return 1
    elapsed = time.perf_counter() - t_all
    if args.report:
        print()
        print(format_report(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=1)
    ok = sum(r.ok for r in reports)
    print(
        f"compile_check: {ok}/{total} kernels compiled and checked for {', '.join(f'sm_{a}' for a in archs)} "
        f"with triton {version} in {elapsed:.1f} s"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

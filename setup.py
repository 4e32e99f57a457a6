"""Build script. The package is pure Python plus one optional compiled extension, ``bagel_kernels._C``,
holding the fused patch-embedding operator of csrc/ (``torch.ops.bagel_kernels_ext.fused_patch_embed``).

What gets built (printed at build time):

* the CPU kernel, whenever torch is importable at build time and a C++ compiler works;
* the CUDA kernel as well when torch was built with CUDA and the CUDA toolkit is found, or when
  ``BAGEL_KERNELS_FORCE_CUDA=1``. The toolkit root comes from ``CUDA_HOME`` / ``CUDA_PATH`` when set,
  else from the compiler itself: ``nvcc --dryrun`` names the directory it runs from, so a wrapper
  script such as ``/usr/local/bin/nvcc`` (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``) still leads to
  ``/usr/local/cuda-13.0``, not to ``/usr/local`` (where torch would guess it, and the link would then
  miss ``libcudart``);
* nothing with ``BAGEL_KERNELS_SKIP_EXT=1``.

What the build tried and how each attempt ended (with the last lines of a failed compiler's output)
is written to ``bagel_kernels/_build_status.json``, which
``bagel_kernels.patch_embed.extension_status()`` reports.

Install with torch already present, without build isolation, so the build sees that torch:

    pip install --no-build-isolation -e .      (or without -e)

A failed build never fails the install: it warns and the package falls back to its torch
implementation (``bagel_kernels.patch_embed.extension_status()`` says why). A failed CUDA build is
retried as a CPU-only build. Set ``BAGEL_KERNELS_REQUIRE_EXT=1`` to make a failed build an error, and
``BAGEL_KERNELS_REQUIRE_CUDA=1`` to make a failed (or skipped) CUDA build an error.
Other knobs: ``TORCH_CUDA_ARCH_LIST`` (default here "8.0;9.0+PTX", no GPU probing), ``MAX_JOBS``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
EXT_NAME = "bagel_kernels._C"
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"  # mma.sync bf16 needs sm_80+; H100 is sm_90


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"[bagel-kernels setup] {msg}", file=sys.stderr, flush=True)


STATUS_FILE = "_build_status.json"
_TAIL_LINES = 40
_status: dict = {"attempts": []}


def _write_status(build_lib: str | None = None) -> None:
    """``_build_status.json`` next to the package sources (editable installs and in-place builds) and in
    the build directory (wheels), for ``patch_embed.extension_status()``."""
    _status["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    dirs = [ROOT / "bagel_kernels"] + ([Path(build_lib) / "bagel_kernels"] if build_lib else [])
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            (d / STATUS_FILE).write_text(json.dumps(_status, indent=1) + "\n")
        except OSError as exc:  # a read-only tree must not fail the build
            _log(f"could not write {d / STATUS_FILE}: {exc}")


def find_cuda_root(env: dict | None = None) -> tuple[str | None, str]:
    """``(toolkit root, how it was found)``: ``CUDA_HOME`` / ``CUDA_PATH`` when set; else ask the
    ``nvcc`` found on PATH where it runs from (``nvcc --dryrun`` prints ``_HERE_=<root>/bin``, also
    through wrapper scripts and symlinks); else the real path of ``nvcc`` two levels up."""
    env = os.environ if env is None else env
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            return env[var], f"${var}"
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc is None:
        return None, "no nvcc on PATH and no CUDA_HOME"
    try:
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "probe.cu"
            src.write_text("")
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", str(src), "-o", str(Path(d) / "probe.o")],
                capture_output=True, text=True, timeout=60, env=dict(env),
            )  # fmt: skip
        m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
        if m:
            here = Path(m.group(1).strip()).resolve()
            if (here / "nvcc").exists() or (here.parent / "include").exists():
                return str(here.parent), f"nvcc --dryrun of {nvcc} (_HERE_={here})"
    except (OSError, subprocess.SubprocessError) as exc:
        _log(f"nvcc --dryrun failed ({exc}); falling back to the real path of {nvcc}")
    real = Path(os.path.realpath(nvcc))
    return str(real.parent.parent), f"real path of {nvcc} ({real})"


class _CaptureFds:
    """Collects what the compilers print on file descriptors 1 and 2 (ninja, nvcc, g++ write there,
    not through Python), and replays it on stderr afterwards so that verbose logs still show it."""

    def __enter__(self):
        self._tmp = tempfile.TemporaryFile(mode="w+b")
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = [os.dup(1), os.dup(2)]
        os.dup2(self._tmp.fileno(), 1)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode("utf-8", "replace")
        self._tmp.close()
        sys.stderr.write(self.text)
        sys.stderr.flush()
        return False


def _tail(text: str, n: int = _TAIL_LINES) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [i for i, ln in enumerate(lines) if re.search(r"\berror\b|Error|FAILED", ln)]
    start = max(0, min(errors[0] - 5, len(lines) - n)) if errors else max(0, len(lines) - n)
    return "\n".join(lines[start : start + n])


def _sources(cuda: bool) -> list[str]:
    patterns = ["csrc/*.cpp", "csrc/cpu/*.cpp"] + (["csrc/cuda/*.cu"] if cuda else [])
    return sorted(str(p.relative_to(ROOT)) for pat in patterns for p in ROOT.glob(pat))


def _make_extension(cpp_extension, cuda: bool):
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17 or C++20).
    cxx = ["-O3"] if sys.platform != "win32" else ["/O2"]
    kwargs = dict(
        name=EXT_NAME,
        sources=_sources(cuda),
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx},
    )
    if cuda:
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo"]
        return cpp_extension.CUDAExtension(**kwargs)
    return cpp_extension.CppExtension(**kwargs)


def _configure():
    """(ext_modules, cmdclass) for this build, and print what will be built and why."""
    if _flag("BAGEL_KERNELS_SKIP_EXT"):
        _log("BAGEL_KERNELS_SKIP_EXT=1: building no compiled extension (pure Python install)")
        return [], {}
    try:
        import torch
    except Exception as exc:  # no torch at build time (e.g. an isolated build): install pure Python
        _log(
            f"torch is not importable at build time ({exc!r}): building no compiled extension. "
            "Install torch first, then `pip install --no-build-isolation .` to build it."
        )
        _status.update(torch=None, cuda="skipped", cuda_why=f"torch not importable at build time: {exc!r}")
        _write_status()
        return [], {}

    force_cuda = _flag("BAGEL_KERNELS_FORCE_CUDA")
    require_cuda = _flag("BAGEL_KERNELS_REQUIRE_CUDA")
    torch_cuda = torch.version.cuda is not None
    cuda_root, cuda_root_how = (None, "not looked for (torch has no CUDA)")
    if torch_cuda or force_cuda or require_cuda:
        cuda_root, cuda_root_how = find_cuda_root()
        if cuda_root is not None and not os.environ.get("CUDA_HOME"):
            # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it from the compiler
            os.environ["CUDA_HOME"] = cuda_root
    from torch.utils import cpp_extension

    if cuda_root is not None and cpp_extension.CUDA_HOME != cuda_root:
        # imported before we set CUDA_HOME (or a CPU torch, which never looks for a toolkit): tell it
        cpp_extension.CUDA_HOME = cuda_root
    cuda_home = cpp_extension.CUDA_HOME
    with_cuda = force_cuda or (torch_cuda and cuda_home is not None)
    why = (
        "BAGEL_KERNELS_FORCE_CUDA=1"
        if force_cuda
        else "torch has CUDA and the toolkit was found"
        if with_cuda
        else "torch has no CUDA"
        if not torch_cuda
        else f"CUDA toolkit not found ({cuda_root_how}; set CUDA_HOME)"
    )
    nvcc_version = None
    if cuda_home:
        try:
            nvcc_version = (
                subprocess.run(
                    [str(Path(cuda_home) / "bin" / "nvcc"), "--version"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
        except (OSError, subprocess.SubprocessError, IndexError):
            nvcc_version = None
    _status.update(
        torch=torch.__version__, torch_cuda=torch.version.cuda, python=sys.version.split()[0],
        cuda_home=cuda_home, cuda_home_how=cuda_root_how if cuda_root else "torch.utils.cpp_extension",
        nvcc=nvcc_version, cuda="planned" if with_cuda else "skipped", cuda_why=why,
    )  # fmt: skip
    if require_cuda and not with_cuda:
        _write_status()
        raise RuntimeError(f"BAGEL_KERNELS_REQUIRE_CUDA=1 but the CUDA kernel will not be built: {why}")
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    try:
        ext = _make_extension(cpp_extension, with_cuda)
    except Exception as exc:  # e.g. CUDAExtension without a CUDA_HOME (forced on a CPU torch)
        if not with_cuda:
            raise
        if require_cuda:
            _status.update(cuda="failed", cuda_why=f"cannot set up a CUDA extension: {exc}")
            _write_status()
            raise
        with_cuda = False
        why = f"cannot set up a CUDA extension: {exc}"
        _status.update(cuda="failed", cuda_why=why)
        ext = _make_extension(cpp_extension, cuda=False)
    if with_cuda:
        _status["arch_list"] = os.environ["TORCH_CUDA_ARCH_LIST"]

    _log("build configuration:")
    _log(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    _log(f"  extension {EXT_NAME}: CPU kernel yes; CUDA kernel {'yes' if with_cuda else 'no'} ({why})")
    if with_cuda:
        _log(f"  CUDA_HOME={cuda_home} (from {_status['cuda_home_how']}), {nvcc_version}")
        _log(f"  TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    _log(
        f"  MAX_JOBS={os.environ.get('MAX_JOBS', '(default)')}  "
        f"BAGEL_KERNELS_REQUIRE_EXT={'1' if _flag('BAGEL_KERNELS_REQUIRE_EXT') else '0'}"
    )

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class TolerantBuildExt(base):
        """Builds the extension; after a failed CUDA build retries with the CPU kernel only, and after a
        failed CPU build gives up with a warning so that the pure-Python package still installs."""

        _bagel_failed = False

        def _attempt(self, kind: str) -> str | None:
            """One build; None on success, else the error (traceback + compiler output tail)."""
            t0 = time.time()
            record = {"kind": kind, "sources": list(self.extensions[0].sources)}
            _status["attempts"].append(record)
            try:
                with _CaptureFds() as cap:
                    super().run()
            except Exception:
                out = getattr(cap, "text", "")
                err = traceback.format_exc()
                record.update(
                    ok=False, seconds=round(time.time() - t0, 1), error_tail=_tail(out + "\n" + err)
                )
                return err
            record.update(ok=True, seconds=round(time.time() - t0, 1))
            return None

        def run(self):
            nonlocal with_cuda
            inplace = self.inplace  # setuptools clears it during run(); an exception leaves it cleared
            build_lib = None if inplace else self.build_lib
            err = self._attempt("cuda+cpu" if with_cuda else "cpu")
            if err is None:
                _status["cuda"] = "built" if with_cuda else _status.get("cuda", "skipped")
                _write_status(build_lib)
                return
            if with_cuda:
                _status.update(cuda="failed", cuda_why="the CUDA build failed (see attempts[0].error_tail)")
                if _flag("BAGEL_KERNELS_REQUIRE_CUDA"):
                    _write_status(build_lib)
                    raise RuntimeError(
                        f"building the CUDA kernel of {EXT_NAME} failed (BAGEL_KERNELS_REQUIRE_CUDA=1):\n"
                        f"{_status['attempts'][-1]['error_tail']}"
                    )
                _log(f"building the CUDA extension failed:\n{err}\nretrying with the CPU kernel only")
                with_cuda = False
                for e in self.extensions:
                    e.__dict__.update(vars(_make_extension(cpp_extension, cuda=False)))
                self.compiler = None  # build_ext.run makes a fresh compiler object
                self.inplace = inplace
                err = self._attempt("cpu")
                if err is None:
                    _log("built the extension with the CPU kernel only (no CUDA kernel)")
                    _write_status(build_lib)
                    return
            _write_status(build_lib)
            if _flag("BAGEL_KERNELS_REQUIRE_EXT"):
                raise RuntimeError(f"building {EXT_NAME} failed (BAGEL_KERNELS_REQUIRE_EXT=1):\n{err}")
            _log(f"WARNING: building {EXT_NAME} failed; installing without it (torch fallback):\n{err}")
            self._bagel_failed = True

        def get_outputs(self):
            # A failed build produced no file: do not let the (editable) wheel ask for it.
            return [] if self._bagel_failed else super().get_outputs()

        def get_output_mapping(self):
            return {} if self._bagel_failed else super().get_output_mapping()

    return [ext], {"build_ext": TolerantBuildExt}


# The benchmark scripts travel with a wheel (bagel-bench runs them; a source checkout is not needed):
# installed as data under <prefix>/share/bagel-kernels/benchmarks, where bagel.cli.bench looks when the
# package is not an editable install next to its benchmarks/ folder.
BENCH_DATA_DIR = "share/bagel-kernels/benchmarks"


def _bench_data_files() -> list[tuple[str, list[str]]]:
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks")
    if not os.path.isdir(folder):  # a trimmed source tree: the package installs without the scripts
        return []
    files = sorted(os.path.join("benchmarks", f) for f in os.listdir(folder) if f.endswith((".py", ".md")))
    return [(BENCH_DATA_DIR, files)]


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import find_cuda_root from it
    ext_modules, cmdclass = _configure()
    setup(ext_modules=ext_modules, cmdclass=cmdclass, data_files=_bench_data_files())

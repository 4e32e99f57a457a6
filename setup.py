"""Build script. The package is pure Python plus one optional compiled extension, ``bagel_kernels._C``,
holding the fused patch-embedding operator of csrc/ (``torch.ops.bagel_kernels_ext.fused_patch_embed``).

What gets built (printed at build time):

* the CPU kernel, whenever torch is importable at build time and a C++ compiler works;
* the CUDA kernel as well when torch was built with CUDA and the CUDA toolkit is found
  (``CUDA_HOME`` or ``nvcc`` on PATH), or when ``BAGEL_KERNELS_FORCE_CUDA=1``;
* nothing with ``BAGEL_KERNELS_SKIP_EXT=1``.

Install with torch already present, without build isolation, so the build sees that torch:

    pip install --no-build-isolation -e .      (or without -e)

A failed build never fails the install: it warns and the package falls back to its torch
implementation (``bagel_kernels.patch_embed.extension_status()`` says why). A failed CUDA build is
retried as a CPU-only build. Set ``BAGEL_KERNELS_REQUIRE_EXT=1`` to make a failed build an error.
Other knobs: ``TORCH_CUDA_ARCH_LIST`` (default here "8.0;9.0+PTX", no GPU probing), ``MAX_JOBS``.
"""

from __future__ import annotations

import os
import sys
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
        from torch.utils import cpp_extension
    except Exception as exc:  # no torch at build time (e.g. an isolated build): install pure Python
        _log(
            f"torch is not importable at build time ({exc!r}): building no compiled extension. "
            "Install torch first, then `pip install --no-build-isolation .` to build it."
        )
        return [], {}

    force_cuda = _flag("BAGEL_KERNELS_FORCE_CUDA")
    torch_cuda = torch.version.cuda is not None
    cuda_home = cpp_extension.CUDA_HOME
    with_cuda = force_cuda or (torch_cuda and cuda_home is not None)
    why = (
        "BAGEL_KERNELS_FORCE_CUDA=1"
        if force_cuda
        else "torch has CUDA and the toolkit was found"
        if with_cuda
        else "torch has no CUDA"
        if not torch_cuda
        else "CUDA toolkit not found (set CUDA_HOME)"
    )
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    try:
        ext = _make_extension(cpp_extension, with_cuda)
    except Exception as exc:  # e.g. CUDAExtension without a CUDA_HOME (forced on a CPU torch)
        if not with_cuda:
            raise
        with_cuda = False
        why = f"cannot set up a CUDA extension: {exc}"
        ext = _make_extension(cpp_extension, cuda=False)

    _log("build configuration:")
    _log(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    _log(f"  extension {EXT_NAME}: CPU kernel yes; CUDA kernel {'yes' if with_cuda else 'no'} ({why})")
    if with_cuda:
        _log(f"  CUDA_HOME={cuda_home}  TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    _log(
        f"  MAX_JOBS={os.environ.get('MAX_JOBS', '(default)')}  "
        f"BAGEL_KERNELS_REQUIRE_EXT={'1' if _flag('BAGEL_KERNELS_REQUIRE_EXT') else '0'}"
    )

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class TolerantBuildExt(base):
        """Builds the extension; after a failed CUDA build retries with the CPU kernel only, and after a
        failed CPU build gives up with a warning so that the pure-Python package still installs."""

        _bagel_failed = False

        def run(self):
            nonlocal with_cuda
            inplace = self.inplace  # setuptools clears it during run(); an exception leaves it cleared
            try:
                super().run()
                return
            except Exception:
                err = traceback.format_exc()
            if with_cuda:
                _log(f"building the CUDA extension failed:\n{err}\nretrying with the CPU kernel only")
                with_cuda = False
                for e in self.extensions:
                    e.__dict__.update(vars(_make_extension(cpp_extension, cuda=False)))
                self.compiler = None  # build_ext.run makes a fresh compiler object
                self.inplace = inplace
                try:
                    super().run()
                    _log("built the extension with the CPU kernel only (no CUDA kernel)")
                    return
                except Exception:
                    err = traceback.format_exc()
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


ext_modules, cmdclass = _configure()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

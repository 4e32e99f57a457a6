"""setup.py: the CUDA toolkit root comes from the compiler, and a failed CUDA build is recorded where
``patch_embed.extension_status()`` reports it (what was tried, where the toolkit came from, the last
lines of the compiler's output). A fake toolkit stands in for CUDA: its ``nvcc`` answers ``--dryrun``
and ``--version`` like the real one and fails every compile; a wrapper script on PATH execs it, as
``/usr/local/bin/nvcc`` does on the GPU machines."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FAKE_NVCC = """#!/bin/sh
case " $* " in
  *" --dryrun "*) echo "#\\$ _NVVM_BRANCH_=nvvm"; echo "#\\$ _HERE_=$(dirname "$0")"; exit 0;;
  *" --version "*) echo "Cuda compilation tools, release 99.0, V99.0.0"; exit 0;;
esac
echo "fake_kernel.cu(1): error: this CUDA toolkit is a test double" >&2
exit 1
"""


def _fake_toolkit(tmp_path):
    root = tmp_path / "opt" / "cuda-99"
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(_FAKE_NVCC)
    nvcc.chmod(0o755)
    wrap = tmp_path / "usr-local-bin"
    wrap.mkdir()
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    (wrap / "nvcc").chmod(0o755)
    return root, wrap


def _setup_module():
    spec = importlib.util.spec_from_file_location("bagel_kernels_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: defines the helpers, builds nothing
    return mod


def test_cuda_root_comes_from_the_compiler(tmp_path):
    root, wrap = _fake_toolkit(tmp_path)
    setup = _setup_module()
    path = f"{wrap}{os.pathsep}/usr/bin{os.pathsep}/bin"
    found, how = setup.find_cuda_root({"PATH": path})
    assert found == str(root) and "_HERE_" in how  # not the wrapper's tmp_path, where torch would look
    assert setup.find_cuda_root({"PATH": path, "CUDA_HOME": "/somewhere"}) == ("/somewhere", "$CUDA_HOME")
    assert setup.find_cuda_root({"PATH": str(tmp_path / "empty")})[0] is None


@pytest.mark.slow
def test_failed_cuda_build_is_recorded(tmp_path):
    """BAGEL_KERNELS_REQUIRE_CUDA=1 with a toolkit whose nvcc fails: the build stops with an error,
    and _build_status.json says what was tried, with the compiler's error line; extension_status()
    turns that record into its reason."""
    root, wrap = _fake_toolkit(tmp_path)
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), proj / name)
    shutil.copytree(os.path.join(ROOT, "csrc"), proj / "csrc")
    # no benchmarks/ folder: setup.py ships the scripts when they are there and installs without them
    (proj / "bagel_kernels").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env.update(
        PATH=f"{wrap}{os.pathsep}{env.get('PATH', '')}", BAGEL_KERNELS_FORCE_CUDA="1",
        BAGEL_KERNELS_REQUIRE_CUDA="1", MAX_JOBS="2",
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=proj, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log
    assert "BAGEL_KERNELS_REQUIRE_CUDA=1" in log and "test double" in log, log[-3000:]
    rec = json.loads((proj / "bagel_kernels" / "_build_status.json").read_text())
    assert rec["cuda"] == "failed" and rec["cuda_home"] == str(root)
    assert "_HERE_" in rec["cuda_home_how"] and rec["nvcc"].endswith("V99.0.0")
    (attempt,) = rec["attempts"]
    assert attempt["kind"] == "cuda+cpu" and attempt["ok"] is False
    assert "fake_kernel.cu(1): error: this CUDA toolkit is a test double" in attempt["error_tail"]
    from bagel_kernels import patch_embed

    reason = patch_embed.no_cuda_reason(rec)
    assert "the CUDA build FAILED" in reason and "test double" in reason and str(root) in reason
    assert "cuda+cpu FAILED" in patch_embed.build_summary(rec)

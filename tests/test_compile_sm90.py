"""Every Triton kernel of the package compiles for sm_90 (Hopper) on a machine without a GPU.

``bagel_kernels.compile_check`` needs the real ``JITFunction`` objects, so it runs in a subprocess
with TRITON_INTERPRET removed from the environment (conftest sets it for this process).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from bagel_kernels.compile_check import MODULES, collect_specs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_check(*args: str, extra_path: str | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    paths = [p for p in (extra_path, _ROOT, env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run(
        [sys.executable, "-m", "bagel_kernels.compile_check", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=_ROOT,
    )


@pytest.mark.parametrize("module", MODULES)
def test_module_kernels_compile_for_sm90(module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist (yet)")
    proc = _run_check("--module", module)
    report = proc.stdout + proc.stderr
    if "no sm90_compile_specs()" in report:
        pytest.skip(f"{module} registers no kernels for the sm_90 compile check")
    assert proc.returncode == 0, report
    assert "FAIL" not in report, report
    assert "OK " in report, report


def test_attention_specs_cover_the_model_shapes():
    """The registry names the kernels and shapes the model runs (Qwen2 D=128 with and without the
    MoT row index, SigLIP D=72), each with fwd, delta and bwd kernels."""
    specs, notes, errors = collect_specs(["bagel_kernels.attention_triton"])
    assert not errors and not notes
    names = {s[0].split(":", 1)[1] for s in specs}
    for tag in ("bf16_d128", "bf16_d128_ridx", "bf16_d72", "fp32_d128"):
        for kind in ("attn_fwd", "attn_bwd_delta", "attn_bwd"):
            assert f"{kind}_{tag}" in names
    for name, fn, sig, const, opts in specs:
        assert set(sig) == set(fn.arg_names), name
        assert {a for a, t in sig.items() if t == "constexpr"} == set(const), name
        assert opts.get("num_warps") in (4, 8), name


def test_failures_are_reported(tmp_path):
    """A kernel the GPU compiler rejects gives FAIL and a non-zero exit; good kernels still pass."""
    (tmp_path / "bk_broken_kernels.py").write_text(
        textwrap.dedent(
            """
            import triton
            import triton.language as tl

            @triton.jit
            def good(X, n, BLOCK: tl.constexpr):
                o = tl.arange(0, BLOCK)
                tl.store(X + o, tl.load(X + o, mask=o < n) * 2, mask=o < n)

            @triton.jit
            def bad(X, BLOCK: tl.constexpr):
                o = tl.arange(0, BLOCK)  # not a power of two below
                tl.store(X + o, tl.load(X + o))

            def sm90_compile_specs():
                return [
                    ("good", good, {"X": "*fp16", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 128}),
                    ("bad", bad, {"X": "*fp16", "BLOCK": "constexpr"}, {"BLOCK": 100}, {"num_warps": 4}),
                ]
            """
        )
    )
    proc = _run_check("--module", "bk_broken_kernels", extra_path=str(tmp_path), timeout=300)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 1, report
    assert "OK   bk_broken_kernels:good" in report, report
    assert "FAIL bk_broken_kernels:bad" in report, report


def test_missing_and_unregistered_modules_are_skipped():
    specs, notes, errors = collect_specs(["bagel_kernels.no_such_module", "bagel_kernels.reference"])
    assert specs == [] and errors == []
    assert any("no_such_module: module not found" in n for n in notes)
    assert any("reference: no sm90_compile_specs()" in n for n in notes)

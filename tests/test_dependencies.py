"""Dependencies fit their users: the kernels install and import with torch, triton and numpy alone; the
model layer, the demo, the tests and the benchmarks bring theirs as extras, and a missing one is named."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = ("transformers", "safetensors", "matplotlib", "peft", "hypothesis", "pytest", "tqdm")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _names(requirements) -> set[str]:
    return {
        r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip() for r in requirements
    }


def test_core_dependencies_hold_no_model_plotting_or_test_library():
    project = _pyproject()
    core = _names(project["dependencies"])
    assert core.isdisjoint(OPTIONAL), core & set(OPTIONAL)
    extras = {name: _names(reqs) for name, reqs in project["optional-dependencies"].items()}
    assert {"transformers", "safetensors"} <= extras["model"]
    assert {"bagel-kernels", "matplotlib"} <= extras["demo"]  # bagel-kernels[model]: the demo runs the model
    assert {"bagel-kernels", "pytest", "pytest-xdist", "hypothesis", "peft"} <= extras["test"]


def test_kernels_import_and_run_without_the_optional_libraries():
    """In a fresh interpreter where the optional libraries cannot be imported: every bagel_kernels module
    imports and an attention call runs; bagel.data.packing works; the model layer names the extra it needs."""
    code = textwrap.dedent(
        f"""
        import importlib, sys

        for name in {OPTIONAL!r}:
            sys.modules[name] = None  # what an environment without it gives: ModuleNotFoundError, no spec
        import torch
        import bagel_kernels
        for mod in ("mask", "attention", "mot", "reference", "testing", "patch_embed", "check"):
            importlib.import_module("bagel_kernels." + mod)
        mask = bagel_kernels.PackedMask.from_splits([5, 3], [2, 3, 3], ["causal", "full", "causal"])
        q = torch.randn(8, 2, 16)
        assert bagel_kernels.packed_attention(q, q, q, mask, backend="sdpa").shape == (8, 2, 16)
        import bagel.data.packing
        try:
            from bagel import BagelConfig
        except ModuleNotFoundError as exc:
            assert "bagel-kernels[model]" in str(exc), str(exc)
        else:
            raise AssertionError("bagel.model.config imported without transformers")
        loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.partition(".")[0] in {OPTIONAL!r})
        assert not loaded, loaded
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]

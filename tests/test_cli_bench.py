"""bagel-bench needs no source checkout: a wheel carries the benchmark scripts as data, and the command
finds them there when the package is not an editable install beside its benchmarks/ folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from bagel.cli import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_carries_the_benchmark_scripts(tmp_path):
    env = dict(os.environ, BAGEL_KERNELS_SKIP_EXT="1")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), REPO],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.rsplit("/", 1)[1] for n in names if "/data/share/bagel-kernels/benchmarks/" in n}
    wanted = {f"bench_{b}.py" for b in bench.CPU_BENCHES + bench.GPU_BENCHES} | {"common.py"}
    assert wanted <= shipped, wanted - shipped


def test_bench_finds_the_installed_copy_without_a_checkout(tmp_path, monkeypatch):
    installed = tmp_path / "share" / "bagel-kernels" / "benchmarks"
    shutil.copytree(os.path.join(REPO, "benchmarks"), installed)
    monkeypatch.setattr(bench, "bench_dirs", lambda: [str(tmp_path / "no-checkout"), str(installed)])
    assert bench.find_bench_dir() == str(installed)


def test_bench_without_scripts_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "bench_dirs", lambda: [str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(SystemExit) as exc:
        bench.find_bench_dir()
    assert exc.value.code == 2
    assert "reinstall bagel-kernels" in capsys.readouterr().err

"""The CPU benchmark and the bagel-bench driver run end to end (no timing is asserted)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_bench_mask_writes_table_and_plot(tmp_path):
    import bench_mask

    table = bench_mask.run(bench_mask_args(tmp_path))
    methods = {r[1] for r in table.rows}
    assert "PackedMask.from_splits + block tables" in methods
    assert "dense per-sample float masks" in methods
    assert all(not r[2].startswith("error") for r in table.rows)
    assert (tmp_path / "bench_mask.md").read_text().count("| 1024 |") == len(methods)
    assert (tmp_path / "bench_mask.png").exists()


def bench_mask_args(out):
    import argparse

    return argparse.Namespace(out=str(out), quick=True, device="cpu", no_compile=True, sizes="1024")


def test_bagel_bench_cli_unknown_benchmark():
    from bagel.cli import bench_main

    with pytest.raises(SystemExit):
        bench_main(["--only", "nonexistent"])

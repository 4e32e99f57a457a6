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
    from bagel.cli.bench import bench_main

    with pytest.raises(SystemExit):
        bench_main(["--only", "nonexistent"])


# ------------------------------------------------------------------------------------------ bench_model: FLOPs, MFU
def test_bagel_lm_flops_at_bagel_7b_shapes():
    """BAGEL's LM FLOP formula (upstream's train/pretrain_unified_navit.py) at BAGEL-7B-MoT shapes:
    6.525 B weights per token in the 28 decoder layers (Qwen2.5-7B's non-embedding count) plus the
    embedding and LM head, times 6; plus 12 * D * Hq * L per squared sample length."""
    import bench_model

    from bagel import BagelConfig

    c = BagelConfig.bagel_7b_mot().llm_config
    layers = 28 * (3 * 3584 * 18944 + 3584 * (3584 + 512 + 512 + 3584))
    assert layers == 6_525_288_448
    per_token = layers + 2 * 152064 * 3584
    flops = bench_model.bagel_lm_flops(c, 16000, [10000, 6000, 384])
    assert flops == 6 * per_token * 16000 + 12 * 128 * 28 * 28 * (10000**2 + 6000**2 + 384**2)
    # the published figures are self-consistent with upstream's H100 peak (989 TFLOP/s dense bf16)
    for _, tf, mfu in bench_model.PUBLISHED:
        assert abs(tf / 989.0 - mfu) < 0.0006


def test_bench_model_mfu_arithmetic_tiny():
    """The MFU run on a tiny CPU model (the same code as on the GPU): each row's model TFLOP/s is the
    formula's FLOPs over the measured step time, and MFU is that over the peak given."""
    import argparse

    import bench_model
    import torch

    from bagel import BagelConfig

    args = argparse.Namespace(tiny=True, mfu_layers="2", peak_tflops=1e-3, quick=True, out=None, mfu=True)
    bench_model.RECORDS.clear()
    table = bench_model.mfu_run(args, torch.device("cpu"), torch.float32)
    rows = [r for r in bench_model.RECORDS if r["table"] == "mfu"]
    assert {r["variant"] for r in rows} == {"ours (auto)", "upstream-equivalent"}
    cfg = BagelConfig.tiny(llm_layers=2, vit_layers=2).llm_config
    for r in rows:
        assert r["flops"] > 0 and r["ms"] > 0
        tflops = r["flops"] / (r["ms"] * 1e-3) / 1e12
        assert float(r["tflops"]) == pytest.approx(tflops, rel=1e-2)
        assert float(r["mfu"].rstrip("%")) == pytest.approx(100 * tflops / 1e-3, rel=1e-2)
        # independent count for the tiny LM: every term of the formula
        H, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, 2  # noqa: E741
        Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        D = H // Hq
        square = sum(n * n for n in r["sample_lens"])
        assert r["flops"] == 6 * (L * (3 * H * I + H * D * (2 * Hq + 2 * Hkv)) + 2 * V * H) * r["tokens"] + (
            12 * D * Hq * L * square
        )
    text = table.render()
    assert "official BAGEL (32xH100, published) | - | - | 176.9 | 17.9%" in text
    assert "Megatron-Bridge BAGEL (32xH100, published) | - | - | 234.3 | 23.7%" in text


def test_bench_attention_backends_option_rejects_unknown_names(capsys):
    import bench_attention

    with pytest.raises(SystemExit):
        bench_attention.main(["--backends", "triton,flash-4", "--out", "unused"])
    assert "unknown backend(s) ['flash-4']" in capsys.readouterr().err
    # the compiled baselines come last, so that their compiles cannot starve the other rows
    order = list(bench_attention.BACKENDS)
    assert max(order.index(b) for b in order if b not in bench_attention.COMPILED) < min(
        order.index(b) for b in bench_attention.COMPILED
    )

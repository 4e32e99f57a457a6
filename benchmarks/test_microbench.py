"""pytest-benchmark microbenchmarks of the CPU-capable ops (not part of the test suite's default paths).

    .venv/bin/python -m pytest benchmarks/test_microbench.py --benchmark-only [--benchmark-json out.json]

Each op is timed next to the path it replaces, on the same inputs, grouped so that pytest-benchmark's
table puts them side by side:

- mask:          PackedMask.from_splits + block tables vs upstream's per-sample dense float masks
                 (realistic 8k-token pack)
- attention:     per-sample SDPA (the CPU "auto" choice) on a 1k-token pack, forward
- mot-rms-norm / mot-linear / swiglu: the torch paths of the routed ops on contiguous expert slices
                 vs upstream-style gather/scatter per expert
- patch-embed:   the C++ extension's CPU kernel vs the unfused torch path (so400m patch shapes)
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from bench_mask import dense_per_sample  # noqa: E402

from bagel_kernels import PackedMask, mot, packed_attention  # noqa: E402
from bagel_kernels.reference import gather_scatter, qwen2_rms_norm  # noqa: E402
from bagel_kernels.testing import realistic_pack  # noqa: E402

pytest.importorskip("pytest_benchmark")


@pytest.fixture(scope="module")
def layout8k():
    return realistic_pack(8192, seed=1)


@pytest.mark.benchmark(group="mask")
def test_mask_packed(benchmark, layout8k):
    def build():
        m = PackedMask.from_splits(*layout8k.as_tuple())
        m.block_tables(128, 64)
        return m

    benchmark(build)


@pytest.mark.benchmark(group="mask")
def test_mask_dense_per_sample(benchmark, layout8k):
    benchmark(dense_per_sample, layout8k, torch.device("cpu"))


@pytest.mark.benchmark(group="attention")
def test_attention_sdpa_1k(benchmark):
    layout = realistic_pack(1024, seed=2)
    mask = PackedMask.from_splits(*layout.as_tuple())
    q = torch.randn(mask.total_len, 8, 64)
    k = v = torch.randn(mask.total_len, 2, 64)
    benchmark(packed_attention, q, k, v, mask, backend="sdpa")


def _routed(n=2048, h=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g)
    n_und = n // 2 + 37
    perm = torch.randperm(n, generator=g)
    und, gen = perm[:n_und].sort().values, perm[n_und:].sort().values
    return x, n_und, und, gen


@pytest.mark.benchmark(group="mot-rms-norm")
def test_rms_norm_grouped(benchmark):
    x, n_und, _, _ = _routed()
    w1, w2 = torch.rand(x.shape[1]), torch.rand(x.shape[1])
    benchmark(mot.mot_rms_norm, x, n_und, w1, w2, 1e-6, backend="torch")


@pytest.mark.benchmark(group="mot-rms-norm")
def test_rms_norm_gather_scatter(benchmark):
    x, _, und, gen = _routed()
    w1, w2 = torch.rand(x.shape[1]), torch.rand(x.shape[1])

    benchmark(gather_scatter, x, und, gen, lambda u: qwen2_rms_norm(u, w1), lambda v: qwen2_rms_norm(v, w2))


@pytest.mark.benchmark(group="mot-linear")
def test_linear_grouped(benchmark):
    x, n_und, _, _ = _routed()
    w1, w2 = torch.randn(768, x.shape[1]), torch.randn(768, x.shape[1])
    b1, b2 = torch.randn(768), torch.randn(768)
    benchmark(mot.mot_linear, x, n_und, w1, b1, w2, b2, backend="torch")


@pytest.mark.benchmark(group="mot-linear")
def test_linear_gather_scatter(benchmark):
    x, _, und, gen = _routed()
    w1, w2 = torch.randn(768, x.shape[1]), torch.randn(768, x.shape[1])
    b1, b2 = torch.randn(768), torch.randn(768)

    benchmark(gather_scatter, x, und, gen, lambda u: F.linear(u, w1, b1), lambda v: F.linear(v, w2, b2), 768)


@pytest.mark.benchmark(group="swiglu")
def test_swiglu(benchmark):
    g, u = torch.randn(2048, 1536), torch.randn(2048, 1536)
    benchmark(mot.swiglu, g, u, backend="torch")


@pytest.mark.benchmark(group="patch-embed")
@pytest.mark.parametrize("backend", ["cpu_ext", "torch"])
def test_patch_embed(benchmark, backend):
    from bagel_kernels import patch_embed as pe

    if backend == "cpu_ext" and not pe.extension_status().cpu:
        pytest.skip(f"CPU extension not built: {pe.extension_status().reason}")
    n, k, e = 1024, 3 * 14 * 14, 1152
    patches, w, b = torch.randn(n, k), torch.randn(e, k) / 24, torch.randn(e)
    table, ids = torch.randn(4900, e), torch.randint(0, 4900, (n,))
    benchmark(pe.fused_patch_embed, patches, w, b, table, ids, backend=backend)

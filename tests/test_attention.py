"""packed_attention with the reference backends (sdpa, flex) against a float64 dense reference."""

import random

import pytest
import torch

from bagel_kernels import PackedMask, available_backends, packed_attention
from bagel_kernels.attention import FLEX_BLOCK, flex_compiled, flex_kv_blocks
from bagel_kernels.reference import attention_reference
from bagel_kernels.testing import random_pack, tolerance

HAS_CUDA = torch.cuda.is_available()


def _inputs(T, hq, hkv, d, dtype, device="cpu", requires_grad=True):
    q = torch.randn(T, hq, d, dtype=dtype, device=device, requires_grad=requires_grad)
    k = torch.randn(T, hkv, d, dtype=dtype, device=device, requires_grad=requires_grad)
    v = torch.randn(T, hkv, d, dtype=dtype, device=device, requires_grad=requires_grad)
    return q, k, v


def _check(out, ref, dtype, direction):
    atol, rtol = tolerance(dtype, direction)
    torch.testing.assert_close(out.double(), ref.double(), atol=atol, rtol=rtol)


def _fwd_bwd(backend, q, k, v, mask, **kw):
    out = packed_attention(q, k, v, mask, backend=backend, **kw)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    return out, grads, g


def _reference(q, k, v, mask, g, **kw):
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(qd, kd, vd, mask, **kw)
    grads = torch.autograd.grad(ref, (qd, kd, vd), g.double())
    return ref, grads


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (7, 1)])
@pytest.mark.parametrize("d", [64, 72, 128])
def test_sdpa_matches_reference(hq, hkv, d):
    rng = random.Random(hq * 1000 + d)
    layout = random_pack(rng, 3, text=(1, 12), image=(1, 20), pad=rng.choice([None, 0, 5]))
    mask = PackedMask.from_splits(*layout.as_tuple())
    T = mask.total_len - (layout.sample_lens[-1] if layout.sample_kinds[-1] == "pad" else 0)
    q, k, v = _inputs(T, hq, hkv, d, torch.float32)
    out, grads, g = _fwd_bwd("sdpa", q, k, v, mask)
    ref, rgrads = _reference(q, k, v, mask, g)
    _check(out, ref, torch.float32, "fwd")
    for a, b in zip(grads, rgrads, strict=True):
        _check(a, b, torch.float32, "bwd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sdpa_low_precision(dtype):
    layout = random_pack(random.Random(3), 4)
    mask = PackedMask.from_splits(*layout.as_tuple())
    q, k, v = _inputs(mask.total_len, 4, 2, 64, dtype)
    out, grads, g = _fwd_bwd("sdpa", q, k, v, mask)
    ref, rgrads = _reference(q, k, v, mask, g)
    assert out.dtype == dtype
    _check(out, ref, dtype, "fwd")
    for a, b in zip(grads, rgrads, strict=True):
        _check(a, b, dtype, "bwd")


@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (4, 2, 72), (7, 1, 128)])
def test_flex_forward_matches_reference(hq, hkv, d):
    # FlexAttention has no CPU backward: gradients are checked in the GPU test below
    layout = random_pack(random.Random(d), 3, pad=4)
    mask = PackedMask.from_splits(*layout.as_tuple())
    T = mask.total_len - 4
    q, k, v = _inputs(T, hq, hkv, d, torch.float32, requires_grad=False)
    out = packed_attention(q, k, v, mask, backend="flex", softmax_scale=0.3)
    ref = attention_reference(q, k, v, mask, softmax_scale=0.3)
    _check(out, ref, torch.float32, "fwd")


def _multi_block_mask(seed: int, pad: int = 0) -> PackedMask:
    """A pack spanning several 128-token FlexAttention blocks, with images long enough to give full
    tiles (full and noise splits of 130-300 tokens) next to partial and empty ones."""
    layout = random_pack(random.Random(seed), 4, text=(1, 60), image=(130, 300), pad=pad or None)
    return PackedMask.from_splits(*layout.as_tuple())


@pytest.mark.parametrize("seed", [0, 1])
def test_flex_kv_blocks_classify_every_tile(seed):
    """The BlockMask tables read off the mask's tile tables classify every 128x128 tile as the dense
    mask does: full iff all its pairs are visible, partial iff some but not all are, else unlisted."""
    mask = _multi_block_mask(seed)
    B = FLEX_BLOCK
    kv_num, kv_idx, full_num, full_idx = flex_kv_blocks(mask)
    dense = mask.to_dense()
    nb = -(-mask.total_len // B)
    assert kv_num.shape == (1, 1, nb) and kv_idx.shape == (1, 1, nb, nb) and full_idx.shape == (1, 1, nb, nb)
    n_full = 0
    for m in range(nb):
        part = set(kv_idx[0, 0, m, : kv_num[0, 0, m]].tolist())
        full = set(full_idx[0, 0, m, : full_num[0, 0, m]].tolist())
        n_full += len(full)
        assert not part & full
        for n in range(nb):
            tile = dense[m * B : (m + 1) * B, n * B : (n + 1) * B]
            if bool(tile.all()):
                # a tile cut by the end of the pack may stay partial (its padding is masked)
                assert n in (full if tile.shape == (B, B) else part | full), (m, n)
            elif bool(tile.any()):
                assert n in part, (m, n)
            else:
                assert n not in part | full, (m, n)
    assert n_full > 0  # the pack exercises full tiles


def test_flex_forward_multi_block_pack():
    mask = _multi_block_mask(2, pad=9)
    T = mask.total_len - 9
    q, k, v = _inputs(T, 4, 2, 32, torch.float32, requires_grad=False)
    out = packed_attention(q, k, v, mask, backend="flex")
    _check(out, attention_reference(q, k, v, mask), torch.float32, "fwd")


@pytest.mark.slow
def test_flex_compiled_once_for_every_pack_length():
    """The compiled flex call (what the backend runs on CUDA) traces one graph for a stream of packs
    of different lengths: no recompilation, so no fall back to eager flex after the recompile limit.
    Run here on CPU, forward only (FlexAttention has no CPU backward)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fn = flex_compiled()
    for seed in (3, 4, 5):
        mask = _multi_block_mask(seed)
        q, k, v = _inputs(mask.total_len, 4, 2, 32, torch.float32, requires_grad=False)
        out = fn(
            *(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)),
            mask.kv_lo,
            mask.kv_hi,
            *flex_kv_blocks(mask),
            0.2,
            True,
        )[0].transpose(0, 1)
        _check(out, attention_reference(q, k, v, mask, softmax_scale=0.2), torch.float32, "fwd")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_dead_rows_are_zero_with_zero_grads():
    m = torch.zeros(4, 4, dtype=torch.bool)
    m[1, 0] = m[2, 0] = m[2, 2] = m[3, 3] = True  # row 0 sees nothing
    mask = PackedMask.from_dense([m])
    q, k, v = _inputs(4, 2, 2, 16, torch.float32)
    out, grads, g = _fwd_bwd("sdpa", q, k, v, mask)
    assert torch.isfinite(out).all() and torch.all(out[0] == 0)
    assert torch.all(grads[0][0] == 0)
    ref, rgrads = _reference(q, k, v, mask, g)
    _check(out, ref, torch.float32, "fwd")
    for a, b in zip(grads, rgrads, strict=True):
        _check(a, b, torch.float32, "bwd")
    fout = packed_attention(q.detach(), k.detach(), v.detach(), mask, backend="flex")
    _check(fout, ref, torch.float32, "fwd")


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_row_index_permutation(backend):
    layout = random_pack(random.Random(11), 3)
    mask = PackedMask.from_splits(*layout.as_tuple())
    T = mask.total_len
    q, k, v = _inputs(T, 4, 2, 32, torch.float32, requires_grad=False)
    inv = torch.randperm(T)  # token i lives at row inv[i]
    grouped = [torch.empty_like(t) for t in (q, k, v)]
    for src, dst in zip((q, k, v), grouped, strict=True):
        dst[inv] = src
    out = packed_attention(*grouped, mask.with_row_index(inv), backend=backend)
    ref = attention_reference(q, k, v, mask)
    _check(out[inv], ref, torch.float32, "fwd")


def test_auto_picks_an_available_backend_and_validates():
    mask = PackedMask.from_splits([6], [6], ["causal"])
    q, k, v = _inputs(6, 2, 1, 16, torch.float32, requires_grad=False)
    out = packed_attention(q, k, v, mask)
    _check(out, attention_reference(q, k, v, mask), torch.float32, "fwd")
    assert available_backends("cpu")[0] == "sdpa"


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, k, v, m: (q[:, :3], k, v, m), "multiple of key/value heads"),
        (lambda q, k, v, m: (q, k[:5], v[:5], m), "k/v have 5 tokens"),
        (lambda q, k, v, m: (q.half(), k, v, m), "dtypes differ"),
        (lambda q, k, v, m: (q[..., :8], k, v, m), "head dim"),
        (lambda q, k, v, m: (q[0], k, v, m), "must be \\[T, heads, head_dim\\]"),
        (lambda q, k, v, m: (q.int(), k.int(), v.int(), m), "dtype"),
        (lambda q, k, v, m: (q, k, v, m.kv_lo), "PackedMask"),
        (lambda q, k, v, m: (torch.cat([q, q]), torch.cat([k, k]), torch.cat([v, v]), m), "covers only"),
        (lambda q, k, v, m: (q[:3], k[:3], v[:3], m), "cuts the pack"),
    ],
)
def test_validation_errors(mutate, match):
    mask = PackedMask.from_splits([6], [1, 5], ["causal", "full"])
    q, k, v = _inputs(6, 4, 2, 16, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match=match):
        packed_attention(*mutate(q, k, v, mask))


def test_unknown_backend_and_large_head_dim():
    mask = PackedMask.from_splits([3], [3], ["causal"])
    q, k, v = _inputs(3, 1, 1, 16, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="unknown attention backend"):
        packed_attention(q, k, v, mask, backend="xformers")
    q, k, v = _inputs(3, 1, 1, 264, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="head dim 264"):
        packed_attention(q, k, v, mask)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flex_and_sdpa_gpu_gradients(dtype):
    layout = random_pack(random.Random(7), 6, text=(1, 100), image=(1, 300), pad=17)
    mask = PackedMask.from_splits(*layout.as_tuple(), device="cuda")
    T = mask.total_len - 17
    for backend in ("sdpa", "flex"):
        q, k, v = _inputs(T, 8, 2, 128, dtype, device="cuda")
        out, grads, g = _fwd_bwd(backend, q, k, v, mask)
        ref, rgrads = _reference(q, k, v, mask, g)
        _check(out, ref, dtype, "fwd")
        for a, b in zip(grads, rgrads, strict=True):
            _check(a, b, dtype, "bwd")


# ------------------------------------------------------------------------------ edges (issue 13)
EDGE_BACKENDS = ["sdpa", "flex", "triton"]  # triton runs under the interpreter here (conftest)


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("total", [0, 5], ids=["empty_mask", "all_pad"])
def test_zero_tokens_give_an_empty_output_on_every_backend(backend, total):
    """T = 0: every backend returns ``[0, Hq, D]`` and a backward runs (flex on CPU: forward only)."""
    mask = PackedMask.from_splits([0, total], [0, total], ["causal", "causal"])
    grad = backend != "flex" or HAS_CUDA
    q, k, v = _inputs(0, 4, 2, 16, torch.float32, requires_grad=grad)
    out = packed_attention(q, k, v, mask, backend=backend)
    assert out.shape == (0, 4, 16) and out.dtype == torch.float32
    if grad:
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), -0.5, "0.1", True])
def test_bad_softmax_scale_is_refused_alike(backend, scale):
    mask = PackedMask.from_splits([6], [6], ["causal"])
    q, k, v = _inputs(6, 2, 2, 16, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="softmax_scale must be"):
        packed_attention(q, k, v, mask, softmax_scale=scale, backend=backend)


def test_nonfinite_v_stays_in_its_sample_on_sdpa():
    """What the packed_attention docstring states: with the per-sample sdpa backend a NaN in one
    sample's V reaches no row of another sample (triton/flex may spread it within a shared tile)."""
    mask = PackedMask.from_splits([5, 7], [5, 7], ["causal", "full"])
    q, k, v = _inputs(12, 2, 2, 16, torch.float32, requires_grad=False)
    v = v.clone()
    v[2, 0, 3] = float("nan")
    out = packed_attention(q, k, v, mask, backend="sdpa")
    assert torch.isnan(out[:5]).any() and torch.isfinite(out[5:]).all()

"""Triton packed attention (kernels in ``bagel_kernels.attention_triton``, ops and
``triton_packed_attention`` in ``bagel_kernels.attention_triton``) against the float64 dense reference.

CPU: the kernels run under TRITON_INTERPRET=1 (set by conftest) in fp32 and fp16 on packs of a few
hundred tokens, with the interpreter tile config (fwd 64x32, dK/dV 32x64, dQ 64x32: different on
purpose) and a few other tile shapes. GPU (``@pytest.mark.gpu``): bf16, 16k/64k packs, int64 offsets.
Tolerances: ``bagel_kernels.testing.tolerance`` (one table per dtype and direction).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from bagel_kernels import PackedMask, packed_attention
from bagel_kernels.attention_configs import AttnConfig, Blocks
from bagel_kernels.attention_triton import (
    KernelArgs,
    default_config,
    launch_bwd,
    launch_fwd,
    op_params,
    packed_attention_bwd,
    packed_attention_fwd,
    prepare_mask,
    triton_packed_attention,
)
from bagel_kernels.reference import attention_reference
from bagel_kernels.testing import random_pack, realistic_pack, tolerance

CPU_DTYPES = [torch.float32, torch.float16]


def _square_tiles(b: int, **fields) -> AttnConfig:
    """Every tile (forward, dK/dV, dQ) ``b x b``; ``fields`` set the others."""
    return AttnConfig(**dict.fromkeys(Blocks._fields, b), **fields)


# ------------------------------------------------------------------------------------------ helpers
def _make_qkv(n, hq, hkv, d, dtype, device="cpu", *, nan_pad=False, layout="contiguous"):
    """Random q, k, v (leaf tensors with grad). ``nan_pad``: views into NaN-filled buffers with extra
    rows beyond ``n`` and extra columns beyond ``d``, so a stray read shows up as NaN.
    ``layout="heads_first"``: q/k/v are [H, N, D] buffers transposed to [N, H, D]."""
    out = []
    for h in (hq, hkv, hkv):
        val = torch.randn(n, h, d, device=device).to(dtype)
        if nan_pad:
            buf = torch.full((n + 7, h, d + 8), float("nan"), device=device, dtype=dtype)
            buf[:n, :, :d] = val
            t = buf[:n, :, :d]
        elif layout == "heads_first":
            t = val.transpose(0, 1).contiguous().transpose(0, 1)
        else:
            t = val
        out.append(t.requires_grad_())
    return out


def _reference(q, k, v, mask, scale=None, grad_out=None):
    """float64 output and (dq, dk, dv) of the dense reference for grad_out."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, mask, softmax_scale=scale)
    ref.backward(grad_out.double())
    return ref.detach(), (q64.grad, k64.grad, v64.grad)


def _close(actual, expected, dtype, direction, what):
    atol, rtol = tolerance(dtype, direction)
    assert not torch.isnan(actual).any(), f"{what}: NaN in the result"
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def _check_against_reference(q, k, v, mask, dtype, *, scale=None, config=None, seed=0):
    """Forward and all three gradients of the Triton kernels vs the float64 reference."""
    out = triton_packed_attention(q, k, v, mask, scale, config=config)
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    ref, (rdq, rdk, rdv) = _reference(q, k, v, mask, scale, grad_out)
    _close(out, ref, dtype, "fwd", "out")
    _close(dq, rdq, dtype, "bwd", "dq")
    _close(dk, rdk, dtype, "bwd", "dk")
    _close(dv, rdv, dtype, "bwd", "dv")
    return out, (dq, dk, dv)


def _mask(layout) -> PackedMask:
    return PackedMask.from_splits(*layout.as_tuple())


# ------------------------------------------------------------------------------------------ random packs
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_packs(dtype, seed):
    rng = random.Random(seed)
    mask = _mask(random_pack(rng, rng.randint(2, 6), text=(1, 40), image=(1, 60)))
    q, k, v = _make_qkv(mask.total_len, 4, 2, 64, dtype)
    _check_against_reference(q, k, v, mask, dtype, seed=seed)


@pytest.mark.parametrize(
    "hq,hkv,d",
    [(3, 3, 32), (4, 2, 32), (7, 1, 32), (2, 1, 64), (2, 1, 72), (2, 2, 128)],
    ids=["gqa1", "gqa2", "gqa7", "d64", "d72", "d128"],
)
def test_gqa_and_head_dims(hq, hkv, d):
    rng = random.Random(10 + d + hq)
    mask = _mask(random_pack(rng, 3, text=(1, 30), image=(1, 40)))
    q, k, v = _make_qkv(mask.total_len, hq, hkv, d, torch.float32)
    _check_against_reference(q, k, v, mask, torch.float32)


@pytest.mark.parametrize(
    "config",
    [
        _square_tiles(16),
        AttnConfig(block_m=32, block_n=64, block_m1=64, block_n1=32, block_m2=32, block_n2=64),
        _square_tiles(128),
    ],
    ids=["16x16", "swapped", "one-block"],
)
def test_tile_shapes(config):
    """Other tile shapes, incl. tiles larger than the pack (every row in one partial block)."""
    rng = random.Random(5)
    mask = _mask(random_pack(rng, 4, text=(1, 20), image=(1, 30)))
    q, k, v = _make_qkv(mask.total_len, 2, 1, 16, torch.float32)
    _check_against_reference(q, k, v, mask, torch.float32, config=config)


def test_mid_size_pack_fp16_gqa7_d72():
    """A ~300-400 token pack of edit/interleaved samples with the SigLIP head dim and GQA 7."""
    rng = random.Random(21)
    mask = _mask(random_pack(rng, 3, kinds=("edit", "interleaved"), text=(1, 30), image=(10, 50)))
    assert 150 <= mask.total_len <= 600
    q, k, v = _make_qkv(mask.total_len, 7, 1, 72, torch.float16)
    _check_against_reference(q, k, v, mask, torch.float16)


def test_bf16_under_interpreter():
    """bf16 is loaded and upcast at once, so even the interpreter computes it right."""
    mask = _mask(random_pack(random.Random(7), 3, text=(1, 30), image=(1, 40)))
    q, k, v = _make_qkv(mask.total_len, 2, 1, 32, torch.bfloat16)
    _check_against_reference(q, k, v, mask, torch.bfloat16)


def test_gpu_code_path_under_interpreter(monkeypatch):
    """The GPU branches (fp16 operands straight into tl.dot, P and dS cast to fp16 before their
    dots) run here too: fp16 matmuls are right in the interpreter, unlike bf16."""
    import bagel_kernels.attention_triton as at

    monkeypatch.setattr(at, "_kernel_flags", lambda q: {"LOWP_DOT": True, "DOT_PREC": "tf32"})
    mask = _mask(random_pack(random.Random(22), 4, text=(1, 30), image=(1, 50)))
    q, k, v = _make_qkv(mask.total_len, 4, 2, 64, torch.float16)
    _check_against_reference(q, k, v, mask, torch.float16)


# ------------------------------------------------------------------------------------------ edge cases
EDGE_LAYOUTS = {
    # one-token splits of every mode, including back-to-back noise splits
    "one_token_splits": (
        [9, 4],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [
            "causal",
            "full",
            "noise",
            "noise",
            "causal",
            "full",
            "full",
            "noise",
            "causal",
            "noise",
            "full",
            "causal",
            "noise",
        ],
    ),
    # a single sample of 97 tokens (not a multiple of any tile)
    "single_sample": ([97], [20, 40, 2, 35], ["causal", "full", "causal", "noise"]),
    # every sample is one noise image (a row of a noise split sees only its split)
    "all_noise": ([30, 45, 22], [30, 45, 22], ["noise", "noise", "noise"]),
    # one full image covering the pack: every tile full
    "all_full": ([70], [70], ["full"]),
    # plain causal text samples
    "text_only": ([33, 1, 64], [33, 1, 64], ["causal", "causal", "causal"]),
}


@pytest.mark.parametrize("name", list(EDGE_LAYOUTS))
def test_edge_layouts(name):
    sample_lens, split_lens, modes = EDGE_LAYOUTS[name]
    mask = PackedMask.from_splits(sample_lens, split_lens, modes)
    q, k, v = _make_qkv(mask.total_len, 2, 1, 32, torch.float32)
    _check_against_reference(q, k, v, mask, torch.float32)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_pad_sample_truncated(dtype):
    """T < total_len (flex-style pad sample): the dispatcher truncates, we see only T rows."""
    layout = random_pack(random.Random(11), 3, text=(1, 30), image=(1, 40), pad=23)
    mask = _mask(layout)
    T = mask.total_len - 23
    q, k, v = _make_qkv(T, 4, 2, 32, dtype)
    out = packed_attention(q, k, v, mask, backend="triton")
    grad_out = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    ref, (rdq, rdk, rdv) = _reference(q, k, v, mask, None, grad_out)
    _close(out, ref, dtype, "fwd", "out")
    for a, b, n in ((dq, rdq, "dq"), (dk, rdk, "dk"), (dv, rdv, "dv")):
        _close(a, b, dtype, "bwd", n)


def test_dead_rows_from_dense():
    """Rows that see no key (strictly causal nested masks): zero output, zero gradients, no NaN."""
    lens = [6, 9, 5]
    masks = [torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=-1) for n in lens]
    masks[1][:, :] = masks[1] | torch.eye(9, dtype=torch.bool)  # this sample has no dead row
    mask = PackedMask.from_dense(masks)
    q, k, v = _make_qkv(mask.total_len, 2, 1, 16, torch.float32)
    out, (dq, _, _) = _check_against_reference(q, k, v, mask, torch.float32, config=_square_tiles(16))
    dead = [0, 15]  # first rows of samples 0 and 2
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))
    assert torch.equal(dq[dead], torch.zeros_like(dq[dead]))


def test_nan_padded_inputs():
    """q/k/v are views into NaN-filled buffers (rows beyond T, columns beyond D): no stray read."""
    mask = _mask(random_pack(random.Random(12), 3, text=(1, 30), image=(1, 40)))
    q, k, v = _make_qkv(mask.total_len, 2, 1, 40, torch.float32, nan_pad=True)
    _check_against_reference(q, k, v, mask, torch.float32)


def test_non_contiguous_inputs():
    """Heads-first buffers seen as [N, H, D], and a head dim with stride 2 (copied by the launcher)."""
    mask = _mask(random_pack(random.Random(13), 3, text=(1, 30), image=(1, 40)))
    n = mask.total_len
    q, _, v = _make_qkv(n, 4, 2, 32, torch.float32, layout="heads_first")
    k = torch.randn(n, 2, 64)[..., ::2].requires_grad_()
    assert not q.is_contiguous() and k.stride(-1) == 2
    _check_against_reference(q, k, v, mask, torch.float32)


def test_nan_filled_output_buffers():
    """The launchers write every element of out, lse, dq, dk, dv (NaN-filled before)."""
    mask = _mask(random_pack(random.Random(14), 4, text=(1, 30), image=(1, 40)))
    n, hq, hkv, d = mask.total_len, 4, 2, 24
    cfg = default_config("cpu", torch.float32, d)
    fwd_t, bwd_t = prepare_mask(mask, cfg)
    q, k, v = (t.detach() for t in _make_qkv(n, hq, hkv, d, torch.float32))
    out = torch.full((n, hq, d), float("nan"))
    lse = torch.full((hq, n), float("nan"))
    args = KernelArgs(mask.kv_lo, mask.kv_hi, None, fwd_t, d**-0.5, cfg.blocks(), cfg.launch())
    launch_fwd(q, k, v, out, lse, args)
    assert not out.isnan().any() and not lse.isnan().any()
    do = torch.randn(n, hq, d)
    grads = [torch.full(t.shape, float("nan")) for t in (q, k, v)]
    launch_bwd(do, q, k, v, out, lse, *grads, args._replace(tables=bwd_t))
    for gr in grads:
        assert not gr.isnan().any()
    ref, rgrads = _reference(q, k, v, mask, None, do)
    _close(out, ref, torch.float32, "fwd", "out")
    for a, b in zip(grads, rgrads, strict=True):
        _close(a, b, torch.float32, "bwd", "grad")


@pytest.mark.parametrize("scale", [0.37, 0.0, 2.5])
def test_softmax_scale(scale):
    mask = _mask(random_pack(random.Random(15), 3, text=(1, 30), image=(1, 40)))
    q, k, v = _make_qkv(mask.total_len, 2, 2, 32, torch.float32)
    _check_against_reference(q, k, v, mask, torch.float32, scale=scale)


def test_row_index_permutation():
    """Rows addressed through mask.row_index equal the un-permuted result, moved to row_index[i]."""
    mask = _mask(random_pack(random.Random(16), 4, text=(1, 30), image=(1, 40)))
    n = mask.total_len
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    pmask = mask.with_row_index(perm.to(torch.int32))
    q, k, v = _make_qkv(n, 4, 2, 32, torch.float32)
    out = triton_packed_attention(q, k, v, mask)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    def scatter(t):  # token i -> row perm[i]
        return torch.empty_like(t).index_copy(0, perm, t)

    qp, kp, vp = (scatter(t.detach()).requires_grad_() for t in (q, k, v))
    out_p = packed_attention(qp, kp, vp, pmask, backend="triton")
    grads_p = torch.autograd.grad(out_p, (qp, kp, vp), scatter(grad_out))
    atol, rtol = tolerance(torch.float32, "fwd")
    torch.testing.assert_close(out_p[perm], out, atol=atol, rtol=rtol)
    atol, rtol = tolerance(torch.float32, "bwd")
    for a, b in zip(grads_p, grads, strict=True):
        torch.testing.assert_close(a[perm], b, atol=atol, rtol=rtol)


def test_deterministic_bit_identical():
    mask = _mask(random_pack(random.Random(17), 4, text=(1, 30), image=(1, 40)))
    q, k, v = _make_qkv(mask.total_len, 4, 1, 32, torch.float16)
    grad_out = torch.randn(mask.total_len, 4, 32).half()
    runs = []
    for _ in range(2):
        out = packed_attention(q, k, v, mask, backend="triton", deterministic=True)
        runs.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_sum_backward_stride0_grad():
    """``out.sum().backward()`` hands the backward an expanded (stride 0) gradient."""
    mask = _mask(random_pack(random.Random(18), 3, text=(1, 30), image=(1, 40)))
    q, k, v = _make_qkv(mask.total_len, 2, 1, 32, torch.float32)
    triton_packed_attention(q, k, v, mask).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    attention_reference(q64, k64, v64, mask).sum().backward()
    for a, b in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        _close(a, b, torch.float32, "bwd", "grad of sum")


def test_empty_pack():
    mask = PackedMask.from_splits([0], [0], ["causal"])
    q, k, v = _make_qkv(0, 2, 1, 16, torch.float32)
    out = triton_packed_attention(q, k, v, mask)
    assert out.shape == (0, 2, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape


# ------------------------------------------------------------------------------------------ one-pass backward
ONEPASS = AttnConfig(onepass=1)


def _backward_paths(monkeypatch) -> list[bool]:
    """Records the ``onepass`` flag of every backward launch."""
    import bagel_kernels.attention_triton as at

    seen, launch = [], at.launch_bwd

    def spy(*args):
        seen.append(bool(args[-1].onepass))  # the KernelArgs
        return launch(*args)

    monkeypatch.setattr(at, "launch_bwd", spy)
    return seen


def test_backward_choice(monkeypatch):
    """The built-in default stays the two-program backward for every call until a GPU measurement
    flips it (``ONEPASS_DEFAULT``); ``onepass=1`` selects the one-pass backward for
    ``deterministic=False`` only: ``deterministic=True`` never runs the atomic path."""
    from bagel_kernels import attention_configs as ac

    assert ac.ONEPASS_DEFAULT == 0 and default_config("cpu", torch.float32, 64).onepass == 0
    for arch, fp32, d in ((90, False, 128), (90, False, 72), (80, False, 128), (90, True, 64)):
        assert ac.default_for(arch, fp32, d).onepass == 0
    seen = _backward_paths(monkeypatch)
    mask = _mask(random_pack(random.Random(30), 2, text=(1, 20), image=(1, 20)))
    q, k, v = _make_qkv(mask.total_len, 2, 1, 16, torch.float32)
    for cfg, det in ((None, False), (None, True), (ONEPASS, True), (ONEPASS, False)):
        triton_packed_attention(q, k, v, mask, deterministic=det, config=cfg).sum().backward()
    assert seen == [False, False, False, True]
    packed_attention(q, k, v, mask, backend="triton", deterministic=False).sum().backward()
    assert seen[-1] is False


@pytest.mark.parametrize(
    "dtype,hq,hkv,d,ridx",
    [
        (torch.float32, 4, 2, 64, False),
        (torch.float16, 4, 2, 64, True),
        (torch.float32, 3, 3, 32, True),
        (torch.float16, 7, 1, 72, False),
        (torch.float32, 7, 1, 96, True),
    ],
    ids=["fp32-gqa2", "fp16-gqa2-ridx", "fp32-gqa1-ridx", "fp16-gqa7-d72", "fp32-gqa7-d96-ridx"],
)
def test_onepass_backward(dtype, hq, hkv, d, ridx):
    """The one-pass backward (dQ summed by fp32 atomics from the dK/dV programs) against float64.
    Under the interpreter the programs run one after another, so the atomic additions cannot race
    here: these tests check its arithmetic (tiles, GQA groups, row index, masks, split head dims),
    not its behaviour under contention, which only a GPU shows."""
    rng = random.Random(40 + d + hq)
    mask = _mask(random_pack(rng, 3, text=(1, 30), image=(1, 40)))
    q, k, v = _make_qkv(mask.total_len, hq, hkv, d, dtype)
    if not ridx:
        _check_against_reference(q, k, v, mask, dtype, config=ONEPASS)
        return
    n = mask.total_len
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(d))
    pmask = mask.with_row_index(perm.to(torch.int32))

    def scatter(t):  # token i -> row perm[i]
        return torch.empty_like(t).index_copy(0, perm, t)

    qp, kp, vp = (scatter(t.detach()).requires_grad_() for t in (q, k, v))
    out_p = triton_packed_attention(qp, kp, vp, pmask, config=ONEPASS)
    grad_out = torch.randn(out_p.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads_p = torch.autograd.grad(out_p, (qp, kp, vp), scatter(grad_out))
    ref, rgrads = _reference(q, k, v, mask, None, grad_out)
    _close(out_p[perm], ref, dtype, "fwd", "out")
    for a, b, name in zip(grads_p, rgrads, ("dq", "dk", "dv"), strict=True):
        _close(a[perm], b, dtype, "bwd", name)


@pytest.mark.parametrize("name", list(EDGE_LAYOUTS))
def test_onepass_edge_layouts(name):
    """Every mask kind (one-token splits of every mode, all-noise, all-full, plain causal, a sample
    that is no multiple of a tile) through the one-pass backward."""
    sample_lens, split_lens, modes = EDGE_LAYOUTS[name]
    mask = PackedMask.from_splits(sample_lens, split_lens, modes)
    q, k, v = _make_qkv(mask.total_len, 2, 1, 32, torch.float32)
    _check_against_reference(q, k, v, mask, torch.float32, config=ONEPASS)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_onepass_pad_sample_truncated(dtype):
    """T < total_len (the pad sample): the mask truncated to the T tokens present."""
    layout = random_pack(random.Random(31), 3, text=(1, 30), image=(1, 40), pad=17)
    mask = _mask(layout).truncated(_mask(layout).total_len - 17)
    q, k, v = _make_qkv(mask.total_len, 4, 2, 32, dtype)
    _check_against_reference(q, k, v, mask, dtype, config=ONEPASS)


def test_onepass_dead_rows_nan_views_and_zero_scale():
    """Rows that see no key get zero dq; q/k/v as views into NaN-filled buffers (split head dim 40 =
    32 + 16, the pad columns NaN) read nothing stray; scale 0 gives dq = dk = 0 exactly."""
    lens = [6, 9, 5]
    masks = [torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=-1) for n in lens]
    mask = PackedMask.from_dense(masks)
    q, k, v = _make_qkv(mask.total_len, 2, 1, 40, torch.float32, nan_pad=True)
    cfg = dataclasses.replace(ONEPASS, onepass_block_m=16, onepass_block_n=16)
    out, (dq, _, _) = _check_against_reference(q, k, v, mask, torch.float32, config=cfg)
    assert torch.equal(dq[[0, 15]], torch.zeros_like(dq[[0, 15]]))
    _, (dq, dk, _) = _check_against_reference(q, k, v, mask, torch.float32, scale=0.0, config=cfg)
    assert not dq.any() and not dk.any()


def test_onepass_nan_filled_output_buffers():
    """The one-pass launcher writes every element of dq, dk, dv (NaN-filled before), the fp32 dQ
    accumulator included (zeroed by the delta kernel, NaN would survive otherwise)."""
    mask = _mask(random_pack(random.Random(32), 4, text=(1, 30), image=(1, 40)))
    n, hq, hkv, d = mask.total_len, 4, 2, 24
    blocks, launch = op_params(ONEPASS, True)
    fwd_t, bwd_t = prepare_mask(mask, ONEPASS, True)
    q, k, v = (t.detach() for t in _make_qkv(n, hq, hkv, d, torch.float32))
    out, lse = torch.empty(n, hq, d), torch.empty(hq, n)
    args = KernelArgs(mask.kv_lo, mask.kv_hi, None, fwd_t, d**-0.5, blocks, launch)
    launch_fwd(q, k, v, out, lse, args)
    do = torch.randn(n, hq, d)
    grads = [torch.full(t.shape, float("nan")) for t in (q, k, v)]
    real_empty = torch.empty

    def nan_empty(*shape, **kw):  # the accumulator, and every other scratch tensor, starts as NaN
        t = real_empty(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    import bagel_kernels.attention_triton as at

    at.torch.empty = nan_empty
    try:
        launch_bwd(do, q, k, v, out, lse, *grads, args._replace(tables=bwd_t, onepass=True))
    finally:
        at.torch.empty = real_empty
    for gr in grads:
        assert not gr.isnan().any()
    _, rgrads = _reference(q, k, v, mask, None, do)
    for a, b in zip(grads, rgrads, strict=True):
        _close(a, b, torch.float32, "bwd", "grad")


@pytest.mark.parametrize("dq_trans", [True, False], ids=["dqT-wgmma-form", "dsk-mma-form"])
def test_onepass_gpu_code_path_under_interpreter(monkeypatch, dq_trans):
    """fp16 operands straight into tl.dot (the GPU branch), with both forms of the dQ product: dQ^T =
    K^T dS^T (sm_90) and dS K (sm_80)."""
    import bagel_kernels.attention_triton as at

    monkeypatch.setattr(at, "_kernel_flags", lambda q: {"LOWP_DOT": True, "DOT_PREC": "tf32"})
    monkeypatch.setattr(at, "_dq_transposed", lambda q: dq_trans)
    mask = _mask(random_pack(random.Random(37), 4, text=(1, 20), image=(1, 40)))  # 142 tokens
    q, k, v = _make_qkv(mask.total_len, 2, 1, 72, torch.float16)
    _check_against_reference(q, k, v, mask, torch.float16, config=ONEPASS)


# ------------------------------------------------------------------------------------------ head-dim split
def test_dim_split_widths():
    """Non-power-of-two head dims run as a power-of-two block plus a padded remainder when that is
    narrower than padding: at most 80/72 of the useful MMA work for SigLIP's 72."""
    from bagel_kernels.attention_configs import dim_split

    assert dim_split(72) == (64, 16) and sum(dim_split(72)) / 72 <= 80 / 72
    assert dim_split(80) == (64, 16) and dim_split(96) == (64, 32) and dim_split(40) == (32, 16)
    assert dim_split(136) == (128, 16) and dim_split(48) == (32, 16)
    for d in (16, 24, 32, 64, 100, 128, 200, 256, 1, 8):  # nothing to save
        assert dim_split(d) == (max(16, 1 << (d - 1).bit_length()), 0)
    assert dim_split(72, split=False) == (128, 0)
    for d in range(1, 257):
        a, b = dim_split(d)
        assert a + b >= d and a >= 16 and (b == 0 or b >= 16) and not a & (a - 1) and not b & (b - 1)


@pytest.mark.parametrize(
    "d,dtype,split",
    [(96, torch.float16, 1), (80, torch.float32, 1), (72, torch.float32, 0), (72, torch.float16, 0)],
    ids=["d96-fp16", "d80-fp32", "d72-fp32-padded", "d72-fp16-padded"],
)
def test_split_and_padded_head_dims(d, dtype, split):
    """Other split sizes (96 = 64 + 32, 80 = 64 + 16), and the padded layout (``dsplit=0``, the kernels
    before the split), forward and both backwards against float64."""
    mask = _mask(random_pack(random.Random(37), 4, text=(1, 20), image=(1, 40)))  # 142 tokens
    q, k, v = _make_qkv(mask.total_len, 2, 1, d, dtype)
    _check_against_reference(q, k, v, mask, dtype, config=AttnConfig(dsplit=split))
    if split:
        _check_against_reference(q, k, v, mask, dtype, config=AttnConfig(dsplit=split, onepass=1))


# ------------------------------------------------------------------------------------------ TMA
@pytest.mark.parametrize("d,dtype", [(72, torch.float32), (64, torch.float16)], ids=["d72-fp32", "d64-fp16"])
def test_tma_forward_under_interpreter(d, dtype):
    """``tma=1``: the forward reads K/V through tensor descriptors (two per tensor for a split head
    dim); views into NaN-filled buffers check that rows >= N and columns >= D come back as zeros.
    With a row index the launcher falls back to pointer loads."""
    from bagel_kernels.attention_triton import stride_align, tma_usable

    mask = _mask(random_pack(random.Random(60 + d), 3, text=(1, 30), image=(1, 40)))
    q, k, v = _make_qkv(mask.total_len, 4, 2, d, dtype, nan_pad=True)
    assert tma_usable(q, k, v, None, stride_align((k, v)))
    assert not tma_usable(q, k, v, mask.kv_lo, stride_align((k, v)))
    _check_against_reference(q, k, v, mask, dtype, config=AttnConfig(tma=1))


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_value_error():
    mask = PackedMask.from_splits([10], [10], ["causal"])
    q = torch.randn(10, 2, 16)
    kv = torch.randn(10, 1, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        triton_packed_attention(q, torch.randn(10, 3, 16), torch.randn(10, 3, 16), mask)
    with pytest.raises(ValueError, match="dtype"):
        triton_packed_attention(q.double(), kv.double(), kv.double(), mask)
    with pytest.raises(ValueError, match="head dim"):
        triton_packed_attention(
            torch.randn(10, 1, 300), torch.randn(10, 1, 300), torch.randn(10, 1, 300), mask
        )
    with pytest.raises(ValueError, match="total_len"):
        triton_packed_attention(q[:9], kv[:9], kv[:9], mask)
    with pytest.raises(ValueError, match="PackedMask"):
        triton_packed_attention(q, kv, kv, mask.to_dense())
    with pytest.raises(ValueError, match="scale"):
        triton_packed_attention(q, kv, kv, mask, float("nan"))
    with pytest.raises(ValueError, match="scale"):
        triton_packed_attention(q, kv, kv, mask, -0.5)
    cfg = default_config("cpu", torch.float32, 16)
    fwd_t, bwd_t = prepare_mask(PackedMask.from_splits([300], [300], ["causal"]), cfg)
    with pytest.raises(ValueError, match="fwd_tables"):
        packed_attention_fwd(
            q, kv, kv, mask.kv_lo, mask.kv_hi, None, list(fwd_t), list(bwd_t), 0.25, list(cfg.blocks()),
            list(cfg.launch()),
        )  # fmt: skip
    with pytest.raises(ValueError, match="power of two"):
        triton_packed_attention(q, kv, kv, mask, config=AttnConfig(block_m=48))


@pytest.mark.parametrize("one_hot", [False, True], ids=["uniform", "one-hot"])
def test_rows_whose_best_score_is_below_minus_1e30(one_hot):
    """The running max starts at -inf: q = 2**50, k = -q gives scaled scores of -2**102 (about -5e30)
    for every pair (a start at -1e30 returned 0 for these rows); with ``one_hot`` the keys' scores differ
    by ~1e28, so each row attends to its least negative visible key only. The forward against float64.
    Powers of two make every product and partial sum of ``q . k`` exact in fp32, so the scores of a row
    are equal whatever order a matmul sums in (with q = 1e15 they differed by an ulp, ~1e23, between the
    interpreter's BLAS blocks, which turned "uniform" rows one-hot). (Gradients are not compared: at
    |scores| ~ 1e30 an fp32 log-sum-exp cannot hold log2 of the row sum, one ulp being ~1e23, so no fp32
    backward that recomputes P from it is meaningful there.)"""
    mask = _mask(random_pack(random.Random(23), 3, text=(1, 30), image=(1, 40)))
    n, d = mask.total_len, 16
    q = torch.full((n, 2, d), 2.0**50)
    k = -torch.full((n, 1, d), 2.0**50)
    if one_hot:
        k = k * (1 + 0.01 * torch.rand(n, 1, 1))
    v = torch.randn(n, 1, d)
    out = triton_packed_attention(q, k, v, mask)
    ref = attention_reference(q.double(), k.double(), v.double(), mask)
    _close(out, ref, torch.float32, "fwd", "out")
    assert out.abs().amax() > 0.1  # not the zeros a finite start gives


def test_stride_alignment_of_model_layouts():
    """The launchers pass strides divided by the largest power of two (at most one 16-byte vector)
    that divides all of them: SigLIP's fused-qkv views (3456, 72) give 8 for bf16; odd strides 1."""
    from bagel_kernels.attention_triton import stride_align

    qkv = torch.empty(10, 3456, dtype=torch.bfloat16)
    q = qkv[:, :1152].view(10, 16, 72)
    assert stride_align((q, torch.empty(10, 16, 72, dtype=torch.bfloat16))) == 8
    assert stride_align((torch.empty(10, 4, 128),)) == 4  # fp32: 4 elements per 16 bytes
    assert stride_align((torch.empty(10, 3, 37, dtype=torch.float16),)) == 1
    assert stride_align((torch.empty(10, 2, 36, dtype=torch.float16),)) == 4
    assert stride_align((torch.empty(10, 2, 64).expand(10, 2, 64)[:, :1],)) == 4


# ------------------------------------------------------------------------------------------ registered ops: bad input
def _raw_args(hq=2, hkv=1, d=16):
    mask = PackedMask.from_splits([10, 18], [4, 6, 5, 13], ["causal", "full", "causal", "noise"])
    n = mask.total_len  # 28
    cfg = _square_tiles(16)
    fwd_t, bwd_t = prepare_mask(mask, cfg)
    q, k, v = (t.detach() for t in _make_qkv(n, hq, hkv, d, torch.float32))
    return dict(
        q=q, k=k, v=v, kv_lo=mask.kv_lo, kv_hi=mask.kv_hi, row_index=None, fwd_tables=list(fwd_t),
        bwd_tables=list(bwd_t), scale=0.25, blocks=list(cfg.blocks()), launch=list(cfg.launch()),
    )  # fmt: skip


def _fwd_op(a):
    return torch.ops.bagel_kernels.packed_attention_fwd(
        a["q"], a["k"], a["v"], a["kv_lo"], a["kv_hi"], a["row_index"], a["fwd_tables"], a["bwd_tables"],
        a["scale"], a["blocks"], a["launch"],
    )  # fmt: skip


def _bwd_op(a, grad_out=None, out=None, lse=None):
    if out is None:
        out, lse = _fwd_op(_raw_args())
    return torch.ops.bagel_kernels.packed_attention_bwd(
        torch.randn_like(out) if grad_out is None else grad_out, a["q"], a["k"], a["v"], out, lse,
        a["kv_lo"], a["kv_hi"], a["row_index"], a["bwd_tables"], a["scale"], a["blocks"], a["launch"],
    )  # fmt: skip


def _i32(*vals):
    return torch.tensor(vals, dtype=torch.int32)


BAD_OP_INPUTS = {
    # name: (edit of the arguments, error message pattern)
    "kv_lo length 1": (lambda a: a.update(kv_lo=_i32(0)), "kv_lo has 1 entries, expected 28"),
    "kv_hi int64": (lambda a: a.update(kv_hi=a["kv_hi"].long()), "kv_hi must be a 1-D int32"),
    "kv_hi beyond N": (lambda a: a.update(kv_hi=a["kv_hi"] + 100), r"kv_hi holds values outside \[0, 28\]"),
    "row_index short": (lambda a: a.update(row_index=_i32(*range(27))), "row_index has 27 entries"),
    "row_index 10**6": (
        lambda a: a.update(row_index=torch.cat((_i32(10**6), torch.arange(1, 28, dtype=torch.int32)))),
        "row_index must be a permutation",
    ),
    "row_index repeated": (lambda a: a.update(row_index=torch.zeros(28, dtype=torch.int32)), "permutation"),
    "q_kv_ptr short": (lambda a: a["fwd_tables"].__setitem__(0, a["fwd_tables"][0][:-1]), "q_kv_ptr has"),
    "q_kv_ptr past nnz": (
        lambda a: a["fwd_tables"].__setitem__(0, a["fwd_tables"][0] + 1000),
        "q_kv_ptr holds values outside",
    ),
    "q_kv_idx out of range": (
        lambda a: a["fwd_tables"].__setitem__(1, a["fwd_tables"][1] + 7),
        "q_kv_idx holds values outside",
    ),
    "q_kv_full short": (lambda a: a["fwd_tables"].__setitem__(2, a["fwd_tables"][2][:1]), "q_kv_full has 1"),
    "m_order negative": (lambda a: a["fwd_tables"].__setitem__(3, a["fwd_tables"][3] - 5), "m_order holds"),
    "3 fwd tables": (lambda a: a["fwd_tables"].pop(), "fwd_tables must hold 4"),
    "bwd kv_q_end short": (
        lambda a: a["bwd_tables"].__setitem__(1, a["bwd_tables"][1][:1]),
        "kv_q_end has 1",
    ),
    "bwd n_order 10**6": (
        lambda a: a["bwd_tables"].__setitem__(4, a["bwd_tables"][4] + 10**6),
        "n_order holds values outside",
    ),
    "block not a power of two": (lambda a: a.update(blocks=[16, 16, 16, 24, 16, 16]), "block_n1=24"),
    "3 warps": (lambda a: a.update(launch=[3, 1, 4, 1]), "fwd_warps=3"),
    "negative scale": (lambda a: a.update(scale=-1.0), "softmax_scale"),
    "nan scale": (lambda a: a.update(scale=float("nan")), "softmax_scale"),
    "k of other length": (lambda a: a.update(k=a["k"][:27], v=a["v"][:27]), "k/v must be"),
    "v other dtype": (lambda a: a.update(v=a["v"].double()), "dtype"),
    "heads not divisible": (
        lambda a: a.update(q=torch.randn(28, 3, 16), k=torch.randn(28, 2, 16), v=torch.randn(28, 2, 16)),
        "multiple of key/value heads",
    ),
}


@pytest.mark.parametrize("name", list(BAD_OP_INPUTS))
def test_registered_fwd_op_checks_its_inputs(name):
    """torch.ops.bagel_kernels.packed_attention_fwd is public: every size is checked against T and
    the tiles (values too, on CPU tensors), before any kernel reads."""
    edit, match = BAD_OP_INPUTS[name]
    a = _raw_args()
    edit(a)
    with pytest.raises(ValueError, match=match):
        _fwd_op(a)


def test_registered_bwd_op_checks_its_inputs():
    a = _raw_args()
    out, lse = _fwd_op(a)
    dq, dk, dv = _bwd_op(a, out=out, lse=lse)  # the good call works
    assert dq.shape == a["q"].shape and torch.isfinite(dq).all()
    with pytest.raises(ValueError, match="lse must be a float32"):
        _bwd_op(a, out=out, lse=lse[:, :-1])
    with pytest.raises(ValueError, match="grad_out must be shaped"):
        _bwd_op(a, grad_out=torch.randn(27, 2, 16), out=out, lse=lse)
    with pytest.raises(ValueError, match="out must be shaped"):
        _bwd_op(a, out=out[:27], lse=lse)
    for name in ("kv_lo length 1", "bwd kv_q_end short", "bwd n_order 10**6", "row_index 10**6"):
        b = _raw_args()
        BAD_OP_INPUTS[name][0](b)
        with pytest.raises(ValueError, match=BAD_OP_INPUTS[name][1]):
            _bwd_op(b, out=out, lse=lse)


_CLAMP_SCRIPT = """
import os, random, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from bagel_kernels import PackedMask
from bagel_kernels.attention_configs import AttnConfig, Blocks
from bagel_kernels.attention_triton import BwdTables, FwdTables, KernelArgs, launch_bwd, launch_fwd, prepare_mask
from bagel_kernels.testing import random_pack

mask = PackedMask.from_splits(*random_pack(random.Random(3), 3, text=(1, 20), image=(1, 20)).as_tuple())
n, cfg = mask.total_len, AttnConfig(**dict.fromkeys(Blocks._fields, 16))
fwd_t, bwd_t = prepare_mask(mask, cfg)
q, k, v = torch.randn(n, 2, 16), torch.randn(n, 1, 16), torch.randn(n, 1, 16)
big = lambda t, s: (t.long() * 0 + s).to(torch.int32)
bad_fwd = FwdTables(big(fwd_t[0], 10**6), big(fwd_t[1], -10**6), fwd_t[2], big(fwd_t[3], 10**6))
bad_bwd = BwdTables(*[big(t, 10**6) for t in bwd_t[:5]], big(bwd_t[5], -7), big(bwd_t[6], 10**6), bwd_t[7],
                    big(bwd_t[8], -1))
ridx = torch.full((n,), 10**6, dtype=torch.int32)
out, lse = torch.zeros(n, 2, 16), torch.zeros(2, n)
args = KernelArgs(mask.kv_lo, mask.kv_hi, ridx, bad_fwd, 0.25, cfg.blocks(), cfg.launch())
launch_fwd(q, k, v, out, lse, args)
grads = [torch.zeros_like(t) for t in (q, k, v)]
launch_bwd(torch.randn(n, 2, 16), q, k, v, out, lse, *grads, args._replace(tables=bad_bwd))
print("survived", all(bool(torch.isfinite(t).all()) for t in [out, *grads]))
"""


def test_kernels_clamp_table_values(tmp_path):
    """Values the ops do not check on a GPU (that would cost a device sync) cannot make the kernels
    address memory outside the tensors: block ids, CSR pointers and row indices are clamped. Run in a
    subprocess: an out-of-bounds access under the interpreter may crash the process."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(
        [sys.executable, "-c", _CLAMP_SCRIPT], capture_output=True, text=True, timeout=300, env=env, cwd=root
    )
    assert proc.returncode == 0 and "survived True" in proc.stdout, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ tile tables
def test_tuned_table_lookup(tmp_path, monkeypatch):
    """An entry keyed (arch, Triton major.minor, dtype, head dim) overrides the named fields of the
    default; other keys keep the default; a malformed table warns and falls back."""
    import json

    from bagel_kernels import attention_configs as ac

    path = tmp_path / "table.json"
    entry = {"arch": "sm90", "triton": "3.6", "dtype": "bf16", "head_dim": 72,
             "config": {"block_m": 64, "fwd_warps": 4}}  # fmt: skip
    path.write_text(json.dumps({"format": 1, "entries": [entry]}))
    monkeypatch.setenv(ac.TABLE_ENV, str(path))
    ac.clear_table_cache()
    base = ac.default_for(90, False, 72, "3.6")
    got = ac.config_for((9, 0), torch.bfloat16, 72, "3.6.0")
    assert (got.block_m, got.fwd_warps) == (64, 4) and got.block_n == base.block_n
    assert ac.config_for(90, torch.bfloat16, 72, "3.9") == ac.default_for(90, False, 72, "3.9")
    assert ac.config_for(90, torch.float16, 72, "3.6") == base
    assert ac.config_for(80, torch.bfloat16, 72, "3.6") == ac.default_for(80, False, 72, "3.6")
    path.write_text(json.dumps({"format": 1, "entries": [dict(entry, config={"block_q": 64})]}))
    ac.clear_table_cache()
    with pytest.warns(UserWarning, match="malformed"):
        assert ac.config_for(90, torch.bfloat16, 72, "3.6") == base
    with pytest.raises(ValueError, match="unknown AttnConfig fields"):
        ac.load_tuned_table(path)
    ac.clear_table_cache()


def test_package_table_is_valid():
    """The table shipped in the package parses, and every entry names a known architecture."""
    from bagel_kernels import attention_configs as ac

    table = ac.load_tuned_table(ac.TABLE_PATH)
    for (arch, _ver, dtype, d), fields in table.items():
        assert arch in ("sm90", "sm80") and dtype in ("fp16", "bf16", "fp32") and 0 < d <= 256
        ac.AttnConfig.from_dict(fields)


def test_config_variants_and_onepass_flip(tmp_path, monkeypatch):
    """The variant fields take 0 or 1; split head dims get their own tiles where the padded entry's do
    not fit (sm_80, 72 = 64 + 16), ``dsplit=False`` gives the padded layout with the padded entry's
    tiles (the kernels before the split); one line ``"onepass": 1`` in a tuned entry makes that key's
    ``deterministic=False`` backward the one-pass one."""
    import json

    from bagel_kernels import attention_configs as ac

    cfg = ac.AttnConfig.from_dict({"onepass": 1, "dsplit": 0, "tma": 1})
    assert (cfg.onepass, cfg.dsplit, cfg.tma) == (1, 0, 1)
    for bad in ({"onepass": 2}, {"tma": True}, {"dsplit": -1}, {"onepass_block_m": 0}):
        with pytest.raises(ValueError, match="AttnConfig field"):
            ac.AttnConfig.from_dict(bad)
    split, padded = ac.default_for(80, False, 72, "3.9"), ac.default_for(80, False, 72, "3.9", dsplit=False)
    d128 = ac.default_for(80, False, 128, "3.9")
    assert split.dsplit == 1 and (split.block_m1, split.onepass_block_m) == (16, 16)
    assert padded.dsplit == 0 and padded.blocks() == d128.blocks() and padded.launch() == d128.launch()
    assert ac.default_for(90, False, 72, "3.9").blocks() == ac.default_for(90, False, 128, "3.9").blocks()
    big = ac.default_for(90, False, 256, "3.9")
    assert (big.onepass_block_m, big.onepass_block_n) == (32, 32) and (big.block_m1, big.block_n1) == (32, 64)
    path = tmp_path / "table.json"
    entry = {"arch": "sm90", "triton": "3.6", "dtype": "bf16", "head_dim": 128, "config": {"onepass": 1}}
    path.write_text(json.dumps({"format": 1, "entries": [entry]}))
    monkeypatch.setenv(ac.TABLE_ENV, str(path))
    ac.clear_table_cache()
    try:
        assert ac.config_for(90, torch.bfloat16, 128, "3.6").onepass == 1
        assert ac.config_for(90, torch.bfloat16, 72, "3.6").onepass == 0
    finally:
        ac.clear_table_cache()


# ------------------------------------------------------------------------------------------ torch.library
def _op_lists(cfg):
    """``(blocks, launch)`` as the ops' schemas take them (lists)."""
    return list(cfg.blocks()), list(cfg.launch())


def _op_args(n=40, hq=2, hkv=1, d=16):
    mask = _mask(random_pack(random.Random(19), 3, text=(1, 8), image=(1, 10)))
    mask = mask.truncated(min(n, mask.total_len))
    n = mask.total_len
    cfg = _square_tiles(16)
    fwd_t, bwd_t = (list(t) for t in prepare_mask(mask, cfg))
    q, k, v = _make_qkv(n, hq, hkv, d, torch.float32)
    return mask, cfg, fwd_t, bwd_t, q, k, v


def test_opcheck_fwd():
    mask, cfg, fwd_t, bwd_t, q, k, v = _op_args()
    args = (q, k, v, mask.kv_lo, mask.kv_hi, None, fwd_t, bwd_t, 0.25, *_op_lists(cfg))
    torch.library.opcheck(packed_attention_fwd, args)


def test_opcheck_fwd_row_index():
    mask, cfg, fwd_t, bwd_t, q, k, v = _op_args()
    ridx = torch.randperm(mask.total_len).to(torch.int32)
    args = (q, k, v, mask.kv_lo, mask.kv_hi, ridx, fwd_t, bwd_t, 0.25, *_op_lists(cfg))
    torch.library.opcheck(
        packed_attention_fwd,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_opcheck_bwd():
    mask, cfg, fwd_t, bwd_t, q, k, v = _op_args()
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = packed_attention_fwd(
        q, k, v, mask.kv_lo, mask.kv_hi, None, fwd_t, bwd_t, 0.25, *_op_lists(cfg)
    )
    do = torch.randn_like(out)
    args = (do, q, k, v, out, lse, mask.kv_lo, mask.kv_hi, None, bwd_t, 0.25, *_op_lists(cfg))
    torch.library.opcheck(packed_attention_bwd, args)


def test_opcheck_onepass_and_variants():
    """The ops with their variant arguments: the forward with the padded layout and TMA, the one-pass
    backward (its tables built for the one-pass tiles)."""
    mask, _, _, _, q, k, v = _op_args(d=24)
    cfg = _square_tiles(16, onepass=1, onepass_block_m=16, onepass_block_n=32)
    fwd_t, bwd_t = (list(t) for t in prepare_mask(mask, cfg, True))
    blocks, launch = (list(t) for t in op_params(cfg, True))
    args = (q, k, v, mask.kv_lo, mask.kv_hi, None, fwd_t, bwd_t, 0.25, blocks, launch, False, True, True)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(packed_attention_fwd, args, test_utils=utils)
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = packed_attention_fwd(q, k, v, *args[3:11])
    bargs = (torch.randn_like(out), q, k, v, out, lse, mask.kv_lo, mask.kv_hi, None, bwd_t, 0.25, blocks, launch,
             True, True)  # fmt: skip
    torch.library.opcheck(packed_attention_bwd, bargs, test_utils=utils)


def test_torch_compile_fullgraph():
    layout = random_pack(random.Random(20), 3, text=(1, 20), image=(1, 30), pad=6)
    mask = _mask(layout)
    T = mask.total_len - 6
    q, k, v = _make_qkv(T, 4, 2, 16, torch.float32)

    def step(q, k, v):
        return packed_attention(q, k, v, mask, backend="triton").square().sum()

    eager = step(q, k, v)  # builds and caches the block tables (data-dependent shapes stay eager)
    ge = torch.autograd.grad(eager, (q, k, v))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    gc = torch.autograd.grad(loss, (q, k, v))
    torch.testing.assert_close(loss, eager)
    for a, b in zip(gc, ge, strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------ GPU
gpu = pytest.mark.gpu


def _sdpa_fp32(q, k, v, mask, grad_out):
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = packed_attention(q32, k32, v32, mask, backend="sdpa")
    ref.backward(grad_out.float())
    return ref.detach(), (q32.grad, k32.grad, v32.grad)


@gpu
@pytest.mark.parametrize("onepass", [False, True], ids=["default", "onepass"])
@pytest.mark.parametrize(
    "dtype,hq,hkv,d",
    [(torch.bfloat16, 28, 4, 128), (torch.bfloat16, 16, 16, 72), (torch.float16, 8, 2, 64)],
    ids=["bf16-qwen", "bf16-siglip", "fp16-d64"],
)
def test_gpu_random_packs(dtype, hq, hkv, d, onepass):
    """Random packs on the GPU with the GPU's tiles against the float64 reference: the configured
    backward, or (``onepass``) the one-pass backward (real atomics, racing programs) and, for SigLIP's
    72, the padded layout (``dsplit=0``) with TMA that the benchmark times."""
    # at most ~3.6k tokens: the float64 dense reference stays < ~15 GB
    rng = random.Random(hq + d + int(onepass))
    mask = PackedMask.from_splits(
        *random_pack(rng, 4, text=(1, 80), image=(1, 250)).as_tuple(), device="cuda"
    )
    q, k, v = _make_qkv(mask.total_len, hq, hkv, d, dtype, device="cuda")
    if not onepass:
        _check_against_reference(q, k, v, mask, dtype)
        return
    cfg = default_config(q.device, dtype, d)
    _check_against_reference(q, k, v, mask, dtype, config=dataclasses.replace(cfg, onepass=1))
    if d == 72:
        _check_against_reference(q, k, v, mask, dtype, config=dataclasses.replace(cfg, dsplit=0, tma=1))


@gpu
def test_gpu_fp32_exact_dots():
    mask = PackedMask.from_splits(
        *random_pack(random.Random(3), 4, text=(1, 80), image=(1, 250)).as_tuple(), device="cuda"
    )
    q, k, v = _make_qkv(mask.total_len, 4, 2, 128, torch.float32, device="cuda")
    _check_against_reference(q, k, v, mask, torch.float32)


@gpu
@pytest.mark.parametrize("tokens", [16384, 65536])
def test_gpu_large_realistic_pack(tokens):
    """16k and 64k realistic packs, bf16, vs the per-sample SDPA backend in fp32; with a row_index
    on the 64k pack (the MoT layout); deterministic reruns bit-identical."""
    mask = PackedMask.from_splits(*realistic_pack(tokens, seed=tokens).as_tuple(), device="cuda")
    n = mask.total_len
    q, k, v = _make_qkv(n, 28, 4, 128, torch.bfloat16, device="cuda")
    grad_out = torch.randn(n, 28, 128, device="cuda", dtype=torch.bfloat16)
    if tokens == 65536:
        perm = torch.randperm(n, device="cuda")
        mask_p = mask.with_row_index(perm.to(torch.int32))

        def scatter(t):
            return torch.empty_like(t).index_copy(0, perm, t)

        qp, kp, vp = (scatter(t.detach()).requires_grad_() for t in (q, k, v))
        out_p = packed_attention(qp, kp, vp, mask_p, backend="triton")
        gp = torch.autograd.grad(out_p, (qp, kp, vp), scatter(grad_out))
        out, grads = out_p[perm], tuple(g[perm] for g in gp)
    else:
        out = packed_attention(q, k, v, mask, backend="triton", deterministic=True)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        out2 = packed_attention(q, k, v, mask, backend="triton", deterministic=True)
        grads2 = torch.autograd.grad(out2, (q, k, v), grad_out)
        assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True))
    ref, rgrads = _sdpa_fp32(q, k, v, mask, grad_out)
    _close(out, ref, torch.bfloat16, "fwd", "out")
    for a, b, nme in zip(grads, rgrads, ("dq", "dk", "dv"), strict=True):
        _close(a, b, torch.bfloat16, "bwd", nme)


@gpu
def test_gpu_int64_offsets():
    """A pack whose q has more than 2**31 elements: row * stride must be computed in 64 bits.
    Short text samples keep it cheap; the last samples are checked one by one."""
    hq, hkv, d, seg = 32, 1, 128, 256
    n = ((2**31) // (hq * d) // seg + 2) * seg  # q elements > 2**31
    mask = PackedMask.from_splits(
        [seg] * (n // seg), [seg] * (n // seg), ["causal"] * (n // seg), device="cuda"
    )
    q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
    assert q.numel() > 2**31
    q.requires_grad_()
    out = triton_packed_attention(q, k, v, mask)
    grad_out = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, (q,), grad_out)
    for s in (0, n // seg - 1):
        sl = slice(s * seg, (s + 1) * seg)
        sub = PackedMask.from_splits([seg], [seg], ["causal"], device="cuda")
        qs = q.detach()[sl].double().requires_grad_()
        ref = attention_reference(qs, k[sl], v[sl], sub)
        (rdq,) = torch.autograd.grad(ref, (qs,), grad_out[sl].double())
        _close(out[sl], ref, torch.bfloat16, "fwd", f"out of sample {s}")
        _close(dq[sl], rdq, torch.bfloat16, "bwd", f"dq of sample {s}")

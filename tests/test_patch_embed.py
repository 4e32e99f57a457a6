"""Fused patch embedding (csrc/ extension + bagel_kernels.patch_embed) against its torch reference.

Forward and gradients (weight, bias, position table, pixels) are compared with the unfused reference
computed in float64 from the same (rounded) inputs, with the tolerances of bagel_kernels.testing. The
patch order is checked against BAGEL's patchify and against SigLIP's Conv2d. CPU tests run the
extension's CPU kernel ("cpu_ext") and the torch fallback; GPU tests (``-m gpu``) run the CUDA kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from bagel_kernels import patch_embed as pe
from bagel_kernels import reference
from bagel_kernels.testing import tolerance

OP = "bagel_kernels_ext::fused_patch_embed"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ext_cpu() -> bool:
    return pe.extension_status().cpu


def _ext_cuda() -> bool:
    return torch.cuda.is_available() and pe.extension_status().cuda


needs_cpu_ext = pytest.mark.skipif(
    not _ext_cpu(), reason=f"extension CPU kernel absent: {pe.extension_status().reason}"
)
CPU_BACKENDS = [pytest.param("cpu_ext", marks=needs_cpu_ext), "torch"]
# The tolerance sweeps against the float64 reference run the extension's kernel: backend="torch" IS that
# reference (patch_embed_reference, in the inputs' dtype), which test_torch_backend_is_the_reference pins.
KERNEL_BACKENDS = [pytest.param("cpu_ext", marks=needs_cpu_ext)]


def make_inputs(N, K, E, dtype, device="cpu", table_rows=0, bias=True, grad=False, seed=0):
    """Patches ~ U(-1, 1) (normalised pixels), weight ~ N(0, 1/K) so outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(N, K, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    w = (torch.randn(E, K, generator=g) * K**-0.5).to(device=device, dtype=dtype)
    b = torch.randn(E, generator=g).to(device=device, dtype=dtype) if bias else None
    t = ids = None
    if table_rows:
        t = torch.randn(table_rows, E, generator=g).to(device=device, dtype=dtype)
        ids = torch.randint(0, table_rows, (N,), generator=g).to(device)
    if grad:
        for a in (x, w, b, t):
            if a is not None:
                a.requires_grad_(True)
    return x, w, b, t, ids


def make_images(sizes, C, p, dtype, device="cpu", pad=(0, 0), seed=1):
    """A padded batch holding images of the given (h, w) sizes, plus (coords, pos_ids) of all their patches."""
    g = torch.Generator().manual_seed(seed)
    H = max(h for h, _ in sizes) + pad[0]
    W = max(w for _, w in sizes) + pad[1]
    images = (torch.rand(len(sizes), C, H, W, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    coords, ids = pe.image_patch_coords(sizes, p, device=device)
    return images, coords, ids


def close(actual, expected, dtype, direction, name):
    atol, rtol = tolerance(dtype, direction)
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}"
    )


def reference64(x, w, b, t, ids):
    """float64 reference and its input gradients for grad_out ``dy``."""
    leaves = [None if a is None else a.detach().double().requires_grad_(True) for a in (x, w, b, t)]
    out = reference.patch_embed_reference(leaves[0], leaves[1], leaves[2], leaves[3], ids)
    return out, leaves


def _close_to_reference(out, dy, inputs, ids):
    """``out`` (backward already run with ``dy``) and the gradient of every given one of ``inputs`` =
    (patches, weight, bias, pos_table) against the float64 reference, in ``out``'s dtype tolerances."""
    ref, leaves = reference64(*inputs, ids)
    ref.backward(dy.double())
    close(out, ref, out.dtype, "fwd", "out")
    for name, ours, theirs in zip(("patches", "weight", "bias", "pos_table"), inputs, leaves, strict=True):
        if ours is not None:
            assert ours.grad is not None and ours.grad.dtype == out.dtype, name
            close(ours.grad, theirs.grad, out.dtype, "bwd", f"grad {name}")


# ------------------------------------------------------------------------------------------ forward
SHAPES = [
    (64, 588, 1152),  # SigLIP so400m: patch 14, C=3, hidden 1152
    (1, 588, 1152),
    (97, 588, 200),
    (33, 75, 31),  # p=5, C=3: K and hidden not multiples of any tile or vector width
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K,E", SHAPES)
@pytest.mark.parametrize("table", [0, 37], ids=["no_table", "table"])
def test_forward_matches_reference(backend, dtype, N, K, E, table):
    x, w, b, t, ids = make_inputs(N, K, E, dtype, table_rows=table)
    out = pe.fused_patch_embed(x, w, b, t, ids, backend=backend)
    assert pe.last_backend()[0] == backend
    assert out.shape == (N, E) and out.dtype == dtype
    ref, _ = reference64(x, w, b, t, ids)
    close(out, ref, dtype, "fwd", "out")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K,E,table", [(97, 588, 200, 37), (1, 75, 31, 0)])
def test_torch_backend_is_the_reference(dtype, N, K, E, table):
    """``backend="torch"`` runs the unfused reference (what the kernels are checked against), bit for
    bit in the forward and every gradient, after its input checks."""
    x, w, b, t, ids = make_inputs(N, K, E, dtype, table_rows=table, grad=True)
    dy = torch.randn(N, E, dtype=dtype)
    out = pe.fused_patch_embed(x, w, b, t, ids, backend="torch")
    assert pe.last_backend()[0] == "torch"
    grads = torch.autograd.grad(out, [a for a in (x, w, b, t) if a is not None], dy)
    ref = reference.patch_embed_reference(x, w, b, t, ids)
    want = torch.autograd.grad(ref, [a for a in (x, w, b, t) if a is not None], dy)
    assert torch.equal(out, ref)
    assert all(torch.equal(g, r) for g, r in zip(grads, want, strict=True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_without_bias_and_int32_ids(backend):
    x, w, _, t, ids = make_inputs(29, 48, 40, torch.float32, table_rows=9, bias=False)
    out = pe.fused_patch_embed(x, w, None, t, ids.int(), backend=backend)
    ref, _ = reference64(x, w, None, t, ids)
    close(out, ref, torch.float32, "fwd", "out")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_patches(backend):
    """A column slice (row stride K+3, misaligned start) and a transposed copy give the same result."""
    big, w, b, t, ids = make_inputs(50, 75 + 3, 64, torch.float16, table_rows=11)
    x = big[:, 1:76]
    w = w[:, 1:76].contiguous()
    out = pe.fused_patch_embed(x, w, b, t, ids, backend=backend)
    ref, _ = reference64(x, w, b, t, ids)
    close(out, ref, torch.float16, "fwd", "out")
    xt = x.t().contiguous().t()  # column-major
    torch.testing.assert_close(pe.fused_patch_embed(xt, w, b, t, ids, backend=backend), out, atol=0, rtol=0)


def test_empty_input():
    x, w, b, t, _ = make_inputs(0, 12, 8, torch.float32, table_rows=3)
    for backend in ["torch"] + (["cpu_ext"] if _ext_cpu() else []):
        out = pe.fused_patch_embed(x, w, b, t, torch.zeros(0, dtype=torch.long), backend=backend)
        assert out.shape == (0, 8)


# ---------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K,E,table", [(97, 588, 200, 37), (40, 588, 1152, 0), (1, 75, 31, 5)])
def test_gradients_match_reference(backend, dtype, N, K, E, table):
    x, w, b, t, ids = make_inputs(N, K, E, dtype, table_rows=table, grad=True)
    dy = torch.randn(N, E, dtype=dtype)
    out = pe.fused_patch_embed(x, w, b, t, ids, backend=backend)
    out.backward(dy)
    _close_to_reference(out, dy, (x, w, b, t), ids)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_with_stride0_grad_and_frozen_inputs(backend):
    """``.sum()`` hands over a stride-0 gradient; frozen pixels/table get no gradient."""
    x, w, b, t, ids = make_inputs(21, 27, 10, torch.float32, table_rows=4)
    w.requires_grad_(True)
    b.requires_grad_(True)
    pe.fused_patch_embed(x, w, b, t, ids, backend=backend).sum().backward()
    ref, leaves = reference64(x, w, b, t, ids)
    ref.sum().backward()
    close(w.grad, leaves[1].grad, torch.float32, "bwd", "grad weight")
    close(b.grad, leaves[2].grad, torch.float32, "bwd", "grad bias")
    assert x.grad is None and t.grad is None


# ------------------------------------------------------------------------------- raw-image entry, order
def _loop_patchify(image: torch.Tensor, p: int) -> torch.Tensor:
    """BAGEL's patch order written out as loops: grid row-major, then (pixel row, pixel col, channel)."""
    C, H, W = image.shape
    rows = []
    for r in range(H // p):
        for c in range(W // p):
            rows.append(
                [image[ch, r * p + i, c * p + j] for i in range(p) for j in range(p) for ch in range(C)]
            )
    return torch.tensor(rows, dtype=image.dtype)


def test_patchify_matches_bagel_order():
    img = torch.randn(3, 10, 15)
    ref = _loop_patchify(img, 5)
    torch.testing.assert_close(reference.patchify(img, 5), ref, atol=0, rtol=0)
    coords, _ = pe.image_patch_coords([(10, 15)], 5)
    torch.testing.assert_close(reference.patchify_images(img[None], coords, 5), ref, atol=0, rtol=0)


@needs_cpu_ext
@pytest.mark.parametrize("C,p,size", [(3, 5, (10, 15)), (3, 14, (28, 42)), (1, 2, (4, 2))])
def test_kernel_patch_order_is_the_python_patchify(C, p, size):
    """The C++ kernels gather each patch in the order csrc/patch_embed.h states; with an identity weight
    the raw-image entry hands that order back, and it is reference.patchify's, bit for bit."""
    img = torch.randn(C, *size)
    coords, _ = pe.image_patch_coords([size], p)
    eye = torch.eye(C * p * p)
    out = pe.fused_patch_embed_images(img[None], coords, p, eye, backend="cpu_ext")
    assert torch.equal(out, reference.patchify(img, p))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_images_entry_equals_siglip_conv(backend):
    """A Conv2d(stride=p) patch embedding equals the fused op with the weight permuted (0, 2, 3, 1)."""
    C, p, E = 3, 7, 24
    images, coords, _ = make_images([(21, 14)], C, p, torch.float32)
    conv_w = torch.randn(E, C, p, p) * (C * p * p) ** -0.5
    conv_b = torch.randn(E)
    conv = F.conv2d(images, conv_w, conv_b, stride=p)[0]  # [E, 3, 2]
    expected = conv.permute(1, 2, 0).reshape(-1, E)
    lin_w = conv_w.permute(0, 2, 3, 1).reshape(E, C * p * p)
    out = pe.fused_patch_embed_images(images, coords, p, lin_w, conv_b, backend=backend)
    close(out, expected, torch.float32, "fwd", "conv vs fused")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_images_entry_matches_patchified_entry(backend, dtype):
    """Raw padded images (sizes not multiples of p, padding beyond) vs the same patches patchified."""
    p, C, E = 14, 3, 200
    images, coords, ids = make_images([(56, 42), (28, 70), (43, 30)], C, p, dtype, pad=(5, 3))
    _, w, b, t, _ = make_inputs(1, C * p * p, E, dtype, table_rows=int(ids.max()) + 1)
    patches = reference.patchify_images(images, coords, p)
    out_img = pe.fused_patch_embed_images(images, coords, p, w, b, t, ids, backend=backend)
    out_pat = pe.fused_patch_embed(patches, w, b, t, ids, backend=backend)
    assert out_img.shape == (coords.shape[0], E)
    torch.testing.assert_close(out_img, out_pat, atol=0, rtol=0)  # same kernel, same summation order
    ref, _ = reference64(patches, w, b, t, ids)
    close(out_img, ref, dtype, "fwd", "images entry")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_images_entry_gradients(backend, dtype):
    """Gradients of the raw-image entry, pixels included (a patch listed twice accumulates twice);
    channels-last images and int32 coordinates."""
    p, C, E = 5, 3, 33
    images, coords, ids = make_images([(15, 10), (10, 20)], C, p, dtype, pad=(2, 1))
    coords = torch.cat([coords, coords[:1]]).int()
    ids = torch.cat([ids, ids[:1]])
    images = images.to(memory_format=torch.channels_last).requires_grad_(True)
    _, w, b, t, _ = make_inputs(1, C * p * p, E, dtype, table_rows=int(ids.max()) + 1, grad=True)
    dy = torch.randn(coords.shape[0], E, dtype=dtype)
    out = pe.fused_patch_embed_images(images, coords, p, w, b, t, ids, backend=backend)
    out.backward(dy)
    _close_to_images_reference(out, dy, (images, w, b, t), coords, p, ids)


def _close_to_images_reference(out, dy, inputs, coords, p, ids):
    """``out`` (backward already run with ``dy``) and the gradients of ``inputs`` = (images, weight,
    bias, pos_table) against the float64 raw-image reference."""
    leaves = [a.detach().double().requires_grad_(True) for a in inputs]
    ref = reference.patch_embed_images_reference(leaves[0], coords, p, leaves[1], leaves[2], leaves[3], ids)
    ref.backward(dy.double())
    close(out, ref, out.dtype, "fwd", "out")
    for name, ours, theirs in zip(("images", "weight", "bias", "pos_table"), inputs, leaves, strict=True):
        close(ours.grad, theirs.grad, out.dtype, "bwd", f"grad {name}")


# ------------------------------------------------------------------------------------------ bad input
def _good(dtype=torch.float32):
    x, w, b, t, ids = make_inputs(6, 12, 8, dtype, table_rows=5)
    return dict(patches=x, weight=w, bias=b, pos_table=t, pos_ids=ids)


BAD_PATCHES = [
    ("patches", dict(patches=torch.randn(6, 12, 1)), "patches"),
    ("k_mismatch", dict(patches=torch.randn(6, 13)), "weight"),
    ("weight_1d", dict(weight=torch.randn(8 * 12)), "weight"),
    ("dtype", dict(weight=torch.randn(8, 12, dtype=torch.float16)), "weight"),
    ("int_pixels", dict(patches=torch.ones(6, 12, dtype=torch.int64)), "pixels"),
    ("bias_shape", dict(bias=torch.randn(9)), "bias"),
    ("table_alone", dict(pos_ids=None), "pos_table and pos_ids"),
    ("ids_alone", dict(pos_table=None), "pos_table and pos_ids"),
    ("table_shape", dict(pos_table=torch.randn(5, 9)), "pos_table"),
    ("ids_float", dict(pos_ids=torch.zeros(6)), "pos_ids"),
    ("ids_len", dict(pos_ids=torch.zeros(5, dtype=torch.long)), "pos_ids"),
    ("ids_high", dict(pos_ids=torch.tensor([0, 1, 2, 3, 4, 5])), "pos_ids"),
    ("ids_negative", dict(pos_ids=torch.tensor([0, -1, 2, 3, 4, 0])), "pos_ids"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case,change,needle", BAD_PATCHES, ids=[c[0] for c in BAD_PATCHES])
def test_bad_patches_input_raises(backend, case, change, needle):
    kw = _good()
    kw.update(change)
    with pytest.raises(ValueError, match=needle):
        pe.fused_patch_embed(**kw, backend=backend)


def test_bad_backend_name_and_device():
    with pytest.raises(ValueError, match="backend"):
        pe.fused_patch_embed(**_good(), backend="triton")
    with pytest.raises(ValueError, match="cuda"):
        pe.fused_patch_embed(**_good(), backend="cuda")  # CPU tensors
    if not _ext_cpu():
        with pytest.raises(ValueError, match="cpu_ext"):
            pe.fused_patch_embed(**_good(), backend="cpu_ext")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_images_input_raises(backend):
    p, C, E = 5, 3, 8
    images, coords, ids = make_images([(10, 15)], C, p, torch.float32)
    _, w, b, t, _ = make_inputs(1, C * p * p, E, torch.float32, table_rows=int(ids.max()) + 1)

    def call(**change):
        kw = dict(
            images=images, patch_coords=coords, patch_size=p, weight=w, bias=b, pos_table=t, pos_ids=ids
        )
        kw.update(change)
        return pe.fused_patch_embed_images(**kw, backend=backend)

    bad = [
        (dict(images=images[0]), "images"),
        (dict(patch_size=0), "patch_size"),
        (dict(patch_size=4), "weight"),  # C*p*p no longer matches
        (dict(patch_coords=coords[:, :2]), "patch_coords"),
        (dict(patch_coords=coords.float()), "patch_coords"),
        (dict(patch_coords=coords + torch.tensor([1, 0, 0])), "image index"),
        (dict(patch_coords=coords + torch.tensor([0, 1, 0])), "patch row"),
        (dict(patch_coords=coords - torch.tensor([0, 0, 1])), "patch col"),
        (dict(pos_ids=ids[:-1]), "pos_ids"),
    ]
    for change, needle in bad:
        with pytest.raises(ValueError, match=needle):
            call(**change)


@needs_cpu_ext
def test_op_level_checks_raise_value_error():
    """The C++ op validates on its own (TORCH_CHECK_VALUE -> ValueError naming the argument)."""
    op = torch.ops.bagel_kernels_ext.fused_patch_embed
    kw = _good()
    with pytest.raises(ValueError, match="weight"):
        op(kw["patches"], kw["weight"][:, :5], None, None, None, None, 0, True)
    with pytest.raises(ValueError, match="pos_ids"):
        op(kw["patches"], kw["weight"], None, kw["pos_table"], kw["pos_ids"] + 5, None, 0, True)
    with pytest.raises(ValueError, match="patch_coords"):
        op(torch.randn(1, 3, 4, 4), torch.randn(8, 12), None, None, None, torch.tensor([[0, 2, 0]]), 2, True)


@needs_cpu_ext
def test_unchecked_bad_ids_give_nan_rows():
    """check_indices=False: no read out of bounds, the bad rows come out NaN, the others are right."""
    kw = _good()
    ids = kw["pos_ids"].clone()
    ids[2] = 99
    out = pe.fused_patch_embed(**{**kw, "pos_ids": ids}, backend="cpu_ext", check_indices=False)
    assert torch.isnan(out[2]).all()
    good = torch.arange(6) != 2
    ref, _ = reference64(kw["patches"], kw["weight"], kw["bias"], kw["pos_table"], kw["pos_ids"])
    close(out[good], ref[good], torch.float32, "fwd", "good rows")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unchecked_bad_ids_nan_forward_and_backward_drops_them(backend):
    """check_indices=False with position ids out of range (too large, negative): NaN rows in the
    forward; the backward drops those rows (every gradient equals the reference over the valid rows
    only) and indexes nothing with the bad ids."""
    x, w, b, t, ids = make_inputs(9, 12, 8, torch.float32, table_rows=5, grad=True)
    bad = ids.clone()
    bad[2], bad[6] = 10**6, -3
    good = torch.ones(9, dtype=torch.bool)
    good[[2, 6]] = False
    out = pe.fused_patch_embed(x, w, b, t, bad, backend=backend, check_indices=False)
    assert torch.isnan(out[~good]).all() and torch.isfinite(out[good]).all()
    dy = torch.randn_like(out)
    out.backward(dy)
    ref, leaves = reference64(x[good], w, b, t, ids[good])
    ref.backward(dy[good].double())
    close(out[good], ref, torch.float32, "fwd", "good rows")
    assert torch.equal(x.grad[~good], torch.zeros_like(x.grad[~good]))
    close(x.grad[good], leaves[0].grad, torch.float32, "bwd", "grad patches")
    for name, ours, theirs in zip(("weight", "bias", "pos_table"), (w, b, t), leaves[1:], strict=True):
        close(ours.grad, theirs.grad, torch.float32, "bwd", f"grad {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unchecked_bad_coords_nan_forward_and_backward_drops_them(backend):
    """Raw-image entry, check_indices=False: a negative patch row (which plain indexing would wrap to
    another patch), an image index beyond the batch and a bad position id each give a NaN row that
    reads no other patch and adds nothing to any gradient (pixels included)."""
    p, C, E = 2, 3, 6
    images, coords, ids = make_images([(6, 4), (4, 8)], C, p, torch.float32, pad=(1, 1))
    images.requires_grad_(True)
    _, w, b, t, _ = make_inputs(1, C * p * p, E, torch.float32, table_rows=int(ids.max()) + 1, grad=True)
    bad_coords, bad_ids = coords.clone(), ids.clone()
    bad_coords[1, 1] = -1  # negative patch row
    bad_coords[4, 0] = 2  # image index beyond the batch of 2
    bad_ids[7] = t.shape[0]  # position id one past the table
    good = torch.ones(coords.shape[0], dtype=torch.bool)
    good[[1, 4, 7]] = False
    out = pe.fused_patch_embed_images(
        images, bad_coords, p, w, b, t, bad_ids, backend=backend, check_indices=False
    )
    assert torch.isnan(out[~good]).all() and torch.isfinite(out[good]).all()
    dy = torch.randn_like(out)
    out.backward(dy)
    leaves = [a.detach().double().requires_grad_(True) for a in (images, w, b, t)]
    ref = reference.patch_embed_images_reference(
        leaves[0], coords[good], p, leaves[1], leaves[2], leaves[3], ids[good]
    )
    ref.backward(dy[good].double())
    close(out[good], ref, torch.float32, "fwd", "good rows")
    names = ("images", "weight", "bias", "pos_table")
    for name, ours, theirs in zip(names, (images, w, b, t), leaves, strict=True):
        close(ours.grad, theirs.grad, torch.float32, "bwd", f"grad {name}")


# ----------------------------------------------------------------------------- torch.library integration
def _opcheck_cases(device="cpu", dtype=torch.float32):
    x, w, b, t, ids = make_inputs(7, 12, 6, dtype, device=device, table_rows=4, grad=True)
    images, coords, pids = make_images([(6, 4), (4, 8)], 3, 2, dtype, device=device, pad=(1, 1))
    images.requires_grad_(True)
    t2 = torch.randn(int(pids.max()) + 1, 6, dtype=dtype, device=device, requires_grad=True)
    return [
        (x, w, b, t, ids, None, 0, True),
        (x, w, None, None, None, None, 0, True),
        (images, w, b, t2, pids, coords, 2, True),
        (images, w, b, None, None, coords.int(), 2, False),
    ]


@needs_cpu_ext
def test_opcheck_cpu():
    op = torch.ops.bagel_kernels_ext.fused_patch_embed.default
    for args in _opcheck_cases():
        torch.library.opcheck(op, args)


@needs_cpu_ext
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_traces(compile_backend):
    """fullgraph=True: the op, its fake implementation and the autograd formula trace; results match eager."""
    x, w, b, t, ids = make_inputs(13, 27, 10, torch.float32, table_rows=5, grad=True)
    images, coords, pids = make_images([(6, 9)], 3, 3, torch.float32)
    t2 = torch.randn(int(pids.max()) + 1, 10, requires_grad=True)

    def f(x, w, b, t, ids, images, coords, t2):
        y1 = pe.fused_patch_embed(x, w, b, t, ids, backend="cpu_ext")  # "auto" is torch on CPU
        y2 = pe.fused_patch_embed_images(images, coords, 3, w, b, t2, pids, backend="cpu_ext")
        return y1.square().sum() + y2.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    params = (w, b, t, t2)
    loss = compiled(x, w, b, t, ids, images, coords, t2)
    grads = torch.autograd.grad(loss, params)
    loss_ref = f(x, w, b, t, ids, images, coords, t2)
    grads_ref = torch.autograd.grad(loss_ref, params)
    torch.testing.assert_close(loss, loss_ref)
    for g, gr in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, gr)


# ------------------------------------------------------------------------------------- status, fallback
def test_fallback_reports_and_warns_once(monkeypatch):
    absent = pe.ExtensionStatus(False, False, False, None, "bagel_kernels._C is not built (test)")
    monkeypatch.setattr(pe, "_status", absent)
    monkeypatch.setattr(pe, "_warned", set())
    kw = _good()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # "auto" falls back only where the extension would have run: CUDA tensors (resolved directly,
        # no GPU needed); on CPU "auto" is the torch path by choice, without a warning
        assert pe.resolve_backend("auto", "cuda", "float32") == "torch"
        pe.resolve_backend("auto", "cuda", "float32")
        out = pe.fused_patch_embed(**kw)
        assert pe.last_backend() == ("torch", "auto: the torch path (BLAS) is the fastest on CPU")
        pe.resolve_backend("auto", "cuda", "float32")
    fallbacks = [w for w in caught if "falls back" in str(w.message)]
    assert len(fallbacks) == 1 and "not built (test)" in str(fallbacks[0].message)
    name, why = pe.last_backend()
    assert name == "torch" and "not built (test)" in why
    ref, _ = reference64(kw["patches"], kw["weight"], kw["bias"], kw["pos_table"], kw["pos_ids"])
    close(out, ref, torch.float32, "fwd", "fallback")
    with pytest.raises(ValueError, match="not available"):
        pe.fused_patch_embed(**kw, backend="cpu_ext")


def test_disable_env_reports_reason_in_fresh_process():
    code = (
        "import warnings, torch\n"
        "from bagel_kernels import patch_embed as pe\n"
        "st = pe.extension_status()\n"
        "assert not st.loaded and 'BAGEL_KERNELS_DISABLE_EXT' in st.reason, st\n"
        "x = torch.randn(3, 4); w = torch.randn(5, 4)\n"
        "with warnings.catch_warnings(record=True) as c:\n"
        "    warnings.simplefilter('always')\n"
        "    pe.fused_patch_embed(x, w)\n"
        "    pe.resolve_backend('auto', 'cuda', 'float32')\n"
        "assert pe.last_backend()[0] == 'torch' and any('falls back' in str(m.message) for m in c)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, BAGEL_KERNELS_DISABLE_EXT="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_import_does_not_load_extension():
    """Importing bagel_kernels (and its patch_embed module) must not load or build the library."""
    code = (
        "import torch, bagel_kernels, bagel_kernels.patch_embed as pe\n"
        "assert pe._status is None\n"
        "try:\n"
        "    torch._C._dispatch_find_schema_or_throw('bagel_kernels_ext::fused_patch_embed', '')\n"
        "    print('loaded')\n"
        "except RuntimeError:\n"
        "    print('absent')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "absent", res.stdout + res.stderr


@pytest.mark.skipif(
    os.environ.get("CI", "").lower() != "true", reason="CI=true only: the build must not go missing silently"
)
def test_ci_extension_is_built_and_loaded():
    st = pe.extension_status()
    assert st.loaded and st.cpu, f"CI=true but the CPU extension is not usable: {st}"
    x, w, b, t, ids = make_inputs(4, 12, 8, torch.float32, table_rows=3)
    pe.fused_patch_embed(x, w, b, t, ids, backend="cpu_ext")
    assert pe.last_backend()[0] == "cpu_ext"


@needs_cpu_ext
def test_benchmark_script_tiny(tmp_path):
    """benchmarks/bench_patch_embed.py runs end to end (CPU, tiny shapes; no timing asserted)."""
    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    )
    import bench_patch_embed

    assert bench_patch_embed.main(["--tiny", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "bench_patch_embed.md").read_text()
    assert text.count("fused (images, no sync)") == len(bench_patch_embed.TINY_CASES)
    assert (tmp_path / "bench_patch_embed.png").exists()


# ------------------------------------------------------------------------------------------------- GPU
@pytest.fixture
def no_tf32():
    """float32 matmuls of the torch backward and references in full precision (no TF32)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _fill_cache_with_nan(numel: int = 1 << 26):
    """Make the caching allocator hand out NaN-filled memory next: unwritten outputs show up as NaN."""
    torch.empty(numel, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_cuda_kernel_is_built():
    st = pe.extension_status()
    assert st.loaded and st.cuda, f"CUDA is available but the extension has no CUDA kernel: {st}"


GPU_CASES = [
    # (N, K, E, table rows): so400m shapes, odd shapes (scalar loads, odd hidden), N < one tile
    (4096, 588, 1152, 4900),
    (1000, 588, 1152, 0),
    (97, 75, 201, 13),
    (1, 588, 200, 3),
]


@pytest.fixture(params=["auto", "simt"])
def cuda_kernel(request, monkeypatch) -> str:
    """Each variant of the extension's CUDA kernel, which must be built: "auto" (the tensor-core
    kernel where it applies) and "simt" (forced)."""
    if not _ext_cuda():
        pytest.fail(f"no CUDA kernel: {pe.extension_status()}")
    if request.param == "simt":
        monkeypatch.setenv("BAGEL_KERNELS_PATCH_EMBED_KERNEL", "simt")
    return request.param


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K,E,table", GPU_CASES)
def test_gpu_forward_and_gradients(cuda_kernel, no_tf32, dtype, N, K, E, table):
    x, w, b, t, ids = make_inputs(N, K, E, dtype, device="cuda", table_rows=table, grad=True)
    dy = torch.randn(N, E, dtype=dtype, device="cuda")
    _fill_cache_with_nan()
    out = pe.fused_patch_embed(x, w, b, t, ids, backend="cuda")
    assert pe.last_backend()[0] == "cuda"
    out.backward(dy)
    _close_to_reference(out, dy, (x, w, b, t), ids)
    again = pe.fused_patch_embed(
        x.detach(), w.detach(), b.detach(), None if t is None else t.detach(), ids, backend="cuda"
    )
    torch.testing.assert_close(again, out.detach(), atol=0, rtol=0)  # deterministic forward


GPU_IMAGE_CASES = [
    # (patch, hidden, image sizes, padding): even width -> paired pixel loads; odd width -> single loads;
    # odd patch (runs padded from 5 to 8) -> partial pixel groups
    (14, 1152, [(224, 448), (434, 224), (100, 60)], (2, 2)),
    (14, 1152, [(224, 448), (434, 224), (100, 60)], (3, 5)),
    (5, 200, [(35, 50), (20, 15)], (1, 0)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p,E,sizes,pad", GPU_IMAGE_CASES)
def test_gpu_images_entry(cuda_kernel, no_tf32, dtype, p, E, sizes, pad):
    C = 3
    images, coords, ids = make_images(sizes, C, p, dtype, device="cuda", pad=pad)
    images.requires_grad_(True)
    _, w, b, t, _ = make_inputs(
        1, C * p * p, E, dtype, device="cuda", table_rows=int(ids.max()) + 1, grad=True
    )
    _fill_cache_with_nan()
    out = pe.fused_patch_embed_images(images, coords, p, w, b, t, ids, backend="cuda")
    patches = reference.patchify_images(images.detach(), coords, p)
    out_pat = pe.fused_patch_embed(patches, w.detach(), b.detach(), t.detach(), ids, backend="cuda")
    # the tensor-core kernel sums the images entry in another k order: equal up to rounding
    close(out.detach(), out_pat, dtype, "fwd", "images vs patches entry")
    dy = torch.randn_like(out)
    out.backward(dy)
    _close_to_images_reference(out, dy, (images, w, b, t), coords, p, ids)


@pytest.mark.gpu
def test_gpu_misaligned_and_bad_ids():
    if not _ext_cuda():
        pytest.fail(f"no CUDA kernel: {pe.extension_status()}")
    big, w, b, t, ids = make_inputs(300, 589, 130, torch.bfloat16, device="cuda", table_rows=7)
    x = big[:, 1:]  # start 2 bytes off, row stride 589: no vector loads
    w = w[:, 1:].contiguous()
    out = pe.fused_patch_embed(x, w, b, t, ids, backend="cuda")
    ref, _ = reference64(x, w, b, t, ids)
    close(out, ref, torch.bfloat16, "fwd", "misaligned")
    bad = ids.clone()
    bad[5] = 7
    with pytest.raises(ValueError, match="pos_ids"):
        pe.fused_patch_embed(x, w, b, t, bad, backend="cuda")
    out_nan = pe.fused_patch_embed(x, w, b, t, bad, backend="cuda", check_indices=False)
    assert torch.isnan(out_nan[5]).all()
    good = torch.arange(300, device="cuda") != 5
    torch.testing.assert_close(out_nan[good], out[good], atol=0, rtol=0)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    if not _ext_cuda():
        pytest.fail(f"no CUDA kernel: {pe.extension_status()}")
    op = torch.ops.bagel_kernels_ext.fused_patch_embed.default
    for args in _opcheck_cases("cuda", torch.bfloat16):
        torch.library.opcheck(op, args)
    x, w, b, t, ids = make_inputs(300, 588, 64, torch.bfloat16, device="cuda", table_rows=9, grad=True)
    f = lambda x, w, b, t: pe.fused_patch_embed(x, w, b, t, ids, check_indices=False).float().square().sum()
    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, b, t)  # inductor: see the CPU test
    grads = torch.autograd.grad(loss, (w, b, t))
    loss_ref = f(x, w, b, t)
    grads_ref = torch.autograd.grad(loss_ref, (w, b, t))
    torch.testing.assert_close(loss, loss_ref, atol=1e-2, rtol=1e-3)
    for g, gr in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, gr, atol=1e-2, rtol=1e-2)

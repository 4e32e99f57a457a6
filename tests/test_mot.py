"""MoT routed ops (bagel_kernels.mot) against their gather/scatter references.

Kernels run under the Triton interpreter on CPU (fp32, fp16); bf16 goes through the torch backend
here and through the kernels in the ``gpu`` tests. References are evaluated in float64 and compared
with the shared tolerance table. Inputs are strided views into NaN-filled buffers (extra columns and
rows), so a kernel that reads outside its rows or columns, or leaves an output unwritten, fails.
"""

from __future__ import annotations

import pytest
import torch

from bagel_kernels import mot, reference
from bagel_kernels.testing import tolerance

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
KERNEL_DTYPES = (torch.float32, torch.float16)  # interpreter: bf16 arithmetic is wrong there
N = 45
N_UNDS = (0, 17, N)  # none, middle (not aligned with any block), all


def nan_view(shape, dtype, *, device=DEV, extra_cols=3, extra_rows=2, scale=1.0):
    """Random values in a view of a NaN buffer with ``extra_cols`` more columns (last dim folded) and
    ``extra_rows`` more rows: a non-contiguous row stride and NaN right beside the data."""
    rows, rest = shape[0], list(shape[1:])
    width = 1
    for s in rest:
        width *= s
    buf = torch.full((rows + extra_rows, width + extra_cols), float("nan"), dtype=dtype, device=device)
    view = buf[:rows, :width].view(rows, *rest) if rest else buf[:rows, 0]
    view.copy_(torch.randn(shape, device=device) * scale)
    return view


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.requires_grad_()


def f64(ts):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in ts]


def assert_close(actual, expected, dtype, direction, what=""):
    atol, rtol = tolerance(dtype, direction)
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def check_grads(inputs, inputs64, dtype, names):
    for name, t, r in zip(names, inputs, inputs64, strict=False):  # names may run longer
        if t.requires_grad:
            assert t.grad is not None, f"no gradient for {name}"
            assert torch.isfinite(t.grad).all(), f"non-finite gradient for {name}"
            assert_close(t.grad, r.grad, dtype, "bwd", f"d{name}")


def cases(backend_dtypes):
    return [(b, d, n) for b, ds in backend_dtypes for d in ds for n in N_UNDS]


CASES = cases((("triton", KERNEL_DTYPES), ("torch", (torch.bfloat16, torch.float32))))


# ============================================================================================ rms norm
@pytest.mark.parametrize("backend,dtype,n_und", CASES)
def test_mot_rms_norm(backend, dtype, n_und):
    H = 97
    x = leaf(nan_view((N, H), dtype))
    wu = leaf(1 + 0.5 * torch.randn(H, dtype=dtype, device=DEV))
    wg = leaf(1 + 0.5 * torch.randn(H, dtype=dtype, device=DEV))
    y = mot.mot_rms_norm(x, n_und, wu, wg, 1e-6, backend=backend)
    assert y.shape == (N, H) and y.dtype == dtype
    g = torch.randn(N, H, device=DEV, dtype=dtype)
    y.backward(g)
    ins64 = f64([x, wu, wg])
    ref = reference.mot_rms_norm_reference(ins64[0], n_und, ins64[1], ins64[2], 1e-6)
    assert_close(y, ref, dtype, "fwd", "y")
    ref.backward(g.double())
    check_grads([x, wu, wg], ins64, dtype, ["x", "weight_und", "weight_gen"])
    if n_und == N:
        assert wg.grad.abs().max() == 0
    if n_und == 0:
        assert wu.grad.abs().max() == 0


def test_mot_rms_norm_fp32_weights_promote_and_frozen_und():
    """fp16 activations with fp32 weights give fp32 (Qwen2: weight * x.to(input_dtype)); a frozen
    expert gets no gradient; a stride-0 incoming gradient (from .sum()) is handled."""
    H = 200
    backend = "triton"
    x = leaf(nan_view((N, H), torch.float16))
    wu = torch.randn(H, dtype=torch.float32, device=DEV)  # frozen
    wg = leaf(torch.randn(H, dtype=torch.float32, device=DEV))
    y = mot.mot_rms_norm(x, 20, wu, wg, backend=backend)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert wu.grad is None
    ins64 = f64([x, wu, wg])
    ref = reference.mot_rms_norm_reference(ins64[0], 20, ins64[1], ins64[2])
    # the kernel rounds x_hat to fp16 before the fp32 weight multiply (as Qwen2 does): fp16 tolerance
    assert_close(y, ref, torch.float16, "fwd", "y")
    ref.sum().backward()
    check_grads([x, wg], [ins64[0], ins64[2]], torch.float16, ["x", "weight_gen"])


@pytest.mark.gpu
def test_backward_is_deterministic():
    """Reruns of the backward kernels are bit-identical. A GPU test: the Triton interpreter runs programs
    one after another, so a race or an atomic accumulation order could never show on a CPU."""
    x = nan_view((N, 64), torch.float32)
    wu, wg = torch.randn(64, device=DEV), torch.randn(64, device=DEV)
    g = torch.randn(N, 64, device=DEV)
    outs = [torch.ops.bagel_kernels.mot_rms_norm_backward(g, x, 17, wu, wg, 1e-6) for _ in range(2)]
    q, k = torch.randn(N, 3, 16, device=DEV), torch.randn(N, 1, 16, device=DEV)
    ws = [torch.randn(16, device=DEV) for _ in range(4)]
    cos, sin = mot.rope_cos_sin(torch.arange(N, device=DEV), 16, 1e4)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    qk = [
        torch.ops.bagel_kernels.mot_qk_norm_rope_backward(gq, gk, q, k, 17, *ws, cos, sin, 1e-6, True)
        for _ in range(2)
    ]
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(*qk, strict=True):
        assert torch.equal(a, b)


# ============================================================================================ q/k norm + rope
QK_SHAPES = [(3, 1, 72), (4, 2, 128)]


@pytest.mark.parametrize("hq,hkv,d", QK_SHAPES)
@pytest.mark.parametrize("backend,dtype,n_und", CASES)
def test_mot_qk_norm_rope(backend, dtype, n_und, hq, hkv, d):
    n = 29
    n_und = min(n_und, n)
    # q and k as head views of a fused projection output with NaN padding (as the model slices qkv)
    qkv = nan_view((n, (hq + 2 * hkv) * d), dtype, extra_cols=5)
    q = qkv[:, : hq * d].view(n, hq, d).detach().requires_grad_()
    k = qkv[:, hq * d : (hq + hkv) * d].view(n, hkv, d).detach().requires_grad_()
    ws = [leaf(1 + 0.3 * torch.randn(d, dtype=dtype, device=DEV)) for _ in range(4)]
    pos = torch.randint(0, 4096, (n,), device=DEV)
    cos, sin = mot.rope_cos_sin(pos, d, 1e6)
    cos, sin = leaf(cos), leaf(sin)
    qo, ko = mot.mot_qk_norm_rope(q, k, n_und, *ws, cos, sin, backend=backend)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    gq = torch.randn_like(qo)
    gk = torch.randn_like(ko)
    ((qo * gq).sum() + (ko * gk).sum()).backward()
    ins = [q, k, *ws, cos, sin]
    ins64 = f64(ins)
    # cos/sin rounded to the activations' dtype first, as in Qwen2 (the kernel does the same)
    c64, s64 = (t.to(dtype).double().detach().requires_grad_() for t in (cos, sin))
    qr, kr = reference.mot_qk_norm_rope_reference(ins64[0], ins64[1], n_und, *ins64[2:6], c64, s64)
    assert_close(qo, qr, dtype, "fwd", "q_out")
    assert_close(ko, kr, dtype, "fwd", "k_out")
    ((qr * gq.double()).sum() + (kr * gk.double()).sum()).backward()
    ins64[6].grad, ins64[7].grad = c64.grad, s64.grad
    names = ["q", "k", "q_weight_und", "q_weight_gen", "k_weight_und", "k_weight_gen", "cos", "sin"]
    check_grads(ins, ins64, dtype, names)


def test_mot_qk_norm_rope_frozen_weights_and_constant_tables():
    """The common training call: cos/sin without grad, und weights frozen (freeze_und)."""
    n, hq, hkv, d = 21, 2, 1, 64
    q = leaf(nan_view((n, hq, d), torch.float32))
    k = leaf(nan_view((n, hkv, d), torch.float32))
    wqu, wku = torch.randn(d, device=DEV), torch.randn(d, device=DEV)
    wqg, wkg = leaf(torch.randn(d, device=DEV)), leaf(torch.randn(d, device=DEV))
    cos, sin = mot.rope_cos_sin(torch.arange(n, device=DEV), d, 10000.0)
    qo, ko = mot.mot_qk_norm_rope(q, k, 8, wqu, wqg, wku, wkg, cos, sin, backend="triton")
    (qo.sum() + ko.pow(2).sum()).backward()
    assert wqu.grad is None and wku.grad is None
    ins64 = f64([q, k, wqu, wqg, wku, wkg])
    qr, kr = reference.mot_qk_norm_rope_reference(*ins64[:2], 8, *ins64[2:], cos.double(), sin.double())
    (qr.sum() + kr.pow(2).sum()).backward()
    check_grads(
        [q, k, wqg, wkg], [ins64[0], ins64[1], ins64[3], ins64[5]], torch.float32, ["q", "k", "wqg", "wkg"]
    )


# ============================================================================================ rope tables
@pytest.mark.parametrize("head_dim,theta", [(128, 1e6), (72, 10000.0), (64, 500000)])
def test_rope_cos_sin_matches_transformers(head_dim, theta):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    heads = 4
    cfg = Qwen2Config(
        hidden_size=heads * head_dim, num_attention_heads=heads, head_dim=head_dim, rope_theta=theta
    )
    rot = Qwen2RotaryEmbedding(cfg)
    pos = torch.cat((torch.arange(0, 50), torch.randint(0, 40000, (50,)), torch.tensor([32767, 0, 7])))
    for dtype in (torch.float32, torch.bfloat16):
        c_hf, s_hf = rot(torch.zeros(1, dtype=dtype), pos[None])
        c, s = mot.rope_cos_sin(pos, head_dim, theta, dtype=dtype)
        assert c.dtype == dtype and c.shape == (pos.numel(), head_dim)
        assert torch.equal(c, c_hf[0]) and torch.equal(s, s_hf[0])


# ============================================================================================ swiglu
@pytest.mark.parametrize(
    "backend,dtype", [("triton", torch.float32), ("triton", torch.float16), ("torch", torch.bfloat16)]
)
def test_swiglu(backend, dtype):
    inter = 200
    gu = nan_view((N, 2 * inter), dtype, extra_cols=7, scale=2.0)  # fused gate/up projection output
    gate = gu[:, :inter].detach().requires_grad_()
    up = gu[:, inter:].detach().requires_grad_()
    y = mot.swiglu(gate, up, backend=backend)
    assert y.shape == (N, inter) and y.dtype == dtype
    g = torch.randn_like(y)
    y.backward(g)
    ins64 = f64([gate, up])
    ref = reference.swiglu_reference(*ins64)
    assert_close(y, ref, dtype, "fwd", "y")
    ref.backward(g.double())
    check_grads([gate, up], ins64, dtype, ["gate", "up"])


def test_swiglu_stride0_grad_and_one_sided():
    gate = leaf(nan_view((13, 97), torch.float32))
    up = nan_view((13, 97), torch.float32)
    mot.swiglu(gate, up, backend="triton").sum().backward()
    g64 = gate.detach().double().requires_grad_()
    reference.swiglu_reference(g64, up.double()).sum().backward()
    assert_close(gate.grad, g64.grad, torch.float32, "bwd", "dgate")


# ============================================================================================ routed linear
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_und", N_UNDS)
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("bias", ["both", "none", "gen_only"])
def test_mot_linear(dtype, n_und, backend, bias):
    hin, hout = 37, 23
    x = leaf(nan_view((N, hin), dtype))
    wu = leaf(torch.randn(hout, hin, dtype=dtype, device=DEV) / hin**0.5)
    wg = leaf(torch.randn(hout, hin, dtype=dtype, device=DEV) / hin**0.5)
    bu = leaf(torch.randn(hout, dtype=dtype, device=DEV)) if bias == "both" else None
    bg = leaf(torch.randn(hout, dtype=dtype, device=DEV)) if bias in ("both", "gen_only") else None
    y = mot.mot_linear(x, n_und, wu, bu, wg, bg, backend=backend)
    assert y.shape == (N, hout) and y.dtype == dtype
    g = torch.randn_like(y)
    y.backward(g)
    ins = [x, wu, wg] + [b for b in (bu, bg) if b is not None]
    ins64 = f64(ins)
    m = {id(t): t64 for t, t64 in zip(ins, ins64, strict=True)}
    ref = reference.mot_linear_reference(
        m[id(x)],
        n_und,
        m[id(wu)],
        m.get(id(bu)) if bu is not None else None,
        m[id(wg)],
        m.get(id(bg)) if bg is not None else None,
    )
    assert_close(y, ref, dtype, "fwd", "y")
    ref.backward(g.double())
    check_grads(ins, ins64, dtype, ["x", "weight_und", "weight_gen", "bias", "bias"])


def test_mot_linear_frozen_und_skips_its_gradient():
    x = leaf(torch.randn(N, 16, device=DEV))
    wu = torch.randn(8, 16, device=DEV)
    wg = leaf(torch.randn(8, 16, device=DEV))
    y = mot.mot_linear(x, 10, wu, None, wg, None)
    y.pow(2).sum().backward()
    assert wu.grad is None and wg.grad is not None and x.grad is not None
    dx, dwu, dwg, dbu, dbg = torch.ops.bagel_kernels.mot_linear_backward(
        y, x, 10, wu, wg, True, False, True, False, False
    )
    assert dwu.numel() == 0 and dbu.numel() == 0 and dbg.numel() == 0
    torch.testing.assert_close(dwg, y[10:].t() @ x[10:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, torch.cat((y[:10] @ wu, y[10:] @ wg)), atol=1e-5, rtol=1e-5)


# ============================================================================================ permutation
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_permute_rows(backend, dtype, idx_dtype):
    x = leaf(nan_view((N, 3, 5), dtype, extra_cols=0).contiguous())
    perm = torch.randperm(N, device=DEV).to(idx_dtype)
    y = mot.permute_rows(x, perm, backend=backend)
    assert torch.equal(y, x.detach()[perm.long()])
    g = torch.randn_like(y)
    y.backward(g)
    expect = torch.empty_like(g)
    expect[perm.long()] = g
    assert torch.equal(x.grad, expect)


def test_permute_rows_roundtrip_with_grouped_order():
    total = 40
    gen = torch.tensor(sorted(torch.randperm(total)[:15].tolist()))
    und = torch.tensor([i for i in range(total) if i not in set(gen.tolist())])
    perm, inv, n_und = mot.grouped_order(und, gen, total)
    assert n_und == 25
    x = torch.randn(total, 6)
    grouped = mot.permute_rows(x, perm, backend="triton")
    assert torch.equal(grouped[:n_und], x[und]) and torch.equal(grouped[n_und:], x[gen])
    assert torch.equal(mot.permute_rows(grouped, inv, backend="triton"), x)
    assert torch.equal(perm[inv], torch.arange(total))


@pytest.mark.parametrize(
    "und,gen,total,match",
    [
        ([0, 1, 2], [2, 3], 5, "disjoint"),
        ([0, 1], [3], 4, "together hold total"),
        ([0, 1, 5], [3], 4, "disjoint"),
        ([0, -1], [2], 3, "disjoint"),
    ],
)
def test_grouped_order_rejects_non_partitions(und, gen, total, match):
    with pytest.raises(ValueError, match=match):
        mot.grouped_order(torch.tensor(und), torch.tensor(gen), total)


def test_grouped_order_edge_cases_and_types():
    perm, inv, n = mot.grouped_order(torch.arange(5), torch.zeros(0, dtype=torch.long), 5)
    assert n == 5 and torch.equal(perm, torch.arange(5)) and torch.equal(inv, torch.arange(5))
    perm, inv, n = mot.grouped_order(torch.zeros(0, dtype=torch.int32), torch.arange(3, dtype=torch.int32), 3)
    assert n == 0 and perm.dtype == torch.int64
    with pytest.raises(ValueError, match="und_indexes must hold integers"):
        mot.grouped_order(torch.arange(3.0), torch.arange(0), 3)
    with pytest.raises(ValueError, match="total"):
        mot.grouped_order(torch.arange(3), torch.arange(0), -1)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_grouped_order_is_a_validated_value(backend):
    """A GroupedOrder is checked once when built (or its partition flags read back by the caller:
    from_checked); group_rows/ungroup_rows and PackedMask.with_row_index then take it without a value
    check, with the same results as the checked functions, gradients included."""
    from bagel_kernels import PackedMask

    total = 12
    gen = torch.tensor([1, 4, 5, 9])
    und = torch.tensor([i for i in range(total) if i not in (1, 4, 5, 9)])
    order = mot.grouped_order(und, gen, total)
    assert isinstance(order, mot.GroupedOrder) and order.total == total and order.n_und == 8
    assert not bool(mot.GroupedOrder.partition_flags(und, gen, total))
    assert bool(mot.GroupedOrder.partition_flags(und, torch.tensor([1, 4, 5, 5]), total))
    checked = mot.GroupedOrder.from_checked(und, gen, total)
    assert all(torch.equal(a, b) for a, b in zip(order[:2], checked[:2], strict=True))
    with pytest.raises(AttributeError, match="immutable"):
        order.n_und = 3
    x = torch.randn(total, 3, 2, requires_grad=True)
    g = torch.randn(total, 3, 2)
    y = mot.group_rows(x, order, backend=backend)
    (dx,) = torch.autograd.grad(y, x, g)
    y_ref = mot.permute_rows(x, order.perm, backend=backend)
    (dx_ref,) = torch.autograd.grad(y_ref, x, g)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    assert torch.equal(mot.ungroup_rows(y, order, backend=backend), x)
    mask = PackedMask.from_splits([total], [total], ["causal"])
    assert torch.equal(mask.with_row_index(order).row_index, mask.with_row_index(order.inv).row_index)
    with pytest.raises(ValueError, match="covers 12 tokens"):
        PackedMask.from_splits([5], [5], ["causal"]).with_row_index(order)
    with pytest.raises(ValueError, match="order must be a GroupedOrder"):
        mot.group_rows(x, order.perm)


# ============================================================================================ validation
def _bad_calls():
    x = torch.randn(6, 8)
    w = torch.ones(8)
    q, k = torch.randn(6, 2, 8), torch.randn(6, 1, 8)
    wd = torch.ones(8)
    cs = torch.ones(6, 8)
    g = torch.randn(6, 5)
    lw = torch.randn(4, 8)
    return [
        ("x must have 2", lambda: mot.mot_rms_norm(x[None], 3, w, w)),
        ("x has dtype", lambda: mot.mot_rms_norm(x.int(), 3, w, w)),
        ("n_und=7", lambda: mot.mot_rms_norm(x, 7, w, w)),
        ("n_und=-1", lambda: mot.mot_rms_norm(x, -1, w, w)),
        ("n_und must be an int", lambda: mot.mot_rms_norm(x, 2.0, w, w)),
        ("weight_gen must have shape", lambda: mot.mot_rms_norm(x, 3, w, torch.ones(7))),
        ("weight_gen has dtype", lambda: mot.mot_rms_norm(x, 3, w, w.half())),
        ("eps", lambda: mot.mot_rms_norm(x, 3, w, w, -1.0)),
        ("backend must be one of", lambda: mot.mot_rms_norm(x, 3, w, w, backend="cuda")),
        ("k has 5 tokens", lambda: mot.mot_qk_norm_rope(q, k[:5], 3, wd, wd, wd, wd, cs, cs)),
        ("k head dim", lambda: mot.mot_qk_norm_rope(q, k[..., :4], 3, wd, wd, wd, wd, cs, cs)),
        ("k has dtype", lambda: mot.mot_qk_norm_rope(q, k.half(), 3, wd, wd, wd, wd, cs, cs)),
        (
            "must be even",
            lambda: mot.mot_qk_norm_rope(
                q[..., :7], k[..., :7], 3, wd[:7], wd[:7], wd[:7], wd[:7], cs[:, :7], cs[:, :7]
            ),
        ),
        (
            "k_weight_gen must have shape",
            lambda: mot.mot_qk_norm_rope(q, k, 3, wd, wd, wd, torch.ones(4), cs, cs),
        ),
        ("q_weight_gen has dtype", lambda: mot.mot_qk_norm_rope(q, k, 3, wd, wd.double(), wd, wd, cs, cs)),
        ("cos must have shape", lambda: mot.mot_qk_norm_rope(q, k, 3, wd, wd, wd, wd, cs[:5], cs)),
        ("sin must have 2", lambda: mot.mot_qk_norm_rope(q, k, 3, wd, wd, wd, wd, cs, cs[None])),
        ("n_und=9", lambda: mot.mot_qk_norm_rope(q, k, 9, wd, wd, wd, wd, cs, cs)),
        ("up has shape", lambda: mot.swiglu(g, g[:, :4])),
        ("up has dtype", lambda: mot.swiglu(g, g.double())),
        ("gate must have 2", lambda: mot.swiglu(g[0], g[0])),
        ("weight_gen must have shape", lambda: mot.mot_linear(x, 2, lw, None, lw[:3], None)),
        ("weight_und has dtype", lambda: mot.mot_linear(x, 2, lw.double(), None, lw, None)),
        ("bias_gen must have shape", lambda: mot.mot_linear(x, 2, lw, None, lw, torch.ones(3))),
        ("n_und=8", lambda: mot.mot_linear(x, 8, lw, None, lw, None)),
        ("not a permutation", lambda: mot.permute_rows(x, torch.tensor([0, 1, 2, 3, 4, 4]), backend="torch")),
        ("not a permutation", lambda: mot.permute_rows(x, torch.tensor([0, 1, 2, 3, 4, 6]), backend="torch")),
        ("index has 5 entries", lambda: mot.permute_rows(x, torch.arange(5))),
        ("index must be int32 or int64", lambda: mot.permute_rows(x, torch.arange(6.0))),
        ("head_dim must be a positive even", lambda: mot.rope_cos_sin(torch.arange(4), 7, 1e4)),
        ("position_ids must hold integers", lambda: mot.rope_cos_sin(torch.arange(4.0), 8, 1e4)),
        ("theta", lambda: mot.rope_cos_sin(torch.arange(4), 8, 0.0)),
        (
            "'triton' refuses.*takes float16, bfloat16, float32 inputs \\(got float64\\)",
            lambda: mot.swiglu(g.double(), g.double(), backend="triton"),
        ),
        ("weight_und is on meta", lambda: mot.mot_rms_norm(x, 3, w.to("meta"), w)),
        ("cos is on meta", lambda: mot.mot_qk_norm_rope(q, k, 3, wd, wd, wd, wd, cs.to("meta"), cs)),
        ("k is on meta", lambda: mot.mot_qk_norm_rope(q, k.to("meta"), 3, wd, wd, wd, wd, cs, cs)),
        ("up is on meta", lambda: mot.swiglu(g, g.to("meta"))),
        ("bias_und is on meta", lambda: mot.mot_linear(x, 2, lw, torch.ones(4, device="meta"), lw, None)),
        ("index is on meta", lambda: mot.permute_rows(x, torch.arange(6, device="meta"))),
        (
            "gen_indexes is on meta",
            lambda: mot.grouped_order(torch.arange(3), torch.arange(3, 6, device="meta"), 6),
        ),
    ]


@pytest.mark.parametrize("match,call", _bad_calls(), ids=[m for m, _ in _bad_calls()])
def test_bad_input_raises_value_error(match, call):
    with pytest.raises(ValueError, match=match):
        call()


def test_permute_rows_kernel_rejects_non_permutation():
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="not a permutation"):
        mot.permute_rows(x, torch.tensor([0, 1, 2, 3, 5, 5]), backend="triton")


def _bad_op_calls():
    """The registered ops called directly (``torch.ops.bagel_kernels.*`` is public surface): each case
    would make a kernel address memory outside its tensors (an index of 10**6, a short index or
    weight, a gradient of another shape, a split point beyond the rows)."""
    ops = torch.ops.bagel_kernels
    n, h, d = 6, 8, 4
    x = torch.randn(n, h, device=DEV)
    w = torch.ones(h, device=DEV)
    q, k = torch.randn(n, 2, d, device=DEV), torch.randn(n, 1, d, device=DEV)
    wd, cs = torch.ones(d, device=DEV), torch.ones(n, d, device=DEV)
    g = torch.randn(n, 5, device=DEV)
    lw = torch.randn(3, h, device=DEV)
    big = torch.tensor([0, 1, 2, 3, 4, 10**6], device=DEV)
    return [
        ("not a permutation", lambda: ops.scatter_rows(x, big)),
        ("not a permutation", lambda: ops.permute_rows(x, big)),
        ("not a permutation", lambda: ops.permute_rows(x, -big)),
        ("not a permutation", lambda: ops.scatter_rows(x, torch.zeros(n, dtype=torch.long, device=DEV))),
        ("index has 2 entries", lambda: ops.permute_rows(x, torch.arange(2, device=DEV))),
        ("index has 2 entries", lambda: ops.scatter_rows(x, torch.arange(2, device=DEV))),
        ("index must be a 1-D int32/int64", lambda: ops.scatter_rows(x, torch.arange(6.0, device=DEV))),
        ("weight_und must have shape", lambda: ops.mot_rms_norm(x, 3, w[:1], w, 1e-6)),
        ("n_und=-5", lambda: ops.mot_rms_norm(x, -5, w, w, 1e-6)),
        ("n_und=99", lambda: ops.mot_rms_norm(x, 99, w, w, 1e-6)),
        ("dy must have the shape", lambda: ops.mot_rms_norm_backward(x[:2], x, 3, w, w, 1e-6)),
        ("has dtype torch.int64", lambda: ops.mot_rms_norm(x.long(), 3, w, w, 1e-6)),
        ("cos must have shape", lambda: ops.mot_qk_norm_rope(q, k, 3, wd, wd, wd, wd, cs[:1], cs, 1e-6)),
        (
            "k_weight_gen must have shape",
            lambda: ops.mot_qk_norm_rope(q, k, 3, wd, wd, wd, wd[:1], cs, cs, 1e-6),
        ),
        ("k must be", lambda: ops.mot_qk_norm_rope(q, k[:2], 3, wd, wd, wd, wd, cs, cs, 1e-6)),
        (
            "dk_out must have the shape",
            lambda: ops.mot_qk_norm_rope_backward(q, k[:1], q, k, 3, wd, wd, wd, wd, cs, cs, 1e-6, True),
        ),
        ("up must have the shape", lambda: ops.swiglu(g, g[:1])),
        ("dy must have the shape", lambda: ops.swiglu_backward(g[:, :2], g, g)),
        ("weight_gen must have shape", lambda: ops.mot_linear(x, 2, lw, None, lw[:1], None)),
        ("n_und=7", lambda: ops.mot_linear(x, 7, lw, None, lw, None)),
        (
            "dy must have shape",
            lambda: ops.mot_linear_backward(g, x, 2, lw, lw, True, True, True, True, True),
        ),
    ]


@pytest.mark.parametrize(
    "match,call", _bad_op_calls(), ids=[f"{i}-{m}" for i, (m, _) in enumerate(_bad_op_calls())]
)
def test_registered_ops_check_their_arguments(match, call):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "torch.ops.bagel_kernels." in str(info.value)  # the error names the op


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU refusal")
def test_triton_backend_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        mot.mot_rms_norm(x, 2, torch.ones(8), torch.ones(8), backend="triton")
    # auto never picks the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    y = mot.mot_rms_norm(x, 2, torch.ones(8), torch.ones(8))
    torch.testing.assert_close(y, reference.mot_rms_norm_reference(x, 2, torch.ones(8), torch.ones(8)))


# ============================================================================================ opcheck / compile
def _opcheck_cases():
    n, h, d = 7, 24, 16
    x = torch.randn(n, h, device=DEV, requires_grad=True)
    w = [torch.randn(h, device=DEV, requires_grad=True) for _ in range(2)]
    q = torch.randn(n, 2, d, device=DEV, requires_grad=True)
    k = torch.randn(n, 1, d, device=DEV, requires_grad=True)
    wd = [torch.randn(d, device=DEV, requires_grad=True) for _ in range(4)]
    cos, sin = mot.rope_cos_sin(torch.arange(n, device=DEV), d, 1e4)
    gate, up = (torch.randn(n, 20, device=DEV, requires_grad=True) for _ in range(2))
    lw = [torch.randn(5, h, device=DEV, requires_grad=True) for _ in range(2)]
    lb = torch.randn(5, device=DEV, requires_grad=True)
    perm = torch.randperm(n, device=DEV)
    ops = torch.ops.bagel_kernels
    return [
        ("mot_rms_norm", ops.mot_rms_norm, (x, 3, w[0], w[1], 1e-6)),
        (
            "mot_rms_norm_backward",
            ops.mot_rms_norm_backward,
            (torch.randn(n, h), x.detach(), 3, w[0].detach(), w[1].detach(), 1e-6),
        ),
        ("mot_qk_norm_rope", ops.mot_qk_norm_rope, (q, k, 4, *wd, cos, sin, 1e-6)),
        (
            "mot_qk_norm_rope_backward",
            ops.mot_qk_norm_rope_backward,
            (
                torch.randn(n, 2, d),
                torch.randn(n, 1, d),
                q.detach(),
                k.detach(),
                4,
                *[t.detach() for t in wd],
                cos,
                sin,
                1e-6,
                True,
            ),
        ),
        ("swiglu", ops.swiglu, (gate, up)),
        ("swiglu_backward", ops.swiglu_backward, (torch.randn(n, 20), gate.detach(), up.detach())),
        ("mot_linear", ops.mot_linear, (x, 2, lw[0], None, lw[1], lb)),
        (
            "mot_linear_backward",
            ops.mot_linear_backward,
            (
                torch.randn(n, 5),
                x.detach(),
                2,
                lw[0].detach(),
                lw[1].detach(),
                True,
                True,
                False,
                False,
                True,
            ),
        ),
        ("permute_rows", ops.permute_rows, (x, perm)),
        ("scatter_rows", ops.scatter_rows, (x, perm)),
    ]


@pytest.mark.parametrize("name,op,args", _opcheck_cases(), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


def _mini_layer(x, n_und, p, cos, sin, backend):
    """One MoT decoder layer's routed ops, in the order the model calls them."""
    h = mot.mot_rms_norm(x, n_und, p["ln_u"], p["ln_g"], backend=backend)
    qkv = mot.mot_linear(h, n_und, p["qkv_u"], p["qkv_b"], p["qkv_g"], p["qkv_b"], backend=backend)
    q = qkv[:, :32].view(-1, 2, 16)
    k = qkv[:, 32:48].view(-1, 1, 16)
    q, k = mot.mot_qk_norm_rope(
        q, k, n_und, p["qn_u"], p["qn_g"], p["kn_u"], p["kn_g"], cos, sin, backend=backend
    )
    a = q.flatten(1) + k.flatten(1).repeat(1, 2)
    gu = mot.mot_linear(a, n_und, p["gu_u"], None, p["gu_g"], None, backend=backend)
    return mot.swiglu(gu[:, :24], gu[:, 24:], backend=backend)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    n, hid = 19, 40
    gen = torch.Generator(device="cpu").manual_seed(1)

    def r(*s):
        return (torch.randn(*s, generator=gen) * 0.3).to(DEV).requires_grad_()

    p = {
        "ln_u": r(hid),
        "ln_g": r(hid),
        "qkv_u": r(64, hid),
        "qkv_g": r(64, hid),
        "qkv_b": r(64),
        "qn_u": r(16),
        "qn_g": r(16),
        "kn_u": r(16),
        "kn_g": r(16),
        "gu_u": r(48, 32),
        "gu_g": r(48, 32),
    }
    x = r(n, hid)
    perm = torch.randperm(n, device=DEV)
    cos, sin = mot.rope_cos_sin(torch.arange(n, device=DEV)[perm], 16, 1e4)

    def f(x):
        xg = mot.permute_rows(x, perm, backend="triton")
        return _mini_layer(xg, 7, p, cos, sin, "triton").pow(2).sum()

    params = [x, *p.values()]
    eager = f(x)
    g_eager = torch.autograd.grad(eager, params)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    g_comp = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, eager)
    for a, b in zip(g_comp, g_eager, strict=True):
        torch.testing.assert_close(a, b)
    # and the torch backend agrees with the kernels on the whole layer
    ref = _mini_layer(mot.permute_rows(x, perm, backend="torch"), 7, p, cos, sin, "torch").pow(2).sum()
    assert_close(eager, ref, torch.float32, "fwd", "layer")


# ============================================================================================ compile specs
def test_compile_specs_cover_every_kernel():
    from bagel_kernels import mot_triton

    specs = mot_triton.compile_specs(90)
    kernels = {getattr(mot_triton, n) for n in dir(mot_triton) if n.startswith("_") and n.endswith("_kernel")}
    assert {spec[1] for spec in specs} == kernels
    assert len({spec[0] for spec in specs}) == len(specs)
    for name, fn, sig, consts, options in specs:
        assert set(sig) == set(fn.arg_names), name
        assert {a for a, t in sig.items() if t == "constexpr"} == set(consts), name
        assert options["num_warps"] in (2, 4, 8, 16), name
        for dt in ("fp16", "bf16"):
            assert any(dt in s[0] and s[1] is fn for s in specs), (name, dt)


# ============================================================================================ low precision at scale
def _run(fn, inputs, grads):
    """Outputs and input gradients of ``fn(*inputs)`` for output gradients ``grads``."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def _check_lowp_rule(name, fn_kernel, fn_torch, fn_ref, inputs, grads):
    """flash-attention's rule: against a float64 reference, the kernel's error (outputs and every
    input gradient) is at most twice that of the same math run by PyTorch in the low precision.
    Weight gradients sum over thousands of rows, so a fixed absolute tolerance does not fit them."""
    got = _run(fn_kernel, inputs, grads)
    low = _run(fn_torch, inputs, grads)
    ref = _run(fn_ref, [t.double() for t in inputs], [g.double() for g in grads])
    for i, (a, b, r) in enumerate(zip(got, low, ref, strict=True)):
        assert torch.isfinite(a).all(), f"{name}[{i}]: non-finite"
        ek = (a.double() - r).abs().max().item()
        et = (b.double() - r).abs().max().item()
        assert ek <= 2 * et + 1e-6 * r.abs().max().item(), (
            f"{name}[{i}]: kernel error {ek:.3g} > 2 x torch {et:.3g}"
        )


def _lowp_cases(device, dtype, n, n_und, hid, inter, hq, hkv, d):
    g = torch.Generator(device="cpu").manual_seed(n_und)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)

    x, dy = r(n, hid), r(n, hid)
    wu, wg = r(hid, scale=0.5, shift=1.0), r(hid, scale=0.5, shift=1.0)
    _check_lowp_rule(
        "mot_rms_norm",
        lambda *a: mot.mot_rms_norm(a[0], n_und, a[1], a[2], backend="triton"),
        lambda *a: mot.mot_rms_norm(a[0], n_und, a[1], a[2], backend="torch"),
        lambda *a: reference.mot_rms_norm_reference(a[0], n_und, a[1], a[2]),
        [x, wu, wg],
        [dy],
    )
    q, k = r(n, hq, d), r(n, hkv, d)
    ws = [r(d, scale=0.3, shift=1.0) for _ in range(4)]
    cos, sin = mot.rope_cos_sin(torch.randint(0, 8192, (n,), generator=g).to(device), d, 1e6, dtype=dtype)
    _check_lowp_rule(
        "mot_qk_norm_rope",
        lambda *a: mot.mot_qk_norm_rope(a[0], a[1], n_und, *a[2:], cos, sin, backend="triton"),
        lambda *a: mot.mot_qk_norm_rope(a[0], a[1], n_und, *a[2:], cos, sin, backend="torch"),
        lambda *a: reference.mot_qk_norm_rope_reference(
            a[0], a[1], n_und, *a[2:], cos.double(), sin.double()
        ),
        [q, k, *ws],
        [r(n, hq, d), r(n, hkv, d)],
    )
    _check_lowp_rule(
        "swiglu",
        lambda a, b: mot.swiglu(a, b, backend="triton"),
        lambda a, b: mot.swiglu(a, b, backend="torch"),
        reference.swiglu_reference,
        [r(n, inter, scale=2.0), r(n, inter)],
        [r(n, inter)],
    )


def test_fp16_kernels_within_twice_torch_error():
    """The low-precision rule on CPU (fp16 through the interpreter) with a hundred-odd rows."""
    _lowp_cases(DEV, torch.float16, 130, 61, hid=512, inter=384, hq=4, hkv=2, d=128)


# ============================================================================================ GPU
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("n_und", [0, 5000, 8192])
def test_gpu_bf16_bagel_shapes(n_und):
    """bf16 kernels at BAGEL-7B widths: within twice the error of PyTorch's bf16 math, and close to
    the fp64 reference elementwise where no long sum is involved."""
    _lowp_cases("cuda", torch.bfloat16, 8192, n_und, hid=3584, inter=18944, hq=28, hkv=4, d=128)
    n, hid = 8192, 3584
    dt = torch.bfloat16
    x = leaf(nan_view((n, hid), dt, device="cuda"))
    wu, wg = torch.randn(hid, dtype=dt, device="cuda"), torch.randn(hid, dtype=dt, device="cuda")
    y = mot.mot_rms_norm(x, n_und, wu, wg)  # strided input with NaN beside it
    g = torch.randn_like(y)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    ref = reference.mot_rms_norm_reference(x64, n_und, wu.double(), wg.double())
    assert_close(y, ref, dt, "fwd", "rms y")
    ref.backward(g.double())
    assert_close(x.grad, x64.grad, dt, "bwd", "rms dx")


@gpu
def test_gpu_permute_rows_and_linear():
    n = 16384
    x = torch.randn(n, 3584, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    perm = torch.randperm(n, device="cuda")
    y = mot.permute_rows(x, perm)
    assert torch.equal(y, x.detach()[perm])
    y.backward(y.detach())
    assert torch.equal(x.grad, x.detach())
    w = [torch.randn(512, 3584, dtype=torch.bfloat16, device="cuda") / 60 for _ in range(2)]
    b = torch.randn(512, dtype=torch.bfloat16, device="cuda")
    out = mot.mot_linear(x.detach(), 9000, w[0], b, w[1], None)
    ref = torch.cat(
        (torch.nn.functional.linear(x[:9000], w[0], b), torch.nn.functional.linear(x[9000:], w[1]))
    )
    torch.testing.assert_close(out, ref.detach())

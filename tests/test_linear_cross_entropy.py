"""Linear cross-entropy (``bagel_kernels.linear_cross_entropy``): the chunked LM-head loss, forward and
backward, on both backends (Triton under ``TRITON_INTERPRET=1`` on CPU), against
``F.cross_entropy(hidden.double() @ weight.double().T + bias)``.

Tolerances: :func:`bagel_kernels.testing.tolerance` per dtype and direction (logits ~ N(0, 1), so fp16
logits carry ~1e-3 of rounding; the gradients of weight/bias sum over up to 40 rows).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bagel_kernels import linear_cross_entropy as lce_mod
from bagel_kernels.linear_cross_entropy import (
    cross_entropy_rows,
    default_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    lm_head_cross_entropy,
    plain_linear,
)
from bagel_kernels.testing import tolerance

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["torch", "triton"]


def _inputs(N, H, V, dtype=torch.float32, *, bias=True, ignored=(), device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5  # logits ~ N(0, 1)
    b = 0.5 * torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    for i in ignored:
        labels[i] = -100
    cast = [t.to(device=device, dtype=dtype).requires_grad_() for t in (hidden, weight)]
    b = None if b is None else b.to(device=device, dtype=dtype).requires_grad_()
    return cast[0], cast[1], labels.to(device), b


def _reference(hidden, weight, labels, bias, reduction, grad):
    """float64 loss and gradients of (hidden, weight, bias)."""
    h, w = (t.detach().double().requires_grad_() for t in (hidden, weight))
    b = None if bias is None else bias.detach().double().requires_grad_()
    logits = h @ w.T + (0 if b is None else b)
    loss = F.cross_entropy(logits, labels, reduction=reduction, ignore_index=-100)
    loss.backward(grad.double())
    return loss, h.grad, w.grad, None if b is None else b.grad


def _close(actual, expected, dtype, direction, what):
    atol, rtol = tolerance(dtype, direction)
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol, equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )  # fmt: skip


def _check(backend, dtype, N, H, V, reduction, chunk, *, ignored=(), bias=True, grad=None, fuse=None):
    hidden, weight, labels, b = _inputs(N, H, V, dtype, bias=bias, ignored=ignored)
    loss = linear_cross_entropy(
        hidden, weight, labels, bias=b, reduction=reduction, chunk_size=chunk, backend=backend,
        fuse_backward=fuse,
    )  # fmt: skip
    assert loss.dtype == torch.float32
    if grad is None:
        grad = torch.randn(N, device=DEV) if reduction == "none" else torch.tensor(1.7, device=DEV)
    loss.backward(grad)
    ref = _reference(hidden, weight, labels, b, reduction, grad)
    _close(loss, ref[0], dtype, "fwd", "loss")
    for name, t, r in zip(("hidden", "weight", "bias"), (hidden, weight, b), ref[1:], strict=True):
        if t is not None:
            assert t.grad is not None and t.grad.dtype == dtype, name
            _close(t.grad, r, dtype, "bwd", f"d{name}")


# ===================================================================================== values and gradients
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_matches_float64_reference(backend, reduction):
    """37 rows in chunks of 10 (the last one short), V = 1000 (not a multiple of the V block), every
    fifth row ignored; random per-token gradient for "none" (the recompute backward)."""
    _check(backend, torch.float32, 37, 24, 1000, reduction, 10, ignored=range(0, 37, 5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_fp16(backend, reduction):
    _check(backend, torch.float16, 29, 32, 97, reduction, 8, ignored=(3,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunk_sizes(backend, chunk):
    """One row per chunk, a chunk that does not divide N, one chunk larger than N: same result."""
    _check(backend, torch.float32, 23, 16, 97, "sum", chunk, ignored=(4,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_gradient_uses_the_fused_gradients(backend):
    """reduction="none" followed by ``.sum() * c`` hands back one number broadcast (stride 0): the
    backward scales the forward's gradients (no recompute op runs); a weighted sum recomputes."""
    hidden, weight, labels, b = _inputs(31, 16, 97, ignored=(0, 30))

    def backward_ops(weights):
        for t in (hidden, weight, b):
            t.grad = None
        loss = linear_cross_entropy(
            hidden, weight, labels, bias=b, reduction="none", chunk_size=8, backend=backend
        )
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            (loss * weights).sum().backward() if weights is not None else (loss.sum() * 0.3).backward()
        g = torch.full((31,), 0.3) if weights is None else weights
        ref = _reference(hidden, weight, labels, b, "none", g)
        for name, t, r in zip(("hidden", "weight", "bias"), (hidden, weight, b), ref[1:], strict=True):
            _close(t.grad, r, torch.float32, "bwd", f"d{name}")
        return sum("linear_cross_entropy_backward" in e.name for e in prof.events())

    assert backward_ops(None) == 0
    assert backward_ops(torch.rand(31)) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_backward_false_recomputes(backend):
    _check(backend, torch.float32, 19, 16, 97, "mean", 6, ignored=(1, 2), fuse=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    """As torch: mean is NaN (0 / 0), sum is 0, "none" is zeros; every gradient is zero."""
    for reduction, expect in (("mean", float("nan")), ("sum", 0.0)):
        hidden, weight, labels, b = _inputs(9, 8, 97, ignored=range(9))
        loss = linear_cross_entropy(hidden, weight, labels, bias=b, reduction=reduction, backend=backend)
        ref = F.cross_entropy(hidden.double() @ weight.double().T, labels, reduction=reduction)
        torch.testing.assert_close(loss.double(), ref, equal_nan=True)
        assert loss.isnan().item() if expect != expect else loss.item() == expect, reduction
        loss.backward()
        for t in (hidden, weight, b):
            assert torch.equal(t.grad, torch.zeros_like(t)), reduction


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_rows(reduction):
    hidden, weight, labels, b = _inputs(0, 8, 97)
    loss = linear_cross_entropy(hidden, weight, labels, bias=b, reduction=reduction, backend="triton")
    ref = F.cross_entropy(torch.empty(0, 97), labels, reduction=reduction)
    torch.testing.assert_close(loss.double(), ref.double(), equal_nan=True)
    loss.sum().backward()
    assert hidden.grad.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_detached_hidden(backend):
    """A frozen head (LoRA training): no weight gradient is computed or returned; and the other way."""
    hidden, weight, labels, _ = _inputs(21, 16, 97, bias=False, ignored=(5,))
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, labels, reduction="mean", chunk_size=8, backend=backend)
    loss.backward()
    ref = _reference(hidden, weight, labels, None, "mean", torch.tensor(1.0))
    assert weight.grad is None
    _close(hidden.grad, ref[1], torch.float32, "bwd", "dhidden")
    hidden2 = hidden.detach()
    weight.requires_grad_(True)
    loss = linear_cross_entropy(hidden2, weight, labels, reduction="sum", chunk_size=8, backend=backend)
    loss.backward()
    ref = _reference(hidden2, weight, labels, None, "sum", torch.tensor(1.0))
    _close(weight.grad, ref[2], torch.float32, "bwd", "dweight")


def test_no_grad_forward_and_backends_agree():
    hidden, weight, labels, b = _inputs(33, 16, 1000, ignored=(7,))
    with torch.no_grad():
        outs = [
            linear_cross_entropy(hidden, weight, labels, bias=b, reduction="none", chunk_size=9, backend=be)
            for be in BACKENDS
        ]
    ref = linear_cross_entropy_reference(hidden, weight, labels, bias=b, reduction="none")
    for out in outs:
        assert not out.requires_grad
        _close(out, ref, torch.float32, "fwd", "loss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
def test_label_dtypes_and_strided_inputs(backend, label_dtype):
    hidden, weight, labels, b = _inputs(40, 16, 97, ignored=(2,))
    h = hidden.detach()[::2]  # row stride 32
    y = torch.stack([labels.to(label_dtype), labels.to(label_dtype)], 1)[::2, 1]  # stride 4
    assert not y.is_contiguous()
    out = linear_cross_entropy(h, weight, y, bias=b, reduction="none", backend=backend)
    ref = linear_cross_entropy_reference(h, weight, labels[::2], bias=b, reduction="none")
    _close(out, ref, torch.float32, "fwd", "loss")


def test_float64_on_the_torch_backend():
    """fp64 inputs: logits and softmax in fp64, loss and lse kept in fp32, so fp32 rounding remains."""
    hidden, weight, labels, b = _inputs(15, 8, 97, torch.float64, ignored=(1,))
    loss = linear_cross_entropy(
        hidden, weight, labels, bias=b, reduction="sum", chunk_size=4, backend="torch"
    )
    loss.backward()
    ref = _reference(hidden, weight, labels, b, "sum", torch.tensor(1.0))
    _close(loss, ref[0], torch.float32, "fwd", "loss")
    torch.testing.assert_close(weight.grad, ref[2], atol=1e-6, rtol=1e-5)


# ============================================================================================ row kernel
@pytest.mark.parametrize("V,block_v", [(97, 32), (1000, 128), (1000, 1024)])
def test_row_kernel_against_torch_rows(V, block_v):
    """The Triton row step (several V blocks with a short tail, or one padded block) against the torch
    row step: loss, lse, and dz written in place; the row buffer is wider than V and NaN beyond it,
    which must be neither read nor written."""
    rows, pad = 13, 11
    g = torch.Generator().manual_seed(1)
    buf = torch.full((rows, V + pad), float("nan"))
    buf[:, :V] = 3 * torch.randn(rows, V, generator=g)
    labels = torch.randint(0, V, (rows,), generator=g)
    labels[[0, 5]] = -100
    labels[7] = V - 1
    scale = torch.rand(rows, generator=g)
    for lse_given, sc in ((False, None), (True, scale)):
        a, b = buf.clone(), buf.clone()
        lse_in = torch.logsumexp(buf[:, :V].double(), 1).float() if lse_given else None
        la, sa = cross_entropy_rows(a[:, :V], labels, lse=lse_in, scale=sc, backend="triton", block_v=block_v)
        lb, sb = cross_entropy_rows(b[:, :V], labels, lse=lse_in, scale=sc, backend="torch")
        assert a[:, V:].isnan().all(), "wrote beyond the row"
        assert not a[:, :V].isnan().any()
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, equal_nan=True)
        torch.testing.assert_close(sa, sb, atol=1e-5, rtol=1e-5)
        if not lse_given:
            torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
            ref = F.cross_entropy(buf[:, :V].double(), labels, reduction="none")
            torch.testing.assert_close(la.double(), ref, atol=1e-5, rtol=1e-5)


def test_default_chunk_size():
    assert default_chunk_size(152064, torch.bfloat16) == 880  # 256 MiB / (152064 * 2 B) = 882 -> 880
    assert 880 * 152064 * 2 <= lce_mod.DEFAULT_CHUNK_BYTES
    assert default_chunk_size(152064, torch.bfloat16, 100) == 100
    assert default_chunk_size(10**10, torch.float32) == 1


# ============================================================================================ bad input
def _bad_cases():
    torch.manual_seed(0)  # collected at import: every pytest-xdist worker must see the same cases
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    y = torch.tensor([1, 2, -100, 9])
    return [
        ("hidden", dict(hidden=torch.randn(2, 4, 8))),
        ("weight", dict(weight=torch.randn(10, 7))),
        ("labels", dict(labels=torch.tensor([1, 2, 3]))),
        ("labels", dict(labels=y.float())),
        ("labels\\[3\\] = 10", dict(labels=torch.tensor([1, 2, -100, 10]))),
        ("labels\\[0\\] = -1", dict(labels=torch.tensor([-1, 2, 3, 4]))),
        ("weight has dtype", dict(weight=w.double())),
        ("bias must be", dict(bias=torch.randn(9))),
        ("bias has dtype", dict(bias=torch.randn(10, dtype=torch.float64))),
        ("labels is on meta", dict(labels=y.to("meta"))),
        ("reduction", dict(reduction="avg")),
        ("chunk_size", dict(chunk_size=0)),
        ("ignore_index", dict(ignore_index=1.5)),
        ("backend", dict(backend="cuda")),
        ("hidden has dtype", dict(hidden=h.int(), weight=w.int())),
    ], (h, w, y)


_BAD = _bad_cases()[0]


@pytest.mark.parametrize("match,override", _BAD, ids=[f"{i}-{m}" for i, (m, _) in enumerate(_BAD)])
def test_bad_input_raises_value_error(match, override):
    h, w, y = _bad_cases()[1]
    args = dict(hidden=h, weight=w, labels=y, bias=None)
    args.update(override)
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("hidden", "weight", "labels")}
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(args["hidden"], args["weight"], args["labels"], **kwargs)


def test_triton_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, w, y, _ = _inputs(4, 8, 10, device="cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        linear_cross_entropy(h, w, y, backend="triton")
    linear_cross_entropy(h, w, y)  # auto: the torch backend


# ============================================================================================ LM head module
def test_lm_head_module_fused_or_called():
    """A stock nn.Linear is read directly; a hooked (or subclassed) head is called, so what the user
    attached takes effect."""
    head = nn.Linear(16, 97, bias=False, device=DEV)
    hidden, _, labels, _ = _inputs(12, 16, 97, bias=False, ignored=(3,))
    assert plain_linear(head)
    loss = lm_head_cross_entropy(head, hidden, labels, chunk_size=5)
    ref = F.cross_entropy(head(hidden).double(), labels)
    _close(loss, ref, torch.float32, "fwd", "loss")
    calls = []
    handle = head.register_forward_hook(lambda m, i, o: calls.append(1) or o * 2)
    assert not plain_linear(head)
    loss = lm_head_cross_entropy(head, hidden, labels, reduction="sum")
    assert calls == [1]
    _close(
        loss,
        F.cross_entropy(2 * F.linear(hidden, head.weight).double(), labels, reduction="sum"),
        torch.float32,
        "fwd",
        "hooked",
    )
    handle.remove()

    class Scaled(nn.Linear):
        def forward(self, x):
            return 3 * super().forward(x)

    sub = Scaled(16, 97, device=DEV)
    assert not plain_linear(sub)
    loss = lm_head_cross_entropy(sub, hidden, labels, reduction="none")
    _close(
        loss,
        F.cross_entropy(sub(hidden).double(), labels, reduction="none"),
        torch.float32,
        "fwd",
        "subclass",
    )


# ============================================================================================ opcheck / compile
def _opcheck_cases():
    hidden, weight, labels, b = _inputs(9, 8, 50, ignored=(2,))
    ops = torch.ops.bagel_kernels
    d = [t.detach() for t in (hidden, weight, b)]
    lse = torch.logsumexp(F.linear(d[0], d[1], d[2]), 1)
    count = (labels != -100).sum()
    g_none, g_sum = torch.randn(9), torch.tensor(0.5)
    cases = []
    for be in BACKENDS:
        fwd_all = (hidden, weight, labels, b, -100, "none", 4, be, True, True, True)
        fwd_w = (hidden, weight, labels, None, -100, "mean", 4, be, False, True, False)
        bwd_all = (g_none, *d[:2], labels, d[2], lse, count, -100, "none", 4, be, True, True, True)
        bwd_h = (g_sum, *d[:2], labels, None, lse, count, -100, "sum", 4, be, True, False, False)
        cases += [
            (f"fwd_none_{be}", ops.linear_cross_entropy, fwd_all),
            (f"fwd_mean_nobias_{be}", ops.linear_cross_entropy, fwd_w),
            (f"bwd_none_{be}", ops.linear_cross_entropy_backward, bwd_all),
            (f"bwd_sum_{be}", ops.linear_cross_entropy_backward, bwd_h),
        ]
    return cases


@pytest.mark.parametrize("name,op,args", _opcheck_cases(), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


def test_op_checks_its_arguments():
    h, w, y, _ = _inputs(4, 8, 10)
    with pytest.raises(ValueError, match="torch.ops.bagel_kernels.linear_cross_entropy: weight must be"):
        torch.ops.bagel_kernels.linear_cross_entropy(
            h, w[:, :7], y, None, -100, "sum", 4, "torch", False, False, False
        )
    with pytest.raises(ValueError, match="backend must be"):
        torch.ops.bagel_kernels.linear_cross_entropy(
            h, w, y, None, -100, "sum", 4, "cuda", False, False, False
        )


def test_torch_compile_fullgraph():
    hidden, weight, labels, b = _inputs(17, 8, 97, ignored=(4,))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(h, w, y, bias):
        return (
            linear_cross_entropy(h, w, y, bias=bias, reduction="none", chunk_size=6, backend="torch").sum()
            * 0.5
        )

    step(hidden, weight, labels, b).backward()
    ref = _reference(hidden, weight, labels, b, "none", torch.full((17,), 0.5))
    for name, t, r in zip(("hidden", "weight", "bias"), (hidden, weight, b), ref[1:], strict=True):
        _close(t.grad, r, torch.float32, "bwd", f"d{name}")


def test_compile_specs_cover_bagel_7b():
    """The sm_90 compile check (tests/test_compile_sm90.py, slow) compiles these: the forward and the
    recompute kernel at BAGEL-7B's vocabulary in bf16, and fp16 at an odd V."""
    names = {s[0] for s in lce_mod.compile_specs(90)}
    assert names == {
        "lce_rows[fwd,bf16,BAGEL-7B]",
        "lce_rows[bwd,bf16,BAGEL-7B]",
        "lce_rows[fwd,fp16,V=1001]",
        "lce_rows[bwd,fp16,V=1001]",
    }


# ============================================================================================ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gpu_bf16_large_vocab(reduction):
    """bf16 on the GPU at a 32k vocabulary (several V blocks), 3 chunks: against the mirror reference
    (bf16 logits, fp32 CE), error at most twice the mirror's own error against float64, plus a bf16 ulp."""
    N, H, V = 300, 256, 32000
    hidden, weight, labels, b = _inputs(N, H, V, torch.bfloat16, ignored=(0, 99))
    grad = torch.rand(N, device=DEV) if reduction == "none" else torch.tensor(1.0, device=DEV)
    loss = linear_cross_entropy(
        hidden, weight, labels, bias=b, reduction=reduction, chunk_size=128, backend="triton"
    )
    loss.backward(grad)
    ours = (loss, hidden.grad, weight.grad, b.grad)
    h2, w2, b2 = (t.detach().clone().requires_grad_() for t in (hidden, weight, b))
    mirror = linear_cross_entropy_reference(h2, w2, labels, bias=b2, reduction=reduction)
    mirror.backward(grad)
    ref = _reference(hidden, weight, labels, b, reduction, grad)
    for name, a, m, r in zip(
        ("loss", "dh", "dw", "db"), ours, (mirror, h2.grad, w2.grad, b2.grad), ref, strict=True
    ):
        err = (a.double() - r).abs().max().item()
        err_m = (m.double() - r).abs().max().item()
        assert err <= 2 * err_m + 1e-2 * r.abs().max().item() + 1e-6, f"{name}: {err} vs mirror {err_m}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_op_allocates_the_full_logits(backend):
    """Forward + backward at N = 128, V = 2000 in chunks of 16: no single aten op allocates anything near
    the ``N x V`` logits (1 MB in fp32); the largest allocation is one chunk's logits (128 kB)."""
    N, H, V, chunk = 128, 8, 2000, 16
    hidden, weight, labels, _ = _inputs(N, H, V, bias=False, device="cpu")
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        loss = linear_cross_entropy(
            hidden, weight, labels, reduction="sum", chunk_size=chunk, backend=backend
        )
        loss.backward()
    allocs = [e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::")]
    assert max(allocs) <= chunk * V * 4, max(allocs)
    assert hidden.grad is not None and weight.grad is not None


def test_benchmark_script_tiny(tmp_path, monkeypatch):
    """benchmarks/bench_linear_cross_entropy.py --tiny runs and writes its table (one row per method)."""
    import os

    bench_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    monkeypatch.syspath_prepend(bench_dir)
    import bench_linear_cross_entropy as bench

    assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "bench_linear_cross_entropy.md").read_text()
    for method in ("upstream", "mirror", "ours-fused", "ours-recomp", "ours-torch"):
        assert f"| {method} |" in table

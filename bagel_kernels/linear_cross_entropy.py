"""Linear cross-entropy for the LM head: ``cross_entropy(hidden @ weight.T + bias, labels)`` without
ever holding the logits of all rows at once.

Math (N rows, H hidden, V vocabulary; row ``i`` with label ``y_i``; ``ignore_index`` rows count zero)::

    z_i    = hidden_i @ weight.T (+ bias)           logits, rounded to hidden's dtype
    lse_i  = log(sum_v exp(z_iv))                   in fp32
    loss_i = lse_i - z_{i, y_i}                     fp32; 0 where y_i == ignore_index
    dz_i   = softmax(z_i) - onehot(y_i)             the gradient of loss_i wrt z_i (0 for ignored rows)
    dhidden_i = dz_i @ weight,  dweight = sum_i dz_i^T hidden_i,  dbias = sum_i dz_i

Precision, stated once. The logits are what ``lm_head(x)`` gives in the model's dtype: a GEMM with
fp32 accumulation rounded to ``hidden.dtype`` (bf16 in training). The softmax, the loss and
``softmax - onehot`` are computed in fp32 from those rounded logits; the per-token loss is fp32. So the
reference this op matches is ``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ...)``
(:func:`linear_cross_entropy_reference`). Upstream BAGEL calls ``F.cross_entropy`` on the bf16 logits
directly, which returns a bf16 loss: ours is that loss before its final bf16 rounding. ``dz`` is
rounded to ``hidden.dtype`` before the gradient GEMMs (as upstream's bf16 ``log_softmax`` backward
is); ``dweight`` is accumulated chunk by chunk in ``weight.dtype`` (one rounding per chunk, as Liger's
fused linear cross-entropy does; an fp32 accumulator would cost twice the weight's size), ``dbias``
in fp32.

Memory. Rows go through in chunks of ``chunk_size`` (default: the rows whose logits fit in
:data:`DEFAULT_CHUNK_BYTES` = 256 MiB, 880 rows at V = 152064 in bf16); only one ``[chunk, V]`` logits
buffer (plus, on the torch backend, its fp32 copy) exists at a time. When gradients will be taken, the
forward turns each chunk's logits in place into ``dz`` (the Triton kernel :func:`_lce_rows_kernel`:
one program per row, an online max/sum-exp pass over V, then a pass writing ``dz``), folds it into
``dhidden`` (``dz @ weight``) and ``dweight`` (``+= dz^T hidden``) at once, and keeps only those (Liger-Kernel's fused linear cross-entropy): the
backward scales them by the incoming gradient (out of place: the forward op's outputs are not mutated,
so the backward briefly holds a second weight-sized buffer; 16-bit gradients are scaled in fp32 and
rounded once). Three GEMMs in all, as ``F.linear`` + ``F.cross_entropy`` take, and nothing ``N x V``
survives. Gradients wrt a frozen weight (or bias, or hidden) are neither computed nor stored.

``reduction="none"``: the per-token gradients scale row by row, but ``dweight`` and ``dbias`` are sums
over rows and can be rescaled only by one number. The backward therefore uses the precomputed
gradients when the incoming gradient is one value broadcast to every token (stride 0, which is what
``loss.sum()`` and ``loss.mean()`` hand back in eager mode); for any other incoming gradient (a
weighted sum, a mask, or a contiguous copy of a uniform one, as a ``torch.compile`` graph may hand over)
it recomputes: a second chunked pass over the logits with the saved ``lse``, exact. That costs four
GEMMs with ``fuse_backward=False`` (nothing precomputed) and six when the forward's precomputed
gradients go unused, so pass ``fuse_backward=False`` when you know the weights are not uniform.

Backends (``backend=``): ``"triton"`` (the row kernel; CUDA, or CPU under ``TRITON_INTERPRET=1``),
``"torch"`` (the same chunked algorithm with the row step in PyTorch, any device), ``"auto"``
(triton on CUDA, torch elsewhere). Both run inside the registered custom ops
``torch.ops.bagel_kernels.linear_cross_entropy`` / ``linear_cross_entropy_backward`` (fake and
autograd registered), so ``torch.compile(fullgraph=True)`` traces through them.

Public: :func:`linear_cross_entropy`, :func:`lm_head_cross_entropy` (takes the ``nn.Linear`` LM head
and falls back to calling it when it is not a plain ``nn.Linear``), :func:`linear_cross_entropy_reference`,
:func:`cross_entropy_rows` (the per-chunk row step, for tests), :data:`LINEAR_CROSS_ENTROPY` (the dispatcher),
:func:`compile_specs` (sm_90/sm_80 compile check at BAGEL-7B's V = 152064).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import interpreting
from .dispatch import Backend, Family, Request

__all__ = [
    "linear_cross_entropy",
    "lm_head_cross_entropy",
    "linear_cross_entropy_reference",
    "plain_linear",
    "cross_entropy_rows",
    "default_chunk_size",
    "DEFAULT_CHUNK_BYTES",
    "REDUCTIONS",
    "LINEAR_CROSS_ENTROPY",
    "BACKENDS",
    "compile_cases",
    "compile_specs",
]

REDUCTIONS = ("none", "sum", "mean")
# Bytes of one chunk's logits (hidden's dtype). 256 MiB: 880 rows at V = 152064 in bf16, enough rows
# for the chunk GEMMs to run near peak, small next to the 1 GiB the full logits of 3.5k tokens take.
DEFAULT_CHUNK_BYTES = 256 * 2**20
# Row kernel: the widest V block one program loads at a time, and its warps per block width.
_MAX_BLOCK_V = 4096
_WARPS_BY_BLOCK = ((4096, 8), (1024, 4), (256, 2))
# Elements per slice when the backward scales a 16-bit gradient in fp32 (64 MiB of fp32 transient).
_SCALE_SLICE_ELEMS = 16 * 2**20

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TORCH_DTYPES = _KERNEL_DTYPES + (torch.float64,)
_LABEL_DTYPES = (torch.int64, torch.int32)

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_reasons(req: Request) -> list[str]:
    return [] if _HAS_TRITON else ["needs the triton package, which is not installed"]


LINEAR_CROSS_ENTROPY = Family(
    "linear_cross_entropy",
    {
        "triton": Backend(
            "triton",
            devices=("cuda",),
            dtypes=_KERNEL_DTYPES,
            interpreted=True,
            hook=_triton_reasons,
            compile_specs="bagel_kernels.linear_cross_entropy",
        ),
        "torch": Backend("torch", dtypes=_TORCH_DTYPES),
    },
    auto={"cuda": ("triton", "torch"), "*": ("torch",)},  # never the interpreter on CPU
)
BACKENDS = LINEAR_CROSS_ENTROPY.names


# ============================================================================================ Triton kernel
tl = None  # triton.language, bound by _jit_kernel(): importing triton waits until a kernel runs


def _lce_rows_kernel(
    LOGITS,  # [rows, V] (row stride, unit column stride), hidden's dtype; overwritten by dz when WRITE_GRAD
    LABELS,  # [rows] int32/int64
    SCALE,  # [rows] fp32 per-row gradient scale (read when HAS_SCALE)
    LOSS,  # [rows] fp32 (written when FORWARD)
    LSE,  # [rows] fp32 (written when FORWARD, read otherwise)
    V,
    stride_row,
    ignore_index,
    FORWARD: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: ``lse`` by an online max/sum-exp over V blocks (FORWARD), then
    ``(softmax - onehot) * scale`` written over the row's logits (WRITE_GRAD). Everything in fp32 (the
    interpreter gets bf16 arithmetic wrong; the GPU does fp32 anyway)."""
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    label = tl.load(LABELS + row).to(tl.int64)
    ignored = label == ignore_index
    in_range = (label >= 0) & (label < V)
    cols = tl.arange(0, BLOCK_V)
    if FORWARD:
        m = float("-inf")
        s = 0.0
        for v0 in range(0, V, BLOCK_V):
            c = v0 + cols
            x = tl.load(ptr + c, mask=c < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        # a label outside [0, V) that is not ignore_index reads nothing and poisons the row with NaN
        target = tl.load(ptr + tl.where(in_range, label, 0)).to(tl.float32)
        loss = tl.where(ignored, 0.0, tl.where(in_range, lse - target, float("nan")))
        tl.store(LOSS + row, loss)
        tl.store(LSE + row, lse)
    else:
        lse = tl.load(LSE + row)
    if WRITE_GRAD:
        if HAS_SCALE:
            scale = tl.load(SCALE + row).to(tl.float32)
        else:
            scale = 1.0
        scale = tl.where(ignored, 0.0, tl.where(in_range, scale, float("nan")))
        for v0 in range(0, V, BLOCK_V):
            c = v0 + cols
            cmask = c < V
            x = tl.load(ptr + c, mask=cmask, other=0.0).to(tl.float32)
            dz = tl.exp(x - lse) - tl.where(c == label, 1.0, 0.0)
            tl.store(ptr + c, (dz * scale).to(LOGITS.dtype.element_ty), mask=cmask)


@functools.cache
def _jit_kernel():
    """The kernel, JIT-decorated on first use: ``triton.jit`` decides between the GPU compiler and the
    interpreter from ``TRITON_INTERPRET`` when it runs, so it must not run at import."""
    global tl
    import triton
    import triton.language

    tl = triton.language  # the kernel's global, resolved when triton.jit parses it
    return triton.jit(_lce_rows_kernel)


def _block_v(V: int) -> int:
    return max(16, min(_MAX_BLOCK_V, 1 << max(0, V - 1).bit_length()))


def _warps(block_v: int) -> int:
    for width, warps in _WARPS_BY_BLOCK:
        if block_v >= width:
            return warps
    return 1


def _rows_triton(logits, labels, ignore_index, loss, lse, scale, forward, write_grad, block_v=None):
    rows, V = logits.shape
    if rows == 0:
        return
    if interpreting():
        from .attention_configs import check_interpreter

        check_interpreter()
    bv = _block_v(V) if block_v is None else block_v
    dummy = lse  # pointer for the arguments a constexpr switch leaves unread
    _jit_kernel()[(rows,)](
        logits, labels, scale if scale is not None else dummy, loss if loss is not None else dummy, lse,
        V, logits.stride(0), ignore_index,
        FORWARD=forward, WRITE_GRAD=write_grad, HAS_SCALE=scale is not None, BLOCK_V=bv,
        num_warps=_warps(bv),
    )  # fmt: skip


def _rows_torch(logits, labels, ignore_index, loss, lse, scale, forward, write_grad, block_v=None):
    rows, V = logits.shape
    if rows == 0:
        return
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32, or fp64 for fp64 inputs
    labels = labels.long()
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < V)
    safe = torch.where(in_range, labels, 0)
    nan = torch.tensor(float("nan"), device=x.device)
    if forward:
        lse.copy_(torch.logsumexp(x, dim=1))
        target = x.gather(1, safe[:, None]).squeeze(1)
        loss.copy_(torch.where(ignored, 0.0, torch.where(in_range, lse - target, nan)))
    if write_grad:
        s = torch.ones_like(lse) if scale is None else scale.float()
        s = torch.where(ignored, 0.0, torch.where(in_range, s, nan))
        dz = torch.exp(x - lse[:, None])
        dz.scatter_add_(1, safe[:, None], -in_range.to(dz.dtype)[:, None])
        logits.copy_(dz * s[:, None])


def cross_entropy_rows(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    lse: Tensor | None = None,
    scale: Tensor | None = None,
    write_grad: bool = True,
    backend: str = "torch",
    block_v: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The per-chunk row step (tests and benchmarks): returns ``(loss, lse)`` fp32 ``[rows]`` and, with
    ``write_grad``, overwrites ``logits`` (``[rows, V]``, unit column stride) with
    ``(softmax - onehot) * scale``. With ``lse`` given, it is used instead of computed (the
    backward's recompute step; ``loss`` is then returned as NaN). ``backend``: "triton" or "torch";
    ``block_v`` (Triton) forces the V block (a power of two)."""
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    rows = logits.shape[0]
    forward = lse is None
    out_lse = torch.empty(rows, dtype=torch.float32, device=logits.device) if forward else lse
    loss = torch.full((rows,), float("nan"), dtype=torch.float32, device=logits.device)
    fn = _rows_triton if backend == "triton" else _rows_torch
    fn(logits, labels, ignore_index, loss, out_lse, scale, forward, write_grad, block_v)
    return loss, out_lse


def _rows_fn(backend: str):
    return _rows_triton if backend == "triton" else _rows_torch


# ============================================================================================ chunked passes
def default_chunk_size(V: int, dtype: torch.dtype, N: int | None = None) -> int:
    """Rows per chunk so that one chunk's logits take at most :data:`DEFAULT_CHUNK_BYTES`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = max(1, DEFAULT_CHUNK_BYTES // max(1, V * itemsize))
    if rows > 64:
        rows -= rows % 16  # GEMM-friendly row counts
    return rows if N is None else max(1, min(rows, N))


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``h @ weight.T (+ bias)`` in hidden's dtype, as ``F.linear`` gives it (one GEMM, bias fused)."""
    return torch.addmm(bias, h, weight.t()) if bias is not None else torch.mm(h, weight.t())


def _chunked_pass(
    hidden, weight, labels, bias, ignore_index, chunk, backend, loss, lse, scale, need_dh, need_dw, need_db
):
    """One pass over the row chunks: logits -> row step -> gradient GEMMs. ``loss`` given: the forward
    (computes ``lse`` and ``loss``); else the recompute (reads ``lse``, scales rows by ``scale``).
    Returns ``(dh, dw, db)``, each None unless asked for."""
    N = hidden.shape[0]
    V = weight.shape[0]
    rows = _rows_fn(backend)
    forward = loss is not None
    write_grad = need_dh or need_dw or need_db
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None
    db = torch.zeros(V, dtype=torch.float32, device=hidden.device) if need_db else None
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        h = hidden[s:e]
        z = _logits(h, weight, bias)  # [c, V]
        rows(
            z, labels[s:e], ignore_index, loss[s:e] if forward else None, lse[s:e],
            None if scale is None else scale[s:e], forward, write_grad,
        )  # fmt: skip
        if not write_grad:
            continue
        # z now holds dz = (softmax - onehot) * scale, rounded to hidden's dtype
        if need_dh:
            torch.mm(z, weight, out=dh[s:e])
        if need_dw:
            dw.addmm_(z.t(), h)
        if need_db:
            db += z.sum(0, dtype=torch.float32)
    return dh, dw, None if db is None else db.to(weight.dtype)


def _empty(ref: Tensor) -> Tensor:
    return ref.new_empty((0,))


def _reduce(loss: Tensor, count: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / count.to(total.dtype)  # 0 / 0 = NaN, as torch


# ============================================================================================ validation
def _check_tensor(name: str, t, dims: int, dtypes) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} has dtype {t.dtype}; supported: {names}")


def _check_args(hidden, weight, labels, bias, ignore_index, reduction, chunk_size) -> None:
    """Shapes, dtypes, devices and options (no host sync): the public function and the ops call it."""
    _check_tensor("hidden", hidden, 2, _TORCH_DTYPES)
    _check_tensor("weight", weight, 2, _TORCH_DTYPES)
    _check_tensor("labels", labels, 1, _LABEL_DTYPES)
    N, H = hidden.shape
    if weight.shape[1] != H:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[1] = {H}, got weight shape {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (the vocabulary is empty)")
    if labels.shape[0] != N:
        raise ValueError(f"labels must be [N] with N = hidden.shape[0] = {N}, got {labels.shape[0]}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}; they must match")
    named = {"weight": weight, "labels": labels}
    if bias is not None:
        _check_tensor("bias", bias, 1, _TORCH_DTYPES)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias must be [V] with V = weight.shape[0] = {weight.shape[0]}, got {bias.shape[0]}"
            )
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias has dtype {bias.dtype} but hidden has {hidden.dtype}; they must match")
        named["bias"] = bias
    for name, t in named.items():
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _check_label_values(labels: Tensor, V: int, ignore_index: int) -> None:
    """Labels in ``[0, V)`` or ``ignore_index`` (one host sync; the kernels would write NaN instead)."""
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels[{i}] = {int(labels[i])} is outside [0, V={V}) and is not ignore_index={ignore_index}"
        )


def _op_check(op: str, *args) -> None:
    try:
        _check_args(*args)
    except ValueError as exc:
        raise ValueError(f"torch.ops.bagel_kernels.{op}: {exc}") from None


def _check_backend_name(op: str, backend: str) -> None:
    if backend not in ("triton", "torch"):
        raise ValueError(
            f"torch.ops.bagel_kernels.{op}: backend must be 'triton' or 'torch', got {backend!r}"
        )


# ============================================================================================ custom ops
@torch.library.custom_op("bagel_kernels::linear_cross_entropy", mutates_args=())
def _lce_op(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    reduction: str,
    chunk_size: int,
    backend: str,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, lse, count, dh, dw, db)``: the loss (``[N]`` fp32, or a 0-dim fp32 sum/mean), the
    per-row log-sum-exp, the number of non-ignored rows (0-dim int64), and the gradients of
    ``loss_i`` summed over the rows (unit weights) that the ``grad_*`` flags ask for (else ``[0]``)."""
    _op_check("linear_cross_entropy", hidden, weight, labels, bias, ignore_index, reduction, chunk_size)
    _check_backend_name("linear_cross_entropy", backend)
    hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
    N = hidden.shape[0]
    loss = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    dh, dw, db = _chunked_pass(
        hidden, weight, labels, bias, ignore_index, chunk_size, backend, loss, lse, None,
        grad_hidden, grad_weight, grad_bias and bias is not None,
    )  # fmt: skip
    count = (labels != ignore_index).sum()
    return (
        _reduce(loss, count, reduction),
        lse,
        count,
        _empty(hidden) if dh is None else dh,
        _empty(hidden) if dw is None else dw,
        _empty(hidden) if db is None else db,
    )


@_lce_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, reduction, chunk_size, backend, gh, gw, gb):
    N = hidden.shape[0]
    loss = hidden.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    return (
        loss,
        hidden.new_empty((N,), dtype=torch.float32),
        labels.new_empty((), dtype=torch.int64),
        hidden.new_empty(hidden.shape) if gh else _empty(hidden),
        weight.new_empty(weight.shape) if gw else _empty(hidden),
        weight.new_empty((weight.shape[0],)) if gb and bias is not None else _empty(hidden),
    )


@torch.library.custom_op("bagel_kernels::linear_cross_entropy_backward", mutates_args=())
def _lce_bwd_op(
    grad_loss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    lse: Tensor,
    count: Tensor,
    ignore_index: int,
    reduction: str,
    chunk_size: int,
    backend: str,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The recompute backward: ``(dh, dw, db)`` (``[0]`` where not asked) for the incoming gradient
    ``grad_loss`` (``[N]`` for reduction "none", 0-dim otherwise), from a second chunked pass that
    recomputes the logits and uses the saved ``lse``."""
    op = "linear_cross_entropy_backward"
    _op_check(op, hidden, weight, labels, bias, ignore_index, reduction, chunk_size)
    _check_backend_name(op, backend)
    N = hidden.shape[0]
    want = (N,) if reduction == "none" else ()
    if tuple(grad_loss.shape) != want or tuple(lse.shape) != (N,):
        raise ValueError(
            f"torch.ops.bagel_kernels.{op}: grad_loss must have shape {want} and lse ({N},), "
            f"got {tuple(grad_loss.shape)} and {tuple(lse.shape)}"
        )
    hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
    scale = _row_scale(grad_loss, count, reduction, N)
    dh, dw, db = _chunked_pass(
        hidden, weight, labels, bias, ignore_index, chunk_size, backend, None, lse.float().contiguous(),
        scale,
        grad_hidden, grad_weight, grad_bias and bias is not None,
    )  # fmt: skip
    return (
        _empty(hidden) if dh is None else dh,
        _empty(hidden) if dw is None else dw,
        _empty(hidden) if db is None else db,
    )


@_lce_bwd_op.register_fake
def _(
    grad_loss,
    hidden,
    weight,
    labels,
    bias,
    lse,
    count,
    ignore_index,
    reduction,
    chunk_size,
    backend,
    gh,
    gw,
    gb,
):
    return (
        hidden.new_empty(hidden.shape) if gh else _empty(hidden),
        weight.new_empty(weight.shape) if gw else _empty(hidden),
        weight.new_empty((weight.shape[0],)) if gb and bias is not None else _empty(hidden),
    )


def _row_scale(grad_loss: Tensor, count: Tensor, reduction: str, N: int) -> Tensor:
    """fp32 ``[N]``: the factor each row's ``dz`` takes from the incoming gradient."""
    g = grad_loss.float()
    if reduction == "mean":
        g = g / count.clamp(min=1).float()  # all rows ignored: every dz is 0 anyway (torch: zero grads)
    return g.expand(N).contiguous() if reduction != "none" else g.contiguous()


def _uniform_scale(grad_loss: Tensor, count: Tensor, reduction: str) -> Tensor | None:
    """The one number every row's gradient is scaled by, when the incoming gradient is one (0-dim for
    sum/mean, or broadcast with stride 0 for "none"); None when rows differ."""
    if reduction != "none":
        return _row_scale(grad_loss, count, reduction, 1)[0]
    if grad_loss.numel() == 0:
        return grad_loss.new_zeros((), dtype=torch.float32)
    if grad_loss.numel() == 1 or grad_loss.stride(0) == 0:
        return grad_loss[0].float()
    return None


def _scaled(t: Tensor, scale: Tensor) -> Tensor:
    """``t * scale`` rounded once: a 16-bit ``t`` is multiplied in fp32 (``t * scale`` would round the
    fp32 scale to t's dtype first), a slice of rows at a time to keep the fp32 transient small."""
    if t.dtype in (torch.float32, torch.float64) or t.numel() == 0:
        return t * scale.to(t.dtype)
    out = torch.empty_like(t)
    rows = max(1, _SCALE_SLICE_ELEMS // max(1, t[0].numel()))
    for s in range(0, t.shape[0], rows):
        out[s : s + rows] = t[s : s + rows].float() * scale
    return out


def _lce_setup(ctx, inputs, output):
    hidden, weight, labels, bias, ignore_index, reduction, chunk, backend, gh, gw, gb = inputs
    _, lse, count, dh, dw, db = output
    ctx.mark_non_differentiable(lse, count, dh, dw, db)
    ctx.save_for_backward(hidden, weight, labels, bias, lse, count, dh, dw, db)
    ctx.options = (ignore_index, reduction, chunk, backend)
    ctx.fused = (gh, gw, gb and bias is not None)


def _lce_backward(ctx, grad_loss, *_unused):
    hidden, weight, labels, bias, lse, count, dh, dw, db = ctx.saved_tensors
    ignore_index, reduction, chunk, backend = ctx.options
    need = ctx.needs_input_grad
    need = (need[0], need[1], need[3] and bias is not None)
    if not any(need):
        return (None,) * 11
    scale = _uniform_scale(grad_loss, count, reduction)
    have = all(f or not n for f, n in zip(ctx.fused, need, strict=True))
    if scale is not None and have:
        # the forward's unit-weight gradients times one number; out of place: they are outputs of the
        # forward op (a caller of torch.ops.bagel_kernels.linear_cross_entropy holds them), so scaling in
        # place would change them under that caller (and AOT's partitioner rejects a mutated saved output)
        grads = [_scaled(t, scale) if n else None for t, n in zip((dh, dw, db), need, strict=True)]
    else:
        out = torch.ops.bagel_kernels.linear_cross_entropy_backward(
            grad_loss,
            hidden,
            weight,
            labels,
            bias,
            lse,
            count,
            ignore_index,
            reduction,
            chunk,
            backend,
            *need,
        )
        grads = [t if n else None for t, n in zip(out, need, strict=True)]
    dh, dw, db = grads
    return (dh, dw, None, db) + (None,) * 7


_lce_op.register_autograd(_lce_backward, setup_context=_lce_setup)


# ============================================================================================ public API
def linear_cross_entropy_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """What :func:`linear_cross_entropy` computes, the plain way (the whole ``[N, V]`` logits at once):
    logits in hidden's dtype, cross-entropy in fp32."""
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    fuse_backward: bool | None = None,
    backend: str = "auto",
) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ignore_index=..., reduction=...)``
    computed in row chunks, never holding more than ``chunk_size x V`` logits (see the module docstring
    for the precision and the memory).

    Args:
        hidden: ``[N, H]`` fp16/bf16/fp32 (fp64 on the torch backend); ``N = 0`` is allowed.
        weight: ``[V, H]``, hidden's dtype and device (``nn.Linear(H, V).weight``).
        labels: ``[N]`` int64 (or int32): class ids in ``[0, V)`` or ``ignore_index``.
        bias: ``[V]`` or None.
        reduction: ``"none"`` (``[N]`` fp32 per-token loss, 0 on ignored rows), ``"sum"``, or ``"mean"``
            over the non-ignored rows (NaN when every row is ignored, as torch).
        chunk_size: rows per chunk; default :func:`default_chunk_size` (256 MiB of logits).
        fuse_backward: compute the gradients during the forward (three GEMMs in all). Default: when
            autograd will need them. With ``reduction="none"`` they are used only for a uniform incoming
            gradient (``loss.sum()``, ``loss.mean()``, eager); pass False when you weight the tokens.
        backend: "auto", "triton" or "torch" (:data:`LINEAR_CROSS_ENTROPY`).

    Returns: fp32 loss, ``[N]`` or 0-dim. Differentiable in hidden, weight and bias.
    Bad input raises ValueError naming the argument; labels are checked against ``[0, V)`` with one
    host sync (skipped under ``torch.compile``, where a bad label gives a NaN loss instead).
    """
    if chunk_size is None and isinstance(weight, Tensor) and isinstance(hidden, Tensor) and weight.dim() == 2:
        chunk_size = default_chunk_size(
            weight.shape[0], hidden.dtype, hidden.shape[0] if hidden.dim() else None
        )
    _check_args(hidden, weight, labels, bias, ignore_index, reduction, chunk_size)
    if not torch.compiler.is_compiling():
        _check_label_values(labels, weight.shape[0], ignore_index)
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    if fuse_backward is None:
        fuse_backward = any(need)
    be = LINEAR_CROSS_ENTROPY.choose(backend, Request(hidden.device, hidden.dtype, backward=any(need))).name
    flags = need if fuse_backward else (False, False, False)
    out = _lce_op(hidden, weight, labels, bias, ignore_index, reduction, chunk_size, be, *flags)
    return out[0]


def plain_linear(module) -> bool:
    """True when ``module`` is a stock ``nn.Linear`` whose weight can be read directly: its class is
    exactly ``nn.Linear`` (not a PEFT LoRA layer, a quantised or FSDP-wrapped subclass), no hook of its
    own or global is registered, and weight and bias are plain tensors (not DTensor or another subclass)."""
    if type(module) is not nn.Linear:
        return False
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return False
    from torch.nn.modules import module as module_mod

    if module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks:
        return False
    return all(t is None or type(t) in (Tensor, nn.Parameter) for t in (module.weight, module.bias))


def lm_head_cross_entropy(
    lm_head: nn.Module,
    hidden: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    fuse_backward: bool | None = None,
    backend: str = "auto",
) -> Tensor:
    """Cross-entropy of ``lm_head(hidden)`` against ``labels``: :func:`linear_cross_entropy` on the
    head's weight and bias when :func:`plain_linear` says it is a stock ``nn.Linear``; otherwise (LoRA,
    quantised, FSDP-sharded or hooked heads) the head is CALLED on all rows and the loss is taken by
    :func:`linear_cross_entropy_reference`'s formula (full logits, whatever the module does)."""
    if plain_linear(lm_head):
        return linear_cross_entropy(
            hidden, lm_head.weight, labels, bias=lm_head.bias, ignore_index=ignore_index,
            reduction=reduction, chunk_size=chunk_size, fuse_backward=fuse_backward, backend=backend,
        )  # fmt: skip
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    logits = lm_head(hidden)
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index, reduction=reduction)


# ======================================================================================== AOT compile specs
# (dtype, rows, V, H): BAGEL-7B's LM head in bf16 (V = 152064, H = 3584) over 2000 CE tokens (three
# chunks, the last one short), and fp16 with an odd V whose row stride is not a multiple of 16.
_COMPILE_LAYOUTS = {
    "bf16,BAGEL-7B": (torch.bfloat16, 2000, 152064, 3584),
    "fp16,V=1001": (torch.float16, 37, 1001, 64),
}


def _run_launchers(dtype: torch.dtype, n: int, V: int, H: int) -> None:
    """The forward (fused gradients) and the recompute backward on meta tensors, as the model calls them."""
    meta = torch.device("meta")
    hidden = torch.empty((n, H), dtype=dtype, device=meta)
    weight = torch.empty((V, H), dtype=dtype, device=meta)
    labels = torch.empty((n,), dtype=torch.int64, device=meta)
    chunk = default_chunk_size(V, dtype, n)
    loss = torch.empty(n, dtype=torch.float32, device=meta)
    lse = torch.empty(n, dtype=torch.float32, device=meta)
    _chunked_pass(hidden, weight, labels, None, -100, chunk, "triton", loss, lse, None, True, True, False)
    _chunked_pass(hidden, weight, labels, None, -100, chunk, "triton", None, lse, loss, True, True, False)


def compile_cases(arch: int) -> list[tuple]:
    """``(tag, thunk, extra_options)`` per layout of :data:`_COMPILE_LAYOUTS` (format of
    :func:`bagel_kernels.compile_check.specs_from_launches`)."""
    return [
        (f"{{kernel}}[{tag}]", functools.partial(_run_launchers, *lay), {})
        for tag, lay in _COMPILE_LAYOUTS.items()
    ]


def compile_specs(arch: int = 90) -> list[tuple]:
    """Specs of every distinct launch of :func:`compile_cases` for ``arch``, named by the kernel's mode
    (``fwd``: loss + lse + dz; ``bwd``: dz from the saved lse, scaled)."""
    from .compile_check import specs_from_launches

    out, seen = [], set()
    for name, fn, sig, const, opts in specs_from_launches(compile_cases(arch), arch):
        mode = "fwd" if const["FORWARD"] else "bwd"
        name = name.replace("[", f"[{mode},", 1)
        if name not in seen:  # each chunk launches the same kernel
            seen.add(name)
            out.append((name, fn, sig, const, opts))
    return out

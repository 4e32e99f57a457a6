"""MoT expert routing: the per-expert ops of BAGEL's Mixture-of-Transformers LLM on a grouped pack.

Every token of a pack belongs to one of two experts: understanding (text + ViT tokens, base weights)
or generation (VAE latent tokens, ``*_moe_gen`` weights). The model permutes the pack once at entry
(:func:`grouped_order`, :func:`permute_rows`) so that understanding tokens are rows ``[0, n_und)`` and
generation tokens rows ``[n_und, N)`` of every activation; each routed op then takes the split point
``n_und`` (``0 <= n_und <= N``) and serves both experts in one launch, or two GEMMs writing into one
output, with no per-layer gather/scatter.

Shapes (N tokens, H hidden, I intermediate, Hq/Hkv heads, D head dim):

    op                 inputs                                     output
    mot_rms_norm       x [N, H], weight_und/gen [H]               [N, H]
    mot_qk_norm_rope   q [N, Hq, D], k [N, Hkv, D], 4 weights [D],  ([N, Hq, D], [N, Hkv, D])
                       cos, sin [N, D]
    swiglu             gate, up [N, I]                            [N, I]
    mot_linear         x [N, Hin], weight_und/gen [Hout, Hin],    [N, Hout]
                       bias_und/gen [Hout] or None
    permute_rows       x [N, ...], index [N] (a permutation)      [N, ...] = x[index]
    rope_cos_sin       position_ids [N] int                       (cos, sin) [N, D]
    grouped_order      und_indexes, gen_indexes, total            (perm, inv_perm, n_und)

Backends (``backend=``): ``"triton"`` (our kernels; on CPU only under ``TRITON_INTERPRET=1``),
``"torch"`` (plain PyTorch on the two contiguous slices, autograd by torch) and ``"auto"`` (triton on
CUDA when the inputs fit the kernels, torch otherwise), as declared in :data:`MOT` (the dispatcher of
:mod:`bagel_kernels.dispatch`). :func:`mot_linear` has no Triton kernel: its ``"auto"``/``"triton"`` path
is the custom op running two BLAS GEMMs into one preallocated output.
The ``*_reference`` functions (defined in :mod:`bagel_kernels.reference`, importable from here) are the
plain per-expert gather/scatter formulation (what upstream BAGEL does every layer); tests and
benchmarks compare against them.

Dtypes: fp16, bf16, fp32 (the torch backend and the references also take fp64). Norm weights may
have another float dtype than the activations; the output then has the promoted dtype, as
``weight * x.to(input_dtype)`` gives in Qwen2RMSNorm. Every op is differentiable in every floating
input (weights may be frozen / ``requires_grad=False``). Bad input raises ``ValueError`` naming the
argument.

Every Triton path is a ``torch.library.custom_op`` in the ``bagel_kernels`` namespace with a fake
(meta) implementation and a registered autograd formula whose backward is again a custom op, so
``torch.compile(fullgraph=True)`` traces through without graph breaks.
"""

from __future__ import annotations

import importlib.util
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import (
    as_float,
    as_int,
    check_like,
    check_same_device,
    check_tensor,
    check_weight,
    has_values,
    next_pow2,
)
from .dispatch import Backend, Family, Request
from .reference import (
    apply_rope,
    mot_linear_reference,
    mot_qk_norm_rope_reference,
    mot_rms_norm_reference,
    permute_rows_reference,
    qwen2_rms_norm,
    rope_inv_freq,
    rope_tables,
    rotate_half,
    swiglu_reference,
)

__all__ = [
    "mot_rms_norm",
    "mot_qk_norm_rope",
    "rope_cos_sin",
    "swiglu",
    "mot_linear",
    "permute_rows",
    "grouped_order",
    "mot_rms_norm_reference",
    "mot_qk_norm_rope_reference",
    "swiglu_reference",
    "mot_linear_reference",
    "permute_rows_reference",
    "qwen2_rms_norm",
    "rotate_half",
    "BACKENDS",
    "MOT",
]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TORCH_DTYPES = _KERNEL_DTYPES + (torch.float64,)
_MAX_ROW_BLOCK = 32768  # widest row the single-tile kernels hold (= mot_triton.MAX_ROW_BLOCK)


# triton is optional (Linux only); its absence only removes the "triton" backend. Looked up, not
# imported: the kernels module is imported on first use, after TRITON_INTERPRET has been decided.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_reasons(req: Request) -> list[str]:
    return [] if _HAS_TRITON else ["needs the triton package, which is not installed"]


# The routed ops' backends (bagel_kernels.dispatch). ``row_width``: the widest row one kernel tile holds
# (H for the RMSNorm; heads padded to a power of two times D for q/k norm + RoPE).
MOT = Family(
    "mot",
    {
        "triton": Backend(
            "triton",
            devices=("cuda",),
            dtypes=_KERNEL_DTYPES,
            limits={"row_width": (0, _MAX_ROW_BLOCK)},
            interpreted=True,
            hook=_triton_reasons,
            compile_specs="bagel_kernels.mot_triton",
        ),
        "torch": Backend("torch"),
    },
    auto={"cuda": ("triton", "torch"), "*": ("torch",)},  # never the interpreter on CPU
)
BACKENDS = MOT.names


# ============================================================================================ validation
def _check_n_und(n_und, N) -> None:
    if isinstance(n_und, bool) or not isinstance(n_und, (int, torch.SymInt)):
        raise ValueError(f"n_und must be an int, got {type(n_und).__name__}")
    if n_und < 0 or n_und > N:
        raise ValueError(f"n_und={n_und} is outside [0, N={N}]")


def _resolve_backend(backend, device: torch.device, dtype: torch.dtype, row_width: int | None = None) -> str:
    """ "triton" or "torch" for inputs on ``device`` in ``dtype`` whose widest kernel row is ``row_width``."""
    sizes = {} if row_width is None else {"row_width": row_width}
    return MOT.choose(backend, Request(device, dtype, sizes)).name


def _unit_last(t: Tensor) -> Tensor:
    """t with a unit stride in its last dimension (kernels take any other strides)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _norm_out_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(x_dtype, w_dtype)


def _empty_grad(ref: Tensor) -> Tensor:
    return ref.new_empty((0,))


# Checks at the top of every registered op's body. The ops are public surface
# (``torch.ops.bagel_kernels.*``) and their kernels index memory by the shapes and indexes they are
# given, so each op checks sizes, dtypes and devices itself (no host sync), whatever the public
# function in front of it has checked already; an index tensor's values are checked too where the
# kernel addresses memory through them (the permutation ops, one host sync).
def _op_check(op: str, fn, *args) -> None:
    try:
        fn(*args)
    except ValueError as exc:
        raise ValueError(f"torch.ops.bagel_kernels.{op}: {exc}") from None


def _check_rows(x: Tensor, n_und, width: int, *, ref_name: str = "x") -> None:
    """x holds kernel rows: a kernel dtype, ``n_und`` within its rows, rows no wider than one tile."""
    if x.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"{ref_name} has dtype {x.dtype}; the kernels take fp16, bf16 or fp32")
    if n_und is not None:
        _check_n_und(n_und, x.shape[0])
    if width > _MAX_ROW_BLOCK:
        raise ValueError(f"rows of {width} elements exceed the kernels' limit of {_MAX_ROW_BLOCK}")


# Each op's arguments are checked by one function that the public function calls too; the ops add
# what their kernels need on top (``_check_rows``: a kernel dtype, rows no wider than one tile).
def _check_rms_args(x, n_und, weight_und, weight_gen) -> None:
    check_tensor("x", x, dims=2, dtypes=_TORCH_DTYPES)
    _check_n_und(n_und, x.shape[0])
    for name, w in (("weight_und", weight_und), ("weight_gen", weight_gen)):
        check_weight(name, w, (x.shape[1],), x, dtypes=_TORCH_DTYPES)
    if weight_gen.dtype != weight_und.dtype:
        raise ValueError(f"weight_gen has dtype {weight_gen.dtype} but weight_und has {weight_und.dtype}")


def _check_rms_kernel_args(x, n_und, weight_und, weight_gen) -> None:
    _check_rms_args(x, n_und, weight_und, weight_gen)
    _check_rows(x, None, x.shape[1])


def _check_qk_args(q, k, n_und, weights, cos, sin) -> None:
    check_tensor("q", q, dims=3, dtypes=_TORCH_DTYPES)
    check_tensor("k", k, dims=3, dtypes=_TORCH_DTYPES)
    N, _, D = q.shape
    if k.shape[0] != N:
        raise ValueError(f"k must be [N, Hkv, D] like q: k has {k.shape[0]} tokens but q has {N}")
    if k.shape[2] != D:
        raise ValueError(f"k must be [N, Hkv, D] like q: k head dim {k.shape[2]} differs from q head dim {D}")
    if k.dtype != q.dtype:
        raise ValueError(f"k must be in q's dtype: k has dtype {k.dtype} but q has {q.dtype}")
    if D % 2 != 0:
        raise ValueError(f"head dim (q.shape[2]) must be even for rotary embedding, got {D}")
    check_same_device("q", q, k=k)
    _check_n_und(n_und, N)
    names = ("q_weight_und", "q_weight_gen", "k_weight_und", "k_weight_gen")
    for name, w in zip(names, weights, strict=True):
        check_weight(name, w, (D,), q, "q", dtypes=_TORCH_DTYPES)
        if w.dtype != weights[0].dtype:
            raise ValueError(f"{name} has dtype {w.dtype} but q_weight_und has {weights[0].dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_weight(name, t, (N, D), q, "q", dtypes=_TORCH_DTYPES)


def _qk_row_width(q: Tensor, k: Tensor) -> int:
    """The widest kernel row of the q/k op: all heads of q or of k, each padded to a power of two."""
    return max(next_pow2(q.shape[1]), next_pow2(k.shape[1])) * q.shape[2]


def _check_qk_kernel_args(q, k, n_und, weights, cos, sin) -> None:
    _check_qk_args(q, k, n_und, weights, cos, sin)
    _check_rows(q, None, _qk_row_width(q, k), ref_name="q")


def _check_swiglu_args(gate, up) -> None:
    check_tensor("gate", gate, dims=2, dtypes=_TORCH_DTYPES)
    check_tensor("up", up, dims=2, dtypes=_TORCH_DTYPES)
    if up.shape != gate.shape:
        raise ValueError(
            f"up must have the shape of gate: up has shape {tuple(up.shape)} but gate has {tuple(gate.shape)}"
        )
    if up.dtype != gate.dtype:
        raise ValueError(f"up has dtype {up.dtype} but gate has {gate.dtype}")
    check_same_device("gate", gate, up=up)


def _check_swiglu_kernel_args(gate, up) -> None:
    _check_swiglu_args(gate, up)
    _check_rows(gate, None, 1, ref_name="gate")


def _check_linear_args(x, n_und, weight_und, bias_und, weight_gen, bias_gen) -> None:
    check_tensor("x", x, dims=2, dtypes=_TORCH_DTYPES)
    _check_n_und(n_und, x.shape[0])
    check_tensor("weight_und", weight_und, dims=2, dtypes=_TORCH_DTYPES)
    hout = weight_und.shape[0]
    for name, w in (("weight_und", weight_und), ("weight_gen", weight_gen)):
        check_weight(name, w, (hout, x.shape[1]), x, dtypes=_TORCH_DTYPES)
        if w.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {w.dtype} but x has {x.dtype}")
    for name, b in (("bias_und", bias_und), ("bias_gen", bias_gen)):
        if b is not None:
            check_weight(name, b, (hout,), x, dtypes=_TORCH_DTYPES)
            if b.dtype != x.dtype:
                raise ValueError(f"{name} has dtype {b.dtype} but x has {x.dtype}")


def _check_index_args(x, index, values: bool = True) -> None:
    """``index`` is an int32/int64 permutation of ``range(x.shape[0])`` on x's device (``values``:
    the permutation's values too, one host sync, where they can be read)."""
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be a 1-D int32/int64 tensor, got {index.dtype} {tuple(index.shape)}")
    if index.shape[0] != x.shape[0]:
        raise ValueError(f"index has {index.shape[0]} entries but x has {x.shape[0]} rows")
    check_same_device("x", x, index=index)
    if values and has_values(index):
        _check_permutation(index, x.shape[0])


# ============================================================================================ plain torch math
def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [M, heads, D], cos/sin [M, D] (cast to x's dtype, as Qwen2 hands them over)."""
    return apply_rope(x, cos.to(x.dtype), sin.to(x.dtype))


# ============================================================================================ rms norm
@torch.library.custom_op("bagel_kernels::mot_rms_norm", mutates_args=())
def _mot_rms_norm_op(x: Tensor, n_und: int, weight_und: Tensor, weight_gen: Tensor, eps: float) -> Tensor:
    from .mot_triton import rms_norm_fwd

    _op_check("mot_rms_norm", _check_rms_kernel_args, x, n_und, weight_und, weight_gen)
    w = torch.stack((weight_und, weight_gen))
    return rms_norm_fwd(_unit_last(x), n_und, w, eps, _norm_out_dtype(x.dtype, weight_und.dtype))


@_mot_rms_norm_op.register_fake
def _(x, n_und, weight_und, weight_gen, eps):
    # every fake checks what its op checks short of values (devices above all: the dispatcher runs the
    # fake whenever one argument is on meta, and an unchecked fake would hand back uninitialised memory)
    _op_check("mot_rms_norm", _check_rms_kernel_args, x, n_und, weight_und, weight_gen)
    return x.new_empty(x.shape, dtype=_norm_out_dtype(x.dtype, weight_und.dtype))


@torch.library.custom_op("bagel_kernels::mot_rms_norm_backward", mutates_args=())
def _mot_rms_norm_bwd_op(
    dy: Tensor, x: Tensor, n_und: int, weight_und: Tensor, weight_gen: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    from .mot_triton import rms_norm_bwd

    _op_check("mot_rms_norm_backward", _check_rms_kernel_args, x, n_und, weight_und, weight_gen)
    _op_check("mot_rms_norm_backward", check_like, "dy", dy, x, "x", _KERNEL_DTYPES)
    w = torch.stack((weight_und, weight_gen))
    dx, dwu, dwg = rms_norm_bwd(_unit_last(dy), _unit_last(x), n_und, w, eps)
    return dx, dwu.to(weight_und.dtype), dwg.to(weight_gen.dtype)


@_mot_rms_norm_bwd_op.register_fake
def _(dy, x, n_und, weight_und, weight_gen, eps):
    _op_check("mot_rms_norm_backward", _check_rms_kernel_args, x, n_und, weight_und, weight_gen)
    _op_check("mot_rms_norm_backward", check_like, "dy", dy, x, "x", _KERNEL_DTYPES)
    return (
        x.new_empty(x.shape),
        weight_und.new_empty(weight_und.shape),
        weight_gen.new_empty(weight_gen.shape),
    )


def _rms_setup(ctx, inputs, output):
    x, n_und, weight_und, weight_gen, eps = inputs
    ctx.save_for_backward(x, weight_und, weight_gen)
    ctx.n_und, ctx.eps = n_und, eps


def _rms_backward(ctx, dy):
    x, wu, wg = ctx.saved_tensors
    dx, dwu, dwg = torch.ops.bagel_kernels.mot_rms_norm_backward(dy, x, ctx.n_und, wu, wg, ctx.eps)
    need = ctx.needs_input_grad
    return dx if need[0] else None, None, dwu if need[2] else None, dwg if need[3] else None, None


_mot_rms_norm_op.register_autograd(_rms_backward, setup_context=_rms_setup)


def mot_rms_norm(
    x: Tensor, n_und: int, weight_und: Tensor, weight_gen: Tensor, eps: float = 1e-6, *, backend: str = "auto"
) -> Tensor:
    """Routed Qwen2RMSNorm: rows ``< n_und`` use ``weight_und``, rows ``>= n_und`` use ``weight_gen``.

    ``y = weight * (x32 * rsqrt(mean(x32^2, -1) + eps)).to(x.dtype)`` per row, fp32 statistics.
    x: ``[N, H]`` (any row stride); weights ``[H]``, same dtype as each other. Output ``[N, H]`` in
    ``promote_types(x.dtype, weight.dtype)``. One launch for both experts."""
    _check_rms_args(x, n_und, weight_und, weight_gen)
    eps = as_float(eps, "eps", min_value=0.0)
    be = _resolve_backend(backend, x.device, x.dtype, x.shape[1])
    if be == "triton":
        return _mot_rms_norm_op(x, n_und, weight_und, weight_gen, float(eps))
    dt = _norm_out_dtype(x.dtype, weight_und.dtype)
    return torch.cat(
        (qwen2_rms_norm(x[:n_und], weight_und, eps), qwen2_rms_norm(x[n_und:], weight_gen, eps))
    ).to(dt)


# ============================================================================================ q/k norm + rope
class _QKInputs(NamedTuple):
    """The inputs of the q/k op, in its schema's order, bundled inside the op bodies (every op of the
    package is declared one way: a flat, typed Python signature from which torch.library infers the
    schema; op schemas are the documented exception to the ~10-parameter rule)."""

    q: Tensor
    k: Tensor
    n_und: int
    q_weight_und: Tensor
    q_weight_gen: Tensor
    k_weight_und: Tensor
    k_weight_gen: Tensor
    cos: Tensor
    sin: Tensor
    eps: float

    def weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.q_weight_und, self.q_weight_gen, self.k_weight_und, self.k_weight_gen


def _qk_kernel_args(op: str, a: _QKInputs):
    """The q/k op's checks (``_op_check``) and its inputs as the launchers take them
    (:class:`bagel_kernels.mot_triton.QKArgs`: unit last strides, the experts' weights stacked)."""
    from .mot_triton import QKArgs

    _op_check(op, _check_qk_kernel_args, a.q, a.k, a.n_und, a.weights(), a.cos, a.sin)
    return QKArgs(
        q=_unit_last(a.q),
        k=_unit_last(a.k),
        n_und=a.n_und,
        wq=torch.stack((a.q_weight_und, a.q_weight_gen)),
        wk=torch.stack((a.k_weight_und, a.k_weight_gen)),
        cos=_unit_last(a.cos),
        sin=_unit_last(a.sin),
        eps=a.eps,
    )


def _qk_out_dtype(a: _QKInputs) -> torch.dtype:
    return _norm_out_dtype(a.q.dtype, a.q_weight_und.dtype)


@torch.library.custom_op("bagel_kernels::mot_qk_norm_rope", mutates_args=())
def _mot_qk_norm_rope_op(
    q: Tensor, k: Tensor, n_und: int, q_weight_und: Tensor, q_weight_gen: Tensor, k_weight_und: Tensor,
    k_weight_gen: Tensor, cos: Tensor, sin: Tensor, eps: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    from .mot_triton import qk_norm_rope_fwd

    a = _QKInputs(q, k, n_und, q_weight_und, q_weight_gen, k_weight_und, k_weight_gen, cos, sin, eps)
    return qk_norm_rope_fwd(_qk_kernel_args("mot_qk_norm_rope", a), _qk_out_dtype(a))


@_mot_qk_norm_rope_op.register_fake
def _(q, k, n_und, q_weight_und, q_weight_gen, k_weight_und, k_weight_gen, cos, sin, eps):
    a = _QKInputs(q, k, n_und, q_weight_und, q_weight_gen, k_weight_und, k_weight_gen, cos, sin, eps)
    _op_check("mot_qk_norm_rope", _check_qk_kernel_args, a.q, a.k, a.n_und, a.weights(), a.cos, a.sin)
    dt = _qk_out_dtype(a)
    return a.q.new_empty(a.q.shape, dtype=dt), a.k.new_empty(a.k.shape, dtype=dt)


@torch.library.custom_op("bagel_kernels::mot_qk_norm_rope_backward", mutates_args=())
def _mot_qk_norm_rope_bwd_op(
    dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, n_und: int, q_weight_und: Tensor, q_weight_gen: Tensor,
    k_weight_und: Tensor, k_weight_gen: Tensor, cos: Tensor, sin: Tensor, eps: float, need_cos_sin: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of q, k, the four weights (their dtype) and, when ``need_cos_sin``, cos and sin
    (else empty ``[0]`` tensors)."""
    from .mot_triton import qk_norm_rope_bwd

    op = "mot_qk_norm_rope_backward"
    a = _QKInputs(q, k, n_und, q_weight_und, q_weight_gen, k_weight_und, k_weight_gen, cos, sin, eps)
    args = _qk_kernel_args(op, a)
    _op_check(op, check_like, "dq_out", dq_out, a.q, "q", _KERNEL_DTYPES)
    _op_check(op, check_like, "dk_out", dk_out, a.k, "k", _KERNEL_DTYPES)
    dq, dk, *dw, dcos, dsin = qk_norm_rope_bwd(_unit_last(dq_out), _unit_last(dk_out), args, need_cos_sin)
    wdt = a.q_weight_und.dtype
    return (dq, dk, *(g.to(wdt) for g in dw), dcos.to(a.cos.dtype), dsin.to(a.sin.dtype))


@_mot_qk_norm_rope_bwd_op.register_fake
def _(dq_out, dk_out, q, k, n_und, q_weight_und, q_weight_gen, k_weight_und, k_weight_gen, cos, sin, eps,
      need_cos_sin):  # fmt: skip
    a = _QKInputs(q, k, n_und, q_weight_und, q_weight_gen, k_weight_und, k_weight_gen, cos, sin, eps)
    op = "mot_qk_norm_rope_backward"
    _op_check(op, _check_qk_kernel_args, a.q, a.k, a.n_und, a.weights(), a.cos, a.sin)
    _op_check(op, check_like, "dq_out", dq_out, a.q, "q", _KERNEL_DTYPES)
    _op_check(op, check_like, "dk_out", dk_out, a.k, "k", _KERNEL_DTYPES)
    cs = a.cos.shape if need_cos_sin else (0,)
    return (
        a.q.new_empty(a.q.shape),
        a.k.new_empty(a.k.shape),
        *(w.new_empty(w.shape) for w in a.weights()),
        a.cos.new_empty(cs),
        a.sin.new_empty(cs),
    )


def _qk_setup(ctx, inputs, output):
    q, k, n_und, qwu, qwg, kwu, kwg, cos, sin, eps = inputs
    ctx.save_for_backward(q, k, qwu, qwg, kwu, kwg, cos, sin)
    ctx.n_und, ctx.eps = n_und, eps


def _qk_backward(ctx, dq_out, dk_out):
    q, k, qwu, qwg, kwu, kwg, cos, sin = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_cs = bool(need[7] or need[8])
    dq, dk, dqwu, dqwg, dkwu, dkwg, dcos, dsin = torch.ops.bagel_kernels.mot_qk_norm_rope_backward(
        dq_out, dk_out, q, k, ctx.n_und, qwu, qwg, kwu, kwg, cos, sin, ctx.eps, need_cs
    )
    grads = (dq, dk, None, dqwu, dqwg, dkwu, dkwg, dcos, dsin, None)
    return tuple(g if i not in (2, 9) and need[i] else None for i, g in enumerate(grads))


_mot_qk_norm_rope_op.register_autograd(_qk_backward, setup_context=_qk_setup)


def mot_qk_norm_rope(
    q: Tensor,
    k: Tensor,
    n_und: int,
    q_weight_und: Tensor,
    q_weight_gen: Tensor,
    k_weight_und: Tensor,
    k_weight_gen: Tensor,
    cos: Tensor,
    sin: Tensor,
    eps: float = 1e-6,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Routed per-head Qwen2RMSNorm of q and k followed by Qwen2 rotary embedding, fused.

    ``n = qwen2_rms_norm(x_head, weight_expert)`` over D, then ``out = n * cos + rotate_half(n) * sin``
    with cos/sin cast to the output dtype first (as Qwen2's rotary embedding hands them over).
    q: ``[N, Hq, D]``, k: ``[N, Hkv, D]`` (any row/head strides), D even; the four weights ``[D]`` of one
    dtype; cos, sin: ``[N, D]`` per token, in the grouped row order (any float dtype, e.g. from
    :func:`rope_cos_sin`). Returns ``(q_out, k_out)`` in ``promote_types(q.dtype, weight.dtype)``.
    One launch covers q and k of both experts, forward and backward."""
    weights = (q_weight_und, q_weight_gen, k_weight_und, k_weight_gen)
    _check_qk_args(q, k, n_und, weights, cos, sin)
    eps = as_float(eps, "eps", min_value=0.0)
    be = _resolve_backend(backend, q.device, q.dtype, _qk_row_width(q, k))
    if be == "triton":
        return _mot_qk_norm_rope_op(
            q, k, n_und, q_weight_und, q_weight_gen, k_weight_und, k_weight_gen, cos, sin, float(eps)
        )
    dt = _norm_out_dtype(q.dtype, q_weight_und.dtype)
    outs = []
    for x, wu, wg in ((q, q_weight_und, q_weight_gen), (k, k_weight_und, k_weight_gen)):
        n = torch.cat((qwen2_rms_norm(x[:n_und], wu, eps), qwen2_rms_norm(x[n_und:], wg, eps))).to(dt)
        outs.append(_rope(n, cos, sin))
    return outs[0], outs[1]


# ============================================================================================ rotary tables
_INV_FREQ: dict[tuple[int, float, torch.device], Tensor] = {}


def _inv_freq(head_dim: int, theta: float, device: torch.device) -> Tensor:
    """HF's default-rope ``inv_freq`` (computed on the CPU in fp32, as the module's buffer is), cached
    per device so that a training step pays no host-to-device copy (and no sync) for it."""
    key = (head_dim, theta, device)
    if key not in _INV_FREQ:
        _INV_FREQ[key] = rope_inv_freq(head_dim, theta).to(device)
    return _INV_FREQ[key]


def rope_cos_sin(
    position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos, sin ``[N, head_dim]`` for integer ``position_ids [N]``, computed exactly as transformers'
    ``Qwen2RotaryEmbedding`` (default rope type): ``inv_freq = 1 / theta**(arange(0, D, 2) / D)`` built
    on the CPU in fp32 (where the HF module builds its buffer), ``freqs = pos.float() * inv_freq``,
    ``emb = cat(freqs, freqs)``, then ``cos``/``sin`` in fp32, cast to ``dtype``."""
    if not isinstance(position_ids, Tensor) or position_ids.dim() != 1:
        raise ValueError("position_ids must be a 1-D integer tensor")
    if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise ValueError(f"position_ids must hold integers, got dtype {position_ids.dtype}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    theta = as_float(theta, "theta", positive=True)  # inf would make RoPE the identity
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return rope_tables(position_ids, _inv_freq(head_dim, float(theta), position_ids.device), dtype)


# ============================================================================================ swiglu
@torch.library.custom_op("bagel_kernels::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    from .mot_triton import swiglu_fwd

    _op_check("swiglu", _check_swiglu_kernel_args, gate, up)
    return swiglu_fwd(_unit_last(gate), _unit_last(up))


@_swiglu_op.register_fake
def _(gate, up):
    _op_check("swiglu", _check_swiglu_kernel_args, gate, up)
    return gate.new_empty(gate.shape)


@torch.library.custom_op("bagel_kernels::swiglu_backward", mutates_args=())
def _swiglu_bwd_op(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    from .mot_triton import swiglu_bwd

    _op_check("swiglu_backward", _check_swiglu_kernel_args, gate, up)
    _op_check("swiglu_backward", check_like, "dy", dy, gate, "gate", _KERNEL_DTYPES)
    return swiglu_bwd(_unit_last(dy), _unit_last(gate), _unit_last(up))


@_swiglu_bwd_op.register_fake
def _(dy, gate, up):
    _op_check("swiglu_backward", _check_swiglu_kernel_args, gate, up)
    _op_check("swiglu_backward", check_like, "dy", dy, gate, "gate", _KERNEL_DTYPES)
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dg, du = torch.ops.bagel_kernels.swiglu_backward(dy, gate, up)
    need = ctx.needs_input_grad
    return dg if need[0] else None, du if need[1] else None


_swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu(gate: Tensor, up: Tensor, *, backend: str = "auto") -> Tensor:
    """``silu(gate) * up`` elementwise, computed in fp32 and stored in the inputs' dtype.

    gate, up: ``[N, I]`` of one dtype (any row stride, e.g. the two halves of a fused gate/up
    projection); output ``[N, I]`` contiguous. The backward recomputes ``silu`` (nothing extra saved)."""
    _check_swiglu_args(gate, up)
    be = _resolve_backend(backend, gate.device, gate.dtype)
    if be == "triton":
        return _swiglu_op(gate, up)
    return swiglu_reference(gate, up)


# ============================================================================================ routed linear
def _gemm_rows(a: Tensor) -> Tensor:
    """``a`` as a GEMM's left operand. PyTorch's CPU bf16 GEMM (the AMX/oneDNN path, seen with torch 2.13
    on Xeons with amx_bf16) reads past the row end of a row-strided operand whose width is not a multiple
    of its block and multiplies what it finds there by zero: finite neighbours vanish, but a NaN or Inf
    beside the view (a padded buffer, the next projection's columns) turns whole output rows into NaN. A
    contiguous copy there keeps the result a function of the view alone; elsewhere ``a`` is used as is."""
    if a.device.type == "cpu" and a.dtype == torch.bfloat16 and not a.is_contiguous():
        return a.contiguous()
    return a


def _mm_into(out: Tensor, a: Tensor, b: Tensor, bias: Tensor | None) -> None:
    """out = a @ b (+ bias), written in place (out is a contiguous row slice of a larger buffer)."""
    if a.shape[0] == 0:
        return
    a = _gemm_rows(a)
    if bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)


@torch.library.custom_op("bagel_kernels::mot_linear", mutates_args=())
def _mot_linear_op(
    x: Tensor,
    n_und: int,
    weight_und: Tensor,
    bias_und: Tensor | None,
    weight_gen: Tensor,
    bias_gen: Tensor | None,
) -> Tensor:
    _op_check("mot_linear", _check_linear_args, x, n_und, weight_und, bias_und, weight_gen, bias_gen)
    out = x.new_empty((x.shape[0], weight_und.shape[0]))
    _mm_into(out[:n_und], x[:n_und], weight_und.t(), bias_und)
    _mm_into(out[n_und:], x[n_und:], weight_gen.t(), bias_gen)
    return out


@_mot_linear_op.register_fake
def _(x, n_und, weight_und, bias_und, weight_gen, bias_gen):
    _op_check("mot_linear", _check_linear_args, x, n_und, weight_und, bias_und, weight_gen, bias_gen)
    return x.new_empty((x.shape[0], weight_und.shape[0]))


@torch.library.custom_op("bagel_kernels::mot_linear_backward", mutates_args=())
def _mot_linear_bwd_op(
    dy: Tensor,
    x: Tensor,
    n_und: int,
    weight_und: Tensor,
    weight_gen: Tensor,
    need_dx: bool,
    need_dw_und: bool,
    need_dw_gen: bool,
    need_db_und: bool,
    need_db_gen: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients the flags ask for (the others come back as empty ``[0]`` tensors)."""
    op = "mot_linear_backward"
    _op_check(op, _check_linear_args, x, n_und, weight_und, None, weight_gen, None)
    _op_check(op, check_weight, "dy", dy, (x.shape[0], weight_und.shape[0]), x, "x", _TORCH_DTYPES)
    dx, dwu, dwg, dbu, dbg = (_empty_grad(x) for _ in range(5))
    dyu, dyg = dy[:n_und], dy[n_und:]
    if need_dx:
        dx = x.new_empty(x.shape)
        _mm_into(dx[:n_und], dyu, weight_und, None)
        _mm_into(dx[n_und:], dyg, weight_gen, None)
    if need_dw_und:
        dwu = torch.mm(dyu.t(), x[:n_und]) if n_und > 0 else weight_und.new_zeros(weight_und.shape)
    if need_dw_gen:
        dwg = torch.mm(dyg.t(), x[n_und:]) if n_und < x.shape[0] else weight_gen.new_zeros(weight_gen.shape)
    if need_db_und:
        dbu = dyu.sum(0, dtype=torch.float32).to(dy.dtype)
    if need_db_gen:
        dbg = dyg.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, dwu, dwg, dbu, dbg


@_mot_linear_bwd_op.register_fake
def _(dy, x, n_und, weight_und, weight_gen, need_dx, need_dw_und, need_dw_gen, need_db_und, need_db_gen):
    op = "mot_linear_backward"
    _op_check(op, _check_linear_args, x, n_und, weight_und, None, weight_gen, None)
    _op_check(op, check_weight, "dy", dy, (x.shape[0], weight_und.shape[0]), x, "x", _TORCH_DTYPES)
    e = lambda: x.new_empty((0,))
    hout = weight_und.shape[0]
    return (
        x.new_empty(x.shape) if need_dx else e(),
        weight_und.new_empty(weight_und.shape) if need_dw_und else e(),
        weight_gen.new_empty(weight_gen.shape) if need_dw_gen else e(),
        dy.new_empty((hout,)) if need_db_und else e(),
        dy.new_empty((hout,)) if need_db_gen else e(),
    )


def _linear_setup(ctx, inputs, output):
    x, n_und, wu, bu, wg, bg = inputs
    ctx.save_for_backward(x, wu, wg)
    ctx.n_und = n_und


def _linear_backward(ctx, dy):
    x, wu, wg = ctx.saved_tensors
    need = ctx.needs_input_grad  # x, n_und, wu, bu, wg, bg
    dx, dwu, dwg, dbu, dbg = torch.ops.bagel_kernels.mot_linear_backward(
        dy, x, ctx.n_und, wu, wg, bool(need[0]), bool(need[2]), bool(need[4]), bool(need[3]), bool(need[5])
    )
    return (
        dx if need[0] else None,
        None,
        dwu if need[2] else None,
        dbu if need[3] else None,
        dwg if need[4] else None,
        dbg if need[5] else None,
    )


_mot_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def mot_linear(
    x: Tensor,
    n_und: int,
    weight_und: Tensor,
    bias_und: Tensor | None,
    weight_gen: Tensor,
    bias_gen: Tensor | None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Routed linear: rows ``< n_und``: ``x @ weight_und.T + bias_und``, rows ``>= n_und`` with the gen
    weights. x ``[N, Hin]``; weights ``[Hout, Hin]``; biases ``[Hout]`` or None; all of x's dtype.

    ``"auto"``/``"triton"``: one custom op doing two GEMMs on the contiguous slices straight into one
    preallocated output (no cat, no gather/scatter); backward likewise (dx into one buffer, dW/db per
    expert, only the gradients autograd asks for). ``"torch"``: two ``F.linear`` and a ``cat``. The op
    is BLAS GEMMs (no Triton kernel), so it runs wherever torch does and "triton" is only a name check."""
    _check_linear_args(x, n_und, weight_und, bias_und, weight_gen, bias_gen)
    MOT.check_name(backend)
    if backend == "torch":
        x = _gemm_rows(x)
        return torch.cat(
            (F.linear(x[:n_und], weight_und, bias_und), F.linear(x[n_und:], weight_gen, bias_gen))
        )
    return _mot_linear_op(x, n_und, weight_und, bias_und, weight_gen, bias_gen)


# ============================================================================================ permutation
def _not_permutation(index: Tensor, N: int) -> Tensor:
    """bool ``[1]`` on index's device, True unless ``index`` (length N) is a permutation: every entry
    in range and every row hit (no host sync)."""
    if N == 0:
        return torch.zeros(1, dtype=torch.bool, device=index.device)
    seen = torch.zeros(N, dtype=torch.bool, device=index.device)
    seen[index.long().clamp(0, N - 1)] = True
    return (~(((index >= 0) & (index < N)).all() & seen.all())).reshape(1)


def _check_permutation(index: Tensor, N: int, name: str = "index") -> None:
    """index (length N) is a permutation iff all entries are in range and every row is hit."""
    if N == 0:
        return
    if bool(_not_permutation(index, N)):  # one host sync
        raise ValueError(f"{name} is not a permutation of range({N})")


def _rows2d(x: Tensor) -> Tensor:
    width = 1
    for n in x.shape[1:]:
        width *= n
    return _unit_last(x.reshape(x.shape[0], width))  # (no -1: ambiguous for zero rows)


@torch.library.custom_op("bagel_kernels::permute_rows", mutates_args=())
def _permute_rows_op(x: Tensor, index: Tensor) -> Tensor:
    """y[i] = x[index[i]]; ``index`` is checked to be a permutation (sizes, dtype, device and values:
    one host sync) before the kernel addresses rows through it."""
    from .mot_triton import permute_rows_launch

    _op_check("permute_rows", _check_index_args, x, index)
    return permute_rows_launch(_rows2d(x), index.contiguous(), scatter=False).view(x.shape)


@_permute_rows_op.register_fake
def _(x, index):
    _op_check("permute_rows", _check_index_args, x, index, False)
    return x.new_empty(x.shape)


@torch.library.custom_op("bagel_kernels::scatter_rows", mutates_args=())
def _scatter_rows_op(x: Tensor, index: Tensor) -> Tensor:
    """y[index[i]] = x[i] (the inverse of permute_rows); ``index`` checked as in permute_rows."""
    from .mot_triton import permute_rows_launch

    _op_check("scatter_rows", _check_index_args, x, index)
    return permute_rows_launch(_rows2d(x), index.contiguous(), scatter=True).view(x.shape)


@_scatter_rows_op.register_fake
def _(x, index):
    _op_check("scatter_rows", _check_index_args, x, index, False)
    return x.new_empty(x.shape)


def _perm_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _permute_backward(ctx, dy):
    (index,) = ctx.saved_tensors
    return torch.ops.bagel_kernels.scatter_rows(dy, index), None


def _scatter_backward(ctx, dy):
    (index,) = ctx.saved_tensors
    return torch.ops.bagel_kernels.permute_rows(dy, index), None


_permute_rows_op.register_autograd(_permute_backward, setup_context=_perm_setup)
_scatter_rows_op.register_autograd(_scatter_backward, setup_context=_perm_setup)


def _permute_backend(x: Tensor, index: Tensor, backend: str) -> str:
    """The cheap checks of :func:`permute_rows` (types, sizes, dtype, device; no host sync) and the
    backend that runs it."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor with at least one dimension")
    if not isinstance(index, Tensor) or index.dim() != 1:
        raise ValueError("index must be a 1-D integer tensor")
    if index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be int32 or int64, got {index.dtype}")
    if index.shape[0] != x.shape[0]:
        raise ValueError(f"index has {index.shape[0]} entries but x has {x.shape[0]} rows")
    check_same_device("x", x, index=index)
    return _resolve_backend(backend, x.device, x.dtype)  # auto: integer rows take plain indexing


def permute_rows(x: Tensor, index: Tensor, *, backend: str = "auto") -> Tensor:
    """``x[index]`` along dim 0 for a permutation ``index`` (int32/int64 ``[N]``); the backward
    scatters the gradient back by ``index``. x: ``[N, ...]``. The permutation is checked on the
    device (one host sync), inside the op so compiled graphs stay whole."""
    if _permute_backend(x, index, backend) == "triton":
        return _permute_rows_op(x, index)
    if not torch.compiler.is_compiling():
        _check_permutation(index, x.shape[0])
    return x.index_select(0, index)


class _PermuteRowsTrusted(torch.autograd.Function):
    """The Triton gather of :func:`permute_rows` and its scatter backward, without the value check."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:
        from .mot_triton import permute_rows_launch

        ctx.save_for_backward(index)  # a later in-place change of index fails the backward, never misreads
        return permute_rows_launch(_rows2d(x), index, scatter=False).view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        from .mot_triton import permute_rows_launch

        (index,) = ctx.saved_tensors
        return permute_rows_launch(_rows2d(dy), index, scatter=True).view(dy.shape), None


def _group_rows(x: Tensor, index: Tensor, backend: str) -> Tensor:
    """``x[index]`` through the Triton gather (or ``index_select``) for an index already validated as a
    permutation (a :class:`GroupedOrder`'s): the cheap checks only, no value check, no host sync.
    Inside ``torch.compile`` and on meta or fake tensors the registered op runs (it is what traces, and
    its fake implementation what fake tensors reach); it skips the value check there too."""
    if _permute_backend(x, index, backend) == "triton":
        if not has_values(x, index):  # traced or fake: the registered op (its fake) stands in for the kernels
            return _permute_rows_op(x, index)
        return _PermuteRowsTrusted.apply(x, index.contiguous())
    return x.index_select(0, index)


def group_rows(x: Tensor, order: GroupedOrder, *, backend: str = "auto") -> Tensor:
    """``x[order.perm]``: the pack's rows grouped by expert (understanding rows first), for a
    :class:`GroupedOrder` (validated when it was built: no value check here, no host sync). The same
    kernels and results as :func:`permute_rows`; the backward scatters the gradient back."""
    if not isinstance(order, GroupedOrder):
        raise ValueError(f"order must be a GroupedOrder (from grouped_order), got {type(order).__name__}")
    return _group_rows(x, order.perm, backend)


def ungroup_rows(x: Tensor, order: GroupedOrder, *, backend: str = "auto") -> Tensor:
    """``x[order.inv]``: grouped rows back in pack order (the inverse of :func:`group_rows`)."""
    if not isinstance(order, GroupedOrder):
        raise ValueError(f"order must be a GroupedOrder (from grouped_order), got {type(order).__name__}")
    return _group_rows(x, order.inv, backend)


def _inverse_permutation(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


class GroupedOrder:
    """The pack's rows grouped by expert: a validated value (building one IS the check).

    ``GroupedOrder(und_indexes, gen_indexes, total)`` takes upstream's ``packed_und_token_indexes`` /
    ``packed_gen_token_indexes`` (1-D integer tensors on one device, disjoint, together a partition of
    ``range(total)``) and checks them once (one host sync on real tensors; skipped for meta and fake
    tensors and while ``torch.compile`` traces, which hold no values to read). Attributes:

        perm    int64 ``[total]``: ``grouped = x[perm]`` puts the understanding tokens first, in the
                order given (upstream's are ascending, i.e. pack order), then the generation tokens
        inv     int64 ``[total]``: ``x = grouped[inv]``; the attention kernel's row index (token ``i``
                of the pack lives at grouped row ``inv[i]``)
        n_und   the number of understanding rows
        total   the number of tokens

    It unpacks as ``perm, inv, n_und = order`` (and indexes like that tuple). Hand it on as is:
    :func:`group_rows`, :func:`ungroup_rows` and :meth:`bagel_kernels.PackedMask.with_row_index` take it
    without checking the values again."""

    __slots__ = ("perm", "inv", "n_und", "total")

    def __init__(
        self, und_indexes: Tensor, gen_indexes: Tensor, total: int, *, _values_checked: bool = False
    ) -> None:
        total = as_int(total, "total")
        if total < 0:
            raise ValueError(f"total must be a non-negative int, got {total!r}")
        for name, t in (("und_indexes", und_indexes), ("gen_indexes", gen_indexes)):
            if not isinstance(t, Tensor) or t.dim() != 1:
                raise ValueError(f"{name} must be a 1-D integer tensor")
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
        check_same_device("und_indexes", und_indexes, gen_indexes=gen_indexes)
        n_und = und_indexes.numel()
        if n_und + gen_indexes.numel() != total:
            raise ValueError(
                f"und_indexes ({n_und}) and gen_indexes ({gen_indexes.numel()}) must together hold total={total} tokens"
            )
        perm = torch.cat((und_indexes, gen_indexes)).long()
        if not _values_checked and has_values(perm):
            try:
                _check_permutation(perm, total, "und_indexes + gen_indexes")
            except ValueError:
                raise ValueError(
                    f"und_indexes and gen_indexes must be disjoint and together cover range({total}) exactly"
                ) from None
        object.__setattr__(self, "perm", perm)
        object.__setattr__(self, "inv", _inverse_permutation(perm))
        object.__setattr__(self, "n_und", n_und)
        object.__setattr__(self, "total", total)

    @staticmethod
    def partition_flags(und_indexes: Tensor, gen_indexes: Tensor, total: int) -> Tensor:
        """bool ``[1]`` on the indexes' device, True unless ``und_indexes`` + ``gen_indexes`` partition
        ``range(total)``: the check of the constructor as a device flag (no host sync), for a caller
        that reads many checks back at once. Read it back, then build with :meth:`from_checked`."""
        perm = torch.cat((und_indexes, gen_indexes)).long()
        return _not_permutation(perm, as_int(total, "total"))

    @classmethod
    def from_checked(cls, und_indexes: Tensor, gen_indexes: Tensor, total: int) -> GroupedOrder:
        """The order of indexes whose :meth:`partition_flags` the caller has read back as False (the
        model's one read-back of all its input checks): every check of the constructor but the values
        (no host sync). A partition that was not checked this way breaks the kernels' row addressing."""
        return cls(und_indexes, gen_indexes, total, _values_checked=True)

    def __setattr__(self, name, value):
        raise AttributeError("GroupedOrder is immutable")

    def _as_tuple(self) -> tuple[Tensor, Tensor, int]:
        return self.perm, self.inv, self.n_und

    def __iter__(self):
        return iter(self._as_tuple())

    def __getitem__(self, i):
        return self._as_tuple()[i]

    def __len__(self) -> int:
        return 3

    def __repr__(self) -> str:
        return f"GroupedOrder(total={self.total}, n_und={self.n_und}, device={self.perm.device})"


def grouped_order(und_indexes: Tensor, gen_indexes: Tensor, total: int) -> GroupedOrder:
    """From upstream's ``packed_und_token_indexes`` / ``packed_gen_token_indexes`` (disjoint, together
    a partition of ``range(total)``) -> the validated :class:`GroupedOrder` ``(perm, inv_perm, n_und)``,
    int64 on the indexes' device.

    ``grouped = x[perm]`` puts the understanding tokens first, in the order given (upstream's are
    ascending, i.e. pack order), then the generation tokens; ``x = grouped[inv_perm]``. ``inv_perm``
    is the attention kernel's ``row_index``: token ``i`` of the pack lives at grouped row
    ``inv_perm[i]``. Checked on the device (one host sync)."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"total must be a non-negative int, got {total!r}")
    return GroupedOrder(und_indexes, gen_indexes, total)

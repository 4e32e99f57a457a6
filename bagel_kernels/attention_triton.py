"""Triton packed attention (FlashAttention-2 style forward and backward) under a :class:`PackedMask`.

Math (per query head h, kv head ``h // G`` with ``G = Hq // Hkv``; ``vis(i, j) = kv_lo[j] <= i < kv_hi[j]``):

    S = scale * Q K^T   masked where not vis       P = softmax(S)  (rows with no visible key: P = 0)
    O = P V             LSE = log2-domain log-sum-exp of S * log2(e)   (+inf for rows that see nothing)
    dV = P^T dO         dP = dO V^T      dS = P * (dP - rowsum(dO * O))
    dQ = scale * dS K   dK = scale * dS^T Q

Shapes (N = mask.total_len = tokens, D <= 256):
    q: [N, Hq, D]   k, v: [N, Hkv, D]   out: [N, Hq, D]   lse, delta: [Hq, N] fp32

Head dim inside the kernels: power-of-two column blocks (``AttnConfig.dsplit``, :func:`dim_split`). A
head dim that is no power of two runs as two blocks when that is narrower than padding, each matrix
product becoming two: SigLIP's 72 as 64 + 16 (80 columns of MMA work instead of 128), 96 as 64 + 32;
otherwise (or with ``dsplit=0``) one block of D padded to a power of two. Columns >= D read as 0.

Kernels (one program per tile row, heaviest first: the launch order is a longest-processing-time
permutation of the blocks, so the ragged tail of a packed batch does not idle the GPU):

    _attn_fwd_kernel       program = (query block m, q head); iterates m's CSR list of non-empty key
                           blocks ``q_kv_idx[q_kv_ptr[m]:q_kv_ptr[m+1]]``; ``q_kv_full`` tiles skip the
                           per-element mask; online softmax in base 2 (log2(e) folded into the scale).
    _attn_bwd_delta_kernel delta = rowsum(dO * O) in fp32.
    _attn_bwd_kernel       one launch, two kinds of program: dK/dV programs = (key block n, kv head)
                           iterate the query blocks ``[kv_q_start[n], kv_q_end[n])`` of every q head of
                           the GQA group (summing the group in registers: no atomics, no repeated K/V);
                           dQ programs = (query block, q head) iterate the CSR list like the forward.
                           Fullness of a dK/dV tile comes from ``kv_max_lo``/``kv_min_hi``.
                           7 matrix products per visible tile pair (Q K^T and dO V^T twice), no atomics.
    _attn_bwd_onepass_kernel   the one-pass backward: dK/dV programs only, each also adding its
                           share of dQ (dS K) to an fp32 accumulator ``[Hq, N, D]`` (mask order) with
                           atomics: 5 products per tile pair. The delta kernel zeroes the accumulator
                           (``ZERO_DQ``); ``_attn_dq_cast_kernel`` scales it and writes dq through the
                           row index in q's dtype.

The softmax scale must be >= 0: full tiles take the row max of the unscaled scores and scale it,
which fuses scaling and max subtraction into one FMA per score.

Which backward runs: ``deterministic=True`` always the two-program one (no atomics: bit-identical
across runs); ``deterministic=False`` the one-pass one where the configuration says so
(``AttnConfig.onepass``; the built-in default is the two-program backward until a GPU measurement
decides, see :mod:`bagel_kernels.attention_configs`). Its dQ is summed in an order that varies from
run to run. No dense mask is ever built.

Row permutation: when ``mask.row_index`` is set, token ``i`` (mask order) lives at row
``row_index[i]`` of q, k, v, out, dq, dk, dv. The kernels iterate in mask order and load/store
rows through the index; lse and delta stay in mask order.

Under ``TRITON_INTERPRET=1`` (CPU tests) every operand is upcast to fp32 right after loading
(bf16/fp16 arithmetic is unreliable in the interpreter); on the GPU ``tl.dot`` takes fp16/bf16
operands with fp32 accumulation, and fp32 inputs use ``input_precision="ieee"`` (exact fp32).

This module holds the Triton backend's whole chain, in call order: the kernels, their launchers
(:func:`launch_fwd`, :func:`launch_bwd`), the block tables (:func:`prepare_mask`), the registered ops
``bagel_kernels::packed_attention_fwd`` and ``bagel_kernels::packed_attention_bwd``
(``torch.library.custom_op`` + ``register_fake`` + ``register_autograd``; :func:`check_op_inputs` is
what they and their fakes check), the public :func:`triton_packed_attention` (validates, then
:func:`run`, which :func:`bagel_kernels.packed_attention` calls after its own validation), and the
compile specs (:func:`compile_cases`, :func:`compile_specs`). The tables travel as tensor arguments, so
``torch.compile(fullgraph=True)`` traces through ``triton_packed_attention`` once the mask's tables
exist (:func:`prepare_mask` builds them ahead, outside the compiled region).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import astuple
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .attention_configs import (
    AttnConfig,
    Blocks,
    Launch,
    check_interpreter,
    check_tiles,
    config_for,
    default_for,
    device_arch,
    dim_split,
)
from .backends import interpreting
from .checks import as_bool, check_range, check_softmax_scale, check_vector, has_values
from .mask import PackedMask, derived

__all__ = [
    "BwdTables",
    "FwdTables",
    "KernelArgs",
    "default_config",
    "op_params",
    "prepare_mask",
    "check_qkv",
    "check_op_inputs",
    "stride_align",
    "tma_usable",
    "launch_fwd",
    "launch_bwd",
    "packed_attention_fwd",
    "packed_attention_bwd",
    "triton_packed_attention",
    "run",
    "compile_cases",
    "compile_specs",
]

_LOG2E = 1.4426950408889634
_INT32_MAX = 2**31 - 1
# kv_lo of the key columns beyond the pack: an interval start no query reaches (such keys see nothing)
_LO_NONE = tl.constexpr(_INT32_MAX)
# longest pack the kernels take: token indices and tile offsets (block start + tile) stay int32
_MAX_TOKENS = _INT32_MAX // 2
# rows per program of the row-wise kernels (delta, one-pass dQ cast)
_ROW_BLOCK = 64
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ================================================================================================ kernels
# Head-dim layout: a tile's columns are one block of DA columns, plus, when DB > 0, a second block of
# DB columns starting at DA (both powers of two >= 16; columns >= D read as 0 and are never stored).
# DB = 0 is the padded layout (DA = D rounded up to a power of two); DB > 0 splits a head dim such as
# SigLIP's 72 into 64 + 16, so that every product runs on 80 columns instead of 128 (see dim_split).
@triton.jit
def _load_rows(ROW_IDX, offs, ok, N, HAS_ROW_IDX: tl.constexpr):
    """Physical rows (int64) of the mask-order tokens ``offs`` (0 where ``ok`` is false). Row-index
    values are clamped to [0, N): a bad index cannot address memory outside the tensors."""
    if HAS_ROW_IDX:
        rows = tl.load(ROW_IDX + offs, mask=ok, other=0)
        rows = tl.minimum(tl.maximum(rows, 0), N - 1)
    else:
        rows = offs
    return rows.to(tl.int64)


@triton.jit
def _load_cols(
    base, rows, row_ok, stride_t, C0: tl.constexpr, W: tl.constexpr, D: tl.constexpr, LOWP_DOT: tl.constexpr
):
    """``[len(rows), W]`` tile of columns ``[C0, C0 + W)``; rows beyond the pack, columns >= D: 0."""
    offs_d = C0 + tl.arange(0, W)
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    if C0 + W <= D:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if not LOWP_DOT:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_cols(base, rows, row_ok, stride_t, x, C0: tl.constexpr, W: tl.constexpr, D: tl.constexpr):
    offs_d = C0 + tl.arange(0, W)
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    if C0 + W <= D:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _atomic_add_cols(base, rows, row_ok, stride_t, x, C0: tl.constexpr, W: tl.constexpr, D: tl.constexpr):
    """fp32 ``base[rows, C0:C0+W] += x`` (relaxed atomics: only the sum matters, not the order)."""
    offs_d = C0 + tl.arange(0, W)
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    if C0 + W <= D:
        tl.atomic_add(ptrs, x, mask=row_ok[:, None], sem="relaxed")
    else:
        tl.atomic_add(ptrs, x, mask=row_ok[:, None] & (offs_d[None, :] < D), sem="relaxed")


@triton.jit
def _atomic_add_rows_t(base, rows, row_ok, stride_t, x_t, C0: tl.constexpr, W: tl.constexpr, D: tl.constexpr):
    """fp32 ``base[rows, C0:C0+W] += x_t.T`` for ``x_t`` of shape ``[W, len(rows)]`` (relaxed atomics)."""
    offs_d = C0 + tl.arange(0, W)
    ptrs = base + rows[None, :] * stride_t + offs_d[:, None]
    if C0 + W <= D:
        tl.atomic_add(ptrs, x_t, mask=row_ok[None, :], sem="relaxed")
    else:
        tl.atomic_add(ptrs, x_t, mask=row_ok[None, :] & (offs_d[:, None] < D), sem="relaxed")


@triton.jit
def _clamp(x, hi):
    """``x`` clamped to [0, hi] (scalars read from the block tables)."""
    return tl.minimum(tl.maximum(x, 0), hi)


@triton.jit
def _load_pair(base_a, base_b, rows, ok, stride_a, stride_b, DA: tl.constexpr, DB: tl.constexpr,
               D: tl.constexpr, LOWP_DOT: tl.constexpr):  # fmt: skip
    """Two tensors read at the same rows (K and V of a key block, Q and dO of a query block):
    ``(a, b, a2, b2)``, ``a2``/``b2`` their second column block when ``DB > 0`` (else ``a``/``b``
    again, unused)."""
    a = _load_cols(base_a, rows, ok, stride_a, 0, DA, D, LOWP_DOT)
    b = _load_cols(base_b, rows, ok, stride_b, 0, DA, D, LOWP_DOT)
    a2, b2 = a, b
    if DB > 0:
        a2 = _load_cols(base_a, rows, ok, stride_a, DA, DB, D, LOWP_DOT)
        b2 = _load_cols(base_b, rows, ok, stride_b, DA, DB, D, LOWP_DOT)
    return a, b, a2, b2


@triton.jit
def _load_split(base, rows, ok, stride_t, DA: tl.constexpr, DB: tl.constexpr, D: tl.constexpr,
                LOWP_DOT: tl.constexpr):  # fmt: skip
    """``(x, x2)``: the column blocks of a tile (``x2`` is ``x`` again, unused, when ``DB == 0``)."""
    x = _load_cols(base, rows, ok, stride_t, 0, DA, D, LOWP_DOT)
    x2 = x
    if DB > 0:
        x2 = _load_cols(base, rows, ok, stride_t, DA, DB, D, LOWP_DOT)
    return x, x2


@triton.jit
def _q_program(M_ORDER, rank, HQ, GROUP, N, BLOCK_M: tl.constexpr):
    """Query block and heads of a (query block, q head) program: ``(h, hk, m, offs_m, row_ok)``. Table
    values are clamped into range (scalar work): bad tables give a wrong answer (the ops check values
    where that is cheap), never an access outside the tensors."""
    h = rank % HQ
    m = _clamp(tl.load(M_ORDER + rank // HQ), tl.cdiv(N, BLOCK_M) - 1)
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    return h, h // GROUP, m, offs_m, offs_m < N


@triton.jit
def _csr_range(Q_KV_PTR, m, NNZ):
    """``[start, end)``: the entries of query block ``m`` in a CSR table, clamped to ``[0, NNZ]``."""
    start = _clamp(tl.load(Q_KV_PTR + m), NNZ)
    end = _clamp(tl.load(Q_KV_PTR + m + 1), NNZ)
    return start, end


@triton.jit
def _csr_tile(Q_KV_IDX, Q_KV_FULL, i, N, BLOCK_N: tl.constexpr):
    """Entry ``i`` of a CSR table: ``(n, full, offs_n, col_ok)``, the key block (clamped), whether the
    tile is full, its key columns and which of them lie in the pack."""
    n = _clamp(tl.load(Q_KV_IDX + i), tl.cdiv(N, BLOCK_N) - 1)
    full = tl.load(Q_KV_FULL + i)
    offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
    return n, full, offs_n, offs_n < N


@triton.jit
def _zeros_split(ROWS: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr):
    """fp32 accumulators ``(x, x2)`` of ``ROWS`` rows for the two column blocks (``x2`` is ``x``,
    unused, when ``DB == 0``)."""
    x = tl.zeros([ROWS, DA], dtype=tl.float32)
    x2 = x
    if DB > 0:
        x2 = tl.zeros([ROWS, DB], dtype=tl.float32)
    return x, x2


@triton.jit
def _store_pair(base, rows, ok, stride_t, x, x2, DA: tl.constexpr, DB: tl.constexpr, D: tl.constexpr):
    """Stores ``x`` (columns ``[0, DA)``) and, when ``DB > 0``, ``x2`` (the second column block)."""
    _store_cols(base, rows, ok, stride_t, x, 0, DA, D)
    if DB > 0:
        _store_cols(base, rows, ok, stride_t, x2, DA, DB, D)


@triton.jit
def _dot_t(a, b, a2, b2, DB: tl.constexpr, DOT_PREC: tl.constexpr):
    """``a b^T`` in fp32 over the head dim's column blocks (``a2 b2^T`` added when ``DB > 0``)."""
    s = tl.dot(a, tl.trans(b), input_precision=DOT_PREC)
    if DB > 0:
        s = tl.dot(a2, tl.trans(b2), s, input_precision=DOT_PREC)
    return s


@triton.jit
def _dot_acc(a, b, b2, acc, acc2, DB: tl.constexpr, DOT_PREC: tl.constexpr):
    """``(acc + a b, acc2 + a b2)``: a product accumulated into both column blocks."""
    acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    if DB > 0:
        acc2 = tl.dot(a, b2, acc2, input_precision=DOT_PREC)
    return acc, acc2


@triton.jit
def _lowp(x, dtype, LOWP_DOT: tl.constexpr):
    """``x`` cast to the 16-bit operand type of the next ``tl.dot`` on the GPU (kept fp32 otherwise)."""
    y = x
    if LOWP_DOT:
        y = x.to(dtype)
    return y


@triton.jit
def _kv_bounds(KV_LO, KV_HI, offs_n, col_ok, full, BLOCK_N: tl.constexpr):
    """The visibility intervals of a key block, loaded only for partial tiles (``full == 0``).

    They are loaded ahead of the product, so that their latency hides behind it. Loaded on every tile
    (outside a branch) the pipeliner moves them into shared memory, but the extra dependent loads cost
    K and V a stage: with 3 stages (triton 3.9, sm_90) K/V get 2 buffers instead of 3, and only 5
    stages give 3 back."""
    lo = tl.full([BLOCK_N], _LO_NONE, dtype=tl.int32)
    hi = tl.zeros([BLOCK_N], dtype=tl.int32)
    if full == 0:
        lo = tl.load(KV_LO + offs_n, mask=col_ok, other=_LO_NONE)
        hi = tl.load(KV_HI + offs_n, mask=col_ok, other=0)
    return lo, hi


@triton.jit
def _fwd_init(BLOCK_M: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr):
    """The online softmax's start: ``(m_i, l_i, acc, acc2)``. The running max starts at -inf (a finite
    start would clip rows whose best scaled score lies below it and return 0 for them)."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, acc2 = _zeros_split(BLOCK_M, DA, DB)
    return m_i, l_i, acc, acc2


@triton.jit
def _fwd_softmax_step(s, m_i, l_i, acc, acc2, v, v2, qk_scale, DB: tl.constexpr, LOWP_DOT: tl.constexpr,
                      DOT_PREC: tl.constexpr):  # fmt: skip
    """One tile of the online softmax: ``s`` (masked, unscaled scores) folded into the running max
    ``m_i``, the row sums ``l_i`` and the accumulators ``acc``/``acc2`` (``+= P V``).

    The max is taken over the raw scores times the scale (> 0: the launchers replace scale 0 by
    q = 0), so that scaling and subtracting the max fuse into one FMA per score. ``m_use`` guards the
    rescale of rows that have seen no key yet (max still -inf), so that no -inf - -inf NaN appears."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    p = _lowp(p, v.dtype, LOWP_DOT)
    acc = tl.dot(p, v, acc, input_precision=DOT_PREC)
    if DB > 0:
        acc2 = tl.dot(p, v2, acc2 * alpha[:, None], input_precision=DOT_PREC)
    return m_new, l_i, acc, acc2


@triton.jit
def _fwd_epilogue(Out, LSE, h, offs_m, rows_q, row_ok, N, stride_ot, stride_oh, m_i, l_i, acc, acc2,
                  D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr):  # fmt: skip
    """LSE (log2 domain, +inf for rows that see nothing) and ``out = acc / l`` (0 for those rows)."""
    alive = l_i > 0.0
    inv = tl.where(alive, l_i, 1.0)
    lse = tl.where(alive, m_i + tl.math.log2(tl.where(alive, l_i, 1.0)), float("inf"))
    tl.store(LSE + h.to(tl.int64) * N + offs_m, lse, mask=row_ok)
    o_base = Out + h.to(tl.int64) * stride_oh
    # one column block divided and stored after the other: both quotients live at once cost ~30 registers
    _store_cols(o_base, rows_q, row_ok, stride_ot, acc / inv[:, None], 0, DA, D)
    if DB > 0:
        _store_cols(o_base, rows_q, row_ok, stride_ot, acc2 / inv[:, None], DA, DB, D)


# Kernel and helper parameter lists stay flat (pointers, strides, sizes, constexprs): a Triton kernel
# takes scalars and pointers only, and the helpers are inlined into it. This is the one documented
# exception to the project's "at most ~10 parameters" rule (as are the op schemas of torch.library).
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, LSE,
    KV_LO, KV_HI, ROW_IDX,
    Q_KV_PTR, Q_KV_IDX, Q_KV_FULL, M_ORDER,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    N, NNZ, qk_scale, HQ, GROUP,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROW_IDX: tl.constexpr, LOWP_DOT: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    # strides arrive divided by ALIGN (a power of two dividing all of them): multiplying here tells
    # the compiler so, which is what makes the row loads vectorised and pipelined at strides such as
    # SigLIP's head stride 72, which the runtime does not specialise as divisible by 16
    stride_qt, stride_qh = stride_qt * ALIGN, stride_qh * ALIGN
    stride_kt, stride_kh = stride_kt * ALIGN, stride_kh * ALIGN
    stride_vt, stride_vh = stride_vt * ALIGN, stride_vh * ALIGN
    stride_ot, stride_oh = stride_ot * ALIGN, stride_oh * ALIGN
    h, hk, m, offs_m, row_ok = _q_program(M_ORDER, tl.program_id(0), HQ, GROUP, N, BLOCK_M)
    rows_q = _load_rows(ROW_IDX, offs_m, row_ok, N, HAS_ROW_IDX)
    q_base = Q + h.to(tl.int64) * stride_qh
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_vh
    q, q2 = _load_split(q_base, rows_q, row_ok, stride_qt, DA, DB, D, LOWP_DOT)
    if USE_TMA:
        # K/V tiles by the tensor-memory accelerator (no row index; the launcher checks the 16-byte
        # alignment TMA needs): rows >= N and columns >= D are zero-filled by the hardware
        k_desc = tl.make_tensor_descriptor(k_base, [N, D], [stride_kt, 1], [BLOCK_N, DA])
        v_desc = tl.make_tensor_descriptor(v_base, [N, D], [stride_vt, 1], [BLOCK_N, DA])
        if DB > 0:
            k_desc2 = tl.make_tensor_descriptor(k_base, [N, D], [stride_kt, 1], [BLOCK_N, DB])
            v_desc2 = tl.make_tensor_descriptor(v_base, [N, D], [stride_vt, 1], [BLOCK_N, DB])

    m_i, l_i, acc, acc2 = _fwd_init(BLOCK_M, DA, DB)
    start, end = _csr_range(Q_KV_PTR, m, NNZ)
    for i in range(start, end):
        n, full, offs_n, col_ok = _csr_tile(Q_KV_IDX, Q_KV_FULL, i, N, BLOCK_N)
        lo, hi = _kv_bounds(KV_LO, KV_HI, offs_n, col_ok, full, BLOCK_N)
        if USE_TMA:
            k = k_desc.load([n * BLOCK_N, 0])
            v = v_desc.load([n * BLOCK_N, 0])
            k2, v2 = k, v
            if DB > 0:
                k2 = k_desc2.load([n * BLOCK_N, DA])
                v2 = v_desc2.load([n * BLOCK_N, DA])
            if not LOWP_DOT:
                k, v, k2, v2 = k.to(tl.float32), v.to(tl.float32), k2.to(tl.float32), v2.to(tl.float32)
        else:
            rows_k = _load_rows(ROW_IDX, offs_n, col_ok, N, HAS_ROW_IDX)
            k, v, k2, v2 = _load_pair(
                k_base, v_base, rows_k, col_ok, stride_kt, stride_vt, DA, DB, D, LOWP_DOT
            )
        s = _dot_t(q, k, q2, k2, DB, DOT_PREC)  # [BM, BN], unscaled
        # Only the mask sits in the branch and ONE softmax update follows: two branches that each
        # return their own max and P make triton 3.6's software pipeliner fail (PassManager::run).
        if full == 0:
            vis = (lo[None, :] <= offs_m[:, None]) & (offs_m[:, None] < hi[None, :])
            s = tl.where(vis, s, float("-inf"))
        m_i, l_i, acc, acc2 = _fwd_softmax_step(
            s, m_i, l_i, acc, acc2, v, v2, qk_scale, DB, LOWP_DOT, DOT_PREC
        )

    _fwd_epilogue(
        Out, LSE, h, offs_m, rows_q, row_ok, N, stride_ot, stride_oh, m_i, l_i, acc, acc2, D, DA, DB
    )


@triton.jit
def _attn_bwd_delta_kernel(
    Out, DO, DELTA, ROW_IDX, DQ_ACC,
    stride_ot, stride_oh, stride_dot, stride_doh,
    N,
    D: tl.constexpr, D_PAD: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr, HAS_ROW_IDX: tl.constexpr,
    ZERO_DQ: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O) in fp32; with ``ZERO_DQ`` also zeroes the same rows of the one-pass
    backward's fp32 dQ accumulator (``[HQ, N, D]``, mask order)."""
    stride_ot, stride_oh = stride_ot * ALIGN, stride_oh * ALIGN
    stride_dot, stride_doh = stride_dot * ALIGN, stride_doh * ALIGN
    m = tl.program_id(0)
    h = tl.program_id(1)
    offs = m * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    rows = _load_rows(ROW_IDX, offs, ok, N, HAS_ROW_IDX)
    o = _load_cols(Out + h.to(tl.int64) * stride_oh, rows, ok, stride_ot, 0, D_PAD, D, False)
    do = _load_cols(DO + h.to(tl.int64) * stride_doh, rows, ok, stride_dot, 0, D_PAD, D, False)
    tl.store(DELTA + h.to(tl.int64) * N + offs, tl.sum(o * do, 1), mask=ok)
    if ZERO_DQ:
        zero = tl.zeros([BLOCK, D_PAD], dtype=tl.float32)
        _store_cols(DQ_ACC + h.to(tl.int64) * N * D, offs.to(tl.int64), ok, D, zero, 0, D_PAD, D)


@triton.jit
def _attn_dq_cast_kernel(
    DQ_ACC, DQ, ROW_IDX,
    stride_dqt, stride_dqh,
    N, sm_scale,
    D: tl.constexpr, D_PAD: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr, HAS_ROW_IDX: tl.constexpr,
):  # fmt: skip
    """dq = sm_scale * (the one-pass backward's fp32 accumulator), in dq's dtype, through the row index."""
    stride_dqt, stride_dqh = stride_dqt * ALIGN, stride_dqh * ALIGN
    m = tl.program_id(0)
    h = tl.program_id(1)
    offs = m * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = _load_cols(DQ_ACC + h.to(tl.int64) * N * D, offs.to(tl.int64), ok, D, 0, D_PAD, D, False)
    rows = _load_rows(ROW_IDX, offs, ok, N, HAS_ROW_IDX)
    _store_cols(DQ + h.to(tl.int64) * stride_dqh, rows, ok, stride_dqt, acc * sm_scale, 0, D_PAD, D)


@triton.jit
def _atomic_dq(DQ_ACC, h, offs_m, row_ok, N, ds_c, k, k2, D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
               DOT_PREC: tl.constexpr, DQ_TRANS: tl.constexpr):  # fmt: skip
    """The one-pass backward's fifth product: this key block's share of dQ = dS K, added in fp32 by
    atomics to the accumulator ``DQ_ACC`` ``[HQ, N, D]`` (mask order). ``ds_c`` is dS^T ``[BN, BM]``."""
    acc_base = DQ_ACC + h.to(tl.int64) * N * D
    rows_acc = offs_m.to(tl.int64)
    if DQ_TRANS:
        # as dQ^T = K^T dS^T: dS^T is the B operand and goes through shared memory, so that the
        # product runs on wgmma (sm_90); dS K would take dS^T transposed from registers, which only
        # mma.sync does. On sm_80 (mma.sync anyway) this form spills, hence the switch.
        dq_t = tl.dot(tl.trans(k), ds_c, input_precision=DOT_PREC)  # [DA, BM]
        _atomic_add_rows_t(acc_base, rows_acc, row_ok, D, dq_t, 0, DA, D)
        if DB > 0:
            dq2_t = tl.dot(tl.trans(k2), ds_c, input_precision=DOT_PREC)
            _atomic_add_rows_t(acc_base, rows_acc, row_ok, D, dq2_t, DA, DB, D)
    else:
        ds_q = tl.trans(ds_c)  # [BM, BN]
        dq = tl.dot(ds_q, k, input_precision=DOT_PREC)  # [BM, DA]
        _atomic_add_cols(acc_base, rows_acc, row_ok, D, dq, 0, DA, D)
        if DB > 0:
            dq2 = tl.dot(ds_q, k2, input_precision=DOT_PREC)
            _atomic_add_cols(acc_base, rows_acc, row_ok, D, dq2, DA, DB, D)


@triton.jit
def _attn_bwd_dkdv_program(
    rank, Q, K, V, DO, DK, DV, LSE, DELTA, DQ_ACC,
    KV_LO, KV_HI, ROW_IDX, KV_Q_START, KV_Q_END, KV_MAX_LO, KV_MIN_HI, N_ORDER,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    N, qk_scale, sm_scale, HKV, GROUP,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROW_IDX: tl.constexpr, LOWP_DOT: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    DQ_TRANS: tl.constexpr,
):  # fmt: skip
    """dK and dV of one key block of one KV head; with ``ATOMIC_DQ`` (the one-pass backward) also
    dS K of every tile added to the fp32 dQ accumulator ``DQ_ACC`` ``[HQ, N, D]`` (mask order)."""
    hk = rank % HKV
    n = _clamp(tl.load(N_ORDER + rank // HKV), tl.cdiv(N, BLOCK_N) - 1)
    offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    rows_k = _load_rows(ROW_IDX, offs_n, col_ok, N, HAS_ROW_IDX)
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_vh
    k, v, k2, v2 = _load_pair(k_base, v_base, rows_k, col_ok, stride_kt, stride_vt, DA, DB, D, LOWP_DOT)
    lo = tl.load(KV_LO + offs_n, mask=col_ok, other=_LO_NONE)
    hi = tl.load(KV_HI + offs_n, mask=col_ok, other=0)
    max_lo = tl.load(KV_MAX_LO + n)
    min_hi = tl.load(KV_MIN_HI + n)
    num_mb = tl.cdiv(N, BLOCK_M)
    m_start = _clamp(tl.load(KV_Q_START + n), num_mb)
    num_m = _clamp(tl.load(KV_Q_END + n), num_mb) - m_start

    dk, dk2 = _zeros_split(BLOCK_N, DA, DB)
    dv, dv2 = _zeros_split(BLOCK_N, DA, DB)
    # one flat loop over (q head of the group, query block): a single pipelined loop
    for it in range(0, GROUP * num_m):
        g = it // num_m
        m = m_start + (it - g * num_m)
        h = hk * GROUP + g
        offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        rows_q = _load_rows(ROW_IDX, offs_m, row_ok, N, HAS_ROW_IDX)
        q_base = Q + h.to(tl.int64) * stride_qh
        do_base = DO + h.to(tl.int64) * stride_doh
        q, do, q2, do2 = _load_pair(
            q_base, do_base, rows_q, row_ok, stride_qt, stride_dot, DA, DB, D, LOWP_DOT
        )
        # lse = +inf for rows beyond the pack and rows that see nothing: their P is exactly 0
        lse = tl.load(LSE + h.to(tl.int64) * N + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + h.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
        s_t = _dot_t(k, q, k2, q2, DB, DOT_PREC) * qk_scale  # [BN, BM]
        p_t = tl.math.exp2(s_t - lse[None, :])
        partial = (max_lo > m * BLOCK_M) | (min_hi < tl.minimum((m + 1) * BLOCK_M, N))
        if partial:
            vis = (lo[:, None] <= offs_m[None, :]) & (offs_m[None, :] < hi[:, None])
            p_t = tl.where(vis, p_t, 0.0)
        p_c = _lowp(p_t, DO.dtype.element_ty, LOWP_DOT)
        dv, dv2 = _dot_acc(p_c, do, do2, dv, dv2, DB, DOT_PREC)
        dp_t = _dot_t(v, do, v2, do2, DB, DOT_PREC)  # [BN, BM]
        ds_t = p_t * (dp_t - delta[None, :])
        ds_c = _lowp(ds_t, Q.dtype.element_ty, LOWP_DOT)
        dk, dk2 = _dot_acc(ds_c, q, q2, dk, dk2, DB, DOT_PREC)
        if ATOMIC_DQ:
            _atomic_dq(DQ_ACC, h, offs_m, row_ok, N, ds_c, k, k2, D, DA, DB, DOT_PREC, DQ_TRANS)

    dk_base = DK + hk.to(tl.int64) * stride_dkh
    dv_base = DV + hk.to(tl.int64) * stride_dvh
    _store_pair(dk_base, rows_k, col_ok, stride_dkt, dk * sm_scale, dk2 * sm_scale, DA, DB, D)
    _store_pair(dv_base, rows_k, col_ok, stride_dvt, dv, dv2, DA, DB, D)


@triton.jit
def _attn_bwd_dq_program(
    rank, Q, K, V, DO, DQ, LSE, DELTA,
    KV_LO, KV_HI, ROW_IDX, Q_KV_PTR, Q_KV_IDX, Q_KV_FULL, M_ORDER,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    N, NNZ, qk_scale, sm_scale, HQ, GROUP,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROW_IDX: tl.constexpr, LOWP_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    h, hk, m, offs_m, row_ok = _q_program(M_ORDER, rank, HQ, GROUP, N, BLOCK_M)
    rows_q = _load_rows(ROW_IDX, offs_m, row_ok, N, HAS_ROW_IDX)
    q_base = Q + h.to(tl.int64) * stride_qh
    do_base = DO + h.to(tl.int64) * stride_doh
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_vh
    q, do, q2, do2 = _load_pair(q_base, do_base, rows_q, row_ok, stride_qt, stride_dot, DA, DB, D, LOWP_DOT)
    lse = tl.load(LSE + h.to(tl.int64) * N + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + h.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)

    dq, dq2 = _zeros_split(BLOCK_M, DA, DB)
    start, end = _csr_range(Q_KV_PTR, m, NNZ)
    for i in range(start, end):
        n, full, offs_n, col_ok = _csr_tile(Q_KV_IDX, Q_KV_FULL, i, N, BLOCK_N)
        rows_k = _load_rows(ROW_IDX, offs_n, col_ok, N, HAS_ROW_IDX)
        k, v, k2, v2 = _load_pair(k_base, v_base, rows_k, col_ok, stride_kt, stride_vt, DA, DB, D, LOWP_DOT)
        s = _dot_t(q, k, q2, k2, DB, DOT_PREC) * qk_scale  # [BM, BN]
        p = tl.math.exp2(s - lse[:, None])
        if full == 0:
            lo = tl.load(KV_LO + offs_n, mask=col_ok, other=_LO_NONE)
            hi = tl.load(KV_HI + offs_n, mask=col_ok, other=0)
            vis = (lo[None, :] <= offs_m[:, None]) & (offs_m[:, None] < hi[None, :])
            p = tl.where(vis, p, 0.0)
        dp = _dot_t(do, v, do2, v2, DB, DOT_PREC)  # [BM, BN]
        ds = _lowp(p * (dp - delta[:, None]), K.dtype.element_ty, LOWP_DOT)
        dq, dq2 = _dot_acc(ds, k, k2, dq, dq2, DB, DOT_PREC)

    dq_base = DQ + h.to(tl.int64) * stride_dqh
    _store_pair(dq_base, rows_q, row_ok, stride_dqt, dq * sm_scale, dq2 * sm_scale, DA, DB, D)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA,
    KV_LO, KV_HI, ROW_IDX,
    KV_Q_START, KV_Q_END, KV_MAX_LO, KV_MIN_HI, N_ORDER,
    Q_KV_PTR, Q_KV_IDX, Q_KV_FULL, M_ORDER,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    N, NUM_DKDV, NNZ2, qk_scale, sm_scale, HQ, HKV,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
    HAS_ROW_IDX: tl.constexpr, LOWP_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """The deterministic (two-program) backward: no atomics, bit-identical across runs."""
    # strides arrive divided by ALIGN (see the forward kernel)
    stride_qt, stride_qh = stride_qt * ALIGN, stride_qh * ALIGN
    stride_kt, stride_kh = stride_kt * ALIGN, stride_kh * ALIGN
    stride_vt, stride_vh = stride_vt * ALIGN, stride_vh * ALIGN
    stride_dot, stride_doh = stride_dot * ALIGN, stride_doh * ALIGN
    stride_dqt, stride_dqh = stride_dqt * ALIGN, stride_dqh * ALIGN
    stride_dkt, stride_dkh = stride_dkt * ALIGN, stride_dkh * ALIGN
    stride_dvt, stride_dvh = stride_dvt * ALIGN, stride_dvh * ALIGN
    # programs [0, NUM_DKDV) compute dK/dV, the rest dQ: one launch so the short dQ programs fill
    # the SMs while the long dK/dV programs (a whole GQA group each) finish
    pid = tl.program_id(0)
    if pid < NUM_DKDV:
        _attn_bwd_dkdv_program(
            pid, Q, K, V, DO, DK, DV, LSE, DELTA, DQ,
            KV_LO, KV_HI, ROW_IDX, KV_Q_START, KV_Q_END, KV_MAX_LO, KV_MIN_HI, N_ORDER,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
            stride_dkt, stride_dkh, stride_dvt, stride_dvh,
            N, qk_scale, sm_scale, HKV, HQ // HKV,
            D, DA, DB, BLOCK_M1, BLOCK_N1, HAS_ROW_IDX, LOWP_DOT, DOT_PREC, False, False,
        )  # fmt: skip
    else:
        _attn_bwd_dq_program(
            pid - NUM_DKDV, Q, K, V, DO, DQ, LSE, DELTA,
            KV_LO, KV_HI, ROW_IDX, Q_KV_PTR, Q_KV_IDX, Q_KV_FULL, M_ORDER,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
            stride_dqt, stride_dqh,
            N, NNZ2, qk_scale, sm_scale, HQ, HQ // HKV,
            D, DA, DB, BLOCK_M2, BLOCK_N2, HAS_ROW_IDX, LOWP_DOT, DOT_PREC,
        )  # fmt: skip


@triton.jit
def _attn_bwd_onepass_kernel(
    Q, K, V, DO, DQ_ACC, DK, DV, LSE, DELTA,
    KV_LO, KV_HI, ROW_IDX,
    KV_Q_START, KV_Q_END, KV_MAX_LO, KV_MIN_HI, N_ORDER,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    N, qk_scale, sm_scale, HQ, HKV,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROW_IDX: tl.constexpr, LOWP_DOT: tl.constexpr, DOT_PREC: tl.constexpr, DQ_TRANS: tl.constexpr,
):  # fmt: skip
    """The one-pass backward (``deterministic=False`` when chosen): dK/dV programs only, each also
    adding dS K to the fp32 dQ accumulator with atomics (5 products per tile pair instead of 7).
    The order of the atomic additions varies from run to run, so dQ is not bit-reproducible."""
    A = ALIGN  # strides arrive divided by ALIGN (see the forward kernel)
    _attn_bwd_dkdv_program(
        tl.program_id(0), Q, K, V, DO, DK, DV, LSE, DELTA, DQ_ACC,
        KV_LO, KV_HI, ROW_IDX, KV_Q_START, KV_Q_END, KV_MAX_LO, KV_MIN_HI, N_ORDER,
        stride_qt * A, stride_qh * A, stride_kt * A, stride_kh * A, stride_vt * A, stride_vh * A,
        stride_dot * A, stride_doh * A, stride_dkt * A, stride_dkh * A, stride_dvt * A, stride_dvh * A,
        N, qk_scale, sm_scale, HKV, HQ // HKV,
        D, DA, DB, BLOCK_M, BLOCK_N, HAS_ROW_IDX, LOWP_DOT, DOT_PREC, True, DQ_TRANS,
    )  # fmt: skip


# ================================================================================================ configs
def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(int(d)))


# Interpreter (CPU tests): small tiles keep a few-hundred-token pack fast; forward, dK/dV, dQ and the
# one-pass backward use different shapes on purpose so that a mixed-up block index cannot go unnoticed.
_INTERPRET_CONFIG = AttnConfig()


def default_config(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> AttnConfig:
    """Tile configuration used for ``device``: on a GPU the tuned table's entry for its architecture,
    the installed Triton, ``dtype`` and ``head_dim``, else the built-in default
    (:mod:`bagel_kernels.attention_configs`); on the CPU (interpreter) small test tiles."""
    arch = device_arch(torch.device(device))
    if arch is None:
        return _INTERPRET_CONFIG
    return config_for(arch, dtype, head_dim)


def op_params(config: AttnConfig, onepass: bool) -> tuple[Blocks, Launch]:
    """``(blocks, launch)`` handed to the ops: the dK/dV slots (``block_m1``/``block_n1``,
    ``bwd_warps``/``bwd_stages``) carry the one-pass program's tiles and launch parameters when ``onepass``."""
    blocks, launch = config.blocks(), config.launch()
    if onepass:
        blocks = blocks._replace(block_m1=config.onepass_block_m, block_n1=config.onepass_block_n)
        launch = launch._replace(bwd_warps=config.onepass_warps, bwd_stages=config.onepass_stages)
    return blocks, launch


# ================================================================================================ tables
class FwdTables(NamedTuple):
    """The forward's block tables (``block_m x block_n`` tiles): the CSR list of non-empty key blocks of
    each query block, whether each listed tile is full, and the launch order of the query blocks."""

    q_kv_ptr: torch.Tensor
    q_kv_idx: torch.Tensor
    q_kv_full: torch.Tensor
    m_order: torch.Tensor


class BwdTables(NamedTuple):
    """The backward's block tables: per key block (``block_m1 x block_n1``, or the one-pass tiles) the
    range of query blocks that see it, the bounds deciding fullness and the launch order; then the dQ
    programs' CSR tables (``block_m2 x block_n2``, as in :class:`FwdTables`)."""

    kv_q_start: torch.Tensor
    kv_q_end: torch.Tensor
    kv_max_lo: torch.Tensor
    kv_min_hi: torch.Tensor
    n_order: torch.Tensor
    q_kv_ptr: torch.Tensor
    q_kv_idx: torch.Tensor
    q_kv_full: torch.Tensor
    m_order: torch.Tensor


def _lpt_order(work: torch.Tensor) -> torch.Tensor:
    """Block ids by decreasing work (longest processing time first), int32."""
    return torch.sort(work.long(), descending=True, stable=True).indices.to(torch.int32)


def prepare_mask(
    mask: PackedMask, config: AttnConfig, onepass: bool | None = None
) -> tuple[FwdTables, BwdTables]:
    """The block tables and launch orders the kernels need for ``config`` (cached on the mask).

    Returns ``(fwd_tables, bwd_tables)`` (:class:`FwdTables` at ``block_m x block_n``; :class:`BwdTables`
    at ``block_m1 x block_n1``, or the one-pass tiles, then ``block_m2 x block_n2``). ``onepass`` picks the backward the tables are for (the one-pass program reads only the first five,
    at ``onepass_block_m x onepass_block_n``); None: the one ``config`` selects for
    ``deterministic=False``, with the deterministic backward's tables built too (so that a
    ``torch.compile`` region finds both). Call it (or run one eager step) before ``torch.compile``
    traces a step: building tables has data-dependent shapes, which a ``fullgraph=True`` trace
    cannot contain."""
    if onepass is None:
        if config.onepass:
            prepare_mask(mask, config, False)
        onepass = bool(config.onepass)
    key = ("triton", astuple(config), bool(onepass))
    cache = derived(mask)
    hit = cache.get(key)
    if hit is not None:
        return hit
    if onepass:
        bm1, bn1 = config.onepass_block_m, config.onepass_block_n
    else:
        bm1, bn1 = config.block_m1, config.block_n1
    f = mask.block_tables(config.block_m, config.block_n)
    b1 = mask.block_tables(bm1, bn1)
    b2 = mask.block_tables(config.block_m2, config.block_n2)
    fwd = FwdTables(f.q_kv_ptr, f.q_kv_idx, f.q_kv_full, _lpt_order(f.q_kv_ptr[1:] - f.q_kv_ptr[:-1]))
    bwd = BwdTables(
        kv_q_start=b1.kv_q_start,
        kv_q_end=b1.kv_q_end,
        kv_max_lo=b1.kv_max_lo,
        kv_min_hi=b1.kv_min_hi,
        n_order=_lpt_order(b1.kv_q_end - b1.kv_q_start),
        q_kv_ptr=b2.q_kv_ptr,
        q_kv_idx=b2.q_kv_idx,
        q_kv_full=b2.q_kv_full,
        m_order=_lpt_order(b2.q_kv_ptr[1:] - b2.q_kv_ptr[:-1]),
    )
    cache[key] = (fwd, bwd)
    return fwd, bwd


# ================================================================================================ launchers
class KernelArgs(NamedTuple):
    """What the launchers take besides the tensors they read and write: the mask's interval vectors and
    row index (mask order), the block tables (:class:`FwdTables` or :class:`BwdTables`), the softmax
    scale, the tiles and launch parameters, and the variants (``dsplit``: head-dim split, see
    :func:`dim_split`; ``tma``: the forward's K/V through tensor descriptors where :func:`tma_usable`
    allows; ``onepass``: the one-pass backward)."""

    kv_lo: torch.Tensor
    kv_hi: torch.Tensor
    row_index: torch.Tensor | None
    tables: FwdTables | BwdTables | None
    scale: float
    blocks: Blocks
    launch: Launch
    dsplit: bool = True
    tma: bool = False
    onepass: bool = False


def check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a [N, heads, head_dim] tensor")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; the Triton backend supports fp16, bf16 and fp32")
    N, Hq, D = q.shape
    if k.shape != v.shape or k.shape[0] != N or k.shape[2] != D or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"k/v must be [N, Hkv, D] like q in dtype and N, D: q {tuple(q.shape)} {q.dtype}, "
            f"k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}"
        )
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if not 0 < D <= 256:
        raise ValueError(f"head dim {D} is unsupported by the Triton backend (1..256)")
    if N >= _MAX_TOKENS:
        raise ValueError(f"q has {N} tokens, beyond the int32 token indices of the kernels")


def _check_csr(prefix: str, tables, nm: int, nn: int, dev) -> None:
    """A CSR table set ``(q_kv_ptr, q_kv_idx, q_kv_full, m_order)`` for ``nm`` query and ``nn`` key blocks."""
    ptr, idx, full, order = tables
    check_vector(f"{prefix}q_kv_ptr", ptr, nm + 1, dev)
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"{prefix}q_kv_idx must be a tensor")
    nnz = idx.numel()
    check_vector(f"{prefix}q_kv_idx", idx, nnz, dev)
    check_vector(f"{prefix}q_kv_full", full, nnz, dev)
    check_vector(f"{prefix}m_order", order, nm, dev)
    check_range(f"{prefix}q_kv_ptr", ptr, 0, nnz)
    check_range(f"{prefix}q_kv_idx", idx, 0, nn - 1)
    check_range(f"{prefix}m_order", order, 0, nm - 1)


def _check_fwd_tables(fwd_tables, n: int, blocks: Blocks, dev) -> None:
    if len(fwd_tables) != len(FwdTables._fields):
        raise ValueError(f"fwd_tables must hold 4 tensors {FwdTables._fields}, got {len(fwd_tables)}")
    bm, bn = blocks.block_m, blocks.block_n
    try:
        _check_csr("fwd_tables.", fwd_tables, triton.cdiv(n, bm), triton.cdiv(n, bn), dev)
    except ValueError as exc:
        raise ValueError(f"{exc} (fwd_tables are built for N={n}, block_m={bm}, block_n={bn})") from None


def _check_bwd_tables(bwd_tables, n: int, blocks: Blocks, dev) -> None:
    if len(bwd_tables) != len(BwdTables._fields):
        raise ValueError(f"bwd_tables must hold 9 tensors {BwdTables._fields}, got {len(bwd_tables)}")
    _, _, bm1, bn1, bm2, bn2 = blocks
    nn1, nm1 = triton.cdiv(n, bn1), triton.cdiv(n, bm1)
    names = BwdTables._fields
    try:
        for name, t in zip(names[:5], bwd_tables[:5], strict=True):
            check_vector(f"bwd_tables.{name}", t, nn1, dev)
        for name, t in zip(names[:2], bwd_tables[:2], strict=True):
            check_range(f"bwd_tables.{name}", t, 0, nm1)
        check_range("bwd_tables.n_order", bwd_tables[4], 0, nn1 - 1)
        _check_csr("bwd_tables.", bwd_tables[5:], triton.cdiv(n, bm2), triton.cdiv(n, bn2), dev)
    except ValueError as exc:
        raise ValueError(
            f"{exc} (bwd_tables are built for N={n}, block_m1={bm1}, block_n1={bn1}, "
            f"block_m2={bm2}, block_n2={bn2})"
        ) from None


def check_op_inputs(q, k, v, args: KernelArgs, fwd_tables=None, bwd_tables=None) -> KernelArgs:
    """Everything the registered ops are handed (they are public: ``torch.ops.bagel_kernels.*``):
    shapes, dtypes and devices always; the values of the index vectors and tables when they are on
    the CPU (on a GPU that would cost a device sync; the kernels clamp table values instead, so bad
    ones give a wrong answer but no access outside the tensors). ``args`` carries the op's arguments
    as given (its ``tables`` unused: the tables are checked before they are typed). Returns ``args``
    with its tiles and launch parameters typed (:class:`Blocks`, :class:`Launch`)."""
    check_qkv(q, k, v)
    check_softmax_scale(args.scale)
    check_tiles(args.blocks, args.launch)  # the launchers' rules (the tuned-table loader's too)
    n, dev = q.shape[0], q.device
    check_vector("kv_lo", args.kv_lo, n, dev)
    check_vector("kv_hi", args.kv_hi, n, dev)
    check_vector("row_index", args.row_index, n, dev, optional=True)
    check_range("kv_lo", args.kv_lo, 0, n)
    check_range("kv_hi", args.kv_hi, 0, n)
    row_index = args.row_index
    if row_index is not None and row_index.device.type == "cpu" and n and has_values(row_index):
        counts = torch.bincount(row_index.long().clamp(-1, n) + 1, minlength=n + 2)
        if counts[0] or counts[-1] or (counts[1:-1] != 1).any():
            raise ValueError(f"row_index must be a permutation of range({n})")
    blocks = Blocks(*args.blocks)
    if fwd_tables is not None:
        _check_fwd_tables(fwd_tables, n, blocks, dev)
    if bwd_tables is not None:
        _check_bwd_tables(bwd_tables, n, blocks, dev)
    return args._replace(blocks=blocks, launch=Launch(*args.launch))


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """Unit stride along the head dim (rows/heads may keep any stride, 0 included)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU, not on whichever device is current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _kernel_flags(q: torch.Tensor) -> dict:
    """``meta`` tensors stand for a GPU: the compile check runs the launchers on them (kernels intercepted)."""
    if q.device.type not in ("cuda", "meta") and not interpreting():
        raise ValueError(
            f"the Triton attention kernels need a CUDA device or TRITON_INTERPRET=1 (q is on {q.device})"
        )
    if q.device.type != "meta" and interpreting():
        check_interpreter()
    lowp = q.device.type == "meta" or not interpreting()
    return {"LOWP_DOT": lowp, "DOT_PREC": "ieee" if (q.dtype == torch.float32 or not lowp) else "tf32"}


def stride_align(tensors) -> int:
    """Largest power of two (at most one 16-byte vector) dividing the row and head strides of every
    tensor: the kernels take strides divided by it and multiply it back as a constexpr, so that the
    compiler can vectorise and pipeline the row loads. Exact by construction: never a false hint."""
    align = 16 // tensors[0].element_size()
    for t in tensors:
        for st in t.stride()[:2]:
            while st % align:
                align //= 2
    return align


def _dq_transposed(q) -> bool:
    """The one-pass backward's dQ product as dQ^T = K^T dS^T (wgmma on sm_90+) rather than dS K
    (sm_80, where the transposed form spills); the interpreter runs the sm_90 form."""
    arch = device_arch(q.device)
    return arch is None or arch >= 90


def tma_usable(q, k, v, row_index, align: int) -> bool:
    """K/V can be read through tensor descriptors: no row index, Hopper or newer (or the interpreter),
    and the 16-byte alignment TMA needs (base addresses and the row and head strides)."""
    if row_index is not None or align * k.element_size() != 16:
        return False
    if q.device.type == "cpu":
        return interpreting()
    arch = device_arch(q.device)
    if arch is None or arch < 90:
        return False
    return q.device.type == "meta" or all(t.data_ptr() % 16 == 0 for t in (k, v))


@contextlib.contextmanager
def _tma_allocator(device: torch.device, on: bool):
    """Device-side tensor descriptors need a global scratch buffer from ``triton.set_allocator``:
    supply a torch allocation for the launch unless the user set an allocator of their own."""
    if not on or device.type != "cuda":
        yield
        return
    # private name, justified: Triton has no public way to ask whether the user set an allocator (only
    # triton.set_allocator); one of the repository's few cross-file private names, all third-party
    from triton.runtime import _allocation

    if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        yield
        return
    token = _allocation._allocator.set(
        lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device)
    )
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def launch_fwd(q, k, v, out, lse, args: KernelArgs) -> None:
    """Writes ``out`` [N, Hq, D] and ``lse`` [Hq, N] (fp32, log2 domain) over ``args.tables``
    (:class:`FwdTables`). Scale 0 (uniform weights over the visible keys) runs as q = 0 with scale 1:
    the kernels take the row max of unscaled scores."""
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    if N == 0:
        return
    scale = args.scale
    if scale == 0.0:
        q, scale = torch.zeros_like(q), 1.0
    t, ridx, blocks, launch = args.tables, args.row_index, args.blocks, args.launch
    flags = _kernel_flags(q)
    al = stride_align((q, k, v, out))
    da, db = dim_split(D, args.dsplit)
    use_tma = bool(args.tma) and tma_usable(q, k, v, ridx, stride_align((k, v)))
    grid = (triton.cdiv(N, blocks.block_m) * Hq,)
    with _device_guard(q), _tma_allocator(q.device, use_tma):
        _attn_fwd_kernel[grid](
            q, k, v, out, lse,
            args.kv_lo, args.kv_hi, ridx if ridx is not None else args.kv_lo,
            t.q_kv_ptr, t.q_kv_idx, t.q_kv_full, t.m_order,
            *(st // al for x in (q, k, v, out) for st in x.stride()[:2]),
            N, t.q_kv_idx.numel(), scale * _LOG2E,
            HQ=Hq, GROUP=Hq // Hkv, D=D, DA=da, DB=db, ALIGN=al, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
            HAS_ROW_IDX=ridx is not None, **flags, USE_TMA=use_tma,
            num_warps=launch.fwd_warps, num_stages=launch.fwd_stages,
        )  # fmt: skip


def launch_bwd(do, q, k, v, out, lse, dq, dk, dv, args: KernelArgs) -> None:
    """Writes ``dq``, ``dk``, ``dv`` over ``args.tables`` (:class:`BwdTables`). ``args.onepass``: the
    one-pass backward (dK/dV programs adding dQ into an fp32 accumulator with atomics, then one pass
    scaling and casting it into ``dq``), run over the tables' first five with the tiles
    ``block_m1 x block_n1`` and launch ``bwd_warps``/``bwd_stages``; else the deterministic
    two-program backward."""
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    if N == 0:
        return
    sm_scale = scale = args.scale
    if scale == 0.0:  # as in the forward; sm_scale = 0 makes dq and dk exactly 0
        q, scale = torch.zeros_like(q), 1.0
    flags = _kernel_flags(q)
    D_PAD = _pad_dim(D)
    da, db = dim_split(D, args.dsplit)
    ridx = args.row_index if args.row_index is not None else args.kv_lo
    has_ridx, onepass = args.row_index is not None, bool(args.onepass)
    t, blocks, launch = args.tables, args.blocks, args.launch
    bm1, bn1, bm2, bn2 = blocks.block_m1, blocks.block_n1, blocks.block_m2, blocks.block_n2
    with _device_guard(q):
        delta = torch.empty((Hq, N), dtype=torch.float32, device=q.device)
        # the one-pass backward's dQ accumulator, [Hq, N, D] in mask order, zeroed by the delta kernel
        dq_acc = torch.empty((Hq, N, D), dtype=torch.float32, device=q.device) if onepass else delta
        al = stride_align((out, do))
        _attn_bwd_delta_kernel[(triton.cdiv(N, _ROW_BLOCK), Hq)](
            out, do, delta, ridx, dq_acc,
            *(st // al for x in (out, do) for st in x.stride()[:2]),
            N, D=D, D_PAD=D_PAD, ALIGN=al, BLOCK=_ROW_BLOCK, HAS_ROW_IDX=has_ridx, ZERO_DQ=onepass,
        )  # fmt: skip
        dkdv_tables = (t.kv_q_start, t.kv_q_end, t.kv_max_lo, t.kv_min_hi, t.n_order)
        if onepass:
            al = stride_align((q, k, v, do, dk, dv))
            _attn_bwd_onepass_kernel[(triton.cdiv(N, bn1) * Hkv,)](
                q, k, v, do, dq_acc, dk, dv, lse, delta,
                args.kv_lo, args.kv_hi, ridx, *dkdv_tables,
                *(st // al for x in (q, k, v, do, dk, dv) for st in x.stride()[:2]),
                N, scale * _LOG2E, sm_scale,
                HQ=Hq, HKV=Hkv, D=D, DA=da, DB=db, ALIGN=al, BLOCK_M=bm1, BLOCK_N=bn1,
                HAS_ROW_IDX=has_ridx, **flags, DQ_TRANS=_dq_transposed(q),
                num_warps=launch.bwd_warps, num_stages=launch.bwd_stages,
            )  # fmt: skip
            al = stride_align((dq,))
            _attn_dq_cast_kernel[(triton.cdiv(N, _ROW_BLOCK), Hq)](
                dq_acc, dq, ridx,
                *(st // al for st in dq.stride()[:2]),
                N, sm_scale, D=D, D_PAD=D_PAD, ALIGN=al, BLOCK=_ROW_BLOCK, HAS_ROW_IDX=has_ridx,
            )  # fmt: skip
            return
        num_dkdv = triton.cdiv(N, bn1) * Hkv
        num_dq = triton.cdiv(N, bm2) * Hq
        al = stride_align((q, k, v, do, dq, dk, dv))
        _attn_bwd_kernel[(num_dkdv + num_dq,)](
            q, k, v, do, dq, dk, dv, lse, delta,
            args.kv_lo, args.kv_hi, ridx, *dkdv_tables,
            t.q_kv_ptr, t.q_kv_idx, t.q_kv_full, t.m_order,
            *(st // al for x in (q, k, v, do, dq, dk, dv) for st in x.stride()[:2]),
            N, num_dkdv, t.q_kv_idx.numel(), scale * _LOG2E, sm_scale,
            HQ=Hq, HKV=Hkv, D=D, DA=da, DB=db, ALIGN=al,
            BLOCK_M1=bm1, BLOCK_N1=bn1, BLOCK_M2=bm2, BLOCK_N2=bn2,
            HAS_ROW_IDX=has_ridx, **flags,
            num_warps=launch.bwd_warps, num_stages=launch.bwd_stages,
        )  # fmt: skip


# ================================================================================================ registered ops
# The registered ops, which call the launchers above. The tables travel as tensor lists and the tiles as
# int lists, which is what a torch.library schema takes; inside, they are typed (FwdTables/BwdTables/
# KernelArgs, attention_configs.Blocks/Launch). The schemas' flat argument lists are a documented exception to the
# ~10-parameter rule (as are the Triton kernels' pointer and stride lists).
@torch.library.custom_op("bagel_kernels::packed_attention_fwd", mutates_args=())
def packed_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_lo: torch.Tensor, kv_hi: torch.Tensor, row_index: torch.Tensor | None,
    fwd_tables: list[torch.Tensor], bwd_tables: list[torch.Tensor],
    scale: float, blocks: list[int], launch: list[int],
    dsplit: bool = True, tma: bool = False, onepass: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Returns ``(out [N, Hq, D], lse [Hq, N] fp32)``. ``bwd_tables`` and ``onepass`` are unused
    here; they ride along so that autograd can hand them to the backward op (``onepass``: the
    one-pass backward, ``bwd_tables`` then being built for its tiles, see
    :func:`~bagel_kernels.attention_triton.prepare_mask`). ``dsplit``: head-dim split
    (:func:`~bagel_kernels.attention_configs.dim_split`); ``tma``: K/V through tensor descriptors
    where usable."""
    given = KernelArgs(kv_lo, kv_hi, row_index, None, scale, blocks, launch)
    args = check_op_inputs(q, k, v, given, fwd_tables, bwd_tables)
    args = args._replace(tables=FwdTables(*fwd_tables), dsplit=dsplit, tma=tma)
    N, Hq, D = q.shape
    q, k, v = _row_major(q), _row_major(k), _row_major(v)
    out = torch.empty((N, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((Hq, N), dtype=torch.float32, device=q.device)
    launch_fwd(q, k, v, out, lse, args)
    return out, lse


@packed_attention_fwd.register_fake
def _(q, k, v, kv_lo, kv_hi, row_index, fwd_tables, bwd_tables, scale, blocks, launch, dsplit=True, tma=False,
      onepass=False):  # fmt: skip
    # the op's own checks (values skipped: fakes hold none). The dispatcher runs the fake whenever one
    # argument is on meta; unchecked, it would hand back uninitialised memory for kv_lo on meta.
    check_op_inputs(
        q, k, v, KernelArgs(kv_lo, kv_hi, row_index, None, scale, blocks, launch), fwd_tables, bwd_tables
    )
    N, Hq, D = q.shape
    return q.new_empty((N, Hq, D)), q.new_empty((Hq, N), dtype=torch.float32)


def _check_fwd_results(q: torch.Tensor, grad_out, out, lse) -> None:
    """The backward op's ``grad_out``, ``out`` and ``lse`` against q's shape, dtype and device."""
    N, Hq, _ = q.shape
    for name, t in (("grad_out", grad_out), ("out", out)):
        if not isinstance(t, torch.Tensor) or t.shape != q.shape or t.device != q.device:
            raise ValueError(f"{name} must be shaped and placed like q {tuple(q.shape)} on {q.device}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if out.dtype != q.dtype:
        raise ValueError(f"out has dtype {out.dtype}, q {q.dtype}")
    if (
        not isinstance(lse, torch.Tensor)
        or lse.shape != (Hq, N)
        or lse.dtype != torch.float32
        or lse.device != q.device
    ):
        raise ValueError(f"lse must be a float32 [{Hq}, {N}] tensor on {q.device}")


@torch.library.custom_op("bagel_kernels::packed_attention_bwd", mutates_args=())
def packed_attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    kv_lo: torch.Tensor, kv_hi: torch.Tensor, row_index: torch.Tensor | None, bwd_tables: list[torch.Tensor],
    scale: float, blocks: list[int], launch: list[int], dsplit: bool = True, onepass: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Returns ``(dq, dk, dv)`` shaped like q, k, v. ``onepass``: the one-pass backward (dQ by fp32
    atomics, not bit-reproducible) over the first five ``bwd_tables`` with the tiles ``block_m1 x
    block_n1`` of ``blocks``; else the deterministic two-program backward."""
    given = KernelArgs(kv_lo, kv_hi, row_index, None, scale, blocks, launch)
    args = check_op_inputs(q, k, v, given, bwd_tables=bwd_tables)
    args = args._replace(tables=BwdTables(*bwd_tables), dsplit=dsplit, onepass=onepass)
    _check_fwd_results(q, grad_out, out, lse)
    grad_out = grad_out.to(q.dtype)
    q, k, v, out, grad_out = (_row_major(t) for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    launch_bwd(grad_out, q, k, v, out, lse, dq, dk, dv, args)
    return dq, dk, dv


@packed_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, kv_lo, kv_hi, row_index, bwd_tables, scale, blocks, launch, dsplit=True,
      onepass=False):  # fmt: skip
    check_op_inputs(
        q, k, v, KernelArgs(kv_lo, kv_hi, row_index, None, scale, blocks, launch), bwd_tables=bwd_tables
    )
    _check_fwd_results(q, grad_out, out, lse)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_lo, kv_hi, row_index, _fwd_tables, bwd_tables, scale, blocks, launch, *flags = inputs
    dsplit, _tma, onepass = (list(flags) + [True, False, False][len(flags) :])[:3]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_lo, kv_hi, row_index, *bwd_tables)
    ctx.scale, ctx.blocks, ctx.launch = scale, blocks, launch
    ctx.dsplit, ctx.onepass = dsplit, onepass


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_lo, kv_hi, row_index, *bwd_tables = ctx.saved_tensors
    dq, dk, dv = packed_attention_bwd(
        grad_out, q, k, v, out, lse, kv_lo, kv_hi, row_index, bwd_tables, ctx.scale, ctx.blocks, ctx.launch,
        ctx.dsplit, ctx.onepass,
    )  # fmt: skip
    grads = (dq, dk, dv, None, None, None, [None] * 4, [None] * 9, None, None, None)
    # the dispatcher drops trailing arguments equal to their defaults: one gradient per input it kept
    return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


packed_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: PackedMask,
    scale: float | None = None,
    deterministic: bool = False,
    *,
    config: AttnConfig | None = None,
) -> torch.Tensor:
    """Packed attention with the Triton kernels: ``[N, Hq, D]`` in q's dtype, differentiable in q, k, v.

    q: ``[N, Hq, D]``, k/v: ``[N, Hkv, D]`` with ``N == mask.total_len`` (the dispatcher truncates
    the mask to the tokens present), ``Hq % Hkv == 0``, ``D <= 256``, fp16/bf16/fp32, any strides.
    Rows listed by ``mask.row_index`` are read and written through it. Rows that see no key give
    zeros and zero gradients. ``config`` (an :class:`AttnConfig`) overrides the tile shapes and
    variants (tests, tuning).

    ``deterministic=True`` always runs the two-program backward (no atomics: bit-identical across
    runs). ``deterministic=False`` runs the one-pass backward (dQ accumulated with fp32 atomics)
    where the configuration selects it (``AttnConfig.onepass``: off in the built-in defaults until a
    GPU measurement decides, see :mod:`bagel_kernels.attention_configs`), else the same two-program
    backward.

    This public entry validates its arguments once; :func:`packed_attention` (which validates its own)
    calls :func:`run` directly. The registered op checks again, since it can be called directly."""
    if not isinstance(mask, PackedMask):
        raise ValueError(f"mask must be a PackedMask, got {type(mask).__name__}")
    check_qkv(q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device != mask.device:
            raise ValueError(f"{name} is on {t.device} but the mask is on {mask.device}")
    N, _, D = q.shape
    if N != mask.total_len:
        raise ValueError(f"q has {N} tokens but mask.total_len is {mask.total_len}; truncate the mask first")
    scale = D**-0.5 if scale is None else check_softmax_scale(scale)
    deterministic = as_bool(deterministic, "deterministic")
    if config is not None and not isinstance(config, AttnConfig):
        raise ValueError(f"config must be an AttnConfig (or None), got {type(config).__name__}")
    return run(q, k, v, mask, scale, deterministic, config=config)


def run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: PackedMask,
    scale: float,
    deterministic: bool,
    *,
    config: AttnConfig | None = None,
) -> torch.Tensor:
    """:func:`triton_packed_attention` for arguments its caller has validated (``packed_attention``
    does, once, before it dispatches here): no check of q, k, v, the mask or the scale on this level
    (the registered op still checks what its kernels index memory by)."""
    cfg = config if config is not None else default_config(q.device, q.dtype, q.shape[2])
    onepass = bool(cfg.onepass) and not deterministic
    blocks, launch = op_params(cfg, onepass)
    fwd_tables, bwd_tables = prepare_mask(mask, cfg, onepass)
    out, _lse = packed_attention_fwd(
        q,
        k,
        v,
        *mask.vectors(),  # the mask's own validated tensors (its attributes hand out copies)
        list(fwd_tables),
        list(bwd_tables),
        scale,
        list(blocks),
        list(launch),
        bool(cfg.dsplit),
        bool(cfg.tma),
        onepass,
    )
    return out


# ================================================================================================ compile specs
# BAGEL-7B shapes: the language model (28 query heads, 4 KV heads, head dim 128) on a 16k pack cut to a
# length that is not a multiple of 16 (the model truncates the mask to the pack's real tokens), and the
# SigLIP so400m ViT (16 heads of 72) on 4 images, q/k/v being views into one fused qkv projection output
# [N, 3 * 1152] (row stride 3456, head stride 72): the layouts the model hands the kernels.
_LLM_TOKENS, _VIT_IMAGES = 16381, [1024, 2304, 4900, 729]


def _compile_case(
    dtype, hq, hkv, d, *, row_index=False, fused_qkv=False, vit=False, fwd=True, bwd=True, **variant
):
    """A thunk that runs the forward and/or backward launchers on meta tensors of one model layout,
    with the configuration the launchers pick for the compile target, its variant fields (``onepass``,
    ``dsplit``, ``tma``) replaced by ``variant``."""

    def run():
        from .testing import realistic_pack

        if vit:
            mask = PackedMask.from_splits(_VIT_IMAGES, _VIT_IMAGES, ["full"] * len(_VIT_IMAGES))
        else:
            mask = PackedMask.from_splits(*realistic_pack(16384, seed=0).as_tuple()).truncated(_LLM_TOKENS)
        n = mask.total_len
        meta = torch.device("meta")
        if variant.get("dsplit") == 0:  # the padded layout with its own tiles: the kernels before the split
            base = default_for(device_arch(meta), dtype == torch.float32, d, dsplit=False)
        else:
            base = default_config(meta, dtype, d)
        cfg = dataclasses.replace(base, **variant)
        onepass = bool(cfg.onepass)
        blocks, launch = op_params(cfg, onepass)
        fwd_t, bwd_t = prepare_mask(mask, cfg, onepass)
        fwd_t, bwd_t = FwdTables(*(t.to(meta) for t in fwd_t)), BwdTables(*(t.to(meta) for t in bwd_t))
        ridx = torch.randperm(n).to(torch.int32).to(meta) if row_index else None

        def empty(*shape):
            return torch.empty(shape, dtype=dtype, device=meta)

        if fused_qkv:
            qkv = empty(n, (hq + 2 * hkv) * d)
            q = qkv[:, : hq * d].view(n, hq, d)
            k = qkv[:, hq * d : (hq + hkv) * d].view(n, hkv, d)
            v = qkv[:, (hq + hkv) * d :].view(n, hkv, d)
        else:
            q, k, v = empty(n, hq, d), empty(n, hkv, d), empty(n, hkv, d)
        out, do = empty(n, hq, d), empty(n, hq, d)
        lse = torch.empty((hq, n), dtype=torch.float32, device=meta)
        args = KernelArgs(
            mask.kv_lo.to(meta), mask.kv_hi.to(meta), ridx, fwd_t, d**-0.5, blocks, launch,
            dsplit=bool(cfg.dsplit), tma=bool(cfg.tma), onepass=onepass,
        )  # fmt: skip
        if fwd:
            launch_fwd(q, k, v, out, lse, args)
        if bwd:
            grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
            launch_bwd(do, q, k, v, out, lse, *grads, args._replace(tables=bwd_t))

    return run


def compile_cases(arch: int) -> list[tuple]:
    """``(tag, thunk, extra_options)`` per model layout compiled for ``arch`` (see
    :func:`bagel_kernels.compile_check.specs_from_launches`). The 16-bit forward and both backwards
    must use tensor cores in their loops (``expect_mma``); fp32 runs exact ``ieee`` dots on CUDA cores.

    Tags: ``<dtype>_d<head dim>`` with ``_ridx`` (MoT row index), ``_1p`` (the one-pass backward:
    delta + zeroing, the one-pass program, the dQ cast), ``_pad`` (head dim 72 padded to 128 as before
    the split: what ``dsplit=0`` runs) and ``_tma`` (the forward's K/V through tensor descriptors)."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    mma = {k: {"expect_mma": True} for k in ("attn_fwd", "attn_bwd", "attn_bwd_onepass")}
    vit = dict(fused_qkv=True, vit=True)
    onepass = dict(fwd=False, onepass=1)
    cases = [
        ("bf16_d128", _compile_case(bf16, 28, 4, 128), mma),  # Qwen2 7B
        ("bf16_d128_ridx", _compile_case(bf16, 28, 4, 128, row_index=True), mma),  # + MoT row permutation
        ("bf16_d72", _compile_case(bf16, 16, 16, 72, **vit), mma),  # SigLIP so400m
        ("fp32_d128", _compile_case(fp32, 28, 4, 128), {}),
        ("bf16_d128_1p", _compile_case(bf16, 28, 4, 128, **onepass), mma),
        ("bf16_d128_ridx_1p", _compile_case(bf16, 28, 4, 128, row_index=True, **onepass), mma),
        ("bf16_d72_1p", _compile_case(bf16, 16, 16, 72, **vit, **onepass), mma),
        ("fp32_d128_1p", _compile_case(fp32, 28, 4, 128, **onepass), {}),
        ("bf16_d72_pad", _compile_case(bf16, 16, 16, 72, **vit, dsplit=0), mma),
    ]
    if arch >= 90:  # other head dims and dtypes the API accepts, and TMA, on one architecture
        cases += [
            ("fp16_d64_ridx", _compile_case(fp16, 8, 2, 64, row_index=True), mma),
            ("bf16_d256", _compile_case(bf16, 8, 1, 256), mma),
            ("fp32_d64", _compile_case(fp32, 8, 2, 64), {}),
            ("fp16_d64_ridx_1p", _compile_case(fp16, 8, 2, 64, row_index=True, **onepass), mma),
            ("bf16_d256_1p", _compile_case(bf16, 8, 1, 256, **onepass), mma),
            ("bf16_d128_tma", _compile_case(bf16, 28, 4, 128, bwd=False, tma=1), mma),
            ("bf16_d72_tma", _compile_case(bf16, 16, 16, 72, **vit, bwd=False, tma=1), mma),
        ]
    return cases


def compile_specs(arch: int) -> list[tuple]:
    """Specs of every kernel launch of :func:`compile_cases` for ``arch`` (format of
    :mod:`bagel_kernels.compile_check`), derived from the launchers as they run on that GPU."""
    from .compile_check import specs_from_launches

    return specs_from_launches(compile_cases(arch), arch)

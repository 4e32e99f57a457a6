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

Registered ops: ``bagel_kernels::packed_attention_fwd`` and ``bagel_kernels::packed_attention_bwd``
(``torch.library.custom_op`` + ``register_fake`` + ``register_autograd``); the tables travel as tensor
arguments, so ``torch.compile(fullgraph=True)`` traces through ``triton_packed_attention`` once the
mask's tables exist (:func:`prepare_mask` builds them ahead, outside the compiled region).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import astuple

import torch
import triton
import triton.language as tl

from .attention_configs import AttnConfig, check_interpreter, config_for, default_for, device_arch, dim_split
from .mask import PackedMask

__all__ = [
    "AttnConfig",
    "default_config",
    "prepare_mask",
    "triton_packed_attention",
    "dim_split",
    "compile_cases",
    "compile_specs",
    "sm90_compile_specs",
]

_LOG2E = 1.4426950408889634
_INT32_MAX = 2**31 - 1
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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
    pid = tl.program_id(0)
    h = pid % HQ
    # table values are clamped into range (scalar work): bad tables give a wrong answer (the ops
    # check values where that is cheap), never an access outside the tensors
    m = _clamp(tl.load(M_ORDER + pid // HQ), tl.cdiv(N, BLOCK_M) - 1)
    hk = h // GROUP

    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    rows_q = _load_rows(ROW_IDX, offs_m, row_ok, N, HAS_ROW_IDX)
    q_base = Q + h.to(tl.int64) * stride_qh
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_vh
    q = _load_cols(q_base, rows_q, row_ok, stride_qt, 0, DA, D, LOWP_DOT)
    if DB > 0:
        q2 = _load_cols(q_base, rows_q, row_ok, stride_qt, DA, DB, D, LOWP_DOT)
    if USE_TMA:
        # K/V tiles by the tensor-memory accelerator (no row index; the launcher checks the 16-byte
        # alignment TMA needs): rows >= N and columns >= D are zero-filled by the hardware
        k_desc = tl.make_tensor_descriptor(k_base, [N, D], [stride_kt, 1], [BLOCK_N, DA])
        v_desc = tl.make_tensor_descriptor(v_base, [N, D], [stride_vt, 1], [BLOCK_N, DA])
        if DB > 0:
            k_desc2 = tl.make_tensor_descriptor(k_base, [N, D], [stride_kt, 1], [BLOCK_N, DB])
            v_desc2 = tl.make_tensor_descriptor(v_base, [N, D], [stride_vt, 1], [BLOCK_N, DB])

    # The running max starts at -inf (a finite start would clip rows whose best scaled score lies
    # below it and return 0 for them); ``m_use`` guards the rescale of rows that have seen no key yet
    # (max still -inf), so that no -inf - -inf NaN appears.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    if DB > 0:
        acc2 = tl.zeros([BLOCK_M, DB], dtype=tl.float32)

    start = _clamp(tl.load(Q_KV_PTR + m), NNZ)
    end = _clamp(tl.load(Q_KV_PTR + m + 1), NNZ)
    for i in range(start, end):
        n = _clamp(tl.load(Q_KV_IDX + i), tl.cdiv(N, BLOCK_N) - 1)
        full = tl.load(Q_KV_FULL + i)
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        # The partial-tile bounds are loaded ahead of the product, so that their latency hides behind
        # it, and only for partial tiles. Loaded on every tile (outside a branch) the pipeliner moves
        # them into shared memory, but the extra dependent loads cost K and V a stage: with 3 stages
        # (triton 3.9, sm_90) K/V get 2 buffers instead of 3, and only 5 stages give 3 back.
        lo = tl.full([BLOCK_N], 2147483647, dtype=tl.int32)
        hi = tl.zeros([BLOCK_N], dtype=tl.int32)
        if full == 0:
            lo = tl.load(KV_LO + offs_n, mask=col_ok, other=2147483647)
            hi = tl.load(KV_HI + offs_n, mask=col_ok, other=0)
        if USE_TMA:
            k = k_desc.load([n * BLOCK_N, 0])
            v = v_desc.load([n * BLOCK_N, 0])
            if DB > 0:
                k2 = k_desc2.load([n * BLOCK_N, DA])
                v2 = v_desc2.load([n * BLOCK_N, DA])
            if not LOWP_DOT:
                k, v = k.to(tl.float32), v.to(tl.float32)
                if DB > 0:
                    k2, v2 = k2.to(tl.float32), v2.to(tl.float32)
        else:
            rows_k = _load_rows(ROW_IDX, offs_n, col_ok, N, HAS_ROW_IDX)
            k = _load_cols(k_base, rows_k, col_ok, stride_kt, 0, DA, D, LOWP_DOT)
            v = _load_cols(v_base, rows_k, col_ok, stride_vt, 0, DA, D, LOWP_DOT)
            if DB > 0:
                k2 = _load_cols(k_base, rows_k, col_ok, stride_kt, DA, DB, D, LOWP_DOT)
                v2 = _load_cols(v_base, rows_k, col_ok, stride_vt, DA, DB, D, LOWP_DOT)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BM, BN], unscaled
        if DB > 0:
            s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
        # Only the mask sits in the branch and ONE softmax update follows: two branches that each
        # return their own max and P make triton 3.6's software pipeliner fail (PassManager::run).
        if full == 0:
            vis = (lo[None, :] <= offs_m[:, None]) & (offs_m[:, None] < hi[None, :])
            s = tl.where(vis, s, float("-inf"))
        # max of the raw scores times the scale (> 0: the launchers replace scale 0 by q = 0), so
        # that scaling and subtracting the max fuse into one FMA per score
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if LOWP_DOT:
            p = p.to(V.dtype.element_ty)
        acc = tl.dot(p, v, acc, input_precision=DOT_PREC)
        if DB > 0:
            acc2 = tl.dot(p, v2, acc2 * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    alive = l_i > 0.0
    inv = tl.where(alive, l_i, 1.0)
    lse = tl.where(alive, m_i + tl.math.log2(tl.where(alive, l_i, 1.0)), float("inf"))
    tl.store(LSE + h.to(tl.int64) * N + offs_m, lse, mask=row_ok)
    o_base = Out + h.to(tl.int64) * stride_oh
    _store_cols(o_base, rows_q, row_ok, stride_ot, acc / inv[:, None], 0, DA, D)
    if DB > 0:
        _store_cols(o_base, rows_q, row_ok, stride_ot, acc2 / inv[:, None], DA, DB, D)


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
    k = _load_cols(k_base, rows_k, col_ok, stride_kt, 0, DA, D, LOWP_DOT)
    v = _load_cols(v_base, rows_k, col_ok, stride_vt, 0, DA, D, LOWP_DOT)
    if DB > 0:
        k2 = _load_cols(k_base, rows_k, col_ok, stride_kt, DA, DB, D, LOWP_DOT)
        v2 = _load_cols(v_base, rows_k, col_ok, stride_vt, DA, DB, D, LOWP_DOT)
    lo = tl.load(KV_LO + offs_n, mask=col_ok, other=2147483647)
    hi = tl.load(KV_HI + offs_n, mask=col_ok, other=0)
    max_lo = tl.load(KV_MAX_LO + n)
    min_hi = tl.load(KV_MIN_HI + n)
    num_mb = tl.cdiv(N, BLOCK_M)
    m_start = _clamp(tl.load(KV_Q_START + n), num_mb)
    num_m = _clamp(tl.load(KV_Q_END + n), num_mb) - m_start

    dk = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
    if DB > 0:
        dk2 = tl.zeros([BLOCK_N, DB], dtype=tl.float32)
        dv2 = tl.zeros([BLOCK_N, DB], dtype=tl.float32)
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
        q = _load_cols(q_base, rows_q, row_ok, stride_qt, 0, DA, D, LOWP_DOT)
        do = _load_cols(do_base, rows_q, row_ok, stride_dot, 0, DA, D, LOWP_DOT)
        if DB > 0:
            q2 = _load_cols(q_base, rows_q, row_ok, stride_qt, DA, DB, D, LOWP_DOT)
            do2 = _load_cols(do_base, rows_q, row_ok, stride_dot, DA, DB, D, LOWP_DOT)
        # lse = +inf for rows beyond the pack and rows that see nothing: their P is exactly 0
        lse = tl.load(LSE + h.to(tl.int64) * N + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + h.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
        if DB > 0:
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
            s_t = tl.dot(k2, tl.trans(q2), s_t, input_precision=DOT_PREC) * qk_scale  # [BN, BM]
        else:
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BN, BM]
        p_t = tl.math.exp2(s_t - lse[None, :])
        partial = (max_lo > m * BLOCK_M) | (min_hi < tl.minimum((m + 1) * BLOCK_M, N))
        if partial:
            vis = (lo[:, None] <= offs_m[None, :]) & (offs_m[None, :] < hi[:, None])
            p_t = tl.where(vis, p_t, 0.0)
        if LOWP_DOT:
            p_c = p_t.to(DO.dtype.element_ty)
        else:
            p_c = p_t
        dv = tl.dot(p_c, do, dv, input_precision=DOT_PREC)
        if DB > 0:
            dv2 = tl.dot(p_c, do2, dv2, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [BN, BM]
        if DB > 0:
            dp_t = tl.dot(v2, tl.trans(do2), dp_t, input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        if LOWP_DOT:
            ds_c = ds_t.to(Q.dtype.element_ty)
        else:
            ds_c = ds_t
        dk = tl.dot(ds_c, q, dk, input_precision=DOT_PREC)
        if DB > 0:
            dk2 = tl.dot(ds_c, q2, dk2, input_precision=DOT_PREC)
        if ATOMIC_DQ:
            # the fifth product: this key block's share of dQ = dS K, added in fp32 by atomics
            acc_base = DQ_ACC + h.to(tl.int64) * N * D
            rows_acc = offs_m.to(tl.int64)
            if DQ_TRANS:
                # as dQ^T = K^T dS^T: dS^T is the B operand and goes through shared memory, so that
                # the product runs on wgmma (sm_90); dS K would take dS^T transposed from registers,
                # which only mma.sync does. On sm_80 (mma.sync anyway) this form spills, hence the switch.
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

    dk_base = DK + hk.to(tl.int64) * stride_dkh
    dv_base = DV + hk.to(tl.int64) * stride_dvh
    _store_cols(dk_base, rows_k, col_ok, stride_dkt, dk * sm_scale, 0, DA, D)
    _store_cols(dv_base, rows_k, col_ok, stride_dvt, dv, 0, DA, D)
    if DB > 0:
        _store_cols(dk_base, rows_k, col_ok, stride_dkt, dk2 * sm_scale, DA, DB, D)
        _store_cols(dv_base, rows_k, col_ok, stride_dvt, dv2, DA, DB, D)


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
    h = rank % HQ
    m = _clamp(tl.load(M_ORDER + rank // HQ), tl.cdiv(N, BLOCK_M) - 1)
    hk = h // GROUP
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    rows_q = _load_rows(ROW_IDX, offs_m, row_ok, N, HAS_ROW_IDX)
    q_base = Q + h.to(tl.int64) * stride_qh
    do_base = DO + h.to(tl.int64) * stride_doh
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_vh
    q = _load_cols(q_base, rows_q, row_ok, stride_qt, 0, DA, D, LOWP_DOT)
    do = _load_cols(do_base, rows_q, row_ok, stride_dot, 0, DA, D, LOWP_DOT)
    if DB > 0:
        q2 = _load_cols(q_base, rows_q, row_ok, stride_qt, DA, DB, D, LOWP_DOT)
        do2 = _load_cols(do_base, rows_q, row_ok, stride_dot, DA, DB, D, LOWP_DOT)
    lse = tl.load(LSE + h.to(tl.int64) * N + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + h.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    if DB > 0:
        dq2 = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    start = _clamp(tl.load(Q_KV_PTR + m), NNZ)
    end = _clamp(tl.load(Q_KV_PTR + m + 1), NNZ)
    for i in range(start, end):
        n = _clamp(tl.load(Q_KV_IDX + i), tl.cdiv(N, BLOCK_N) - 1)
        full = tl.load(Q_KV_FULL + i)
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        rows_k = _load_rows(ROW_IDX, offs_n, col_ok, N, HAS_ROW_IDX)
        k = _load_cols(k_base, rows_k, col_ok, stride_kt, 0, DA, D, LOWP_DOT)
        v = _load_cols(v_base, rows_k, col_ok, stride_vt, 0, DA, D, LOWP_DOT)
        if DB > 0:
            k2 = _load_cols(k_base, rows_k, col_ok, stride_kt, DA, DB, D, LOWP_DOT)
            v2 = _load_cols(v_base, rows_k, col_ok, stride_vt, DA, DB, D, LOWP_DOT)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC) * qk_scale  # [BM, BN]
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BM, BN]
        p = tl.math.exp2(s - lse[:, None])
        if full == 0:
            lo = tl.load(KV_LO + offs_n, mask=col_ok, other=2147483647)
            hi = tl.load(KV_HI + offs_n, mask=col_ok, other=0)
            vis = (lo[None, :] <= offs_m[:, None]) & (offs_m[:, None] < hi[None, :])
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # [BM, BN]
        if DB > 0:
            dp = tl.dot(do2, tl.trans(v2), dp, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if LOWP_DOT:
            ds = ds.to(K.dtype.element_ty)
        dq = tl.dot(ds, k, dq, input_precision=DOT_PREC)
        if DB > 0:
            dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PREC)

    dq_base = DQ + h.to(tl.int64) * stride_dqh
    _store_cols(dq_base, rows_q, row_ok, stride_dqt, dq * sm_scale, 0, DA, D)
    if DB > 0:
        _store_cols(dq_base, rows_q, row_ok, stride_dqt, dq2 * sm_scale, DA, DB, D)


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
    stride_qt, stride_qh = stride_qt * ALIGN, stride_qh * ALIGN
    stride_kt, stride_kh = stride_kt * ALIGN, stride_kh * ALIGN
    stride_vt, stride_vh = stride_vt * ALIGN, stride_vh * ALIGN
    stride_dot, stride_doh = stride_dot * ALIGN, stride_doh * ALIGN
    stride_dkt, stride_dkh = stride_dkt * ALIGN, stride_dkh * ALIGN
    stride_dvt, stride_dvh = stride_dvt * ALIGN, stride_dvh * ALIGN
    _attn_bwd_dkdv_program(
        tl.program_id(0), Q, K, V, DO, DK, DV, LSE, DELTA, DQ_ACC,
        KV_LO, KV_HI, ROW_IDX, KV_Q_START, KV_Q_END, KV_MAX_LO, KV_MIN_HI, N_ORDER,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh,
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


def _op_params(config: AttnConfig, onepass: bool) -> tuple[list[int], list[int]]:
    """``(blocks, launch)`` handed to the ops: the dK/dV slots (``blocks[2:4]``, ``launch[2:4]``) carry
    the one-pass program's tiles and launch parameters when ``onepass``."""
    blocks, launch = config.blocks(), config.launch()
    if onepass:
        blocks[2:4] = [config.onepass_block_m, config.onepass_block_n]
        launch[2:4] = [config.onepass_warps, config.onepass_stages]
    return blocks, launch


# ================================================================================================ tables
def _lpt_order(work: torch.Tensor) -> torch.Tensor:
    """Block ids by decreasing work (longest processing time first), int32."""
    return torch.sort(work.long(), descending=True, stable=True).indices.to(torch.int32)


def prepare_mask(
    mask: PackedMask, config: AttnConfig, onepass: bool | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The block tables and launch orders the kernels need for ``config`` (cached on the mask).

    Returns ``(fwd_tables, bwd_tables)``:
        fwd_tables = [q_kv_ptr, q_kv_idx, q_kv_full, m_order]                    (block_m x block_n)
        bwd_tables = [kv_q_start, kv_q_end, kv_max_lo, kv_min_hi, n_order,       (block_m1 x block_n1, or
                                                                                  the one-pass tiles)
                      q_kv_ptr, q_kv_idx, q_kv_full, m_order]                    (block_m2 x block_n2)
    ``onepass`` picks the backward the tables are for (the one-pass program reads only the first five,
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
    hit = mask._cache.get(key)
    if hit is not None:
        return hit
    if onepass:
        bm1, bn1 = config.onepass_block_m, config.onepass_block_n
    else:
        bm1, bn1 = config.block_m1, config.block_n1
    f = mask.block_tables(config.block_m, config.block_n)
    b1 = mask.block_tables(bm1, bn1)
    b2 = mask.block_tables(config.block_m2, config.block_n2)
    fwd = [f.q_kv_ptr, f.q_kv_idx, f.q_kv_full, _lpt_order(f.q_kv_ptr[1:] - f.q_kv_ptr[:-1])]
    bwd = [
        b1.kv_q_start,
        b1.kv_q_end,
        b1.kv_max_lo,
        b1.kv_min_hi,
        _lpt_order(b1.kv_q_end - b1.kv_q_start),
        b2.q_kv_ptr,
        b2.q_kv_idx,
        b2.q_kv_full,
        _lpt_order(b2.q_kv_ptr[1:] - b2.q_kv_ptr[:-1]),
    ]
    mask._cache[key] = (fwd, bwd)
    return fwd, bwd


# ================================================================================================ launchers
_FWD_TABLES = ("q_kv_ptr", "q_kv_idx", "q_kv_full", "m_order")
_BWD_TABLES = (
    "kv_q_start", "kv_q_end", "kv_max_lo", "kv_min_hi", "n_order", "q_kv_ptr", "q_kv_idx", "q_kv_full", "m_order",
)  # fmt: skip


def _check_blocks(blocks, launch) -> None:
    if not isinstance(blocks, (list, tuple)) or len(blocks) != 6:
        raise ValueError(
            f"blocks must be 6 tile sizes (block_m, block_n, block_m1, block_n1, block_m2, block_n2), got {blocks!r}"
        )
    for name, b in zip(
        ("block_m", "block_n", "block_m1", "block_n1", "block_m2", "block_n2"), blocks, strict=True
    ):
        if not isinstance(b, int) or b < 16 or b > 256 or b & (b - 1):
            raise ValueError(f"{name}={b} must be a power of two between 16 and 256")
    if not isinstance(launch, (list, tuple)) or len(launch) != 4:
        raise ValueError(f"launch must be [fwd_warps, fwd_stages, bwd_warps, bwd_stages], got {launch!r}")
    for name, w in (("fwd_warps", launch[0]), ("bwd_warps", launch[2])):
        if w not in (1, 2, 4, 8, 16):
            raise ValueError(f"{name}={w} must be 1, 2, 4, 8 or 16")
    for name, st in (("fwd_stages", launch[1]), ("bwd_stages", launch[3])):
        if not isinstance(st, int) or not 1 <= st <= 8:
            raise ValueError(f"{name}={st} must be an int in [1, 8]")


def _check_vector(name: str, t, n: int, device, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int32:
        got = (
            f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        )
        raise ValueError(f"{name} must be a 1-D int32 tensor, got {got}")
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries, expected {n}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, q on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_range(name: str, t: torch.Tensor, lo: int, hi: int) -> None:
    """Values in [lo, hi] (only for CPU tensors: checking CUDA values would cost a device sync;
    the kernels clamp what they read from tables instead)."""
    if t.device.type == "cpu" and t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise ValueError(f"{name} holds values outside [{lo}, {hi}]: min {int(t.min())}, max {int(t.max())}")


def _check_qkv(q, k, v) -> None:
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
    if N >= _INT32_MAX // 2:
        raise ValueError(f"q has {N} tokens, beyond the int32 token indices of the kernels")


def _check_scale(scale) -> None:
    if not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale >= 0.0):
        raise ValueError(f"softmax_scale must be finite and non-negative for the Triton backend, got {scale}")


def _check_op_inputs(
    q, k, v, kv_lo, kv_hi, row_index, scale, blocks, launch, fwd_tables=None, bwd_tables=None
):
    """Everything the registered ops are handed (they are public: ``torch.ops.bagel_kernels.*``):
    shapes, dtypes and devices always; the values of the index vectors and tables when they are on
    the CPU (on a GPU that would cost a device sync; the kernels clamp table values instead, so bad
    ones give a wrong answer but no access outside the tensors)."""
    _check_qkv(q, k, v)
    _check_scale(scale)
    _check_blocks(blocks, launch)
    n, dev = q.shape[0], q.device
    _check_vector("kv_lo", kv_lo, n, dev)
    _check_vector("kv_hi", kv_hi, n, dev)
    _check_vector("row_index", row_index, n, dev, optional=True)
    _check_range("kv_lo", kv_lo, 0, n)
    _check_range("kv_hi", kv_hi, 0, n)
    if row_index is not None and row_index.device.type == "cpu" and n:
        counts = torch.bincount(row_index.long().clamp(-1, n) + 1, minlength=n + 2)
        if counts[0] or counts[-1] or (counts[1:-1] != 1).any():
            raise ValueError(f"row_index must be a permutation of range({n})")
    bm, bn, bm1, bn1, bm2, bn2 = blocks

    def csr(prefix, tables, nm, nn):
        ptr, idx, full, order = tables
        _check_vector(f"{prefix}q_kv_ptr", ptr, nm + 1, dev)
        if not isinstance(idx, torch.Tensor):
            raise ValueError(f"{prefix}q_kv_idx must be a tensor")
        nnz = idx.numel()
        _check_vector(f"{prefix}q_kv_idx", idx, nnz, dev)
        _check_vector(f"{prefix}q_kv_full", full, nnz, dev)
        _check_vector(f"{prefix}m_order", order, nm, dev)
        _check_range(f"{prefix}q_kv_ptr", ptr, 0, nnz)
        _check_range(f"{prefix}q_kv_idx", idx, 0, nn - 1)
        _check_range(f"{prefix}m_order", order, 0, nm - 1)

    if fwd_tables is not None:
        if len(fwd_tables) != 4:
            raise ValueError(f"fwd_tables must hold 4 tensors {_FWD_TABLES}, got {len(fwd_tables)}")
        try:
            csr("fwd_tables.", fwd_tables, triton.cdiv(n, bm), triton.cdiv(n, bn))
        except ValueError as exc:
            raise ValueError(f"{exc} (fwd_tables are built for N={n}, block_m={bm}, block_n={bn})") from None
    if bwd_tables is not None:
        if len(bwd_tables) != 9:
            raise ValueError(f"bwd_tables must hold 9 tensors {_BWD_TABLES}, got {len(bwd_tables)}")
        nn1, nm1 = triton.cdiv(n, bn1), triton.cdiv(n, bm1)
        try:
            for name, t in zip(_BWD_TABLES[:5], bwd_tables[:5], strict=True):
                _check_vector(f"bwd_tables.{name}", t, nn1, dev)
            for name, t in zip(_BWD_TABLES[:2], bwd_tables[:2], strict=True):
                _check_range(f"bwd_tables.{name}", t, 0, nm1)
            _check_range("bwd_tables.n_order", bwd_tables[4], 0, nn1 - 1)
            csr("bwd_tables.", bwd_tables[5:], triton.cdiv(n, bm2), triton.cdiv(n, bn2))
        except ValueError as exc:
            raise ValueError(
                f"{exc} (bwd_tables are built for N={n}, block_m1={bm1}, block_n1={bn1}, "
                f"block_m2={bm2}, block_n2={bn2})"
            ) from None


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """Unit stride along the head dim (rows/heads may keep any stride, 0 included)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU, not on whichever device is current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _kernel_flags(q: torch.Tensor) -> dict:
    """``meta`` tensors stand for a GPU: the compile check runs the launchers on them (kernels intercepted)."""
    if q.device.type not in ("cuda", "meta") and not _interpreting():
        raise ValueError(
            f"the Triton attention kernels need a CUDA device or TRITON_INTERPRET=1 (q is on {q.device})"
        )
    if q.device.type != "meta" and _interpreting():
        check_interpreter()
    lowp = q.device.type == "meta" or not _interpreting()
    return {"LOWP_DOT": lowp, "DOT_PREC": "ieee" if (q.dtype == torch.float32 or not lowp) else "tf32"}


def _stride_align(tensors) -> int:
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


def _tma_usable(q, k, v, row_index, align: int) -> bool:
    """K/V can be read through tensor descriptors: no row index, Hopper or newer (or the interpreter),
    and the 16-byte alignment TMA needs (base addresses and the row and head strides)."""
    if row_index is not None or align * k.element_size() != 16:
        return False
    if q.device.type == "cpu":
        return _interpreting()
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


def _launch_fwd(
    q, k, v, kv_lo, kv_hi, row_index, fwd_tables, scale, blocks, launch, out, lse, *, dsplit=True, tma=False
) -> None:
    """Writes ``out`` [N, Hq, D] and ``lse`` [Hq, N] (fp32, log2 domain). Scale 0 (uniform weights
    over the visible keys) runs as q = 0 with scale 1: the kernels take the row max of unscaled scores.
    ``dsplit``: cut a non-power-of-two head dim into two column blocks (:func:`dim_split`); ``tma``:
    read K/V through tensor descriptors where :func:`_tma_usable` allows."""
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    if N == 0:
        return
    if scale == 0.0:
        q, scale = torch.zeros_like(q), 1.0
    q_kv_ptr, q_kv_idx, q_kv_full, m_order = fwd_tables
    bm, bn = blocks[0], blocks[1]
    flags = _kernel_flags(q)
    al = _stride_align((q, k, v, out))
    da, db = dim_split(D, dsplit)
    use_tma = bool(tma) and _tma_usable(q, k, v, row_index, _stride_align((k, v)))
    grid = (triton.cdiv(N, bm) * Hq,)
    with _device_guard(q), _tma_allocator(q.device, use_tma):
        _attn_fwd_kernel[grid](
            q, k, v, out, lse,
            kv_lo, kv_hi, row_index if row_index is not None else kv_lo,
            q_kv_ptr, q_kv_idx, q_kv_full, m_order,
            *(st // al for t in (q, k, v, out) for st in t.stride()[:2]),
            N, q_kv_idx.numel(), scale * _LOG2E,
            HQ=Hq, GROUP=Hq // Hkv, D=D, DA=da, DB=db, ALIGN=al, BLOCK_M=bm, BLOCK_N=bn,
            HAS_ROW_IDX=row_index is not None, **flags, USE_TMA=use_tma,
            num_warps=launch[0], num_stages=launch[1],
        )  # fmt: skip


def _launch_bwd(
    do, q, k, v, out, lse, kv_lo, kv_hi, row_index, bwd_tables, scale, blocks, launch, dq, dk, dv,
    *, dsplit=True, onepass=False,
) -> None:  # fmt: skip
    """Writes ``dq``, ``dk``, ``dv``. ``onepass``: the one-pass backward (dK/dV programs adding dQ
    into an fp32 accumulator with atomics, then one pass scaling and casting it into ``dq``), run
    over ``bwd_tables[:5]`` with the tiles ``blocks[2:4]`` and launch ``launch[2:4]``; else the
    deterministic two-program backward."""
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    if N == 0:
        return
    sm_scale = scale
    if scale == 0.0:  # as in the forward; sm_scale = 0 makes dq and dk exactly 0
        q, scale = torch.zeros_like(q), 1.0
    flags = _kernel_flags(q)
    D_PAD = _pad_dim(D)
    da, db = dim_split(D, dsplit)
    ridx = row_index if row_index is not None else kv_lo
    has_ridx = row_index is not None
    with _device_guard(q):
        delta = torch.empty((Hq, N), dtype=torch.float32, device=q.device)
        # the one-pass backward's dQ accumulator, [Hq, N, D] in mask order, zeroed by the delta kernel
        dq_acc = torch.empty((Hq, N, D), dtype=torch.float32, device=q.device) if onepass else delta
        block = 64
        al = _stride_align((out, do))
        _attn_bwd_delta_kernel[(triton.cdiv(N, block), Hq)](
            out, do, delta, ridx, dq_acc,
            *(st // al for t in (out, do) for st in t.stride()[:2]),
            N, D=D, D_PAD=D_PAD, ALIGN=al, BLOCK=block, HAS_ROW_IDX=has_ridx, ZERO_DQ=bool(onepass),
        )  # fmt: skip
        kv_q_start, kv_q_end, kv_max_lo, kv_min_hi, n_order, q_kv_ptr, q_kv_idx, q_kv_full, m_order = (
            bwd_tables
        )
        _, _, bm1, bn1, bm2, bn2 = blocks
        if onepass:
            al = _stride_align((q, k, v, do, dk, dv))
            _attn_bwd_onepass_kernel[(triton.cdiv(N, bn1) * Hkv,)](
                q, k, v, do, dq_acc, dk, dv, lse, delta,
                kv_lo, kv_hi, ridx,
                kv_q_start, kv_q_end, kv_max_lo, kv_min_hi, n_order,
                *(st // al for t in (q, k, v, do, dk, dv) for st in t.stride()[:2]),
                N, scale * _LOG2E, sm_scale,
                HQ=Hq, HKV=Hkv, D=D, DA=da, DB=db, ALIGN=al, BLOCK_M=bm1, BLOCK_N=bn1,
                HAS_ROW_IDX=has_ridx, **flags, DQ_TRANS=_dq_transposed(q),
                num_warps=launch[2], num_stages=launch[3],
            )  # fmt: skip
            al = _stride_align((dq,))
            _attn_dq_cast_kernel[(triton.cdiv(N, block), Hq)](
                dq_acc, dq, ridx,
                *(st // al for st in dq.stride()[:2]),
                N, sm_scale, D=D, D_PAD=D_PAD, ALIGN=al, BLOCK=block, HAS_ROW_IDX=has_ridx,
            )  # fmt: skip
            return
        num_dkdv = triton.cdiv(N, bn1) * Hkv
        num_dq = triton.cdiv(N, bm2) * Hq
        al = _stride_align((q, k, v, do, dq, dk, dv))
        _attn_bwd_kernel[(num_dkdv + num_dq,)](
            q, k, v, do, dq, dk, dv, lse, delta,
            kv_lo, kv_hi, ridx,
            kv_q_start, kv_q_end, kv_max_lo, kv_min_hi, n_order,
            q_kv_ptr, q_kv_idx, q_kv_full, m_order,
            *(st // al for t in (q, k, v, do, dq, dk, dv) for st in t.stride()[:2]),
            N, num_dkdv, q_kv_idx.numel(), scale * _LOG2E, sm_scale,
            HQ=Hq, HKV=Hkv, D=D, DA=da, DB=db, ALIGN=al,
            BLOCK_M1=bm1, BLOCK_N1=bn1, BLOCK_M2=bm2, BLOCK_N2=bn2,
            HAS_ROW_IDX=has_ridx, **flags,
            num_warps=launch[2], num_stages=launch[3],
        )  # fmt: skip


# ================================================================================================ custom ops
@torch.library.custom_op("bagel_kernels::packed_attention_fwd", mutates_args=())
def _packed_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lo: torch.Tensor,
    kv_hi: torch.Tensor,
    row_index: torch.Tensor | None,
    fwd_tables: list[torch.Tensor],
    bwd_tables: list[torch.Tensor],
    scale: float,
    blocks: list[int],
    launch: list[int],
    dsplit: bool = True,
    tma: bool = False,
    onepass: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [N, Hq, D], lse [Hq, N] fp32)``. ``bwd_tables`` and ``onepass`` are unused
    here; they ride along so that autograd can hand them to the backward op (``onepass``: the
    one-pass backward, ``bwd_tables`` then being built for its tiles, see :func:`prepare_mask`).
    ``dsplit``: head-dim split (:func:`dim_split`); ``tma``: K/V through tensor descriptors where
    usable."""
    _check_op_inputs(q, k, v, kv_lo, kv_hi, row_index, scale, blocks, launch, fwd_tables, bwd_tables)
    N, Hq, D = q.shape
    q, k, v = _row_major(q), _row_major(k), _row_major(v)
    out = torch.empty((N, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((Hq, N), dtype=torch.float32, device=q.device)
    _launch_fwd(
        q, k, v, kv_lo, kv_hi, row_index, fwd_tables, scale, blocks, launch, out, lse, dsplit=dsplit, tma=tma
    )
    return out, lse


@_packed_attention_fwd.register_fake
def _(q, k, v, kv_lo, kv_hi, row_index, fwd_tables, bwd_tables, scale, blocks, launch, dsplit=True, tma=False,
      onepass=False):  # fmt: skip
    N, Hq, D = q.shape
    return q.new_empty((N, Hq, D)), q.new_empty((Hq, N), dtype=torch.float32)


@torch.library.custom_op("bagel_kernels::packed_attention_bwd", mutates_args=())
def _packed_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_lo: torch.Tensor,
    kv_hi: torch.Tensor,
    row_index: torch.Tensor | None,
    bwd_tables: list[torch.Tensor],
    scale: float,
    blocks: list[int],
    launch: list[int],
    dsplit: bool = True,
    onepass: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv)`` shaped like q, k, v. ``onepass``: the one-pass backward (dQ by fp32
    atomics, not bit-reproducible) over ``bwd_tables[:5]`` with tiles ``blocks[2:4]``; else the
    deterministic two-program backward."""
    _check_op_inputs(q, k, v, kv_lo, kv_hi, row_index, scale, blocks, launch, bwd_tables=bwd_tables)
    N, Hq, D = q.shape
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
    grad_out = grad_out.to(q.dtype)
    q, k, v, out, grad_out = (_row_major(t) for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _launch_bwd(
        grad_out, q, k, v, out, lse, kv_lo, kv_hi, row_index, bwd_tables, scale, blocks, launch, dq, dk, dv,
        dsplit=dsplit, onepass=onepass,
    )  # fmt: skip
    return dq, dk, dv


@_packed_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, kv_lo, kv_hi, row_index, bwd_tables, scale, blocks, launch, dsplit=True,
      onepass=False):  # fmt: skip
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
    dq, dk, dv = _packed_attention_bwd(
        grad_out, q, k, v, out, lse, kv_lo, kv_hi, row_index, bwd_tables, ctx.scale, ctx.blocks, ctx.launch,
        ctx.dsplit, ctx.onepass,
    )  # fmt: skip
    grads = (dq, dk, dv, None, None, None, [None] * 4, [None] * 9, None, None, None)
    # the dispatcher drops trailing arguments equal to their defaults: one gradient per input it kept
    return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


_packed_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ================================================================================================ public
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
    zeros and zero gradients. ``config`` overrides the tile shapes and variants (tests, tuning).

    ``deterministic=True`` always runs the two-program backward (no atomics: bit-identical across
    runs). ``deterministic=False`` runs the one-pass backward (dQ accumulated with fp32 atomics)
    where the configuration selects it (``AttnConfig.onepass``: off in the built-in defaults until a
    GPU measurement decides, see :mod:`bagel_kernels.attention_configs`), else the same two-program
    backward."""
    if not isinstance(mask, PackedMask):
        raise ValueError(f"mask must be a PackedMask, got {type(mask).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, torch.Tensor) and t.device != mask.device:
            raise ValueError(f"{name} is on {t.device} but the mask is on {mask.device}")
    _check_qkv(q, k, v)
    N, Hq, D = q.shape
    if N != mask.total_len:
        raise ValueError(f"q has {N} tokens but mask.total_len is {mask.total_len}; truncate the mask first")
    scale = D**-0.5 if scale is None else float(scale)
    _check_scale(scale)
    cfg = config if config is not None else default_config(q.device, q.dtype, D)
    onepass = bool(cfg.onepass) and not deterministic
    blocks, launch = _op_params(cfg, onepass)
    _check_blocks(blocks, launch)
    fwd_tables, bwd_tables = prepare_mask(mask, cfg, onepass)
    out, _lse = _packed_attention_fwd(
        q,
        k,
        v,
        mask.kv_lo,
        mask.kv_hi,
        mask._row_index,  # the mask's own validated copy (the property hands out copies)
        fwd_tables,
        bwd_tables,
        scale,
        blocks,
        launch,
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
        blocks, launch = _op_params(cfg, onepass)
        fwd_t, bwd_t = prepare_mask(mask, cfg, onepass)
        fwd_t, bwd_t = [t.to(meta) for t in fwd_t], [t.to(meta) for t in bwd_t]
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
        kv_lo, kv_hi = mask.kv_lo.to(meta), mask.kv_hi.to(meta)
        args = (kv_lo, kv_hi, ridx)
        split = bool(cfg.dsplit)
        if fwd:
            tma = bool(cfg.tma)
            _launch_fwd(q, k, v, *args, fwd_t, d**-0.5, blocks, launch, out, lse, dsplit=split, tma=tma)
        if bwd:
            grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
            _launch_bwd(
                do, q, k, v, out, lse, *args, bwd_t, d**-0.5, blocks, launch, *grads,
                dsplit=split, onepass=onepass,
            )  # fmt: skip

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


def compile_specs(arch: int = 90) -> list[tuple]:
    """Specs of every kernel launch of :func:`compile_cases` for ``arch`` (format of
    :mod:`bagel_kernels.compile_check`), derived from the launchers as they run on that GPU."""
    from .compile_check import specs_from_launches

    return specs_from_launches(compile_cases(arch), arch)


def sm90_compile_specs() -> list[tuple]:
    """:func:`compile_specs` for sm_90 (the name older callers use)."""
    return compile_specs(90)

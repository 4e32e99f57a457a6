"""Triton packed attention (FlashAttention-2 style forward and backward) under a :class:`PackedMask`.

Math (per query head h, kv head ``h // G`` with ``G = Hq // Hkv``; ``vis(i, j) = kv_lo[j] <= i < kv_hi[j]``):

    S = scale * Q K^T   masked where not vis       P = softmax(S)  (rows with no visible key: P = 0)
    O = P V             LSE = log2-domain log-sum-exp of S * log2(e)   (+inf for rows that see nothing)
    dV = P^T dO         dP = dO V^T      dS = P * (dP - rowsum(dO * O))
    dQ = scale * dS K   dK = scale * dS^T Q

Shapes (N = mask.total_len = tokens, D <= 256 padded to a power of two inside the kernels):
    q: [N, Hq, D]   k, v: [N, Hkv, D]   out: [N, Hq, D]   lse, delta: [Hq, N] fp32

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

The softmax scale must be >= 0: full tiles take the row max of the unscaled scores and scale it,
which fuses scaling and max subtraction into one FMA per score.

No atomics anywhere, so every pass is deterministic (bit-identical across runs); ``deterministic``
is accepted for the dispatcher's contract and changes nothing. No dense mask is ever built.

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
import math
import os
from dataclasses import astuple, dataclass

import torch
import triton
import triton.language as tl

from .mask import PackedMask

__all__ = [
    "AttnConfig",
    "default_config",
    "prepare_mask",
    "triton_packed_attention",
    "sm90_compile_specs",
]

_LOG2E = 1.4426950408889634
_INT32_MAX = 2**31 - 1
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ================================================================================================ kernels
@triton.jit
def _load_rows(ROW_IDX, offs, ok, HAS_ROW_IDX: tl.constexpr):
    """Physical rows (int64) of the mask-order tokens ``offs`` (0 where ``ok`` is false)."""
    if HAS_ROW_IDX:
        rows = tl.load(ROW_IDX + offs, mask=ok, other=0)
    else:
        rows = offs
    return rows.to(tl.int64)


@triton.jit
def _load_tile(
    base, rows, row_ok, offs_d, stride_t, D: tl.constexpr, D_PAD: tl.constexpr, LOWP_DOT: tl.constexpr
):
    """``[len(rows), D_PAD]`` tile; rows beyond the pack and padded columns read as 0."""
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    if D == D_PAD:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if not LOWP_DOT:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_tile(base, rows, row_ok, offs_d, stride_t, x, D: tl.constexpr, D_PAD: tl.constexpr):
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    if D == D_PAD:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, LSE,
    KV_LO, KV_HI, ROW_IDX,
    Q_KV_PTR, Q_KV_IDX, Q_KV_FULL, M_ORDER,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    N, qk_scale, HQ, GROUP,
    D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROW_IDX: tl.constexpr, LOWP_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    h = pid % HQ
    m = tl.load(M_ORDER + pid // HQ)
    hk = h // GROUP

    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < N
    rows_q = _load_rows(ROW_IDX, offs_m, row_ok, HAS_ROW_IDX)
    q = _load_tile(Q + h.to(tl.int64) * stride_qh, rows_q, row_ok, offs_d, stride_qt, D, D_PAD, LOWP_DOT)

    # finite start for the running max: a fully masked tile then gives exp2(-inf - m) = 0, never NaN
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    start = tl.load(Q_KV_PTR + m)
    end = tl.load(Q_KV_PTR + m + 1)
    for i in range(start, end):
        n = tl.load(Q_KV_IDX + i)
        full = tl.load(Q_KV_FULL + i)
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        rows_k = _load_rows(ROW_IDX, offs_n, col_ok, HAS_ROW_IDX)
        k = _load_tile(K + hk.to(tl.int64) * stride_kh, rows_k, col_ok, offs_d, stride_kt, D, D_PAD, LOWP_DOT)
        v = _load_tile(V + hk.to(tl.int64) * stride_vh, rows_k, col_ok, offs_d, stride_vt, D, D_PAD, LOWP_DOT)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BM, BN], unscaled
        if full == 0:
            lo = tl.load(KV_LO + offs_n, mask=col_ok, other=2147483647)
            hi = tl.load(KV_HI + offs_n, mask=col_ok, other=0)
            vis = (lo[None, :] <= offs_m[:, None]) & (offs_m[:, None] < hi[None, :])
            s = tl.where(vis, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
        else:
            # full tile: max of the raw scores times the (non-negative) scale, so that scaling and
            # subtracting the max fuse into one FMA per score
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if LOWP_DOT:
            p = p.to(V.dtype.element_ty)
        acc = tl.dot(p, v, acc, input_precision=DOT_PREC)
        m_i = m_new

    alive = l_i > 0.0
    acc = acc / tl.where(alive, l_i, 1.0)[:, None]
    lse = tl.where(alive, m_i + tl.math.log2(tl.where(alive, l_i, 1.0)), float("inf"))
    tl.store(LSE + h.to(tl.int64) * N + offs_m, lse, mask=row_ok)
    _store_tile(Out + h.to(tl.int64) * stride_oh, rows_q, row_ok, offs_d, stride_ot, acc, D, D_PAD)


@triton.jit
def _attn_bwd_delta_kernel(
    Out, DO, DELTA, ROW_IDX,
    stride_ot, stride_oh, stride_dot, stride_doh,
    N,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, HAS_ROW_IDX: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0)
    h = tl.program_id(1)
    offs = m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    ok = offs < N
    rows = _load_rows(ROW_IDX, offs, ok, HAS_ROW_IDX)
    o = _load_tile(Out + h.to(tl.int64) * stride_oh, rows, ok, offs_d, stride_ot, D, D_PAD, False)
    do = _load_tile(DO + h.to(tl.int64) * stride_doh, rows, ok, offs_d, stride_dot, D, D_PAD, False)
    tl.store(DELTA + h.to(tl.int64) * N + offs, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _attn_bwd_dkdv_program(
    rank, Q, K, V, DO, DK, DV, LSE, DELTA,
    KV_LO, KV_HI, ROW_IDX, KV_Q_START, KV_Q_END, KV_MAX_LO, KV_MIN_HI, N_ORDER,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    N, qk_scale, sm_scale, HKV, GROUP,
    D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROW_IDX: tl.constexpr, LOWP_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    hk = rank % HKV
    n = tl.load(N_ORDER + rank // HKV)
    offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    col_ok = offs_n < N
    rows_k = _load_rows(ROW_IDX, offs_n, col_ok, HAS_ROW_IDX)
    k = _load_tile(K + hk.to(tl.int64) * stride_kh, rows_k, col_ok, offs_d, stride_kt, D, D_PAD, LOWP_DOT)
    v = _load_tile(V + hk.to(tl.int64) * stride_vh, rows_k, col_ok, offs_d, stride_vt, D, D_PAD, LOWP_DOT)
    lo = tl.load(KV_LO + offs_n, mask=col_ok, other=2147483647)
    hi = tl.load(KV_HI + offs_n, mask=col_ok, other=0)
    max_lo = tl.load(KV_MAX_LO + n)
    min_hi = tl.load(KV_MIN_HI + n)
    m_start = tl.load(KV_Q_START + n)
    num_m = tl.load(KV_Q_END + n) - m_start

    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    # one flat loop over (q head of the group, query block): a single pipelined loop, no atomics
    for it in range(0, GROUP * num_m):
        g = it // num_m
        m = m_start + (it - g * num_m)
        h = hk * GROUP + g
        offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        rows_q = _load_rows(ROW_IDX, offs_m, row_ok, HAS_ROW_IDX)
        q = _load_tile(Q + h.to(tl.int64) * stride_qh, rows_q, row_ok, offs_d, stride_qt, D, D_PAD, LOWP_DOT)
        do = _load_tile(
            DO + h.to(tl.int64) * stride_doh, rows_q, row_ok, offs_d, stride_dot, D, D_PAD, LOWP_DOT
        )
        # lse = +inf for rows beyond the pack and rows that see nothing: their P is exactly 0
        lse = tl.load(LSE + h.to(tl.int64) * N + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + h.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BN, BM]
        p_t = tl.math.exp2(s_t - lse[None, :])
        partial = (max_lo > m * BLOCK_M) | (min_hi < tl.minimum((m + 1) * BLOCK_M, N))
        if partial:
            vis = (lo[:, None] <= offs_m[None, :]) & (offs_m[None, :] < hi[:, None])
            p_t = tl.where(vis, p_t, 0.0)
        if LOWP_DOT:
            dv = tl.dot(p_t.to(DO.dtype.element_ty), do, dv, input_precision=DOT_PREC)
        else:
            dv = tl.dot(p_t, do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [BN, BM]
        ds_t = p_t * (dp_t - delta[None, :])
        if LOWP_DOT:
            dk = tl.dot(ds_t.to(Q.dtype.element_ty), q, dk, input_precision=DOT_PREC)
        else:
            dk = tl.dot(ds_t, q, dk, input_precision=DOT_PREC)

    _store_tile(
        DK + hk.to(tl.int64) * stride_dkh, rows_k, col_ok, offs_d, stride_dkt, dk * sm_scale, D, D_PAD
    )
    _store_tile(DV + hk.to(tl.int64) * stride_dvh, rows_k, col_ok, offs_d, stride_dvt, dv, D, D_PAD)


@triton.jit
def _attn_bwd_dq_program(
    rank, Q, K, V, DO, DQ, LSE, DELTA,
    KV_LO, KV_HI, ROW_IDX, Q_KV_PTR, Q_KV_IDX, Q_KV_FULL, M_ORDER,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    N, qk_scale, sm_scale, HQ, GROUP,
    D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROW_IDX: tl.constexpr, LOWP_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    h = rank % HQ
    m = tl.load(M_ORDER + rank // HQ)
    hk = h // GROUP
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < N
    rows_q = _load_rows(ROW_IDX, offs_m, row_ok, HAS_ROW_IDX)
    q = _load_tile(Q + h.to(tl.int64) * stride_qh, rows_q, row_ok, offs_d, stride_qt, D, D_PAD, LOWP_DOT)
    do = _load_tile(DO + h.to(tl.int64) * stride_doh, rows_q, row_ok, offs_d, stride_dot, D, D_PAD, LOWP_DOT)
    lse = tl.load(LSE + h.to(tl.int64) * N + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + h.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    start = tl.load(Q_KV_PTR + m)
    end = tl.load(Q_KV_PTR + m + 1)
    for i in range(start, end):
        n = tl.load(Q_KV_IDX + i)
        full = tl.load(Q_KV_FULL + i)
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        rows_k = _load_rows(ROW_IDX, offs_n, col_ok, HAS_ROW_IDX)
        k = _load_tile(K + hk.to(tl.int64) * stride_kh, rows_k, col_ok, offs_d, stride_kt, D, D_PAD, LOWP_DOT)
        v = _load_tile(V + hk.to(tl.int64) * stride_vh, rows_k, col_ok, offs_d, stride_vt, D, D_PAD, LOWP_DOT)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BM, BN]
        p = tl.math.exp2(s - lse[:, None])
        if full == 0:
            lo = tl.load(KV_LO + offs_n, mask=col_ok, other=2147483647)
            hi = tl.load(KV_HI + offs_n, mask=col_ok, other=0)
            vis = (lo[None, :] <= offs_m[:, None]) & (offs_m[:, None] < hi[None, :])
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # [BM, BN]
        ds = p * (dp - delta[:, None])
        if LOWP_DOT:
            dq = tl.dot(ds.to(K.dtype.element_ty), k, dq, input_precision=DOT_PREC)
        else:
            dq = tl.dot(ds, k, dq, input_precision=DOT_PREC)

    _store_tile(DQ + h.to(tl.int64) * stride_dqh, rows_q, row_ok, offs_d, stride_dqt, dq * sm_scale, D, D_PAD)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA,
    KV_LO, KV_HI, ROW_IDX,
    KV_Q_START, KV_Q_END, KV_MAX_LO, KV_MIN_HI, N_ORDER,
    Q_KV_PTR, Q_KV_IDX, Q_KV_FULL, M_ORDER,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    N, NUM_DKDV, qk_scale, sm_scale, HQ, HKV,
    D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
    HAS_ROW_IDX: tl.constexpr, LOWP_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    # programs [0, NUM_DKDV) compute dK/dV, the rest dQ: one launch so the short dQ programs fill
    # the SMs while the long dK/dV programs (a whole GQA group each) finish
    pid = tl.program_id(0)
    if pid < NUM_DKDV:
        _attn_bwd_dkdv_program(
            pid, Q, K, V, DO, DK, DV, LSE, DELTA,
            KV_LO, KV_HI, ROW_IDX, KV_Q_START, KV_Q_END, KV_MAX_LO, KV_MIN_HI, N_ORDER,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
            stride_dkt, stride_dkh, stride_dvt, stride_dvh,
            N, qk_scale, sm_scale, HKV, HQ // HKV,
            D, D_PAD, BLOCK_M1, BLOCK_N1, HAS_ROW_IDX, LOWP_DOT, DOT_PREC,
        )  # fmt: skip
    else:
        _attn_bwd_dq_program(
            pid - NUM_DKDV, Q, K, V, DO, DQ, LSE, DELTA,
            KV_LO, KV_HI, ROW_IDX, Q_KV_PTR, Q_KV_IDX, Q_KV_FULL, M_ORDER,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
            stride_dqt, stride_dqh,
            N, qk_scale, sm_scale, HQ, HQ // HKV,
            D, D_PAD, BLOCK_M2, BLOCK_N2, HAS_ROW_IDX, LOWP_DOT, DOT_PREC,
        )  # fmt: skip


# ================================================================================================ configs
@dataclass(frozen=True)
class AttnConfig:
    """Tile shapes and launch parameters.

    Forward tiles are ``block_m x block_n``; the backward's dK/dV programs use ``block_m1 x block_n1``
    (key blocks of ``block_n1``) and its dQ programs ``block_m2 x block_n2``. ``*_warps``/``*_stages``
    matter on the GPU only."""

    block_m: int = 64
    block_n: int = 32
    block_m1: int = 32
    block_n1: int = 64
    block_m2: int = 64
    block_n2: int = 32
    fwd_warps: int = 4
    fwd_stages: int = 2
    bwd_warps: int = 4
    bwd_stages: int = 2

    def blocks(self) -> list[int]:
        return [self.block_m, self.block_n, self.block_m1, self.block_n1, self.block_m2, self.block_n2]

    def launch(self) -> list[int]:
        return [self.fwd_warps, self.fwd_stages, self.bwd_warps, self.bwd_stages]


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(int(d)))


# Hopper (sm_90) defaults per (fp32 or not, padded head dim). The 16-bit D=128 entry is the
# configuration PyTorch's FlexAttention uses on H100 (fwd 128x64, 8 warps, 3 stages; bwd 64x128 for
# dK/dV and 128x64 for dQ, 8 warps, 3 stages), the baseline to beat. Every entry was compiled for
# sm_90 here (``python -m bagel_kernels.compile_check``) and checked with ptxas to fit the 227 KiB
# of shared memory without register spills (a few dozen bytes remain in the D=128 backward).
# fp32 runs exact ``ieee`` dots (no tensor cores): correctness, not speed, is its purpose.
_GPU_CONFIGS: dict[tuple[bool, int], AttnConfig] = {
    (False, 16): AttnConfig(128, 128, 64, 64, 64, 64, 8, 3, 4, 3),
    (False, 32): AttnConfig(128, 128, 64, 64, 64, 64, 8, 3, 4, 3),
    (False, 64): AttnConfig(128, 128, 64, 64, 64, 64, 8, 3, 4, 3),
    (False, 128): AttnConfig(128, 64, 64, 128, 128, 64, 8, 3, 8, 3),
    (False, 256): AttnConfig(64, 32, 32, 64, 64, 32, 4, 3, 8, 2),
    (True, 16): AttnConfig(128, 32, 16, 32, 32, 16, 8, 3, 4, 1),
    (True, 32): AttnConfig(128, 32, 16, 32, 32, 16, 8, 3, 4, 1),
    (True, 64): AttnConfig(128, 32, 16, 32, 32, 16, 8, 3, 4, 1),
    (True, 128): AttnConfig(32, 64, 16, 32, 32, 16, 8, 3, 4, 1),
    (True, 256): AttnConfig(32, 32, 32, 32, 32, 32, 4, 2, 8, 1),
}
# Interpreter (CPU tests): small tiles keep a few-hundred-token pack fast; forward, dK/dV and dQ
# use different shapes on purpose so that a mixed-up block index cannot go unnoticed.
_INTERPRET_CONFIG = AttnConfig()


def default_config(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> AttnConfig:
    """Tile configuration used for ``device`` (cuda: Hopper table; otherwise the interpreter's)."""
    if torch.device(device).type != "cuda":
        return _INTERPRET_CONFIG
    return _GPU_CONFIGS[(dtype == torch.float32, _pad_dim(head_dim))]


# ================================================================================================ tables
def _lpt_order(work: torch.Tensor) -> torch.Tensor:
    """Block ids by decreasing work (longest processing time first), int32."""
    return torch.sort(work.long(), descending=True, stable=True).indices.to(torch.int32)


def prepare_mask(mask: PackedMask, config: AttnConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The block tables and launch orders the kernels need for ``config`` (cached on the mask).

    Returns ``(fwd_tables, bwd_tables)``:
        fwd_tables = [q_kv_ptr, q_kv_idx, q_kv_full, m_order]                    (block_m x block_n)
        bwd_tables = [kv_q_start, kv_q_end, kv_max_lo, kv_min_hi, n_order,       (block_m1 x block_n1)
                      q_kv_ptr, q_kv_idx, q_kv_full, m_order]                    (block_m2 x block_n2)
    Call it (or run one eager step) before ``torch.compile`` traces a step: building tables has
    data-dependent shapes, which a ``fullgraph=True`` trace cannot contain."""
    key = ("triton", astuple(config))
    hit = mask._cache.get(key)
    if hit is not None:
        return hit
    f = mask.block_tables(config.block_m, config.block_n)
    b1 = mask.block_tables(config.block_m1, config.block_n1)
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
def _check_tables(n: int, blocks: list[int], fwd_tables=None, bwd_tables=None) -> None:
    bm, bn, bm1, bn1, bm2, bn2 = blocks
    for name, b in zip(
        ("block_m", "block_n", "block_m1", "block_n1", "block_m2", "block_n2"), blocks, strict=True
    ):
        if b < 1 or b & (b - 1):
            raise ValueError(f"{name}={b} must be a positive power of two")
    if fwd_tables is not None:
        if len(fwd_tables) != 4:
            raise ValueError(f"fwd_tables must hold 4 tensors, got {len(fwd_tables)}")
        if fwd_tables[0].numel() != triton.cdiv(n, bm) + 1 or fwd_tables[3].numel() != triton.cdiv(n, bm):
            raise ValueError(
                f"fwd_tables were built for another pack length or block_m (N={n}, block_m={bm})"
            )
    if bwd_tables is not None:
        if len(bwd_tables) != 9:
            raise ValueError(f"bwd_tables must hold 9 tensors, got {len(bwd_tables)}")
        if any(t.numel() != triton.cdiv(n, bn1) for t in bwd_tables[:5]):
            raise ValueError(
                f"bwd_tables were built for another pack length or block_n1 (N={n}, block_n1={bn1})"
            )
        if bwd_tables[5].numel() != triton.cdiv(n, bm2) + 1 or bwd_tables[8].numel() != triton.cdiv(n, bm2):
            raise ValueError(
                f"bwd_tables were built for another pack length or block_m2 (N={n}, block_m2={bm2})"
            )
    for t in list(fwd_tables or []) + list(bwd_tables or []):
        if t.dtype != torch.int32:
            raise ValueError(f"block tables must be int32, got {t.dtype}")


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """Unit stride along the head dim (rows/heads may keep any stride, 0 included)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU, not on whichever device is current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _kernel_flags(q: torch.Tensor) -> dict:
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"the Triton attention kernels need a CUDA device or TRITON_INTERPRET=1 (q is on {q.device})"
        )
    lowp = not _interpreting()
    return {"LOWP_DOT": lowp, "DOT_PREC": "ieee" if (q.dtype == torch.float32 or not lowp) else "tf32"}


def _launch_fwd(q, k, v, kv_lo, kv_hi, row_index, fwd_tables, scale, blocks, launch, out, lse) -> None:
    """Writes ``out`` [N, Hq, D] and ``lse`` [Hq, N] (fp32, log2 domain)."""
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    if N == 0:
        return
    q_kv_ptr, q_kv_idx, q_kv_full, m_order = fwd_tables
    bm, bn = blocks[0], blocks[1]
    flags = _kernel_flags(q)
    grid = (triton.cdiv(N, bm) * Hq,)
    with _device_guard(q):
        _attn_fwd_kernel[grid](
            q, k, v, out, lse,
            kv_lo, kv_hi, row_index if row_index is not None else kv_lo,
            q_kv_ptr, q_kv_idx, q_kv_full, m_order,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            N, scale * _LOG2E,
            HQ=Hq, GROUP=Hq // Hkv, D=D, D_PAD=_pad_dim(D), BLOCK_M=bm, BLOCK_N=bn,
            HAS_ROW_IDX=row_index is not None, **flags,
            num_warps=launch[0], num_stages=launch[1],
        )  # fmt: skip


def _launch_bwd(
    do, q, k, v, out, lse, kv_lo, kv_hi, row_index, bwd_tables, scale, blocks, launch, dq, dk, dv
) -> None:
    """Writes ``dq``, ``dk``, ``dv``."""
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    if N == 0:
        return
    flags = _kernel_flags(q)
    D_PAD = _pad_dim(D)
    ridx = row_index if row_index is not None else kv_lo
    with _device_guard(q):
        delta = torch.empty((Hq, N), dtype=torch.float32, device=q.device)
        block = 64
        _attn_bwd_delta_kernel[(triton.cdiv(N, block), Hq)](
            out, do, delta, ridx,
            out.stride(0), out.stride(1), do.stride(0), do.stride(1),
            N, D=D, D_PAD=D_PAD, BLOCK=block, HAS_ROW_IDX=row_index is not None,
        )  # fmt: skip
        kv_q_start, kv_q_end, kv_max_lo, kv_min_hi, n_order, q_kv_ptr, q_kv_idx, q_kv_full, m_order = (
            bwd_tables
        )
        _, _, bm1, bn1, bm2, bn2 = blocks
        num_dkdv = triton.cdiv(N, bn1) * Hkv
        num_dq = triton.cdiv(N, bm2) * Hq
        _attn_bwd_kernel[(num_dkdv + num_dq,)](
            q, k, v, do, dq, dk, dv, lse, delta,
            kv_lo, kv_hi, ridx,
            kv_q_start, kv_q_end, kv_max_lo, kv_min_hi, n_order,
            q_kv_ptr, q_kv_idx, q_kv_full, m_order,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            N, num_dkdv, scale * _LOG2E, scale,
            HQ=Hq, HKV=Hkv, D=D, D_PAD=D_PAD, BLOCK_M1=bm1, BLOCK_N1=bn1, BLOCK_M2=bm2, BLOCK_N2=bn2,
            HAS_ROW_IDX=row_index is not None, **flags,
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [N, Hq, D], lse [Hq, N] fp32)``. ``bwd_tables`` is unused here; it rides
    along so that autograd can save it for the backward op."""
    N, Hq, D = q.shape
    _check_tables(N, blocks, fwd_tables=fwd_tables)
    q, k, v = _row_major(q), _row_major(k), _row_major(v)
    out = torch.empty((N, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((Hq, N), dtype=torch.float32, device=q.device)
    _launch_fwd(q, k, v, kv_lo, kv_hi, row_index, fwd_tables, scale, blocks, launch, out, lse)
    return out, lse


@_packed_attention_fwd.register_fake
def _(q, k, v, kv_lo, kv_hi, row_index, fwd_tables, bwd_tables, scale, blocks, launch):
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv)`` shaped like q, k, v."""
    N, Hq, D = q.shape
    _check_tables(N, blocks, bwd_tables=bwd_tables)
    grad_out = grad_out.to(q.dtype)
    q, k, v, out, grad_out = (_row_major(t) for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _launch_bwd(
        grad_out, q, k, v, out, lse, kv_lo, kv_hi, row_index, bwd_tables, scale, blocks, launch, dq, dk, dv
    )
    return dq, dk, dv


@_packed_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, kv_lo, kv_hi, row_index, bwd_tables, scale, blocks, launch):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_lo, kv_hi, row_index, _fwd_tables, bwd_tables, scale, blocks, launch = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_lo, kv_hi, row_index, *bwd_tables)
    ctx.scale, ctx.blocks, ctx.launch = scale, blocks, launch


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_lo, kv_hi, row_index, *bwd_tables = ctx.saved_tensors
    dq, dk, dv = _packed_attention_bwd(
        grad_out, q, k, v, out, lse, kv_lo, kv_hi, row_index, bwd_tables, ctx.scale, ctx.blocks, ctx.launch
    )
    return dq, dk, dv, None, None, None, [None] * 4, [None] * 9, None, None, None


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
    zeros and zero gradients. ``deterministic`` is always honoured (no atomics are used).
    ``config`` overrides the tile shapes (tests, tuning)."""
    if not isinstance(mask, PackedMask):
        raise ValueError(f"mask must be a PackedMask, got {type(mask).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [N, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; the Triton backend supports fp16, bf16 and fp32")
        if t.device != mask.device:
            raise ValueError(f"{name} is on {t.device} but the mask is on {mask.device}")
    N, Hq, D = q.shape
    if k.shape != v.shape or k.shape[0] != N or k.shape[2] != D or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"k/v must be [N, Hkv, D] like q in dtype and N, D: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if not 0 < D <= 256:
        raise ValueError(f"head dim {D} is unsupported by the Triton backend (1..256)")
    if N != mask.total_len:
        raise ValueError(f"q has {N} tokens but mask.total_len is {mask.total_len}; truncate the mask first")
    if N >= _INT32_MAX // 2:
        raise ValueError(f"q has {N} tokens, beyond the int32 token indices of the kernels")
    scale = D**-0.5 if scale is None else float(scale)
    if not (math.isfinite(scale) and scale >= 0.0):
        raise ValueError(f"softmax_scale must be finite and non-negative for the Triton backend, got {scale}")
    cfg = config if config is not None else default_config(q.device, q.dtype, D)
    fwd_tables, bwd_tables = prepare_mask(mask, cfg)
    out, _lse = _packed_attention_fwd(
        q,
        k,
        v,
        mask.kv_lo,
        mask.kv_hi,
        mask.row_index,
        fwd_tables,
        bwd_tables,
        scale,
        cfg.blocks(),
        cfg.launch(),
    )
    return out


# ================================================================================================ sm_90 compile
def sm90_compile_specs() -> list[tuple]:
    """Kernels and argument types to compile for sm_90 without a GPU (see ``bagel_kernels.compile_check``).

    Covers the GPU configurations of ``_GPU_CONFIGS`` the model uses (D=128 Qwen2, D=72 SigLIP, D=64,
    D=256) in fp16/bf16 and fp32, with and without a row index."""
    specs = []
    cases = [  # (dtype, head dim, row index); head counts are runtime arguments
        (torch.bfloat16, 128, False),  # Qwen2 7B
        (torch.bfloat16, 128, True),  # Qwen2 7B with the MoT row permutation
        (torch.bfloat16, 72, False),  # SigLIP
        (torch.float16, 64, True),
        (torch.bfloat16, 256, False),
        (torch.float32, 64, False),
        (torch.float32, 128, False),
        (torch.float32, 256, True),
    ]
    tname = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    for dtype, d, ridx in cases:
        cfg = _GPU_CONFIGS[(dtype == torch.float32, _pad_dim(d))]
        t = tname[dtype]
        flags = {
            "LOWP_DOT": True,
            "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32",
            "HAS_ROW_IDX": ridx,
        }
        tag = f"{t}_d{d}{'_ridx' if ridx else ''}"
        sig = {n: f"*{t}" for n in ("Q", "K", "V", "Out")}
        sig |= {"LSE": "*fp32", "KV_LO": "*i32", "KV_HI": "*i32", "ROW_IDX": "*i32"}
        sig |= {n: "*i32" for n in ("Q_KV_PTR", "Q_KV_IDX", "Q_KV_FULL", "M_ORDER")}
        sig |= {
            n: "i32"
            for n in (
                "stride_qt",
                "stride_qh",
                "stride_kt",
                "stride_kh",
                "stride_vt",
                "stride_vh",
                "stride_ot",
                "stride_oh",
                "N",
            )
        }
        sig |= {"qk_scale": "fp32", "HQ": "i32", "GROUP": "i32"}
        const = dict(D=d, D_PAD=_pad_dim(d), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **flags)
        sig |= {c: "constexpr" for c in const}
        specs.append(
            (
                f"attn_fwd_{tag}",
                _attn_fwd_kernel,
                sig,
                const,
                {"num_warps": cfg.fwd_warps, "num_stages": cfg.fwd_stages},
            )
        )

        sig = {"Out": f"*{t}", "DO": f"*{t}", "DELTA": "*fp32", "ROW_IDX": "*i32"}
        sig |= {n: "i32" for n in ("stride_ot", "stride_oh", "stride_dot", "stride_doh", "N")}
        const = dict(D=d, D_PAD=_pad_dim(d), BLOCK=64, HAS_ROW_IDX=ridx)
        sig |= {c: "constexpr" for c in const}
        specs.append(
            (f"attn_bwd_delta_{tag}", _attn_bwd_delta_kernel, sig, const, {"num_warps": 4, "num_stages": 1})
        )

        sig = {n: f"*{t}" for n in ("Q", "K", "V", "DO", "DQ", "DK", "DV")}
        sig |= {"LSE": "*fp32", "DELTA": "*fp32"}
        names = ("KV_LO", "KV_HI", "ROW_IDX", "KV_Q_START", "KV_Q_END", "KV_MAX_LO", "KV_MIN_HI", "N_ORDER")
        sig |= {n: "*i32" for n in names + ("Q_KV_PTR", "Q_KV_IDX", "Q_KV_FULL", "M_ORDER")}
        strides = [f"stride_{a}{b}" for a in ("q", "k", "v", "do", "dq", "dk", "dv") for b in ("t", "h")]
        sig |= {n: "i32" for n in strides + ["N", "NUM_DKDV"]}
        sig |= {"qk_scale": "fp32", "sm_scale": "fp32", "HQ": "i32", "HKV": "i32"}
        const = dict(
            D=d, D_PAD=_pad_dim(d),
            BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1, BLOCK_M2=cfg.block_m2, BLOCK_N2=cfg.block_n2, **flags,
        )  # fmt: skip
        sig |= {c: "constexpr" for c in const}
        specs.append(
            (
                f"attn_bwd_{tag}",
                _attn_bwd_kernel,
                sig,
                const,
                {"num_warps": cfg.bwd_warps, "num_stages": cfg.bwd_stages},
            )
        )
    return specs

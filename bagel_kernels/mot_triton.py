"""Triton kernels and launchers of the MoT routed ops (see :mod:`bagel_kernels.mot` for the public API).

Layout convention: the pack is grouped by expert, rows ``[0, n_und)`` are understanding tokens and
rows ``[n_und, N)`` generation tokens. The two experts' weights are stacked into one ``[2, ...]``
tensor so that one launch serves both: a row picks its expert with ``row >= n_und``.

Every kernel loads, upcasts to fp32 at once, computes in fp32 and stores in the output dtype (the
Triton interpreter gets bf16 arithmetic wrong, and fp32 math is what the GPU does anyway).
Row offsets are 64-bit (``row.to(tl.int64) * stride``). Rows may have any stride; the last dim
must have stride 1 (the public functions make it so).

q/k tiles are ``[tokens, heads, D/2]``: the head dim is held as its two rotary halves, so
``rotate_half`` is register arithmetic, and q and k of both experts go through one launch.

Backward kernels give each program a contiguous run of rows inside ONE expert segment (programs
``[0, P_und)`` cover ``[0, n_und)``, programs ``[P_und, P)`` cover ``[n_und, N)``); each program
accumulates its weight-gradient partial sum in fp32 registers and writes one row of a ``[P, ...]``
buffer, which torch reduces per expert afterwards. No atomics: the backward is deterministic.

Launchers here trust their inputs (shapes, dtypes, unit last-dim stride); validation lives in
:mod:`bagel_kernels.mot`. Tiles and launch shapes travel as named tuples and reach the kernels as
keywords; the kernels' own signatures stay flat (pointers, sizes, strides, constexprs: what a launch
binds), while the ``@triton.jit`` helpers take (pointer, row stride, head stride) views and tiles
as tuples.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .backends import interpreting

__all__ = [
    "rms_norm_fwd",
    "rms_norm_bwd",
    "QKArgs",
    "qk_norm_rope_fwd",
    "qk_norm_rope_bwd",
    "swiglu_fwd",
    "swiglu_bwd",
    "permute_rows_launch",
    "MAX_ROW_BLOCK",
    "compile_cases",
    "compile_specs",
]

# Widest row (next power of two) the single-tile row kernels keep in registers.
MAX_ROW_BLOCK = 32768
# Elements a program handles per tile in the memory-bound kernels (rows x columns).
_TILE_ELEMS = 4096
# SwiGLU: elements per tile and the widest column block (a tile is one row at BAGEL's 18944 columns).
_SWIGLU_TILE_ELEMS = 2048
# Row permutation: the widest column block (rows wider than this take several column programs).
_PERMUTE_MAX_COLS = 1024
# Warps per tile size: the first (elements, warps) pair whose threshold the tile reaches; else 2.
_WARPS_BY_TILE = ((16384, 16), (4096, 8), (1024, 4))
_MIN_WARPS = 2
_MAX_WARPS = 16
# Persistent backward kernels: programs per SM on a GPU (a few waves), and in all under the interpreter.
_WAVES_PER_SM = 4
_INTERPRETER_PROGRAMS = 8
# SM counts the persistent backward kernels size for when compiling for a GPU that is not here
# (H100 SXM, A100).
_SM_COUNT = {90: 132, 80: 108}


def _check_interpreter() -> None:
    if interpreting():
        from .attention_configs import check_interpreter

        check_interpreter()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs of the persistent backward kernels: a few waves on a GPU, a handful when interpreting
    (meta tensors: the compile check's target GPU)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _WAVES_PER_SM * _sm_count(index)
    if device.type == "meta":
        from .attention_configs import device_arch

        return _WAVES_PER_SM * _SM_COUNT[90 if device_arch(device) >= 90 else 80]
    return _INTERPRETER_PROGRAMS


def _num_warps(elems: int) -> int:
    for threshold, warps in _WARPS_BY_TILE:
        if elems >= threshold:
            return warps
    return _MIN_WARPS


def _bwd_warps(fwd_warps: int) -> int:
    """Warps of the persistent backward kernels: twice the forward's for the same tile, which halves
    the registers per thread (ptxas, sm_90, bf16: qk bwd 160 -> 87, rms bwd 101 -> 58) and keeps
    more warps resident per SM."""
    return min(2 * fwd_warps, _MAX_WARPS)


class _Segments(NamedTuple):
    """How a persistent backward kernel splits the rows: no program straddles ``n_und``."""

    rows_per_prog: int
    progs_und: int  # programs [0, progs_und) cover [0, n_und), the others [n_und, N)
    programs: int


def _segment_split(N: int, n_und: int, target: int) -> _Segments:
    rpp = max(1, triton.cdiv(N, max(1, target)))
    p_und = triton.cdiv(n_und, rpp)
    p_gen = triton.cdiv(N - n_und, rpp)
    return _Segments(rpp, p_und, p_und + p_gen)


def _per_expert(partials: torch.Tensor, seg: _Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-program weight-gradient partials ``[P, ...]`` summed per expert: (und, gen)."""
    return partials[: seg.progs_und].sum(0), partials[seg.progs_und :].sum(0)


@triton.jit
def _segment_bounds(pid, N, n_und, rows_per_prog, progs_und):
    """Row range [start, end) and expert (0 und, 1 gen) of backward program ``pid``."""
    is_gen = pid >= progs_und
    seg_start = tl.where(is_gen, n_und, 0)
    seg_end = tl.where(is_gen, N, n_und)
    local = tl.where(is_gen, pid - progs_und, pid)
    start = seg_start + local * rows_per_prog
    end = tl.minimum(start + rows_per_prog, seg_end)
    return start, end, is_gen.to(tl.int32)


# ============================================================================================ RMSNorm
@triton.jit
def _mot_rms_norm_fwd_kernel(
    X,
    W,
    Y,  # X [N, H] (row stride), W [2, H] contiguous (und, gen), Y [N, H] contiguous
    N,
    H,
    n_und,
    stride_x,
    stride_y,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < N
    cmask = cols < H
    m = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    # masked rows contribute exactly zero (rsqrt(0 + eps) is inf when eps = 0, and inf * 0 is NaN)
    rstd = tl.where(rmask, tl.rsqrt(tl.sum(x * x, axis=1) / H + eps), 0.0)
    # Qwen2RMSNorm: normalise in fp32, cast to the input dtype, then multiply by the weight
    xh = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    expert = (rows >= n_und).to(tl.int32)
    w = tl.load(W + expert[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], (xh * w).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _mot_rms_norm_bwd_kernel(
    X,
    W,
    DY,
    DX,
    DWP,  # DWP [P, H] fp32 per-program weight-gradient partials
    N,
    H,
    n_und,
    stride_x,
    stride_dy,
    stride_dx,
    rows_per_prog,
    progs_und,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    start, end, expert = _segment_bounds(pid, N, n_und, rows_per_prog, progs_und)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    w = tl.load(W + expert * H + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        m = (rows < end)[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=m, other=0.0).to(tl.float32)
        # rows beyond the segment contribute exactly zero, whatever eps (rsqrt(0) = inf, inf * 0 = NaN)
        rstd = tl.where(rows < end, tl.rsqrt(tl.sum(x * x, axis=1) / H + eps), 0.0)
        xh = x * rstd[:, None]
        dw += tl.sum(dy * xh.to(X.dtype.element_ty).to(tl.float32), axis=0)
        g = dy * w[None, :]
        c = tl.sum(g * xh, axis=1) / H
        dx = (g - xh * c[:, None]) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)
    tl.store(DWP + pid.to(tl.int64) * H + cols, dw, mask=cmask)


class _RowTiles(NamedTuple):
    """Tile of the row kernels: ``BLOCK_M`` rows of ``BLOCK_H`` (the row width padded to a power of two)."""

    BLOCK_M: int
    BLOCK_H: int
    num_warps: int


def _row_tiles(N: int, H: int) -> _RowTiles:
    BLOCK_H = triton.next_power_of_2(max(H, 1))
    BLOCK_M = max(1, min(_TILE_ELEMS // BLOCK_H, triton.next_power_of_2(max(N, 1))))
    return _RowTiles(BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H, num_warps=_num_warps(BLOCK_M * BLOCK_H))


def rms_norm_fwd(
    x: torch.Tensor, n_und: int, w: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """x [N, H] (unit column stride), w [2, H] contiguous -> y [N, H] in out_dtype."""
    _check_interpreter()
    N, H = x.shape
    y = torch.empty((N, H), dtype=out_dtype, device=x.device)
    if N == 0 or H == 0:
        return y
    tiles = _row_tiles(N, H)
    grid = (triton.cdiv(N, tiles.BLOCK_M),)
    _mot_rms_norm_fwd_kernel[grid](x, w, y, N, H, n_und, x.stride(0), y.stride(0), eps, **tiles._asdict())
    return y


def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, n_und: int, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx [N, H] in x.dtype, dw_und [H] fp32, dw_gen [H] fp32."""
    _check_interpreter()
    N, H = x.shape
    dx = torch.empty((N, H), dtype=x.dtype, device=x.device)
    seg = _segment_split(N, n_und, _target_programs(x.device))
    if N == 0 or H == 0:
        z = torch.zeros((H,), dtype=torch.float32, device=x.device)
        return dx, z, z.clone()
    tiles = _row_tiles(min(N, seg.rows_per_prog), H)
    dwp = torch.empty((seg.programs, H), dtype=torch.float32, device=x.device)
    _mot_rms_norm_bwd_kernel[(seg.programs,)](
        x, w, dy, dx, dwp, N, H, n_und, x.stride(0), dy.stride(0), dx.stride(0),
        seg.rows_per_prog, seg.progs_und, eps,
        **tiles._replace(num_warps=_bwd_warps(tiles.num_warps))._asdict(),
    )  # fmt: skip
    return (dx, *_per_expert(dwp, seg))


# ============================================================================================ q/k RMSNorm + RoPE
# Tiles are [BLOCK_T tokens, BLOCK_NH heads, BLOCK_HALF]: the head dim is handled as its two rotary
# halves, so rotate_half is plain arithmetic on registers. At BAGEL-7B sizes (28 q heads, D=128) a
# token fills a tile (BLOCK_T=1); small head counts take several tokens per program.
@triton.jit
def _load_cos_sin(
    COS,
    SIN,
    rows64,
    rmask,
    stride_cr,
    stride_sr,
    HALF: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """The tokens' cos/sin halves [BLOCK_T, 1, BLOCK_HALF] as fp32, rounded to the output dtype first
    (Qwen2's rotary embedding hands them over in the activations' dtype)."""
    cols = tl.arange(0, BLOCK_HALF)
    m = rmask[:, None] & (cols < HALF)[None, :]
    pc = COS + rows64[:, None] * stride_cr + cols[None, :]
    ps = SIN + rows64[:, None] * stride_sr + cols[None, :]
    c1 = tl.load(pc, mask=m, other=0.0).to(OUT_DTYPE).to(tl.float32)
    c2 = tl.load(pc + HALF, mask=m, other=0.0).to(OUT_DTYPE).to(tl.float32)
    s1 = tl.load(ps, mask=m, other=0.0).to(OUT_DTYPE).to(tl.float32)
    s2 = tl.load(ps + HALF, mask=m, other=0.0).to(OUT_DTYPE).to(tl.float32)
    return c1[:, None, :], c2[:, None, :], s1[:, None, :], s2[:, None, :]


@triton.jit
def _head_tile(
    rows64,
    rmask,
    NH,
    stride_r,
    stride_h,
    HALF: tl.constexpr,
    BLOCK_NH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Offsets [BLOCK_T, BLOCK_NH, BLOCK_HALF] of the first halves of the tokens' heads, and their mask."""
    heads = tl.arange(0, BLOCK_NH)
    cols = tl.arange(0, BLOCK_HALF)
    offs = rows64[:, None, None] * stride_r + heads[None, :, None] * stride_h + cols[None, None, :]
    m = rmask[:, None, None] & (heads < NH)[None, :, None] & (cols < HALF)[None, None, :]
    return offs, m


@triton.jit
def _head_rstd(x1, x2, rmask, NH, eps, D: tl.constexpr, BLOCK_NH: tl.constexpr):
    """1 / RMS of each (token, head) as [BLOCK_T, BLOCK_NH, 1]; exactly 0 on padded tokens and heads,
    so they contribute zero to every sum even with eps = 0 (rsqrt(0) = inf, inf * 0 = NaN)."""
    ok = rmask[:, None] & (tl.arange(0, BLOCK_NH) < NH)[None, :]
    r = tl.rsqrt((tl.sum(x1 * x1, axis=2) + tl.sum(x2 * x2, axis=2)) / D + eps)
    return tl.where(ok, r, 0.0)[:, :, None]


@triton.jit
def _norm_rope_fwd_heads(
    x, y, W, tok, NH, cs, eps, D: tl.constexpr, BLOCK_NH: tl.constexpr, BLOCK_HALF: tl.constexpr
):
    """Per-head RMSNorm of the tokens' heads with their expert's weight (W [2, D]), then rotary.
    ``x``, ``y``: (pointer, row stride, head stride) of the input and output heads; ``tok``: the
    tokens (64-bit rows, mask, expert); ``cs``: their cos/sin halves (:func:`_load_cos_sin`)."""
    X, stride_xr, stride_xh = x
    Y, stride_yr, stride_yh = y
    rows64, rmask, expert = tok
    c1, c2, s1, s2 = cs
    HALF: tl.constexpr = D // 2
    ox, m = _head_tile(rows64, rmask, NH, stride_xr, stride_xh, HALF, BLOCK_NH, BLOCK_HALF)
    x1 = tl.load(X + ox, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(X + ox + HALF, mask=m, other=0.0).to(tl.float32)
    rstd = _head_rstd(x1, x2, rmask, NH, eps, D, BLOCK_NH)
    cols = tl.arange(0, BLOCK_HALF)
    wm = rmask[:, None] & (cols < HALF)[None, :]
    pw = W + expert[:, None] * D + cols[None, :]
    w1 = tl.load(pw, mask=wm, other=0.0).to(tl.float32)[:, None, :]
    w2 = tl.load(pw + HALF, mask=wm, other=0.0).to(tl.float32)[:, None, :]
    # the normed head is a materialised tensor in Qwen2 (input dtype, then weight * -> output dtype)
    n1 = ((x1 * rstd).to(X.dtype.element_ty).to(tl.float32) * w1).to(Y.dtype.element_ty).to(tl.float32)
    n2 = ((x2 * rstd).to(X.dtype.element_ty).to(tl.float32) * w2).to(Y.dtype.element_ty).to(tl.float32)
    # rotate_half(n) = [-n2, n1]
    o1 = n1 * c1 - n2 * s1
    o2 = n2 * c2 + n1 * s2
    oy, _ = _head_tile(rows64, rmask, NH, stride_yr, stride_yh, HALF, BLOCK_NH, BLOCK_HALF)
    tl.store(Y + oy, o1.to(Y.dtype.element_ty), mask=m)
    tl.store(Y + oy + HALF, o2.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _mot_qk_norm_rope_fwd_kernel(
    Q, K, WQ, WK, COS, SIN, QO, KO,  # WQ, WK [2, D] contiguous (und, gen); COS, SIN [N, D] (row stride)
    N, HQ, HK, n_und,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_cr, stride_sr,
    stride_qor, stride_qoh, stride_kor, stride_koh, eps,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    expert = (rows >= n_und).to(tl.int32)
    cs = _load_cos_sin(COS, SIN, rows64, rmask, stride_cr, stride_sr, D // 2, QO.dtype.element_ty, BLOCK_HALF)
    tok = (rows64, rmask, expert)
    _norm_rope_fwd_heads(
        (Q, stride_qr, stride_qh), (QO, stride_qor, stride_qoh), WQ, tok, HQ, cs, eps, D, BLOCK_HQ, BLOCK_HALF
    )
    _norm_rope_fwd_heads(
        (K, stride_kr, stride_kh), (KO, stride_kor, stride_koh), WK, tok, HK, cs, eps, D, BLOCK_HK, BLOCK_HALF
    )


@triton.jit
def _norm_rope_bwd_heads(
    x, dy, dx, W, tok, NH, cs, eps, D: tl.constexpr, BLOCK_NH: tl.constexpr, BLOCK_HALF: tl.constexpr
):
    """Backward for the tokens' heads (one expert, weight W [D]). ``x``, ``dy``, ``dx``: (pointer,
    row stride, head stride) of the input heads, the output's gradient and the input's; ``tok``: the
    tokens (64-bit rows, mask); ``cs``: their cos/sin halves. Writes dx; returns the weight gradient
    halves [BLOCK_HALF] (summed over tokens and heads) and the cos/sin gradient halves
    [BLOCK_T, BLOCK_HALF] (summed over heads)."""
    X, stride_xr, stride_xh = x
    DY, stride_dyr, stride_dyh = dy
    DX, stride_dxr, stride_dxh = dx
    rows64, rmask = tok
    c1, c2, s1, s2 = cs
    HALF: tl.constexpr = D // 2
    ox, m = _head_tile(rows64, rmask, NH, stride_xr, stride_xh, HALF, BLOCK_NH, BLOCK_HALF)
    ody, _ = _head_tile(rows64, rmask, NH, stride_dyr, stride_dyh, HALF, BLOCK_NH, BLOCK_HALF)
    x1 = tl.load(X + ox, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(X + ox + HALF, mask=m, other=0.0).to(tl.float32)
    dy1 = tl.load(DY + ody, mask=m, other=0.0).to(tl.float32)
    dy2 = tl.load(DY + ody + HALF, mask=m, other=0.0).to(tl.float32)
    rstd = _head_rstd(x1, x2, rmask, NH, eps, D, BLOCK_NH)
    cols = tl.arange(0, BLOCK_HALF)
    cm = cols < HALF
    w1 = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)[None, None, :]
    w2 = tl.load(W + HALF + cols, mask=cm, other=0.0).to(tl.float32)[None, None, :]
    xh1 = x1 * rstd
    xh2 = x2 * rstd
    xr1 = xh1.to(X.dtype.element_ty).to(tl.float32)
    xr2 = xh2.to(X.dtype.element_ty).to(tl.float32)
    # the forward's normed head, rounded to the output dtype (that of the incoming gradient)
    n1 = (xr1 * w1).to(DY.dtype.element_ty).to(tl.float32)
    n2 = (xr2 * w2).to(DY.dtype.element_ty).to(tl.float32)
    # o1 = n1 c1 - n2 s1 ; o2 = n2 c2 + n1 s2
    dc1 = tl.sum(dy1 * n1, axis=1)
    dc2 = tl.sum(dy2 * n2, axis=1)
    ds1 = -tl.sum(dy1 * n2, axis=1)
    ds2 = tl.sum(dy2 * n1, axis=1)
    dn1 = dy1 * c1 + dy2 * s2
    dn2 = dy2 * c2 - dy1 * s1
    dw1 = tl.sum(tl.sum(dn1 * xr1, axis=1), axis=0)
    dw2 = tl.sum(tl.sum(dn2 * xr2, axis=1), axis=0)
    g1 = dn1 * w1
    g2 = dn2 * w2
    c = ((tl.sum(g1 * xh1, axis=2) + tl.sum(g2 * xh2, axis=2)) / D)[:, :, None]
    dx1 = (g1 - xh1 * c) * rstd
    dx2 = (g2 - xh2 * c) * rstd
    odx, _ = _head_tile(rows64, rmask, NH, stride_dxr, stride_dxh, HALF, BLOCK_NH, BLOCK_HALF)
    tl.store(DX + odx, dx1.to(DX.dtype.element_ty), mask=m)
    tl.store(DX + odx + HALF, dx2.to(DX.dtype.element_ty), mask=m)
    return dw1, dw2, dc1, dc2, ds1, ds2


@triton.jit
def _mot_qk_norm_rope_bwd_kernel(
    Q, K, WQ, WK, COS, SIN, DQO, DKO, DQ, DK, DWQP, DWKP, DCOS, DSIN,
    N, HQ, HK, n_und, rows_per_prog, progs_und,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_cr, stride_sr,
    stride_dqor, stride_dqoh, stride_dkor, stride_dkoh,
    stride_dqr, stride_dqh, stride_dkr, stride_dkh, eps,
    D: tl.constexpr, NEED_DCS: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    start, end, expert = _segment_bounds(pid, N, n_und, rows_per_prog, progs_und)
    HALF: tl.constexpr = D // 2
    cols = tl.arange(0, BLOCK_HALF)
    cm = cols < HALF
    dwq1 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    dwq2 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    dwk1 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    dwk2 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T)
        rmask = rows < end
        rows64 = rows.to(tl.int64)
        cs = _load_cos_sin(
            COS, SIN, rows64, rmask, stride_cr, stride_sr, HALF, DQO.dtype.element_ty, BLOCK_HALF
        )
        tok = (rows64, rmask)
        a1, a2, qc1, qc2, qs1, qs2 = _norm_rope_bwd_heads(
            (Q, stride_qr, stride_qh), (DQO, stride_dqor, stride_dqoh), (DQ, stride_dqr, stride_dqh),
            WQ + expert * D, tok, HQ, cs, eps, D, BLOCK_HQ, BLOCK_HALF,
        )  # fmt: skip
        b1, b2, kc1, kc2, ks1, ks2 = _norm_rope_bwd_heads(
            (K, stride_kr, stride_kh), (DKO, stride_dkor, stride_dkoh), (DK, stride_dkr, stride_dkh),
            WK + expert * D, tok, HK, cs, eps, D, BLOCK_HK, BLOCK_HALF,
        )  # fmt: skip
        dwq1 += a1
        dwq2 += a2
        dwk1 += b1
        dwk2 += b2
        if NEED_DCS:  # DCOS, DSIN [N, D] fp32 contiguous
            m2 = rmask[:, None] & cm[None, :]
            o2 = rows64[:, None] * D + cols[None, :]
            tl.store(DCOS + o2, qc1 + kc1, mask=m2)
            tl.store(DCOS + o2 + HALF, qc2 + kc2, mask=m2)
            tl.store(DSIN + o2, qs1 + ks1, mask=m2)
            tl.store(DSIN + o2 + HALF, qs2 + ks2, mask=m2)
    p64 = pid.to(tl.int64) * D
    tl.store(DWQP + p64 + cols, dwq1, mask=cm)
    tl.store(DWQP + p64 + HALF + cols, dwq2, mask=cm)
    tl.store(DWKP + p64 + cols, dwk1, mask=cm)
    tl.store(DWKP + p64 + HALF + cols, dwk2, mask=cm)


class _QKTiles(NamedTuple):
    """Tile of the q/k kernels: ``BLOCK_T`` tokens, their q and k heads padded to powers of two, the
    half head dim padded likewise."""

    BLOCK_T: int
    BLOCK_HQ: int
    BLOCK_HK: int
    BLOCK_HALF: int
    num_warps: int


def _qk_tiles(N: int, HQ: int, HK: int, D: int) -> _QKTiles:
    """The tile for up to N tokens per program."""
    BLOCK_HQ = triton.next_power_of_2(max(HQ, 1))
    BLOCK_HK = triton.next_power_of_2(max(HK, 1))
    BLOCK_HALF = triton.next_power_of_2(max(D // 2, 1))
    per_token = 2 * max(BLOCK_HQ, BLOCK_HK) * BLOCK_HALF
    BLOCK_T = max(1, min(_TILE_ELEMS // per_token, triton.next_power_of_2(max(N, 1))))
    return _QKTiles(
        BLOCK_T=BLOCK_T,
        BLOCK_HQ=BLOCK_HQ,
        BLOCK_HK=BLOCK_HK,
        BLOCK_HALF=BLOCK_HALF,
        num_warps=_num_warps(BLOCK_T * per_token),
    )


class QKArgs(NamedTuple):
    """The q/k norm + RoPE launchers' inputs: q ``[N, HQ, D]``, k ``[N, HK, D]`` (unit last stride),
    the experts' weights stacked ``wq``/``wk`` ``[2, D]`` contiguous (und, gen), cos/sin ``[N, D]``
    (unit last stride)."""

    q: torch.Tensor
    k: torch.Tensor
    n_und: int
    wq: torch.Tensor
    wk: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    eps: float


def qk_norm_rope_fwd(a: QKArgs, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (q_out, k_out) contiguous in out_dtype."""
    _check_interpreter()
    q, k, cos, sin = a.q, a.k, a.cos, a.sin
    N, HQ, D = q.shape
    HK = k.shape[1]
    qo = torch.empty((N, HQ, D), dtype=out_dtype, device=q.device)
    ko = torch.empty((N, HK, D), dtype=out_dtype, device=q.device)
    if N == 0 or D == 0:
        return qo, ko
    tiles = _qk_tiles(N, HQ, HK, D)
    _mot_qk_norm_rope_fwd_kernel[(triton.cdiv(N, tiles.BLOCK_T),)](
        q, k, a.wq, a.wk, cos, sin, qo, ko, N, HQ, HK, a.n_und,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), a.eps,
        D=D, **tiles._asdict(),
    )  # fmt: skip
    return qo, ko


def qk_norm_rope_bwd(
    dqo: torch.Tensor, dko: torch.Tensor, a: QKArgs, need_dcs: bool
) -> tuple[torch.Tensor, ...]:
    """dqo/dko: gradients of the outputs (their dtype is the forward's output dtype).
    -> dq [N, HQ, D] (q.dtype), dk, dwq_und, dwq_gen, dwk_und, dwk_gen [D] fp32, dcos/dsin [N, D] fp32 (or [0])."""
    _check_interpreter()
    q, k, cos, sin = a.q, a.k, a.cos, a.sin
    N, HQ, D = q.shape
    HK = k.shape[1]
    dev = q.device
    dq = torch.empty((N, HQ, D), dtype=q.dtype, device=dev)
    dk = torch.empty((N, HK, D), dtype=k.dtype, device=dev)
    shape_cs = (N, D) if need_dcs else (0,)
    dcos = torch.empty(shape_cs, dtype=torch.float32, device=dev)
    dsin = torch.empty(shape_cs, dtype=torch.float32, device=dev)
    seg = _segment_split(N, a.n_und, _target_programs(dev))
    if N == 0 or D == 0:
        z = [torch.zeros((D,), dtype=torch.float32, device=dev) for _ in range(4)]
        return dq, dk, *z, dcos, dsin
    dwqp = torch.empty((seg.programs, D), dtype=torch.float32, device=dev)
    dwkp = torch.empty((seg.programs, D), dtype=torch.float32, device=dev)
    tiles = _qk_tiles(min(N, seg.rows_per_prog), HQ, HK, D)
    _mot_qk_norm_rope_bwd_kernel[(seg.programs,)](
        q, k, a.wq, a.wk, cos, sin, dqo, dko, dq, dk, dwqp, dwkp, dcos, dsin,
        N, HQ, HK, a.n_und, seg.rows_per_prog, seg.progs_und,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        dqo.stride(0), dqo.stride(1), dko.stride(0), dko.stride(1),
        dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), a.eps,
        D=D, NEED_DCS=need_dcs, **tiles._replace(num_warps=_bwd_warps(tiles.num_warps))._asdict(),
    )  # fmt: skip
    return (dq, dk, *_per_expert(dwqp, seg), *_per_expert(dwkp, seg), dcos, dsin)


# ============================================================================================ SwiGLU
@triton.jit
def _swiglu_tile(G, U, N, INTER, stride_g, stride_u, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's ``[BLOCK_M, BLOCK_N]`` tile: 64-bit row offsets ``[BLOCK_M, 1]``, columns
    ``[1, BLOCK_N]``, its mask, and gate and up loaded as fp32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    m = (rows < N)[:, None] & (cols < INTER)
    rows64 = rows.to(tl.int64)[:, None]
    g = tl.load(G + rows64 * stride_g + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + rows64 * stride_u + cols, mask=m, other=0.0).to(tl.float32)
    return rows64, cols, m, g, u


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y,  # gate, up [N, INTER] (row strides), Y [N, INTER] contiguous
    N, INTER, stride_g, stride_u, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows64, cols, m, g, u = _swiglu_tile(G, U, N, INTER, stride_g, stride_u, BLOCK_M, BLOCK_N)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + rows64 * stride_y + cols, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(
    G, U, DY, DG, DU,
    N, INTER, stride_g, stride_u, stride_dy, stride_dg, stride_du,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows64, cols, m, g, u = _swiglu_tile(G, U, N, INTER, stride_g, stride_u, BLOCK_M, BLOCK_N)
    dy = tl.load(DY + rows64 * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * silu
    tl.store(DG + rows64 * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=m)
    tl.store(DU + rows64 * stride_du + cols, du.to(DU.dtype.element_ty), mask=m)


class _Launch2D(NamedTuple):
    """Grid and tile of the 2-D elementwise kernels (row blocks x column blocks)."""

    grid: tuple[int, int]
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int

    def config(self) -> dict:
        """The launch's compile-time keywords."""
        return {"BLOCK_M": self.BLOCK_M, "BLOCK_N": self.BLOCK_N, "num_warps": self.num_warps}


def _swiglu_launch(N: int, INTER: int) -> _Launch2D:
    BLOCK_N = min(triton.next_power_of_2(max(INTER, 1)), _SWIGLU_TILE_ELEMS)
    BLOCK_M = max(1, min(_SWIGLU_TILE_ELEMS // BLOCK_N, triton.next_power_of_2(max(N, 1))))
    grid = (triton.cdiv(N, BLOCK_M), triton.cdiv(INTER, BLOCK_N))
    return _Launch2D(grid=grid, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=_num_warps(BLOCK_M * BLOCK_N))


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check_interpreter()
    N, INTER = gate.shape
    y = torch.empty((N, INTER), dtype=gate.dtype, device=gate.device)
    if N == 0 or INTER == 0:
        return y
    launch = _swiglu_launch(N, INTER)
    _swiglu_fwd_kernel[launch.grid](
        gate, up, y, N, INTER, gate.stride(0), up.stride(0), y.stride(0), **launch.config()
    )
    return y


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_interpreter()
    N, INTER = gate.shape
    dg = torch.empty((N, INTER), dtype=gate.dtype, device=gate.device)
    du = torch.empty((N, INTER), dtype=up.dtype, device=up.device)
    if N == 0 or INTER == 0:
        return dg, du
    launch = _swiglu_launch(N, INTER)
    _swiglu_bwd_kernel[launch.grid](
        gate, up, dy, dg, du, N, INTER,
        gate.stride(0), up.stride(0), dy.stride(0), dg.stride(0), du.stride(0),
        **launch.config(),
    )  # fmt: skip
    return dg, du


# ============================================================================================ row permutation
@triton.jit
def _permute_rows_kernel(
    X,
    IDX,
    Y,
    N,
    C,
    stride_x,
    stride_y,
    SCATTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """SCATTER=False: Y[i] = X[IDX[i]] (gather). SCATTER=True: Y[IDX[i]] = X[i]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < N
    m = rmask[:, None] & (cols < C)[None, :]
    idx = tl.load(IDX + rows, mask=rmask, other=0).to(tl.int64)
    if SCATTER:
        src = rows.to(tl.int64)
        dst = idx
    else:
        src = idx
        dst = rows.to(tl.int64)
    v = tl.load(X + src[:, None] * stride_x + cols[None, :], mask=m, other=0.0)
    tl.store(Y + dst[:, None] * stride_y + cols[None, :], v, mask=m)


def permute_rows_launch(x: torch.Tensor, index: torch.Tensor, scatter: bool) -> torch.Tensor:
    """x [N, C] (unit column stride), index [N] int32/int64 contiguous, a permutation (trusted)."""
    _check_interpreter()
    N, C = x.shape
    y = torch.empty((N, C), dtype=x.dtype, device=x.device)
    if N == 0 or C == 0:
        return y
    BLOCK_C = min(triton.next_power_of_2(C), _PERMUTE_MAX_COLS)
    BLOCK_M = max(1, min(_TILE_ELEMS // BLOCK_C, triton.next_power_of_2(N)))
    grid = (triton.cdiv(N, BLOCK_M), triton.cdiv(C, BLOCK_C))
    _permute_rows_kernel[grid](
        x, index, y, N, C, x.stride(0), y.stride(0),
        SCATTER=scatter, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, num_warps=_num_warps(BLOCK_M * BLOCK_C),
    )  # fmt: skip
    return y


# ============================================================================================ AOT compile specs
class _Layout(NamedTuple):
    """Sizes of one model layout the launchers are compiled for."""

    dtype: torch.dtype
    tokens: int
    n_und: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    need_dcs: bool = False  # the q/k backward also computes cos/sin gradients


# Qwen2's RMSNorm eps (a runtime argument: any value compiles the same kernel).
_EPS = 1e-6
# BAGEL-7B's language model in bf16; a 16k pack cut to a length that is not a multiple of 16.
_BAGEL_7B = _Layout(
    torch.bfloat16, tokens=16381, n_und=9000, hidden=3584, q_heads=28, kv_heads=4, head_dim=128,
    intermediate=18944,
)  # fmt: skip
# fp16 at small odd sizes where no size is a multiple of 16, with cos/sin gradients.
_ODD = _Layout(
    torch.float16, tokens=1001, n_und=333, hidden=97, q_heads=3, kv_heads=1, head_dim=72, intermediate=200,
    need_dcs=True,
)  # fmt: skip


def _run_launchers(c: _Layout) -> None:
    """Every launcher on meta tensors laid out as the model hands them over: hidden states
    [N, hidden], q/k head views of the projection outputs, cos/sin [N, D] in the model dtype, the
    experts' weights stacked [2, ...], gate/up [N, inter], an int64 row permutation."""
    meta = torch.device("meta")
    n, d = c.tokens, c.head_dim

    def empty(*shape, dt=c.dtype):
        return torch.empty(shape, dtype=dt, device=meta)

    x, w = empty(n, c.hidden), empty(2, c.hidden)
    y = rms_norm_fwd(x, c.n_und, w, _EPS, c.dtype)
    rms_norm_bwd(torch.empty_like(y), x, c.n_und, w, _EPS)
    q = empty(n, c.q_heads * d).view(n, c.q_heads, d)
    k = empty(n, c.kv_heads * d).view(n, c.kv_heads, d)
    qk = QKArgs(q, k, c.n_und, wq=empty(2, d), wk=empty(2, d), cos=empty(n, d), sin=empty(n, d), eps=_EPS)
    qo, ko = qk_norm_rope_fwd(qk, c.dtype)
    qk_norm_rope_bwd(torch.empty_like(qo), torch.empty_like(ko), qk, c.need_dcs)
    gate, up = empty(n, c.intermediate), empty(n, c.intermediate)
    h = swiglu_fwd(gate, up)
    swiglu_bwd(torch.empty_like(h), gate, up)
    perm = torch.empty((n,), dtype=torch.int64, device=meta)
    permute_rows_launch(x, perm, scatter=False)
    permute_rows_launch(x, perm, scatter=True)


def compile_cases(arch: int) -> list[tuple]:
    """``(tag, thunk, extra_options)`` per layout compiled for ``arch``: BAGEL-7B's language model in
    bf16 (hidden 3584, 28/4 heads of 128, intermediate 18944; a 16k pack cut to a length that is not
    a multiple of 16) on every architecture; on sm_90 also cos/sin gradients and fp16 at small odd
    sizes (hidden 97, 3/1 heads of 72, intermediate 200), where no size is a multiple of 16."""
    cases = [("{kernel}[bf16,BAGEL-7B]", functools.partial(_run_launchers, _BAGEL_7B), {})]
    if arch >= 90:
        cases.append(("{kernel}[fp16,odd,dcs]", functools.partial(_run_launchers, _ODD), {}))
    return cases


def compile_specs(arch: int = 90) -> list[tuple]:
    """Specs of every launch of :func:`compile_cases` for ``arch`` (format of
    :mod:`bagel_kernels.compile_check`), derived from the launchers as they run on that GPU."""
    from .compile_check import specs_from_launches

    specs = specs_from_launches(compile_cases(arch), arch)
    # the gather and the scatter are one kernel with a constexpr switch: tell them apart by name
    out, seen = [], {}
    for name, fn, sig, const, opts in specs:
        if fn is _permute_rows_kernel:
            name = name.replace(
                "permute_rows[", f"permute_rows[{'scatter' if const['SCATTER'] else 'gather'},"
            )
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", fn, sig, const, opts))
    return out

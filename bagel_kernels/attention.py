"""``packed_attention``: attention over a packed BAGEL sequence under a :class:`PackedMask`.

Shapes (T = tokens actually present, N = mask.total_len >= T):
    q:   [T, Hq, D]
    k,v: [T, Hkv, D]      Hq % Hkv == 0 (GQA, K/V never repeated in memory by the kernel)
    out: [T, Hq, D]

Backends declare what they support; ``backend="auto"`` takes the first one, in priority order for
the device, that accepts the inputs, and a refusal lists every backend's reasons.

    name     devices      dtypes               notes
    triton   cuda (cpu*)  fp16, bf16, fp32     our FlashAttention-2 style kernels (*CPU only under TRITON_INTERPRET=1)
    flex     cuda, cpu    fp16, bf16, fp32+    FlexAttention (compiled once for all lengths on CUDA), BlockMask from the
                                               mask's tile tables, mask_mod on partial tiles only
    sdpa     any          fp16, bf16, fp32+    reference: per-sample SDPA with the sample's dense mask
                                               (inside torch.compile: one SDPA over the pack's dense mask)
    (+ float64 too, for references)

This module holds the public function, the family's registry (:data:`ATTENTION`: what each backend
runs on, whether it reads the row index itself, what it prepares from a mask, where its compile specs
are) and the two reference backends (sdpa, flex). The Triton backend's whole chain (kernels,
launchers, block tables, the registered ops ``bagel_kernels::packed_attention_fwd``/``_bwd`` and
:func:`triton_packed_attention`) lives in :mod:`bagel_kernels.attention_triton`, imported on first use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .checks import as_bool, as_int, check_softmax_scale
from .dispatch import Backend, Family, Request
from .mask import PackedMask, derived

__all__ = [
    "packed_attention",
    "prepare_attention",
    "available_backends",
    "ATTENTION",
    "BACKENDS",
    "MAX_HEAD_DIM",
    "flex_block_mask",
    "flex_kv_blocks",
    "flex_compiled",
]

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # fp64: references only


# ---------------------------------------------------------------------------------------------- sdpa
def _sdpa(q, k, v, vis, scale: float, deterministic: bool) -> torch.Tensor:
    """SDPA on ``[1, H, L, D]`` tensors with a bool mask. ``deterministic``: SDPA's math kernel (matmuls
    and a softmax) on K/V repeated per query head by ``expand`` (its backward is a plain sum), since
    the memory-efficient kernel's backward accumulates with atomics on CUDA and a fused kernel may
    accumulate GQA gradients across threads."""
    gqa = q.shape[1] != k.shape[1]
    if not deterministic:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=vis, scale=scale, enable_gqa=gqa)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if gqa:
        r = q.shape[1] // k.shape[1]  # query head h reads key/value head h // r
        k = k[:, :, None].expand(-1, -1, r, -1, -1).flatten(1, 2)
        v = v[:, :, None].expand(-1, -1, r, -1, -1).flatten(1, 2)
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=vis, scale=scale)


def _sdpa_forward(q, k, v, mask: PackedMask, scale: float, deterministic: bool) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _sdpa_dense(q, k, v, mask, scale, deterministic)
    outs = []
    kv_lo, kv_hi, _ = mask.vectors()
    for s, e in mask.sample_bounds():
        if e <= s:
            continue
        L = e - s
        r = torch.arange(L, device=q.device, dtype=torch.int32)[:, None]
        vis = ((kv_lo[s:e] - s)[None, :] <= r) & (r < (kv_hi[s:e] - s)[None, :])  # [L, L]
        # rows that see no key: attend a dummy key, then zero the row (SDPA would give NaN); no
        # branch on the data, so the loop has no host sync and traces under torch.compile
        dead = ~vis.any(dim=1)
        vis = vis | dead[:, None]
        o = _sdpa(
            q[s:e].transpose(0, 1).unsqueeze(0),  # [1, Hq, L, D]
            k[s:e].transpose(0, 1).unsqueeze(0),
            v[s:e].transpose(0, 1).unsqueeze(0),
            vis,
            scale,
            deterministic,
        )[0].transpose(0, 1)  # [L, Hq, D]
        o = o.masked_fill(dead[:, None, None], 0.0)
        outs.append(o)
    return torch.cat(outs, dim=0)


def _sdpa_dense(q, k, v, mask: PackedMask, scale: float, deterministic: bool = False) -> torch.Tensor:
    """The sdpa backend inside a ``torch.compile`` region: ONE SDPA call over the whole pack with the
    dense ``[T, T]`` mask computed in the graph from the interval vectors. The per-sample loop above
    reads ``mask.sample_lens`` in Python, so a compiled graph would specialise on (and recompile for)
    every pack's sample layout; this form depends only on tensors, so one graph serves every pack.
    Memory is O(T^2) per head (it is the reference backend; use triton for long packs)."""
    T = q.shape[0]
    r = torch.arange(T, device=q.device, dtype=torch.int32)[:, None]
    kv_lo, kv_hi, _ = mask.vectors()
    vis = (kv_lo[None, :] <= r) & (r < kv_hi[None, :])  # [T, T]
    dead = ~vis.any(dim=1)  # rows that see no key: a dummy key, then zeroed (as in the loop)
    vis = vis | dead[:, None]
    o = _sdpa(
        q.transpose(0, 1).unsqueeze(0),  # [1, Hq, T, D]
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        vis,
        scale,
        deterministic,
    )[0].transpose(0, 1)  # [T, Hq, D]
    return o.masked_fill(dead[:, None, None], 0.0)


# ---------------------------------------------------------------------------------------------- flex
FLEX_BLOCK = 128  # FlexAttention's sparse block size (query and key tiles of the BlockMask)
_FLEX_COMPILED: dict = {}


def flex_block_mask(mask: PackedMask, block_size: int = FLEX_BLOCK, compile: bool | None = None):
    """FlexAttention BlockMask built the way upstream BAGEL training builds it: ``create_block_mask``
    over a mask_mod that reads the interval vectors, evaluated on every (query, key) pair.

    ``compile`` (default: on CUDA) builds it with ``_compile=True``, as upstream does. The ``flex``
    backend does not use this (it reads :meth:`PackedMask.block_tables`, see
    :func:`flex_kv_blocks`); the benchmarks time it as the per-pack cost upstream pays."""
    from torch.nn.attention.flex_attention import create_block_mask

    lo, hi, _ = mask.vectors()

    def mask_mod(b, h, q_idx, kv_idx):
        return (lo[kv_idx] <= q_idx) & (q_idx < hi[kv_idx])

    N = mask.total_len
    if compile is None:
        compile = mask.device.type == "cuda"
    return create_block_mask(
        mask_mod, None, None, N, N, device=mask.device, BLOCK_SIZE=block_size, _compile=compile
    )


def flex_kv_blocks(mask: PackedMask, block_size: int = FLEX_BLOCK) -> tuple[torch.Tensor, ...]:
    """The pack's block structure in FlexAttention's ``BlockMask.from_kv_blocks`` form, read off the
    mask's own tile tables (no mask_mod evaluation, no compilation; cached on the mask):

        kv_num_blocks [1, 1, M]       partial key blocks per query block (the mask_mod runs on them)
        kv_indices    [1, 1, M, Nb]   their ids, left-aligned (the rest of the row is 0 and unread)
        full_kv_num_blocks, full_kv_indices   the same for full tiles (no mask_mod)

    with ``M = Nb = ceil(total_len / block_size)``."""
    key = ("flex_kv", int(block_size))
    cache = derived(mask)
    hit = cache.get(key)
    if hit is not None:
        return hit
    t = mask.block_tables(block_size, block_size)
    dev = mask.device
    ptr = t.q_kv_ptr.long()
    m_ids = torch.repeat_interleave(torch.arange(t.num_m, device=dev), ptr[1:] - ptr[:-1])
    n_ids = t.q_kv_idx.long()
    full = t.q_kv_full.bool()
    out = []
    for sel in (~full, full):  # entries are sorted by (m, n), so each kind stays in key order
        m_sel, n_sel = m_ids[sel], n_ids[sel]
        counts = torch.bincount(m_sel, minlength=t.num_m)
        first = torch.cumsum(counts, 0) - counts
        slot = torch.arange(m_sel.numel(), device=dev) - first[m_sel]
        idx = torch.zeros((t.num_m, t.num_n), dtype=torch.int32, device=dev)
        idx[m_sel, slot] = n_sel.to(torch.int32)
        out += [counts.to(torch.int32).view(1, 1, t.num_m), idx.view(1, 1, t.num_m, t.num_n)]
    cache[key] = tuple(out)
    return cache[key]


def _flex_call(q, k, v, kv_lo, kv_hi, kv_num, kv_idx, full_num, full_idx, scale: float, gqa: bool):
    """FlexAttention over ``[1, H, T, D]`` inputs with the BlockMask assembled from the tile tables
    here, so that under ``torch.compile(dynamic=True)`` the tables and interval vectors are graph
    inputs of symbolic length: one compiled graph serves packs of every length (no recompilation,
    hence no fall back to eager flex after dynamo's recompile limit)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx_):
        return (kv_lo[kv_idx_] <= q_idx) & (q_idx < kv_hi[kv_idx_])

    T = q.shape[2]
    block_mask = BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(T, T)
    )
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def flex_compiled() -> Callable:
    """:func:`_flex_call` compiled once with dynamic shapes (shared by the backend and benchmarks)."""
    if "fn" not in _FLEX_COMPILED:
        _FLEX_COMPILED["fn"] = torch.compile(_flex_call, dynamic=True)
    return _FLEX_COMPILED["fn"]


def _flex_forward(q, k, v, mask: PackedMask, scale: float, deterministic: bool) -> torch.Tensor:
    # CUDA: the compiled kernels; CPU: eager flex (forward only there), same BlockMask
    fn = flex_compiled() if q.device.type == "cuda" else _flex_call
    out = fn(
        q.transpose(0, 1).unsqueeze(0),  # [1, Hq, T, D]
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        *mask.vectors()[:2],
        *flex_kv_blocks(mask),
        scale,
        q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def _flex_reasons(req: Request) -> list[str]:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return ["FlexAttention is not available in this torch"]
    reasons = []
    if req.device.type == "meta":
        reasons.append(
            "FlexAttention cannot run on meta tensors (its block mask is built and compiled per device)"
        )
    if req.device.type == "cpu" and req.backward:
        reasons.append("FlexAttention has no backward on CPU")
    if req.device.type == "cuda" and req.sizes["head_dim"] < 16:
        reasons.append(f"head dim {req.sizes['head_dim']} is below the compiled FlexAttention minimum of 16")
    return reasons


# ---------------------------------------------------------------------------------------------- triton
def _triton_reasons(req: Request) -> list[str]:
    try:
        from . import attention_triton  # noqa: F401
    except ImportError as exc:
        return [f"the Triton kernels cannot be imported ({exc})"]
    return []


def _triton_prepare(mask: PackedMask, req: Request) -> None:
    # (imported here: the module imports triton, and its registered ops are registered on first use)
    from .attention_triton import default_config, prepare_mask

    prepare_mask(mask, default_config(req.device, req.dtype, req.sizes["head_dim"]))


def _flex_prepare(mask: PackedMask, req: Request) -> None:
    flex_kv_blocks(mask)


def _triton_forward(q, k, v, mask: PackedMask, scale: float, deterministic: bool) -> torch.Tensor:
    from .attention_triton import run  # validated by packed_attention: the unchecked entry

    return run(q, k, v, mask, scale, deterministic)


def __getattr__(name: str):
    # the Triton backend's public function lives with its kernels and ops (importing triton on first use)
    if name == "triton_packed_attention":
        from .attention_triton import triton_packed_attention

        return triton_packed_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------- registry
# Each backend's declaration (bagel_kernels.dispatch); ``impl`` is its forward, ``(q, k, v, mask, scale,
# deterministic) -> out``, and the Triton one reads rows through ``mask.row_index`` itself.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

ATTENTION = Family(
    "attention",
    {
        "triton": Backend(
            "triton",
            devices=("cuda",),
            dtypes=_KERNEL_DTYPES,  # float64 is for the reference backends only
            limits={"head_dim": (1, MAX_HEAD_DIM)},
            interpreted=True,
            hook=_triton_reasons,
            impl=_triton_forward,
            row_index=True,  # reads rows through mask.row_index inside the kernel
            prepare=_triton_prepare,
            compile_specs="bagel_kernels.attention_triton",
        ),
        "flex": Backend(
            "flex", dtypes=_DTYPES, hook=_flex_reasons, impl=_flex_forward, prepare=_flex_prepare
        ),
        "sdpa": Backend("sdpa", dtypes=_DTYPES, impl=_sdpa_forward),
    },
    # triton on CPU is interpretation (slow), so "auto" never takes it there
    auto={"cuda": ("triton", "flex", "sdpa"), "*": ("sdpa", "flex")},
)
BACKENDS = ATTENTION.backends  # name -> Backend, in declaration order


def _request(device, dtype: torch.dtype, head_dim: int, backward: bool = False) -> Request:
    return Request(torch.device(device), dtype, {"head_dim": head_dim}, backward)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends usable on ``device`` for ordinary inputs, in "auto" priority order (none on a CUDA
    device that is not visible)."""
    device = torch.device(device)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            return []
    return ATTENTION.available(_request(device, torch.float32, 64))


def prepare_attention(
    mask: PackedMask, device: torch.device, dtype: torch.dtype, head_dim: int, backend: str = "auto"
) -> str:
    """Build now what ``backend`` derives from ``mask`` (Triton block tables and launch orders, the
    FlexAttention block mask), cached on the mask, so that a ``torch.compile`` region calling
    :func:`packed_attention` with this mask only reads them (building them has data-dependent
    shapes). Returns the backend that "auto" resolves to for such inputs (a named backend that
    refuses them is returned unprepared: :func:`packed_attention` reports why)."""
    ATTENTION.check_name(backend)
    if not isinstance(mask, PackedMask):
        raise ValueError(f"mask must be a PackedMask, got {type(mask).__name__}")
    head_dim = as_int(head_dim, "head_dim")
    req = _request(device, dtype, head_dim)
    if backend == "auto":
        backend = ATTENTION.choose(backend, req).name
    be = ATTENTION.backends[backend]
    if be.reasons(req):
        return backend
    if be.prepare is not None:
        be.prepare(mask, req)
    return backend


def _validate(q, k, v, mask) -> None:
    if not isinstance(mask, PackedMask):
        raise ValueError(f"mask must be a PackedMask, got {type(mask).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor")
        if t.dim() != 3:
            raise ValueError(f"{name} must be [T, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(
                f"{name} has dtype {t.dtype}; supported: fp16, bf16, fp32 (fp64 on the reference backends)"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
    T, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[0] != T:
        raise ValueError(f"k/v have {k.shape[0]} tokens but q has {T}")
    if k.shape[2] != D:
        raise ValueError(f"k/v head dim {k.shape[2]} differs from q head dim {D}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if not 0 < D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} is unsupported (1..{MAX_HEAD_DIM})")
    if T > mask.total_len:
        raise ValueError(f"q has {T} tokens but the mask covers only total_len={mask.total_len}")
    if mask.has_row_index and T != mask.total_len:
        raise ValueError(f"mask carries a row_index over {mask.total_len} tokens but q has {T}")


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: PackedMask,
    softmax_scale: float | None = None,
    backend: str = "auto",
    *,
    deterministic: bool = False,
) -> torch.Tensor:
    """Masked attention over a packed sequence: ``softmax(scale * q k^T + mask) v`` per head.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]`` with ``Hq % Hkv == 0`` and ``D <= 256``.
        mask: the pack's :class:`PackedMask`; ``T`` may be less than ``mask.total_len`` when the rows
            beyond ``T`` are whole trailing splits (the pad sample of flex-style packing). If the mask
            carries a ``row_index`` (:meth:`PackedMask.with_row_index`), token ``i`` is row
            ``row_index[i]`` of q, k, v and of the output.
        softmax_scale: defaults to ``D ** -0.5``; must be finite and non-negative (NaN, inf or a
            negative scale raise the same ValueError on every backend).
        backend: ``"auto"``, ``"triton"``, ``"flex"`` or ``"sdpa"``.
        deterministic: True promises a bit-identical backward on repeated runs: the Triton kernels
            run their two-program backward (no atomics), FlexAttention's backward is two-pass (no
            atomics), and the sdpa backend runs SDPA's math kernel (see ``_sdpa``). False lets a backend
            take a faster non-deterministic backward where it has one (Triton: the one-pass backward
            with atomic dQ, where its configuration selects it).

    Returns ``[T, Hq, D]`` in q's dtype. Rows that see no key are zero (with zero gradients). ``T = 0``
    gives an empty ``[0, Hq, D]`` on every backend, with a working backward (empty gradients).

    Non-finite values: a NaN or Inf in one sample's V can reach the rows of other samples that share
    a tile with it on the ``triton`` and ``flex`` backends (a masked score's probability is exactly 0,
    but ``0 * inf`` and ``0 * NaN`` are NaN in the tile's ``P @ V``; FlexAttention behaves the same).
    The ``sdpa`` backend runs each sample on its own and keeps such values inside their sample
    (inside ``torch.compile`` it runs one SDPA over the pack and shares that behaviour). Keep
    activations finite (as training does) or use eager ``sdpa`` to localise a bad sample.
    """
    # the one check of the arguments on this path (the backends trust it; the Triton op checks again)
    _validate(q, k, v, mask)
    ATTENTION.check_name(backend)
    deterministic = as_bool(deterministic, "deterministic")
    T = q.shape[0]
    if T < mask.total_len:
        mask = mask.truncated(T)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else check_softmax_scale(softmax_scale)
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    be = ATTENTION.choose(backend, _request(q.device, q.dtype, q.shape[-1], backward)).backend
    if T == 0:
        # no tokens: the same empty [0, Hq, D] on every backend, still attached to q, k and v so that
        # a backward runs and gives them (empty) zero gradients
        return q * 0 + (k.sum() + v.sum()).to(q.dtype)
    idx = mask.vectors().row_index
    if idx is not None and not be.row_index:
        gidx = idx.long()
        out = be.impl(
            q.index_select(0, gidx),
            k.index_select(0, gidx),
            v.index_select(0, gidx),
            mask,
            scale,
            deterministic,
        )
        return torch.empty_like(out).index_copy(0, gidx, out)
    return be.impl(q, k, v, mask, scale, deterministic)

"""Pure-PyTorch references and the shared math of BAGEL, written once.

These functions define what the kernels must compute; the model (:mod:`bagel`), the kernels' torch
paths, ``python -m bagel_kernels.check``, the benchmarks and the tests import them from here.

    attention     dense_mask_from_rule, attention_reference
    Qwen2 math    qwen2_rms_norm, rotate_half, apply_rope, rope_inv_freq, rope_tables
    MoT routing   gather_scatter (upstream's per-expert routing of one op), mot_rms_norm_reference,
                  mot_qk_norm_rope_reference, swiglu_reference, mot_linear_reference, permute_rows_reference
    patches       patchify (BAGEL's patch order), patch_grid_view, patchify_images,
                  patch_embed_reference, patch_embed_images_reference

The C++ extension (``csrc/patch_embed.h``) states the same patch order in C++; the tests compare its
kernels against :func:`patchify` bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .mask import PackedMask

__all__ = [
    "dense_mask_from_rule",
    "attention_reference",
    "qwen2_rms_norm",
    "rotate_half",
    "apply_rope",
    "rope_inv_freq",
    "rope_tables",
    "gather_scatter",
    "mot_rms_norm_reference",
    "mot_qk_norm_rope_reference",
    "swiglu_reference",
    "mot_linear_reference",
    "permute_rows_reference",
    "patchify",
    "patch_grid_view",
    "patchify_images",
    "patch_embed_reference",
    "patch_embed_images_reference",
]


def dense_mask_from_rule(
    sample_lens: Sequence[int], split_lens: Sequence[int], attn_modes: Sequence[str]
) -> torch.Tensor:
    """``[N, N]`` bool mask written directly from the rule of DESIGN.md section 3 (independent of the
    interval form): within a sample, q sees k iff (q >= k or same full/noise split) and not (k in a
    noise split and q outside it); never across samples."""
    N = int(sum(sample_lens))
    sample_id = torch.repeat_interleave(
        torch.arange(len(sample_lens)), torch.tensor(list(sample_lens), dtype=torch.long)
    )
    split_id = torch.repeat_interleave(
        torch.arange(len(split_lens)), torch.tensor(list(split_lens), dtype=torch.long)
    )
    mode = [attn_modes[i] for i in split_id.tolist()]
    is_noise = torch.tensor([m == "noise" for m in mode], dtype=torch.bool)
    is_block = torch.tensor([m in ("full", "noise") for m in mode], dtype=torch.bool)
    idx = torch.arange(N)
    q = idx[:, None]
    k = idx[None, :]
    same_sample = sample_id[:, None] == sample_id[None, :]
    same_split = split_id[:, None] == split_id[None, :]
    base = (q >= k) | (same_split & is_block[None, :])
    hidden = is_noise[None, :] & ~same_split
    return same_sample & base & ~hidden


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: PackedMask | torch.Tensor,
    softmax_scale: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Dense masked attention in ``compute_dtype`` (float64 by default), result in ``compute_dtype``.

    q: [T, Hq, D]; k, v: [T, Hkv, D]; mask: a PackedMask (first T tokens used) or a ``[T, T]`` bool.
    Rows that see no key give zeros. Differentiable (use it for reference gradients)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    dense = mask.truncated(T).to_dense() if isinstance(mask, PackedMask) else mask
    dense = dense.to(q.device)
    qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))
    rep = Hq // Hkv
    kf = kf.repeat_interleave(rep, dim=1)
    vf = vf.repeat_interleave(rep, dim=1)
    s = torch.einsum("qhd,khd->hqk", qf, kf) * scale
    s = s.masked_fill(~dense[None], float("-inf"))
    alive = dense.any(dim=1)  # [T]
    s = torch.where(alive[None, :, None], s, torch.zeros((), dtype=s.dtype, device=s.device))
    p = torch.softmax(s, dim=-1)
    p = torch.where(alive[None, :, None], p, torch.zeros((), dtype=p.dtype, device=p.device))
    return torch.einsum("hqk,khd->qhd", p, vf)


# ---------------------------------------------------------------------------------------------- Qwen2 math
def qwen2_rms_norm(
    x: Tensor, weight: Tensor, eps: float = 1e-6, *, stats_dtype: torch.dtype | None = None
) -> Tensor:
    """Qwen2RMSNorm over the last dim: ``weight * (xs * rsqrt(mean(xs^2) + eps)).to(x.dtype)`` with
    ``xs = x.to(stats_dtype)``. ``stats_dtype`` None: float32, and float64 inputs stay float64 (the
    references); ``torch.float32``: always float32, as transformers' ``Qwen2RMSNorm`` (the module)."""
    if stats_dtype is None:
        stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(stats_dtype)
    xs = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xs.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim (Qwen2's rotary convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding ``x * cos + rotate_half(x) * sin`` per row: x ``[M, heads, D]``, cos/sin
    ``[M, D]`` (broadcast over heads; dtypes as given, as transformers' ``apply_rotary_pos_emb``)."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def rope_inv_freq(dim: int, theta: float, device=None) -> Tensor:
    """Default-rope inverse frequencies ``1 / theta**(arange(0, dim, 2) / dim)`` in float32, computed on
    ``device`` (transformers builds its buffer on the CPU)."""
    exps = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta**exps)


def rope_tables(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(cos, sin)``, each ``[N, 2 * len(inv_freq)]``, of integer ``positions [N]``: ``freqs = pos *
    inv_freq`` in float32, both halves repeated (``cat(freqs, freqs)``), then cast to ``dtype``."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]  # [N, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [N, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ---------------------------------------------------------------------------------------------- MoT routing
def gather_scatter(x: Tensor, und: Tensor, gen: Tensor, f_und, f_gen, out_dim: int | None = None) -> Tensor:
    """Upstream BAGEL's routing of one op over any two index sets: ``out[und] = f_und(x[und])``,
    ``out[gen] = f_gen(x[gen])``, into a zero tensor of x's dtype, ``[N, out_dim]`` (x's shape when None)."""
    out = x.new_zeros(x.shape if out_dim is None else (x.shape[0], out_dim))
    out[und] = f_und(x[und])
    out[gen] = f_gen(x[gen])
    return out


def _expert_rows(n_und: int, n: int, device) -> tuple[Tensor, Tensor]:
    return torch.arange(0, n_und, device=device), torch.arange(n_und, n, device=device)


def mot_rms_norm_reference(
    x: Tensor, n_und: int, weight_und: Tensor, weight_gen: Tensor, eps: float = 1e-6
) -> Tensor:
    """Per-expert gather -> Qwen2RMSNorm -> scatter, the way upstream BAGEL routes every layer.
    Rows ``< n_und`` use ``weight_und``; output in ``promote_types(x.dtype, weight.dtype)``."""
    N, H = x.shape
    out = x.new_zeros((N, H), dtype=torch.promote_types(x.dtype, weight_und.dtype))
    for idx, w in zip(_expert_rows(n_und, N, x.device), (weight_und, weight_gen), strict=True):
        out[idx] = qwen2_rms_norm(x[idx], w, eps).to(out.dtype)
    return out


def mot_qk_norm_rope_reference(
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
) -> tuple[Tensor, Tensor]:
    """Per expert: gather the tokens, Qwen2RMSNorm per head, rotary with the tokens' cos/sin (cast to
    the normed values' dtype first), scatter. q ``[N, Hq, D]``, k ``[N, Hkv, D]``, cos/sin ``[N, D]``."""
    dt = torch.promote_types(q.dtype, q_weight_und.dtype)
    qo = q.new_zeros(q.shape, dtype=dt)
    ko = k.new_zeros(k.shape, dtype=dt)
    experts = ((q_weight_und, k_weight_und), (q_weight_gen, k_weight_gen))
    for idx, (wq, wk) in zip(_expert_rows(n_und, q.shape[0], q.device), experts, strict=True):
        for x, w, o in ((q, wq, qo), (k, wk, ko)):
            n = qwen2_rms_norm(x[idx], w, eps)
            o[idx] = apply_rope(n, cos[idx].to(n.dtype), sin[idx].to(n.dtype)).to(dt)
    return qo, ko


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` (Qwen2MLP's activation)."""
    return F.silu(gate) * up


def mot_linear_reference(
    x: Tensor,
    n_und: int,
    weight_und: Tensor,
    bias_und: Tensor | None,
    weight_gen: Tensor,
    bias_gen: Tensor | None,
) -> Tensor:
    """Per-expert gather -> ``F.linear`` -> scatter."""
    N = x.shape[0]
    out = x.new_zeros((N, weight_und.shape[0]))
    experts = ((weight_und, bias_und), (weight_gen, bias_gen))
    for idx, (w, b) in zip(_expert_rows(n_und, N, x.device), experts, strict=True):
        out[idx] = F.linear(x[idx], w, b)
    return out


def permute_rows_reference(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` along dim 0."""
    return x[index.long()]


# ---------------------------------------------------------------------------------------------- patches
def patchify(image: Tensor, patch_size: int) -> Tensor:
    """BAGEL's ``data.data_utils.patchify``: one image ``[C, H, W]`` (H, W multiples of p) ->
    ``[(H/p) * (W/p), p * p * C]``; patches row-major over the grid, each vector ordered
    (pixel row, pixel col, channel) with the channel fastest."""
    p = patch_size
    if image.dim() != 3:
        raise ValueError(f"image must be [C, H, W], got shape {tuple(image.shape)}")
    c, h, w = image.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = image.reshape(c, h // p, p, w // p, p)  # [C, h, p, w, p]
    return torch.einsum("chpwq->hwpqc", x).reshape(-1, p * p * c)  # [h * w, p * p * C]


def patch_grid_view(images: Tensor, p: int) -> Tensor:
    """``[B, H//p, W//p, p, p, C]`` view of ``images [B, C, H, W]`` (no copy): element
    ``[b, r, c, pi, pj, ch]`` is ``images[b, ch, r*p + pi, c*p + pj]`` (BAGEL's order per patch)."""
    B, C, H, W = images.shape
    sB, sC, sH, sW = images.stride()
    return images.as_strided(
        (B, H // p, W // p, p, p, C), (sB, p * sH, p * sW, sH, sW, sC), images.storage_offset()
    )


def patchify_images(images: Tensor, patch_coords: Tensor, patch_size: int) -> Tensor:
    """Gather the patches named by ``patch_coords`` ``[N, 3]`` = (image, patch row, patch col) from a
    padded batch ``[B, C, H, W]`` -> ``[N, C * p * p]`` in BAGEL's patchify order (one gather)."""
    grid = patch_grid_view(images, patch_size)  # [B, Hp, Wp, p, p, C]
    coords = patch_coords.long()
    patches = grid[coords[:, 0], coords[:, 1], coords[:, 2]]  # [N, p, p, C]
    return patches.reshape(patches.shape[0], patch_size * patch_size * images.shape[1])  # N = 0 too


def patch_embed_reference(
    patches: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    pos_table: Tensor | None = None,
    pos_ids: Tensor | None = None,
) -> Tensor:
    """The unfused patch embedding: ``F.linear(patches, weight, bias) + F.embedding(pos_ids, pos_table)``."""
    out = F.linear(patches, weight, bias)
    if pos_table is not None:
        out = out + F.embedding(pos_ids.long(), pos_table)
    return out


def patch_embed_images_reference(
    images: Tensor,
    patch_coords: Tensor,
    patch_size: int,
    weight: Tensor,
    bias: Tensor | None = None,
    pos_table: Tensor | None = None,
    pos_ids: Tensor | None = None,
) -> Tensor:
    """The unfused patch embedding from raw images: :func:`patchify_images`, then
    :func:`patch_embed_reference`."""
    return patch_embed_reference(
        patchify_images(images, patch_coords, patch_size), weight, bias, pos_table, pos_ids
    )

"""Pure-PyTorch references shared by tests and benchmarks.

Nothing here is fast: these functions define what the kernels must compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .mask import PackedMask

__all__ = ["dense_mask_from_rule", "attention_reference"]


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

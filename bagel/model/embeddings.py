"""BAGEL's small embedding modules: frozen 2-D sin-cos position tables, the DiT timestep embedder and
the ViT -> LLM MLP connector. Parameter names match the checkpoint (``pos_embed``, ``mlp.0`` /
``mlp.2``, ``fc1`` / ``fc2``). Each calls its submodules (no raw weight is read), so LoRA layers,
quantised linears and hooks attached to them act.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from bagel.extras import needs_extra
from bagel.model.fusion import float_dtype

with needs_extra():
    from transformers.activations import ACT2FN

__all__ = [
    "get_2d_sincos_pos_embed",
    "PositionEmbedding",
    "TimestepEmbedder",
    "MLPconnector",
    "timestep_embedding",
]


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """``[M, dim]``: sin of pos * omega_i in the first half, cos in the second, omega_i = 10000^(-2i/dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)  # [M, dim/2]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """``[grid_size**2, embed_dim]`` 2-D sin-cos table, row ``r * grid_size + c`` for grid cell (r, c).

    As in DiT / upstream BAGEL: the first half of the channels encodes the column index, the second
    half the row index (upstream's meshgrid puts w first)."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    return np.concatenate([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], axis=1)


class PositionEmbedding(nn.Module):
    """Frozen 2-D sin-cos table ``pos_embed [max_num_patch_per_side**2, hidden]`` (a Parameter with
    ``requires_grad=False``, so it is a checkpoint key as upstream), indexed by flattened grid ids."""

    def __init__(self, max_num_patch_per_side: int, hidden_size: int):
        super().__init__()
        self.max_num_patch_per_side = int(max_num_patch_per_side)
        self.hidden_size = int(hidden_size)
        self.pos_embed = nn.Parameter(
            torch.zeros(self.max_num_patch_per_side**2, self.hidden_size), requires_grad=False
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        table = get_2d_sincos_pos_embed(self.hidden_size, self.max_num_patch_per_side)
        self.pos_embed.copy_(torch.from_numpy(table))  # float64 -> the parameter's dtype, one rounding

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[N, dim]`` fp32 sinusoidal embedding of (fractional) timesteps ``t [N]``: ``[cos(t f), sin(t f)]``
    with ``f_i = max_period^(-i / (dim/2))`` (DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """DiT timestep embedder: ``mlp = Linear(256, H) -> SiLU -> Linear(H, H)`` over :func:`timestep_embedding`."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        # the dtype of the MLP's parameters, read without assuming that mlp[0] is still an nn.Linear
        return self.mlp(freq.to(float_dtype(self.mlp)))


class MLPconnector(nn.Module):
    """ViT features -> LLM width: ``fc2(act(fc1(x)))``."""

    def __init__(self, in_dim: int, out_dim: int, hidden_act: str):
        super().__init__()
        if hidden_act not in ACT2FN:
            raise ValueError(f"connector_act={hidden_act!r} is not a known activation")
        self.activation_fn = ACT2FN[hidden_act]
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))

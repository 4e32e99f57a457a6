"""Helpers shared by the model-level tests (imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> None:
    """Every trainable weight random (llm2vae too, so the MSE reaches every layer and depends on the
    hidden states): norm weights around 1, the rest around 0, all with standard deviation 0.1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad:
            base = 1.0 if ("norm" in name and name.endswith("weight") and p.dim() == 1) else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))

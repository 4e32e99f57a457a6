"""Sharded EMA: an exponential moving average of the trainable parameters that lives on the same
shards as the parameters (each rank averages only its local shard; no full copy of the model
anywhere, no communication).

    ema = ShardedEMA(model, decay=0.9999)
    ...optimizer.step(); ema.update()        # ema <- decay * ema + (1 - decay) * param, on local shards

Frozen parameters are not averaged (their EMA is the parameter itself: :meth:`value` returns it).
The averages are DTensors with the parameters' mesh and placements, so
``torch.distributed.checkpoint`` saves and loads them sharded like the model.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ShardedEMA"]


class ShardedEMA:
    """EMA of ``model``'s trainable parameters on their FSDP2 shards (plain tensors work too).

    ``dtype``: dtype of the averages (default: each parameter's own). The update is
    ``torch._foreach_lerp_(ema, param, 1 - decay)``, i.e. ``ema + (1 - decay) * (param - ema)``, which is
    ``decay * ema + (1 - decay) * param`` up to rounding."""

    def __init__(self, model: nn.Module, decay: float, dtype: torch.dtype | None = None) -> None:
        from torch.distributed.tensor import DTensor

        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay={decay} must be in [0, 1]")
        self.decay = float(decay)
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        self.shadow: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                self.names.append(name)
                self.params.append(p)
                if isinstance(p, DTensor):
                    local = p.to_local().detach().to(dtype or p.dtype, copy=True)
                    self.shadow[name] = DTensor.from_local(
                        local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                    )
                else:
                    self.shadow[name] = p.detach().to(dtype or p.dtype, copy=True)

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        return t.to_local() if isinstance(t, DTensor) else t

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step on every local shard."""
        if not self.names:
            return
        emas = [self._local(self.shadow[n]) for n in self.names]
        params = [self._local(p) for p in self.params]
        if any(e.dtype != p.dtype for e, p in zip(emas, params, strict=True)):
            params = [p.to(e.dtype) for e, p in zip(emas, params, strict=True)]
        torch._foreach_lerp_(emas, params, 1.0 - self.decay)

    def value(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """The EMA of parameter ``name`` (the parameter itself when it is frozen)."""
        return self.shadow.get(name, param)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name (DTensors under FSDP2), for ``torch.distributed.checkpoint``."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        extra = sorted(set(state) - set(self.shadow))
        if missing or extra:
            raise ValueError(f"EMA state mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, t in state.items():
            if t is not self.shadow[name]:
                self._local(self.shadow[name]).copy_(self._local(t))

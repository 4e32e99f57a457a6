"""Where the trainer's packs come from: ``next_pack()`` returns one pack (the model's forward kwargs,
on the device, latents already encoded), ``state_dict()`` / ``load_state_dict()`` its position, so a
resumed run sees exactly the packs an uninterrupted one would, ``skip_counts()`` the samples dropped
per reason.

- :class:`SyntheticSource` (``data.source=synthetic``): random samples of ``data.kinds`` packed to
  ``data.max_num_tokens``; pack ``i`` of rank ``r`` depends only on ``(data.seed, r, i)``.
- ``example`` / ``files``: the data pipeline of :mod:`bagel.data` (readers, transforms with CFG
  dropout, the streaming packer) with the FLUX VAE encoding the VAE images (:func:`make_source`).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from bagel.train.config import TrainConfig

__all__ = ["SyntheticSource", "make_source"]


class SyntheticSource:
    """Random packs for tests and smoke runs, deterministic per ``(seed, rank, index)``."""

    def __init__(
        self, config, *, kinds: list[str], max_num_tokens: int, seed: int, rank: int, device
    ) -> None:
        from bagel.data.packing import sample_num_tokens, synthetic_sample

        self.config = config
        self.kinds = list(kinds)
        bad = [k for k in self.kinds if k not in ("text", "und", "t2i", "edit")]
        if bad or not self.kinds:
            raise ValueError(f"data.kinds={kinds!r}: choose from text, und, t2i, edit")
        if not config.visual_gen and any(k in ("t2i", "edit") for k in self.kinds):
            raise ValueError(f"data.kinds={kinds!r}: stage 1 has no generation (drop t2i and edit)")
        self.max_num_tokens = max_num_tokens
        self.seed = seed
        self.rank = rank
        self.device = device
        self.index = 0
        self._sample = synthetic_sample
        self._count = sample_num_tokens

    def next_pack(self) -> dict[str, Any]:
        from bagel.data.packing import pack_samples

        rng = random.Random(f"{self.seed}/{self.rank}/{self.index}")
        self.index += 1
        samples, used = [], 0
        for _ in range(10_000):
            sample = self._sample(rng.choice(self.kinds), self.config, rng)
            n = self._count(sample, self.config)
            if used + n > self.max_num_tokens:
                break
            samples.append(sample)
            used += n
        if not samples:
            raise ValueError(
                f"data.max_num_tokens={self.max_num_tokens} is too small for one synthetic sample"
            )
        return pack_samples(
            samples,
            self.config,
            max_num_tokens=self.max_num_tokens,
            rng=rng.randrange(2**31),
            device=self.device,
        )

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])

    def skip_counts(self) -> dict[str, int]:
        return {}


def make_source(cfg: TrainConfig, model_config, *, rank: int, world: int, device: torch.device):
    """The data source of ``cfg.data.source`` for this rank."""
    if cfg.data.source == "synthetic":
        return SyntheticSource(
            model_config,
            kinds=list(cfg.data.kinds),
            max_num_tokens=cfg.data.max_num_tokens,
            seed=cfg.data.seed,
            rank=rank,
            device=device,
        )
    raise ValueError(f"data.source={cfg.data.source!r} needs the bagel.data pipeline, which is not wired yet")

"""Where the trainer's packs come from: ``next_pack()`` returns one pack (the model's forward kwargs,
on the device, latents already encoded), ``state_dict()`` / ``load_state_dict()`` its position, so a
resumed run sees exactly the packs an uninterrupted one would, ``skip_counts()`` the samples dropped
per reason.

- :class:`SyntheticSource` (``data.source=synthetic``): random samples of ``data.kinds`` packed to
  ``data.loader.max_num_tokens``; pack ``i`` of rank ``r`` depends only on ``(data.loader.seed, r, i)``.
- ``example`` / ``files``: the data pipeline of :mod:`bagel.data` (readers, transforms with CFG
  dropout, the streaming packer) with the FLUX VAE encoding the VAE images (:func:`make_source`).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from bagel.train.config import TrainConfig

__all__ = [
    "SyntheticSource",
    "PipelineSource",
    "build_vae",
    "example_dataset",
    "tokenizer_for",
    "make_source",
]


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
                f"data.loader.max_num_tokens={self.max_num_tokens} is too small for one synthetic sample"
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


class PipelineSource:
    """Packs from the :mod:`bagel.data` pipeline (``build_loader``: readers, transforms with CFG dropout,
    the streaming packer, sharded over ranks and workers), VAE images encoded with ``vae`` (a posterior
    sample drawn from a generator seeded by ``(seed, rank, pack index)``, so a resumed run draws the
    same), then packed for the forward. Its state is the loader's plus the pack index."""

    def __init__(
        self,
        data_config,
        model_config,
        tokenizer,
        *,
        vae,
        micro_batch_size: int,
        rank: int,
        world: int,
        device,
    ) -> None:
        from bagel.data import build_loader

        self.data_config = data_config
        self.model_config = model_config
        self.loader = build_loader(data_config, model_config, tokenizer, rank=rank, world_size=world)
        self.vae = vae
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.device = device
        self.index = 0
        self.it = None

    def next_pack(self) -> dict[str, Any]:
        from bagel.data import encode_vae_images
        from bagel.data.packing import pack_samples

        if self.it is None:
            self.it = iter(self.loader)
        raw = next(self.it)
        samples = raw.samples
        if self.vae is not None:
            g = torch.Generator(device=self.vae_device()).manual_seed(
                (self.data_config.seed * 1_000_003 + self.rank * 10_007 + self.index) % 2**63
            )
            samples = encode_vae_images(
                samples, self.vae, micro_batch_size=self.micro_batch_size, generator=g
            )
        self.index += 1
        return pack_samples(
            samples,
            self.model_config,
            max_num_tokens=self.data_config.max_num_tokens,
            special_tokens=self.loader.special_tokens,
            device=self.device,
        )

    def vae_device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict(), "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self.index = int(state["index"])
        self.it = None

    def skip_counts(self) -> dict[str, int]:
        return dict(self.loader.skip_counts())


def build_vae(cfg: TrainConfig, model_config, device):
    """The frozen FLUX VAE of a stage-2 run: ``vae.path``'s weights, or the FLUX architecture with
    random weights (``vae.tiny`` config, seeded by ``model.init_seed``). None at stage 1."""
    if not model_config.visual_gen:
        return None
    from bagel.vae import FluxVAE, FluxVAEConfig

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.vae.dtype]
    if cfg.vae.path is not None:
        vae = FluxVAE.from_pretrained(cfg.vae.path, dtype=dtype, device=device)
    else:
        state = torch.get_rng_state()
        torch.manual_seed(cfg.model.init_seed + 1)
        vae = FluxVAE(FluxVAEConfig.tiny(**dict(cfg.vae.tiny)), dtype=dtype, device=device)
        torch.set_rng_state(state)
    vae.eval().requires_grad_(False)
    z = vae.config.z_channels
    if z != model_config.latent_channels:
        raise ValueError(
            f"the VAE has {z} latent channels but the model expects {model_config.latent_channels} "
            "(model.tiny.latent_channels or the checkpoint's vae_config)"
        )
    return vae


def example_dataset(cfg: TrainConfig, model_config, rank: int) -> str:
    """``<output_dir>/example-data/example.yaml``, written by rank 0 on first use (the others wait)."""
    import os

    import torch.distributed as dist

    from bagel.data.example import write_example_dataset

    folder = os.path.join(cfg.output_dir, "example-data")
    path = os.path.join(folder, "example.yaml")
    if rank == 0 and not os.path.isfile(path):
        tmp = folder + ".tmp"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        write_example_dataset(tmp, model_config, seed=cfg.data.loader.seed)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    if dist.is_initialized():
        dist.barrier()
    return path


def tokenizer_for(cfg: TrainConfig):
    from bagel.data import load_tokenizer, tiny_tokenizer

    if cfg.data.source == "example":
        return tiny_tokenizer()
    folder = cfg.data.tokenizer or cfg.model.path
    if folder is None:
        raise ValueError(
            "data.source=files needs data.tokenizer (or model.path with the checkpoint's tokenizer)"
        )
    tok, _ = load_tokenizer(folder)
    return tok


def make_source(cfg: TrainConfig, model_config, *, rank: int, world: int, device: torch.device):
    """The data source of ``cfg.data.source`` for this rank."""
    import dataclasses

    if cfg.data.source == "synthetic":
        return SyntheticSource(
            model_config,
            kinds=list(cfg.data.kinds),
            max_num_tokens=cfg.data.loader.max_num_tokens,
            seed=cfg.data.loader.seed,
            rank=rank,
            device=device,
        )
    data_config = cfg.data.loader
    if cfg.data.source == "example":
        data_config = dataclasses.replace(
            data_config, dataset_config_file=example_dataset(cfg, model_config, rank)
        )
    vae = build_vae(cfg, model_config, device)
    return PipelineSource(
        data_config,
        model_config,
        tokenizer_for(cfg),
        vae=vae,
        micro_batch_size=cfg.vae.micro_batch_size,
        rank=rank,
        world=world,
        device=device,
    )

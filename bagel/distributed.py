"""Data-parallel training with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each rank packs its own batches (``bagel.packing.pack_samples`` with its own samples); FSDP2 shards the
parameters, gathers each decoder layer's weights just before it runs and frees them after, and averages
the gradients across ranks (reduce-scatter with mean). Our custom ops run inside unchanged.

    from bagel.distributed import init_distributed, apply_fsdp2, cleanup
    rank, world, device = init_distributed()           # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    model = BagelForUnifiedMultimodal(config).to(device); model.initialize_weights()
    apply_fsdp2(model)                                 # one unit per LLM and ViT decoder layer + the root
    ...train as usual (optimizer built after apply_fsdp2)...
    cleanup()

Launch on N GPUs of one machine: ``torchrun --nproc-per-node N your_train.py``, or ``bagel-demo --nproc N``.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["init_distributed", "apply_fsdp2", "cleanup", "decoder_layers"]


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). ``backend`` defaults to nccl when CUDA is
    available, else gloo. Returns ``(rank, world_size, device)``; a no-op returning ``(0, 1, device)``
    when ``WORLD_SIZE`` is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group(
            backend or ("nccl" if cuda else "gloo"),
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if cuda else None,
        )
    return dist.get_rank(), dist.get_world_size(), device


def cleanup() -> None:
    """Leave the process group, once every rank has arrived (a rank tearing gloo down while another
    still works can abort the other)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def decoder_layers(model: nn.Module, vit: bool = True) -> list[nn.Module]:
    """The decoder layers of a BAGEL model (LLM layers, then, with ``vit``, the ViT encoder layers)."""
    layers = list(model.language_model.model.layers)
    tower = getattr(model, "vit_model", None)
    if vit and tower is not None:
        layers += list(tower.vision_model.encoder.layers)
    return layers


def apply_fsdp2(
    model: nn.Module,
    *,
    mesh=None,
    activation_checkpointing: bool = True,
    reshard_after_forward: bool = True,
    mp_policy=None,
    shard_vit_layers: bool = False,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2: one unit per LLM decoder layer plus the root (the
    embeddings, connector, heads, final norms and, by default, the ViT).

    Every rank must run every FSDP unit in every step (each unit's all-gather is a collective). The LLM
    layers always run; the ViT runs only on packs that hold images, and each rank packs its own
    batches, so by default the ViT stays in the root unit, whose gathers happen on every rank.
    ``shard_vit_layers=True`` gives each ViT layer its own unit (less memory at the root's gather)
    and is safe only when every rank's pack holds at least one image in every step. ``activation_checkpointing`` recomputes every decoder
    layer in backward (non-reentrant ``torch.utils.checkpoint``; the pack context and the
    :class:`bagel_kernels.PackedMask` pass through as ordinary Python objects). ``mp_policy``: an
    ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. bf16 parameters, fp32 reduction). Build the
    optimizer after this call: it must see the sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise ValueError("apply_fsdp2 needs an initialised process group (call init_distributed first)")
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kwargs["mesh"] = mesh
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    model.language_model.model.gradient_checkpointing = activation_checkpointing
    vit = getattr(model, "vit_model", None)
    if vit is not None:
        vit.vision_model.encoder.gradient_checkpointing = activation_checkpointing
    # parameters outside the per-layer units get a (zero) gradient on every rank, used by its pack or
    # not: FSDP2 reduce-scatters only existing gradients, so they must exist everywhere
    model.zero_grad_prefixes = ("language_model.model.layers.",) + (
        ("vit_model.vision_model.encoder.layers.",) if shard_vit_layers else ()
    )
    for layer in decoder_layers(model, vit=shard_vit_layers):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model

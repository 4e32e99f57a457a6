"""Data-parallel training with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each rank packs its own batches (``bagel.data.packing.pack_samples`` with its own samples); FSDP2 shards the
parameters, gathers each decoder layer's weights just before it runs and frees them after, and averages
the gradients across ranks (reduce-scatter with mean). Our custom ops run inside unchanged.

    from bagel.train.distributed import init_distributed, apply_fsdp2, cleanup
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

__all__ = [
    "init_distributed",
    "init_single_process_group",
    "read_launch_env",
    "build_mesh",
    "apply_fsdp2",
    "cleanup",
    "decoder_layers",
    "free_port",
    "set_local_env",
]

_USAGE = (
    "launch with torchrun (e.g. `torchrun --nproc-per-node 8 ...`), which sets RANK, WORLD_SIZE, "
    "LOCAL_RANK, MASTER_ADDR and MASTER_PORT, or unset WORLD_SIZE for one process"
)


def _env_int(name: str, default: int | None, minimum: int) -> int | None:
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer; {_USAGE}") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={text!r} must be >= {minimum}; {_USAGE}")
    return value


def read_launch_env() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from torchrun's environment, checked: ValueError naming the
    variable for a value that is not a non-negative integer, ``WORLD_SIZE > 1`` without ``RANK``, a
    ``RANK`` outside ``[0, WORLD_SIZE)`` or a ``LOCAL_RANK`` above ``RANK``. Defaults without torchrun:
    world 1, rank 0, local rank 0; ``LOCAL_RANK`` unset with several ranks means one machine (= ``RANK``)."""
    world = _env_int("WORLD_SIZE", 1, 1)
    rank = _env_int("RANK", None, 0)
    local = _env_int("LOCAL_RANK", None, 0)
    if world > 1 and rank is None:
        raise ValueError(f"WORLD_SIZE={world} is set but RANK is not; {_USAGE}")
    rank = 0 if rank is None else rank
    if rank >= world:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world}); {_USAGE}")
    if local is None:
        local = rank
    if local > rank:
        raise ValueError(f"LOCAL_RANK={local} exceeds RANK={rank}; {_USAGE}")
    return world, rank, local


def init_distributed(
    backend: str | None = None, timeout_s: float = 600.0, device: torch.device | str | None = None
) -> tuple[int, int, torch.device]:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

    ``device`` defaults to GPU ``LOCAL_RANK`` when CUDA is available, else the CPU (``"cuda"`` without
    an index also means GPU ``LOCAL_RANK``); ``backend`` defaults to nccl for a CUDA device, else
    gloo. ``timeout_s`` bounds every collective, so a rank that stops answering fails the others
    instead of hanging them. Returns ``(rank, world_size, device)``; with ``WORLD_SIZE`` unset or 1
    no group is created and ``(0, 1, device)`` comes back. A malformed environment (``WORLD_SIZE=abc``,
    ``WORLD_SIZE=2`` without ``RANK``, ``LOCAL_RANK=x``) is a ValueError naming the variable
    (:func:`read_launch_env`), raised before anything is created."""
    world, rank, local = read_launch_env()
    if device is None:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group(
            backend or ("nccl" if device.type == "cuda" else "gloo"),
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return dist.get_rank(), dist.get_world_size(), device


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a one-machine process group)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_local_env(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives process ``rank`` of ``world`` on one machine (rendezvous at
    ``127.0.0.1:port``), for processes started with ``torch.multiprocessing.spawn``; then
    :func:`init_distributed` joins the group."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )


def cleanup() -> None:
    """Leave the process group, once every rank has arrived (a rank tearing gloo down while another
    still works can abort the other)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def init_single_process_group(device: torch.device, timeout_s: float = 600.0) -> None:
    """A process group of one rank (world size 1), so that a single process runs the same sharded code
    path as many (FSDP2, DTensor shards, ``torch.distributed.checkpoint``). No-op when a group exists."""
    if dist.is_initialized():
        return
    store = dist.HashStore()
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        store=store,
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def build_mesh(device: torch.device, hybrid_shard_size: int = 0):
    """The FSDP2 device mesh over all ranks: 1-D (shard over everyone) for ``hybrid_shard_size`` 0, else
    2-D ``("replicate", "shard")`` with parameters sharded within groups of ``hybrid_shard_size``
    consecutive ranks (e.g. one node) and replicated across the groups (hybrid sharding, HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    kind = device.type
    if not hybrid_shard_size or hybrid_shard_size == world:
        return init_device_mesh(kind, (world,), mesh_dim_names=("shard",))
    if hybrid_shard_size < 1 or world % hybrid_shard_size:
        raise ValueError(
            f"distributed.hybrid_shard_size={hybrid_shard_size} must divide the world size {world}"
        )
    return init_device_mesh(
        kind, (world // hybrid_shard_size, hybrid_shard_size), mesh_dim_names=("replicate", "shard")
    )


def decoder_layers(model: nn.Module, vit: bool = True) -> list[nn.Module]:
    """The decoder layers of a :class:`bagel.BagelForUnifiedMultimodal` (LLM layers, then, with ``vit``,
    the ViT encoder layers of ``model.model``)."""
    layers = list(model.model.language_model.model.layers)
    tower = getattr(model.model, "vit_model", None)
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
    shard_vit_layers: bool = True,
) -> nn.Module:
    """Shard a :class:`bagel.BagelForUnifiedMultimodal` in place with FSDP2: one unit per LLM decoder
    layer, one per ViT encoder layer, and the root, the top-level module (embeddings, patch embedding,
    connector, timestep embedder, heads, final norms). Apply PEFT / LoRA or swap modules first: the
    units then shard whatever the layers hold.

    Every rank must run every unit in every step (each unit's all-gather and reduce-scatter is a
    collective), while each rank packs its own batches: a pack may hold no image, no generation token
    or no CE token. So the model is told to (1) run the ViT on a one-patch stand-in when its pack has
    no image (``model.vit_stand_in``) and (2) tie every parameter outside the per-layer units into its
    losses with weight zero (``model.zero_grad_prefixes``): every rank then runs every unit and
    produces every gradient, and the reduce-scatter (mean over ranks) sees the same tensors everywhere;
    both add exact zeros to the gradients. The LLM layers always run (their generation-expert weights
    get zero gradients from a pack without generation tokens). ``shard_vit_layers=False`` keeps the ViT
    in the root unit instead (no stand-in needed).

    ``activation_checkpointing`` recomputes every decoder layer (LLM and ViT) in backward, with
    non-reentrant ``torch.utils.checkpoint`` around the layer's ``__call__`` (so FSDP2's hooks run inside
    it); the pack context and its :class:`bagel_kernels.PackedMask` (kernel tables built once per pack
    by ``prepare_pack``) pass through as ordinary Python objects and are only read in the recomputation.
    ``mesh``: a 1-D ``DeviceMesh`` (default: all ranks) or a 2-D one for hybrid sharding (:func:`build_mesh`). ``mp_policy``: a
    ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. bf16 parameters, fp32 reduction); call the model
    as ``model(**batch)`` then, so that the pack is prepared in the compute dtype.
    ``model.forward_prepared`` is registered as a forward method (it runs the root unit's hooks too).
    Build the optimizer after this call: it must see the sharded parameters."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if not dist.is_initialized():
        raise ValueError("apply_fsdp2 needs an initialised process group (call init_distributed first)")
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kwargs["mesh"] = mesh
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    model.model.language_model.model.gradient_checkpointing = activation_checkpointing
    vit = getattr(model.model, "vit_model", None)
    if vit is not None:
        vit.vision_model.encoder.gradient_checkpointing = activation_checkpointing
    shard_vit_layers = shard_vit_layers and vit is not None
    model.vit_stand_in = shard_vit_layers
    model.zero_grad_prefixes = ("model.language_model.model.layers.",) + (
        ("model.vit_model.vision_model.encoder.layers.",) if shard_vit_layers else ()
    )
    for layer in decoder_layers(model, vit=shard_vit_layers):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    register_fsdp_forward_method(model, "forward_prepared")
    return model

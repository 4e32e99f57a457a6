"""Resumable checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a folder ``<output_dir>/checkpoints/step_00000100`` holding:

- the DCP files of the trainable parameters, the optimizer state and the EMA, sharded as they live
  (every rank writes its own shards; a different world size can load them);
- ``rank_<r>.pkl`` per rank: the step, the learning-rate scheduler, the data pipeline's position and
  the RNG states (torch CPU and CUDA, Python ``random``, numpy) of that rank;
- ``meta.json``: step, world size, what the folder holds (written last).

Frozen parameters are not saved: they come from the model's source again (``model.path`` or the
seeded random initialisation).

Every checkpoint is written under a temporary name (``.tmp-step_...``) and renamed when every rank has
finished, so a run killed during a save leaves the previous checkpoint as the newest complete one;
leftover temporary folders are removed by the next save. Only the newest ``keep`` checkpoints stay.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist

from bagel.train.tensor_files import atomic_write_text

__all__ = [
    "CHECKPOINT_RE",
    "capture_rng",
    "restore_rng",
    "list_checkpoints",
    "latest_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "write_rank_state",
]

CHECKPOINT_RE = re.compile(r"^step_(\d{8,})$")
TMP_PREFIX = ".tmp-"


def capture_rng() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``folder``, oldest first: ``(step, path)``."""
    if not os.path.isdir(folder):
        return []
    out = []
    for name in os.listdir(folder):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(folder, name)
        if m and os.path.isfile(os.path.join(path, "meta.json")):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(folder: str) -> str | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def _model_optim_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def write_rank_state(folder: str, rank: int, state: dict) -> None:
    """``rank_<rank>.pkl`` in ``folder``, through a temporary file."""
    path = os.path.join(folder, f"rank_{rank}.pkl")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def save_checkpoint(
    folder: str,
    step: int,
    *,
    model,
    optimizer,
    ema=None,
    rank_state: dict,
    keep: int,
    meta: dict | None = None,
) -> str:
    """Save a checkpoint of ``step`` into ``folder`` (a collective: every rank calls it). ``rank_state``
    is this rank's picklable state (scheduler, data position); the RNG states are added here. Returns
    the checkpoint's path."""
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    final = os.path.join(folder, f"step_{step:08d}")
    tmp = os.path.join(folder, f"{TMP_PREFIX}step_{step:08d}")
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):  # leftovers of an interrupted save
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd, optim_sd = _model_optim_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    dcp.save(state, checkpoint_id=tmp)
    write_rank_state(tmp, rank, {**rank_state, "step": step, "rng": capture_rng()})
    dist.barrier()
    if rank == 0:
        info = {"step": step, "world_size": dist.get_world_size(), "ema": ema is not None, **(meta or {})}
        atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(info, indent=1) + "\n")
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str, *, model, optimizer, ema=None) -> dict:
    """Restore ``model``'s trainable parameters, the optimizer, the EMA and this rank's RNG states from
    the checkpoint ``path`` (a collective). Returns this rank's saved state (``step``, scheduler, data
    position), or only ``step`` when the world size changed (the data position and RNG states are
    per rank; the run then continues with fresh per-rank streams, with a warning)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    if bool(meta.get("ema")) != (ema is not None):
        raise ValueError(
            f"{path}: the checkpoint was saved with ema.enabled={bool(meta.get('ema'))}; the run has "
            f"ema.enabled={ema is not None}"
        )
    model_sd, optim_sd = _model_optim_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    if ema is not None:
        ema.load_state_dict(state["ema"])
    rank, world = dist.get_rank(), dist.get_world_size()
    if meta["world_size"] != world:
        warnings.warn(
            f"{path} was saved by {meta['world_size']} ranks and is resumed on {world}: parameters, "
            "optimizer and EMA are resharded; the data position and RNG streams start afresh",
            stacklevel=2,
        )
        return {"step": int(meta["step"])}
    with open(os.path.join(path, f"rank_{rank}.pkl"), "rb") as f:
        saved = pickle.load(f)  # written by this trainer (a checkpoint is trusted like any pickle)
    restore_rng(saved.pop("rng"))
    return saved

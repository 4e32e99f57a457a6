"""Export of a sharded run: ``config.json`` + ``ema.safetensors`` that
``BagelForUnifiedMultimodal.from_pretrained(path, strict=True)`` loads, and, under LoRA, the adapter
in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``peft.PeftModel.from_pretrained``) and the merged model.

Written tensor by tensor: every rank gathers one parameter at a time (``DTensor.full_tensor``, a
collective), rank 0 moves it to the CPU and appends it to a streaming safetensors writer
(:class:`bagel.train.tensor_files.SafetensorsWriter`). At most one full parameter exists at a time,
never the full model. Every export goes to a temporary folder renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist
from torch import nn

from bagel.train.build import checkpoint_key
from bagel.train.tensor_files import SafetensorsWriter, replace_dir_atomically

__all__ = ["export_model", "export_lora_adapter", "peft_key"]


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _source(name: str, param: torch.Tensor, ema, use_ema: bool) -> torch.Tensor:
    return ema.value(name, param) if (use_ema and ema is not None) else param


def _tmp_dir(final: str) -> str:
    parent = os.path.dirname(os.path.abspath(final))
    tmp = os.path.join(parent, f".tmp-{os.path.basename(final)}")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    return tmp


def _finish(tmp: str, final: str) -> str:
    dist.barrier()
    if dist.get_rank() == 0:
        replace_dir_atomically(tmp, final)
    dist.barrier()
    return final


def _lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA layers by the checkpoint key prefix of their base weight (``...q_proj``)."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer") and len(getattr(mod, "lora_A", {})):
            out[name.removeprefix("model.")] = (name, mod)
    return out


@torch.no_grad()
def export_model(
    model: nn.Module,
    out_dir: str,
    *,
    ema=None,
    use_ema: bool = True,
    merge_lora: bool = True,
    dtype: torch.dtype | None = None,
) -> str:
    """Write ``out_dir/config.json`` + ``out_dir/ema.safetensors`` (checkpoint keys only; LoRA adapters
    merged into their base weights: ``W + (alpha / r) * B @ A``, from the EMA when ``use_ema``), in
    ``dtype`` (default: each parameter's own). A collective: every rank calls it. Returns ``out_dir``."""
    rank = dist.get_rank()
    tmp = _tmp_dir(out_dir)
    lora = _lora_modules(model) if merge_lora else {}
    params = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
    entries = [(checkpoint_key(n), dtype or p.dtype, tuple(p.shape)) for n, p in params]
    writer = SafetensorsWriter(os.path.join(tmp, "ema.safetensors"), entries) if rank == 0 else None
    try:
        names = dict(model.named_parameters())
        for name, p in params:
            key = checkpoint_key(name)
            full = _full(_source(name, p, ema, use_ema))
            prefix = key.rsplit(".", 1)[0]
            if key.endswith(".weight") and prefix in lora:
                mod_name, mod = lora[prefix]
                for adapter in mod.active_adapters:
                    a = _full(
                        _source(
                            f"{mod_name}.lora_A.{adapter}.weight",
                            names[f"{mod_name}.lora_A.{adapter}.weight"],
                            ema,
                            use_ema,
                        )
                    )
                    b = _full(
                        _source(
                            f"{mod_name}.lora_B.{adapter}.weight",
                            names[f"{mod_name}.lora_B.{adapter}.weight"],
                            ema,
                            use_ema,
                        )
                    )
                    delta = (b.float() @ a.float()) * float(mod.scaling[adapter])
                    full = (full.float() + delta).to(p.dtype)
            if writer is not None:
                writer.write(key, full.to(dtype or p.dtype))
            del full
        if writer is not None:
            writer.close()
            writer = None
            model.config.save_pretrained(tmp)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return _finish(tmp, out_dir)


def peft_key(name: str) -> str:
    """PEFT's saved key of an adapter parameter: ``base_model.model.`` + the name without the adapter."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-2]):
        if part.startswith("lora_"):
            del parts[i + 1]  # the adapter name ("default")
            break
    return "base_model.model." + ".".join(parts)


@torch.no_grad()
def export_lora_adapter(
    model: nn.Module, lora_config, out_dir: str, *, ema=None, use_ema: bool = True
) -> str:
    """Write the LoRA adapter in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``
    (keys ``base_model.model.<module>.lora_A.weight``), loadable with
    ``peft.PeftModel.from_pretrained(BagelForUnifiedMultimodal(...), out_dir)``. A collective."""
    rank = dist.get_rank()
    tmp = _tmp_dir(out_dir)
    params = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    entries = [(peft_key(n), p.dtype, tuple(p.shape)) for n, p in params]
    writer = SafetensorsWriter(os.path.join(tmp, "adapter_model.safetensors"), entries) if rank == 0 else None
    try:
        for name, p in params:
            full = _full(_source(name, p, ema, use_ema))
            if writer is not None:
                writer.write(peft_key(name), full)
        if writer is not None:
            writer.close()
            writer = None
            lora_config.save_pretrained(tmp)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return _finish(tmp, out_dir)

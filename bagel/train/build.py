"""Building the model of a run: config, freezing, LoRA, FSDP2 sharding and loading that scales.

Loading a checkpoint (``model.path``) never holds a full model on a rank:

1. the model is built on the ``meta`` device and cast there to ``model.param_dtype`` (free: no data);
2. freezing and LoRA adapters are applied (still on meta);
3. FSDP2 shards it over the device mesh (1-D, or 2-D for hybrid sharding);
4. ``to_empty`` allocates only this rank's shard of every parameter, in ``param_dtype``;
5. every rank reads, for every parameter, only the rows of its shard from the safetensors files
   (:class:`bagel.train.tensor_files.TensorFile`: plain reads straight into the shard when the file's
   dtype is the parameter's, else through a bounded staging buffer; no memory map, no fp32 copy of
   a bf16 model, no full tensor).

A random model (``model.path`` null, tests and the example) is built whole on the CPU from
``model.init_seed`` and then sharded: the same weights for every world size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from bagel.train.config import TrainConfig

__all__ = [
    "FREEZE_PRESETS",
    "LORA_PRESETS",
    "BuiltModel",
    "bagel_config",
    "build_model",
    "checkpoint_key",
    "local_rows",
    "fill_from_full",
    "load_sharded_checkpoint",
    "lora_target_regex",
    "apply_freeze",
    "trainable_names",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

_LLM_LAYER = r"model\.language_model\.model\.layers\.\d+\."
LORA_PRESETS = {
    "llm_attn": _LLM_LAYER + r"self_attn\.[qkvo]_proj{gen}",
    "llm_mlp": _LLM_LAYER + r"mlp{gen}\.(gate|up|down)_proj",
    "vit": r"model\.vit_model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])",
}
FREEZE_PRESETS = ("und", "gen", "vit", "connectors")
_CONNECTORS = ("connector.", "vit_pos_embed.", "time_embedder.", "vae2llm.", "llm2vae.", "latent_pos_embed.")


def checkpoint_key(name: str) -> str:
    """The checkpoint key of a parameter name of :class:`bagel.BagelForUnifiedMultimodal` (``model.``
    prefix dropped, PEFT's ``.base_layer`` folded away)."""
    return name.removeprefix("model.").replace(".base_layer.", ".")


def _freeze_preset(preset: str, key: str) -> bool:
    from bagel.io.checkpoint import classify_key

    if preset == "vit":
        return key.startswith("vit_model.")
    if preset == "connectors":
        return key.startswith(_CONNECTORS)
    if not key.startswith("language_model."):
        return False
    return classify_key(key) == preset  # "und" or "gen"


def apply_freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """``requires_grad_(False)`` on every parameter a preset (:data:`FREEZE_PRESETS`) or regular
    expression of ``patterns`` names; returns the names frozen. A pattern that names no parameter is a
    ValueError (a typo must not silently train everything)."""
    frozen = []
    for pat in patterns:
        hit = False
        rx = None if pat in FREEZE_PRESETS else re.compile(pat)
        for name, p in model.named_parameters():
            key = checkpoint_key(name)
            if (_freeze_preset(pat, key) if rx is None else bool(rx.search(name))) and "lora_" not in name:
                hit = True
                if p.requires_grad:
                    p.requires_grad_(False)
                    frozen.append(name)
        if not hit:
            raise ValueError(f"finetune.freeze entry {pat!r} matches no parameter of the model")
    return frozen


def lora_target_regex(targets: list[str]) -> str:
    """One regular expression (PEFT ``target_modules``, matched in full) from presets and patterns."""
    gen = "(_moe_gen)?"
    if "und_only" in targets:
        gen = ""
    if "gen_only" in targets:
        gen = "_moe_gen"
    if "und_only" in targets and "gen_only" in targets:
        raise ValueError("finetune.lora_targets: und_only and gen_only exclude each other")
    parts = []
    for t in targets:
        if t in ("und_only", "gen_only"):
            continue
        if t in LORA_PRESETS:
            parts.append(LORA_PRESETS[t].format(gen=gen))
        else:
            try:
                re.compile(t)
            except re.error as exc:
                raise ValueError(
                    f"finetune.lora_targets entry {t!r} is not a regular expression: {exc}"
                ) from None
            parts.append(f".*{t}.*" if not t.startswith("^") else t)
    if not parts:
        raise ValueError("finetune.lora_targets names no module (und_only / gen_only only restrict presets)")
    return "|".join(f"({p})" for p in parts)


def bagel_config(cfg: TrainConfig):
    """The :class:`bagel.BagelConfig` of the run (from ``model.path`` or ``model.tiny``), at its stage."""
    import inspect

    from bagel import BagelConfig

    if cfg.model.path is not None:
        config = BagelConfig.from_pretrained(cfg.model.path)
    else:
        allowed = set(inspect.signature(BagelConfig.tiny).parameters) | set(
            inspect.signature(BagelConfig.__init__).parameters
        )
        bad = sorted(set(cfg.model.tiny) - allowed)
        if bad:
            raise ValueError(f"model.tiny: unknown BagelConfig.tiny argument(s) {bad}")
        tiny = dict(cfg.model.tiny)
        if cfg.data.source == "example":  # the example's tokenizer and the FLUX VAE's 16 channels
            from bagel.data import tiny_tokenizer

            tiny.setdefault("vocab_size", len(tiny_tokenizer()))
            tiny.setdefault("latent_channels", 16)
        config = BagelConfig.tiny(**tiny)
    config.stage = cfg.model.stage
    return config


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@dataclass
class BuiltModel:
    """The sharded model of a run and what the trainer needs to know about it."""

    model: nn.Module
    mesh: object
    n_params: int  # parameters of the model as built (adapters included)
    lora_config: object | None = None  # peft LoraConfig under LoRA
    frozen: list[str] = field(default_factory=list)
    loaded_from: str | None = None


def local_rows(param: torch.Tensor) -> tuple[int, int]:
    """``[start, stop)``: the rows (dim 0) of the full parameter that this rank's shard holds. A plain
    tensor holds all rows. Only dim-0 sharding (FSDP2's) is supported."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return 0, param.shape[0] if param.dim() else 1
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if param.dim() == 0:
        return 0, 1
    if any(o != 0 for o in offset[1:]) or tuple(shape[1:]) != tuple(param.shape[1:]):
        raise ValueError(f"only dim-0 sharding is supported, got placements {param.placements}")
    return int(offset[0]), int(offset[0]) + int(shape[0])


def _local(param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


@torch.no_grad()
def fill_from_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's rows of ``full`` (the whole tensor, on any device) into the shard of ``param``."""
    start, stop = local_rows(param)
    local = _local(param)
    src = full if full.dim() == 0 else full[start:stop]
    local.copy_(src.reshape(local.shape))


@torch.no_grad()
def _init_lora(model: nn.Module, seed: int) -> None:
    """PEFT's default LoRA init (A: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in));
    B: zeros), drawn from a generator seeded per parameter, so the same for every world size."""
    import zlib

    for name, p in model.named_parameters():
        if "lora_B" in name:
            _local(p).zero_()
        elif "lora_A" in name:
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            bound = 1.0 / math.sqrt(p.shape[1])
            full = torch.empty(p.shape, dtype=torch.float32).uniform_(-bound, bound, generator=g)
            fill_from_full(p, full)


def _apply_lora(model: nn.Module, cfg: TrainConfig):
    from bagel.extras import needs_extra

    with needs_extra():
        from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(
        r=cfg.finetune.lora_r,
        lora_alpha=cfg.finetune.lora_alpha,
        lora_dropout=cfg.finetune.lora_dropout,
        target_modules=lora_target_regex(list(cfg.finetune.lora_targets)),
        bias="none",
    )
    inject_adapter_in_model(lora, model)
    n = 0
    for name, p in model.named_parameters():
        is_lora = "lora_" in name
        p.requires_grad_(is_lora)
        n += is_lora
    if n == 0:
        raise ValueError(f"finetune.lora_targets {cfg.finetune.lora_targets} match no module of the model")
    return lora


def _recompute_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (RoPE inverse frequencies) after ``to_empty``."""
    for mod in model.modules():
        if hasattr(mod, "compute_inv_freq") and hasattr(mod, "inv_freq"):
            mod.inv_freq = mod.compute_inv_freq(mod.inv_freq.device)


def build_model(cfg: TrainConfig, device: torch.device, mesh, *, frozen_only: bool = False) -> BuiltModel:
    """The run's model, sharded with FSDP2 over ``mesh``, its weights loaded (``model.path``) or randomly
    initialised, freezing and LoRA applied. ``frozen_only``: read only the frozen parameters from
    ``model.path`` (a resumed run restores the trainable ones from its checkpoint)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from bagel import BagelBackendConfig, BagelForUnifiedMultimodal
    from bagel.train.distributed import apply_fsdp2

    config = bagel_config(cfg)
    backend = BagelBackendConfig(
        attention=cfg.model.attention, mot=cfg.model.mot, patch_embed=cfg.model.patch_embed
    )
    param_dtype = DTYPES[cfg.model.param_dtype]
    from_checkpoint = cfg.model.path is not None
    if from_checkpoint:
        with torch.device("meta"):
            model = BagelForUnifiedMultimodal(config, backend=backend)
    else:
        torch.manual_seed(cfg.model.init_seed)
        model = BagelForUnifiedMultimodal(config, backend=backend)
        model.initialize_weights()
    model.to(param_dtype)
    frozen = apply_freeze(model, list(cfg.finetune.freeze)) if cfg.finetune.mode == "full" else []
    lora = _apply_lora(model, cfg) if cfg.finetune.mode == "lora" else None
    if lora is not None:
        adapter_dtype = param_dtype if cfg.finetune.lora_dtype == "param" else DTYPES[cfg.finetune.lora_dtype]
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(adapter_dtype)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: finetune.freeze froze every parameter")
    n_params = sum(p.numel() for p in model.parameters())
    compute = cfg.precision.compute_dtype
    if compute == "auto":
        compute = "bfloat16" if device.type == "cuda" else "float32"
    mp = MixedPrecisionPolicy(
        param_dtype=DTYPES[compute] if DTYPES[compute] != param_dtype else None,
        reduce_dtype=torch.float32,
    )
    if not from_checkpoint:
        model.to(device)
    apply_fsdp2(
        model,
        mesh=mesh,
        activation_checkpointing=cfg.precision.activation_checkpointing,
        reshard_after_forward=cfg.distributed.reshard_after_forward,
        mp_policy=mp,
        shard_vit_layers=cfg.model.vit_stand_in,
    )
    if from_checkpoint:
        model.to_empty(device=device)
        _recompute_buffers(model)
        only = {n for n, p in model.named_parameters() if not p.requires_grad} if frozen_only else None
        load_sharded_checkpoint(model, cfg.model.path, stage=cfg.model.stage, only=only)
    if lora is not None:
        _init_lora(model, cfg.model.init_seed)
    model.train()
    return BuiltModel(
        model=model,
        mesh=mesh,
        n_params=n_params,
        lora_config=lora,
        frozen=frozen,
        loaded_from=cfg.model.path if from_checkpoint else None,
    )


@torch.no_grad()
def load_sharded_checkpoint(
    model: nn.Module, path: str, *, stage: int, strict: bool = True, only: set[str] | None = None
) -> dict:
    """Read this rank's rows of every parameter of the sharded ``model`` (a
    :class:`bagel.BagelForUnifiedMultimodal`, PEFT adapters allowed: they are not in the checkpoint)
    from the BAGEL checkpoint at ``path``, converting from the file's dtype chunk by chunk.

    Checkpoint keys are classified as :func:`bagel.io.checkpoint.load_checkpoint_into` does (VAE keys,
    recomputed RoPE tables, ``_extra_state`` and, at stage 1, generation keys are skipped). A model
    parameter the checkpoint lacks, a shape that does not match, and (``strict``) a checkpoint key that
    matches no parameter are ValueErrors, raised before any data is read. ``only``: parameter names to
    read (the others keep their values; everything is still validated). Returns a small report."""
    from bagel.io.checkpoint import PATCH_EMBED_KEY, classify_key
    from bagel.io.files import find_weight_files
    from bagel.train.tensor_files import TensorFile

    files = [TensorFile(f) for f in find_weight_files(path)]
    try:
        where: dict[str, TensorFile] = {}
        for tf in files:
            for key in tf.keys():
                if key in where:
                    raise ValueError(
                        f"checkpoint key {key!r} is held by both {where[key].path} and {tf.path}"
                    )
                where[key] = tf
        params = {checkpoint_key(n): p for n, p in model.named_parameters() if "lora_" not in n}
        missing = sorted(k for k in params if k not in where)
        if missing:
            raise ValueError(
                f"{path}: {len(missing)} model parameter(s) missing from the checkpoint: "
                f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
            )
        skipped, unexpected = [], []
        for key in where:
            if key in params:
                continue
            kind = classify_key(key)
            if kind in ("vae", "recomputed", "extra") or (kind == "gen" and stage == 1):
                skipped.append(key)
            else:
                unexpected.append(key)
        if strict and unexpected:
            raise ValueError(
                f"{path}: {len(unexpected)} checkpoint key(s) match no model parameter: "
                f"{', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}"
            )
        for key, p in params.items():
            shape = where[key].shape(key)
            conv = key == PATCH_EMBED_KEY and len(shape) == 4
            want = (shape[0], math.prod(shape[1:])) if conv else shape
            if tuple(want) != tuple(p.shape):
                raise ValueError(
                    f"{where[key].path}: checkpoint key {key!r} has shape {list(shape)} but the model "
                    f"expects {list(p.shape)}; does the config match the checkpoint?"
                )
            if where[key].dtype(key).is_floating_point != p.dtype.is_floating_point:
                raise ValueError(
                    f"{where[key].path}: {key!r} is {where[key].dtype(key)}, the model's {p.dtype}"
                )
        names = {checkpoint_key(n): n for n, _ in model.named_parameters()}
        for key, p in params.items():
            if only is not None and names[key] not in only:
                continue
            tf = where[key]
            start, stop = local_rows(p)
            local = _local(p)
            shape = tf.shape(key)
            if key == PATCH_EMBED_KEY and len(shape) == 4:  # Conv2d [O, C, p, p] -> Linear [O, p*p*C]
                rows = torch.empty((stop - start, *shape[1:]), dtype=local.dtype, device=local.device)
                tf.read_rows(key, start, stop, rows)
                local.copy_(rows.permute(0, 2, 3, 1).reshape(local.shape))
            else:
                tf.read_rows(key, start, stop, local)
        return {"loaded": len(params), "skipped": skipped, "unexpected": unexpected}
    finally:
        for tf in files:
            tf.close()

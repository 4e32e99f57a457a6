"""The configuration of ``bagel-train``: a typed dataclass tree, read from YAML, overridden from the
command line with ``section.field=value``, every field documented.

    config = load_config("run.yaml", ["optim.lr=2e-5", "checkpoint.every=200"])
    print(describe_config())               # every field, its type, default and meaning (--help-config)

Rules:

- Every field has a default; a YAML file or an override names only what it changes.
- An unknown or misspelt key is a :class:`ConfigError` naming the full dotted key and, when one is
  close, the key that was meant (``unknown key 'optim.lrr'; did you mean 'optim.lr'?``).
- Values are checked against the field's type (int, float, bool, str, a fixed set of choices, lists,
  optional fields) and against its range (:meth:`TrainConfig.validate`); an error names the field.
- Override values are parsed as YAML scalars or flow lists (``finetune.freeze=[vit,und]``,
  ``model.path=null``); numbers such as ``1e-4`` are accepted for float fields.
- ``dict`` fields (``model.tiny``, ``data.options``) take free keys, checked by the code that reads them.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ConfigError",
    "TrainConfig",
    "ModelSection",
    "VaeSection",
    "DataSection",
    "LossSection",
    "OptimSection",
    "ScheduleSection",
    "PrecisionSection",
    "EmaSection",
    "CheckpointSection",
    "ExportSection",
    "LoggingSection",
    "FinetuneSection",
    "DistributedSection",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "describe_config",
    "config_keys",
]


class ConfigError(ValueError):
    """A bad configuration: an unknown key, a value of the wrong type, or a value out of range."""


def doc(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation (printed by :func:`describe_config`)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


# ---------------------------------------------------------------------------------------------- sections
@dataclass
class ModelSection:
    path: str | None = doc(
        None,
        "BAGEL checkpoint folder (config.json or llm_config.json + vit_config.json, and ema.safetensors or "
        "an index of shards). Each rank reads only its own slices of every tensor, in model.param_dtype. "
        "null: a randomly initialised model described by model.tiny (tests, the built-in example).",
    )
    tiny: dict = doc(
        {},
        "Keyword arguments of BagelConfig.tiny for the random model when model.path is null (e.g. "
        "llm_hidden, llm_layers, vocab_size, vit_patch, latent_channels, max_latent_size, vae_config).",
    )
    stage: int = doc(
        2, "1: understanding only (CE; dense layers, no generation weights); 2: also generation (MSE)."
    )
    param_dtype: Literal["float32", "bfloat16"] = doc(
        "float32",
        "dtype in which the sharded parameters (the optimizer's master weights) are stored and read "
        "from the checkpoint. bfloat16 halves their memory (e.g. a frozen base under LoRA).",
    )
    init_seed: int = doc(0, "Seed of the random initialisation (model.path null) and of new LoRA weights.")
    attention: str = doc("auto", "Attention backend: auto, triton, flex or sdpa.")
    mot: str = doc("auto", "MoT routed-ops backend: auto, triton or torch.")
    patch_embed: str = doc("auto", "ViT patch-embedding backend: auto, cuda, cpu_ext or torch.")
    vit_stand_in: bool = doc(
        True,
        "Shard every ViT layer as its own FSDP2 unit (a pack without an image runs a one-patch stand-in); "
        "false keeps the ViT in the root unit.",
    )


@dataclass
class VaeSection:
    path: str | None = doc(
        None,
        "The FLUX autoencoder's ae.safetensors (frozen; encodes VAE images into latents). null: the FLUX "
        "architecture with random weights and the tiny config of vae.tiny (tests and the example).",
    )
    tiny: dict = doc({}, "Keyword overrides of the tiny random FLUX VAE config when vae.path is null.")
    dtype: Literal["float32", "bfloat16"] = doc("bfloat16", "dtype of the VAE's weights and encoding.")
    micro_batch_size: int = doc(8, "Images per VAE encode call (bounds the encoder's activation memory).")


def _data_config_cls():
    from bagel.data.config import DataConfig

    return DataConfig


@dataclass
class DataSection:
    source: Literal["synthetic", "example", "files"] = doc(
        "synthetic",
        "synthetic: random samples of data.kinds (no files, no tokenizer, no VAE); example: the built-in "
        "example dataset (real images, written into <output_dir>/example-data on first use); files: the "
        "dataset group of data.loader.dataset_config_file. example and files run the bagel.data pipeline "
        "(readers, transforms with CFG dropout, the streaming packer) and encode VAE images with the VAE.",
    )
    tokenizer: str | None = doc(
        None,
        "Folder of the Qwen2 tokenizer (read offline) for source=files. null: model.path's own. The "
        "example uses the built-in tiny tokenizer.",
    )
    kinds: list = doc(
        ["und", "t2i", "edit", "text"],
        "Sample kinds drawn by the synthetic source (und, t2i, edit, text), uniformly.",
    )
    loader: Any = field(
        default_factory=lambda: _data_config_cls()(),
        metadata={
            "help": "The data pipeline's settings (bagel.data.DataConfig): token budgets of the packs "
            "(max_num_tokens is also the synthetic source's pack size), CFG dropout, workers, seed."
        },
    )


@dataclass
class LossSection:
    ce_weight: float = doc(1.0, "Weight of the understanding cross-entropy in the total loss.")
    mse_weight: float = doc(1.0, "Weight of the flow-matching MSE in the total loss.")
    ce: Literal["fused", "plain"] = doc(
        "fused",
        "fused: chunked linear cross-entropy (bagel_kernels.linear_cross_entropy; the LM head never "
        "materialises the logits of every CE token at once); plain: lm_head + F.cross_entropy.",
    )
    ce_chunk_size: int | None = doc(None, "Rows per chunk of the fused CE (null: its 256 MiB default).")


@dataclass
class OptimSection:
    lr: float = doc(1e-4, "Peak learning rate (reached after schedule.warmup_steps).")
    betas: list = doc([0.9, 0.95], "AdamW betas [beta1, beta2].")
    eps: float = doc(1e-15, "AdamW epsilon (upstream BAGEL: 1e-15).")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay.")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this (0: no clipping; the norm is logged).")
    fused: bool = doc(False, "Use torch's fused AdamW (CUDA).")


@dataclass
class ScheduleSection:
    steps: int = doc(1000, "Optimizer steps of the run (the schedule's length).")
    warmup_steps: int = doc(0, "Linear warm-up from 0 to optim.lr over this many steps.")
    kind: Literal["cosine", "constant"] = doc(
        "constant", "After warm-up: cosine decay to min_lr_ratio * lr at the last step, or constant."
    )
    min_lr_ratio: float = doc(0.0, "Final learning rate of the cosine decay, as a fraction of optim.lr.")
    grad_accum: int = doc(
        1, "Micro-batches (packs) per optimizer step and rank; losses are normalised over all of them."
    )


@dataclass
class PrecisionSection:
    compute_dtype: Literal["auto", "float32", "bfloat16"] = doc(
        "auto",
        "dtype the layers compute in (FSDP2 MixedPrecisionPolicy param_dtype); gradients are reduced in "
        "float32. auto: bfloat16 on CUDA, float32 on the CPU.",
    )
    activation_checkpointing: bool = doc(True, "Recompute every decoder layer (LLM and ViT) in backward.")


@dataclass
class EmaSection:
    enabled: bool = doc(True, "Keep an exponential moving average of the trainable parameters.")
    decay: float = doc(0.9999, "ema = decay * ema + (1 - decay) * param after every optimizer step.")
    dtype: Literal["param", "float32", "bfloat16"] = doc(
        "param", "dtype of the EMA shards (param: as model.param_dtype)."
    )


@dataclass
class CheckpointSection:
    every: int = doc(500, "Save a resumable checkpoint every this many steps (0: only at the end).")
    keep: int = doc(3, "Keep the newest this many checkpoints (older ones are removed).")
    resume: str = doc(
        "auto",
        "auto: continue from the newest complete checkpoint in <output_dir>/checkpoints if there is one; "
        "none: start afresh; or the path of one checkpoint folder.",
    )
    at_end: bool = doc(True, "Also save a checkpoint after the last step.")


@dataclass
class ExportSection:
    at_end: bool = doc(True, "Export after the last step to <output_dir>/export.")
    use_ema: bool = doc(True, "Export the EMA weights (the current weights when the EMA is off).")
    dtype: Literal["bfloat16", "float32", "param"] = doc(
        "bfloat16",
        "dtype of the exported weights: bfloat16 (as the published ema.safetensors), float32, or param "
        "(each parameter's own: lossless for fp32 master weights).",
    )
    merge_lora: bool = doc(
        True, "Under LoRA: also write the merged model (config.json + ema.safetensors) beside the adapter."
    )


@dataclass
class LoggingSection:
    every: int = doc(1, "Write a JSONL record (and TensorBoard scalars) every this many steps.")
    progress: bool = doc(True, "Show a progress bar (tqdm when installed) on rank 0.")
    tensorboard: Literal["auto", "on", "off"] = doc(
        "auto", "TensorBoard event files in <output_dir>/tensorboard: auto = when tensorboard is installed."
    )
    plot: bool = doc(True, "Write <output_dir>/losses.png (CE and MSE per step) at the end.")
    sample_every: int = doc(
        0,
        "Draw logging.sample_prompts with bagel.generate every this many steps (0: never) into "
        "<output_dir>/samples/ (needs data.source example or files: the VAE and the tokenizer). Every rank "
        "gathers the full weights while sampling.",
    )
    sample_prompts: list = doc(
        ["a portrait of grace hopper", "a blue present pack"],
        "Text-to-image prompts of the periodic samples.",
    )
    sample_timesteps: int = doc(25, "Flow-matching steps per periodic sample.")
    sample_size: int | None = doc(
        None,
        "Side in pixels of the periodic samples (null: the largest the model takes, max_latent_size x 8).",
    )
    peak_tflops: float | None = doc(
        None, "Dense bf16 peak per device for MFU (null: 989 on H100/H200/H800, 312 on A100, none on CPU)."
    )


@dataclass
class FinetuneSection:
    mode: Literal["full", "lora"] = doc(
        "full", "full: train every unfrozen parameter; lora: peft LoRA adapters."
    )
    freeze: list = doc(
        [],
        "Parameters that do not train. Presets: und (understanding expert of the LLM: base attention, MLP, "
        "norms, embeddings, lm_head), gen (generation expert: *_moe_gen, norm_moe_gen), vit (the SigLIP "
        "tower), connectors (connector, vit_pos_embed, time_embedder, vae2llm, llm2vae, "
        "latent_pos_embed); any other entry is a regular expression searched in the parameter name.",
    )
    lora_r: int = doc(16, "LoRA rank r: the adapters' inner dimension (A is r x in, B is out x r).")
    lora_alpha: float = doc(32.0, "LoRA alpha (scale alpha / r).")
    lora_dropout: float = doc(0.0, "Dropout on the LoRA branch's input.")
    lora_dtype: Literal["float32", "param"] = doc(
        "float32",
        "dtype of the LoRA adapters and their optimizer states: float32 (as peft does by default) on a base "
        "of model.param_dtype, or param (the base's dtype).",
    )
    lora_targets: list = doc(
        ["llm_attn", "llm_mlp"],
        "Modules that get adapters. Presets: llm_attn (q/k/v/o of both experts), llm_mlp (gate/up/down of "
        "both experts), und_only / gen_only (restrict the LLM presets to one expert), vit (ViT attention "
        "and MLP); any other entry is a regular expression on the module name.",
    )


@dataclass
class DistributedSection:
    backend: Literal["auto", "nccl", "gloo"] = doc("auto", "Process-group backend (auto: nccl on CUDA).")
    hybrid_shard_size: int = doc(
        0,
        "0: shard over all ranks. n > 0: hybrid sharding, parameters sharded within groups of n ranks "
        "(e.g. one node) and replicated across groups (a 2-D device mesh).",
    )
    reshard_after_forward: bool = doc(True, "Free gathered weights after each unit's forward (saves memory).")
    timeout_s: float = doc(1800.0, "Timeout of every collective, seconds.")
    device: str | None = doc(None, "cpu, cuda (this rank's GPU) or null (cuda when available).")


@dataclass
class TrainConfig:
    """The whole ``bagel-train`` configuration."""

    output_dir: str = doc(
        "bagel-train-out",
        "Folder of the run: checkpoints/, export/, metrics.jsonl, tensorboard/, losses.png, config.yaml.",
    )
    seed: int = doc(0, "Seed of the training RNGs (noise, dropout); each rank adds its rank.")
    model: ModelSection = section(ModelSection, "The BAGEL model.")
    vae: VaeSection = section(VaeSection, "The frozen FLUX autoencoder that encodes VAE images.")
    data: DataSection = section(DataSection, "Data: source, packing, CFG dropout.")
    loss: LossSection = section(LossSection, "Loss weights and the CE implementation.")
    optim: OptimSection = section(OptimSection, "AdamW.")
    schedule: ScheduleSection = section(ScheduleSection, "Steps, warm-up, decay, gradient accumulation.")
    precision: PrecisionSection = section(PrecisionSection, "Mixed precision and activation checkpointing.")
    ema: EmaSection = section(EmaSection, "Sharded EMA of the trainable parameters.")
    checkpoint: CheckpointSection = section(CheckpointSection, "Resumable checkpoints (DCP).")
    export: ExportSection = section(ExportSection, "Export to config.json + ema.safetensors.")
    logging: LoggingSection = section(LoggingSection, "Progress bar, JSONL, TensorBoard, plot.")
    finetune: FinetuneSection = section(FinetuneSection, "Full fine-tuning or LoRA, and frozen parameters.")
    distributed: DistributedSection = section(DistributedSection, "Process group and sharding.")

    def validate(self) -> TrainConfig:
        """Range checks (types are checked on reading); returns self. ConfigError names the field."""

        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"{key}={_get(self, key)!r}: {what}")

        need(self.model.stage in (1, 2), "model.stage", "must be 1 or 2")
        need(self.schedule.steps >= 1, "schedule.steps", "must be >= 1")
        need(0 <= self.schedule.warmup_steps, "schedule.warmup_steps", "must be >= 0")
        need(self.schedule.grad_accum >= 1, "schedule.grad_accum", "must be >= 1")
        need(0.0 <= self.schedule.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", "must be in [0, 1]")
        need(self.optim.lr > 0, "optim.lr", "must be > 0")
        need(
            len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas),
            "optim.betas",
            "must be two numbers in [0, 1)",
        )
        need(self.optim.eps > 0, "optim.eps", "must be > 0")
        need(self.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        need(self.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0: no clipping)")
        need(0.0 <= self.ema.decay <= 1.0, "ema.decay", "must be in [0, 1]")
        need(self.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
        need(self.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
        need(self.logging.every >= 1, "logging.every", "must be >= 1")
        need(self.logging.sample_every >= 0, "logging.sample_every", "must be >= 0 (0: never)")
        need(
            self.logging.sample_every == 0 or self.data.source != "synthetic",
            "logging.sample_every",
            "sampling needs data.source example or files (a VAE and a tokenizer)",
        )
        need(self.logging.sample_timesteps >= 1, "logging.sample_timesteps", "must be >= 1")
        need(self.loss.ce_weight >= 0, "loss.ce_weight", "must be >= 0")
        need(self.loss.mse_weight >= 0, "loss.mse_weight", "must be >= 0")
        need(self.vae.micro_batch_size >= 1, "vae.micro_batch_size", "must be >= 1")
        need(self.distributed.hybrid_shard_size >= 0, "distributed.hybrid_shard_size", "must be >= 0")
        need(self.distributed.timeout_s > 0, "distributed.timeout_s", "must be > 0")
        need(self.finetune.lora_r >= 1, "finetune.lora_r", "must be >= 1")
        need(0 <= self.finetune.lora_dropout < 1, "finetune.lora_dropout", "must be in [0, 1)")
        try:
            self.data.loader.validate()
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc).replace("DataConfig.", "data.loader.")) from None
        need(
            self.data.source != "files" or bool(self.data.loader.dataset_config_file),
            "data.loader.dataset_config_file",
            "data.source=files needs a dataset-group YAML",
        )
        need(
            self.model.path is None or os.path.isdir(self.model.path) or os.path.isfile(self.model.path),
            "model.path",
            "does not exist",
        )
        need(
            self.finetune.mode != "lora" or bool(self.finetune.lora_targets),
            "finetune.lora_targets",
            "LoRA needs at least one target",
        )
        return self


# ---------------------------------------------------------------------------------------------- reading
def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    if cls is DataSection:
        hints["loader"] = _data_config_cls()  # the data pipeline's own dataclass, embedded
    return hints


def _field_help(cls: type, f: dataclasses.Field) -> str:
    """A field's documentation: its ``help`` metadata, else its entry in the class docstring's
    ``Attributes:`` section (the data pipeline's DataConfig documents its fields there)."""
    if f.metadata.get("help"):
        return f.metadata["help"]
    lines = (cls.__doc__ or "").splitlines()
    out, on = [], False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith(f"{f.name}:"):
            on = True
            out.append(stripped.split(":", 1)[1].strip())
        elif on and stripped and not re.match(r"^\w+:", stripped):
            out.append(stripped)
        elif on:
            break
    return " ".join(out)


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the tree under ``cls`` (sections and leaves)."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        out.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            out += _keys(hints[f.name], key + ".")
    return out


def config_keys() -> list[str]:
    """Every leaf key of the configuration, dotted (``optim.lr``, ``data.loader.seed`` ...)."""
    out = []
    for key in _keys(TrainConfig):
        parent, _, name = key.rpartition(".")
        cls = TrainConfig
        for part in parent.split(".") if parent else []:
            cls = _hints(cls)[part]
        if not dataclasses.is_dataclass(_hints(cls)[name]):
            out.append(key)
    return out


def _unknown(key: str, candidates: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:  # a misspelt section or a leaf named without its section
        leaf = key.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf][:1] or difflib.get_close_matches(
            leaf, candidates, n=1, cutoff=0.75
        )
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (bagel-train --help-config lists every key)")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """``value`` as type ``tp`` (a YAML scalar or list); ConfigError naming ``key`` otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, a, value)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and "on" in choices and "off" in choices:
            value = "on" if value else "off"  # YAML 1.1 reads on / off as booleans
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(repr, choices))}{hint}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    if tp is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):  # one entry
            return [value]
        raise ConfigError(f"{key}={value!r}: expected a list")
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}={value!r}: expected a mapping")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a bug in the tree, not in the input


def _fill(obj: Any, data: dict, prefix: str, all_keys: list[str]) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}")
    hints = _hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in names:
            raise _unknown(key, all_keys)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if value is None:
                continue
            _fill(getattr(obj, name), value, key + ".", all_keys)
        else:
            setattr(obj, name, _coerce(key, tp, value))


def config_from_dict(data: dict | None) -> TrainConfig:
    """A validated :class:`TrainConfig` from a nested mapping (as read from YAML)."""
    config = TrainConfig()
    _fill(config, data or {}, "", _keys(TrainConfig))
    return config.validate()


def config_to_dict(config: Any) -> dict:
    """The nested mapping of a config (its YAML form)."""
    return dataclasses.asdict(config)


def _parse_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``section.field=value`` overrides applied to ``config`` (in place, then validated). A value is
    read as YAML (``true``, ``null``, ``[a, b]``, ``3e-4``); ``model.tiny.llm_hidden=128`` sets one
    entry of a dict field."""
    all_keys = _keys(TrainConfig)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        value = _parse_scalar(text)
        parts = key.split(".")
        obj: Any = config
        for i, part in enumerate(parts):
            here = ".".join(parts[: i + 1])
            if isinstance(obj, dict):  # an entry of a dict field: the rest of the key names it
                obj[".".join(parts[i:])] = value
                break
            if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
                raise _unknown(key if dataclasses.is_dataclass(obj) else here, all_keys)
            tp = _hints(type(obj))[part]
            last = i == len(parts) - 1
            if dataclasses.is_dataclass(tp):
                if last:
                    if not isinstance(value, dict):
                        raise ConfigError(f"{key} is a section; set its fields ({key}.<field>=value)")
                    _fill(getattr(obj, part), value, key + ".", all_keys)
                obj = getattr(obj, part)
            elif last:
                setattr(obj, part, _coerce(key, tp, value))
            elif tp is dict:
                obj = getattr(obj, part)
            else:
                raise _unknown(key, all_keys)
    return config.validate()


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The configuration of a run: defaults, then the YAML file ``path`` (if any), then ``overrides``."""
    data: dict = {}
    if path is not None:
        import yaml

        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError(f"config file {path!r} cannot be read ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {path!r} must hold a mapping of sections, got {type(data).__name__}"
            )
    config = TrainConfig()
    _fill(config, data, "", _keys(TrainConfig))
    return apply_overrides(config, list(overrides or []))


def describe_config(config: TrainConfig | None = None) -> str:
    """Every key with its type, value (default, or ``config``'s) and documentation, as YAML comments."""
    import json

    config = config or TrainConfig()
    lines = ["# bagel-train configuration: every key, its type, default and meaning.", ""]

    def walk(obj: Any, indent: str) -> None:
        hints = _hints(type(obj))
        for f in dataclasses.fields(obj):
            tp = hints[f.name]
            help_text = _field_help(type(obj), f)
            if dataclasses.is_dataclass(tp):
                lines.extend(f"{indent}# {line}" for line in textwrap.wrap(help_text, 100 - len(indent)))
                lines.append(f"{indent}{f.name}:")
                walk(getattr(obj, f.name), indent + "  ")
                lines.append("")
                continue
            value = getattr(obj, f.name)
            wrapped = textwrap.wrap(f"{help_text} [{_type_name(tp)}]", 100 - len(indent))
            lines.extend(f"{indent}# {line}" for line in wrapped)
            lines.append(f"{indent}{f.name}: {json.dumps(value)}")

    walk(config, "")
    return "\n".join(lines).rstrip() + "\n"

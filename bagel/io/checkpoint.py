"""Checkpoint I/O for BAGEL: ``ema.safetensors`` keys map one to one onto the model's parameter names.

Keys fall into five groups (regexes below):

    und      understanding side: LLM base weights, ViT, connector, vit_pos_embed       (stages 1 and 2)
    gen      generation side: ``*_moe_gen`` siblings, norm_moe_gen, time_embedder,
             vae2llm, llm2vae, latent_pos_embed                                          (stage 2 only)
    vae      ``encoder.*`` / ``decoder.*`` of the VAE: recognised, reported, never loaded
    recomputed  ``vit_model.vision_model.rope.{cos,sin}_{h,w}``: upstream's ViT RoPE buffers; the model
             computes these tables from the patch positions, so they are reported, never loaded
    extra    ``*._extra_state``: ignored
    unknown  anything else

Loading is all or nothing: every file's header is read and validated first (JSON, dtypes, shapes,
data offsets against the file's size), keys are classified and matched to the model (shape, and a
floating parameter only takes floating data), every file is opened, and only then is anything copied;
any error before that point leaves the model exactly as it was. Shard paths of an index must stay inside
the checkpoint folder (no ``..``, no absolute path, no symlink leading out; the one exception is a
Hugging Face cache snapshot, whose files are symlinks into the repository's ``blobs/`` folder). Every
unreadable input raises ValueError naming the file and the field.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from bagel.extras import needs_extra
from bagel.io.files import ST_FLOAT_DTYPES, WEIGHTS_NAME, find_weight_files, read_safetensors_header

__all__ = [
    "LoadReport",
    "classify_key",
    "load_checkpoint_into",
    "save_checkpoint",
    "WEIGHTS_NAME",
]

logger = logging.getLogger(__name__)


_LAYER = r"^language_model\.model\.layers\.\d+\."
_UND = [
    r"^language_model\.model\.embed_tokens\.weight$",
    r"^language_model\.model\.norm\.weight$",
    r"^language_model\.lm_head\.weight$",
    _LAYER + r"self_attn\.[qkv]_proj\.(weight|bias)$",
    _LAYER + r"self_attn\.o_proj\.weight$",
    _LAYER + r"self_attn\.[qk]_norm\.weight$",
    _LAYER + r"mlp\.(gate|up|down)_proj\.weight$",
    _LAYER + r"(input_layernorm|post_attention_layernorm)\.weight$",
    r"^vit_model\.vision_model\.",
    r"^connector\.fc[12]\.(weight|bias)$",
    r"^vit_pos_embed\.pos_embed$",
]
_GEN = [
    _LAYER + r"self_attn\.[qkv]_proj_moe_gen\.(weight|bias)$",
    _LAYER + r"self_attn\.o_proj_moe_gen\.weight$",
    _LAYER + r"self_attn\.[qk]_norm_moe_gen\.weight$",
    _LAYER + r"mlp_moe_gen\.(gate|up|down)_proj\.weight$",
    _LAYER + r"(input_layernorm|post_attention_layernorm)_moe_gen\.weight$",
    r"^language_model\.model\.norm_moe_gen\.weight$",
    r"^time_embedder\.mlp\.[02]\.(weight|bias)$",
    r"^vae2llm\.(weight|bias)$",
    r"^llm2vae\.(weight|bias)$",
    r"^latent_pos_embed\.pos_embed$",
]
_VAE = [r"^encoder\.", r"^decoder\."]
_EXTRA = [r"\._extra_state$"]
# persistent buffers of upstream's 2-D ViT RoPE (RotaryEmbedding2D): tables the model recomputes
_RECOMPUTED = [r"^vit_model\.vision_model\.rope\.(cos|sin)_(h|w)$"]
_GROUPS = [("extra", _EXTRA), ("recomputed", _RECOMPUTED), ("und", _UND), ("gen", _GEN), ("vae", _VAE)]
_COMPILED = [(name, [re.compile(p) for p in pats]) for name, pats in _GROUPS]

PATCH_EMBED_KEY = "vit_model.vision_model.embeddings.patch_embedding.weight"


def classify_key(key: str) -> str:
    """``"und"``, ``"gen"``, ``"vae"``, ``"recomputed"``, ``"extra"`` or ``"unknown"`` for a checkpoint key."""
    for name, pats in _COMPILED:
        if any(p.search(key) for p in pats):
            return name
    return "unknown"


@dataclass
class LoadReport:
    """What :func:`load_checkpoint_into` did.

    Attributes:
        loaded: keys copied into the model.
        missing: model parameters/buffers the checkpoint did not provide (left as initialised).
        unexpected: checkpoint keys that match no model parameter (unknown names, or layers the model lacks).
        skipped_by_stage: generation keys not loaded because the model is stage 1.
        vae: VAE keys (``encoder.*``, ``decoder.*``), recognised and not loaded.
        converted: keys whose layout was converted on load (Conv2d patch embedding -> Linear).
        recomputed: known non-parameter keys the model computes itself instead of loading (upstream's
            ViT RoPE tables ``vit_model.vision_model.rope.{cos,sin}_{h,w}``); never an error.
        files: the weight files read.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped_by_stage: list[str] = field(default_factory=list)
    vae: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    recomputed: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)}"]
        for name in ("missing", "unexpected", "skipped_by_stage", "vae", "converted", "recomputed"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name} {len(keys)} (e.g. {', '.join(keys[:3])})")
        return "; ".join(parts)

    def __str__(self) -> str:
        return f"LoadReport({self.summary()})"


def _dtype_fits(st_dtype: str, target: torch.Tensor) -> bool:
    """Whether checkpoint data of ``st_dtype`` may be copied into ``target``: floating into floating
    (any precision), integers into integers, bools into bools; never integers/bools into floats."""
    if target.is_floating_point():
        return st_dtype in ST_FLOAT_DTYPES
    if target.dtype == torch.bool:
        return st_dtype == "BOOL"
    return st_dtype not in ST_FLOAT_DTYPES and st_dtype != "BOOL"


def _conv_to_linear_weight(w: torch.Tensor) -> torch.Tensor:
    """SigLIP Conv2d weight ``[hidden, C, p, p]`` -> Linear ``[hidden, p*p*C]`` in BAGEL's patchify order
    (row-in-patch, column-in-patch, channel)."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def _checkpoint_root(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``state_dict()`` keys are checkpoint keys: ``model.model`` for a
    ``BagelForUnifiedMultimodal`` (its :class:`bagel.model.modeling.BagelModel` container, which the class
    names through its ``checkpoint_module()`` method), else ``model``. Duck-typed, so that this lower room
    never imports the model."""
    getter = getattr(type(model), "checkpoint_module", None)
    return model.checkpoint_module() if callable(getter) else model


def load_checkpoint_into(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    stage: int,
    strict: bool = False,
) -> LoadReport:
    """Copy a BAGEL checkpoint's tensors into ``model`` (names map identity), filtered by ``stage``.

    Args:
        model: a module whose ``state_dict()`` keys are BAGEL checkpoint keys (a ``BagelModel``), or a
            ``BagelForUnifiedMultimodal`` (its ``.model`` is loaded).
        path: a checkpoint directory (or one ``.safetensors`` file).
        stage: 1 loads the understanding keys only; 2 loads generation keys too.
        strict: raise ValueError (before touching the model) when a checkpoint key matches no model
            parameter. VAE keys and stage-filtered generation keys never count as errors.

    Shape mismatches always raise ValueError. A 4-D (Conv2d) patch embedding is converted to the
    Linear layout on the fly. Returns a :class:`LoadReport`."""
    if stage not in (1, 2):
        raise ValueError(f"stage={stage!r} must be 1 or 2")
    files = find_weight_files(path)
    targets = _checkpoint_root(model).state_dict(keep_vars=True)
    report = LoadReport(files=files)
    plan = _plan_load(files, targets, stage, report)  # 1. every header validated, nothing read yet
    if strict and report.unexpected:
        raise ValueError(
            f"strict=True: {len(report.unexpected)} checkpoint key(s) match no model parameter: "
            f"{', '.join(report.unexpected[:10])}{' ...' if len(report.unexpected) > 10 else ''}"
        )
    _copy_planned(plan, targets, report)  # 2. every file opened, then 3. copied
    loaded = set(report.loaded)
    report.missing = [k for k in targets if k not in loaded]
    _log_report(path, report)
    return report


def _plan_load(files: list[str], targets: dict, stage: int, report: LoadReport) -> dict[str, list[str]]:
    """Validate every shard's header against the model (shape, dtype, duplicates) and sort its keys
    into the report; returns the keys to load, by file. Reads no tensor data."""
    plan: dict[str, list[str]] = {}
    source: dict[str, str] = {}  # key -> the file that holds it
    skip = {"vae": report.vae, "recomputed": report.recomputed, "extra": None}
    for file in files:
        for key, meta in read_safetensors_header(file).items():
            if key in source:
                raise ValueError(f"checkpoint key {key!r} is held by both {source[key]} and {file}")
            source[key] = file
            kind = classify_key(key)
            if kind == "gen" and stage == 1:
                report.skipped_by_stage.append(key)
            elif kind in skip:
                if skip[kind] is not None:
                    skip[kind].append(key)
            elif key not in targets:
                report.unexpected.append(key)
            else:
                _check_fits(file, key, meta, targets[key])
                plan.setdefault(file, []).append(key)
    return plan


def _check_fits(file: str, key: str, meta: dict, target: torch.Tensor) -> None:
    shape = tuple(meta["shape"])
    if key == PATCH_EMBED_KEY and len(shape) == 4:
        shape = (shape[0], shape[1] * shape[2] * shape[3])
    if shape != tuple(target.shape):
        raise ValueError(
            f"{file}: checkpoint key {key!r} has shape {tuple(meta['shape'])} but the model expects "
            f"{tuple(target.shape)}; does the config match the checkpoint?"
        )
    if not _dtype_fits(meta["dtype"], target):
        raise ValueError(
            f"{file}: checkpoint key {key!r} has dtype {meta['dtype']} but the model's tensor is "
            f"{target.dtype}; integer or bool data is never cast into floating parameters"
        )


def _copy_planned(plan: dict[str, list[str]], targets: dict, report: LoadReport) -> None:
    """Open every planned file (safetensors checks its own header) before the first copy, then copy."""
    with needs_extra():
        from safetensors import safe_open

    with contextlib.ExitStack() as stack, torch.no_grad():
        handles = {}
        for file in plan:
            try:
                handles[file] = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            except Exception as exc:  # safetensors raises its own error types
                raise ValueError(f"{file}: safetensors cannot open it: {exc}") from None
        for file, keys in plan.items():
            for key in keys:
                t = handles[file].get_tensor(key)
                if key == PATCH_EMBED_KEY and t.dim() == 4:
                    t = _conv_to_linear_weight(t)
                    report.converted.append(key)
                targets[key].data.copy_(t)
                report.loaded.append(key)


def _log_report(path, report: LoadReport) -> None:
    for level, keys, what in (
        (logging.WARNING, report.missing, "model key(s) missing, e.g. %s"),
        (logging.WARNING, report.unexpected, "key(s) match no parameter, e.g. %s"),
        (logging.INFO, report.vae, "VAE key(s) recognised and not loaded"),
        (logging.INFO, report.skipped_by_stage, "generation key(s) skipped for stage 1"),
    ):
        if keys:
            args = (path, len(keys), keys[:5]) if "%s" in what else (path, len(keys))
            logger.log(level, "BAGEL checkpoint %s: %d " + what, *args)


def save_checkpoint(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    config=None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    keys: Iterable[str] | None = None,
) -> str:
    """Write ``config.json`` (when ``config`` is given) and ``ema.safetensors`` with the model's state dict
    (of ``model.model`` for a ``BagelForUnifiedMultimodal``: the checkpoint keys).

    ``extra_tensors`` are added as-is (e.g. VAE weights in tests); ``keys`` restricts the saved keys.
    Returns the weight file's path."""
    with needs_extra():
        from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if config is not None:
        config.save_pretrained(path)
    sd = _checkpoint_root(model).state_dict()
    if keys is not None:
        keys = list(keys)
        sd = {k: sd[k] for k in keys}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    for k, v in (extra_tensors or {}).items():
        tensors[k] = v.detach().to("cpu").contiguous().clone()
    file = os.path.join(path, WEIGHTS_NAME)
    save_file(tensors, file, metadata={"format": "pt"})
    return file

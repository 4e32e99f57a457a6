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

Loading never leaves a model half-written by a strict failure: keys are classified from the file
headers first, errors are raised, and only then are tensors read and copied.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

__all__ = [
    "LoadReport",
    "classify_key",
    "find_weight_files",
    "read_safetensors_header",
    "load_checkpoint_into",
    "save_checkpoint",
    "WEIGHTS_NAME",
]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "ema.safetensors"
_FALLBACK_NAMES = ("model.safetensors",)
_INDEX_NAMES = ("ema.safetensors.index.json", "model.safetensors.index.json")

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


def find_weight_files(path: str | os.PathLike) -> list[str]:
    """The safetensors files of a checkpoint directory: ``ema.safetensors``, else ``model.safetensors``,
    else the shards listed by an ``*.safetensors.index.json``."""
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return [path]
    for name in (WEIGHTS_NAME, *_FALLBACK_NAMES):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            return [f]
    for name in _INDEX_NAMES:
        f = os.path.join(path, name)
        if os.path.isfile(f):
            with open(f) as fh:
                weight_map = json.load(fh)["weight_map"]
            return [os.path.join(path, s) for s in sorted(set(weight_map.values()))]
    raise ValueError(f"no {WEIGHTS_NAME} (or model.safetensors / safetensors index) found in {path!r}")


def read_safetensors_header(file: str) -> dict:
    """The JSON header of a safetensors file (``{key: {"dtype", "shape", "data_offsets"}}``), without
    reading any tensor data."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _conv_to_linear_weight(w: torch.Tensor) -> torch.Tensor:
    """SigLIP Conv2d weight ``[hidden, C, p, p]`` -> Linear ``[hidden, p*p*C]`` in BAGEL's patchify order
    (row-in-patch, column-in-patch, channel)."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def _checkpoint_root(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``state_dict()`` keys are checkpoint keys: ``model.model`` for a
    ``BagelForUnifiedMultimodal`` (its :class:`bagel.modeling.BagelModel` container), else ``model``."""
    from bagel.modeling import BagelForUnifiedMultimodal

    return model.model if isinstance(model, BagelForUnifiedMultimodal) else model


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
    from safetensors import safe_open

    if stage not in (1, 2):
        raise ValueError(f"stage={stage!r} must be 1 or 2")
    files = find_weight_files(path)
    model = _checkpoint_root(model)
    targets = model.state_dict(keep_vars=True)
    report = LoadReport(files=files)
    plan: list[tuple[str, str]] = []  # (file, key)
    for file in files:
        header = read_safetensors_header(file)
        for key, meta in header.items():
            kind = classify_key(key)
            if kind == "vae":
                report.vae.append(key)
                continue
            if kind == "extra":
                continue
            if kind == "recomputed":
                report.recomputed.append(key)
                continue
            if kind == "gen" and stage == 1:
                report.skipped_by_stage.append(key)
                continue
            target = targets.get(key)
            if target is None:
                report.unexpected.append(key)
                continue
            shape = tuple(meta["shape"])
            if key == PATCH_EMBED_KEY and len(shape) == 4:
                shape = (shape[0], shape[1] * shape[2] * shape[3])
            if shape != tuple(target.shape):
                raise ValueError(
                    f"checkpoint key {key!r} has shape {tuple(meta['shape'])} but the model expects "
                    f"{tuple(target.shape)}; does the config match the checkpoint?"
                )
            plan.append((file, key))
    if strict and report.unexpected:
        raise ValueError(
            f"strict=True: {len(report.unexpected)} checkpoint key(s) match no model parameter: "
            f"{', '.join(report.unexpected[:10])}{' ...' if len(report.unexpected) > 10 else ''}"
        )
    by_file: dict[str, list[str]] = {}
    for file, key in plan:
        by_file.setdefault(file, []).append(key)
    with torch.no_grad():
        for file, keys in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in keys:
                    t = f.get_tensor(key)
                    if key == PATCH_EMBED_KEY and t.dim() == 4:
                        t = _conv_to_linear_weight(t)
                        report.converted.append(key)
                    targets[key].data.copy_(t)
                    report.loaded.append(key)
    loaded = set(report.loaded)
    report.missing = [k for k in targets if k not in loaded]
    if report.missing:
        logger.warning(
            "BAGEL checkpoint %s: %d model key(s) missing, e.g. %s",
            path,
            len(report.missing),
            report.missing[:5],
        )
    if report.unexpected:
        logger.warning(
            "BAGEL checkpoint %s: %d key(s) match no parameter, e.g. %s",
            path,
            len(report.unexpected),
            report.unexpected[:5],
        )
    if report.vae:
        logger.info("BAGEL checkpoint %s: %d VAE key(s) recognised and not loaded", path, len(report.vae))
    if report.skipped_by_stage:
        logger.info(
            "BAGEL checkpoint %s: %d generation key(s) skipped for stage 1",
            path,
            len(report.skipped_by_stage),
        )
    return report


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

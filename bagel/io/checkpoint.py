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
import math
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from bagel.extras import needs_extra
from bagel.io.files import (
    ST_FLOAT_DTYPES,
    ST_ITEMSIZE,
    WEIGHTS_NAME,
    find_weight_files,
    read_safetensors_header,
)

__all__ = [
    "LoadReport",
    "classify_key",
    "load_checkpoint_into",
    "load_into",
    "open_checkpoint",
    "read_into",
    "READ_CHUNK_BYTES",
    "save_checkpoint",
    "WEIGHTS_NAME",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"


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
        on_meta: keys the checkpoint holds for targets on the ``meta`` device: validated, not copied
            (a meta tensor has no storage).
        files: the weight files read.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped_by_stage: list[str] = field(default_factory=list)
    vae: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    recomputed: list[str] = field(default_factory=list)
    on_meta: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)}"]
        for name in (
            "missing",
            "unexpected",
            "skipped_by_stage",
            "vae",
            "converted",
            "recomputed",
            "on_meta",
        ):
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


def open_checkpoint(files: Iterable[str], stack: contextlib.ExitStack) -> dict[str, Any]:
    """``{file: safetensors handle}`` for ``files``, each opened (header checked by safetensors) and
    closed when ``stack`` closes; ValueError naming a file safetensors refuses."""
    with needs_extra():
        from safetensors import safe_open

    handles = {}
    for file in files:
        try:
            handles[file] = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{file}: safetensors cannot open it: {exc}") from None
    return handles


def read_into(handle, key: str, out: torch.Tensor, *, row_start: int = 0) -> bool:
    """Copy checkpoint tensor ``key`` (rows ``[row_start, row_start + out.shape[0])`` of its first
    dimension; the whole tensor for a 0-d ``out``) from the open safetensors ``handle`` into ``out``,
    converting to ``out``'s dtype on the way. Reads in chunks of rows of at most
    :data:`READ_CHUNK_BYTES` in the file's dtype, so no transient larger than that exists (a bf16 load
    of an fp32 file never holds an fp32 copy of a parameter). ``out`` may be any view (a DTensor's
    local shard, a slice of a flat buffer) on any device. Returns True when the stored tensor had the
    Conv2d layout of the patch embedding and was converted to the Linear layout."""
    sl = handle.get_slice(key)
    shape = tuple(sl.get_shape())
    conv = key == PATCH_EMBED_KEY and len(shape) == 4
    with torch.no_grad():
        if out.dim() == 0 or len(shape) == 0:
            t = handle.get_tensor(key)
            out.copy_(t.reshape(out.shape))
            return conv
        rows = out.shape[0]
        inner = (math.prod(shape[1:]),) if conv else shape[1:]
        if tuple(out.shape[1:]) != tuple(inner) or out.dim() != len(inner) + 1:
            raise ValueError(
                f"{key}: stored shape {list(shape)} does not fit a target of shape {list(out.shape)}"
            )
        if isinstance(row_start, bool) or not isinstance(row_start, int):
            raise ValueError(f"row_start must be an int, got {row_start!r}")
        if row_start < 0 or row_start + rows > shape[0]:
            raise ValueError(
                f"{key}: rows [{row_start}, {row_start + rows}) outside the stored {shape[0]} rows"
            )
        row_bytes = max(1, math.prod(shape[1:]) * ST_ITEMSIZE.get(sl.get_dtype(), 4))
        step = max(1, READ_CHUNK_BYTES // row_bytes)
        for a in range(0, rows, step):
            b = min(rows, a + step)
            part = sl[row_start + a : row_start + b]
            if conv:
                part = _conv_to_linear_weight(part)
            out[a:b].copy_(part.reshape(out[a:b].shape))
    return conv


READ_CHUNK_BYTES = 64 * 1024 * 1024  # largest transient read_into holds, in the file's dtype


def load_into(
    targets: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    stage: int,
    strict: bool = False,
    before_copy: Callable[[LoadReport], None] | None = None,
) -> LoadReport:
    """Copy a BAGEL checkpoint's tensors into ``targets`` (``{checkpoint key: tensor}``, e.g. a
    ``BagelModel``'s ``state_dict(keep_vars=True)``), tensor by tensor, each straight into its target in
    the target's dtype (:func:`read_into`), filtered by ``stage``.

    1. Every file's header is read and validated against the targets (shape; floating data only into
       floating tensors), the keys sorted into the report; nothing is read yet.
    2. ``strict``: ValueError when a checkpoint key matches no target, or a target the stage needs is
       not in the checkpoint (as ``load_state_dict(strict=True)``; VAE keys, recomputed tables and
       stage-filtered generation keys never count).
    3. ``before_copy(report)`` runs (``report.missing`` is final: e.g. initialise just those), every file
       is opened, then the tensors are copied. Targets on the ``meta`` device hold no data: their keys
       are validated and listed in ``report.on_meta``, never in ``report.loaded``.

    Any error before step 3 leaves the targets as they were."""
    if stage not in (1, 2):
        raise ValueError(f"stage={stage!r} must be 1 or 2")
    files = find_weight_files(path)
    report = LoadReport(files=files)
    plan = _plan_load(files, targets, stage, report)  # 1. every header validated, nothing read yet
    planned = {k for keys in plan.values() for k in keys}
    report.missing = [k for k in targets if k not in planned]
    if strict and (report.unexpected or report.missing):
        problems = []
        for what, keys in (
            ("checkpoint key(s) match no model parameter", report.unexpected),
            ("model key(s) the stage needs are missing from the checkpoint", report.missing),
        ):
            if keys:
                problems.append(
                    f"{len(keys)} {what}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
                )
        raise ValueError(f"strict=True: {'; '.join(problems)} ({path})")
    if before_copy is not None:
        before_copy(report)
    with contextlib.ExitStack() as stack:
        handles = open_checkpoint(plan, stack)  # 2. every file opened before the first copy
        for file, keys in plan.items():
            for key in keys:
                out = targets[key]
                if out.is_meta:
                    report.on_meta.append(key)
                    continue
                if read_into(handles[file], key, out.data if isinstance(out, torch.nn.Parameter) else out):
                    report.converted.append(key)
                report.loaded.append(key)
    _log_report(path, report)
    return report


def load_checkpoint_into(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    stage: int,
    strict: bool = False,
    before_copy: Callable[[LoadReport], None] | None = None,
) -> LoadReport:
    """:func:`load_into` the state dict of ``model`` (a module whose ``state_dict()`` keys are BAGEL
    checkpoint keys, a ``BagelModel``, or a ``BagelForUnifiedMultimodal``, whose ``.model`` is loaded).

    Shape mismatches always raise ValueError. A 4-D (Conv2d) patch embedding is converted to the
    Linear layout on the fly. Returns a :class:`LoadReport`."""
    targets = _checkpoint_root(model).state_dict(keep_vars=True)
    return load_into(targets, path, stage=stage, strict=strict, before_copy=before_copy)


def _plan_load(files: list[str], targets: Mapping, stage: int, report: LoadReport) -> dict[str, list[str]]:
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
    Returns the weight file's path.

    The save is atomic per file and ordered so that a failure never pairs a new config with old
    weights: both files are first written in full under temporary names in the folder, then renamed
    over the old ones (``os.replace``), the weights first. A failure while writing (a full disk, a
    tensor that cannot be saved, a kill) leaves the previous checkpoint as it was; the temporary files
    are removed."""
    with needs_extra():
        from safetensors.torch import save_file

    path = os.fspath(path)
    sd = _checkpoint_root(model).state_dict()
    if keys is not None:
        keys = list(keys)
        unknown = [k for k in keys if k not in sd]
        if unknown:
            raise ValueError(f"keys: {len(unknown)} name(s) the model does not hold, e.g. {unknown[:3]}")
        sd = {k: sd[k] for k in keys}
    on_meta = [k for k, v in sd.items() if v.is_meta]
    if on_meta:
        raise ValueError(
            f"cannot save {len(on_meta)} tensor(s) on the meta device (no data), e.g. {on_meta[:3]}: "
            "materialise the model first (to_empty + initialize_weights, or from_pretrained)"
        )
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    for k, v in (extra_tensors or {}).items():
        tensors[k] = v.detach().to("cpu").contiguous().clone()
    file = os.path.join(path, WEIGHTS_NAME)
    config_file = os.path.join(path, CONFIG_NAME)
    tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_weights, tmp_config = file + tag, config_file + tag
    try:
        save_file(tensors, tmp_weights, metadata={"format": "pt"})
        if config is not None:
            config.to_json_file(tmp_config)
        os.replace(tmp_weights, file)
        if config is not None:
            os.replace(tmp_config, config_file)
    finally:
        for tmp in (tmp_weights, tmp_config):
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    return file

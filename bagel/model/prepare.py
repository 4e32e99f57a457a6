"""Pack preparation: the once-per-pack part of ``BagelForUnifiedMultimodal.forward``, in named steps.

``forward(**batch)`` is ``forward_prepared(prepare_pack(PackInputs(**batch)))``. :class:`PackInputs` is
the forward's documented signature, declared once; :func:`prepare_pack` turns it into a
:class:`PreparedPack` that holds only tensors, ints and prepared masks, so that the model body has no
host sync and no Python that depends on the data (``torch.compile(fullgraph=True)`` traces it).

The steps, top to bottom (each raises ValueError naming the field on bad input):

    _lengths          sequence_length, sample_lens
    _attention_mask   the pack's PackedMask (nested dense masks, or split_lens / attn_modes), and its
                      truncation to sequence_length (checked on the mask's host copy: no device read)
    _present_inputs   which optional groups are given (ViT, VAE), complete, and supported by the model
    _text             text ids and indexes
    _vit              ViT patches, indexes, position ids, the ViT's own mask (one full split per image)
    _latents          VAE latents, their token indexes, positions and flow-matching times
    _check_partition  text + ViT + VAE indexes partition range(sequence_length)
    _ce_indexes, _mse_indexes   the loss rows and labels
    checks.raise_first()        the value checks of all steps, read back in ONE host synchronisation
    _group_for_lm     the language model's grouping by expert: a PackContext (grouped/kernel path) or
                      the arguments of the LM's own forward_train (e.g. the gather/scatter reference)
    _vit_fields, _gen_fields    ViT kernel tables and fusion plan; patchified latents and the noise

Host checks raise as soon as they fail; value checks (index ranges, the partition, labels, the MSE
rows, NaN timesteps) run on the tensors' device and are read back once, after which the grouping
builds on the validated tensors without checking them again (``Qwen2Model.build_context``). Under
``FakeTensorMode`` the preparation runs outside the mode, on the real batch (:mod:`bagel.model.fake`). Shapes: L = sequence_length, N = ViT patches, V = VAE latent tokens,
P = p*p*C latent patch size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from bagel.model.fusion import float_device, float_dtype
from bagel.model.qwen2 import PackContext, Qwen2ForCausalLM
from bagel.model.validation import DeviceChecks, as_index
from bagel_kernels import PackedMask, mot
from bagel_kernels.attention import prepare_attention
from bagel_kernels.checks import as_int, as_int_list
from bagel_kernels.reference import patchify

__all__ = [
    "PackInputs",
    "PreparedPack",
    "GroupedPack",
    "ReferencePack",
    "prepare_pack",
    "patchify_latents",
]


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class PackInputs:
    """The inputs of ``BagelForUnifiedMultimodal.forward`` (the documented BAGEL signature, in its order
    and with its defaults; DESIGN.md section 2 gives their meaning). ``forward`` builds one from its
    arguments; ``prepare_pack`` takes the same arguments or one of these."""

    sequence_length: int
    packed_text_ids: torch.LongTensor
    packed_text_indexes: torch.LongTensor
    sample_lens: list[int]
    packed_position_ids: torch.LongTensor
    nested_attention_masks: list[torch.Tensor] | None = None
    split_lens: list[int] | None = None
    attn_modes: list[str] | None = None
    packed_vit_tokens: torch.Tensor | None = None
    packed_vit_token_indexes: torch.LongTensor | None = None
    packed_vit_position_ids: torch.LongTensor | None = None
    vit_token_seqlens: torch.Tensor | None = None
    padded_latent: torch.Tensor | None = None
    patchified_vae_latent_shapes: list[tuple[int, int]] | None = None
    packed_latent_position_ids: torch.LongTensor | None = None
    packed_vae_token_indexes: torch.LongTensor | None = None
    packed_timesteps: torch.Tensor | None = None
    mse_loss_indexes: torch.Tensor | None = None
    ce_loss_indexes: torch.Tensor | None = None
    packed_label_ids: torch.Tensor | None = None
    ce_loss_weights: torch.Tensor | None = None

    NAMES: ClassVar[tuple[str, ...]]  # the field names, in order (set below)

    @classmethod
    def of(cls, *args: Any, **kwargs: Any) -> PackInputs:
        """One :class:`PackInputs` as given, or one built from ``forward``'s arguments."""
        if len(args) == 1 and not kwargs and isinstance(args[0], PackInputs):
            return args[0]
        return cls(*args, **kwargs)


PackInputs.NAMES = tuple(f.name for f in dataclasses.fields(PackInputs))
_VIT_INPUTS = (
    "packed_vit_tokens",
    "packed_vit_token_indexes",
    "packed_vit_position_ids",
    "vit_token_seqlens",
)
_GEN_INPUTS = (
    "padded_latent",
    "patchified_vae_latent_shapes",
    "packed_latent_position_ids",
    "packed_vae_token_indexes",
    "packed_timesteps",
)


# ---------------------------------------------------------------------------------------------- result
@dataclass
class PreparedPack:
    """One pack made ready by ``BagelForUnifiedMultimodal.prepare_pack`` for ``forward_prepared``:
    tensors on the model's device, ints and prepared masks only. ``*_rows`` are rows of the hidden
    states in the language model's row order (grouped by expert on the kernel path); fields of absent
    inputs are None. Made as one of its two kinds, which say the language-model path it feeds:
    :class:`GroupedPack` (``Qwen2Model.decode`` on grouped rows) or :class:`ReferencePack` (the LM's
    own ``forward_train`` in pack order).

    Shapes: L = sequence_length, N = ViT patches, V = VAE latent tokens, P = p*p*C latent patch size.
    """

    sequence_length: int
    text_ids: torch.Tensor  # [n_text] token ids
    text_rows: torch.Tensor  # [n_text]
    ce_rows: torch.Tensor | None = None  # [n_ce]
    labels: torch.Tensor | None = None  # [n_ce]
    vit_tokens: torch.Tensor | None = None  # [N, 3*p*p] patchified pixels
    vit_pos: torch.Tensor | None = None  # [N] flattened 2-D patch ids
    vit_mask: PackedMask | None = None  # one full split per image, kernel tables built
    vit_rows: torch.Tensor | None = None  # [N]; None with vit_tokens set: a stand-in tied in with weight 0
    vit_fused_patch_embed: bool = False  # the fused patch-embedding op stands in for the (stock) modules
    clean: torch.Tensor | None = None  # [V, P] patchified clean latents
    noise: torch.Tensor | None = None  # [V, P] flow-matching noise
    t: torch.Tensor | None = None  # [V] shifted flow-matching time (0 = clean conditioning image)
    vae_dtype: torch.dtype | None = None  # what vae2llm computes in (its parameters' dtype)
    vae_pos: torch.Tensor | None = None  # [V] latent position ids
    vae_rows: torch.Tensor | None = None  # [V]
    mse_rows: torch.Tensor | None = None  # [n_mse]
    mse_target_rows: torch.Tensor | None = None  # [n_mse] rows of clean/noise the MSE compares against


@dataclass(kw_only=True)
class GroupedPack(PreparedPack):
    """A pack for the grouped (kernel) path: ``lm`` is the :class:`bagel.model.qwen2.PackContext` that
    ``Qwen2Model.decode`` reads; the rows are grouped by expert."""

    lm: PackContext
    lm_args: ClassVar[None] = None


@dataclass(kw_only=True)
class ReferencePack(PreparedPack):
    """A pack for a language model with its own ``forward_train`` (e.g. the gather/scatter reference):
    ``lm_args`` are that method's arguments after the hidden states; the rows are in pack order."""

    lm_args: tuple
    lm: ClassVar[None] = None


# ---------------------------------------------------------------------------------------------- validated parts
@dataclass(frozen=True)
class _Text:
    ids: torch.Tensor  # [n_text] token ids
    idx: torch.Tensor  # [n_text] positions in the pack


@dataclass(frozen=True)
class _Vit:
    tokens: torch.Tensor  # [N, 3*p*p]
    idx: torch.Tensor  # [N]
    pos: torch.Tensor  # [N]
    mask: PackedMask


@dataclass(frozen=True)
class _Latents:
    latent: torch.Tensor  # [n_img, C, H, W]
    shapes: list[tuple[int, int]]
    idx: torch.Tensor  # [V]
    pos: torch.Tensor  # [V]
    t: torch.Tensor  # [V] shifted flow-matching time


# ---------------------------------------------------------------------------------------------- steps
def prepare_pack(model: nn.Module, inputs: PackInputs) -> GroupedPack | ReferencePack:
    """Validate ``inputs`` for ``model`` (a ``BagelForUnifiedMultimodal``) and prepare everything its
    body reads: the masks with their kernel tables (the pack's and the ViT's), the language model's
    grouping by expert, the hidden-state row of every token, the patchified clean latents, the
    flow-matching times and the noise (drawn here from the global generator)."""
    cfg = model.config
    # device and dtype of the hidden states: the token embedding's, read without assuming that the
    # module is still an nn.Embedding (a user may have swapped or wrapped it)
    emb = model.get_input_embeddings()
    device, dtype = float_device(emb), float_dtype(emb)
    L, sample_lens = _lengths(inputs)
    mask = _attention_mask(inputs, sample_lens, device)
    lm_mask = mask.truncated(L)  # host check: the pad rows beyond L must form whole splits
    has_vit, has_gen = _present_inputs(inputs, cfg)

    # host checks raise at once; value checks are collected and read back in ONE synchronisation
    # before any heavy kernel is queued
    checks = DeviceChecks()
    text = _text(inputs, device, cfg.text_config.vocab_size, checks)
    pos_ids = as_index(inputs.packed_position_ids, "packed_position_ids", device)
    if pos_ids.numel() != L:
        raise ValueError(f"packed_position_ids has {pos_ids.numel()} entries, sequence_length is {L}")
    vit = _vit(model, inputs, device, checks) if has_vit else None
    gen = _latents(model, inputs, device, checks) if has_gen else None
    _check_partition(L, text.idx, vit and vit.idx, gen and gen.idx, checks)
    ce_idx, labels = _ce_indexes(inputs, L, cfg.text_config.vocab_size, device, checks)
    mse_idx, mse_target_rows = _mse_indexes(inputs, L, gen, device, checks)
    checks.raise_first()

    und = text.idx if vit is None else torch.cat([text.idx, vit.idx])
    lm = _group_for_lm(model, sample_lens, mask, lm_mask, pos_ids, und, gen and gen.idx, device, dtype)
    rows = lm.inv.long() if isinstance(lm, PackContext) and lm.inv is not None else None

    def row(idx: torch.Tensor | None) -> torch.Tensor | None:
        return idx if idx is None or rows is None else rows[idx]

    fields = dict(
        sequence_length=L, text_ids=text.ids, text_rows=row(text.idx), ce_rows=row(ce_idx), labels=labels
    )
    fields.update(_vit_fields(model, vit, row(vit and vit.idx), device))
    fields.update(_gen_fields(model, gen, row, mse_idx, mse_target_rows))
    if isinstance(lm, PackContext):
        return GroupedPack(lm=lm, **fields)
    return ReferencePack(lm_args=lm, **fields)


def _lengths(inputs: PackInputs) -> tuple[int, list[int]]:
    L = as_int(inputs.sequence_length, "sequence_length")  # 83.7, True, [L, L] refused, never truncated
    if L <= 0:
        raise ValueError(f"sequence_length must be a positive int, got {L}")
    sample_lens = as_int_list(inputs.sample_lens, "sample_lens")  # strict: 2.5, 2.0, bools, strings refused
    if sum(sample_lens) < L:
        raise ValueError(f"sum(sample_lens) = {sum(sample_lens)} is less than sequence_length = {L}")
    return L, sample_lens


def _attention_mask(inputs: PackInputs, sample_lens: list[int], device: torch.device) -> PackedMask:
    if inputs.nested_attention_masks is not None:
        given = [n for n in ("split_lens", "attn_modes") if getattr(inputs, n) is not None]
        if given:
            raise ValueError(
                f"nested_attention_masks and {' / '.join(given)} both given: they are two forms of the "
                "same mask, give one"
            )
        mask = PackedMask.from_dense(inputs.nested_attention_masks, device=device)
        if list(mask.sample_lens) != sample_lens:
            raise ValueError(
                f"nested_attention_masks have sizes {list(mask.sample_lens)} but sample_lens is {sample_lens}"
            )
        return mask
    if inputs.split_lens is None or inputs.attn_modes is None:
        raise ValueError(
            "give nested_attention_masks, or split_lens and attn_modes, to build the attention mask"
        )
    return PackedMask.from_splits(sample_lens, inputs.split_lens, inputs.attn_modes, device=device)


def _present_inputs(inputs: PackInputs, cfg) -> tuple[bool, bool]:
    """Whether the pack has ViT inputs and VAE inputs; each group complete and supported by the model."""
    has_vit = _given(
        inputs,
        _VIT_INPUTS,
        cfg.visual_und,
        "packed_vit_tokens given but the model has no ViT (visual_und=False)",
        "ViT inputs incomplete",
    )
    has_gen = _given(
        inputs,
        _GEN_INPUTS,
        cfg.visual_gen,
        "the pack has VAE inputs (padded_latent, ...) but the model is stage 1 (visual_gen=False)",
        "stage-2 inputs incomplete",
    )
    if inputs.mse_loss_indexes is not None and not has_gen and _numel(inputs.mse_loss_indexes):
        raise ValueError(
            "mse_loss_indexes given without VAE inputs (padded_latent, packed_vae_token_indexes, ...)"
        )
    return has_vit, has_gen


def _given(
    inputs: PackInputs, names: Sequence[str], supported: bool, unsupported: str, incomplete: str
) -> bool:
    if all(getattr(inputs, n) is None for n in names):
        return False
    if not supported:
        raise ValueError(unsupported)
    missing = [n for n in names if getattr(inputs, n) is None]
    if missing:
        raise ValueError(f"{incomplete}: missing {', '.join(missing)}")
    return True


def _text(inputs: PackInputs, device: torch.device, vocab: int, checks: DeviceChecks) -> _Text:
    ids = as_index(inputs.packed_text_ids, "packed_text_ids", device)
    idx = as_index(inputs.packed_text_indexes, "packed_text_indexes", device)
    if ids.numel() != idx.numel():
        raise ValueError(f"packed_text_ids has {ids.numel()} entries but packed_text_indexes {idx.numel()}")
    checks.in_range(ids, "packed_text_ids", vocab, "vocabulary size")
    return _Text(ids, idx)


def _vit(model: nn.Module, inputs: PackInputs, device: torch.device, checks: DeviceChecks) -> _Vit:
    emb = model.model.vit_model.vision_model.embeddings
    tokens = inputs.packed_vit_tokens
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] != emb.patch_dim:
        raise ValueError(
            f"packed_vit_tokens must be [num_patches, {emb.patch_dim}] (3*patch_size**2), got "
            f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}"
        )
    if not tokens.is_floating_point():
        raise ValueError(
            f"packed_vit_tokens must be floating point (normalised pixel patches), got {tokens.dtype}: "
            "raw integer pixels are not normalised"
        )
    N = tokens.shape[0]
    idx = as_index(inputs.packed_vit_token_indexes, "packed_vit_token_indexes", device)
    pos = as_index(inputs.packed_vit_position_ids, "packed_vit_position_ids", device)
    lens = as_int_list(inputs.vit_token_seqlens, "vit_token_seqlens")
    if pos.numel() != N:
        raise ValueError(
            f"packed_vit_position_ids has {pos.numel()} entries but packed_vit_tokens {N} patches"
        )
    if idx.numel() != N:
        raise ValueError(
            f"packed_vit_token_indexes has {idx.numel()} entries but packed_vit_tokens {N} patches"
        )
    if sum(lens) != N or any(n <= 0 for n in lens):
        raise ValueError(
            f"vit_token_seqlens {lens} must be positive and sum to the {N} patches of packed_vit_tokens"
        )
    limit, what = model.config.vit_max_num_patch_per_side**2, "vit_max_num_patch_per_side ** 2"
    if not emb.use_rope and emb.num_positions < limit:
        limit, what = emb.num_positions, "rows of the ViT position_embedding"
    checks.in_range(pos, "packed_vit_position_ids", limit, what)
    mask = PackedMask.from_splits(lens, lens, ["full"] * len(lens), device=device)
    return _Vit(tokens.to(device), idx, pos, mask)


def _latents(model: nn.Module, inputs: PackInputs, device: torch.device, checks: DeviceChecks) -> _Latents:
    padded_latent = inputs.padded_latent
    shapes = _latent_shapes(
        padded_latent, inputs.patchified_vae_latent_shapes, model.latent_channel, model.latent_patch_size
    )
    n_tok = sum(h * w for h, w in shapes)
    idx = as_index(inputs.packed_vae_token_indexes, "packed_vae_token_indexes", device)
    pos = as_index(inputs.packed_latent_position_ids, "packed_latent_position_ids", device)
    timesteps = inputs.packed_timesteps
    if not isinstance(timesteps, torch.Tensor):
        try:
            timesteps = torch.as_tensor(timesteps, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(
                f"packed_timesteps must be a 1-D float tensor (logits; -inf = clean): {exc}"
            ) from None
    if timesteps.dim() != 1 or not timesteps.is_floating_point():
        raise ValueError(
            f"packed_timesteps must be a 1-D float tensor (logits; -inf = clean), got {timesteps.dtype} {tuple(timesteps.shape)}"
        )
    for name, n in (
        ("packed_vae_token_indexes", idx.numel()),
        ("packed_latent_position_ids", pos.numel()),
        ("packed_timesteps", timesteps.numel()),
    ):
        if n != n_tok:
            raise ValueError(
                f"{name} has {n} entries but patchified_vae_latent_shapes give {n_tok} latent tokens"
            )
    checks.in_range(pos, "packed_latent_position_ids", model.max_latent_size**2, "max_latent_size ** 2")
    checks.add(
        torch.isnan(timesteps),
        "packed_timesteps has NaN entries: give a logit per noised token and -inf for a clean image",
    )
    t = torch.sigmoid(timesteps.to(device))
    s = model.timestep_shift
    t = s * t / (1 + (s - 1) * t)  # shifted flow-matching time in [0, 1]; 0 for clean (-inf) tokens
    return _Latents(padded_latent.to(device), shapes, idx, pos, t)


def _latent_shapes(padded_latent, shapes, C: int, p: int) -> list[tuple[int, int]]:
    """``patchified_vae_latent_shapes`` as int pairs, checked against ``padded_latent [n, C, H, W]``."""
    if not isinstance(padded_latent, torch.Tensor) or padded_latent.dim() != 4 or padded_latent.shape[1] != C:
        raise ValueError(
            f"padded_latent must be [num_images, {C}, H, W] (z_channels={C}), got "
            f"{tuple(padded_latent.shape) if isinstance(padded_latent, torch.Tensor) else type(padded_latent).__name__}"
        )
    if not padded_latent.is_floating_point():
        raise ValueError(
            f"padded_latent must be a floating-point tensor (VAE latents), got {padded_latent.dtype}"
        )
    try:
        shapes = [(as_int(h, "h"), as_int(w, "w")) for h, w in shapes]
    except (TypeError, ValueError):
        raise ValueError(
            f"patchified_vae_latent_shapes must be a list of (h, w) int pairs, got {shapes!r}"
        ) from None
    n_img, _, H, W = padded_latent.shape
    if len(shapes) != n_img:
        raise ValueError(
            f"patchified_vae_latent_shapes has {len(shapes)} entries but padded_latent {n_img} images"
        )
    for i, (h, w) in enumerate(shapes):
        if h <= 0 or w <= 0 or h * p > H or w * p > W:
            raise ValueError(
                f"patchified_vae_latent_shapes[{i}] = {(h, w)} does not fit padded_latent of {H}x{W} with latent_patch_size {p}"
            )
    return shapes


def _check_partition(L: int, text_idx: torch.Tensor, vit_idx, vae_idx, checks: DeviceChecks) -> None:
    parts = [
        ("packed_text_indexes", text_idx),
        ("packed_vit_token_indexes", vit_idx),
        ("packed_vae_token_indexes", vae_idx),
    ]
    parts = [(n, t) for n, t in parts if t is not None]
    total = sum(t.numel() for _, t in parts)
    if total != L:
        counts = " + ".join(f"{n} ({t.numel()})" for n, t in parts)
        raise ValueError(
            f"{counts} = {total} tokens but sequence_length = {L}: the index sets must partition range(sequence_length)"
        )
    for n, t in parts:
        checks.in_range(t, n, L, "sequence_length")
    # the grouping's own partition check (understanding = text + ViT, generation = VAE), as a device
    # flag read back with the others; Qwen2Model.build_context then builds GroupedOrder.from_checked
    und = torch.cat([t for n, t in parts if n != "packed_vae_token_indexes"])
    gen = vae_idx if vae_idx is not None else und.new_zeros(0)
    checks.add(
        mot.GroupedOrder.partition_flags(und, gen, L),
        "packed_text_indexes, packed_vit_token_indexes and packed_vae_token_indexes overlap: "
        "they must partition range(sequence_length)",
    )


def _ce_indexes(inputs: PackInputs, L: int, vocab: int, device: torch.device, checks: DeviceChecks):
    """``(ce_loss_indexes, packed_label_ids)`` as long tensors, or ``(None, None)`` without CE."""
    if inputs.ce_loss_indexes is None:
        return None, None
    if inputs.packed_label_ids is None:
        raise ValueError("ce_loss_indexes given without packed_label_ids")
    idx = as_index(inputs.ce_loss_indexes, "ce_loss_indexes", device, allow_bool_len=L)
    labels = as_index(inputs.packed_label_ids, "packed_label_ids", device)
    if labels.numel() != idx.numel():
        raise ValueError(
            f"packed_label_ids has {labels.numel()} entries but ce_loss_indexes selects {idx.numel()}"
        )
    checks.in_range(idx, "ce_loss_indexes", L, "sequence_length")
    checks.add(
        ((labels < 0) & (labels != -100)) | (labels >= vocab),
        f"packed_label_ids has entries outside [0, {vocab}) (and not the ignore index -100)",
    )
    return idx, labels


def _mse_indexes(
    inputs: PackInputs, L: int, gen: _Latents | None, device: torch.device, checks: DeviceChecks
):
    """``(mse_loss_indexes, rows of the VAE token list they select)``, or ``(None, None)``.

    Checked (without a sync) to be exactly the noised VAE tokens in ``packed_vae_token_indexes`` order:
    upstream pairs ``hidden[mse_loss_indexes]`` with ``target[t > 0]``."""
    if gen is None or inputs.mse_loss_indexes is None:
        return None, None
    mse_idx = as_index(inputs.mse_loss_indexes, "mse_loss_indexes", device, allow_bool_len=L)
    msg = "mse_loss_indexes must list the noised VAE tokens (finite packed_timesteps), in packed_vae_token_indexes order"
    checks.in_range(mse_idx, "mse_loss_indexes", L, "sequence_length")
    noised = gen.t > 0
    rank = torch.full((L,), -1, dtype=torch.long, device=gen.idx.device)
    rank[gen.idx.clamp(0, L - 1)] = torch.arange(gen.idx.numel(), device=gen.idx.device)
    rows = rank[
        mse_idx.clamp(0, L - 1)
    ]  # position of each MSE token in the VAE token list (-1: not a VAE token)
    checks.add((noised.sum() != mse_idx.numel()).reshape(1), msg)
    if rows.numel():
        checks.add(rows < 0, msg)
        checks.add(~noised[rows.clamp_min(0)], msg)
        if rows.numel() > 1:
            checks.add(rows[1:] <= rows[:-1], msg)
    return mse_idx, rows.clamp_min(0)


def _group_for_lm(
    model, sample_lens, mask, lm_mask, pos_ids, und, vae_idx, device, dtype
) -> PackContext | tuple:
    """The language model's side of the pack, from validated inputs: the grouped path's
    :class:`PackContext` (grouping by expert, the mask truncated to L with its row index and kernel
    tables, RoPE tables), or the arguments after the hidden states of a language model's own
    ``forward_train`` (e.g. the gather/scatter reference), which checks them itself."""
    lm = model.model.language_model
    if not _grouped_lm(lm):
        return (sample_lens, mask, pos_ids, *((und, vae_idx) if model.use_moe else (None, None)))
    routing = None
    if model.use_moe:
        gen = vae_idx if vae_idx is not None else torch.zeros(0, dtype=torch.long, device=device)
        routing = (und, gen)
    return lm.model.build_context(lm_mask, pos_ids, routing, device=device, dtype=dtype)


def _grouped_lm(lm: nn.Module) -> bool:
    """Whether ``lm.forward_train`` is :class:`Qwen2ForCausalLM`'s own (prepare_context + decode),
    which the model may then call in two parts; subclasses with their own forward_train are called whole."""
    return isinstance(lm, Qwen2ForCausalLM) and type(lm).forward_train is Qwen2ForCausalLM.forward_train


def _vit_fields(model: nn.Module, vit: _Vit | None, rows: torch.Tensor | None, device: torch.device) -> dict:
    """The ViT's fields of the pack, its kernel tables built and its fusion plan decided; under FSDP2
    (``model.vit_stand_in``) a pack without an image gets a one-patch stand-in, so that every rank
    runs every ViT layer's unit."""
    cfg, m = model.config, model.model
    if vit is not None:
        out = dict(vit_tokens=vit.tokens, vit_pos=vit.pos, vit_mask=vit.mask, vit_rows=rows)
    elif cfg.visual_und and model.vit_stand_in:
        out = dict(
            vit_tokens=torch.zeros(1, m.vit_model.vision_model.embeddings.patch_dim, device=device),
            vit_pos=torch.zeros(1, dtype=torch.long, device=device),
            vit_mask=PackedMask.from_splits([1], [1], ["full"], device=device),
        )
    else:
        return {}
    vc = cfg.vision_config
    vit_dtype = float_dtype(m.vit_model)
    # the fused patch embedding stands in for the modules this pack only if they are stock
    out["vit_fused_patch_embed"] = m.vit_model.fusion_plan()
    head_dim = vc.hidden_size // vc.num_attention_heads
    prepare_attention(out["vit_mask"], device, vit_dtype, head_dim, model.backend.attention)
    return out


def _gen_fields(model: nn.Module, gen: _Latents | None, row, mse_idx, mse_target_rows) -> dict:
    """The generation fields: patchified clean latents, the noise (global generator), times, rows."""
    if gen is None:
        return {}
    clean = patchify_latents(gen.latent, gen.shapes, model.latent_patch_size)  # [V, P]
    out = dict(
        clean=clean,
        noise=torch.randn_like(clean),
        t=gen.t,
        vae_dtype=float_dtype(model.model.vae2llm),
        vae_pos=gen.pos,
        vae_rows=row(gen.idx),
    )
    if mse_idx is not None:
        out.update(mse_rows=row(mse_idx), mse_target_rows=mse_target_rows)
    return out


def patchify_latents(padded_latent: torch.Tensor, shapes: Sequence[tuple[int, int]], p: int) -> torch.Tensor:
    """``[n, C, H, W]`` latents -> ``[sum(h*w), p*p*C]`` tokens, image by image, row-major over the
    ``h x w`` patch grid, each token ordered (row in patch, column in patch, channel) as upstream."""
    crops = (latent[:, : h * p, : w * p] for latent, (h, w) in zip(padded_latent, shapes, strict=True))
    return torch.cat([patchify(x, p) for x in crops], dim=0)


def _numel(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    try:
        return len(x)
    except TypeError:
        return 1

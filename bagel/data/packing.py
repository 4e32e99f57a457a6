"""Build ``BagelForUnifiedMultimodal.forward`` inputs from samples, the way BAGEL's data pipeline
(``PackedDataset.pack_sequence`` / ``to_tensor``) packs them.

A sample is a list of segments, each its own attention split:

    Text(ids, loss)        [bos] + ids, then [eos]; ``causal``; labels = ids + [eos] (next token) when
                           ``loss``; positions advance by the split length
    VitImage(pixels)       [start_of_image] + ViT patches + [end_of_image]; ``full``; one RoPE position
                           for the whole split, then +1
    VaeImage(latent, ...)  [start_of_image] + latent tokens + [end_of_image]; a clean conditioning
                           image is ``full`` with timestep -inf (position then +1); an image to
                           generate is ``noise`` with one random timestep logit ~ N(0, 1) for all its
                           tokens, MSE on them, and the position does not advance
    DroppedImage()         a conditioning image removed by CFG dropout: no tokens, position +1

Convenience samples: :class:`TextSample`, :class:`UnderstandingSample`, :class:`T2ISample`,
:class:`EditSample` (or a plain list of segments / :class:`Sample`). :func:`pack_samples` returns a
dict holding exactly the forward's keyword arguments; with ``max_num_tokens`` the pack is padded
flex-style by a trailing pad sample (one ``causal`` split) so that ``sum(sample_lens) ==
max_num_tokens`` while ``sequence_length`` counts the real tokens.

VAE images enter as latents ``[z_channels, h*p, w*p]`` (already encoded; ``p`` = latent patch size),
so the dict carries ``padded_latent`` rather than upstream's ``padded_images``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bagel_kernels import PackedMask
from bagel_kernels.checks import as_int, as_int_list
from bagel_kernels.reference import patchify

__all__ = [
    "SpecialTokens",
    "Text",
    "VitImage",
    "VaeImage",
    "DroppedImage",
    "Sample",
    "TextSample",
    "UnderstandingSample",
    "T2ISample",
    "EditSample",
    "pack_samples",
    "sample_num_tokens",
    "patchify",
    "flattened_position_ids",
    "len2weight",
    "synthetic_sample",
    "synthetic_samples",
]


# ---------------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the packer inserts: ``bos`` (BAGEL: ``<|im_start|>``), ``eos`` (``<|im_end|>``),
    ``start_of_image`` (``<|vision_start|>``), ``end_of_image`` (``<|vision_end|>``)."""

    bos: int
    eos: int
    start_of_image: int
    end_of_image: int

    @classmethod
    def qwen2(cls) -> SpecialTokens:
        """The Qwen2.5 tokenizer ids BAGEL uses."""
        return cls(bos=151644, eos=151645, start_of_image=151652, end_of_image=151653)

    @classmethod
    def for_config(cls, config) -> SpecialTokens:
        """Qwen2.5 ids for a full-size vocabulary; for a small (test/demo) vocabulary its last four ids."""
        if not hasattr(config, "text_config"):
            raise TypeError(f"config must be a bagel.BagelConfig, got {type(config).__name__}")
        vocab = int(config.text_config.vocab_size)
        if vocab > 151653:
            return cls.qwen2()
        if vocab < 5:
            raise ValueError(f"vocab_size={vocab} is too small to hold the four special tokens")
        return cls(bos=vocab - 4, eos=vocab - 3, start_of_image=vocab - 2, end_of_image=vocab - 1)


# ---------------------------------------------------------------------------------------------- segments
@dataclass
class Text:
    """A text segment: token ids (without bos/eos). ``loss``: next-token CE on it (labels ``ids + [eos]``).
    ``special_token_loss``: CE on the closing eos too, with label ``special_token_label``."""

    ids: Sequence[int] | torch.Tensor
    loss: bool = False
    special_token_loss: bool = False
    special_token_label: int | None = None


@dataclass
class VitImage:
    """An image for the ViT: ``pixels [3, H, W]`` with H and W multiples of the ViT patch size."""

    pixels: torch.Tensor


@dataclass
class VaeImage:
    """A VAE-encoded image ``latent [z_channels, h*p, w*p]``. ``noised=True``: an image to generate
    (``noise`` split, MSE); False: a clean conditioning image (``full`` split, timestep -inf).
    ``timestep``: the logit for a noised image (default drawn from N(0, 1)).

    Before encoding (the data pipeline's output) the image may carry ``pixels [3, H, W]`` in [-1, 1]
    and ``latent=None``, H and W multiples of ``config.latent_downsample`` (VAE downsample x latent
    patch size): :func:`sample_num_tokens` counts its tokens from the pixels, and
    ``bagel.data.loader.encode_vae_images`` fills ``latent``. :func:`pack_samples` needs the latent."""

    latent: torch.Tensor | None = None
    noised: bool = True
    timestep: float | None = None
    pixels: torch.Tensor | None = None


@dataclass
class DroppedImage:
    """A conditioning image removed by classifier-free-guidance dropout: no tokens, no split, but the
    sample's RoPE position still advances by one, as upstream's ``pack_sequence`` does for a dropped
    ViT or VAE image. ``kind`` ("vit" or "vae") is kept for the record."""

    kind: str = "vit"

    def __post_init__(self) -> None:
        if self.kind not in ("vit", "vae"):
            raise ValueError(f"DroppedImage.kind must be 'vit' or 'vae', got {self.kind!r}")


Segment = Text | VitImage | VaeImage | DroppedImage


@dataclass
class Sample:
    """A generic sample: a list of segments."""

    segments: list[Segment] = field(default_factory=list)


@dataclass
class TextSample:
    """Text only, with loss (language modelling)."""

    ids: Sequence[int] | torch.Tensor

    @property
    def segments(self) -> list[Segment]:
        return [Text(self.ids, loss=True)]


@dataclass
class UnderstandingSample:
    """Visual understanding: image, prompt (no loss), answer (loss)."""

    pixels: torch.Tensor
    prompt_ids: Sequence[int] | torch.Tensor
    answer_ids: Sequence[int] | torch.Tensor

    @property
    def segments(self) -> list[Segment]:
        return [VitImage(self.pixels), Text(self.prompt_ids, loss=False), Text(self.answer_ids, loss=True)]


@dataclass
class T2ISample:
    """Text-to-image: prompt (no loss), then the image latent to generate."""

    prompt_ids: Sequence[int] | torch.Tensor
    latent: torch.Tensor
    timestep: float | None = None

    @property
    def segments(self) -> list[Segment]:
        return [Text(self.prompt_ids, loss=False), VaeImage(self.latent, noised=True, timestep=self.timestep)]


@dataclass
class EditSample:
    """Image editing (upstream's plan): the source image clean through the VAE and through the ViT,
    the instruction (no loss), then the edited image's latent to generate."""

    source_pixels: torch.Tensor
    source_latent: torch.Tensor
    instruction_ids: Sequence[int] | torch.Tensor
    target_latent: torch.Tensor
    timestep: float | None = None

    @property
    def segments(self) -> list[Segment]:
        return [
            VaeImage(self.source_latent, noised=False),
            VitImage(self.source_pixels),
            Text(self.instruction_ids, loss=False),
            VaeImage(self.target_latent, noised=True, timestep=self.timestep),
        ]


# ---------------------------------------------------------------------------------------------- utilities
def flattened_position_ids(
    num_h: int, num_w: int, max_num_patches_per_side: int, interpolate: bool = False
) -> torch.Tensor:
    """Flattened ids ``row * max_side + col`` of a ``num_h x num_w`` patch grid on a ``max_side``-wide grid.

    Extrapolation (default) keeps rows/columns as they are; interpolation maps the grid onto the whole
    ``max_side`` range (upstream's ``get_flattened_position_ids_interpolate``)."""
    for name, v in (
        ("num_h", num_h),
        ("num_w", num_w),
        ("max_num_patches_per_side", max_num_patches_per_side),
    ):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= _MAX_GRID_SIDE:
            raise ValueError(
                f"flattened_position_ids: {name} must be an int in [1, {_MAX_GRID_SIDE}], got {v!r}"
            )
    m = max_num_patches_per_side
    if interpolate:
        boundaries = torch.arange(1 / m, 1.0, 1 / m)
        rows = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / num_h), boundaries, right=True)
        cols = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / num_w), boundaries, right=True)
    else:
        if num_h > m or num_w > m:
            raise ValueError(f"a {num_h}x{num_w} patch grid does not fit the {m}x{m} position grid")
        rows, cols = torch.arange(num_h), torch.arange(num_w)
    return (rows[:, None] * m + cols[None, :]).flatten()


LOSS_REDUCTIONS = ("square", "sample", "token")
_MAX_NUM_TOKENS = 2**30 - 2  # the attention kernels' limit on a packed sequence (bagel.data.config)
_MAX_GRID_SIDE = 2**15  # patches along one side of an image (a 2**30-token image)


def len2weight(n: int, reduction: str = "square") -> float:
    """Upstream's CE weight of a text split of ``n`` tokens: 1 ("token"), 1/n ("sample"), 1/sqrt(n) ("square")."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"len2weight: n must be an int >= 0 (a token count), got {n!r}")
    if n == 0:
        return 0.0
    if reduction == "token":
        return 1.0
    if reduction == "sample":
        return 1.0 / n
    if reduction == "square":
        return 1.0 / math.sqrt(n)
    raise ValueError(f"unknown loss reduction {reduction!r}")


def _ids(x, name: str, vocab: int) -> list[int]:
    """Token ids as ints: a sequence of ints or an integer tensor/array. Floats (``1.7``), bools and
    strings (``"12"`` is not ``[1, 2]``) are refused, never coerced."""
    ids = as_int_list(x, name)
    bad = [v for v in ids if not 0 <= v < vocab]
    if bad:
        raise ValueError(f"{name} holds token ids outside [0, {vocab}): {bad[:5]}")
    return ids


def _timestep(t, name: str) -> float:
    """A noised image's timestep logit: a finite real number (no NaN, no inf, no bool or string)."""
    if isinstance(t, torch.Tensor) and t.numel() == 1 and t.dtype != torch.bool:
        t = t.item()
    if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number (a logit), got {t!r} ({type(t).__name__})")
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"{name} must be finite, got {t} (a clean image is VaeImage(noised=False))")
    return t


def _image(x, name: str, channels: int, multiple: int, what: str) -> tuple[int, int]:
    """Check a ``[C, H, W]`` floating image/latent with H, W positive multiples of ``multiple``;
    returns ``(H // multiple, W // multiple)``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor [{channels}, H, W], got {type(x).__name__}")
    if x.dim() != 3 or x.shape[0] != channels or x.shape[1] % multiple or x.shape[2] % multiple:
        raise ValueError(
            f"{name} must be [{channels}, h*{multiple}, w*{multiple}] ({what}), got {tuple(x.shape)}"
        )
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): an image needs at least one token")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x.shape[1] // multiple, x.shape[2] // multiple


def _not_meta(x: torch.Tensor, name: str) -> None:
    if x.is_meta:
        raise ValueError(f"{name} is on the meta device: it holds no values")


def _check_finite(parts: list[torch.Tensor], whole: torch.Tensor, owners: list[int], what: str) -> None:
    """NaN/inf pixels or latents would train on NaN without a word: one check over the packed tensor,
    then the first offending image is named."""
    if bool(torch.isfinite(whole).all()):
        return
    for x, si in zip(parts, owners, strict=True):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"samples[{si}] {what} holds NaN or inf values")


def _segments(sample: Any) -> list[Segment]:
    if isinstance(sample, (list, tuple)):
        segs = list(sample)
    elif hasattr(sample, "segments"):
        segs = list(sample.segments)
    else:
        raise ValueError(
            f"a sample must be a list of segments or have .segments, got {type(sample).__name__}"
        )
    if not segs:
        raise ValueError("a sample has no segments")
    for s in segs:
        if not isinstance(s, (Text, VitImage, VaeImage, DroppedImage)):
            raise ValueError(
                f"unknown segment type {type(s).__name__}; use Text, VitImage, VaeImage or DroppedImage"
            )
    if all(isinstance(s, DroppedImage) for s in segs):
        raise ValueError("a sample has no segments with tokens (only DroppedImage)")
    return segs


def sample_num_tokens(sample: Any, config) -> int:
    """Tokens ``sample`` takes in a pack (bos/eos and image bracket tokens included), without packing it:
    text ``len(ids) + 2``, a ViT image ``(H/p)*(W/p) + 2``, a VAE latent ``h*w + 2`` (or, for a VAE
    image still in pixels, ``(H/s)*(W/s) + 2`` with ``s = config.latent_downsample``), a
    :class:`DroppedImage` 0."""
    n = 0
    for seg in _segments(sample):
        if isinstance(seg, Text):
            ids = seg.ids
            if isinstance(ids, (str, bytes)):
                raise ValueError(f"text ids must be a sequence of ints, got the string {ids!r}")
            if isinstance(ids, (torch.Tensor, np.ndarray)) and ids.ndim != 1:
                raise ValueError(f"text ids must be 1-d, got shape {tuple(ids.shape)}")
            if not isinstance(ids, (Sequence, torch.Tensor, np.ndarray)):
                raise ValueError(f"text ids must be a sequence of ints, got {type(ids).__name__}")
            n += len(ids) + 2
        elif isinstance(seg, VitImage):
            p = config.vision_config.patch_size
            c = config.vision_config.num_channels
            h, w = _image(seg.pixels, "ViT pixels", c, p, f"H and W multiples of the ViT patch size {p}")
            n += h * w + 2
        elif isinstance(seg, VaeImage):
            if seg.latent is None:
                if seg.pixels is None:
                    raise ValueError("a VaeImage needs a latent or pixels")
                s = config.latent_downsample
                h, w = _image(seg.pixels, "VAE pixels", 3, s, f"H and W multiples of latent_downsample {s}")
            else:
                p = config.latent_patch_size
                h, w = _image(seg.latent, "latent", config.latent_channels, p, f"latent_patch_size {p}")
            n += h * w + 2
    return n


# ---------------------------------------------------------------------------------------------- packing
def pack_samples(
    samples: Sequence[Any],
    config,
    max_num_tokens: int | None = None,
    *,
    special_tokens: SpecialTokens | None = None,
    mask_format: str = "splits",
    rng: random.Random | int | None = None,
    loss_reduction: str = "square",
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Pack ``samples`` into one sequence and return ``BagelForUnifiedMultimodal.forward``'s kwargs.

    Args:
        samples: samples (:class:`Sample`, the convenience dataclasses, or lists of segments).
        config: the model's :class:`bagel.BagelConfig` (patch sizes, grids, latent patch size, vocab).
        max_num_tokens: pad flex-style to this many tokens with a trailing pad sample; ValueError when
            the samples need more. None: no padding.
        special_tokens: default :meth:`SpecialTokens.for_config`.
        mask_format: ``"splits"`` (``split_lens`` / ``attn_modes``) or ``"nested"`` (one dense 0/-inf
            float mask per sample, upstream's non-flex form; no padding then).
        rng: ``random.Random`` or seed for the timestep logits of noised images without one.
        loss_reduction: ``ce_loss_weights`` per text split: "square" (1/sqrt(n), upstream default),
            "sample" or "token".
        device: where to put the tensors (default CPU).

    Returns a dict with ``sequence_length``, ``sample_lens``, ``packed_text_ids``, ``packed_text_indexes``,
    ``packed_position_ids``, the mask (``split_lens`` + ``attn_modes`` or ``nested_attention_masks``),
    and when present the ViT inputs, the VAE inputs (``padded_latent`` ...), ``mse_loss_indexes``,
    ``ce_loss_indexes`` / ``packed_label_ids`` / ``ce_loss_weights``."""
    if mask_format not in ("splits", "nested"):
        raise ValueError(f"mask_format={mask_format!r} must be 'splits' or 'nested'")
    if mask_format == "nested" and max_num_tokens is not None:
        raise ValueError("max_num_tokens (flex-style padding) needs mask_format='splits'")
    if max_num_tokens is not None:
        max_num_tokens = as_int(max_num_tokens, "max_num_tokens")
    if not isinstance(loss_reduction, str) or loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction={loss_reduction!r} must be one of {', '.join(LOSS_REDUCTIONS)}")
    if max_num_tokens is not None and not 1 <= max_num_tokens <= _MAX_NUM_TOKENS:
        # 10**12 was accepted: a pad split of a trillion tokens for the forward to allocate
        raise ValueError(f"max_num_tokens must be in [1, {_MAX_NUM_TOKENS}], got {max_num_tokens}")
    if rng is not None and not isinstance(rng, random.Random):
        # random.Random takes strings and floats as seeds too: rng="x" or 2.5 were accepted silently
        rng = random.Random(as_int(rng, "rng"))
    elif rng is None:
        rng = random.Random()
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"device={device!r} is not a device ({e})") from None
    if special_tokens is not None and not isinstance(special_tokens, SpecialTokens):
        raise ValueError(f"special_tokens must be a SpecialTokens, got {type(special_tokens).__name__}")
    tok = special_tokens if special_tokens is not None else SpecialTokens.for_config(config)
    vocab = int(config.text_config.vocab_size)
    for name in ("bos", "eos", "start_of_image", "end_of_image"):
        value = getattr(tok, name)
        # bos=1.5 was accepted and truncated to 1 when the ids became a tensor
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < vocab:
            raise ValueError(f"special_tokens.{name}={value!r} must be an int in the vocabulary [0, {vocab})")
    ids = [int(getattr(tok, n)) for n in ("bos", "eos", "start_of_image", "end_of_image")]
    if len(set(ids)) != 4:
        raise ValueError(f"special_tokens must be four different ids, got {tok}")
    pack = _PackBuilder(config, tok, rng, loss_reduction, nested=mask_format == "nested")
    for si, sample in enumerate(samples):
        pack.add_sample(si, sample)
    if pack.curr == 0:
        raise ValueError("no samples to pack")
    if max_num_tokens is not None:
        pack.pad(max_num_tokens)
    out = pack.build()
    if device is not None:
        out = {k: _to_device(k, v, device) for k, v in out.items()}
    return out


def _to_device(key: str, value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if key == "nested_attention_masks":
        return [m.to(device) for m in value]
    return value


@dataclass
class _Layout:
    """Per sample and per split: lengths, attention modes, and (nested form) the dense masks."""

    sample_lens: list[int] = field(default_factory=list)
    split_lens: list[int] = field(default_factory=list)
    attn_modes: list[str] = field(default_factory=list)
    nested: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _TextTokens:
    """Every text token (bos/eos and image brackets included) and the RoPE position of every token."""

    ids: list[int] = field(default_factory=list)
    idx: list[int] = field(default_factory=list)
    pos_ids: list[int] = field(default_factory=list)


@dataclass
class _CrossEntropy:
    idx: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass
class _VitImages:
    tokens: list[torch.Tensor] = field(default_factory=list)  # [n_i, 3*p*p] per image
    pos: list[torch.Tensor] = field(default_factory=list)
    lens: list[int] = field(default_factory=list)
    idx: list[int] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)  # the sample of each image (for error messages)


@dataclass
class _VaeImages:
    latents: list[torch.Tensor] = field(default_factory=list)
    shapes: list[tuple[int, int]] = field(default_factory=list)
    pos: list[torch.Tensor] = field(default_factory=list)
    idx: list[int] = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)
    mse_idx: list[int] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)


class _PackBuilder:
    """One pack, built segment by segment: :meth:`text`, :meth:`vit_image`, :meth:`vae_image` (each
    one attention split of the current sample, returning its mode), :meth:`pad` (the flex-style pad
    sample); :meth:`build` gives ``forward``'s keyword arguments. ``curr`` counts the tokens so far and
    ``rope`` the current sample's next RoPE position."""

    def __init__(self, config, tok: SpecialTokens, rng: random.Random, loss_reduction: str, nested: bool):
        self.config = config
        self.tok = tok
        self.rng = rng
        self.loss_reduction = loss_reduction
        self.vocab = int(config.text_config.vocab_size)
        self.nested = nested
        self.curr = 0
        self.rope = 0
        self.layout = _Layout()
        self.text_tokens = _TextTokens()
        self.ce = _CrossEntropy()
        self.vit = _VitImages()
        self.vae = _VaeImages()

    def add_sample(self, si: int, sample: Any) -> None:
        segs = _segments(sample)
        self.rope = 0
        start = self.curr
        splits: list[int] = []
        modes: list[str] = []
        for seg in segs:
            split_start = self.curr
            if isinstance(seg, DroppedImage):
                self.rope += 1  # upstream: a dropped conditioning image still takes a position
                continue
            if isinstance(seg, Text):
                mode = self.text(si, seg)
            elif isinstance(seg, VitImage):
                mode = self.vit_image(si, seg)
            else:
                mode = self.vae_image(si, seg)
            splits.append(self.curr - split_start)
            modes.append(mode)
        self.layout.sample_lens.append(self.curr - start)
        self.layout.split_lens += splits
        self.layout.attn_modes += modes
        if self.nested:
            m = PackedMask.from_splits([self.curr - start], splits, modes).to_dense()
            self.layout.nested.append(torch.zeros(m.shape).masked_fill(~m, float("-inf")))

    def _text_token(self, token: int) -> None:
        self.text_tokens.ids.append(token)
        self.text_tokens.idx.append(self.curr)
        self.curr += 1

    def _same_position(self, split_start: int) -> None:
        """Every token of the split since ``split_start`` takes the current RoPE position."""
        self.text_tokens.pos_ids += [self.rope] * (self.curr - split_start)

    def text(self, si: int, seg: Text) -> str:
        """``[bos] + ids + [eos]``, causal; next-token CE on ``ids + [eos]`` when ``seg.loss``."""
        tok, ce = self.tok, self.ce
        for name in ("loss", "special_token_loss"):
            value = getattr(seg, name)
            if not isinstance(value, (bool, np.bool_)):
                # Text(loss="no") would switch the loss on: refuse anything but a bool
                raise ValueError(f"samples[{si}] Text.{name} must be a bool, got {value!r}")
        ids = _ids(seg.ids, f"samples[{si}] text ids", self.vocab)
        start = self.curr
        for token in [tok.bos] + ids:
            self._text_token(token)
        if seg.loss:
            n = self.curr - start
            ce.idx += range(start, self.curr)
            ce.weights += [len2weight(n, self.loss_reduction)] * n
            ce.labels += ids + [tok.eos]
        eos_at = self.curr
        self._text_token(tok.eos)
        if seg.special_token_loss:
            if seg.special_token_label is None:
                raise ValueError(f"samples[{si}]: special_token_loss needs a special_token_label")
            ce.idx.append(eos_at)
            ce.weights.append(1.0)
            ce.labels.append(
                _ids([seg.special_token_label], f"samples[{si}] special_token_label", self.vocab)[0]
            )
        n = self.curr - start
        self.text_tokens.pos_ids += range(self.rope, self.rope + n)
        self.rope += n
        return "causal"

    def vit_image(self, si: int, seg: VitImage) -> str:
        """``[start_of_image] + patches + [end_of_image]``, full, one RoPE position."""
        config = self.config
        if not config.visual_und:
            raise ValueError(f"samples[{si}] has a ViT image but the config has visual_und=False")
        p = config.vision_config.patch_size
        nh, nw = _image(
            seg.pixels,
            f"samples[{si}] ViT pixels",
            config.vision_config.num_channels,
            p,
            f"H and W multiples of the ViT patch size {p}",
        )
        _not_meta(seg.pixels, f"samples[{si}] ViT pixels")
        toks = patchify(seg.pixels.float(), p)
        start = self.curr
        self._text_token(self.tok.start_of_image)
        n = toks.shape[0]
        self.vit.idx += range(self.curr, self.curr + n)
        self.curr += n
        self.vit.tokens.append(toks)
        self.vit.owners.append(si)
        self.vit.lens.append(n)
        self.vit.pos.append(
            flattened_position_ids(nh, nw, config.vit_max_num_patch_per_side, bool(config.interpolate_pos))
        )
        self._text_token(self.tok.end_of_image)
        self._same_position(start)
        self.rope += 1
        return "full"

    def vae_image(self, si: int, seg: VaeImage) -> str:
        """``[start_of_image] + latent tokens + [end_of_image]``, one RoPE position: ``noise`` with MSE
        and one timestep logit (given, or drawn from N(0, 1)), or a clean ``full`` image (-inf)."""
        config, vae = self.config, self.vae
        if not config.visual_gen:
            raise ValueError(f"samples[{si}] has a VAE image but the config has visual_gen=False (stage 1)")
        lat = seg.latent
        if lat is None:
            raise ValueError(
                f"samples[{si}] has a VAE image without a latent (pixels only): encode it first with "
                "bagel.data.encode_vae_images(samples, vae)"
            )
        p = config.latent_patch_size
        h, w = _image(lat, f"samples[{si}] latent", config.latent_channels, p, f"latent_patch_size {p}")
        _not_meta(lat, f"samples[{si}] latent")
        if vae.latents and lat.dtype != vae.latents[0].dtype:
            raise ValueError(
                f"samples[{si}] latent has dtype {lat.dtype} but an earlier latent of the pack has "
                f"{vae.latents[0].dtype}: one dtype per pack (padded_latent is one tensor)"
            )
        start = self.curr
        self._text_token(self.tok.start_of_image)
        vae.latents.append(lat)
        vae.owners.append(si)
        vae.shapes.append((h, w))
        vae.pos.append(flattened_position_ids(h, w, config.max_latent_size, bool(config.interpolate_pos)))
        vae.idx += range(self.curr, self.curr + h * w)
        if not isinstance(seg.noised, (bool, np.bool_)):
            raise ValueError(f"samples[{si}] VaeImage.noised must be a bool, got {seg.noised!r}")
        if seg.noised:
            vae.mse_idx += range(self.curr, self.curr + h * w)
            if seg.timestep is None:
                t = self.rng.gauss(0.0, 1.0)
            else:
                t = _timestep(seg.timestep, f"samples[{si}] timestep")
        else:
            t = float("-inf")
        vae.timesteps += [float(t)] * (h * w)
        self.curr += h * w
        self._text_token(self.tok.end_of_image)
        self._same_position(start)
        if not seg.noised:
            self.rope += 1
        return "noise" if seg.noised else "full"

    def pad(self, max_num_tokens: int) -> None:
        """The flex-style pad sample: one causal split up to ``max_num_tokens`` (``sequence_length``
        keeps counting the real tokens)."""
        if self.curr > max_num_tokens:
            raise ValueError(
                f"the samples need {self.curr} tokens, more than max_num_tokens={max_num_tokens}"
            )
        n = max_num_tokens - self.curr
        self.layout.sample_lens.append(n)
        self.layout.split_lens.append(n)
        self.layout.attn_modes.append("causal")

    def build(self) -> dict[str, Any]:
        """``forward``'s keyword arguments (CPU tensors), in the order the data pipeline gives them."""
        text, layout = self.text_tokens, self.layout
        out: dict[str, Any] = dict(
            sequence_length=self.curr,
            sample_lens=layout.sample_lens,
            packed_text_ids=torch.tensor(text.ids, dtype=torch.long),
            packed_text_indexes=torch.tensor(text.idx, dtype=torch.long),
            packed_position_ids=torch.tensor(text.pos_ids, dtype=torch.long),
        )
        if self.nested:
            out["nested_attention_masks"] = layout.nested
        else:
            out["split_lens"] = layout.split_lens
            out["attn_modes"] = layout.attn_modes
        if self.vit.tokens:
            out.update(self._vit_inputs())
        if self.vae.latents:
            out.update(self._vae_inputs())
        if self.ce.idx:
            out["ce_loss_indexes"] = torch.tensor(self.ce.idx, dtype=torch.long)
            out["packed_label_ids"] = torch.tensor(self.ce.labels, dtype=torch.long)
            out["ce_loss_weights"] = torch.tensor(self.ce.weights, dtype=torch.float32)
        return out

    def _vit_inputs(self) -> dict[str, torch.Tensor]:
        vit = self.vit
        tokens = torch.cat(vit.tokens)
        _check_finite(vit.tokens, tokens, vit.owners, "ViT pixels")
        return dict(
            packed_vit_tokens=tokens,
            packed_vit_token_indexes=torch.tensor(vit.idx, dtype=torch.long),
            packed_vit_position_ids=torch.cat(vit.pos),
            vit_token_seqlens=torch.tensor(vit.lens, dtype=torch.int32),
        )

    def _vae_inputs(self) -> dict[str, Any]:
        vae = self.vae
        C = vae.latents[0].shape[0]
        H = max(x.shape[1] for x in vae.latents)
        W = max(x.shape[2] for x in vae.latents)
        padded = torch.zeros(len(vae.latents), C, H, W, dtype=vae.latents[0].dtype)
        for i, x in enumerate(vae.latents):
            padded[i, :, : x.shape[1], : x.shape[2]] = x
        _check_finite(vae.latents, padded, vae.owners, "latent")
        return dict(
            padded_latent=padded,
            patchified_vae_latent_shapes=vae.shapes,
            packed_latent_position_ids=torch.cat(vae.pos),
            packed_vae_token_indexes=torch.tensor(vae.idx, dtype=torch.long),
            packed_timesteps=torch.tensor(vae.timesteps, dtype=torch.float32),
            mse_loss_indexes=torch.tensor(vae.mse_idx, dtype=torch.long),
        )


# ---------------------------------------------------------------------------------------------- synthetic data
def synthetic_sample(
    kind: str,
    config,
    rng: random.Random,
    *,
    text_len: tuple[int, int] = (2, 8),
    vit_side: tuple[int, int] = (2, 4),
    latent_side: tuple[int, int] = (2, 4),
    special_tokens: SpecialTokens | None = None,
) -> Any:
    """A random sample of ``kind`` ("text", "und", "t2i", "edit") for tests, demos and benchmarks.

    ``text_len``: token counts (inclusive range); ``vit_side`` / ``latent_side``: patch-grid sides of
    ViT images / latent token-grid sides of VAE images (inclusive ranges, each side drawn separately).
    Token ids avoid the special tokens; pixels and latents are standard normal (seeded by ``rng``)."""
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    for name, bounds, lo_min, cap in (
        ("text_len", text_len, 0, 1 << 20),
        ("vit_side", vit_side, 1, 1 << 10),
        ("latent_side", latent_side, 1, 1 << 10),
    ):
        ok = isinstance(bounds, (tuple, list)) and len(bounds) == 2
        ok = ok and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
        if not ok or not lo_min <= bounds[0] <= bounds[1] <= cap:
            raise ValueError(
                f"{name} must be (lo, hi) ints with {lo_min} <= lo <= hi <= {cap}, got {bounds!r}"
            )
    tok = special_tokens if special_tokens is not None else SpecialTokens.for_config(config)
    hi = min(tok.bos, tok.eos, tok.start_of_image, tok.end_of_image, config.text_config.vocab_size)
    gen = torch.Generator().manual_seed(rng.getrandbits(31))

    def text() -> list[int]:
        return [rng.randrange(hi) for _ in range(rng.randint(*text_len))]

    def pixels() -> torch.Tensor:
        p = config.vision_config.patch_size
        return torch.randn(3, rng.randint(*vit_side) * p, rng.randint(*vit_side) * p, generator=gen)

    def latent() -> torch.Tensor:
        p = config.latent_patch_size
        return torch.randn(
            config.latent_channels,
            rng.randint(*latent_side) * p,
            rng.randint(*latent_side) * p,
            generator=gen,
        )

    if kind == "text":
        return TextSample(text())
    if kind == "und":
        return UnderstandingSample(pixels(), text(), text())
    if kind == "t2i":
        return T2ISample(text(), latent())
    if kind == "edit":
        px = pixels()
        return EditSample(px, latent(), text(), latent())
    raise ValueError(f"unknown sample kind {kind!r}; choose text, und, t2i or edit")


def synthetic_samples(kinds: Sequence[str], config, seed: int = 0, **kwargs: Any) -> list[Any]:
    """One :func:`synthetic_sample` per entry of ``kinds``, from one seeded generator."""
    if isinstance(kinds, str):
        raise ValueError(f"kinds must be a list of sample kinds, got the string {kinds!r}")
    rng = random.Random(as_int(seed, "seed"))
    return [synthetic_sample(k, config, rng, **kwargs) for k in kinds]

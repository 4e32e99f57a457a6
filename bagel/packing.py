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
from bagel_kernels.mask import _as_int, _as_int_list

__all__ = [
    "SpecialTokens",
    "Text",
    "VitImage",
    "VaeImage",
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
    ``timestep``: the logit for a noised image (default drawn from N(0, 1))."""

    latent: torch.Tensor
    noised: bool = True
    timestep: float | None = None


Segment = Text | VitImage | VaeImage


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
def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[C, H, W]`` -> ``[(H/p)*(W/p), p*p*C]``, patches row-major, each (row, column, channel) as BAGEL."""
    p = patch_size
    if image.dim() != 3:
        raise ValueError(f"image must be [C, H, W], got shape {tuple(image.shape)}")
    c, h, w = image.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = image.reshape(c, h // p, p, w // p, p)
    return torch.einsum("chpwq->hwpqc", x).reshape(-1, p * p * c)


def flattened_position_ids(
    num_h: int, num_w: int, max_num_patches_per_side: int, interpolate: bool = False
) -> torch.Tensor:
    """Flattened ids ``row * max_side + col`` of a ``num_h x num_w`` patch grid on a ``max_side``-wide grid.

    Extrapolation (default) keeps rows/columns as they are; interpolation maps the grid onto the whole
    ``max_side`` range (upstream's ``get_flattened_position_ids_interpolate``)."""
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


def len2weight(n: int, reduction: str = "square") -> float:
    """Upstream's CE weight of a text split of ``n`` tokens: 1 ("token"), 1/n ("sample"), 1/sqrt(n) ("square")."""
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
    ids = _as_int_list(x, name)
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
        if not isinstance(s, (Text, VitImage, VaeImage)):
            raise ValueError(f"unknown segment type {type(s).__name__}; use Text, VitImage or VaeImage")
    return segs


def sample_num_tokens(sample: Any, config) -> int:
    """Tokens ``sample`` takes in a pack (bos/eos and image bracket tokens included), without packing it:
    text ``len(ids) + 2``, a ViT image ``(H/p)*(W/p) + 2``, a VAE latent ``h*w + 2``."""
    n = 0
    for seg in _segments(sample):
        if isinstance(seg, Text):
            if isinstance(seg.ids, (str, bytes)):
                raise ValueError(f"text ids must be a sequence of ints, got the string {seg.ids!r}")
            n += len(seg.ids) + 2
        elif isinstance(seg, VitImage):
            p = config.vision_config.patch_size
            n += (seg.pixels.shape[-2] // p) * (seg.pixels.shape[-1] // p) + 2
        else:
            p = config.latent_patch_size
            n += (seg.latent.shape[-2] // p) * (seg.latent.shape[-1] // p) + 2
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
        max_num_tokens = _as_int(max_num_tokens, "max_num_tokens")
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    tok = special_tokens if special_tokens is not None else SpecialTokens.for_config(config)
    vocab = int(config.text_config.vocab_size)
    for name in ("bos", "eos", "start_of_image", "end_of_image"):
        if not 0 <= getattr(tok, name) < vocab:
            raise ValueError(
                f"special_tokens.{name}={getattr(tok, name)} is outside the vocabulary [0, {vocab})"
            )
    vit_p = config.vision_config.patch_size if config.visual_und else None
    vit_side = config.vit_max_num_patch_per_side
    lat_p = config.latent_patch_size
    interpolate = bool(config.interpolate_pos)

    text_ids: list[int] = []
    text_idx: list[int] = []
    pos_ids: list[int] = []
    label_ids: list[int] = []
    ce_idx: list[int] = []
    ce_w: list[float] = []
    sample_lens: list[int] = []
    split_lens: list[int] = []
    attn_modes: list[str] = []
    nested: list[torch.Tensor] = []
    vit_tokens: list[torch.Tensor] = []
    vit_pos: list[torch.Tensor] = []
    vit_lens: list[int] = []
    vit_idx: list[int] = []
    latents: list[torch.Tensor] = []
    lat_shapes: list[tuple[int, int]] = []
    lat_pos: list[torch.Tensor] = []
    vae_idx: list[int] = []
    timesteps: list[float] = []
    mse_idx: list[int] = []

    curr = 0
    for si, sample in enumerate(samples):
        segs = _segments(sample)
        rope = 0
        s_splits: list[int] = []
        s_modes: list[str] = []
        start = curr
        for seg in segs:
            split_start = curr
            if isinstance(seg, Text):
                ids = _ids(seg.ids, f"samples[{si}] text ids", vocab)
                shifted = [tok.bos] + ids
                text_ids += shifted
                text_idx += range(curr, curr + len(shifted))
                if seg.loss:
                    ce_idx += range(curr, curr + len(shifted))
                    ce_w += [len2weight(len(shifted), loss_reduction)] * len(shifted)
                    label_ids += ids + [tok.eos]
                curr += len(shifted)
                text_ids.append(tok.eos)
                text_idx.append(curr)
                if seg.special_token_loss:
                    if seg.special_token_label is None:
                        raise ValueError(f"samples[{si}]: special_token_loss needs a special_token_label")
                    ce_idx.append(curr)
                    ce_w.append(1.0)
                    label_ids.append(
                        _ids([seg.special_token_label], f"samples[{si}] special_token_label", vocab)[0]
                    )
                curr += 1
                n = curr - split_start
                pos_ids += range(rope, rope + n)
                rope += n
                mode = "causal"
            elif isinstance(seg, VitImage):
                if not config.visual_und:
                    raise ValueError(f"samples[{si}] has a ViT image but the config has visual_und=False")
                px = seg.pixels
                nh, nw = _image(
                    px,
                    f"samples[{si}] ViT pixels",
                    config.vision_config.num_channels,
                    vit_p,
                    f"H and W multiples of the ViT patch size {vit_p}",
                )
                toks = patchify(px.float(), vit_p)
                text_ids.append(tok.start_of_image)
                text_idx.append(curr)
                curr += 1
                vit_idx += range(curr, curr + toks.shape[0])
                curr += toks.shape[0]
                vit_tokens.append(toks)
                vit_lens.append(toks.shape[0])
                vit_pos.append(flattened_position_ids(nh, nw, vit_side, interpolate))
                text_ids.append(tok.end_of_image)
                text_idx.append(curr)
                curr += 1
                pos_ids += [rope] * (curr - split_start)
                rope += 1
                mode = "full"
            else:  # VaeImage
                if not config.visual_gen:
                    raise ValueError(
                        f"samples[{si}] has a VAE image but the config has visual_gen=False (stage 1)"
                    )
                lat = seg.latent
                C = config.latent_channels
                h, w = _image(lat, f"samples[{si}] latent", C, lat_p, f"latent_patch_size {lat_p}")
                if latents and lat.dtype != latents[0].dtype:
                    raise ValueError(
                        f"samples[{si}] latent has dtype {lat.dtype} but an earlier latent of the pack has "
                        f"{latents[0].dtype}: one dtype per pack (padded_latent is one tensor)"
                    )
                text_ids.append(tok.start_of_image)
                text_idx.append(curr)
                curr += 1
                latents.append(lat)
                lat_shapes.append((h, w))
                lat_pos.append(flattened_position_ids(h, w, config.max_latent_size, interpolate))
                vae_idx += range(curr, curr + h * w)
                if not isinstance(seg.noised, (bool, np.bool_)):
                    raise ValueError(f"samples[{si}] VaeImage.noised must be a bool, got {seg.noised!r}")
                if seg.noised:
                    mse_idx += range(curr, curr + h * w)
                    if seg.timestep is None:
                        t = rng.gauss(0.0, 1.0)
                    else:
                        t = _timestep(seg.timestep, f"samples[{si}] timestep")
                else:
                    t = float("-inf")
                timesteps += [float(t)] * (h * w)
                curr += h * w
                text_ids.append(tok.end_of_image)
                text_idx.append(curr)
                curr += 1
                pos_ids += [rope] * (curr - split_start)
                if not seg.noised:
                    rope += 1
                mode = "noise" if seg.noised else "full"
            s_splits.append(curr - split_start)
            s_modes.append(mode)
        sample_lens.append(curr - start)
        split_lens += s_splits
        attn_modes += s_modes
        if mask_format == "nested":
            m = PackedMask.from_splits([curr - start], s_splits, s_modes).to_dense()
            nested.append(torch.zeros(m.shape).masked_fill(~m, float("-inf")))

    if curr == 0:
        raise ValueError("no samples to pack")
    out: dict[str, Any] = dict(
        sequence_length=curr,
        sample_lens=sample_lens,
        packed_text_ids=torch.tensor(text_ids, dtype=torch.long),
        packed_text_indexes=torch.tensor(text_idx, dtype=torch.long),
        packed_position_ids=torch.tensor(pos_ids, dtype=torch.long),
    )
    if mask_format == "nested":
        out["nested_attention_masks"] = nested
    else:
        if max_num_tokens is not None:
            if curr > max_num_tokens:
                raise ValueError(f"the samples need {curr} tokens, more than max_num_tokens={max_num_tokens}")
            pad = max_num_tokens - curr
            sample_lens.append(pad)
            split_lens.append(pad)
            attn_modes.append("causal")
        out["split_lens"] = split_lens
        out["attn_modes"] = attn_modes
    if vit_tokens:
        out["packed_vit_tokens"] = torch.cat(vit_tokens)
        out["packed_vit_token_indexes"] = torch.tensor(vit_idx, dtype=torch.long)
        out["packed_vit_position_ids"] = torch.cat(vit_pos)
        out["vit_token_seqlens"] = torch.tensor(vit_lens, dtype=torch.int32)
    if latents:
        C = latents[0].shape[0]
        H = max(x.shape[1] for x in latents)
        W = max(x.shape[2] for x in latents)
        padded = torch.zeros(len(latents), C, H, W, dtype=latents[0].dtype)
        for i, x in enumerate(latents):
            padded[i, :, : x.shape[1], : x.shape[2]] = x
        out["padded_latent"] = padded
        out["patchified_vae_latent_shapes"] = lat_shapes
        out["packed_latent_position_ids"] = torch.cat(lat_pos)
        out["packed_vae_token_indexes"] = torch.tensor(vae_idx, dtype=torch.long)
        out["packed_timesteps"] = torch.tensor(timesteps, dtype=torch.float32)
        out["mse_loss_indexes"] = torch.tensor(mse_idx, dtype=torch.long)
    if ce_idx:
        out["ce_loss_indexes"] = torch.tensor(ce_idx, dtype=torch.long)
        out["packed_label_ids"] = torch.tensor(label_ids, dtype=torch.long)
        out["ce_loss_weights"] = torch.tensor(ce_w, dtype=torch.float32)
    if device is not None:
        out = {
            k: (
                v.to(device)
                if isinstance(v, torch.Tensor)
                else [m.to(device) for m in v]
                if k == "nested_attention_masks"
                else v
            )
            for k, v in out.items()
        }
    return out


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
    rng = random.Random(seed)
    return [synthetic_sample(k, config, rng, **kwargs) for k in kinds]

"""What the model has seen: a :class:`Context` of text, ViT images and clean VAE images, as a KV cache (or,
``use_cache=False``, as the list of chunks the reference path recomputes every time).

Each input becomes one attention split laid out exactly as the training packer lays it out
(:mod:`bagel.data.packing`): text ``[bos] + ids + [eos]`` (causal, RoPE positions advancing by its length),
a ViT image ``[start_of_image] + patches + [end_of_image]`` (full, one position, then +1), a clean VAE
image ``[start_of_image] + latent tokens + [end_of_image]`` (full, time 0, one position, then +1), and the
image being drawn, a ``noise`` split at the next position that does not advance it (never cached).

The embeddings call the model's modules: ``embed_tokens`` (through ``get_input_embeddings()``),
``vit_model`` + ``connector`` + ``vit_pos_embed``, ``vae2llm`` + ``time_embedder`` + ``latent_pos_embed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bagel.data.packing import SpecialTokens, flattened_position_ids, patchify
from bagel.model.fusion import float_dtype
from bagel.model.inference import Chunk, KVCache, forward_cached, forward_recompute

__all__ = [
    "Context",
    "run_chunks",
    "text_chunk",
    "token_chunk",
    "vit_chunk",
    "vae_image_chunk",
    "latent_chunk",
]


def _embed_ids(model: nn.Module, ids: Sequence[int], device: torch.device) -> torch.Tensor:
    return model.get_input_embeddings()(torch.tensor(list(ids), dtype=torch.long, device=device))


@torch.no_grad()
def text_chunk(model: nn.Module, tokens: SpecialTokens, ids: Sequence[int], position: int) -> Chunk:
    """``[bos] + ids + [eos]``, one causal split at positions ``position, position + 1, ...``."""
    full = [tokens.bos, *ids, tokens.eos]
    x = _embed_ids(model, full, _device(model))
    n = len(full)
    return Chunk(
        x,
        torch.arange(position, position + n, device=x.device),
        torch.zeros(n, dtype=torch.bool, device=x.device),
        [n],
        ["causal"],
    )


@torch.no_grad()
def token_chunk(model: nn.Module, token: int, position: int) -> Chunk:
    """One text token at ``position`` (a decoding step)."""
    x = _embed_ids(model, [token], _device(model))
    return Chunk(
        x,
        torch.tensor([position], device=x.device),
        torch.zeros(1, dtype=torch.bool, device=x.device),
        [1],
        ["causal"],
    )


@torch.no_grad()
def vit_chunk(model: nn.Module, tokens: SpecialTokens, pixels: torch.Tensor, position: int) -> Chunk:
    """``[start_of_image] + ViT patch embeddings + [end_of_image]``, one full split at ``position``.
    ``pixels [3, H, W]`` in [-1, 1], H and W multiples of the ViT patch size."""
    cfg, m = model.config, model.model
    if not cfg.visual_und:
        raise ValueError("the model has no ViT (visual_und=False): it cannot look at an image")
    p = cfg.vision_config.patch_size
    side = cfg.vit_max_num_patch_per_side * p
    if (
        not isinstance(pixels, torch.Tensor)
        or pixels.dim() != 3
        or pixels.shape[0] != 3
        or not pixels.is_floating_point()
        or pixels.shape[1] % p
        or pixels.shape[2] % p
        or not (0 < pixels.shape[1] <= side and 0 < pixels.shape[2] <= side)
    ):
        got = list(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(
            f"a ViT image must be a float [3, H, W] with H, W multiples of the patch size {p} up to {side}, got {got}"
        )
    device = _device(model)
    patches = patchify(pixels.to(device=device, dtype=float_dtype(m.vit_model)), p)  # [N, 3*p*p]
    pos = flattened_position_ids(
        pixels.shape[-2] // p,
        pixels.shape[-1] // p,
        cfg.vit_max_num_patch_per_side,
        bool(cfg.interpolate_pos),
    ).to(device)
    feats = m.vit_model(patches, pos, vit_token_seqlens=[patches.shape[0]])
    emb = m.connector(feats) + m.vit_pos_embed(pos)
    return _bracketed(model, tokens, emb, position, gen=False, mode="full")


@torch.no_grad()
def latent_chunk(
    model: nn.Module,
    tokens: SpecialTokens,
    latent_tokens: torch.Tensor,
    grid: tuple[int, int],
    t: float | torch.Tensor,
    position: int,
    mode: str,
) -> Chunk:
    """``[start_of_image] + vae2llm(latent tokens) + time_embedder(t) + latent_pos_embed + [end_of_image]``
    at ``position``: ``mode="full"`` for a clean conditioning image (``t = 0``), ``"noise"`` for the
    image being drawn. ``latent_tokens [h*w, p*p*C]`` patchified, ``grid = (h, w)``."""
    cfg, m = model.config, model.model
    device = _device(model)
    h, w = grid
    pos = flattened_position_ids(h, w, cfg.max_latent_size, bool(cfg.interpolate_pos)).to(device)
    n = latent_tokens.shape[0]
    t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1).expand(n)
    emb = (
        m.vae2llm(latent_tokens.to(device=device, dtype=float_dtype(m.vae2llm)))
        + m.time_embedder(t)
        + m.latent_pos_embed(pos)
    )
    return _bracketed(model, tokens, emb, position, gen=True, mode=mode)


@torch.no_grad()
def vae_image_chunk(model: nn.Module, tokens: SpecialTokens, latent: torch.Tensor, position: int) -> Chunk:
    """A clean VAE image ``latent [C, h*p, w*p]`` (as the VAE encodes it) at ``position``: a full split,
    time 0."""
    cfg = model.config
    if not cfg.visual_gen:
        raise ValueError("a VAE image needs the generation weights: this model is stage 1 (visual_gen=False)")
    p, C, top = cfg.latent_patch_size, cfg.latent_channels, cfg.max_latent_size
    if (
        not isinstance(latent, torch.Tensor)
        or latent.dim() != 3
        or latent.shape[0] != C
        or not latent.is_floating_point()
        or latent.shape[1] % p
        or latent.shape[2] % p
        or not (0 < latent.shape[1] <= top * p and 0 < latent.shape[2] <= top * p)
    ):
        got = list(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise ValueError(
            f"a VAE latent must be a float [{C}, h*{p}, w*{p}] with h, w in 1..{top} (max_latent_size), got {got}"
        )
    grid = (latent.shape[-2] // p, latent.shape[-1] // p)
    return latent_chunk(model, tokens, patchify(latent, p), grid, 0.0, position, "full")


def _bracketed(
    model, tokens: SpecialTokens, emb: torch.Tensor, position: int, *, gen: bool, mode: str
) -> Chunk:
    device = emb.device
    brackets = _embed_ids(model, [tokens.start_of_image, tokens.end_of_image], device)
    x = torch.cat([brackets[:1], emb.to(brackets.dtype), brackets[1:]])
    n = x.shape[0]
    flags = torch.zeros(n, dtype=torch.bool, device=device)
    flags[1:-1] = gen
    return Chunk(x, torch.full((n,), position, dtype=torch.long, device=device), flags, [n], [mode])


def _device(model: nn.Module) -> torch.device:
    for p in model.get_input_embeddings().parameters():
        return p.device
    return torch.device("cpu")


class Context:
    """One conditioning sequence.

    Args:
        model: a ``BagelForUnifiedMultimodal``.
        tokens: the special token ids (default :meth:`SpecialTokens.for_config`, as the training packer).
        use_cache: True: a :class:`bagel.model.inference.KVCache` filled as inputs arrive; False: the
            chunks are kept and every later forward recomputes them (the reference path).
        backend: the step backend of :func:`bagel.model.inference.forward_cached`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: SpecialTokens | None = None,
        *,
        use_cache: bool = True,
        backend: str = "auto",
    ):
        self.model = model
        self.tokens = tokens if tokens is not None else SpecialTokens.for_config(model.config)
        self.use_cache = bool(use_cache)
        self.backend = backend
        n_layers = len(model.model.language_model.model.layers)
        self.cache = KVCache.empty(n_layers) if self.use_cache else None
        self.history: list[Chunk] = []
        self._next_position = 0
        self.num_tokens = 0

    @property
    def next_position(self) -> int:
        return self._next_position

    def fork(self) -> Context:
        """An independent copy sharing the tensors seen so far (cheap)."""
        other = Context.__new__(Context)
        other.__dict__.update(self.__dict__)
        other.cache = None if self.cache is None else self.cache.fork()
        other.history = list(self.history)
        return other

    # -------------------------------------------------------------- inputs
    def add_text(self, ids: Sequence[int]) -> Context:
        """Append ``[bos] + ids + [eos]``."""
        return self.add_inputs([("text", ids)])

    def add_vit_image(self, pixels: torch.Tensor) -> Context:
        """Append an image for the ViT (``[3, H, W]`` in [-1, 1], sides multiples of the patch size)."""
        return self.add_inputs([("vit", pixels)])

    def add_vae_image(self, latent: torch.Tensor) -> Context:
        """Append a clean VAE image: ``latent [C, h*p, w*p]`` as the VAE encodes it (time 0)."""
        return self.add_inputs([("vae", latent)])

    def add_inputs(self, items: Sequence[tuple[str, Any]]) -> Context:
        """Append several inputs with ONE prefill forward: a chunk of one split per input, attended by
        packed attention under the training mask (the same result as adding them one by one). Items:
        ``("text", ids)``, ``("vit", pixels)``, ``("vae", latent)``, in order."""
        parts, advance = [], 0
        for item in items:
            if not isinstance(item, tuple) or len(item) != 2:
                raise ValueError(f"an input is a (kind, value) pair, got {item!r}")
            kind, value = item
            position = self._next_position + advance
            if kind == "text":
                chunk = text_chunk(self.model, self.tokens, value, position)
                advance += len(chunk)
            elif kind == "vit":
                chunk = vit_chunk(self.model, self.tokens, value, position)
                advance += 1
            elif kind == "vae":
                chunk = vae_image_chunk(self.model, self.tokens, value, position)
                advance += 1
            else:
                raise ValueError(f"unknown input kind {kind!r}: use 'text', 'vit' or 'vae'")
            parts.append(chunk)
        if not parts:
            return self
        chunk = parts[0]
        if len(parts) > 1:
            chunk = Chunk(
                torch.cat([c.embeds for c in parts]),
                torch.cat([c.positions for c in parts]),
                torch.cat([c.gen for c in parts]),
                [n for c in parts for n in c.split_lens],
                [m for c in parts for m in c.attn_modes],
            )
        self._append(chunk, advance)
        return self

    def add_chunk(self, chunk: Chunk, advance: int) -> torch.Tensor:
        """Append any chunk (its positions chosen by the caller) and move the next position by
        ``advance``; returns the chunk's final hidden states."""
        return self._append(chunk, advance)

    def _append(self, chunk: Chunk, advance: int) -> torch.Tensor:
        hidden = run_chunks([self], [chunk], update=True)
        self._next_position += advance
        return hidden


def run_chunks(contexts: Sequence[Context], chunks: Sequence[Chunk], *, update: bool) -> torch.Tensor:
    """``chunks[b]`` after ``contexts[b]`` for every ``b``, in one forward; the final hidden states of the
    chunks' rows ``[sum Q, H]``. ``update``: the chunks join their contexts (prefill, decoding)."""
    if not contexts:
        raise ValueError("no contexts")
    model = contexts[0].model
    cached = {c.use_cache for c in contexts}
    if len(cached) != 1:
        raise ValueError("contexts of one forward must all use the cache, or all not")
    if cached.pop():
        hidden = forward_cached(
            model, chunks, [c.cache for c in contexts], update=update, backend=contexts[0].backend
        )
    else:
        hidden = forward_recompute(model, [c.history for c in contexts], chunks)
        if update:
            for c, chunk in zip(contexts, chunks, strict=True):
                c.history.append(chunk)
    if update:
        for c, chunk in zip(contexts, chunks, strict=True):
            c.num_tokens += len(chunk)
    return hidden

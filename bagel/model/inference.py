"""Inference path of BAGEL's language model: a KV cache per layer, chunks of new tokens that attend to it,
and a recompute-everything path through the training forward that the cached one is checked against.

A *sequence* is what the model has seen so far (text, ViT images, clean VAE images), held as a
:class:`KVCache` (keys after ``k_norm`` and RoPE, values, per layer). A :class:`Chunk` is the next tokens
of one sequence: their input embeddings, RoPE positions, which rows are generation tokens (VAE latents:
the ``*_moe_gen`` expert) and their attention splits (DESIGN.md section 3). The chunk's queries see

    every cached token of their sequence (everything cached is visible to what comes after it), and
    the chunk's own tokens under the training mask of its splits (causal text, full or noise images)

which is exactly what the training mask gives the chunk's rows in a pack holding the cached tokens
first. :func:`forward_cached` runs a batch of chunks (one per sequence, e.g. the three guidance
branches of a sampler step) through every decoder layer in one pass, routing each row to its expert,
and appends the chunks' keys and values to the caches when asked (prefill, decoding), or leaves the
caches as they are (the flow-matching steps). :func:`forward_recompute` computes the same rows from
scratch with the language model's training forward over whole sequences (cached inputs + chunk):
the reference of the cache, and the way to sample without one.

Every module is called (``input_layernorm[_moe_gen]``, ``self_attn.{q,k,v,o}_proj[_moe_gen]``,
``self_attn.{q,k}_norm[_moe_gen]``, ``post_attention_layernorm[_moe_gen]``, ``mlp[_moe_gen]``, the final
``norm[_moe_gen]``), so PEFT adapters, quantised linears and hooks act as in training. RoPE comes from
:mod:`bagel_kernels.reference`'s tables (the training forward's values).

Attention of a step (``backend``, see :data:`STEP_BACKENDS`):

    "sdpa"    torch's scaled_dot_product_attention per sequence over [cache; chunk] keys (any device);
              no mask when the chunk is one full/noise split or one token
    "flash"   flash-attn's varlen function over all sequences at once (CUDA, fp16/bf16; chunks that are
              each one split of the same kind); an optional import, never required
    "packed"  bagel_kernels.packed_attention over [cache; chunk] of every sequence as one pack, the
              cache as one full split (our kernel on the GPU). It also computes the cache rows' outputs
              and throws them away: the right choice for a prefill onto an empty cache, a waste of
              (cache length / chunk length) otherwise
    "auto"    "packed" when every cache is empty and the device is CUDA; else "flash" when installed
              and the chunks allow it; else "sdpa"

Shapes: Q = new tokens of a chunk, C = cached tokens, H = hidden size, Hq / Hkv = query / key-value
heads, D = head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bagel_kernels import PackedMask, packed_attention
from bagel_kernels.reference import apply_rope, rope_inv_freq, rope_tables

__all__ = [
    "STEP_BACKENDS",
    "KVCache",
    "Chunk",
    "forward_cached",
    "forward_recompute",
    "flash_attn_available",
    "resolve_step_backend",
]

STEP_BACKENDS = ("auto", "sdpa", "flash", "packed")
_MODES = ("causal", "full", "noise")


# ---------------------------------------------------------------------------------------------- values
class KVCache:
    """Keys and values of one sequence, per decoder layer: :meth:`layer` gives ``[C, Hkv, D]`` each (keys
    after ``k_norm`` and RoPE), ``num_tokens`` = C. The RoPE position of the next chunk is the caller's
    (:class:`bagel.generate.context.Context` keeps it).

    Storage grows geometrically (by a quarter), so that decoding a token costs one row write per layer
    rather than a copy of the whole cache. :meth:`fork` is a cheap independent copy that shares the rows
    seen so far: the guidance branches share their common prefix. A cache writes in place only into
    buffers it owns alone; after a fork, the first append of either copy moves its rows into a new
    buffer (copy on write), so forks never see each other's later tokens."""

    _MIN_CAPACITY = 64

    def __init__(self, num_layers: int):
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._owned = [False] * num_layers
        self.num_tokens = 0

    @classmethod
    def empty(cls, num_layers: int) -> KVCache:
        return cls(num_layers)

    @property
    def num_layers(self) -> int:
        return len(self._keys)

    def fork(self) -> KVCache:
        other = KVCache(self.num_layers)
        other._keys, other._values = list(self._keys), list(self._values)
        other.num_tokens = self.num_tokens
        self._owned = [False] * self.num_layers  # the buffers are shared from now on
        return other

    def layer(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        k, v = self._keys[i], self._values[i]
        if k is None or self.num_tokens == 0:
            return None, None
        return k[: self.num_tokens], v[: self.num_tokens]

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write a chunk's keys and values after the ``num_tokens`` cached rows of layer ``i`` (the caller
        adds to ``num_tokens`` once, after every layer)."""
        n, q = self.num_tokens, k.shape[0]
        buf_k, buf_v = self._keys[i], self._values[i]
        if buf_k is None or not self._owned[i] or buf_k.shape[0] < n + q:
            # geometric growth by 1.25 (amortised O(1) per decoded token, at most 25% spare rows: a
            # prefilled 9k-token image context does not hold 9k empty rows)
            cap = n + q + max(self._MIN_CAPACITY, (n + q) // 4)
            new_k, new_v = k.new_empty(cap, *k.shape[1:]), v.new_empty(cap, *v.shape[1:])
            if n:
                new_k[:n], new_v[:n] = buf_k[:n], buf_v[:n]
            self._keys[i], self._values[i], self._owned[i] = new_k, new_v, True
            buf_k, buf_v = new_k, new_v
        buf_k[n : n + q] = k
        buf_v[n : n + q] = v

    def with_chunk(
        self, i: int, k: torch.Tensor, v: torch.Tensor, commit: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of layer ``i`` followed by a chunk's ``[C + Q, Hkv, D]``: appended in place
        (``commit``; views of the buffers, no copy of the cached rows) or concatenated (the cache is
        left as it is)."""
        n, q = self.num_tokens, k.shape[0]
        if commit:
            self.append(i, k, v)
            return self._keys[i][: n + q], self._values[i][: n + q]
        ck, cv = self.layer(i)
        if ck is None:
            return k, v
        return torch.cat([ck, k]), torch.cat([cv, v])


@dataclass
class Chunk:
    """New tokens of one sequence.

    Attributes:
        embeds: ``[Q, H]`` input embeddings (text, ViT and latent embeddings at their rows).
        positions: ``[Q]`` RoPE positions (long).
        gen: ``[Q]`` bool, True for generation-expert rows (VAE latent tokens; not their brackets).
        split_lens / attn_modes: the chunk's attention splits (``causal``, ``full``, ``noise``),
            summing to Q.
    """

    embeds: torch.Tensor
    positions: torch.Tensor
    gen: torch.Tensor
    split_lens: list[int] = field(default_factory=list)
    attn_modes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        Q = self.embeds.shape[0] if isinstance(self.embeds, torch.Tensor) else -1
        if not isinstance(self.embeds, torch.Tensor) or self.embeds.dim() != 2 or Q == 0:
            raise ValueError("Chunk.embeds must be a non-empty [Q, hidden] tensor")
        if not isinstance(self.positions, torch.Tensor) or self.positions.shape != (Q,):
            raise ValueError(f"Chunk.positions must be a [{Q}] tensor")
        if self.positions.is_floating_point():
            raise ValueError("Chunk.positions must hold integers")
        if not isinstance(self.gen, torch.Tensor) or self.gen.shape != (Q,) or self.gen.dtype != torch.bool:
            raise ValueError(f"Chunk.gen must be a [{Q}] bool tensor")
        if not self.split_lens or sum(self.split_lens) != Q or any(n <= 0 for n in self.split_lens):
            raise ValueError(f"Chunk.split_lens {self.split_lens} must be positive and sum to the {Q} tokens")
        if len(self.attn_modes) != len(self.split_lens) or any(m not in _MODES for m in self.attn_modes):
            raise ValueError(f"Chunk.attn_modes {self.attn_modes} must give one of {_MODES} per split")

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def one_block(self) -> bool:
        """Every token of the chunk sees every other one (one full/noise split, or one token)."""
        return len(self) == 1 or (len(self.split_lens) == 1 and self.attn_modes[0] != "causal")


# ---------------------------------------------------------------------------------------------- helpers
_FLASH: list = []  # [flash_attn_varlen_func or None], filled on first use


def flash_attn_available() -> bool:
    """Whether flash-attn's varlen function imports here (tried once; any import failure, a missing
    package or a broken build, means "not available", never an error)."""
    if not _FLASH:
        try:
            from flash_attn import flash_attn_varlen_func
        except Exception:  # noqa: BLE001 - optional: ImportError, OSError from a mismatched build, ...
            flash_attn_varlen_func = None
        _FLASH.append(flash_attn_varlen_func)
    return _FLASH[0] is not None


def resolve_step_backend(backend: str, chunks: Sequence[Chunk], caches: Sequence[KVCache]) -> str:
    """The attention backend a step runs (see the module docstring); ValueError for an unknown name or
    a "flash" request the inputs or the machine do not allow (naming every reason)."""
    if backend not in STEP_BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {STEP_BACKENDS}")
    device = chunks[0].embeds.device
    if backend == "auto":
        if device.type == "cuda" and all(c.num_tokens == 0 for c in caches):
            return "packed"
        if not _flash_refusals(chunks):
            return "flash"
        return "sdpa"
    if backend == "flash":
        reasons = _flash_refusals(chunks)
        if reasons:
            raise ValueError("backend='flash' cannot run this step: " + "; ".join(reasons))
    return backend


def _flash_refusals(chunks: Sequence[Chunk]) -> list[str]:
    reasons = []
    if not flash_attn_available():
        reasons.append("flash-attn is not installed")
    if chunks[0].embeds.device.type != "cuda":
        reasons.append("the inputs are not on a CUDA device")
    if chunks[0].embeds.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"flash-attn needs fp16/bf16, got {chunks[0].embeds.dtype}")
    kinds = {_kind(c) for c in chunks}
    if "mixed" in kinds or len(kinds) > 1:
        reasons.append("the chunks are not each one split of the same kind (causal, or full/noise)")
    return reasons


def _kind(chunk: Chunk) -> str:
    """ "block" (every query sees every key), "causal" (one causal split) or "mixed"."""
    if chunk.one_block:
        return "block"
    return "causal" if len(chunk.split_lens) == 1 else "mixed"


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        params = getattr(config, "rope_parameters", None) or {}
        theta = params.get("rope_theta", 10000.0)
    return float(theta)


def _head_dim(config) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd is not None else config.hidden_size // config.num_attention_heads


def _pair(module: nn.Module, name: str) -> tuple[nn.Module, nn.Module | None]:
    """``module.<name>`` and its ``<name>_moe_gen`` sibling (None when the layer does not route it)."""
    return getattr(module, name), getattr(module, name + "_moe_gen", None)


class _Rows:
    """The batch's rows grouped by expert: understanding rows ``[0, n)``, generation rows ``[n, N)``;
    ``perm`` takes sequence order to grouped order, ``inv`` back (None: already grouped)."""

    def __init__(self, gen: torch.Tensor):
        N = gen.numel()
        n_gen = int(gen.sum())
        self.n = N - n_gen
        self.perm = self.inv = None
        if 0 < n_gen < N:
            self.perm = torch.argsort(gen.to(torch.int8), stable=True)
            self.inv = torch.empty_like(self.perm)
            self.inv[self.perm] = torch.arange(N, device=gen.device)

    def group(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.perm is None else x[self.perm]

    def ungroup(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.inv is None else x[self.inv]

    def call(self, x: torch.Tensor, und: nn.Module, gen: nn.Module | None) -> torch.Tensor:
        """``und`` on the understanding rows, ``gen`` on the generation rows (grouped ``x``)."""
        if gen is None or self.n == x.shape[0]:
            return und(x)
        if self.n == 0:
            return gen(x)
        return torch.cat([und(x[: self.n]), gen(x[self.n :])])


def _chunk_mask(chunk: Chunk, num_cached: int, device: torch.device) -> torch.Tensor | None:
    """``[Q, C + Q]`` bool (True = attend) for one chunk, or None when every query sees every key."""
    if chunk.one_block:
        return None
    Q = len(chunk)
    m = PackedMask.from_splits([Q], chunk.split_lens, chunk.attn_modes, device=device)
    q = torch.arange(Q, device=device)[:, None]
    own = (m.kv_lo.long()[None, :] <= q) & (q < m.kv_hi.long()[None, :])  # [Q, Q]
    if num_cached == 0:
        return own
    return torch.cat([own.new_ones(Q, num_cached), own], dim=1)


# ---------------------------------------------------------------------------------------------- attention
class _StepAttention:
    """The attention of one forward, planned once for every layer (the cache lengths are the same in
    every layer): per-sequence masks (sdpa), cumulative lengths (flash), the pack's PackedMask and the
    chunks' rows in it (packed). Called per layer with the chunks' q, k, v; returns their outputs."""

    def __init__(self, step: str, chunks: Sequence[Chunk], caches: Sequence[KVCache], attention_backend: str):
        self.step, self.chunks, self.caches = step, chunks, caches
        self.attention_backend = attention_backend
        device = chunks[0].embeds.device
        cached = [c.num_tokens for c in caches]
        self.lens_q = [len(c) for c in chunks]
        if step == "sdpa":
            self.masks = [_chunk_mask(c, n, device) for c, n in zip(chunks, cached, strict=True)]
        elif step == "flash":
            lens_k = [n + q for n, q in zip(cached, self.lens_q, strict=True)]
            self.cu_q, self.cu_k = _cumulative(self.lens_q, device), _cumulative(lens_k, device)
            self.max_q, self.max_k = max(self.lens_q), max(lens_k)
            self.causal = not chunks[0].one_block
        else:
            sample_lens, split_lens, modes, self.rows = [], [], [], []
            start = 0
            for chunk, C in zip(chunks, cached, strict=True):
                if C:
                    split_lens.append(C)
                    modes.append("full")  # the cache: visible to every later query of the sample
                split_lens += chunk.split_lens
                modes += chunk.attn_modes
                sample_lens.append(C + len(chunk))
                self.rows.append((start + C, start + C + len(chunk)))
                start += C + len(chunk)
            self.mask = PackedMask.from_splits(sample_lens, split_lens, modes, device=device)

    def __call__(self, q_parts, keys, values) -> list[torch.Tensor]:
        """``q_parts[b]`` ``[Q_b, Hq, D]``; ``keys[b]`` / ``values[b]`` ``[C_b + Q_b, Hkv, D]`` (cache, then
        chunk)."""
        if self.step == "sdpa":
            out = []
            for q, k, v, mask in zip(q_parts, keys, values, self.masks, strict=True):
                o = F.scaled_dot_product_attention(
                    q.transpose(0, 1)[None],  # [1, Hq, Q, D]
                    k.transpose(0, 1)[None],  # [1, Hkv, C + Q, D]
                    v.transpose(0, 1)[None],
                    attn_mask=mask,
                    enable_gqa=q.shape[1] != k.shape[1],
                )
                out.append(o[0].transpose(0, 1))  # [Q, Hq, D]
            return out
        if self.step == "flash":
            flash_attn_varlen_func = _FLASH[0]
            # flash-attn aligns its causal mask to the bottom right: chunk query i sees every cached key
            # and the chunk's keys up to i, the training mask of a causal chunk after its cache
            o = flash_attn_varlen_func(
                torch.cat(q_parts),
                torch.cat(keys),
                torch.cat(values),
                cu_seqlens_q=self.cu_q,
                cu_seqlens_k=self.cu_k,
                max_seqlen_q=self.max_q,
                max_seqlen_k=self.max_k,
                causal=self.causal,
            )
            return list(o.split(self.lens_q))
        qs = []
        for q, k in zip(q_parts, keys, strict=True):
            C = k.shape[0] - q.shape[0]
            if C:  # the cached rows' queries are not needed: zeros stand in, their outputs are dropped
                qs.append(q.new_zeros(C, *q.shape[1:]))
            qs.append(q)
        o = packed_attention(
            torch.cat(qs), torch.cat(keys), torch.cat(values), self.mask, backend=self.attention_backend
        )
        return [o[a:b] for a, b in self.rows]


def _cumulative(lens: list[int], device: torch.device) -> torch.Tensor:
    return F.pad(torch.tensor(lens, device=device).cumsum(0), (1, 0)).to(torch.int32)


# ---------------------------------------------------------------------------------------------- forward
def _check_batch(model: nn.Module, chunks: Sequence[Chunk]) -> None:
    if not chunks:
        raise ValueError("no chunks to run")
    dev, dt = chunks[0].embeds.device, chunks[0].embeds.dtype
    for c in chunks:
        if not isinstance(c, Chunk):
            raise TypeError(f"chunks must be Chunk objects, got {type(c).__name__}")
        if c.embeds.device != dev or c.embeds.dtype != dt:
            raise ValueError("every chunk must have its embeddings on one device in one dtype")
        if c.embeds.shape[1] != model.config.text_config.hidden_size:
            raise ValueError(
                f"chunk embeddings have width {c.embeds.shape[1]}, the model {model.config.text_config.hidden_size}"
            )
    if not model.config.visual_gen and any(bool(c.gen.any()) for c in chunks):
        raise ValueError("generation-expert rows (gen=True) given to a stage-1 model (visual_gen=False)")


@torch.no_grad()
def forward_cached(
    model: nn.Module,
    chunks: Sequence[Chunk],
    caches: Sequence[KVCache],
    *,
    update: bool,
    backend: str = "auto",
) -> torch.Tensor:
    """Run ``chunks[b]`` after ``caches[b]`` for every ``b`` through the language model of ``model`` (a
    ``BagelForUnifiedMultimodal``) in one pass; returns the final hidden states ``[sum Q, H]`` (after the
    final ``norm`` / ``norm_moe_gen``), the chunks' rows in order.

    ``update=True`` appends every chunk's keys and values to its cache and advances ``num_tokens`` (a
    prefill or a decoding step); the caller moves ``next_position``. With ``update=False`` the caches are
    read only (the flow-matching steps). ``backend``: see :data:`STEP_BACKENDS`."""
    _check_batch(model, chunks)
    if len(caches) != len(chunks):
        raise ValueError(f"{len(chunks)} chunks but {len(caches)} caches")
    lm = model.model.language_model
    decoder = lm.model
    tc = model.config.text_config
    layers = decoder.layers
    for cache in caches:
        if cache.num_layers != len(layers):
            raise ValueError(f"a KVCache of {cache.num_layers} layers for a model of {len(layers)}")
    if update and len({id(c) for c in caches}) != len(caches):
        raise ValueError("update=True with one KVCache given twice")
    step = resolve_step_backend(backend, chunks, caches)
    attention_backend = model.backend.attention if hasattr(model, "backend") else "auto"

    x = torch.cat([c.embeds for c in chunks])  # [N, H], sequence order
    gen = torch.cat([c.gen for c in chunks])
    lens = [len(c) for c in chunks]
    rows = _Rows(gen)
    D, Hq, Hkv = _head_dim(tc), tc.num_attention_heads, tc.num_key_value_heads
    inv_freq = rope_inv_freq(D, _rope_theta(tc)).to(x.device)
    cos, sin = rope_tables(torch.cat([c.positions for c in chunks]).to(x.device), inv_freq, x.dtype)

    attend = _StepAttention(step, chunks, caches, attention_backend)
    x = rows.group(x)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        h = rows.call(x, *_pair(layer, "input_layernorm"))
        q = rows.call(h, *_pair(attn, "q_proj")).view(-1, Hq, D)
        k = rows.call(h, *_pair(attn, "k_proj")).view(-1, Hkv, D)
        v = rows.ungroup(rows.call(h, *_pair(attn, "v_proj")).view(-1, Hkv, D))
        # per-head q/k norms of each expert, then RoPE in sequence order
        q = rows.ungroup(rows.call(q, *_pair(attn, "q_norm")))
        k = rows.ungroup(rows.call(k, *_pair(attn, "k_norm")))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        qp, kp, vp = q.split(lens), k.split(lens), v.split(lens)
        kv = [c.with_chunk(i, kk, vv, update) for c, kk, vv in zip(caches, kp, vp, strict=True)]
        o = attend(qp, [a for a, _ in kv], [b for _, b in kv])
        o = rows.group(torch.cat(o).reshape(-1, Hq * D))
        x = x + rows.call(o, *_pair(attn, "o_proj"))
        h = rows.call(x, *_pair(layer, "post_attention_layernorm"))
        x = x + rows.call(h, *_pair(layer, "mlp"))
    x = rows.call(x, *_pair(decoder, "norm"))
    if update:
        for cache, n in zip(caches, lens, strict=True):
            cache.num_tokens += n
    return rows.ungroup(x)


@torch.no_grad()
def forward_recompute(
    model: nn.Module, histories: Sequence[Sequence[Chunk]], chunks: Sequence[Chunk]
) -> torch.Tensor:
    """The rows of ``chunks`` computed from scratch: one pack with a sample per sequence (its history's
    chunks, then its new chunk), run through the language model's training forward
    (``model.model.language_model(packed_sequence, sample_lens, mask, positions, und, gen)``). Returns
    ``[sum Q, H]`` as :func:`forward_cached` does; the reference of the cached path."""
    _check_batch(model, chunks)
    if len(histories) != len(chunks):
        raise ValueError(f"{len(chunks)} chunks but {len(histories)} histories")
    embeds, pos, gen, sample_lens, split_lens, modes, rows = [], [], [], [], [], [], []
    start = 0
    for history, chunk in zip(histories, chunks, strict=True):
        seq = [*history, chunk]
        n = sum(len(c) for c in seq)
        for c in seq:
            embeds.append(c.embeds)
            pos.append(c.positions)
            gen.append(c.gen)
            split_lens += c.split_lens
            modes += c.attn_modes
        sample_lens.append(n)
        rows.append(torch.arange(start + n - len(chunk), start + n))
        start += n
    x = torch.cat(embeds)
    device = x.device
    g = torch.cat(gen).to(device)
    everything = torch.arange(start, device=device)
    mask = PackedMask.from_splits(sample_lens, split_lens, modes, device=device)
    hidden = model.model.language_model(
        x, sample_lens, mask, torch.cat(pos).to(device), everything[~g], everything[g]
    )
    return hidden[torch.cat(rows).to(device)]

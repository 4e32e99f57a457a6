"""Plain-PyTorch reference of BAGEL's Qwen2 MoT training forward, routed the way upstream does it.

Every routed op gathers its tokens (``x[und]``, ``x[gen]``), applies the understanding or generation
weights, and scatters the result back into a full ``[L, ...]`` tensor; attention runs over the pack
in its original order. ``freeze_und`` detaches exactly what upstream detaches. Every module is called
(decoder layers, attention, projections, norms, MLPs: through ``__call__``, so hooks fire and swapped-in
modules act), and RMSNorm and the SwiGLU MLP run their own torch ``forward``, independent of
:mod:`bagel_kernels.mot`; RoPE is :func:`bagel_kernels.reference.apply_rope`.

It reads the parameters of a :class:`bagel.model.qwen2.Qwen2ForCausalLM`, so the same state_dict serves both.
How to swap it in:

    hidden = forward_train_reference(lm, packed_sequence, sample_lens, mask, position_ids, und, gen)
    # or construct Qwen2ForCausalLMReference(config) instead of Qwen2ForCausalLM(config): same
    # parameters and keys, its forward_train runs this reference

Used by the tests (fast path vs reference: outputs and all gradients) and by the benchmark (the
gather/scatter layer, with any attention backend, to measure what the grouped layout saves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bagel.model.backend import BagelBackendConfig
from bagel.model.qwen2 import (
    PackedAttention,
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2Model,
    check_inputs,
    routing_indexes,
)
from bagel.model.validation import DeviceChecks
from bagel_kernels import PackedMask, packed_attention
from bagel_kernels.reference import apply_rope, gather_scatter

__all__ = [
    "forward_train_reference",
    "reference_layer_forward",
    "apply_rotary",
    "Qwen2ForCausalLMReference",
    "ReferenceContext",
]


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """HF Qwen2 RoPE on packed q [L, Hq, D], k [L, Hkv, D] with cos/sin [L, D]."""
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def _attention(attn: PackedAttention, x: torch.Tensor, ctx: ReferenceContext) -> torch.Tensor:
    L = x.shape[0]
    und, gen = ctx.und, ctx.gen
    Hq, Hkv, D = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    routed = attn.routed
    freeze_und = ctx.freeze_und and routed  # upstream's MoE and dense layers ignore freeze_und
    if routed:
        # one gather per expert feeds the three projections, each scattered into a zero tensor
        x_und, x_gen = x[und], x[gen]
        q, k, v = x.new_zeros((L, Hq * D)), x.new_zeros((L, Hkv * D)), x.new_zeros((L, Hkv * D))
        for out, name in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")):
            out[und] = getattr(attn, name)(x_und)
            out[gen] = getattr(attn, name + "_moe_gen")(x_gen)
        q, k, v = q.view(L, Hq, D), k.view(L, Hkv, D), v.view(L, Hkv, D)
        if freeze_und:
            v[und] = v[und].detach()
        q_ = q.new_zeros(q.shape)
        k_ = k.new_zeros(k.shape)
        q_[und] = attn.q_norm(q[und])
        if freeze_und:
            q_[und] = q_[und].detach()
        q_[gen] = attn.q_norm_moe_gen(q[gen])
        k_[und] = attn.k_norm(k[und])
        if freeze_und:
            k_[und] = k_[und].detach()
        k_[gen] = attn.k_norm_moe_gen(k[gen])
        q, k = q_, k_
    else:
        q = attn.q_norm(attn.q_proj(x).view(L, Hq, D))
        k = attn.k_norm(attn.k_proj(x).view(L, Hkv, D))
        v = attn.v_proj(x).view(L, Hkv, D)
    q, k = apply_rotary(q, k, ctx.cos, ctx.sin)
    o = packed_attention(q, k, v, ctx.mask, backend=ctx.attention, deterministic=ctx.deterministic)
    o = o.reshape(L, Hq * D)
    if routed:
        return gather_scatter(o, und, gen, attn.o_proj, attn.o_proj_moe_gen, attn.hidden_size)
    return attn.o_proj(o)


@dataclass
class ReferenceContext:
    """What the layers of one reference forward share (pack order, no grouping). Passed as the ``ctx``
    of ``layer(x, ctx)`` / ``self_attn(h, ctx)``, so that the modules are called through ``__call__``
    (their hooks fire) and this context runs their upstream-style bodies."""

    mask: PackedMask  # truncated to L, no row index
    cos: torch.Tensor  # [L, D], pack order
    sin: torch.Tensor
    und: torch.Tensor
    gen: torch.Tensor
    freeze_und: bool = False
    attention: str = "sdpa"
    deterministic: bool = False

    def run_layer(self, layer: Qwen2DecoderLayer, x: torch.Tensor) -> torch.Tensor:
        return _layer_body(layer, x, self)

    def run_attention(self, attn: PackedAttention, x: torch.Tensor) -> torch.Tensor:
        return _attention(attn, x, self)


def _layer_body(layer: Qwen2DecoderLayer, x: torch.Tensor, ctx: ReferenceContext) -> torch.Tensor:
    und, gen = ctx.und, ctx.gen
    ra, rm = layer.routed_attention, layer.routed_mlp
    frz = ctx.freeze_und and ra  # upstream's MoE and dense layers ignore freeze_und
    residual = x
    if ra:
        h = gather_scatter(x, und, gen, layer.input_layernorm, layer.input_layernorm_moe_gen)
    else:
        h = layer.input_layernorm(x)
    a = layer.self_attn(h, ctx)
    if frz:
        a[und] = a[und].detach()
    x = residual + a
    residual = x
    if ra and rm:
        m = x.new_zeros(x.shape)
        m[und] = layer.mlp(layer.post_attention_layernorm(x[und]))
        if frz:
            m[und] = m[und].detach()
        m[gen] = layer.mlp_moe_gen(layer.post_attention_layernorm_moe_gen(x[gen]))
    elif ra:  # routed norms around one shared MLP (a block variant; upstream has none)
        h = gather_scatter(
            x, und, gen, layer.post_attention_layernorm, layer.post_attention_layernorm_moe_gen
        )
        m = layer.mlp(h)
        if frz:
            m[und] = m[und].detach()
    elif rm:
        h = layer.post_attention_layernorm(x)
        m = gather_scatter(h, und, gen, layer.mlp, layer.mlp_moe_gen)
    else:
        m = layer.mlp(layer.post_attention_layernorm(x))
    return residual + m


def reference_layer_forward(
    layer: Qwen2DecoderLayer,
    x: torch.Tensor,
    mask: PackedMask,
    cos: torch.Tensor,
    sin: torch.Tensor,
    und: torch.Tensor,
    gen: torch.Tensor,
    *,
    freeze_und: bool = False,
    attention: str = "sdpa",
    deterministic: bool = False,
) -> torch.Tensor:
    """One decoder layer in upstream's gather/scatter form, hidden states ``x`` [L, H] in pack order.

    ``mask`` covers at least L tokens (no row index); cos/sin ``[L, D]`` in pack order; und/gen long
    index tensors partitioning ``range(L)`` (ignored by dense layers). The layer and its submodules are
    called through ``__call__``."""
    ctx = ReferenceContext(
        mask.truncated(x.shape[0]), cos, sin, und, gen, freeze_und, attention, deterministic
    )
    return layer(x, ctx)


def forward_train_reference(
    lm: Qwen2ForCausalLM | Qwen2Model,
    packed_sequence: torch.Tensor,
    sample_lens: Sequence[int] | None,
    attention_mask: PackedMask,
    packed_position_ids: torch.Tensor,
    packed_und_token_indexes: torch.Tensor | None = None,
    packed_gen_token_indexes: torch.Tensor | None = None,
    *,
    attention: str = "sdpa",
    deterministic: bool = False,
) -> torch.Tensor:
    """Upstream-style training forward of ``lm``'s decoder; same signature and result as
    :meth:`Qwen2ForCausalLM.forward_train` (final hidden states ``[L, H]`` in pack order).

    ``attention`` picks the packed_attention backend (default the SDPA reference). The caller's
    ``packed_sequence`` is not modified (upstream detaches its understanding rows in place)."""
    model: Qwen2Model = lm.model if isinstance(lm, Qwen2ForCausalLM) else lm
    mask, pos = check_inputs(model, packed_sequence, sample_lens, attention_mask, packed_position_ids)
    L = packed_sequence.shape[0]
    checks = DeviceChecks()  # the value checks, read back once
    und, gen = routing_indexes(
        L, packed_und_token_indexes, packed_gen_token_indexes, packed_sequence.device, checks
    )
    checks.raise_first()
    mask = mask.truncated(L)  # checked on the host copy of the intervals
    freeze = model.freeze_und
    x = packed_sequence
    if freeze:  # (a dense model given no indexes: every token is understanding, as in upstream)
        x = x.clone()
        x[und] = x[und].detach()
    cos, sin = model.rotary_emb(pos, x.dtype)
    ctx = ReferenceContext(mask, cos, sin, und, gen, freeze, attention, deterministic)
    for layer in model.layers:
        x = layer(x, ctx)  # through __call__: hooks (and FSDP2's unshard) run
    if model.use_moe:
        out = torch.zeros_like(x)
        out[und] = model.norm(x[und])
        if freeze:
            out[und] = out[und].detach()
        out[gen] = model.norm_moe_gen(x[gen])
        return out
    return model.norm(x)


class Qwen2ForCausalLMReference(Qwen2ForCausalLM):
    """:class:`Qwen2ForCausalLM` whose ``forward_train`` is :func:`forward_train_reference` (same
    parameters and state_dict keys). The attention backend comes from ``backend.attention``
    (default ``"sdpa"``); the MoT backend is unused (everything is plain torch)."""

    def __init__(self, config, backend: BagelBackendConfig | None = None):
        super().__init__(config, backend if backend is not None else BagelBackendConfig.reference())

    def forward_train(self, *args, **kwargs) -> torch.Tensor:
        """:func:`forward_train_reference` of this model (the arguments of
        :meth:`Qwen2ForCausalLM.forward_train`), with the backend's attention and determinism."""
        be = self.backend
        return forward_train_reference(
            self, *args, attention=be.attention, deterministic=be.deterministic, **kwargs
        )

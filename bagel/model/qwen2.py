"""Qwen2 language model of BAGEL with Mixture-of-Transformers (MoT) experts, for packed training.

Parameter names equal BAGEL-7B-MoT's ``ema.safetensors`` keys under ``language_model.`` (DESIGN.md
section 6), so a checkpoint loads by identity. Three layer types, chosen by ``config.layer_module``:

    Qwen2DecoderLayer      dense: one set of weights for every token
    Qwen2MoEDecoderLayer   only the MLP routed: ``mlp`` (understanding) / ``mlp_moe_gen`` (generation)
    Qwen2MoTDecoderLayer   everything routed: ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
                           ``self_attn.{q,k}_norm``, ``post_attention_layernorm``, ``mlp`` and their
                           ``*_moe_gen`` siblings; attention itself is shared over the whole pack

Understanding tokens (text + ViT) use the base weights, generation tokens (VAE latents, noised or
clean) the ``*_moe_gen`` ones; a model with MoE/MoT layers also routes the final ``norm`` /
``norm_moe_gen``.

How the training forward runs (``forward_train``): instead of gathering and scattering tokens around
every routed op (upstream BAGEL; kept as the reference in :mod:`bagel.model.qwen2_reference`), the pack is
permuted ONCE so that understanding rows form the block ``[0, n_und)`` and generation rows the block
``[n_und, L)``. Every routed op then works on two contiguous slices (:mod:`bagel_kernels.mot`), the
attention kernel reads and writes rows through the permutation (``PackedMask.with_row_index``) while
iterating in pack order so the mask keeps its interval form, and the result is un-permuted once at
the end. It runs in two parts: :meth:`Qwen2Model.prepare_context` (eager, once per pack: validation,
grouping, the mask's row index and kernel tables, RoPE tables; returns a :class:`PackContext`) and
:meth:`Qwen2Model.decode` (every decoder layer and the final norms: tensor work and custom ops only,
traced by ``torch.compile(fullgraph=True)``). ``BagelForUnifiedMultimodal`` embeds its tokens straight
into the grouped row order and reads its loss rows from it, so it never un-permutes.

Modules are called: a routed op on grouped rows is ``und(x[:n_und])`` and ``gen(x[n_und:])``, so a
PEFT LoRA layer, a quantised linear or a forward hook works on every backend. The fused kernels that
read raw weights (both experts' RMSNorm in one launch, q/k norm fused with RoPE, two GEMMs into one
buffer, the MLP split around one SwiGLU kernel) stand in for modules only where those are the stock
classes with nothing attached (:func:`bagel.model.fusion.fusable`), decided once per pack by
:meth:`Qwen2Model.fusion_plan` and carried in the :class:`PackContext`.

``config`` is a ``transformers.Qwen2Config`` carrying BAGEL's extra attributes ``qk_norm`` (bool,
per-head RMSNorm of q and k before RoPE), ``layer_module`` (one of the three names above) and
``freeze_und`` (bool: no gradient reaches the understanding side, upstream semantics, see
:class:`Qwen2Model`). Kernels are picked by a :class:`bagel.model.backend.BagelBackendConfig`.

Shapes: L = tokens of the pack (``sequence_length``), H = hidden size, Hq/Hkv = query/key-value
heads, D = head dim, I = MLP intermediate size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from bagel.model.backend import BagelBackendConfig
from bagel.model.fusion import float_dtype, fusable
from bagel.model.validation import DeviceChecks, HasBackend, as_index
from bagel_kernels import PackedMask, mot
from bagel_kernels.attention import packed_attention, prepare_attention
from bagel_kernels.checks import as_int, as_int_list
from bagel_kernels.reference import apply_rope, qwen2_rms_norm, rope_inv_freq, rope_tables

__all__ = [
    "LAYER_MODULES",
    "DECODER_LAYERS",
    "decoder_layer",
    "Qwen2RMSNorm",
    "Qwen2MLP",
    "Qwen2RotaryEmbedding",
    "PackedAttention",
    "PackedAttentionMoT",
    "Qwen2DecoderLayer",
    "Qwen2MoEDecoderLayer",
    "Qwen2MoTDecoderLayer",
    "Qwen2Model",
    "Qwen2ForCausalLM",
    "PackContext",
    "LayerFusion",
    "FusionPlan",
    "config_rope_theta",
    "config_head_dim",
    "prepare_routing",
    "routing_indexes",
    "check_inputs",
    "check_sequence",
    "check_context_inputs",
]

# decoder-block classes by ``config.layer_module`` name, filled by @decoder_layer (the config's check
# reads it too). A new block is one subclass of Qwen2DecoderLayer with this decorator.
DECODER_LAYERS: dict[str, type[nn.Module]] = {}


def decoder_layer(cls: type[nn.Module]) -> type[nn.Module]:
    """Register a decoder-block class under its class name, the value ``config.layer_module`` names.

    A block is a :class:`Qwen2DecoderLayer` subclass: it declares which sub-blocks are routed
    (``routed_attention``, ``routed_mlp``), creates its ``*_moe_gen`` siblings, and inherits the grouped
    forward, the fusion plan and the gather/scatter reference, which read those two flags."""
    DECODER_LAYERS[cls.__name__] = cls
    return cls


# ---------------------------------------------------------------------------------------------- config
def config_rope_theta(config) -> float:
    """RoPE base of a Qwen2Config (transformers 4: ``rope_theta``; 5: ``rope_parameters["rope_theta"]``).

    Raises ValueError for a RoPE scaling type other than the default one (BAGEL uses none)."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    for src in (params, scaling):
        kind = src.get("rope_type", src.get("type", "default")) if isinstance(src, dict) else "default"
        if kind not in (None, "default"):
            raise ValueError(
                f"config rope_type={kind!r} is unsupported: only the default RoPE is implemented"
            )
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = params.get("rope_theta", 10000.0) if isinstance(params, dict) else 10000.0
    return float(theta)


def config_head_dim(config) -> int:
    """Head dim: ``config.head_dim`` when set, else ``hidden_size // num_attention_heads``."""
    hd = getattr(config, "head_dim", None)
    if hd is None:
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(
                f"config.hidden_size={config.hidden_size} is not divisible by num_attention_heads={config.num_attention_heads}"
            )
        hd = config.hidden_size // config.num_attention_heads
    return int(hd)


def _validate_config(config) -> None:
    layer_module = getattr(config, "layer_module", "Qwen2DecoderLayer")
    if layer_module not in DECODER_LAYERS:
        raise ValueError(f"config.layer_module={layer_module!r} is not one of {tuple(DECODER_LAYERS)}")
    if config.num_key_value_heads <= 0 or config.num_attention_heads % config.num_key_value_heads != 0:
        raise ValueError(
            f"config.num_attention_heads={config.num_attention_heads} must be a multiple of "
            f"num_key_value_heads={config.num_key_value_heads}"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(
            f"config.hidden_act={config.hidden_act!r} is unsupported: Qwen2 uses 'silu' (SwiGLU)"
        )
    if config_head_dim(config) % 2:
        raise ValueError(f"head dim {config_head_dim(config)} must be even for RoPE")
    config_rope_theta(config)


# ---------------------------------------------------------------------------------------------- modules
class Qwen2RMSNorm(nn.Module):
    """RMSNorm with Qwen2's numerics: normalise in fp32, cast back, then scale by ``weight``.

    ``forward`` is the plain-torch path; where this stock module has nothing attached, the model's
    fast path may call :mod:`bagel_kernels.mot` with ``weight`` and ``variance_epsilon`` instead."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qwen2_rms_norm(x, self.weight, self.variance_epsilon, stats_dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class Qwen2MLP(nn.Module):
    """SwiGLU MLP ``down(silu(gate(x)) * up(x))``, no biases. Where this stock module has nothing
    attached, the model's fast path calls its three projections around one SwiGLU kernel instead."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2RotaryEmbedding(nn.Module):
    """Default RoPE tables, ``inv_freq`` a non-persistent buffer (no checkpoint key).

    ``forward(position_ids [L], dtype) -> (cos, sin)`` each ``[L, D]`` (both halves repeated), computed
    in fp32 then cast: the reference path. The fast path uses ``bagel_kernels.mot.rope_cos_sin``."""

    def __init__(self, config):
        super().__init__()
        self.head_dim = config_head_dim(config)
        self.theta = config_rope_theta(config)
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device=None) -> torch.Tensor:
        """The fp32 inverse frequencies ``[D/2]`` (kept in fp32: in bf16 the angles of far positions lose
        their precision)."""
        return rope_inv_freq(self.head_dim, self.theta, device)

    def reset_parameters(self) -> None:
        """Recompute ``inv_freq`` in fp32 on its device (after ``to_empty`` or a dtype cast)."""
        self.inv_freq = self.compute_inv_freq(self.inv_freq.device)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        # recompute when model.to(dtype) cast the buffer or it was never materialised (meta device)
        if inv_freq.dtype != torch.float32 or inv_freq.is_meta:
            inv_freq = self.compute_inv_freq()
        return rope_tables(position_ids, inv_freq.to(position_ids.device), dtype)


class PackedAttention(nn.Module):
    """Attention of a dense (or MoE) layer: ``q/k/v_proj`` (bias), ``o_proj`` (no bias), and
    ``q_norm``/``k_norm`` (per-head RMSNorm over D) when ``config.qk_norm`` (else ``nn.Identity``, no keys).

    ``forward(x, ctx)``: the attention sub-block on normed hidden states ``x`` [L, H]; ``ctx`` is the
    pack's :class:`PackContext` (grouped rows) or another context that runs it (the gather/scatter
    reference's, :mod:`bagel.model.qwen2_reference`)."""

    routed = False  # the *_moe_gen siblings serve generation rows

    def __init__(self, config, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config_head_dim(config)
        self.qk_norm = bool(getattr(config, "qk_norm", False))
        self.eps = config.rms_norm_eps
        self._add_weights("")

    def _add_weights(self, suffix: str) -> None:
        """The projections and q/k norms of one expert, named ``q_proj<suffix>`` and so on (created in
        the checkpoint's key order, so parameter initialisation draws the same random numbers)."""
        qd, kvd = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        h = self.hidden_size
        for name, (fan_in, fan_out, bias) in (
            ("q_proj", (h, qd, True)),
            ("k_proj", (h, kvd, True)),
            ("v_proj", (h, kvd, True)),
            ("o_proj", (qd, h, False)),
        ):
            setattr(self, name + suffix, nn.Linear(fan_in, fan_out, bias=bias))
        for name in ("q_norm", "k_norm"):
            setattr(
                self, name + suffix, Qwen2RMSNorm(self.head_dim, self.eps) if self.qk_norm else nn.Identity()
            )

    def _sibling(self, name: str) -> nn.Module | None:
        return getattr(self, name + "_moe_gen") if self.routed else None

    def fusion_plan(self) -> dict[str, bool]:
        """Which of this module's ops may run fused this pack (see :func:`bagel.model.fusion.fusable`)."""
        plan = {
            name: fusable(nn.Linear, getattr(self, name), self._sibling(name))
            for name in ("q_proj", "k_proj", "v_proj", "o_proj")
        }
        norm = Qwen2RMSNorm if self.qk_norm else nn.Identity
        norms = (self.q_norm, self.k_norm, self._sibling("q_norm"), self._sibling("k_norm"))
        plan["qk_norm"] = fusable(norm, *norms) and _same_eps(*norms)
        return plan

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if isinstance(ctx, PackContext):
            return _attention(self, x, ctx)
        return ctx.run_attention(self, x)


class PackedAttentionMoT(PackedAttention):
    """Attention weights of a MoT layer: those of :class:`PackedAttention` plus the ``*_moe_gen``
    siblings used by generation tokens."""

    routed = True

    def __init__(self, config, layer_idx: int | None = None):
        super().__init__(config, layer_idx)
        self._add_weights("_moe_gen")


def _same_eps(*norms) -> bool:
    """One fused launch applies one epsilon: the stock norms it replaces must agree on it."""
    eps = {getattr(m, "variance_epsilon", None) for m in norms if m is not None}
    return len(eps) <= 1


# ---------------------------------------------------------------------------------------------- fusion plan
@dataclass(frozen=True)
class LayerFusion:
    """Which fused kernels one decoder layer takes for a pack, by op name (``input_layernorm``,
    ``q_proj``, ``qk_norm``, ``mlp``, ``gate_proj``, ...; each name covers the module of that name and,
    in a routed op, its ``*_moe_gen`` sibling). A fused op has a kernel read the stock modules' raw
    weights (both experts' RMSNorm in one launch, q/k norm fused with RoPE, two GEMMs into one buffer,
    the MLP as its projections around one SwiGLU kernel); a called op has its modules called
    (``und(x[:n])`` and ``gen(x[n:])`` on the grouped rows), so a LoRA layer, a quantised linear or a
    hook acts. Linears that are not routed are always called (a stock nn.Linear is one ``F.linear``
    either way).

    ``called``: the ops whose modules are called; every other op is fused. ``all_called``: no fusion
    at all (a layer of a kind the model does not know runs its own forward). A new decoder block with
    new op names needs no change here: its plan lists what it calls."""

    called: frozenset[str] = frozenset()
    all_called: bool = False

    def fused(self, name: str) -> bool:
        """Whether the op ``name`` runs as a fused kernel in this pack."""
        return not self.all_called and name not in self.called

    @classmethod
    def from_flags(cls, flags: dict[str, bool]) -> LayerFusion:
        """From ``{op name: fusable}`` (the modules' :meth:`fusion_plan` answers)."""
        return cls(called=frozenset(name for name, ok in flags.items() if not ok))


@dataclass(frozen=True)
class FusionPlan:
    """:class:`LayerFusion` of every decoder layer (by ``layer_idx``) and of the final norm(s)."""

    layers: tuple[LayerFusion, ...]
    norm: bool = True


_UNFUSED = LayerFusion(all_called=True)


# ---------------------------------------------------------------------------------------------- grouped forward
@dataclass
class PackContext:
    """What every layer of one grouped forward shares (built once per forward by :class:`Qwen2Model`).

    Rows ``[0, n_und)`` of the hidden states are understanding tokens, ``[n_und, L)`` generation tokens;
    ``cos``/``sin`` ``[L, D]`` are in that grouped row order; ``mask`` is the pack's mask truncated to L
    and carrying the row index (token i of the pack is grouped row ``mask.row_index[i]``), or no row
    index when the grouped order is the pack order. ``fusion`` is the pack's :class:`FusionPlan`
    (:meth:`Qwen2Model.fusion_plan`); None: each layer decides when it runs (eager use only)."""

    n_und: int
    cos: torch.Tensor
    sin: torch.Tensor
    mask: PackedMask
    backend: BagelBackendConfig
    freeze_und: bool = False
    # the grouping by expert (validated), or None when the grouped order is the pack order
    order: mot.GroupedOrder | None = None
    fusion: FusionPlan | None = None

    @property
    def perm(self) -> torch.Tensor | None:
        """Grouped row -> token (None: the pack order)."""
        return None if self.order is None else self.order.perm

    @property
    def inv(self) -> torch.Tensor | None:
        """Token -> grouped row (= the mask's row index; None: the pack order)."""
        return None if self.order is None else self.order.inv

    def layer_fusion(self, layer_idx: int | None, owner: nn.Module) -> LayerFusion:
        """The plan of layer ``layer_idx``; decided now from ``owner`` when the pack has no plan."""
        if self.fusion is not None and layer_idx is not None:
            return self.fusion.layers[layer_idx]
        if isinstance(owner, PackedAttention):
            return LayerFusion.from_flags(owner.fusion_plan())
        return owner.fusion_plan()


class _ZeroGradRows(torch.autograd.Function):
    """Identity forward; the backward zeroes the gradient of rows ``[0, n)``. Equals upstream's
    ``x[und] = x[und].detach()`` (freeze_und) on grouped rows without a copy in the forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int) -> torch.Tensor:
        ctx.n = n
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.clone()
        g[: ctx.n] = 0
        return g, None


def _freeze_rows(x: torch.Tensor, n: int, active: bool) -> torch.Tensor:
    if not active or n == 0 or not x.requires_grad:
        return x
    return _ZeroGradRows.apply(x, n)


def _call_rows(x: torch.Tensor, n: int, und: nn.Module, gen: nn.Module | None) -> torch.Tensor:
    """The module path of an op on grouped rows: ``und(x)`` when not routed, else
    ``cat(und(x[:n]), gen(x[n:]))`` (two contiguous slices, so any module works)."""
    if gen is None:
        return und(x)
    return torch.cat([und(x[:n]), gen(x[n:])], dim=0)


def _qk_norm_rope(attn: PackedAttention, q, k, ctx: PackContext, fused: bool):
    """q [L, Hq, D], k [L, Hkv, D] grouped -> normed (q/k norm modules) and rotated q, k."""
    routed = attn.routed
    n = ctx.n_und if routed else q.shape[0]
    if fused and attn.qk_norm:
        qg = attn.q_norm_moe_gen.weight if routed else attn.q_norm.weight
        kg = attn.k_norm_moe_gen.weight if routed else attn.k_norm.weight
        return mot.mot_qk_norm_rope(
            q,
            k,
            n,
            attn.q_norm.weight,
            qg,
            attn.k_norm.weight,
            kg,
            ctx.cos,
            ctx.sin,
            attn.q_norm.variance_epsilon,
            backend=ctx.backend.mot,
        )
    if not fused:  # the norm modules (Identity without qk_norm), then RoPE
        q = _call_rows(q, n, attn.q_norm, attn._sibling("q_norm"))
        k = _call_rows(k, n, attn.k_norm, attn._sibling("k_norm"))
    return apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)


def _norm(x: torch.Tensor, n: int, und: nn.Module, gen: nn.Module | None, fused: bool, backend: str):
    """RMSNorm of grouped rows: ``und`` on rows [0, n), ``gen`` on the rest (not routed: gen=None).
    Fused: both experts in one launch, reading the stock Qwen2RMSNorm weights."""
    if not fused:
        return _call_rows(x, n, und, gen)
    if gen is None:
        return mot.mot_rms_norm(x, x.shape[0], und.weight, und.weight, und.variance_epsilon, backend=backend)
    return mot.mot_rms_norm(x, n, und.weight, gen.weight, und.variance_epsilon, backend=backend)


def _linear(x: torch.Tensor, n: int, und: nn.Module, gen: nn.Module | None, fused: bool, backend: str):
    """A projection of grouped rows; routed and fused: two GEMMs into one buffer (stock nn.Linear)."""
    if gen is None or not fused:
        return _call_rows(x, n, und, gen)
    return mot.mot_linear(x, n, und.weight, und.bias, gen.weight, gen.bias, backend=backend)


def _mlp(x: torch.Tensor, n: int, und: nn.Module, gen: nn.Module | None, plan: LayerFusion, backend: str):
    """SwiGLU MLP of grouped rows. Stock Qwen2MLP modules with nothing attached run as their three
    projections (each fused or called per ``plan``) around one SwiGLU kernel; others are called."""
    if not plan.fused("mlp"):
        return _call_rows(x, n, und, gen)

    def proj(name: str, inp: torch.Tensor) -> torch.Tensor:
        sibling = None if gen is None else getattr(gen, name)
        return _linear(inp, n, getattr(und, name), sibling, plan.fused(name), backend)

    h = mot.swiglu(proj("gate_proj", x), proj("up_proj", x), backend=backend)  # [L, I]
    return proj("down_proj", h)  # [L, H]


def _attention(attn: PackedAttention, x: torch.Tensor, ctx: PackContext) -> torch.Tensor:
    """Self-attention sub-block on grouped rows (``x`` already normed): projections, q/k norm + RoPE,
    shared packed attention (rows read through the mask's row index), output projection."""
    L = x.shape[0]
    be = ctx.backend.mot
    n = ctx.n_und
    plan = ctx.layer_fusion(attn.layer_idx, attn)

    def proj(name: str, inp: torch.Tensor) -> torch.Tensor:
        return _linear(inp, n, getattr(attn, name), attn._sibling(name), plan.fused(name), be)

    q = proj("q_proj", x).view(L, attn.num_heads, attn.head_dim)
    k = proj("k_proj", x).view(L, attn.num_key_value_heads, attn.head_dim)
    v = proj("v_proj", x).view(L, attn.num_key_value_heads, attn.head_dim)
    q, k = _qk_norm_rope(attn, q, k, ctx, plan.fused("qk_norm"))
    frz = ctx.freeze_und and attn.routed
    q, k, v = (_freeze_rows(t, n, frz) for t in (q, k, v))
    o = packed_attention(
        q, k, v, ctx.mask, backend=ctx.backend.attention, deterministic=ctx.backend.deterministic
    )
    out = proj("o_proj", o.reshape(L, attn.num_heads * attn.head_dim))  # [L, H]
    return _freeze_rows(out, n, frz)


# ---------------------------------------------------------------------------------------------- layers
@decoder_layer
class Qwen2DecoderLayer(nn.Module):
    """Dense pre-norm decoder layer: ``x += attn(norm(x)); x += mlp(norm(x))``.

    ``forward(x, ctx)``: with the pack's :class:`PackContext`, :meth:`forward_grouped`; with another
    context (the gather/scatter reference's), that context runs the layer. Every submodule is called
    through ``__call__`` (or, for a stock module with nothing attached, replaced by a fused kernel)."""

    routed_attention = False
    routed_mlp = False

    def __init__(self, config, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.self_attn = self._attention_module(config)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def _attention_module(self, config) -> PackedAttention:
        return PackedAttention(config, self.layer_idx)

    def _sibling(self, name: str, routed: bool) -> nn.Module | None:
        return getattr(self, name + "_moe_gen") if routed else None

    def fusion_plan(self) -> LayerFusion:
        """This layer's :class:`LayerFusion` for the modules it holds now (see :func:`bagel.model.fusion.fusable`)."""
        ra, rm = self.routed_attention, self.routed_mlp
        plan = {}
        for name in ("input_layernorm", "post_attention_layernorm"):
            norms = (getattr(self, name), self._sibling(name, ra))
            plan[name] = fusable(Qwen2RMSNorm, *norms) and _same_eps(*norms)
        attn = self.self_attn
        if isinstance(attn, PackedAttention):
            plan.update(attn.fusion_plan())
        else:  # a module of another kind runs its own forward
            plan.update(dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj", "qk_norm"), False))
        und, gen = self.mlp, self._sibling("mlp", rm)
        plan["mlp"] = fusable(Qwen2MLP, und, gen)
        for name in ("gate_proj", "up_proj", "down_proj"):
            plan[name] = plan["mlp"] and fusable(
                nn.Linear, getattr(und, name), None if gen is None else getattr(gen, name)
            )
        return LayerFusion.from_flags(plan)

    def forward_grouped(self, x: torch.Tensor, ctx: PackContext) -> torch.Tensor:
        """One layer on grouped hidden states ``x`` [L, H] (see :class:`PackContext`)."""
        be = ctx.backend.mot
        n = ctx.n_und
        ra, rm = self.routed_attention, self.routed_mlp
        plan = ctx.layer_fusion(self.layer_idx, self)
        h = _norm(
            x,
            n,
            self.input_layernorm,
            self._sibling("input_layernorm", ra),
            plan.fused("input_layernorm"),
            be,
        )
        x = x + self.self_attn(h, ctx)
        h = _norm(
            x,
            n,
            self.post_attention_layernorm,
            self._sibling("post_attention_layernorm", ra),
            plan.fused("post_attention_layernorm"),
            be,
        )
        m = _mlp(h, n, self.mlp, self._sibling("mlp", rm), plan, be)
        # upstream detaches the understanding rows of the MLP output in MoT layers only
        return x + _freeze_rows(m, n, ctx.freeze_und and ra)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if isinstance(ctx, PackContext):
            return self.forward_grouped(x, ctx)
        return ctx.run_layer(self, x)


@decoder_layer
class Qwen2MoEDecoderLayer(Qwen2DecoderLayer):
    """Only the MLP routed (``mlp`` / ``mlp_moe_gen``); norms and attention shared by all tokens."""

    routed_mlp = True

    def __init__(self, config, layer_idx: int | None = None):
        super().__init__(config, layer_idx)
        self.mlp_moe_gen = Qwen2MLP(config)


@decoder_layer
class Qwen2MoTDecoderLayer(Qwen2DecoderLayer):
    """Everything routed: norms, attention projections and q/k norms, MLP (attention itself shared)."""

    routed_attention = True
    routed_mlp = True

    def __init__(self, config, layer_idx: int | None = None):
        super().__init__(config, layer_idx)
        self.mlp_moe_gen = Qwen2MLP(config)
        self.input_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def _attention_module(self, config) -> PackedAttention:
        return PackedAttentionMoT(config, self.layer_idx)


LAYER_MODULES = tuple(DECODER_LAYERS)  # the built-in blocks


# ---------------------------------------------------------------------------------------------- input checks
def prepare_routing(
    L: int,
    packed_und_token_indexes,
    packed_gen_token_indexes,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``(und, gen)`` long index tensors that partition ``range(L)``.

    ``gen`` None or empty means no generation token; ``und`` None means every token not in ``gen``.
    Raises ValueError naming the argument when the two do not partition the sequence. The value
    checks run on the device and are read back once (one host sync)."""
    checks = DeviceChecks()
    und, gen = routing_indexes(L, packed_und_token_indexes, packed_gen_token_indexes, device, checks)
    checks.raise_first()
    return und, gen


def routing_indexes(
    L: int, und_arg, gen_arg, device, checks: DeviceChecks
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prepare_routing` without the read-back: host checks raise, value checks go to ``checks``
    (the returned tensors are meaningful only once ``checks`` passed)."""
    gen = (
        torch.zeros(0, dtype=torch.long, device=device)
        if gen_arg is None
        else as_index(gen_arg, "packed_gen_token_indexes", device)
    )
    if und_arg is None:
        checks.add((gen < 0) | (gen >= L), f"packed_gen_token_indexes has entries outside [0, {L})")
        und, n_und = _complement(L, gen)
        checks.add(
            (n_und != L - gen.numel()).reshape(1),
            "packed_gen_token_indexes repeats an index",
            lambda: _raise_cover(int(n_und), gen.numel(), L),
        )
    else:
        und = as_index(und_arg, "packed_und_token_indexes", device)
        if und.numel() + gen.numel() != L:
            _raise_cover(und.numel(), gen.numel(), L)
    for name, t in (("packed_und_token_indexes", und), ("packed_gen_token_indexes", gen)):
        checks.add((t < 0) | (t >= L), f"{name} has entries outside [0, {L})")
    checks.add(
        mot.GroupedOrder.partition_flags(und, gen, L),
        "packed_und_token_indexes and packed_gen_token_indexes overlap or repeat an index: "
        "they must partition range(sequence_length)",
    )
    return und, gen


def _complement(L: int, gen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of ``range(L)`` not in ``gen``, ascending, and how many there are (a device scalar),
    without a host sync (``torch.nonzero`` would take one). Exact when ``gen`` holds distinct indexes
    in range; the caller checks that."""
    keep = torch.ones(L, dtype=torch.bool, device=gen.device)
    if gen.numel() and L:
        keep[gen.clamp(0, L - 1)] = False
    order = torch.argsort((~keep).to(torch.int8), stable=True)  # kept tokens first, in order
    return order[: max(L - gen.numel(), 0)], keep.sum()


def _raise_cover(n_und: int, n_gen: int, L: int) -> None:
    raise ValueError(
        f"packed_und_token_indexes ({n_und}) and packed_gen_token_indexes ({n_gen}) must together "
        f"cover the sequence of {L} tokens exactly once"
    )


def check_inputs(model: Qwen2Model, packed_sequence, sample_lens, attention_mask, packed_position_ids):
    """Validate the LM's inputs; returns the normalised ``(mask, position_ids)``."""
    check_sequence(model, packed_sequence)
    return check_context_inputs(
        packed_sequence.shape[0], packed_sequence.device, sample_lens, attention_mask, packed_position_ids
    )


def check_sequence(model: Qwen2Model, packed_sequence) -> None:
    cfg = model.config
    if not isinstance(packed_sequence, torch.Tensor) or packed_sequence.dim() != 2:
        raise ValueError(
            f"packed_sequence must be a [sequence_length, hidden] tensor, got "
            f"{tuple(packed_sequence.shape) if isinstance(packed_sequence, torch.Tensor) else type(packed_sequence).__name__}"
        )
    if packed_sequence.shape[1] != cfg.hidden_size:
        raise ValueError(
            f"packed_sequence has hidden size {packed_sequence.shape[1]}, the model {cfg.hidden_size}"
        )
    if not packed_sequence.is_floating_point():
        raise ValueError(f"packed_sequence must be floating point, got {packed_sequence.dtype}")
    weights = float_dtype(model)
    if packed_sequence.dtype.itemsize > weights.itemsize:
        # (a lower precision than the weights' is fine: FSDP2's mixed precision casts them when it runs)
        raise ValueError(
            f"packed_sequence has dtype {packed_sequence.dtype} but the model's weights are {weights}: "
            f"cast the embeddings to {weights}"
        )


def check_context_inputs(L: int, device, sample_lens, attention_mask, packed_position_ids):
    """Validate and normalise the mask / positions of a pack of ``L`` tokens (see _check_inputs)."""
    if isinstance(attention_mask, (list, tuple)):
        attention_mask = PackedMask.from_dense(attention_mask, device=device)
    if not isinstance(attention_mask, PackedMask):
        raise ValueError(
            f"attention_mask must be a bagel_kernels.PackedMask (or a list of per-sample dense masks), got "
            f"{type(attention_mask).__name__}"
        )
    if attention_mask.has_row_index:
        raise ValueError("attention_mask must not carry a row_index: the model attaches its own")
    if attention_mask.total_len < L:
        raise ValueError(
            f"attention_mask covers {attention_mask.total_len} tokens, fewer than the sequence's {L}"
        )
    attention_mask = attention_mask.to(device)
    if sample_lens is not None and sum(as_int_list(sample_lens, "sample_lens")) != attention_mask.total_len:
        raise ValueError(
            f"sample_lens sum to {sum(sample_lens)} but attention_mask covers {attention_mask.total_len}"
        )
    if not isinstance(packed_position_ids, torch.Tensor) or packed_position_ids.shape != (L,):
        raise ValueError(
            f"packed_position_ids must be a 1-D tensor of {L} positions, got "
            f"{tuple(packed_position_ids.shape) if isinstance(packed_position_ids, torch.Tensor) else type(packed_position_ids).__name__}"
        )
    if packed_position_ids.is_floating_point():
        raise ValueError(f"packed_position_ids must hold integers, got {packed_position_ids.dtype}")
    return attention_mask, packed_position_ids.to(device)


# ---------------------------------------------------------------------------------------------- model
class Qwen2Model(HasBackend, nn.Module):
    """Embeddings, decoder layers, final norm(s) and the rotary tables.

    ``norm_moe_gen`` exists when the layers route a sub-block (MoE or MoT; upstream: ``"Mo" in layer_module``); such a
    model then routes the final norm as well.

    ``freeze_und`` (upstream semantics): the understanding rows of the input are detached at entry,
    every MoT layer detaches the understanding rows of q, k (after q/k norm), v, of the attention
    block's output and of the MLP output, and the final ``norm`` output of understanding rows is
    detached. MoE and dense layers ignore the flag. So in a MoT model no gradient reaches any
    understanding-side parameter (they get zero gradients), while generation-side ones train.
    """

    def __init__(self, config, backend: BagelBackendConfig | None = None):
        super().__init__()
        _validate_config(config)
        self.config = config
        self.backend = backend if backend is not None else BagelBackendConfig()
        self.padding_idx = getattr(config, "pad_token_id", None)
        self.vocab_size = config.vocab_size
        self.layer_module = getattr(config, "layer_module", "Qwen2DecoderLayer")
        layer_cls = DECODER_LAYERS[self.layer_module]
        self.use_moe = layer_cls.routed_attention or layer_cls.routed_mlp
        self.freeze_und = bool(getattr(config, "freeze_und", False))
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([layer_cls(config, i) for i in range(config.num_hidden_layers)])
        # recompute each decoder layer in backward (bagel.train.distributed.apply_fsdp2 turns it on)
        self.gradient_checkpointing = False
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.use_moe:
            self.norm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config)
        self.head_dim = config_head_dim(config)
        self.rope_theta = config_rope_theta(config)

    def prepare_context(
        self,
        sequence_length: int,
        sample_lens: Sequence[int] | None,
        attention_mask: PackedMask,
        packed_position_ids: torch.Tensor,
        packed_und_token_indexes: torch.Tensor | None = None,
        packed_gen_token_indexes: torch.Tensor | None = None,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> PackContext:
        """The once-per-pack part of the forward that needs no hidden states, run eagerly: validation
        (host checks, and the value checks read back in one host sync), grouping by expert
        (``ctx.perm`` / ``ctx.inv``), the mask truncated to the sequence with its row index and the
        kernels' block tables, RoPE tables in grouped row order. Everything :meth:`decode` reads, so
        that :meth:`decode` holds only tensor work."""
        L = as_int(sequence_length, "sequence_length")
        if L <= 0:
            raise ValueError(f"sequence_length must be positive, got {L}")
        mask, pos = check_context_inputs(L, device, sample_lens, attention_mask, packed_position_ids)
        checks = DeviceChecks()
        routing = None
        if self.use_moe or (self.freeze_und and packed_und_token_indexes is not None):
            routing = routing_indexes(L, packed_und_token_indexes, packed_gen_token_indexes, device, checks)
        checks.raise_first()
        return self.build_context(mask.truncated(L), pos, routing, device=device, dtype=dtype)

    def build_context(
        self,
        mask: PackedMask,
        pos: torch.Tensor,
        routing: tuple[torch.Tensor, torch.Tensor] | None,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> PackContext:
        """:meth:`prepare_context` from validated inputs, with no check and no host sync: ``mask``
        already truncated to the sequence (``total_len`` = L, no row index), ``pos`` ``[L]`` long on the
        device, ``routing`` None (every row understanding) or long ``(und, gen)`` partitioning
        ``range(L)``. The caller validated them (``BagelForUnifiedMultimodal.prepare_pack`` does, in its
        one read-back)."""
        L = mask.total_len
        n_und = L if routing is None else routing[0].numel()
        order = None
        if 0 < n_und < L:
            # group once: understanding rows [0, n_und), generation rows [n_und, L); un-permute at exit.
            # from_checked: the caller read GroupedOrder.partition_flags back with its other checks
            order = mot.GroupedOrder.from_checked(*routing, L)
            pos = pos[order.perm]
            mask = mask.with_row_index(order)
        # else: all rows on one side, the pack order is already grouped
        prepare_attention(mask, device, dtype, self.head_dim, self.backend.attention)
        # [L, D] each, in grouped row order
        cos, sin = mot.rope_cos_sin(pos, self.head_dim, self.rope_theta, dtype)
        return PackContext(
            n_und=n_und,
            cos=cos,
            sin=sin,
            mask=mask,
            backend=self.backend,
            freeze_und=self.freeze_und,
            order=order,
            fusion=self.fusion_plan(),
        )

    def fusion_plan(self) -> FusionPlan:
        """Which fused kernels this pack takes, decided from the modules the model holds now: per
        decoder layer (:meth:`Qwen2DecoderLayer.fusion_plan`) and for the final norm(s). Stock modules
        with nothing attached run fused; any other module is called (see :func:`bagel.model.fusion.fusable`).
        Run eagerly once per pack by :meth:`prepare_context`, outside any compiled region."""
        layers = []
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Qwen2DecoderLayer):  # a layer of another kind: everything called
                layers.append(_UNFUSED)
                continue
            if layer.layer_idx != i:
                raise ValueError(
                    f"decoder layer {i} has layer_idx={layer.layer_idx!r}: layers must keep their position "
                    "as layer_idx (the pack's fusion plan is indexed by it)"
                )
            layers.append(layer.fusion_plan())
        norms = (self.norm, self.norm_moe_gen if self.use_moe else None)
        return FusionPlan(layers=tuple(layers), norm=fusable(Qwen2RMSNorm, *norms) and _same_eps(*norms))

    def prepare_pack(
        self,
        packed_sequence: torch.Tensor,
        sample_lens: Sequence[int] | None,
        attention_mask: PackedMask,
        packed_position_ids: torch.Tensor,
        packed_und_token_indexes: torch.Tensor | None = None,
        packed_gen_token_indexes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PackContext, torch.Tensor | None]:
        """:meth:`prepare_context` for ``packed_sequence`` ``[L, H]``, then its rows grouped by expert.
        Returns ``(x, ctx, inv)``: grouped hidden states, the :class:`PackContext` every layer reads,
        and the un-permutation (``ctx.inv``, or None)."""
        check_sequence(self, packed_sequence)
        ctx = self.prepare_context(
            packed_sequence.shape[0],
            sample_lens,
            attention_mask,
            packed_position_ids,
            packed_und_token_indexes,
            packed_gen_token_indexes,
            device=packed_sequence.device,
            dtype=packed_sequence.dtype,
        )
        x = packed_sequence
        if ctx.order is not None:
            x = mot.group_rows(packed_sequence, ctx.order, backend=ctx.backend.mot)
        return x, ctx, ctx.inv

    def decode(self, x: torch.Tensor, ctx: PackContext) -> torch.Tensor:
        """Every decoder layer and the final norm(s) on grouped hidden states (no host syncs, no
        data-dependent Python: ``torch.compile(fullgraph=True)`` traces it)."""
        be = ctx.backend
        n_und = ctx.n_und
        if self.freeze_und:
            x = _freeze_rows(x, n_und, True)
        for layer in self.layers:
            # through __call__ so that module hooks (FSDP2's unshard/reshard) run
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        fused = ctx.fusion.norm if ctx.fusion is not None else self.fusion_plan().norm
        if self.use_moe:
            x = _norm(x, n_und, self.norm, self.norm_moe_gen, fused, be.mot)
            x = _freeze_rows(x, n_und, self.freeze_und)
        else:
            x = _norm(x, x.shape[0], self.norm, None, fused, be.mot)
        return x

    def forward_train(self, *args, **kwargs) -> torch.Tensor:
        """:meth:`Qwen2ForCausalLM.forward_train` (same arguments, those of :meth:`prepare_pack`):
        :meth:`prepare_pack`, :meth:`decode`, un-permute."""
        x, ctx, inv = self.prepare_pack(*args, **kwargs)
        x = self.decode(x, ctx)
        if ctx.order is not None:
            x = mot.ungroup_rows(x, ctx.order, backend=ctx.backend.mot)
        return x

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.forward_train(*args, **kwargs)


class Qwen2ForCausalLM(nn.Module):
    """BAGEL's language model: :class:`Qwen2Model` (``.model``) plus ``lm_head`` (no bias).

    Args:
        config: ``transformers.Qwen2Config`` with ``qk_norm``, ``layer_module``, ``freeze_und``.
        backend: kernel choice (default ``BagelBackendConfig()``, i.e. all "auto"); settable later via
            ``.backend``.
    """

    def __init__(self, config, backend: BagelBackendConfig | None = None):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config, backend)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    # -------------------------------------------------------------- backend / embeddings
    @property
    def backend(self) -> BagelBackendConfig:
        return self.model.backend

    @backend.setter
    def backend(self, value: BagelBackendConfig) -> None:
        self.model.backend = value

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> Qwen2Model:
        return self.model

    # -------------------------------------------------------------- initialisation
    @torch.no_grad()
    def _init_module(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, Qwen2RMSNorm):
            module.weight.fill_(1.0)

    def init_weights(self, want: Callable[[nn.Module], bool] | None = None) -> None:
        """HF Qwen2 initialisation: Linear/Embedding ~ N(0, initializer_range), biases 0, norms 1.
        ``want(module)``: initialise only the modules it accepts (default: all)."""
        for m in self.modules():
            if want is None or want(m):
                self._init_module(m)

    @torch.no_grad()
    def init_moe(self) -> None:
        """Copy every understanding weight into its ``*_moe_gen`` sibling (upstream's stage-2 start
        from an understanding-only checkpoint)."""
        params = dict(self.named_parameters())
        for name, p in params.items():
            if "moe_gen" in name:
                p.copy_(params[name.replace("_moe_gen", "")])

    # -------------------------------------------------------------- forward
    def forward_train(
        self,
        packed_sequence: torch.Tensor,
        sample_lens: Sequence[int] | None,
        attention_mask: PackedMask,
        packed_position_ids: torch.Tensor,
        packed_und_token_indexes: torch.Tensor | None = None,
        packed_gen_token_indexes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training forward over one pack; returns the final hidden states ``[L, H]`` (after the final
        norm, ``norm_moe_gen`` on generation tokens of MoE/MoT models) in the ORIGINAL token order.

        Args:
            packed_sequence: ``[L, H]`` input embeddings (L = sequence_length).
            sample_lens: per-sample lengths incl. the pad sample (accepted for upstream compatibility;
                checked against the mask when given).
            attention_mask: the pack's :class:`bagel_kernels.PackedMask` with ``total_len >= L`` (rows
                beyond L are the trailing pad sample), or upstream's list of per-sample dense masks.
            packed_position_ids: ``[L]`` RoPE positions.
            packed_und_token_indexes / packed_gen_token_indexes: 1-D indexes partitioning ``range(L)``
                (text + ViT tokens / VAE tokens). ``gen`` None or empty: an understanding-only pack;
                ``und`` None: every token not in ``gen``. Ignored by dense models (except freeze_und).
        """
        return self.model.forward_train(
            packed_sequence,
            sample_lens,
            attention_mask,
            packed_position_ids,
            packed_und_token_indexes,
            packed_gen_token_indexes,
        )

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.forward_train(*args, **kwargs)

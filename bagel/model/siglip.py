"""SigLIP-NaViT vision tower of BAGEL over packed, variable-resolution images.

All images of a pack are one sequence of patches ``[N, C*p*p]`` (BAGEL's patchify order: row in
patch, column in patch, channel); ``vit_token_seqlens`` gives the patches per image and every image
attends only to itself (one ``full`` split per image in a :class:`bagel_kernels.PackedMask`), through
:func:`bagel_kernels.packed_attention` (head dim 72 for so400m).

Positions: the absolute ``embeddings.position_embedding`` row of each patch's flattened grid id
(``packed_vit_position_ids``), or with ``config.rope`` a 2-D rotary embedding (first half of each head
rotated by the patch row, second half by its column; no checkpoint keys).

Parameter names follow HF SigLIP under ``vision_model.``: ``embeddings.patch_embedding`` (a Linear in
the checkpoint's ``[hidden, C*p*p]`` layout once :meth:`SiglipVisionEmbeddings.convert_conv2d_to_linear`
ran), ``embeddings.position_embedding``, ``encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1,
layer_norm2, mlp.fc1, mlp.fc2}``, ``post_layernorm``.

Every submodule is called (q/k/v/out projections, MLP, LayerNorms, encoder layers), so LoRA layers,
quantised linears and hooks act; the one fusion that reads raw weights, the patch embedding (linear +
bias + position row in one op), runs only when those modules are the stock ones with nothing attached
(:meth:`SiglipVisionModel.fusion_plan`), else ``patch_embedding`` and ``position_embedding`` are called.

Shapes: N = patches in the pack, E = ViT hidden size, h = heads, d = E / h.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from bagel.extras import needs_extra
from bagel.model.backend import BagelBackendConfig
from bagel.model.fusion import float_dtype, fusable
from bagel.model.validation import HasBackend
from bagel_kernels import PackedMask, packed_attention
from bagel_kernels.checks import as_int_list
from bagel_kernels.patch_embed import fused_patch_embed
from bagel_kernels.reference import apply_rope, patch_embed_reference, rope_inv_freq, rope_tables

with needs_extra():
    from transformers.activations import ACT2FN

__all__ = [
    "SiglipVisionEmbeddings",
    "SiglipAttention",
    "SiglipMLP",
    "SiglipEncoderLayer",
    "SiglipEncoder",
    "SiglipVisionTransformer",
    "SiglipVisionModel",
    "vit_rope_cos_sin",
    "patch_embed",
]


def patch_embed(
    patches: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_table: torch.Tensor | None,
    pos_ids: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """``patches @ weight.T + bias (+ pos_table[pos_ids])`` -> ``[N, E]``.

    ``backend`` is :attr:`BagelBackendConfig.patch_embed`: ``"torch"`` is plain PyTorch; ``"auto"`` /
    ``"cuda"`` / ``"cpu_ext"`` call :func:`bagel_kernels.patch_embed.fused_patch_embed` with that backend
    (``"auto"`` takes the torch path where the extension is not built; a named kernel then raises
    ValueError)."""
    if backend != "torch":
        return fused_patch_embed(patches, weight, bias, pos_table, pos_ids, backend=backend)
    return patch_embed_reference(patches, weight, bias, pos_table, pos_ids)


def vit_rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, grid_side: int, dtype: torch.dtype, base: float = 10000.0
) -> tuple[torch.Tensor, ...]:
    """2-D RoPE tables of upstream's ``RotaryEmbedding2D(head_dim // 2, ...)`` for flattened grid ids.

    Returns ``cos_h, sin_h, cos_w, sin_w``, each ``[N, head_dim // 2]`` (both halves repeated), computed
    in fp32 from row ``id // grid_side`` and column ``id % grid_side`` and cast to ``dtype``."""
    inv_freq = rope_inv_freq(head_dim // 2, base, position_ids.device)
    ids = position_ids.long()
    out = []
    for coord in (ids // grid_side, ids % grid_side):
        out += rope_tables(coord, inv_freq, dtype)  # cos, sin [N, head_dim // 2]
    return tuple(out)


def _rope_2d(x: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Rotate the first half of every head by the row tables, the second half by the column tables."""
    cos_h, sin_h, cos_w, sin_w = tables
    half = x.shape[-1] // 2
    rows, cols = apply_rope(x[..., :half], cos_h, sin_h), apply_rope(x[..., half:], cos_w, sin_w)
    return torch.cat([rows, cols], dim=-1)


class SiglipVisionEmbeddings(nn.Module):
    """Patch embedding (Conv2d as in HF until converted to BAGEL's Linear) plus, without rope, the
    absolute position embedding of ``(image_size // patch_size) ** 2`` rows."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.patch_embedding: nn.Module = nn.Conv2d(
            config.num_channels,
            self.embed_dim,
            kernel_size=self.patch_size,
            stride=self.patch_size,
            padding="valid",
        )
        self.num_patches_per_side = config.image_size // config.patch_size
        self.num_positions = self.num_patches_per_side**2
        self.use_rope = bool(getattr(config, "rope", False))
        if not self.use_rope:
            self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size**2

    @torch.no_grad()
    def convert_conv2d_to_linear(self) -> None:
        """Replace the Conv2d by a Linear ``[E, C*p*p]`` computing the same thing on patchified pixels:
        the kernel ``[E, C, p, p]`` is permuted to ``[E, p, p, C]``, BAGEL's patchify order."""
        conv = self.patch_embedding
        if isinstance(conv, nn.Linear):
            return
        w = conv.weight
        linear = nn.Linear(self.patch_dim, self.embed_dim, bias=True, device=w.device, dtype=w.dtype)
        linear.weight.copy_(w.permute(0, 2, 3, 1).reshape(self.embed_dim, self.patch_dim))
        linear.bias.copy_(conv.bias)
        self.patch_embedding = linear

    def fusable(self) -> bool:
        """Whether the fused patch-embedding op may stand in for ``patch_embedding`` (and
        ``position_embedding``): both the stock modules with nothing attached (:func:`bagel.model.fusion.fusable`)."""
        if not fusable(nn.Linear, self.patch_embedding):
            return False
        if self.use_rope:
            return True
        pos = self.position_embedding
        return fusable(nn.Embedding, pos) and pos.max_norm is None

    def forward(
        self,
        packed_pixel_values: torch.Tensor,
        packed_flattened_position_ids: torch.Tensor,
        backend: str,
        fused: bool | None = None,
    ) -> torch.Tensor:
        """``[N, C*p*p]`` patches -> ``[N, E]``. ``fused`` (default: :meth:`fusable`, decided now): one
        fused op reading the stock modules' weights; else ``patch_embedding(x)`` (+
        ``position_embedding(ids)``), whatever those modules are."""
        pe = self.patch_embedding
        if isinstance(pe, nn.Conv2d):
            raise ValueError("the patch embedding is still a Conv2d: call convert_conv2d_to_linear() first")
        if fused is None:
            fused = self.fusable()
        x = packed_pixel_values.to(float_dtype(pe))
        ids = None if self.use_rope else packed_flattened_position_ids
        if fused:
            table = None if self.use_rope else self.position_embedding.weight
            return patch_embed(x, pe.weight, pe.bias, table, ids, backend)
        out = pe(x)
        if ids is not None:
            out = out + self.position_embedding(ids)
        return out


class SiglipAttention(nn.Module):
    """Multi-head self-attention (q/k/v/out projections with bias), varlen over packed images."""

    def __init__(self, config):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(
                f"vit hidden_size={self.embed_dim} is not divisible by num_attention_heads={self.num_heads}"
            )
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(
        self, x: torch.Tensor, mask: PackedMask, backend: BagelBackendConfig, rope=None
    ) -> torch.Tensor:
        N = x.shape[0]
        q = self.q_proj(x).view(N, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(N, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(N, self.num_heads, self.head_dim)
        if rope is not None:
            q, k = _rope_2d(q, rope), _rope_2d(k, rope)
        # softmax scale left to its default, head_dim ** -0.5 (= self.scale): a float attribute passed
        # in would become a symbolic float under torch.compile(dynamic=True) and break the graph
        o = packed_attention(q, k, v, mask, backend=backend.attention, deterministic=backend.deterministic)
        return self.out_proj(o.reshape(N, self.embed_dim))


class SiglipMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: ``x += attn(ln1(x)); x += mlp(ln2(x))``."""

    def __init__(self, config):
        super().__init__()
        self.self_attn = SiglipAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, x: torch.Tensor, mask: PackedMask, backend: BagelBackendConfig, rope=None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask, backend, rope)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([SiglipEncoderLayer(config) for _ in range(num_layers)])
        self.gradient_checkpointing = False  # recompute each layer in backward

    def forward(
        self, x: torch.Tensor, mask: PackedMask, backend: BagelBackendConfig, rope=None
    ) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, backend, rope, use_reentrant=False)
            else:
                x = layer(x, mask, backend, rope)
        return x


class SiglipVisionTransformer(nn.Module):
    """Embeddings, encoder layers, ``post_layernorm``."""

    def __init__(self, config, num_layers: int, grid_side: int):
        super().__init__()
        self.config = config
        self.grid_side = int(grid_side)
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config, num_layers)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        packed_pixel_values: torch.Tensor,
        packed_flattened_position_ids: torch.Tensor,
        mask: PackedMask,
        backend: BagelBackendConfig,
        fused_patch_embed: bool | None = None,
    ) -> torch.Tensor:
        x = self.embeddings(
            packed_pixel_values, packed_flattened_position_ids, backend.patch_embed, fused_patch_embed
        )
        rope = None
        if self.embeddings.use_rope:
            head_dim = self.config.hidden_size // self.config.num_attention_heads
            rope = vit_rope_cos_sin(packed_flattened_position_ids, head_dim, self.grid_side, x.dtype)
        x = self.encoder(x, mask, backend, rope)
        return self.post_layernorm(x)


class SiglipVisionModel(HasBackend, nn.Module):
    """The SigLIP-NaViT tower (``vision_model``) built with ``num_layers`` encoder layers.

    Args:
        config: a ``SiglipVisionConfig`` (``rope`` attribute: 2-D RoPE instead of absolute positions).
        num_layers: layers actually built (BAGEL: ``config.num_hidden_layers + 1 + vit_select_layer``).
        grid_side: width of the flattened position-id grid (BAGEL's ``vit_max_num_patch_per_side``);
            used to split ids into (row, column) for RoPE. Defaults to ``image_size // patch_size``.
        backend: kernel choice (settable later through ``.backend``).
    """

    def __init__(
        self,
        config,
        num_layers: int | None = None,
        grid_side: int | None = None,
        backend: BagelBackendConfig | None = None,
    ):
        super().__init__()
        self.config = config
        n = config.num_hidden_layers if num_layers is None else int(num_layers)
        side = config.image_size // config.patch_size if grid_side is None else int(grid_side)
        self.vision_model = SiglipVisionTransformer(config, n, side)
        self.backend = backend if backend is not None else BagelBackendConfig()
        self.init_weights()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.embeddings.patch_embedding

    @torch.no_grad()
    def init_weights(self, want: Callable[[nn.Module], bool] | None = None) -> None:
        """HF SigLIP initialisation: position embedding ~ N(0, 1/E), attention projections Xavier-uniform
        with zero bias, MLP Xavier-uniform with N(0, 1e-6) bias, patch embedding LeCun-normal with zero
        bias, LayerNorms (1, 0). ``want(module)``: initialise only the modules it accepts (default: all)."""

        def wanted(mod: nn.Module) -> bool:
            return want is None or want(mod)

        vm = self.vision_model
        emb = vm.embeddings
        pe = emb.patch_embedding
        if wanted(pe):
            # LeCun normal: truncated N(0, 1/fan_in) at 2 std, rescaled for the truncation (as HF/JAX)
            std = math.sqrt(1.0 / emb.patch_dim) / 0.87962566103423978
            nn.init.trunc_normal_(pe.weight, std=std, a=-2.0 * std, b=2.0 * std)
            nn.init.zeros_(pe.bias)
        if not emb.use_rope and wanted(emb.position_embedding):
            nn.init.normal_(emb.position_embedding.weight, std=1.0 / math.sqrt(emb.embed_dim))
        for layer in vm.encoder.layers:
            for lin in (
                layer.self_attn.q_proj,
                layer.self_attn.k_proj,
                layer.self_attn.v_proj,
                layer.self_attn.out_proj,
            ):
                if wanted(lin):
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.zeros_(lin.bias)
            for lin in (layer.mlp.fc1, layer.mlp.fc2):
                if wanted(lin):
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.normal_(lin.bias, std=1e-6)
        for m in vm.modules():
            if isinstance(m, nn.LayerNorm) and wanted(m):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(
        self,
        packed_pixel_values: torch.Tensor,
        packed_flattened_position_ids: torch.Tensor,
        vit_token_seqlens: torch.Tensor | list[int] | None = None,
        mask: PackedMask | None = None,
        fused_patch_embed: bool | None = None,
    ) -> torch.Tensor:
        """``[N, C*p*p]`` patches -> ``[N, E]`` features (after ``post_layernorm``).

        Give either ``vit_token_seqlens`` (patches per image) or a prebuilt ``mask``.
        ``fused_patch_embed``: the pack's :meth:`fusion_plan` (decided once per pack, outside a
        compiled region); None decides now."""
        if mask is None:  # called on its own: check here (the BAGEL model passes a prepared pack's mask)
            width = self.vision_model.embeddings.patch_dim
            if not isinstance(packed_pixel_values, torch.Tensor) or packed_pixel_values.dim() != 2:
                raise ValueError(f"packed_pixel_values must be a [num_patches, {width}] tensor")
            if packed_pixel_values.shape[1] != width or not packed_pixel_values.is_floating_point():
                raise ValueError(
                    f"packed_pixel_values must be floating point [num_patches, {width}] (normalised pixel "
                    f"patches), got {packed_pixel_values.dtype} {tuple(packed_pixel_values.shape)}"
                )
            if vit_token_seqlens is None:
                raise ValueError("vit_token_seqlens is required (patches per image)")
            lens = as_int_list(vit_token_seqlens, "vit_token_seqlens")
            mask = PackedMask.from_splits(lens, lens, ["full"] * len(lens), device=packed_pixel_values.device)
        return self.vision_model(
            packed_pixel_values, packed_flattened_position_ids, mask, self.backend, fused_patch_embed
        )

    def fusion_plan(self) -> bool:
        """Whether the fused patch-embedding op stands in for the patch / position embedding modules
        this pack (they are the stock ones with nothing attached). Every other module of the tower
        (projections, MLPs, LayerNorms, encoder layers) is always called."""
        return self.vision_model.embeddings.fusable()

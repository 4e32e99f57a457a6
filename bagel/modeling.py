"""BAGEL for packed training: ``BagelForUnifiedMultimodal`` (stage 1 understanding CE, stage 2 also
flow-matching MSE), with the forward signature and methods of the documented BAGEL model API.

Module tree (as the documented BAGEL model API): :class:`BagelForUnifiedMultimodal` is an ``nn.Module``
holding ``.model``, a :class:`BagelModel` (plain container, no forward) whose ``state_dict()`` keys are
exactly BAGEL-7B-MoT's ``ema.safetensors`` keys: ``language_model.model.*``, ``language_model.lm_head.*``,
``vit_model.vision_model.*``, ``connector.fc{1,2}.*``, ``vit_pos_embed.pos_embed`` and, with
``visual_gen``, ``time_embedder.mlp.{0,2}.*``, ``vae2llm.*``, ``llm2vae.*``, ``latent_pos_embed.pos_embed``.
:meth:`~BagelForUnifiedMultimodal.from_pretrained` / :meth:`~BagelForUnifiedMultimodal.save_pretrained`
read and write that container; the top-level module's own keys carry the ``model.`` prefix.

Every submodule is called (embeddings, ViT tower, connector, timestep embedder, vae2llm / llm2vae,
position tables, LM layers, heads), so PEFT LoRA layers, quantised linears and hooks take effect on
every backend; fused kernels that read raw weights stand in only for stock modules with nothing
attached, decided once per pack in :meth:`~BagelForUnifiedMultimodal.prepare_pack`
(``Qwen2Model.fusion_plan``, ``SiglipVisionModel.fusion_plan``; see :mod:`bagel.fusion`).

Forward (one pack, see DESIGN.md section 2):

    text ids -> embed_tokens                                   at packed_text_indexes
    ViT patches -> SigLIP-NaViT -> connector + vit_pos_embed   at packed_vit_token_indexes
    VAE latents -> patchify -> x_t = (1 - t) x_0 + t eps,
        vae2llm(x_t) + time_embedder(t) + latent_pos_embed     at packed_vae_token_indexes
    -> Qwen2 MoT LM (und = text + ViT tokens, gen = VAE tokens) under the pack's PackedMask
    -> ce  = cross_entropy(lm_head(h[ce_loss_indexes]), packed_label_ids)   per token
       mse = (llm2vae(h[mse_loss_indexes]) - (eps - x_0)[t > 0]) ** 2       per element

with ``t = s sigmoid(logit) / (1 + (s - 1) sigmoid(logit))`` (``s = timestep_shift``), a logit of -inf
marking a clean conditioning image (t = 0, no MSE), and ``eps = torch.randn_like(x_0)`` drawn from the
global generator as upstream (seed it with ``torch.manual_seed`` for reproducibility).

``forward(**batch)`` is ``forward_prepared(prepare_pack(**batch))``: ``prepare_pack`` does everything
that depends on the data in Python or needs a host sync (validation, masks from the split lists,
grouping by expert, kernel block tables, patchifying, drawing the noise) and returns a
:class:`PreparedPack`; ``forward_prepared`` is the model body from embeddings to losses, tensor work
and custom ops only, which ``torch.compile(fullgraph=True, dynamic=True)`` traces::

    body = torch.compile(model.forward_prepared, fullgraph=True, dynamic=True)
    losses = body(model.prepare_pack(**batch))
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bagel.backend import BagelBackendConfig
from bagel.checkpoint import LoadReport, load_checkpoint_into, save_checkpoint
from bagel.config import BagelConfig
from bagel.embeddings import MLPconnector, PositionEmbedding, TimestepEmbedder
from bagel.fusion import float_device, float_dtype
from bagel.qwen2 import PackContext, Qwen2ForCausalLM
from bagel.siglip import SiglipVisionModel
from bagel_kernels import PackedMask
from bagel_kernels.attention import prepare_attention
from bagel_kernels.mask import _as_int, _as_int_list

__all__ = [
    "BagelModel",
    "BagelForUnifiedMultimodal",
    "PreparedPack",
    "_stage_to_int",
    "_prepare_config_for_stage",
    "_convert_patch_embedding_for_packed_vit",
    "patchify_latents",
]

logger = logging.getLogger(__name__)

_GEN_INPUTS = (
    "padded_latent",
    "patchified_vae_latent_shapes",
    "packed_latent_position_ids",
    "packed_vae_token_indexes",
    "packed_timesteps",
)
_VIT_INPUTS = (
    "packed_vit_tokens",
    "packed_vit_token_indexes",
    "packed_vit_position_ids",
    "vit_token_seqlens",
)


# ---------------------------------------------------------------------------------------------- helpers
def _stage_to_int(stage: int | str) -> int:
    """``1`` or ``2`` from ``1``, ``2``, ``"1"``, ``"2"``, ``"stage1"``, ``"stage2"`` (any case); else ValueError."""
    if isinstance(stage, bool):
        raise ValueError(f"stage={stage!r}: expected 1, 2, 'stage1' or 'stage2'")
    if isinstance(stage, int):
        value = stage
    elif isinstance(stage, str):
        s = stage.strip().lower().removeprefix("stage").strip()
        value = int(s) if s.isdigit() else None
    else:
        value = None
    if value not in (1, 2):
        raise ValueError(f"unknown BAGEL stage {stage!r}: expected 1, 2, 'stage1' or 'stage2'")
    return value


def _prepare_config_for_stage(config: BagelConfig) -> None:
    """Apply the stage to ``config`` in place, before the modules are built (idempotent).

    - stage 1: ``visual_gen = False`` and dense ``Qwen2DecoderLayer`` layers (no ``*_moe_gen`` weights:
      the model holds exactly the understanding subset of the checkpoint);
    - stage 2: ``visual_gen = True``; layers become ``Qwen2MoTDecoderLayer`` unless MoE/MoT already;
    - no stage: ``layer_module`` defaults by ``visual_gen``.

    The ViT's ``rope`` flag follows ``vit_rope``. ``vit_select_layer`` is NOT folded into the vision
    config here: :attr:`BagelConfig.vit_num_layers` applies it when the tower is built, so saving and
    reloading a config never applies it twice."""
    tc = config.text_config
    if config.stage is not None:
        stage = _stage_to_int(config.stage)
        config.stage = stage
        if stage == 1:
            config.visual_gen = False
            tc.layer_module = "Qwen2DecoderLayer"
        else:
            config.visual_gen = True
            if getattr(tc, "layer_module", None) not in ("Qwen2MoTDecoderLayer", "Qwen2MoEDecoderLayer"):
                tc.layer_module = "Qwen2MoTDecoderLayer"
    elif getattr(tc, "layer_module", None) is None:
        tc.layer_module = "Qwen2MoTDecoderLayer" if config.visual_gen else "Qwen2DecoderLayer"
    if config.vision_config is not None:
        config.vision_config.rope = bool(config.vit_rope)
    config.validate()


def _convert_patch_embedding_for_packed_vit(model: BagelModel, config: BagelConfig) -> None:
    """Swap the SigLIP Conv2d patch embedding for a Linear ``[hidden, 3*p*p]`` (the checkpoint's layout)
    that computes the same on BAGEL-patchified pixels (no-op without ``visual_und`` or when done)."""
    if not config.visual_und:
        return
    model.vit_model.vision_model.embeddings.convert_conv2d_to_linear()


def patchify_latents(padded_latent: torch.Tensor, shapes: Sequence[tuple[int, int]], p: int) -> torch.Tensor:
    """``[n, C, H, W]`` latents -> ``[sum(h*w), p*p*C]`` tokens, image by image, row-major over the
    ``h x w`` patch grid, each token ordered (row in patch, column in patch, channel) as upstream."""
    C = padded_latent.shape[1]
    out = []
    for latent, (h, w) in zip(padded_latent, shapes, strict=True):
        x = latent[:, : h * p, : w * p].reshape(C, h, p, w, p)
        out.append(torch.einsum("chpwq->hwpqc", x).reshape(h * w, p * p * C))
    return torch.cat(out, dim=0)


def _int_list(values, name: str) -> list[int]:
    return _as_int_list(values, name)  # strict: floats (2.5 and 2.0), bools and strings are refused


def _index(t, name: str, device: torch.device, *, allow_bool_len: int | None = None) -> torch.Tensor:
    """A 1-D long index tensor on ``device``; with ``allow_bool_len`` a bool mask of that length is
    accepted and turned into indexes."""
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a 1-D integer tensor: {exc}") from None
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool:
        if allow_bool_len is None:
            raise ValueError(f"{name} must hold integer indexes, got a bool tensor")
        if t.numel() != allow_bool_len:
            raise ValueError(
                f"{name} is a bool mask of {t.numel()} entries, expected sequence_length={allow_bool_len}"
            )
        return torch.nonzero(t.to(device)).flatten()
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.long)


@dataclass
class PreparedPack:
    """One pack made ready by :meth:`BagelForUnifiedMultimodal.prepare_pack` for
    :meth:`BagelForUnifiedMultimodal.forward_prepared`: tensors on the model's device, ints and
    prepared masks only. ``*_rows`` are rows of the hidden states in the language model's (grouped)
    row order; fields of absent inputs are None.

    Shapes: L = sequence_length, N = ViT patches, V = VAE latent tokens, P = p*p*C latent patch size.
    """

    sequence_length: int
    text_ids: torch.Tensor  # [n_text] token ids
    text_rows: torch.Tensor  # [n_text]
    lm: PackContext | None = None  # the grouped LM's context (bagel.qwen2.Qwen2Model.prepare_context)
    lm_args: tuple | None = None  # else the arguments after packed_sequence of the LM's forward_train
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


def _grouped_lm(lm: nn.Module) -> bool:
    """Whether ``lm.forward_train`` is :class:`Qwen2ForCausalLM`'s own (prepare_context + decode),
    which the model may then call in two parts; subclasses with their own forward_train are called whole."""
    return isinstance(lm, Qwen2ForCausalLM) and type(lm).forward_train is Qwen2ForCausalLM.forward_train


# ---------------------------------------------------------------------------------------------- container
class BagelModel(nn.Module):
    """Plain container of BAGEL's submodules; attribute names match the checkpoint layout, so its
    ``state_dict()`` keys are BAGEL-7B-MoT's ``ema.safetensors`` keys. No forward logic here:
    :class:`BagelForUnifiedMultimodal` holds it as ``.model`` and runs it.

    ``language_model`` (Qwen2 MoT LM) always; with ``visual_und`` the ``vit_model`` (SigLIP-NaViT,
    ``config.vit_num_layers`` layers), ``connector`` and ``vit_pos_embed``; with ``visual_gen`` the
    ``time_embedder``, ``vae2llm``, ``llm2vae`` (zero-initialised, as upstream) and ``latent_pos_embed``.
    The VAE itself is not part of the model: ``forward`` takes its latents.

    Args:
        config: the :class:`BagelConfig` (used as is; see :func:`_prepare_config_for_stage`).
        backend: kernel choice given to the language model and the ViT (default: all ``"auto"``);
            :attr:`BagelForUnifiedMultimodal.backend` changes it later.
        language_model_cls: class of the language model (default :class:`bagel.qwen2.Qwen2ForCausalLM`;
            e.g. ``bagel.qwen2_reference.Qwen2ForCausalLMReference`` for upstream's gather/scatter
            routing). Same parameters either way.
    """

    def __init__(
        self,
        config: BagelConfig,
        backend: BagelBackendConfig | None = None,
        *,
        language_model_cls: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, BagelConfig):
            raise ValueError(f"config must be a BagelConfig, got {type(config).__name__}")
        backend = BagelBackendConfig() if backend is None else backend
        if not isinstance(backend, BagelBackendConfig):
            raise ValueError(f"backend must be a BagelBackendConfig, got {type(backend).__name__}")
        self.config = config
        hidden = config.text_config.hidden_size
        lm_cls = Qwen2ForCausalLM if language_model_cls is None else language_model_cls
        self.language_model = lm_cls(config.text_config, backend=backend)
        if config.visual_und:
            vc = config.vision_config
            self.vit_model = SiglipVisionModel(
                vc,
                num_layers=config.vit_num_layers,
                grid_side=config.vit_max_num_patch_per_side,
                backend=backend,
            )
            self.connector = MLPconnector(vc.hidden_size, hidden, config.connector_act)
            self.vit_pos_embed = PositionEmbedding(config.vit_max_num_patch_per_side, hidden)
        if config.visual_gen:
            self.time_embedder = TimestepEmbedder(hidden)
            self.vae2llm = nn.Linear(config.patch_latent_dim, hidden)
            self.llm2vae = nn.Linear(hidden, config.patch_latent_dim)
            self.latent_pos_embed = PositionEmbedding(config.max_latent_size, hidden)
            with torch.no_grad():
                self.llm2vae.weight.zero_()
                self.llm2vae.bias.zero_()


# ---------------------------------------------------------------------------------------------- model
class BagelForUnifiedMultimodal(nn.Module):
    """BAGEL mixed-modal model for packed training: understanding (stage 1) and generation (stage 2).

    ``visual_gen=False`` is the stage-1 understanding-only model (dense decoder layers, CE only);
    stage 2 adds the MoT ``*_moe_gen`` weights, the flow-matching embedding of VAE latents and the MSE
    head. ``config.stage`` (1 / 2 / None) is applied by :func:`_prepare_config_for_stage` (in place).

    The submodules live in ``.model``, a :class:`BagelModel` whose ``state_dict()`` keys are the
    checkpoint keys (this module's own keys carry the ``model.`` prefix): ``model.model.language_model``,
    ``model.model.vit_model`` and so on. There are no shortcuts to them at this level (one path to each
    module, one name per parameter); what lives here is the forward, the kernel choice (:attr:`backend`),
    the config and the forward's hyper-parameters (``hidden_size``, ``latent_patch_size``,
    ``latent_channel``, ``patch_latent_dim``, ``timestep_shift``, ``max_latent_size``, as upstream's
    ``Bagel`` has them), and checkpoint I/O (:meth:`from_pretrained`, :meth:`save_pretrained`).

    Args:
        config: :class:`BagelConfig`.
        backend: :class:`BagelBackendConfig` (attention / MoT / patch-embedding kernels); default all "auto".
        language_model_cls: see :class:`BagelModel`.
    """

    config_class = BagelConfig

    def __init__(
        self,
        config: BagelConfig,
        backend: BagelBackendConfig | None = None,
        *,
        language_model_cls: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, BagelConfig):
            raise ValueError(f"config must be a BagelConfig, got {type(config).__name__}")
        _prepare_config_for_stage(config)
        self.config = config
        self.model = BagelModel(config, backend, language_model_cls=language_model_cls)
        _convert_patch_embedding_for_packed_vit(self.model, config)
        self._backend = BagelBackendConfig() if backend is None else backend
        self.hidden_size = config.text_config.hidden_size
        self.num_heads = config.text_config.num_attention_heads
        self.use_moe = "Mo" in config.text_config.layer_module
        if config.visual_gen:
            self.latent_patch_size = config.latent_patch_size
            self.latent_channel = config.latent_channels
            self.patch_latent_dim = config.patch_latent_dim
            self.timestep_shift = config.timestep_shift
            self.max_latent_size = config.max_latent_size
        self.load_report: LoadReport | None = None
        # Parameter-name prefixes whose parameters every training forward ties into its losses with
        # weight zero, so that each gets a (zero) gradient even when the pack does not use it (no image
        # for the ViT, no generation tokens, no CE tokens). FSDP2 reduce-scatters only the gradients that
        # exist, so ranks packing different sample kinds would otherwise disagree on the collective's
        # size. Set by bagel.distributed.apply_fsdp2 to the root unit's parameters; None: off.
        self.zero_grad_prefixes: tuple[str, ...] | None = None
        # Run the ViT on a one-patch stand-in, tied into the losses with weight zero, when a pack has no
        # image: under FSDP2 with one unit per ViT layer every rank must run every unit (each unit's
        # all-gather is a collective). Set by bagel.distributed.apply_fsdp2.
        self.vit_stand_in = False

    @property
    def backend(self) -> BagelBackendConfig:
        """The kernel choice; setting it updates the language model and the ViT."""
        return self._backend

    @backend.setter
    def backend(self, value: BagelBackendConfig) -> None:
        if not isinstance(value, BagelBackendConfig):
            raise ValueError(f"backend must be a BagelBackendConfig, got {type(value).__name__}")
        self._backend = value
        self.model.language_model.backend = value
        if self.config.visual_und:
            self.model.vit_model.backend = value

    # -------------------------------------------------------------- HF-style accessors
    @classmethod
    def supports_config(cls, config: Any) -> bool:
        """True for a BAGEL config (``model_type == "bagel"``, object or dict)."""
        model_type = (
            config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
        )
        return model_type == BagelConfig.model_type

    def get_input_embeddings(self) -> nn.Module:
        return self.model.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.model.language_model.get_output_embeddings()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the decoder layers recompute their activations in backward (HF's attribute; PEFT reads
        it). Switched per stack by ``gradient_checkpointing`` on ``model.model.language_model.model`` and
        ``model.model.vit_model.vision_model.encoder`` (``bagel.distributed.apply_fsdp2`` sets both)."""
        return bool(self.model.language_model.model.gradient_checkpointing)

    def enable_input_require_grads(self) -> None:
        """Nothing to do (HF's hook for reentrant checkpointing, which PEFT calls when checkpointing is
        on): the layers recompute with non-reentrant ``torch.utils.checkpoint``, which gives adapters
        inside a layer their gradients although the layer's input (frozen embeddings) needs none. Not
        registering HF's ``requires_grad_`` hook on the embeddings also keeps the model body traceable
        by ``torch.compile``."""

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """(Re)initialise every weight, e.g. after materialising a meta-device model with ``to_empty``:
        the Qwen2 LM and the SigLIP tower with their HF initialisers, the connector / timestep embedder /
        vae2llm with PyTorch's Linear default, the position tables with their sin-cos values, llm2vae
        with zeros. Non-persistent buffers (RoPE inverse frequencies) are recomputed."""
        m = self.model
        lm = m.language_model
        lm.init_weights()
        for mod in lm.modules():
            if hasattr(mod, "inv_freq") and hasattr(mod, "_inv_freq"):
                mod.inv_freq = mod._inv_freq(mod.inv_freq.device)
        bagel_linears = []
        if self.config.visual_und:
            m.vit_model.init_weights()
            m.vit_pos_embed.reset_parameters()
            bagel_linears.append(m.connector)
        if self.config.visual_gen:
            m.latent_pos_embed.reset_parameters()
            bagel_linears += [m.time_embedder, m.vae2llm]
        for module in bagel_linears:
            for mod in module.modules():
                if isinstance(mod, nn.Linear):
                    mod.reset_parameters()
        if self.config.visual_gen:
            m.llm2vae.weight.zero_()
            m.llm2vae.bias.zero_()

    # -------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        stage: int | str = 1,
        strict: bool = False,
        **kwargs: Any,
    ) -> BagelForUnifiedMultimodal:
        """Load a BAGEL checkpoint directory: the config (``config.json``, or upstream's
        ``llm_config.json`` + ``vit_config.json``) and the weights (``ema.safetensors``).

        Args:
            pretrained_model_name_or_path: the checkpoint directory.
            stage: ``1`` / ``"stage1"`` (understanding subset) or ``2`` / ``"stage2"`` (also generation).
            strict: raise ValueError when a checkpoint key matches no model parameter (VAE keys and
                generation keys skipped by stage 1 never count).
            kwargs: ``backend`` (a :class:`BagelBackendConfig`), ``language_model_cls``, ``dtype`` and
                ``device`` (where the weights are materialised; default float32 on the CPU); the rest
                override :class:`BagelConfig` fields.

        The :class:`bagel.checkpoint.LoadReport` (loaded / missing / unexpected / VAE keys ...) is attached
        as ``model.load_report`` and summarised in the log."""
        stage_int = _stage_to_int(stage)
        backend = kwargs.pop("backend", None)
        lm_cls = kwargs.pop("language_model_cls", None)
        dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        device = kwargs.pop("device", None)
        config = BagelConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
        config.stage = stage_int
        # built on the meta device and materialised once, directly on `device` in `dtype` (no fp32 copy
        # of a 14B-parameter model on the host); weights the checkpoint lacks keep initialize_weights()
        with torch.device("meta"):
            model = cls(config, backend=backend, language_model_cls=lm_cls)
        model.to_empty(device=torch.device("cpu") if device is None else device)
        if dtype is not None:
            model.to(dtype)
        model.initialize_weights()
        report = load_checkpoint_into(
            model.model, pretrained_model_name_or_path, stage=stage_int, strict=strict
        )
        model.load_report = report
        logger.info(
            "BagelForUnifiedMultimodal.from_pretrained(%s, stage=%d): %s",
            pretrained_model_name_or_path,
            stage_int,
            report.summary(),
        )
        return model

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``ema.safetensors`` (the layout :meth:`from_pretrained` reads): the
        ``state_dict()`` of :attr:`model`, whose keys are the checkpoint keys."""
        save_checkpoint(self.model, save_directory, config=self.config)

    # -------------------------------------------------------------- forward
    def forward(
        self,
        sequence_length: int,
        packed_text_ids: torch.LongTensor,
        packed_text_indexes: torch.LongTensor,
        sample_lens: list[int],
        packed_position_ids: torch.LongTensor,
        nested_attention_masks: list[torch.Tensor] | None = None,
        split_lens: list[int] | None = None,
        attn_modes: list[str] | None = None,
        packed_vit_tokens: torch.Tensor | None = None,
        packed_vit_token_indexes: torch.LongTensor | None = None,
        packed_vit_position_ids: torch.LongTensor | None = None,
        vit_token_seqlens: torch.Tensor | None = None,
        padded_latent: torch.Tensor | None = None,
        patchified_vae_latent_shapes: list[tuple[int, int]] | None = None,
        packed_latent_position_ids: torch.LongTensor | None = None,
        packed_vae_token_indexes: torch.LongTensor | None = None,
        packed_timesteps: torch.Tensor | None = None,
        mse_loss_indexes: torch.Tensor | None = None,
        ce_loss_indexes: torch.Tensor | None = None,
        packed_label_ids: torch.Tensor | None = None,
        ce_loss_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Run one packed training forward; returns ``dict(ce=..., mse=...)``.

        ``ce``: ``[n_ce]`` per-token cross entropy at ``ce_loss_indexes`` (None without them);
        ``ce_loss_weights`` is accepted for pipeline compatibility and not used (weight downstream).
        ``mse``: ``[n_mse, p*p*C]`` per-element squared error of the predicted velocity against
        ``noise - clean`` at ``mse_loss_indexes`` (None in stage 1 or without VAE tokens / mse indexes).

        The attention mask comes from ``nested_attention_masks`` (per-sample dense masks) when given,
        else from ``split_lens`` / ``attn_modes``. ``sum(sample_lens)`` may exceed ``sequence_length`` by
        a trailing pad sample (flex-style packing). Bad inputs raise ValueError naming the field.

        Runs in two parts: :meth:`prepare_pack` (eager, once per pack: validation, masks, grouping,
        noise) and :meth:`forward_prepared` (the tensor work from embeddings to losses, which
        ``torch.compile(fullgraph=True)`` traces)."""
        return self._forward_prepared(
            self.prepare_pack(
                sequence_length=sequence_length,
                packed_text_ids=packed_text_ids,
                packed_text_indexes=packed_text_indexes,
                sample_lens=sample_lens,
                packed_position_ids=packed_position_ids,
                nested_attention_masks=nested_attention_masks,
                split_lens=split_lens,
                attn_modes=attn_modes,
                packed_vit_tokens=packed_vit_tokens,
                packed_vit_token_indexes=packed_vit_token_indexes,
                packed_vit_position_ids=packed_vit_position_ids,
                vit_token_seqlens=vit_token_seqlens,
                padded_latent=padded_latent,
                patchified_vae_latent_shapes=patchified_vae_latent_shapes,
                packed_latent_position_ids=packed_latent_position_ids,
                packed_vae_token_indexes=packed_vae_token_indexes,
                packed_timesteps=packed_timesteps,
                mse_loss_indexes=mse_loss_indexes,
                ce_loss_indexes=ce_loss_indexes,
                packed_label_ids=packed_label_ids,
                ce_loss_weights=ce_loss_weights,
            )
        )

    def prepare_pack(
        self,
        sequence_length: int,
        packed_text_ids: torch.LongTensor,
        packed_text_indexes: torch.LongTensor,
        sample_lens: list[int],
        packed_position_ids: torch.LongTensor,
        nested_attention_masks: list[torch.Tensor] | None = None,
        split_lens: list[int] | None = None,
        attn_modes: list[str] | None = None,
        packed_vit_tokens: torch.Tensor | None = None,
        packed_vit_token_indexes: torch.LongTensor | None = None,
        packed_vit_position_ids: torch.LongTensor | None = None,
        vit_token_seqlens: torch.Tensor | None = None,
        padded_latent: torch.Tensor | None = None,
        patchified_vae_latent_shapes: list[tuple[int, int]] | None = None,
        packed_latent_position_ids: torch.LongTensor | None = None,
        packed_vae_token_indexes: torch.LongTensor | None = None,
        packed_timesteps: torch.Tensor | None = None,
        mse_loss_indexes: torch.Tensor | None = None,
        ce_loss_indexes: torch.Tensor | None = None,
        packed_label_ids: torch.Tensor | None = None,
        ce_loss_weights: torch.Tensor | None = None,
    ) -> PreparedPack:
        """The once-per-pack part of :meth:`forward` (same arguments), run eagerly.

        Validates every input (host checks at once, device checks read back in one synchronisation),
        builds the attention masks with the tables their kernels read (the pack's and the ViT's), the
        language model's grouping by expert (:meth:`bagel.qwen2.Qwen2Model.prepare_context`), the hidden
        state row of every token in that grouped order, the patchified clean latents, the flow-matching
        times and the noise (drawn here from the global generator). The result holds only tensors,
        ints and the prepared masks, so :meth:`forward_prepared` has no host sync and no Python that
        depends on the data; prepare the next pack while the current one trains if you like.

        Under FSDP2 (:func:`bagel.distributed.apply_fsdp2`) a pack without an image gets a one-patch
        stand-in for the ViT (``vit_stand_in``), so that every rank runs every ViT layer's unit."""
        cfg = self.config
        m = self.model
        # device and dtype of the hidden states: the token embedding's, read without assuming that the
        # module is still an nn.Embedding (a user may have swapped or wrapped it)
        emb = self.get_input_embeddings()
        device, dtype = float_device(emb), float_dtype(emb)
        if isinstance(sequence_length, torch.Tensor):
            sequence_length = int(sequence_length)
        if not isinstance(sequence_length, int) or isinstance(sequence_length, bool) or sequence_length <= 0:
            raise ValueError(f"sequence_length must be a positive int, got {sequence_length!r}")
        L = sequence_length
        sample_lens = _int_list(sample_lens, "sample_lens")
        if sum(sample_lens) < L:
            raise ValueError(f"sum(sample_lens) = {sum(sample_lens)} is less than sequence_length = {L}")

        # ---- attention mask
        if nested_attention_masks is not None:
            mask = PackedMask.from_dense(nested_attention_masks, device=device)
            if list(mask.sample_lens) != sample_lens:
                raise ValueError(
                    f"nested_attention_masks have sizes {list(mask.sample_lens)} but sample_lens is {sample_lens}"
                )
        else:
            if split_lens is None or attn_modes is None:
                raise ValueError(
                    "give nested_attention_masks, or split_lens and attn_modes, to build the attention mask"
                )
            mask = PackedMask.from_splits(sample_lens, split_lens, attn_modes, device=device)

        # ---- which optional inputs are present
        vit_given = {
            n: v is not None
            for n, v in zip(
                _VIT_INPUTS,
                (packed_vit_tokens, packed_vit_token_indexes, packed_vit_position_ids, vit_token_seqlens),
                strict=True,
            )
        }
        gen_given = {
            n: v is not None
            for n, v in zip(
                _GEN_INPUTS,
                (
                    padded_latent,
                    patchified_vae_latent_shapes,
                    packed_latent_position_ids,
                    packed_vae_token_indexes,
                    packed_timesteps,
                ),
                strict=True,
            )
        }
        has_vit = any(vit_given.values())
        has_gen = any(gen_given.values())
        if has_vit:
            if not cfg.visual_und:
                raise ValueError("packed_vit_tokens given but the model has no ViT (visual_und=False)")
            missing = [n for n, g in vit_given.items() if not g]
            if missing:
                raise ValueError(f"ViT inputs incomplete: missing {', '.join(missing)}")
        if has_gen:
            if not cfg.visual_gen:
                raise ValueError(
                    "the pack has VAE inputs (padded_latent, ...) but the model is stage 1 (visual_gen=False)"
                )
            missing = [n for n, g in gen_given.items() if not g]
            if missing:
                raise ValueError(f"stage-2 inputs incomplete: missing {', '.join(missing)}")
        if mse_loss_indexes is not None and not has_gen and _numel(mse_loss_indexes):
            raise ValueError(
                "mse_loss_indexes given without VAE inputs (padded_latent, packed_vae_token_indexes, ...)"
            )

        # ---- validate everything up front: host checks raise at once, device checks are collected
        # and read back in ONE synchronisation before any heavy kernel is queued
        checks = _DeviceChecks()
        text_ids = _index(packed_text_ids, "packed_text_ids", device)
        text_idx = _index(packed_text_indexes, "packed_text_indexes", device)
        if text_ids.numel() != text_idx.numel():
            raise ValueError(
                f"packed_text_ids has {text_ids.numel()} entries but packed_text_indexes {text_idx.numel()}"
            )
        checks.in_range(text_ids, "packed_text_ids", cfg.text_config.vocab_size, "vocabulary size")
        pos_ids = _index(packed_position_ids, "packed_position_ids", device)
        vit = (
            self._prepare_vit(
                packed_vit_tokens,
                packed_vit_token_indexes,
                packed_vit_position_ids,
                vit_token_seqlens,
                device,
                checks,
            )
            if has_vit
            else None
        )
        gen = (
            self._prepare_latents(
                padded_latent,
                patchified_vae_latent_shapes,
                packed_latent_position_ids,
                packed_vae_token_indexes,
                packed_timesteps,
                device,
                checks,
            )
            if has_gen
            else None
        )
        vit_idx = vit["idx"] if vit else None
        vae_idx = gen["idx"] if gen else None
        _check_partition(L, text_idx, vit_idx, vae_idx, checks)
        ce_idx = labels = None
        if ce_loss_indexes is not None:
            if packed_label_ids is None:
                raise ValueError("ce_loss_indexes given without packed_label_ids")
            ce_idx = _index(ce_loss_indexes, "ce_loss_indexes", device, allow_bool_len=L)
            labels = _index(packed_label_ids, "packed_label_ids", device)
            if labels.numel() != ce_idx.numel():
                raise ValueError(
                    f"packed_label_ids has {labels.numel()} entries but ce_loss_indexes selects {ce_idx.numel()}"
                )
            checks.in_range(ce_idx, "ce_loss_indexes", L, "sequence_length")
            vocab = cfg.text_config.vocab_size
            checks.add(
                ((labels < 0) & (labels != -100)) | (labels >= vocab),
                f"packed_label_ids has entries outside [0, {vocab}) (and not the ignore index -100)",
            )
        mse_idx = mse_rows = None
        if gen is not None and mse_loss_indexes is not None:
            mse_idx = _index(mse_loss_indexes, "mse_loss_indexes", device, allow_bool_len=L)
            mse_rows = _mse_rows(L, mse_idx, gen["idx"], gen["t"] > 0, checks)
        checks.raise_first()

        # ---- the language model's grouping; hidden-state rows of every token in its row order
        und = text_idx if vit_idx is None else torch.cat([text_idx, vit_idx])
        lm_ctx = lm_args = None
        if _grouped_lm(m.language_model):
            lm_ctx = m.language_model.model.prepare_context(
                L,
                sample_lens,
                mask,
                pos_ids,
                und if self.use_moe else None,
                vae_idx if self.use_moe else None,
                device=device,
                dtype=dtype,
            )
            rows = lm_ctx.inv.long() if lm_ctx.inv is not None else None
        else:  # a language model with its own forward_train (e.g. the gather/scatter reference)
            extra = (und, vae_idx) if self.use_moe else (None, None)
            lm_args = (sample_lens, mask, pos_ids, *extra)
            rows = None

        def row(idx):
            return idx if idx is None or rows is None else rows[idx]

        prepared = PreparedPack(
            sequence_length=L,
            text_ids=text_ids,
            text_rows=row(text_idx),
            lm=lm_ctx,
            lm_args=lm_args,
            ce_rows=row(ce_idx),
            labels=labels,
        )
        if vit is not None:
            prepared.vit_tokens, prepared.vit_pos, prepared.vit_mask = vit["tokens"], vit["pos"], vit["mask"]
            prepared.vit_rows = row(vit_idx)
        elif cfg.visual_und and self.vit_stand_in:
            emb_vit = m.vit_model.vision_model.embeddings
            prepared.vit_tokens = torch.zeros(1, emb_vit.patch_dim, device=device)
            prepared.vit_pos = torch.zeros(1, dtype=torch.long, device=device)
            prepared.vit_mask = PackedMask.from_splits([1], [1], ["full"], device=device)
        if prepared.vit_mask is not None:
            vc = cfg.vision_config
            vit_dtype = float_dtype(m.vit_model)
            # the fused patch embedding stands in for the modules this pack only if they are stock
            prepared.vit_fused_patch_embed = m.vit_model.fusion_plan()
            prepare_attention(
                prepared.vit_mask,
                device,
                vit_dtype,
                vc.hidden_size // vc.num_attention_heads,
                self.backend.attention,
            )
        if gen is not None:
            clean = patchify_latents(gen["latent"], gen["shapes"], self.latent_patch_size)  # [n_vae, p*p*C]
            prepared.clean = clean
            prepared.noise = torch.randn_like(clean)
            prepared.t = gen["t"]
            prepared.vae_dtype = float_dtype(m.vae2llm)
            prepared.vae_pos = gen["pos"]
            prepared.vae_rows = row(vae_idx)
            if mse_idx is not None:
                prepared.mse_rows = row(mse_idx)
                prepared.mse_target_rows = mse_rows
        return prepared

    def forward_prepared(self, pack: PreparedPack) -> dict[str, torch.Tensor | None]:
        """The model body of :meth:`forward` on a pack made by :meth:`prepare_pack`: embeddings (text,
        ViT, noised latents), the language model's decoder stack, heads and losses; returns
        ``dict(ce=..., mse=...)`` as :meth:`forward` does. Only tensor work and custom ops: with the
        grouped language model it traces with ``torch.compile(fullgraph=True)``, and one compiled graph
        serves packs of every length (``dynamic=True``)."""
        return self._forward_prepared(pack)

    def _forward_prepared(self, pack: PreparedPack) -> dict[str, torch.Tensor | None]:
        # (forward calls this one: under FSDP2 the public forward_prepared is wrapped with the root
        # unit's hooks, which forward has already run)
        m = self.model
        L = pack.sequence_length
        tie = None  # outputs computed only so that their parameters get a (zero) gradient
        text_embed = self.get_input_embeddings()(pack.text_ids)  # [n_text, H]
        x = text_embed.new_zeros(L, self.hidden_size)  # [L, H], rows in the language model's order
        x = x.index_put((pack.text_rows,), text_embed)
        if pack.vit_tokens is not None:
            feats = m.vit_model(
                pack.vit_tokens,
                pack.vit_pos,
                mask=pack.vit_mask,
                fused_patch_embed=pack.vit_fused_patch_embed,
            )  # [N, E_vit]
            vit_embed = m.connector(feats) + m.vit_pos_embed(pack.vit_pos)  # [N, H]
            if pack.vit_rows is None:  # the FSDP2 stand-in
                tie = vit_embed.sum()
            else:
                x = x.index_put((pack.vit_rows,), vit_embed.to(x.dtype))
        clean, noise = pack.clean, pack.noise
        if clean is not None:
            t = pack.t
            x_t = (1 - t[:, None]) * clean + t[:, None] * noise
            gen_embed = (
                m.vae2llm(x_t.to(pack.vae_dtype)) + m.time_embedder(t) + m.latent_pos_embed(pack.vae_pos)
            )
            x = x.index_put((pack.vae_rows,), gen_embed.to(x.dtype))

        # ---- language model
        if pack.lm is not None:
            hidden = m.language_model.model.decode(x, pack.lm)  # grouped rows
        else:
            hidden = m.language_model.forward_train(x, *pack.lm_args)  # pack order

        # ---- losses
        ce = None
        if pack.ce_rows is not None:
            logits = self.get_output_embeddings()(hidden[pack.ce_rows])
            ce = F.cross_entropy(logits, pack.labels, reduction="none")
        mse = None
        if pack.mse_rows is not None:
            preds = m.llm2vae(hidden[pack.mse_rows])
            target = noise - clean  # flow-matching velocity dx_t/dt, from data to noise
            mse = (preds - target.index_select(0, pack.mse_target_rows)) ** 2  # = target[t > 0], no sync
        if self.zero_grad_prefixes is not None and self.training and torch.is_grad_enabled():
            touch = sum(
                p.sum()
                for n, p in self.named_parameters()
                if p.requires_grad and not n.startswith(self.zero_grad_prefixes)
            )
            tie = touch if tie is None else tie + touch
        if tie is not None:
            if ce is not None:
                ce = ce + 0.0 * tie
            elif mse is not None:
                mse = mse + 0.0 * tie
        return dict(ce=ce, mse=mse)

    # -------------------------------------------------------------- input preparation
    def _prepare_vit(self, tokens, idx, pos_ids, seqlens, device, checks: _DeviceChecks) -> dict:
        cfg = self.config
        emb = self.model.vit_model.vision_model.embeddings
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] != emb.patch_dim:
            raise ValueError(
                f"packed_vit_tokens must be [num_patches, {emb.patch_dim}] (3*patch_size**2), got "
                f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}"
            )
        N = tokens.shape[0]
        idx = _index(idx, "packed_vit_token_indexes", device)
        pos = _index(pos_ids, "packed_vit_position_ids", device)
        lens = _int_list(seqlens, "vit_token_seqlens")
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
        limit = cfg.vit_max_num_patch_per_side**2
        what = "vit_max_num_patch_per_side ** 2"
        if not emb.use_rope and emb.num_positions < limit:
            limit, what = emb.num_positions, "rows of the ViT position_embedding"
        checks.in_range(pos, "packed_vit_position_ids", limit, what)
        mask = PackedMask.from_splits(lens, lens, ["full"] * len(lens), device=device)
        return dict(tokens=tokens.to(device), idx=idx, pos=pos, mask=mask)

    def _prepare_latents(
        self, padded_latent, shapes, pos_ids, idx, timesteps, device, checks: _DeviceChecks
    ) -> dict:
        p = self.latent_patch_size
        C = self.latent_channel
        if (
            not isinstance(padded_latent, torch.Tensor)
            or padded_latent.dim() != 4
            or padded_latent.shape[1] != C
        ):
            raise ValueError(
                f"padded_latent must be [num_images, {C}, H, W] (z_channels={C}), got "
                f"{tuple(padded_latent.shape) if isinstance(padded_latent, torch.Tensor) else type(padded_latent).__name__}"
            )
        try:
            shapes = [(_as_int(h, "h"), _as_int(w, "w")) for h, w in shapes]
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
        n_tok = sum(h * w for h, w in shapes)
        idx = _index(idx, "packed_vae_token_indexes", device)
        pos = _index(pos_ids, "packed_latent_position_ids", device)
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps, dtype=torch.float32)
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
        checks.in_range(pos, "packed_latent_position_ids", self.max_latent_size**2, "max_latent_size ** 2")
        t = torch.sigmoid(timesteps.to(device))
        s = self.timestep_shift
        t = s * t / (1 + (s - 1) * t)  # shifted flow-matching time in [0, 1]; 0 for clean (-inf) tokens
        return dict(latent=padded_latent.to(device), shapes=shapes, idx=idx, pos=pos, t=t)


class _DeviceChecks:
    """Device-side input checks read back in one synchronisation: ``add(bad_mask_or_flag, message)``,
    then ``raise_first()`` raises ValueError with the first failing check's message."""

    def __init__(self) -> None:
        self.flags: list[torch.Tensor] = []
        self.messages: list[str] = []

    def add(self, bad: torch.Tensor, message: str) -> None:
        if bad.numel():
            self.flags.append(bad.any().reshape(1))
            self.messages.append(message)

    def in_range(self, t: torch.Tensor, name: str, hi: int, what: str) -> None:
        self.add((t < 0) | (t >= hi), f"{name} has entries outside [0, {hi}) ({what})")

    def raise_first(self) -> None:
        if not self.flags:
            return
        bad = torch.cat([f.to(self.flags[0].device) for f in self.flags]).tolist()
        for b, message in zip(bad, self.messages, strict=True):
            if b:
                raise ValueError(message)


def _check_partition(L: int, text_idx: torch.Tensor, vit_idx, vae_idx, checks: _DeviceChecks) -> None:
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
    allidx = torch.cat([t for _, t in parts]).clamp(0, L - 1)  # out-of-range entries are reported above
    counts = torch.bincount(allidx, minlength=L)
    checks.add(
        counts != 1,
        "packed_text_indexes, packed_vit_token_indexes and packed_vae_token_indexes overlap: "
        "they must partition range(sequence_length)",
    )


def _mse_rows(
    L: int, mse_idx: torch.Tensor, vae_idx: torch.Tensor, noised: torch.Tensor, checks: _DeviceChecks
) -> torch.Tensor:
    """Rows of the VAE token list that ``mse_loss_indexes`` select, checking (without a sync) that they
    are exactly the noised VAE tokens in ``packed_vae_token_indexes`` order (upstream pairs
    ``hidden[mse_loss_indexes]`` with ``target[t > 0]``)."""
    msg = "mse_loss_indexes must list the noised VAE tokens (finite packed_timesteps), in packed_vae_token_indexes order"
    checks.in_range(mse_idx, "mse_loss_indexes", L, "sequence_length")
    safe = mse_idx.clamp(0, L - 1)
    rank = torch.full((L,), -1, dtype=torch.long, device=vae_idx.device)
    rank[vae_idx.clamp(0, L - 1)] = torch.arange(vae_idx.numel(), device=vae_idx.device)
    rows = rank[safe]  # position of each MSE token in the VAE token list (-1: not a VAE token)
    n_noised = noised.sum()
    checks.add((n_noised != mse_idx.numel()).reshape(1), msg)
    if rows.numel():
        checks.add(rows < 0, msg)
        checks.add(~noised[rows.clamp_min(0)], msg)
        if rows.numel() > 1:
            checks.add(rows[1:] <= rows[:-1], msg)
    return rows.clamp_min(0)


def _numel(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    try:
        return len(x)
    except TypeError:
        return 1

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
(``Qwen2Model.fusion_plan``, ``SiglipVisionModel.fusion_plan``; see :mod:`bagel.model.fusion`).

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

``forward(**batch)`` is ``forward_prepared(prepare_pack(**batch))``: ``prepare_pack`` (the steps of
:mod:`bagel.model.prepare`) does everything that depends on the data in Python or needs a host sync
(validation, read back from the device once; masks from the split lists, grouping by expert, kernel
block tables, patchifying, drawing the noise) and returns a :class:`~bagel.model.prepare.PreparedPack` (a
``GroupedPack`` for the grouped kernel path, a ``ReferencePack`` for a language model with its own
``forward_train``); ``forward_prepared`` is the model body from embeddings to losses, tensor work and
custom ops only, which ``torch.compile(fullgraph=True, dynamic=True)`` traces::

    body = torch.compile(model.forward_prepared, fullgraph=True, dynamic=True)
    losses = body(model.prepare_pack(**batch))
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bagel.io.checkpoint import LoadReport, load_checkpoint_into, save_checkpoint
from bagel.model import prepare
from bagel.model.backend import BagelBackendConfig
from bagel.model.config import BagelConfig
from bagel.model.embeddings import MLPconnector, PositionEmbedding, TimestepEmbedder
from bagel.model.prepare import GroupedPack, PackInputs, PreparedPack, patchify_latents
from bagel.model.qwen2 import DECODER_LAYERS, Qwen2ForCausalLM, Qwen2RotaryEmbedding
from bagel.model.siglip import SiglipVisionModel
from bagel.model.validation import backend_property, check_backend

__all__ = [
    "BagelModel",
    "BagelForUnifiedMultimodal",
    "PreparedPack",
    "PackInputs",
    "stage_to_int",
    "prepare_config_for_stage",
    "convert_patch_embedding_for_packed_vit",
    "patchify_latents",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- helpers
def _every_module(module: nn.Module) -> bool:
    return True


def _as_float_dtype(dtype) -> torch.dtype | None:
    """``dtype`` of :meth:`BagelForUnifiedMultimodal.from_pretrained`: None, a floating ``torch.dtype``, or
    its name (``"bfloat16"``, ``"torch.float16"``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        value = dtype
    elif isinstance(dtype, str):
        value = getattr(torch, dtype.strip().removeprefix("torch."), None)
    else:
        value = None
    if dtype is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ValueError(
            f"dtype={dtype!r}: expected a floating torch.dtype or its name, e.g. torch.bfloat16 or 'bfloat16'"
        )
    return value


def _as_device(device) -> torch.device:
    """``device`` of :meth:`BagelForUnifiedMultimodal.from_pretrained` (default: the CPU)."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ValueError(f"device={device!r}: expected a torch.device, a device string or a CUDA index")
    try:
        value = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"device={device!r}: {exc}") from None
    if value.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine")
    return value


def stage_to_int(stage: int | str) -> int:
    """``1`` or ``2`` from ``1``, ``2``, ``"1"``, ``"2"``, ``"stage1"``, ``"stage2"`` (any case); else ValueError."""
    if isinstance(stage, bool):
        raise ValueError(f"stage={stage!r}: expected 1, 2, 'stage1' or 'stage2'")
    if isinstance(stage, int):
        value = stage
    elif isinstance(stage, str):
        s = stage.strip().lower().removeprefix("stage").strip()
        value = {"1": 1, "2": 2}.get(s)  # not int(s): str.isdigit() is true for "²", which int() refuses
    else:
        value = None
    if value not in (1, 2):
        raise ValueError(f"unknown BAGEL stage {stage!r}: expected 1, 2, 'stage1' or 'stage2'")
    return value


def _routed(layer_module) -> bool:
    """Whether the decoder block ``layer_module`` names routes a sub-block by expert (MoE, MoT)."""
    cls = DECODER_LAYERS.get(layer_module) if isinstance(layer_module, str) else None
    return cls is not None and bool(cls.routed_attention or cls.routed_mlp)


def prepare_config_for_stage(config: BagelConfig) -> None:
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
        stage = stage_to_int(config.stage)
        config.stage = stage
        if stage == 1:
            config.visual_gen = False
            tc.layer_module = "Qwen2DecoderLayer"
        else:
            config.visual_gen = True
            if not _routed(getattr(tc, "layer_module", None)):
                tc.layer_module = "Qwen2MoTDecoderLayer"
    elif getattr(tc, "layer_module", None) is None:
        tc.layer_module = "Qwen2MoTDecoderLayer" if config.visual_gen else "Qwen2DecoderLayer"
    if config.vision_config is not None:
        config.vision_config.rope = bool(config.vit_rope)
    config.validate()


def convert_patch_embedding_for_packed_vit(model: BagelModel, config: BagelConfig) -> None:
    """Swap the SigLIP Conv2d patch embedding for a Linear ``[hidden, 3*p*p]`` (the checkpoint's layout)
    that computes the same on BAGEL-patchified pixels (no-op without ``visual_und`` or when done)."""
    if not config.visual_und:
        return
    model.vit_model.vision_model.embeddings.convert_conv2d_to_linear()


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
        config: the :class:`BagelConfig` (used as is; see :func:`prepare_config_for_stage`).
        backend: kernel choice given to the language model and the ViT (default: all ``"auto"``);
            :attr:`BagelForUnifiedMultimodal.backend` changes it later.
        language_model_cls: class of the language model (default :class:`bagel.model.qwen2.Qwen2ForCausalLM`;
            e.g. ``bagel.model.qwen2_reference.Qwen2ForCausalLMReference`` for upstream's gather/scatter
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
        backend = check_backend(BagelBackendConfig() if backend is None else backend)
        self.config = config
        hidden = config.text_config.hidden_size
        lm_cls = Qwen2ForCausalLM if language_model_cls is None else language_model_cls
        if not (isinstance(lm_cls, type) and issubclass(lm_cls, nn.Module)):
            raise ValueError(f"language_model_cls must be an nn.Module subclass, got {lm_cls!r}")
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
    head. ``config.stage`` (1 / 2 / None) is applied by :func:`prepare_config_for_stage` (in place).

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
        prepare_config_for_stage(config)
        self.config = config
        self.model = BagelModel(config, backend, language_model_cls=language_model_cls)
        convert_patch_embedding_for_packed_vit(self.model, config)
        self._backend = BagelBackendConfig() if backend is None else backend
        self.hidden_size = config.text_config.hidden_size
        self.num_heads = config.text_config.num_attention_heads
        self.use_moe = _routed(config.text_config.layer_module)
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
        # size. Set by bagel.train.distributed.apply_fsdp2 to the root unit's parameters; None: off.
        self.zero_grad_prefixes: tuple[str, ...] | None = None
        # Run the ViT on a one-patch stand-in, tied into the losses with weight zero, when a pack has no
        # image: under FSDP2 with one unit per ViT layer every rank must run every unit (each unit's
        # all-gather is a collective). Set by bagel.train.distributed.apply_fsdp2.
        self.vit_stand_in = False
        # The CE of the training forward: None computes ``F.cross_entropy(lm_head(h), labels)`` on the
        # full ``[n_ce, V]`` logits; a callable ``ce_loss_fn(lm_head_module, h, labels) -> [n_ce]`` fp32
        # per-token CE replaces it, e.g. bagel_kernels.linear_cross_entropy.lm_head_cross_entropy, which
        # never materialises every CE token's logits at once (bagel-train sets it). The head module is
        # handed over, not its weight, so an adapted or hooked head keeps working.
        self.ce_loss_fn = None

    # the kernel choice; setting it (checked) updates the language model and the ViT
    backend = backend_property(
        lambda self: (
            (self.model.language_model, self.model.vit_model)
            if self.config.visual_und
            else (self.model.language_model,)
        )
    )

    # -------------------------------------------------------------- HF-style accessors
    @classmethod
    def supports_config(cls, config: Any) -> bool:
        """True for a BAGEL config (``model_type == "bagel"``, object or dict)."""
        model_type = (
            config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
        )
        return model_type == BagelConfig.model_type

    def checkpoint_module(self) -> BagelModel:
        """The module whose ``state_dict()`` keys are the checkpoint's keys (``self.model``)."""
        return self.model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.model.language_model.get_output_embeddings()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the decoder layers recompute their activations in backward (HF's attribute; PEFT reads
        it). Switched per stack by ``gradient_checkpointing`` on ``model.model.language_model.model`` and
        ``model.model.vit_model.vision_model.encoder`` (``bagel.train.distributed.apply_fsdp2`` sets both)."""
        return bool(self.model.language_model.model.gradient_checkpointing)

    def enable_input_require_grads(self) -> None:
        """Nothing to do (HF's hook for reentrant checkpointing, which PEFT calls when checkpointing is
        on): the layers recompute with non-reentrant ``torch.utils.checkpoint``, which gives adapters
        inside a layer their gradients although the layer's input (frozen embeddings) needs none. Not
        registering HF's ``requires_grad_`` hook on the embeddings also keeps the model body traceable
        by ``torch.compile``."""

    @torch.no_grad()
    def initialize_weights(self, only: Collection[str] | None = None) -> None:
        """(Re)initialise the weights, e.g. after materialising a meta-device model with ``to_empty``:
        the Qwen2 LM and the SigLIP tower with their HF initialisers, the connector / timestep embedder /
        vae2llm with PyTorch's Linear default, the position tables with their sin-cos values, llm2vae
        with zeros. Non-persistent buffers (RoPE inverse frequencies) are always recomputed, in fp32.

        ``only``: checkpoint keys (``self.model``'s state-dict keys); then just the modules that hold
        one of them are initialised (all their own tensors), the others keep their values.
        :meth:`from_pretrained` passes the keys the checkpoint lacks. Every initialiser works in the
        parameters' own dtype and device (no fp32 copy of a bf16 model)."""
        m = self.model
        if only is None:
            want = _every_module
        else:
            only = set(only)
            ids = {id(t) for n, t in m.state_dict(keep_vars=True).items() if n in only}

            def want(mod: nn.Module) -> bool:
                own = itertools.chain(mod.parameters(recurse=False), mod.buffers(recurse=False))
                return any(id(t) in ids for t in own)

        lm = m.language_model
        lm.init_weights(want)
        for mod in lm.modules():
            if isinstance(mod, Qwen2RotaryEmbedding):
                mod.reset_parameters()
        bagel_linears = []
        if self.config.visual_und:
            m.vit_model.init_weights(want)
            if want(m.vit_pos_embed):
                m.vit_pos_embed.reset_parameters()
            bagel_linears.append(m.connector)
        if self.config.visual_gen:
            if want(m.latent_pos_embed):
                m.latent_pos_embed.reset_parameters()
            bagel_linears += [m.time_embedder, m.vae2llm]
        for module in bagel_linears:
            for mod in module.modules():
                if isinstance(mod, nn.Linear) and want(mod):
                    mod.reset_parameters()
        if self.config.visual_gen and want(m.llm2vae):
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
            strict: raise ValueError when a checkpoint key matches no model parameter or a parameter
                the stage needs is missing from the checkpoint (VAE keys and generation keys skipped
                by stage 1 never count), before any weight is read.
            kwargs: ``backend`` (a :class:`BagelBackendConfig`), ``language_model_cls``, ``dtype`` (a
                floating ``torch.dtype`` or its name, e.g. ``"bfloat16"``) and ``device`` (where the
                weights are materialised; default float32 on the CPU); the rest override
                :class:`BagelConfig` fields (an unknown name is a ValueError).

        The model is built on ``meta``, materialised once on ``device`` in ``dtype``, and each
        checkpoint tensor is copied straight into its parameter (:func:`bagel.io.checkpoint.read_into`),
        so a bf16 load never holds an fp32 copy of the model; only the parameters the checkpoint lacks
        are initialised. The RoPE inverse frequencies (non-persistent buffers) stay fp32 whatever
        ``dtype`` is: in bf16 the angles of far positions would lose their precision. With
        ``device="meta"`` nothing is read: the checkpoint is validated and its keys are reported in
        ``load_report.on_meta``.

        The :class:`bagel.io.checkpoint.LoadReport` (loaded / missing / unexpected / VAE keys ...) is attached
        as ``model.load_report`` and summarised in the log."""
        stage_int = stage_to_int(stage)
        if not isinstance(strict, bool):
            raise ValueError(f"strict must be a bool, got {strict!r}")
        backend = kwargs.pop("backend", None)
        lm_cls = kwargs.pop("language_model_cls", None)
        dtype = _as_float_dtype(kwargs.pop("dtype", kwargs.pop("torch_dtype", None)))
        device = _as_device(kwargs.pop("device", None))
        config = BagelConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
        config.stage = stage_int
        # built on the meta device, cast there (free), then materialised once, directly on `device` in
        # `dtype`: no fp32 copy of a 14B-parameter model on the host for a bf16 load
        with torch.device("meta"):
            model = cls(config, backend=backend, language_model_cls=lm_cls)
        if dtype is not None:
            model.to(dtype)
        model.to_empty(device=device)
        # each checkpoint tensor is read straight into its parameter, in the parameter's dtype; just
        # before the copies, the tensors the checkpoint lacks (and the RoPE buffers) are initialised
        report = load_checkpoint_into(
            model.model,
            pretrained_model_name_or_path,
            stage=stage_int,
            strict=strict,
            before_copy=lambda r: model.initialize_weights(only=r.missing),
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
        ``torch.compile(fullgraph=True)`` traces). The arguments are gathered into one
        :class:`bagel.model.prepare.PackInputs`, which :meth:`prepare_pack` also takes."""
        inputs = PackInputs(
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
        return self._forward_prepared(prepare.prepare_pack(self, inputs))

    def prepare_pack(self, *args: Any, **kwargs: Any) -> PreparedPack:
        """The once-per-pack part of :meth:`forward`, run eagerly: takes :meth:`forward`'s arguments (or
        one :class:`bagel.model.prepare.PackInputs`) and returns a :class:`bagel.model.prepare.PreparedPack`, a
        :class:`~bagel.model.prepare.GroupedPack` for the grouped kernel path or a
        :class:`~bagel.model.prepare.ReferencePack` for a language model with its own ``forward_train``.

        Validates every input (host checks at once; the value checks on the device, read back in ONE
        synchronisation), builds the attention masks with the tables their kernels read (the pack's and
        the ViT's), the language model's grouping by expert, the hidden state row of every token in
        that grouped order, the patchified clean latents, the flow-matching times and the noise (drawn
        here from the global generator). The result holds only tensors, ints and the prepared masks, so
        :meth:`forward_prepared` has no host sync and no Python that depends on the data; prepare the
        next pack while the current one trains if you like. The steps are in :mod:`bagel.model.prepare`.

        Under FSDP2 (:func:`bagel.train.distributed.apply_fsdp2`) a pack without an image gets a one-patch
        stand-in for the ViT (``vit_stand_in``), so that every rank runs every ViT layer's unit."""
        return prepare.prepare_pack(self, PackInputs.of(*args, **kwargs))

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
        # 1. embed: text, ViT and noised-latent embeddings at their rows    [L, H], the LM's row order
        x, tie = self._embed(pack)
        # 2. decoder layers and final norm(s)                                  [L, H]
        if isinstance(pack, GroupedPack):
            hidden = self.model.language_model.model.decode(x, pack.lm)  # grouped rows
        else:
            hidden = self.model.language_model.forward_train(x, *pack.lm_args)  # pack order
        # 3. heads: lm_head + CE at the CE rows, llm2vae + MSE at the MSE rows
        ce, mse = self._losses(pack, hidden)
        ce, mse = self._tie_unused(ce, mse, tie)
        return dict(ce=ce, mse=mse)

    def _tie_unused(self, ce, mse, tie):
        """Add ``0 * (sum of parameters the pack left unused)`` to a loss, so that every parameter gets a
        (zero) gradient: the FSDP2 ViT stand-in's output ``tie``, and with ``zero_grad_prefixes`` the
        parameters outside the root unit (see ``__init__``)."""
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
        return ce, mse

    def _embed(self, pack: PreparedPack) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The language model's input ``[L, H]``: text, ViT and noised-latent embeddings at their rows.
        Also the FSDP2 ViT stand-in's output sum (to be tied in with weight 0), or None."""
        m = self.model
        tie = None
        text_embed = self.get_input_embeddings()(pack.text_ids)  # [n_text, H]
        x = text_embed.new_zeros(pack.sequence_length, self.hidden_size)
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
        if pack.clean is not None:
            t = pack.t
            x_t = (1 - t[:, None]) * pack.clean + t[:, None] * pack.noise
            gen_embed = (
                m.vae2llm(x_t.to(pack.vae_dtype)) + m.time_embedder(t) + m.latent_pos_embed(pack.vae_pos)
            )
            x = x.index_put((pack.vae_rows,), gen_embed.to(x.dtype))
        return x, tie

    def _losses(
        self, pack: PreparedPack, hidden: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-token CE at the CE rows and per-element flow-matching MSE at the MSE rows (None without)."""
        ce = mse = None
        if pack.ce_rows is not None:
            head, h = self.get_output_embeddings(), hidden[pack.ce_rows]
            if self.ce_loss_fn is not None:
                ce = self.ce_loss_fn(head, h, pack.labels)
            else:
                ce = F.cross_entropy(head(h), pack.labels, reduction="none")
        if pack.mse_rows is not None:
            preds = self.model.llm2vae(hidden[pack.mse_rows])
            target = pack.noise - pack.clean  # flow-matching velocity dx_t/dt, from data to noise
            mse = (preds - target.index_select(0, pack.mse_target_rows)) ** 2  # = target[t > 0], no sync
        return ce, mse

"""``BagelConfig``: the configuration of BAGEL (Qwen2.5 MoT LLM + SigLIP-NaViT + flow matching).

The config nests a ``Qwen2Config`` (``text_config``, alias ``llm_config``) and a ``SiglipVisionConfig``
(``vision_config``, alias ``vit_config``), plus a small ``vae_config`` dict (``z_channels``,
``downsample``) describing the external VAE whose latents the model consumes.

Checkpoint layouts read by :meth:`BagelConfig.from_pretrained`:

- ``config.json`` with ``model_type == "bagel"`` (what :meth:`save_pretrained` writes);
- upstream BAGEL's ``llm_config.json`` + ``vit_config.json`` (BAGEL-7B-MoT on the Hub), where the
  BAGEL-level fields take upstream's values and, when an ``ema.safetensors`` is present,
  ``max_latent_size`` / ``vit_max_num_patch_per_side`` are read off its position-embedding shapes.

``vit_select_layer`` is never folded into ``vision_config.num_hidden_layers``: the config keeps the
checkpoint's SigLIP depth (27 for so400m) and :attr:`BagelConfig.vit_num_layers` gives the depth of
the tower actually built (``num_hidden_layers + 1 + vit_select_layer`` = 26 for BAGEL-7B-MoT). So the
select-layer offset is applied exactly once, however many times a config is saved and reloaded.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
from typing import Any

from bagel.extras import needs_extra
from bagel.io.files import find_weight_files, read_json, read_safetensors_header
from bagel.model.qwen2 import DECODER_LAYERS

with needs_extra():
    from transformers import PretrainedConfig, Qwen2Config, SiglipVisionConfig

__all__ = ["BagelConfig", "DEFAULT_VAE_CONFIG"]

# FLUX VAE as used by BAGEL: 16 latent channels, 8x spatial downsampling.
DEFAULT_VAE_CONFIG = {"z_channels": 16, "downsample": 8}

_QWEN_BAGEL_DEFAULTS = {"qk_norm": True, "freeze_und": False}

# Typed fields checked by BagelConfig.validate(): (field, kind, minimum). "int" is an int (not a bool)
# >= minimum; "real" a finite int/float (not a bool) > minimum; "bool" a bool.
_TEXT_FIELDS = (
    ("vocab_size", "int", 1),
    ("hidden_size", "int", 1),
    ("intermediate_size", "int", 1),
    ("num_hidden_layers", "int", 1),
    ("num_attention_heads", "int", 1),
    ("num_key_value_heads", "int", 1),
    ("max_position_embeddings", "int", 1),
    ("rms_norm_eps", "real", 0),
    ("qk_norm", "bool", None),
    ("freeze_und", "bool", None),
)
_VISION_FIELDS = (
    ("hidden_size", "int", 1),
    ("intermediate_size", "int", 1),
    ("num_hidden_layers", "int", 1),
    ("num_attention_heads", "int", 1),
    ("num_channels", "int", 1),
    ("image_size", "int", 1),
    ("patch_size", "int", 1),
    ("layer_norm_eps", "real", 0),
)


def _check_field(name: str, value: Any, kind: str, minimum) -> None:
    """ValueError naming ``name`` unless ``value`` is of ``kind`` (see _TEXT_FIELDS) and in range."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool (true/false), got {value!r} ({type(value).__name__})")
        return
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r} ({type(value).__name__})")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind == "real" else int):
        what = "an int" if kind == "int" else "a number"
        raise ValueError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if kind == "int" and minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if kind == "real" and not (math.isfinite(value) and (minimum is None or value > minimum)):
        raise ValueError(f"{name} must be a finite number > {minimum}, got {value}")


def _field(name: str, value: Any, kind: str, minimum=None) -> Any:
    _check_field(name, value, kind, minimum)
    return float(value) if kind == "real" else value


def _coerce_text_config(cfg: Any, visual_gen: bool) -> Qwen2Config:
    if cfg is None:
        cfg = Qwen2Config()
    elif isinstance(cfg, dict):
        cfg = dict(cfg)
        cfg.pop("model_type", None)
        cfg.pop("transformers_version", None)
        try:
            cfg = Qwen2Config(**cfg)
        except Exception as exc:  # transformers validates fields with its own error types
            raise ValueError(f"llm_config: {exc}") from None
    elif not isinstance(cfg, Qwen2Config):
        raise ValueError(f"llm_config/text_config must be a dict or a Qwen2Config, got {type(cfg).__name__}")
    for key, value in _QWEN_BAGEL_DEFAULTS.items():
        if getattr(cfg, key, None) is None:
            setattr(cfg, key, value)
    if getattr(cfg, "layer_module", None) is None:
        cfg.layer_module = "Qwen2MoTDecoderLayer" if visual_gen else "Qwen2DecoderLayer"
    if cfg.layer_module not in DECODER_LAYERS:
        raise ValueError(
            f"llm_config.layer_module={cfg.layer_module!r} is not one of {tuple(DECODER_LAYERS)}"
        )
    return cfg


def _coerce_vision_config(cfg: Any, vit_rope: bool) -> SiglipVisionConfig | None:
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        cfg = dict(cfg)
        cfg.pop("model_type", None)
        cfg.pop("transformers_version", None)
        try:
            cfg = SiglipVisionConfig(**cfg)
        except Exception as exc:  # transformers validates fields with its own error types
            raise ValueError(f"vit_config: {exc}") from None
    elif not isinstance(cfg, SiglipVisionConfig):
        raise ValueError(
            f"vit_config/vision_config must be a dict or a SiglipVisionConfig, got {type(cfg).__name__}"
        )
    cfg.rope = vit_rope
    return cfg


class BagelConfig(PretrainedConfig):
    """Configuration of :class:`bagel.BagelForUnifiedMultimodal`.

    Args:
        llm_config / text_config: the language model (``Qwen2Config`` or dict) with BAGEL's extras
            ``qk_norm`` (default True), ``layer_module`` (``Qwen2DecoderLayer``, ``Qwen2MoEDecoderLayer``
            or ``Qwen2MoTDecoderLayer``; default MoT with ``visual_gen``) and ``freeze_und`` (default False).
        vit_config / vision_config: the SigLIP vision tower (``SiglipVisionConfig`` or dict), with the
            checkpoint's depth (see ``vit_select_layer``). ``None`` with ``visual_und=False``.
        vae_config: ``{"z_channels": C, "downsample": d}`` of the external VAE (default FLUX: 16, 8).
        visual_und: build the ViT understanding path. visual_gen: build the flow-matching path.
        stage: ``None``, 1/2 or ``"stage1"``/``"stage2"``; applied by the model (stage 1 = understanding
            only with dense decoder layers, stage 2 = generation too with MoT layers).
        latent_patch_size: VAE latent patch side ``p`` (a latent token is ``p*p*z_channels`` values).
        max_latent_size: side of the latent position grid (``latent_pos_embed`` has its square rows).
        vit_max_num_patch_per_side: side of the ViT position grid (``vit_pos_embed`` rows = its square).
        connector_act: activation of the ViT->LLM MLP connector.
        interpolate_pos: position ids by interpolation (True) or extrapolation (False) onto the grids.
        vit_select_layer: which SigLIP hidden state feeds the connector, HF-style (-1 = last layer,
            -2 = second to last, k > 0 = after k layers); the tower is built with that many layers
            and ends with ``post_layernorm`` as upstream.
        vit_rope: 2-D rotary positions in the ViT instead of its absolute position embedding.
        timestep_shift: flow-matching shift ``s``: ``t <- s t / (1 + (s - 1) t)``.
    """

    model_type = "bagel"

    def __init__(
        self,
        llm_config: Any = None,
        vit_config: Any = None,
        vae_config: dict | None = None,
        visual_und: bool = True,
        visual_gen: bool = True,
        stage: int | str | None = None,
        latent_patch_size: int = 2,
        max_latent_size: int = 32,
        vit_max_num_patch_per_side: int = 70,
        connector_act: str = "gelu_pytorch_tanh",
        interpolate_pos: bool = False,
        vit_select_layer: int = -2,
        vit_rope: bool = False,
        timestep_shift: float = 1.0,
        text_config: Any = None,
        vision_config: Any = None,
        **kwargs: Any,
    ) -> None:
        if text_config is not None and llm_config is not None and text_config is not llm_config:
            raise ValueError("pass either llm_config or text_config (aliases), not both")
        if vision_config is not None and vit_config is not None and vision_config is not vit_config:
            raise ValueError("pass either vit_config or vision_config (aliases), not both")
        text_config = text_config if text_config is not None else llm_config
        vision_config = vision_config if vision_config is not None else vit_config
        # typed fields are checked, never coerced: int("2"), int(2.5) or bool("false") would hide a
        # wrong config behind a plausible value
        self.visual_und = _field("visual_und", visual_und, "bool")
        self.visual_gen = _field("visual_gen", visual_gen, "bool")
        self.stage = stage
        self.text_config = _coerce_text_config(text_config, self.visual_gen)
        if vision_config is None and self.visual_und:
            vision_config = {}
        self.vit_rope = _field("vit_rope", vit_rope, "bool")
        self.vision_config = _coerce_vision_config(vision_config, vit_rope)
        if vae_config is not None and not isinstance(vae_config, dict):
            raise ValueError(f"vae_config must be a dict, got {type(vae_config).__name__}")
        self.vae_config = dict(DEFAULT_VAE_CONFIG if vae_config is None else vae_config)
        self.latent_patch_size = _field("latent_patch_size", latent_patch_size, "int")
        self.max_latent_size = _field("max_latent_size", max_latent_size, "int")
        self.vit_max_num_patch_per_side = _field(
            "vit_max_num_patch_per_side", vit_max_num_patch_per_side, "int"
        )
        self.connector_act = _field("connector_act", connector_act, "str")
        self.interpolate_pos = _field("interpolate_pos", interpolate_pos, "bool")
        self.vit_select_layer = _field("vit_select_layer", vit_select_layer, "int")
        self.timestep_shift = _field("timestep_shift", timestep_shift, "real")
        super().__init__(**kwargs)
        self.validate()

    # ------------------------------------------------------------------ aliases
    @property
    def llm_config(self) -> Qwen2Config:
        return self.text_config

    @llm_config.setter
    def llm_config(self, value: Any) -> None:
        self.text_config = _coerce_text_config(value, self.visual_gen)

    @property
    def vit_config(self) -> SiglipVisionConfig | None:
        return self.vision_config

    @vit_config.setter
    def vit_config(self, value: Any) -> None:
        self.vision_config = _coerce_vision_config(value, self.vit_rope)

    # ------------------------------------------------------------------ derived values
    @property
    def vit_num_layers(self) -> int:
        """Depth of the SigLIP tower actually built (``vit_select_layer`` applied once, here)."""
        n = int(self.vision_config.num_hidden_layers)
        sel = self.vit_select_layer
        return n + 1 + sel if sel < 0 else sel

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config["z_channels"])

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.latent_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side: VAE downsample times latent patch size (16 for BAGEL)."""
        return int(self.vae_config["downsample"]) * self.latent_patch_size

    def validate(self) -> None:
        """Raise ValueError naming the offending field when the config cannot build a model."""
        if not self.visual_und and not self.visual_gen and self.vision_config is None:
            pass  # a text-only BAGEL is a plain Qwen2 model: allowed
        tc = self.text_config
        for name, kind, minimum in _TEXT_FIELDS:
            _check_field(f"llm_config.{name}", getattr(tc, name, None), kind, minimum)
        if getattr(tc, "head_dim", None) is not None:
            _check_field("llm_config.head_dim", tc.head_dim, "int", 2)
        theta = getattr(tc, "rope_theta", None)
        params = getattr(tc, "rope_parameters", None)
        if theta is None and isinstance(params, dict):
            theta = params.get("rope_theta")
        if theta is not None:
            _check_field("llm_config.rope_theta", theta, "real", 0)
        if not isinstance(getattr(tc, "layer_module", None), str) or tc.layer_module not in DECODER_LAYERS:
            raise ValueError(
                f"llm_config.layer_module={tc.layer_module!r} is not one of {tuple(DECODER_LAYERS)}"
            )
        for name in ("visual_und", "visual_gen", "interpolate_pos", "vit_rope"):
            _check_field(name, getattr(self, name), "bool", None)
        for name in (
            "latent_patch_size",
            "max_latent_size",
            "vit_max_num_patch_per_side",
            "vit_select_layer",
        ):
            _check_field(name, getattr(self, name), "int", None)
        _check_field("timestep_shift", self.timestep_shift, "real", None)
        _check_field("connector_act", self.connector_act, "str", None)
        if self.visual_und:
            if self.vision_config is None:
                raise ValueError("visual_und=True needs vit_config (vision_config)")
            for name, kind, minimum in _VISION_FIELDS:
                _check_field(f"vit_config.{name}", getattr(self.vision_config, name, None), kind, minimum)
            n = int(self.vision_config.num_hidden_layers)
            sel = self.vit_select_layer
            if sel == 0 or not 1 <= self.vit_num_layers <= n:
                raise ValueError(
                    f"vit_select_layer={sel} selects no valid layer of a {n}-layer vision tower "
                    f"(use -1..-{n} or 1..{n})"
                )
            vc = self.vision_config
            if vc.hidden_size % vc.num_attention_heads:
                raise ValueError(
                    f"vit_config.hidden_size={vc.hidden_size} is not divisible by num_attention_heads={vc.num_attention_heads}"
                )
            if self.vit_max_num_patch_per_side < 1:
                raise ValueError(
                    f"vit_max_num_patch_per_side={self.vit_max_num_patch_per_side} must be positive"
                )
        if self.visual_gen:
            for key in ("z_channels", "downsample"):
                v = self.vae_config.get(key)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(
                        f"vae_config[{key!r}] must be a positive int, got {self.vae_config.get(key)!r}"
                    )
            if self.latent_patch_size < 1:
                raise ValueError(f"latent_patch_size={self.latent_patch_size} must be positive")
            if self.max_latent_size < 1:
                raise ValueError(f"max_latent_size={self.max_latent_size} must be positive")
            if not (math.isfinite(self.timestep_shift) and self.timestep_shift > 0):
                raise ValueError(f"timestep_shift={self.timestep_shift} must be positive and finite")
        if tc.hidden_size % tc.num_attention_heads:
            raise ValueError(
                f"llm_config.hidden_size={tc.hidden_size} is not divisible by num_attention_heads={tc.num_attention_heads}"
            )
        if tc.num_attention_heads % tc.num_key_value_heads:
            raise ValueError(
                f"llm_config.num_attention_heads={tc.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={tc.num_key_value_heads}"
            )

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in ("text_config", "vision_config"):
            sub = getattr(self, key)
            if sub is not None:
                d = sub.to_dict()
                d.pop("transformers_version", None)
                out[key] = d
            else:
                out[key] = None
        out.pop("llm_config", None)
        out.pop("vit_config", None)
        out["vae_config"] = dict(self.vae_config)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        # nested configs are always written in full: a diff against defaults cannot be reloaded safely
        out = self.to_dict()
        out.pop("_name_or_path", None)
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> BagelConfig:
        """Read ``config.json`` (model_type "bagel"), or upstream's ``llm_config.json`` + ``vit_config.json``.

        Keyword arguments override config fields (e.g. ``visual_gen=False``, ``max_latent_size=64``); a
        name that is not a field is a ValueError (a misspelt override would otherwise be kept silently)."""
        _check_overrides(kwargs)
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path):
            return cls._from_json_dict(read_json(path), kwargs, source=path)
        if not os.path.isdir(path):
            raise ValueError(f"pretrained_model_name_or_path={path!r} is not a directory or a config file")
        cfg_file = os.path.join(path, "config.json")
        data = None
        if os.path.isfile(cfg_file):
            data = read_json(cfg_file)
            if data.get("model_type") != cls.model_type:
                data = None  # e.g. a tokenizer-side Qwen2 config.json next to upstream's llm/vit configs
        if data is not None:
            return cls._from_json_dict(data, kwargs, source=cfg_file)
        return cls._from_upstream_layout(path, kwargs)

    @classmethod
    def _from_json_dict(cls, data: dict, overrides: dict, source: str) -> BagelConfig:
        data = dict(data)
        data.pop("model_type", None)
        data.pop("transformers_version", None)
        data.update(overrides)
        try:
            return cls(**data)
        except (TypeError, ValueError, AttributeError, KeyError, ZeroDivisionError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def _from_upstream_layout(cls, path: str, overrides: dict) -> BagelConfig:
        llm_file = os.path.join(path, "llm_config.json")
        vit_file = os.path.join(path, "vit_config.json")
        if not os.path.isfile(llm_file):
            raise ValueError(
                f"{path} holds neither a BAGEL config.json (model_type 'bagel') nor upstream's llm_config.json"
            )
        llm = read_json(llm_file)
        vit = read_json(vit_file) if os.path.isfile(vit_file) else None
        fields: dict[str, Any] = {
            "llm_config": llm,
            "vit_config": vit,
            "visual_und": vit is not None,
            "visual_gen": True,
            "max_latent_size": 64,  # BAGEL-7B-MoT's latent grid
            "vit_max_num_patch_per_side": 70,
        }
        shapes = _checkpoint_shapes(path, ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"))
        for key, field in (
            ("latent_pos_embed.pos_embed", "max_latent_size"),
            ("vit_pos_embed.pos_embed", "vit_max_num_patch_per_side"),
        ):
            if key in shapes:
                fields[field] = _grid_side(path, key, shapes[key])
        fields.update(overrides)
        try:
            return cls(**fields)
        except (TypeError, ValueError, AttributeError, KeyError, ZeroDivisionError) as exc:
            raise ValueError(f"{llm_file} / {vit_file}: {exc}") from None

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(
        cls,
        *,
        visual_gen: bool = True,
        layer_module: str | None = None,
        llm_layers: int = 2,
        llm_hidden: int = 64,
        llm_heads: int = 4,
        llm_kv_heads: int = 2,
        vocab_size: int = 128,
        vit_layers: int = 2,
        vit_hidden: int = 48,
        vit_heads: int = 2,
        vit_patch: int = 4,
        vit_grid: int = 8,
        latent_channels: int = 4,
        latent_patch_size: int = 2,
        max_latent_size: int = 8,
        **kwargs: Any,
    ) -> BagelConfig:
        """A small BAGEL for tests and demos: 2 MoT layers of width 64 (4 query / 2 KV heads, head dim 16),
        a 2-layer ViT of width 48 (head dim 24, patch 4, 8x8 patch grid), 4 latent channels, latent patch 2.

        The ViT config carries ``vit_layers + 1`` layers and ``vit_select_layer=-2``, as upstream does."""
        llm = Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=llm_hidden,
            intermediate_size=2 * llm_hidden,
            num_hidden_layers=llm_layers,
            num_attention_heads=llm_heads,
            num_key_value_heads=llm_kv_heads,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        )
        llm.qk_norm = True
        llm.freeze_und = False
        llm.layer_module = layer_module or ("Qwen2MoTDecoderLayer" if visual_gen else "Qwen2DecoderLayer")
        vit = SiglipVisionConfig(
            hidden_size=vit_hidden,
            intermediate_size=2 * vit_hidden,
            num_hidden_layers=vit_layers + 1,
            num_attention_heads=vit_heads,
            num_channels=3,
            image_size=vit_patch * vit_grid,
            patch_size=vit_patch,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        )
        fields = dict(
            llm_config=llm,
            vit_config=vit,
            vae_config={"z_channels": latent_channels, "downsample": 8},
            visual_und=True,
            visual_gen=visual_gen,
            latent_patch_size=latent_patch_size,
            max_latent_size=max_latent_size,
            vit_max_num_patch_per_side=vit_grid,
            vit_select_layer=-2,
        )
        fields.update(kwargs)
        return cls(**fields)

    @classmethod
    def bagel_7b_mot(cls, *, llm_layers: int = 28, vit_layers: int = 26, **kwargs: Any) -> BagelConfig:
        """BAGEL-7B-MoT shapes (DESIGN.md sec. 6); ``llm_layers`` / ``vit_layers`` cut the depth for benchmarks.

        LLM: hidden 3584, 28 query / 4 KV heads (head dim 128), intermediate 18944, vocab 152064,
        rope_theta 1e6, MoT layers with q/k norm. ViT: SigLIP so400m (hidden 1152, 16 heads of 72,
        intermediate 4304, patch 14, 980 px = 70x70 grid), 27 layers in the config, 26 in use.
        VAE: 16 channels, downsample 8; latent patch 2, 64x64 latent grid."""
        llm = Qwen2Config(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=llm_layers,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=False,
            hidden_act="silu",
            bos_token_id=151643,
            eos_token_id=151645,
            pad_token_id=151643,
        )
        llm.qk_norm = True
        llm.freeze_und = False
        llm.layer_module = "Qwen2MoTDecoderLayer"
        vit = SiglipVisionConfig(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=vit_layers + 1,
            num_attention_heads=16,
            num_channels=3,
            image_size=980,
            patch_size=14,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        )
        fields = dict(
            llm_config=llm,
            vit_config=vit,
            vae_config=dict(DEFAULT_VAE_CONFIG),
            visual_und=True,
            visual_gen=True,
            latent_patch_size=2,
            max_latent_size=64,
            vit_max_num_patch_per_side=70,
            connector_act="gelu_pytorch_tanh",
            vit_select_layer=-2,
            timestep_shift=1.0,
        )
        fields.update(kwargs)
        return cls(**fields)


def _grid_side(path: str, key: str, shape: tuple[int, ...]) -> int:
    """The side of the square position grid of a ``[side**2, hidden]`` table stored as ``key``."""
    side = math.isqrt(shape[0]) if len(shape) == 2 else 0
    if side <= 0 or side * side != shape[0]:
        raise ValueError(
            f"{path}: checkpoint tensor {key!r} has shape {list(shape)}; expected [side**2, hidden] "
            "(a position table over a square grid)"
        )
    return side


def _config_fields() -> frozenset[str]:
    """The names a config override may set: :class:`BagelConfig`'s own fields and the common
    ``PretrainedConfig`` attributes."""
    own = {
        name
        for name, p in inspect.signature(BagelConfig.__init__).parameters.items()
        if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    return frozenset(own | set(PretrainedConfig().to_dict()))


def _check_overrides(overrides: dict) -> None:
    unknown = sorted(set(overrides) - _config_fields())
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(_config_fields()), n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown BagelConfig field(s) in the overrides: {', '.join(hints)}")


def _checkpoint_shapes(path: str, keys: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes of ``keys`` in ``path``'s ``ema.safetensors`` (header only), when present."""
    out: dict[str, tuple[int, ...]] = {}
    try:
        files = find_weight_files(path)
    except ValueError:
        return out
    for file in files:
        header = read_safetensors_header(file)
        for key in keys:
            if key in header:
                out[key] = tuple(header[key]["shape"])
    return out

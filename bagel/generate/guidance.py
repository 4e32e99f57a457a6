"""Classifier-free guidance as BAGEL samples with it: a text scale and an image scale, an interval of times
where they apply, and the renormalisation variants (upstream's ``Bagel._forward_flow``).

Three velocities of the image's latent tokens ``[V, P]``: ``v`` (the full context), ``v_text`` (the
context without the prompt text: the text-unconditional branch) and ``v_img`` (the context without the
input image: the image-unconditional branch). With ``s_t = cfg_text_scale``, ``s_i = cfg_img_scale``:

    no guidance unless s_t > 1 (upstream applies the image scale only together with the text scale)
    "global" / "channel":
        u   = v_text + s_t (v - v_text)
        w   = v_img + s_i (u - v_img)              (w = u when s_i <= 1)
        out = w * clamp(|v| / (|w| + 1e-8), cfg_renorm_min, 1)
              |.| over the whole image ("global") or over each token's channels ("channel")
    "text_channel":
        u   = v_text + s_t (v - v_text)
        u   = u * clamp(|v| / (|u| + 1e-8), cfg_renorm_min, 1)   per token
        out = v_img + s_i (u - v_img)              (out = u when s_i <= 1)

The rescale never enlarges the guided velocity beyond the unguided one's norm (the upper clamp 1) and,
with ``cfg_renorm_min`` > 0, never shrinks it below that fraction.
"""

from __future__ import annotations

import math

import torch

__all__ = ["RENORM_TYPES", "apply_cfg", "cfg_scales_at", "check_cfg_args"]

RENORM_TYPES = ("global", "channel", "text_channel")
_EPS = 1e-8


def check_cfg_args(
    cfg_text_scale: float,
    cfg_img_scale: float,
    cfg_interval: tuple[float, float],
    cfg_renorm_min: float,
    cfg_renorm_type: str,
) -> tuple[float, float]:
    """Validate the guidance arguments (ValueError naming the argument); returns the interval as floats."""
    for name, value in (
        ("cfg_text_scale", cfg_text_scale),
        ("cfg_img_scale", cfg_img_scale),
        ("cfg_renorm_min", cfg_renorm_min),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if cfg_renorm_min < 0 or cfg_renorm_min > 1:
        raise ValueError(f"cfg_renorm_min must lie in [0, 1], got {cfg_renorm_min}")
    if cfg_renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg_renorm_type={cfg_renorm_type!r} is not one of {RENORM_TYPES}")
    try:
        lo, hi = (float(x) for x in cfg_interval)
    except (TypeError, ValueError):
        raise ValueError(
            f"cfg_interval must be a pair (low, high) of times in [0, 1], got {cfg_interval!r}"
        ) from None
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"cfg_interval must satisfy 0 <= low <= high <= 1, got {cfg_interval!r}")
    return lo, hi


def cfg_scales_at(
    t: float, cfg_text_scale: float, cfg_img_scale: float, cfg_interval: tuple[float, float]
) -> tuple[float, float]:
    """The scales in force at time ``t``: as given when ``low < t <= high``, else 1 (no guidance)."""
    lo, hi = cfg_interval
    if lo < t <= hi:
        return float(cfg_text_scale), float(cfg_img_scale)
    return 1.0, 1.0


def _rescale(reference: torch.Tensor, guided: torch.Tensor, per_token: bool, lo: float) -> torch.Tensor:
    if per_token:
        norm_ref = torch.linalg.vector_norm(reference, dim=-1, keepdim=True)
        norm_guided = torch.linalg.vector_norm(guided, dim=-1, keepdim=True)
    else:
        norm_ref = torch.linalg.vector_norm(reference)
        norm_guided = torch.linalg.vector_norm(guided)
    return guided * (norm_ref / (norm_guided + _EPS)).clamp(min=lo, max=1.0)


def apply_cfg(
    v: torch.Tensor,
    v_text: torch.Tensor | None,
    v_img: torch.Tensor | None,
    cfg_text_scale: float,
    cfg_img_scale: float,
    cfg_renorm_min: float = 0.0,
    cfg_renorm_type: str = "global",
) -> torch.Tensor:
    """The guided velocity ``[V, P]`` of one image (see the module docstring). ``v_text`` is needed when
    ``cfg_text_scale > 1`` and ``v_img`` when also ``cfg_img_scale > 1``; otherwise they may be None."""
    if cfg_renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg_renorm_type={cfg_renorm_type!r} is not one of {RENORM_TYPES}")
    if cfg_text_scale <= 1.0:
        return v
    if v_text is None:
        raise ValueError("cfg_text_scale > 1 needs the text-unconditional velocity v_text")
    use_img = cfg_img_scale > 1.0
    if use_img and v_img is None:
        raise ValueError("cfg_img_scale > 1 needs the image-unconditional velocity v_img")
    u = v_text + cfg_text_scale * (v - v_text)
    if cfg_renorm_type == "text_channel":
        u = _rescale(v, u, per_token=True, lo=cfg_renorm_min)
        return v_img + cfg_img_scale * (u - v_img) if use_img else u
    w = v_img + cfg_img_scale * (u - v_img) if use_img else u
    return _rescale(v, w, per_token=cfg_renorm_type == "channel", lo=cfg_renorm_min)

"""Image transforms BAGEL trains with, and the checks that turn a bad image into a skipped sample.

- :func:`open_image`: bytes or a file -> an RGB ``PIL.Image`` (transparent pixels over white, as
  upstream's ``pil_img2rgb``); the size is checked from the header before decoding.
- :func:`target_size`: upstream's ``MaxLongEdgeMinShortEdgeResize`` arithmetic (scale the long side
  down to ``max_image_size``, the short side up to ``min_image_size``, the area down to
  ``max_pixels / img_num`` (by the square root of the area ratio: see :func:`target_size`), sides rounded to multiples of the stride, at least one stride), plus a cap
  on the long side from the model's position grid: ``vit_max_num_patch_per_side * patch_size`` for the
  ViT, ``max_latent_size * latent_downsample`` for the VAE.
- :class:`ImageTransform`: resize (bicubic, antialiased, as torchvision does for PIL images) and map
  to a float32 ``[3, H, W]`` tensor in [-1, 1] (``(x / 255 - 0.5) / 0.5``).

:class:`SkipSample` is what every reader raises for a sample that must not be trained on; its
``reason`` is the key of the per-reason skip counter.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from typing import Any

import numpy as np
import torch

from bagel.data.config import ImageTransformArgs

__all__ = ["SkipSample", "SKIP_REASONS", "open_image", "target_size", "ImageTransform", "pil_to_tensor"]

# every reason a sample can be skipped for (the skip counters' keys)
SKIP_REASONS = (
    "corrupt_image",  # the bytes/file do not decode as an image
    "missing_file",  # an image path that does not exist
    "image_too_small",  # a side below DataConfig.min_image_side
    "image_too_large",  # more pixels than DataConfig.max_image_pixels
    "empty_text",  # an empty caption, instruction, answer or text (or one that tokenizes to nothing)
    "bad_record",  # a JSONL line that is not a JSON object, a caption field that is not JSON
    "missing_field",  # a required field/column is absent or None
    "unknown_field",  # a field value or conversation role the reader does not know
    "image_placeholder_mismatch",  # <image> placeholders and images differ in number
    "video_unsupported",  # a video record (upstream samples frames; not supported here)
    "no_loss",  # nothing in the sample carries a loss
    "too_many_tokens",  # over DataConfig.max_num_tokens_per_sample (dropped)
    "truncated",  # over it and truncated (counted, still used)
)


class SkipSample(Exception):
    """A sample that must be skipped; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def open_image(source: bytes | str | os.PathLike, *, min_side: int, max_pixels: int) -> Any:
    """Decode ``source`` (image bytes or a file path) to an RGB ``PIL.Image``.

    Raises :class:`SkipSample` with "missing_file", "corrupt_image", "image_too_small" (a side below
    ``min_side``) or "image_too_large" (more than ``max_pixels`` pixels, checked before decoding)."""
    from PIL import Image

    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise SkipSample("missing_file", os.fspath(source))
        fp: Any = os.fspath(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise SkipSample("corrupt_image", "empty image bytes")
        fp = io.BytesIO(bytes(source))
    else:
        raise SkipSample("unknown_field", f"an image must be bytes or a path, got {type(source).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
            w, h = img.size
            if w * h > max_pixels:
                raise SkipSample("image_too_large", f"{w}x{h} > {max_pixels} pixels")
            if min(w, h) < min_side:
                raise SkipSample("image_too_small", f"{w}x{h}, a side below {min_side}")
            img.load()
    except SkipSample:
        raise
    except Image.DecompressionBombError as e:
        raise SkipSample("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    return _to_rgb(img)


def _to_rgb(img: Any) -> Any:
    from PIL import Image

    if img.mode == "F":
        # PIL's convert clips floats to 0..255, so an image in [0, 1] would come out black
        raise SkipSample("corrupt_image", "a floating-point image (mode F) has no defined pixel range")
    if img.mode == "I" or img.mode.startswith("I;16"):
        # 16-bit samples (PNG/TIFF; PIL reads them as I;16 or I): PIL's convert clips them to 0..255,
        # which turns almost every pixel white, so scale 0..65535 to 0..255 instead
        arr = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return img.convert("RGB")


def _round_to(value: float, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def target_size(
    width: int, height: int, args: ImageTransformArgs, *, img_num: int = 1, max_side: int | None = None
) -> tuple[int, int]:
    """``(new_width, new_height)``, multiples of ``args.image_stride``, for a ``width x height`` image.

    Upstream's rule, then ``max_side`` (a multiple of the stride) caps the long side."""
    for name, v in (("width", width), ("height", height), ("img_num", img_num)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"target_size: {name} must be a positive int, got {v!r}")
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
        raise ValueError(f"target_size: max_side must be a positive int or None, got {max_side!r}")
    s = args.image_stride
    max_size = args.max_image_size if max_side is None else min(args.max_image_size, max_side)
    if max_size < s:
        raise ValueError(f"the largest side allowed ({max_size}) is below the stride {s}")

    def scaled(w: float, h: float, scale: float) -> tuple[int, int]:
        return _round_to(round(w * scale), s), _round_to(round(h * scale), s)

    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, args.min_image_size / min(width, height))
    w, h = scaled(width, height, scale)
    budget = args.max_pixels / img_num
    if w * h > budget:
        # upstream multiplies the sides by the area ratio itself, which shrinks such images far below
        # the budget (a 400x400 image with a 128x128 budget becomes 48x48); the sides scale by its root
        w, h = scaled(w, h, math.sqrt(budget / (w * h)))
    if max(w, h) > max_size:
        w, h = scaled(w, h, max_size / max(w, h))
    # rounding may still leave the long side one stride over the cap; clamp it (never below one stride)
    cap = max(s, (max_size // s) * s)
    return min(w, cap), min(h, cap)


def pil_to_tensor(img: Any) -> torch.Tensor:
    """An RGB ``PIL.Image`` -> float32 ``[3, H, W]`` in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return x.div_(127.5).sub_(1.0)


class ImageTransform:
    """Resize to :func:`target_size` and convert to ``[3, H, W]`` in [-1, 1].

    ``max_side``: the model's cap on the long side in pixels (rounded down to a stride multiple)."""

    def __init__(self, args: ImageTransformArgs, *, max_side: int | None = None):
        self.args = args
        self.stride = args.image_stride
        self.max_side = max_side

    def __call__(self, img: Any, img_num: int = 1) -> torch.Tensor:
        from PIL import Image

        w, h = target_size(img.width, img.height, self.args, img_num=img_num, max_side=self.max_side)
        if (w, h) != img.size:
            img = img.resize((w, h), resample=Image.BICUBIC, reducing_gap=None)
        return pil_to_tensor(img)

    def num_tokens(self, width: int, height: int, img_num: int = 1) -> int:
        w, h = target_size(width, height, self.args, img_num=img_num, max_side=self.max_side)
        return (w // self.stride) * (h // self.stride)

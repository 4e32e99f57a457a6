"""Images in and out of the sampler: PIL or tensors to ``[3, H, W]`` in [-1, 1], resizing to the sizes the
ViT and the VAE take (upstream's ``MaxLongEdgeMinShortEdgeResize`` rule), and back to PIL."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["to_tensor", "to_pil", "fit_size", "resize"]


def to_tensor(image: Any) -> torch.Tensor:
    """A PIL image (any mode; converted to RGB) or a ``[3, H, W]`` float tensor in [-1, 1] -> fp32
    ``[3, H, W]`` in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(
                f"an image tensor must be a float [3, H, W] in [-1, 1], got {image.dtype} {list(image.shape)}"
            )
        return image.float()
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is in the data extra
        raise ImportError("PIL images need pillow: pip install 'bagel-kernels[data]'") from exc
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image or a [3, H, W] tensor, got {type(image).__name__}")
    import numpy as np

    arr = np.asarray(image.convert("RGB"), dtype=np.float32)  # [H, W, 3] in 0..255
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def to_pil(image: torch.Tensor):
    """``[3, H, W]`` in [-1, 1] (clamped) -> an RGB PIL image."""
    from PIL import Image

    x = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def fit_size(height: int, width: int, max_side: int, min_side: int, stride: int) -> tuple[int, int]:
    """``(H, W)`` multiples of ``stride``: the image scaled down so that its long side is at most
    ``max_side``, up so that its short side is at least ``min_side``, never beyond ``max_side``."""
    if min(height, width) <= 0:
        raise ValueError(f"image size {height}x{width} is empty")
    scale = min(max_side / max(height, width), 1.0)
    scale = max(scale, min_side / min(height, width))
    scale = min(scale, max_side / max(height, width))

    def side(n: int) -> int:
        return max(stride, min(int(round(n * scale / stride)) * stride, max_side // stride * stride))

    return side(height), side(width)


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[3, H, W]`` -> ``[3, *size]`` (bicubic with antialiasing; the same tensor when the size holds)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
    return out.clamp(-1, 1)

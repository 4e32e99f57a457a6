"""bagel-kernels: packed varlen attention and MoT routing kernels for training BAGEL."""

from . import linear_cross_entropy, mot  # noqa: E402  (op modules: import no Triton until a kernel runs)
from .attention import BACKENDS, available_backends, packed_attention
from .mask import ATTN_MODES, BlockTables, PackedMask

__all__ = [
    "ATTN_MODES",
    "BACKENDS",
    "BlockTables",
    "PackedMask",
    "available_backends",
    "packed_attention",
    "linear_cross_entropy",
    "mot",
    "fused_patch_embed",
]
__version__ = "0.1.0"


def __getattr__(name):  # lazy: the patch-embedding module loads its compiled extension on first use
    if name == "fused_patch_embed":
        from .patch_embed import fused_patch_embed

        return fused_patch_embed
    raise AttributeError(f"module 'bagel_kernels' has no attribute {name!r}")

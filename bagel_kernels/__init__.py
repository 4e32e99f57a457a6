"""bagel-kernels: packed varlen attention and MoT routing kernels for training BAGEL."""

from .mask import ATTN_MODES, BlockTables, PackedMask
from .attention import BACKENDS, available_backends, packed_attention

__all__ = ["ATTN_MODES", "BACKENDS", "BlockTables", "PackedMask", "available_backends", "packed_attention"]
__version__ = "0.1.0"

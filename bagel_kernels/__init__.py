"""bagel-kernels: packed varlen attention and MoT routing kernels for training BAGEL.

Names are imported on first use (PEP 562): ``import bagel_kernels.backends`` (the backend names and the
interpreter switch) imports no torch, so that a command line can refuse a bad argument at once.
"""

import importlib

# public name -> the module that defines it (a module name maps to itself)
_EXPORTS = {
    "ATTN_MODES": ".mask",
    "BlockTables": ".mask",
    "PackedMask": ".mask",
    "BACKENDS": ".attention",
    "available_backends": ".attention",
    "packed_attention": ".attention",
    "fused_patch_embed": ".patch_embed",  # loads its compiled extension on first use
    "linear_cross_entropy": ".linear_cross_entropy",
    "mot": ".mot",
    "checks": ".checks",
    "backends": ".backends",
}

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
    "checks",
    "backends",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bagel_kernels' has no attribute {name!r}")
    mod = importlib.import_module(module, __name__)
    value = mod if module == f".{name}" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

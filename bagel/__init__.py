"""bagel: the BAGEL model layer (config, Qwen2 MoT LM, SigLIP-NaViT, flow-matching head, packing,
checkpoint I/O) running on the kernels of :mod:`bagel_kernels`."""

from typing import TYPE_CHECKING

# Names are imported on first use (PEP 562), so that `import bagel.packing` or a command-line entry
# point (`bagel-demo --help`, a usage error) does not pay for transformers and the model's modules.
_EXPORTS = {
    "BagelBackendConfig": ".backend",
    "LoadReport": ".checkpoint",
    "BagelConfig": ".config",
    "BagelForUnifiedMultimodal": ".modeling",
    "BagelModel": ".modeling",
    "PackInputs": ".prepare",
    "PreparedPack": ".prepare",
    "EditSample": ".packing",
    "Sample": ".packing",
    "SpecialTokens": ".packing",
    "T2ISample": ".packing",
    "Text": ".packing",
    "TextSample": ".packing",
    "UnderstandingSample": ".packing",
    "VaeImage": ".packing",
    "VitImage": ".packing",
    "pack_samples": ".packing",
    "synthetic_sample": ".packing",
    "synthetic_samples": ".packing",
    "Qwen2ForCausalLM": ".qwen2",
    "Qwen2Model": ".qwen2",
    "Qwen2ForCausalLMReference": ".qwen2_reference",
    "SiglipVisionModel": ".siglip",
}


_SUBMODULES = {
    "backend", "checkpoint", "cli", "config", "demo", "distributed", "embeddings", "fusion", "modeling",
    "packing", "prepare", "qwen2", "qwen2_reference", "siglip", "validation",
}  # fmt: skip


def __getattr__(name: str):
    import importlib

    if name in _SUBMODULES:  # `import bagel; bagel.checkpoint...` keeps working
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bagel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from .backend import BagelBackendConfig
    from .checkpoint import LoadReport
    from .config import BagelConfig
    from .modeling import BagelForUnifiedMultimodal, BagelModel
    from .packing import (
        EditSample,
        Sample,
        SpecialTokens,
        T2ISample,
        Text,
        TextSample,
        UnderstandingSample,
        VaeImage,
        VitImage,
        pack_samples,
        synthetic_sample,
        synthetic_samples,
    )
    from .prepare import PackInputs, PreparedPack
    from .qwen2 import Qwen2ForCausalLM, Qwen2Model
    from .qwen2_reference import Qwen2ForCausalLMReference
    from .siglip import SiglipVisionModel

__all__ = [
    "BagelBackendConfig",
    "BagelConfig",
    "BagelModel",
    "BagelForUnifiedMultimodal",
    "PackInputs",
    "PreparedPack",
    "LoadReport",
    "Qwen2ForCausalLM",
    "Qwen2Model",
    "Qwen2ForCausalLMReference",
    "SiglipVisionModel",
    "SpecialTokens",
    "Text",
    "VitImage",
    "VaeImage",
    "Sample",
    "TextSample",
    "UnderstandingSample",
    "T2ISample",
    "EditSample",
    "pack_samples",
    "synthetic_sample",
    "synthetic_samples",
]

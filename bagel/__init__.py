"""bagel: the BAGEL model layer (config, Qwen2 MoT LM, SigLIP-NaViT, flow-matching head, packing,
checkpoint I/O) running on the kernels of :mod:`bagel_kernels`."""

from .backend import BagelBackendConfig
from .checkpoint import LoadReport
from .config import BagelConfig
from .modeling import BagelForUnifiedMultimodal, BagelModel, PreparedPack
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
from .qwen2 import Qwen2ForCausalLM, Qwen2Model
from .qwen2_reference import Qwen2ForCausalLMReference
from .siglip import SiglipVisionModel

__all__ = [
    "BagelBackendConfig",
    "BagelConfig",
    "BagelModel",
    "BagelForUnifiedMultimodal",
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

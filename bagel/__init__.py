"""bagel: the BAGEL model layer (config, Qwen2 MoT LM, SigLIP-NaViT, flow-matching head, packing,
checkpoint I/O) running on the kernels of :mod:`bagel_kernels`."""

# Names are imported on first use (PEP 562), so that `import bagel.data.packing` or a command-line entry
# point (`bagel-demo --help`, a usage error) does not pay for transformers and the model's modules.
_EXPORTS = {
    "BagelBackendConfig": ".model.backend",
    "LoadReport": ".io.checkpoint",
    "BagelConfig": ".model.config",
    "BagelForUnifiedMultimodal": ".model.modeling",
    "BagelModel": ".model.modeling",
    "PackInputs": ".model.prepare",
    "PreparedPack": ".model.prepare",
    "EditSample": ".data.packing",
    "Sample": ".data.packing",
    "SpecialTokens": ".data.packing",
    "T2ISample": ".data.packing",
    "Text": ".data.packing",
    "TextSample": ".data.packing",
    "UnderstandingSample": ".data.packing",
    "VaeImage": ".data.packing",
    "VitImage": ".data.packing",
    "pack_samples": ".data.packing",
    "synthetic_sample": ".data.packing",
    "synthetic_samples": ".data.packing",
    "Qwen2ForCausalLM": ".model.qwen2",
    "Qwen2Model": ".model.qwen2",
    "Qwen2ForCausalLMReference": ".model.qwen2_reference",
    "SiglipVisionModel": ".model.siglip",
}


# the rooms, lowest first: io and model never import data, train, generate or cli
_SUBMODULES = {"extras", "io", "model", "data", "vae", "train", "generate", "cli"}


def __getattr__(name: str):
    import importlib

    if name in _SUBMODULES:  # `import bagel; bagel.io.checkpoint...` keeps working
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bagel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


# the public names, in one place: the lazy table above
__all__ = list(_EXPORTS)

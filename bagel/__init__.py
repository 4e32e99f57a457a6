"""bagel: the BAGEL model layer (config, Qwen2 MoT LM, SigLIP-NaViT, flow-matching head, packing,
checkpoint I/O) running on the kernels of :mod:`bagel_kernels`."""

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


# the public names, in one place: the lazy table above
__all__ = list(_EXPORTS)

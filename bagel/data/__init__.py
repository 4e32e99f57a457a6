"""Data: samples and packing into the forward's inputs (:mod:`bagel.data.packing`), the typed data
config and upstream's dataset-group YAML (:mod:`bagel.data.config`), tokenizers
(:mod:`bagel.data.tokenizer`), image transforms (:mod:`bagel.data.transforms`), readers of upstream's
formats (:mod:`bagel.data.readers`), the streaming packer and loader with its state
(:mod:`bagel.data.loader`), built-in example data (:mod:`bagel.data.example`) and the folder converter
(:mod:`bagel.data.convert`).

Modules that need the ``data`` extra (pyarrow, pyyaml, pillow) import them when used."""

from bagel.data.config import DataConfig, GroupSpec, ImageTransformArgs, load_groups
from bagel.data.loader import PackLoader, RawPack, build_loader, encode_vae_images
from bagel.data.packing import (
    DroppedImage,
    SpecialTokens,
    Text,
    VaeImage,
    VitImage,
    pack_samples,
    sample_num_tokens,
)
from bagel.data.tokenizer import add_special_tokens, load_tokenizer, tiny_tokenizer
from bagel.data.transforms import SKIP_REASONS, SkipSample

__all__ = [
    "DataConfig",
    "GroupSpec",
    "ImageTransformArgs",
    "load_groups",
    "PackLoader",
    "RawPack",
    "build_loader",
    "encode_vae_images",
    "DroppedImage",
    "SpecialTokens",
    "Text",
    "VaeImage",
    "VitImage",
    "pack_samples",
    "sample_num_tokens",
    "add_special_tokens",
    "load_tokenizer",
    "tiny_tokenizer",
    "SKIP_REASONS",
    "SkipSample",
]

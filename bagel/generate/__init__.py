"""Sampling from BAGEL: text-to-image and editing with the flow-matching Euler sampler and classifier-free
guidance, understanding (text generation), and the :class:`Generator` API behind ``bagel-generate``.

Modules: :mod:`~bagel.generate.context` (what the model has seen, as a KV cache),
:mod:`~bagel.generate.guidance` (the CFG formulas), :mod:`~bagel.generate.sampler` (timesteps and the
Euler loop), :mod:`~bagel.generate.text` (greedy / top-p decoding), :mod:`~bagel.generate.images` (PIL
and resizing), :mod:`~bagel.generate.generator` (the API). The language model's cache and cached steps
live in :mod:`bagel.model.inference`.
"""

from bagel.generate.context import Context, run_chunks
from bagel.generate.generator import (
    GEN_THINK_SYSTEM_PROMPT,
    VLM_THINK_SYSTEM_PROMPT,
    GeneratedImage,
    Generator,
)
from bagel.generate.guidance import RENORM_TYPES, apply_cfg
from bagel.generate.sampler import Branches, sample_latent_tokens, timestep_schedule, unpatchify_latent
from bagel.generate.text import generate_text, pick_token

__all__ = [
    "Branches",
    "Context",
    "GEN_THINK_SYSTEM_PROMPT",
    "GeneratedImage",
    "Generator",
    "RENORM_TYPES",
    "VLM_THINK_SYSTEM_PROMPT",
    "apply_cfg",
    "generate_text",
    "pick_token",
    "run_chunks",
    "sample_latent_tokens",
    "timestep_schedule",
    "unpatchify_latent",
]

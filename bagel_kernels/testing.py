"""Random BAGEL-like pack layouts for tests, checks and benchmarks.

A layout is ``(sample_lens, split_lens, attn_modes)``. Sample kinds follow BAGEL's data pipeline:

    und          text (causal) + ViT image (full, with its two bracket tokens) + answer text (causal)
    t2i          prompt text (causal) + noised VAE image (noise, with bracket tokens)
    edit         text + ViT image (full) + clean VAE image (full) + text + noised VAE image (noise)
    interleaved  alternating text and clean/noised images
    text         text only
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = [
    "PackLayout",
    "random_sample",
    "random_pack",
    "realistic_pack",
    "SAMPLE_KINDS",
    "TOLERANCES",
    "tolerance",
]

SAMPLE_KINDS = ("und", "t2i", "edit", "interleaved", "text")


@dataclass
class PackLayout:
    sample_lens: list[int]
    split_lens: list[int]
    attn_modes: list[str]
    sample_kinds: list[str]

    @property
    def total_len(self) -> int:
        return sum(self.sample_lens)

    def as_tuple(self) -> tuple[list[int], list[int], list[str]]:
        return self.sample_lens, self.split_lens, self.attn_modes


def random_sample(
    rng: random.Random, kind: str, text: tuple[int, int], image: tuple[int, int]
) -> list[tuple[int, str]]:
    """Splits ``[(length, mode)]`` of one sample of ``kind``; text/image give (min, max) lengths (images
    include their two bracket tokens)."""

    def t() -> int:
        return rng.randint(*text)

    def im() -> int:
        return rng.randint(*image)

    if kind == "und":
        return [(t(), "causal"), (im(), "full"), (t(), "causal")]
    if kind == "t2i":
        return [(t(), "causal"), (im(), "noise")]
    if kind == "edit":
        return [(t(), "causal"), (im(), "full"), (im(), "full"), (t(), "causal"), (im(), "noise")]
    if kind == "interleaved":
        out = []
        for _ in range(rng.randint(1, 3)):
            out.append((t(), "causal"))
            out.append((im(), rng.choice(["full", "noise"])))
        if rng.random() < 0.5:
            out.append((t(), "causal"))
        return out
    if kind == "text":
        return [(t(), "causal")]
    raise ValueError(f"unknown sample kind {kind!r}; choose from {SAMPLE_KINDS}")


def random_pack(
    rng: random.Random,
    num_samples: int,
    *,
    kinds: tuple[str, ...] = SAMPLE_KINDS,
    text: tuple[int, int] = (1, 12),
    image: tuple[int, int] = (1, 20),
    pad: int | None = None,
) -> PackLayout:
    """A pack of ``num_samples`` random samples; ``pad`` appends a trailing causal pad sample of that
    length (0 allowed), as flex-style packing does."""
    sample_lens, split_lens, modes, sk = [], [], [], []
    for _ in range(num_samples):
        kind = rng.choice(kinds)
        splits = random_sample(rng, kind, text, image)
        sample_lens.append(sum(n for n, _ in splits))
        split_lens += [n for n, _ in splits]
        modes += [m for _, m in splits]
        sk.append(kind)
    if pad is not None:
        sample_lens.append(pad)
        split_lens.append(pad)
        modes.append("causal")
        sk.append("pad")
    return PackLayout(sample_lens, split_lens, modes, sk)


def realistic_pack(total_tokens: int, seed: int = 0, *, pad_to: int | None = None) -> PackLayout:
    """A pack of about ``total_tokens`` tokens (never more) with BAGEL-7B-scale samples: understanding
    samples with ViT images of 700-4900 patches, text-to-image samples with 1024-4096 latents, edit
    samples; text of 16-512 tokens. ``pad_to`` appends a pad sample up to that many tokens."""
    rng = random.Random(seed)
    text = (16, 512)
    samples: list[tuple[str, list[tuple[int, str]]]] = []
    used = 0
    while True:
        kind = rng.choice(("und", "und", "t2i", "t2i", "edit"))
        if kind == "und":
            splits = [
                (rng.randint(*text), "causal"),
                (rng.randint(700, 4900) + 2, "full"),
                (rng.randint(*text), "causal"),
            ]
        elif kind == "t2i":
            splits = [(rng.randint(*text), "causal"), (rng.choice([1024, 1600, 2304, 4096]) + 2, "noise")]
        else:
            splits = [
                (rng.randint(16, 64), "causal"),
                (rng.randint(700, 2500) + 2, "full"),
                (rng.choice([1024, 1600, 2304]) + 2, "full"),
                (rng.randint(16, 128), "causal"),
                (rng.choice([1024, 1600, 2304]) + 2, "noise"),
            ]
        n = sum(s for s, _ in splits)
        if used + n > total_tokens:
            rest = total_tokens - used
            if rest > 0:  # fill the remainder with a text sample so the pack has the asked size
                samples.append(("text", [(rest, "causal")]))
                used += rest
            break
        samples.append((kind, splits))
        used += n
    layout = PackLayout(
        [sum(s for s, _ in sp) for _, sp in samples],
        [s for _, sp in samples for s, _ in sp],
        [m for _, sp in samples for _, m in sp],
        [k for k, _ in samples],
    )
    if pad_to is not None:
        if pad_to < used:
            raise ValueError(f"pad_to={pad_to} is below the pack's {used} tokens")
        layout.sample_lens.append(pad_to - used)
        layout.split_lens.append(pad_to - used)
        layout.attn_modes.append("causal")
        layout.sample_kinds.append("pad")
    return layout


# Tolerances against a float64 reference, one table per dtype and direction: (atol, rtol).
# fp32: accumulation-order noise of blocked online softmax (measured ~1e-6 on unit-variance inputs;
# gradients sum over up to thousands of keys, hence the larger bwd entry). fp16/bf16: a few ulps of
# the output dtype (fp16 eps 9.8e-4, bf16 eps 7.8e-3; the interpreter truncates fp32->bf16, so 2 ulps).
# "tf32": fp32 inputs on an Ampere+ GPU where tl.dot defaults to TF32 (10-bit mantissa).
import torch as _torch  # noqa: E402

TOLERANCES: dict[tuple[str, str], tuple[float, float]] = {
    ("float32", "fwd"): (1e-4, 1e-4),
    ("float32", "bwd"): (5e-4, 1e-3),
    ("float16", "fwd"): (5e-3, 5e-3),
    ("float16", "bwd"): (2e-2, 2e-2),
    ("bfloat16", "fwd"): (3e-2, 3e-2),
    ("bfloat16", "bwd"): (8e-2, 8e-2),
    ("tf32", "fwd"): (5e-3, 5e-3),
    ("tf32", "bwd"): (2e-2, 2e-2),
}


def tolerance(dtype: _torch.dtype | str, direction: str) -> tuple[float, float]:
    """``(atol, rtol)`` for ``dtype`` ("float32", torch.float16, ..., or "tf32") and "fwd"/"bwd"."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    return TOLERANCES[(name, direction)]

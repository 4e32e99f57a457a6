"""Tokenizers: the checkpoint's own Qwen2 tokenizer, read from local files only, with BAGEL's four
special tokens (:func:`load_tokenizer`), and :func:`tiny_tokenizer`, a small Qwen2-style byte-level BPE
built in code (no files, no network) for tests and the built-in example.

BAGEL brackets every text split with ``<|im_start|>`` ... ``<|im_end|>`` and every image with
``<|vision_start|>`` ... ``<|vision_end|>``. As upstream's ``add_special_tokens`` does, the tokens the
tokenizer lacks are added (the Qwen2.5 tokenizer of BAGEL-7B-MoT has all four: ids 151644, 151645,
151652, 151653); their ids become :class:`bagel.data.packing.SpecialTokens`. Text is encoded without
any special token of the tokenizer's own (``add_special_tokens=False``), as Qwen2's ``encode`` does.
"""

from __future__ import annotations

import os
from typing import Any

from bagel.data.packing import SpecialTokens

__all__ = ["BAGEL_SPECIAL_TOKENS", "add_special_tokens", "load_tokenizer", "tiny_tokenizer", "encode_text"]

# (SpecialTokens field, token string), in the order upstream adds them
BAGEL_SPECIAL_TOKENS = (
    ("bos", "<|im_start|>"),
    ("eos", "<|im_end|>"),
    ("start_of_image", "<|vision_start|>"),
    ("end_of_image", "<|vision_end|>"),
)


def add_special_tokens(tokenizer: Any) -> tuple[SpecialTokens, int]:
    """Add the BAGEL tokens ``tokenizer`` lacks (in place) and return their ids and how many were new.

    When tokens are new, the model's embedding must grow to ``len(tokenizer)`` (upstream resizes it)."""
    vocab = tokenizer.get_vocab()
    missing = [t for _, t in BAGEL_SPECIAL_TOKENS if t not in vocab]
    num_new = tokenizer.add_tokens(missing, special_tokens=True) if missing else 0
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in BAGEL_SPECIAL_TOKENS}
    return SpecialTokens(**ids), int(num_new)


def load_tokenizer(path: str | os.PathLike) -> tuple[Any, SpecialTokens]:
    """The tokenizer in the folder ``path`` (a BAGEL/Qwen2 checkpoint: ``tokenizer.json`` or
    ``vocab.json`` + ``merges.txt``), loaded with ``transformers`` from local files only, plus BAGEL's
    special-token ids. A missing folder or tokenizer is a FileNotFoundError naming the path."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be the tokenizer's folder, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"tokenizer path {path!r} is a file; give the checkpoint folder that holds it")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
    names = set(os.listdir(path))
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        raise FileNotFoundError(
            f"{path!r} holds no tokenizer (expected tokenizer.json, or vocab.json and merges.txt); "
            f"found: {sorted(names)[:12]}"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    special, _ = add_special_tokens(tokenizer)
    return tokenizer, special


_TINY_CORPUS = (
    "a photo of grace hopper in uniform",
    "the blue present pack on a white background",
    "the matplotlib logo",
    "a map of terrain and bathymetry",
    "describe the image",
    "what is in the picture",
    "flip the image horizontally",
    "turn the image upside down",
    "make the picture darker",
    "make it brighter and more colourful",
    "the top left part of the image",
    "the bottom right corner",
    "a small crop of the centre",
    "red green blue grey dark light",
    "the quick brown fox jumps over the lazy dog",
)


_MAX_MERGES = 4096  # far more than the corpus below can give; the BPE trainer allocates for all of them


def tiny_tokenizer(num_merges: int = 64) -> Any:
    """A small Qwen2-style tokenizer built in code: byte-level BPE (all 256 bytes, so any text encodes)
    with ``num_merges`` merges learnt from a fixed English corpus, then ``<|endoftext|>`` and BAGEL's
    four special tokens as the LAST four ids (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``,
    ``<|vision_end|>``), so that a model with ``vocab_size = len(tokenizer)`` and
    :meth:`SpecialTokens.for_config` agree. Deterministic; wrapped in transformers' Qwen2 tokenizer
    class (fast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers import Qwen2TokenizerFast as _Qwen2Fast
    except ImportError:  # pragma: no cover - older/newer transformers layouts
        _Qwen2Fast = PreTrainedTokenizerFast
    if isinstance(num_merges, bool) or not isinstance(num_merges, int) or not 0 <= num_merges <= _MAX_MERGES:
        # the trainer allocates for vocab_size up front: 10**12 aborted the process (Rust OOM)
        raise ValueError(f"num_merges must be an int in [0, {_MAX_MERGES}], got {num_merges!r}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + num_merges, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(list(_TINY_CORPUS) * 4, trainer)
    bpe.add_special_tokens(["<|endoftext|>"] + [t for _, t in BAGEL_SPECIAL_TOKENS])
    tok = _Qwen2Fast(
        tokenizer_object=bpe, unk_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    return tok


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """``text`` -> token ids, without the tokenizer's own special tokens (as Qwen2's ``encode``).

    Special-token strings inside the text (a caption that says ``<|im_end|>`` or ``<|vision_start|>``)
    are encoded as the plain characters they are, not as the control tokens: otherwise hostile data
    would put an end-of-text or an image bracket with no image in the middle of a text split
    (upstream's ``tokenizer.encode`` does turn them into the control tokens)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (JSON allows "\ud800"): the tokenizer's TypeError
        raise ValueError(f"text is not valid Unicode ({e.reason} at character {e.start})") from None
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

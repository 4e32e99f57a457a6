"""The Python API: :class:`Generator` draws images from text, edits images and answers questions about
them, with upstream BAGEL's argument names (``num_timesteps``, ``timestep_shift``, ``cfg_text_scale``,
``cfg_img_scale``, ``cfg_interval``, ``cfg_renorm_min``, ``cfg_renorm_type``) and defaults (those of
upstream's examples: text-to-image 4.0 / 1.0 / (0.4, 1.0) / "global", editing 4.0 / 2.0 / (0.0, 1.0) /
"text_channel", shift 3.0, 50 timesteps).

The contexts follow upstream's ``InterleaveInferencer``: for text-to-image the full context is the prompt,
the text-unconditional one is empty and the image-unconditional one is the prompt (the same context, run
once); for editing the full context is [the image through the VAE, the image through the ViT, the
instruction], the text-unconditional one the image alone and the image-unconditional one the instruction
alone. ``think=True`` puts upstream's planning system prompt first (in the full and image-unconditional
contexts), lets the model write its plan (greedy) and appends it to the full context before drawing.

A training runner can keep one Generator and call it every N steps::

    gen = Generator(model, vae, tokenizer)
    gen.save_samples(prompts, run_dir, step, num_timesteps=25)   # run_dir/samples/step00001000_00.png ...
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bagel.data.packing import SpecialTokens
from bagel.generate.context import Context
from bagel.generate.images import fit_size, resize, to_pil, to_tensor
from bagel.generate.sampler import Branches, sample_latent_tokens, unpatchify_latent
from bagel.generate.text import generate_text

__all__ = [
    "Generator",
    "GeneratedImage",
    "VLM_THINK_SYSTEM_PROMPT",
    "GEN_THINK_SYSTEM_PROMPT",
    "gathered_parameters",
]

# The system prompts BAGEL was trained with for its "think" mode (upstream's inferencer.py, verbatim:
# the model reacts to these exact words).
VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the "
    "answer. \nThe reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning "
    "process here </think> answer here"
)

GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \nThe "
    "planning process is enclosed within <think> </think> tags, i.e. <think> planning process here "
    "</think> image here"
)


@dataclass
class GeneratedImage:
    """A drawn image: ``image [3, H, W]`` as the VAE decodes it (nominally [-1, 1], not clamped),
    ``latent [C, h*p, w*p]`` (fp32, before decoding), and the model's plan when ``think=True``."""

    image: torch.Tensor
    latent: torch.Tensor
    thinking: str | None = None

    def to_pil(self):
        return to_pil(self.image)


@contextlib.contextmanager
def gathered_parameters(model: nn.Module):
    """For a model sharded with FSDP2 (:func:`bagel.train.distributed.apply_fsdp2`): every unit unsharded
    for the duration (the sampler calls submodules directly, outside FSDP2's forward hooks), resharded
    after. Unsharding is an all-gather: every rank must enter together. Any other model: nothing."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        FSDPModule = None
    units = [m for m in model.modules() if FSDPModule is not None and isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def _full_weights(method):
    """Run a public sampling method under :func:`gathered_parameters`, once for the outermost call
    (save_samples calls the others)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if getattr(self, "_gathering", False):
            return method(self, *args, **kwargs)
        self._gathering = True
        try:
            with gathered_parameters(self.model):
                return method(self, *args, **kwargs)
        finally:
            self._gathering = False

    return run


def _model_device(model: nn.Module) -> torch.device:
    for p in model.get_input_embeddings().parameters():
        return p.device
    return torch.device("cpu")


class Generator:
    """Sampling from a ``BagelForUnifiedMultimodal``.

    Args:
        model: the model (stage 2 to draw; stage 1 answers only). Put it in eval mode on its device.
        vae: a :class:`bagel.vae.FluxVAE` (or anything with ``encode(images, sample=False)`` and
            ``decode(latents)``); needed to draw and to edit.
        tokenizer: needed for prompts given as strings (``bagel.data.tokenizer.load_tokenizer``); prompts
            may also be lists of token ids.
        special_tokens: BAGEL's four special token ids (default: the ones ``load_tokenizer`` returns
            for a tokenizer that has them, else :meth:`SpecialTokens.for_config`).
        backend: the attention backend of the cached steps (:data:`bagel.model.inference.STEP_BACKENDS`).
        use_cache: False recomputes the whole context at every step (the reference path; slow).
    """

    def __init__(
        self,
        model: nn.Module,
        vae: Any = None,
        tokenizer: Any = None,
        *,
        special_tokens: SpecialTokens | None = None,
        backend: str = "auto",
        use_cache: bool = True,
    ):
        self.model = model
        self.vae = vae
        self.tokenizer = tokenizer
        if special_tokens is None and tokenizer is not None:
            from bagel.data.tokenizer import add_special_tokens

            special_tokens, _ = add_special_tokens(tokenizer)
        self.tokens = special_tokens if special_tokens is not None else SpecialTokens.for_config(model.config)
        vocab = model.config.text_config.vocab_size
        bad = {k: v for k, v in vars(self.tokens).items() if not 0 <= v < vocab}
        if bad:
            raise ValueError(f"special token ids {bad} lie outside the model's vocabulary of {vocab}")
        self.backend = backend
        self.use_cache = use_cache
        if vae is not None and model.config.visual_gen:
            z = getattr(getattr(vae, "config", None), "z_channels", None)
            if z is not None and z != model.config.latent_channels:
                raise ValueError(
                    f"the VAE has {z} latent channels but the model expects {model.config.latent_channels}"
                )

    # -------------------------------------------------------------- sizes
    @property
    def downsample(self) -> int:
        cfg = getattr(self.vae, "config", None)
        return int(getattr(cfg, "downsample_factor", 8))

    @property
    def image_stride(self) -> int:
        """Pixels per latent token along a side: VAE downsampling x latent patch size (16 for BAGEL)."""
        return self.downsample * self.model.config.latent_patch_size

    @property
    def max_image_side(self) -> int:
        """The largest side the model draws: min(1024, max_latent_size x image_stride)."""
        return min(1024, self.model.config.max_latent_size * self.image_stride)

    def _vit_size(self, height: int, width: int) -> tuple[int, int]:
        cfg = self.model.config
        if not cfg.visual_und:
            raise ValueError("the model has no ViT (visual_und=False): it cannot look at an image")
        p = cfg.vision_config.patch_size
        top = min(980, cfg.vit_max_num_patch_per_side * p)
        return fit_size(height, width, top, min(224, top // 2), p)

    def _vae_size(self, height: int, width: int) -> tuple[int, int]:
        top = self.max_image_side
        return fit_size(height, width, top, min(512, top // 2), self.image_stride)

    # -------------------------------------------------------------- building blocks
    def encode(self, text: str | Sequence[int]) -> list[int]:
        """Token ids of ``text`` (ids pass through)."""
        if isinstance(text, str):
            if self.tokenizer is None:
                raise ValueError(
                    "a text prompt needs a tokenizer (Generator(..., tokenizer=...)); or pass token ids"
                )
            from bagel.data.tokenizer import encode_text

            return encode_text(self.tokenizer, text)
        ids = [int(i) for i in text]
        vocab = self.model.config.text_config.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"token ids must lie in [0, {vocab})")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = [i for i in ids if i != self.tokens.eos]
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def context(self) -> Context:
        """An empty context with this generator's settings."""
        return Context(self.model, self.tokens, use_cache=self.use_cache, backend=self.backend)

    def _rng(self, seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
        if generator is not None:
            return generator
        if seed is None:
            return None
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        return torch.Generator().manual_seed(seed)

    def _check_draw(self) -> None:
        if not self.model.config.visual_gen:
            raise ValueError(
                "this checkpoint has no generation weights (stage 1, visual_gen=False): it cannot draw or edit"
            )
        if self.vae is None:
            raise ValueError("drawing needs the VAE: Generator(model, vae, tokenizer)")

    def _think(self, ctx: Context, max_think_tokens: int) -> tuple[list[int], str]:
        ids = generate_text(ctx, max_new_tokens=max_think_tokens)
        ids = [i for i in ids if i != self.tokens.eos]
        return ids, self.decode(ids)

    def _draw(self, branches: Branches, grid: tuple[int, int], thinking: str | None, **kw) -> GeneratedImage:
        tokens = sample_latent_tokens(self.model, branches, grid, **kw)
        latent = unpatchify_latent(tokens, grid, self.model.config.latent_patch_size)
        with torch.no_grad():
            image = self.vae.decode(latent[None])[0]
        return GeneratedImage(image=image, latent=latent, thinking=thinking)

    # -------------------------------------------------------------- public
    @_full_weights
    @torch.no_grad()
    def text_to_image(
        self,
        prompt: str | Sequence[int],
        *,
        height: int | None = None,
        width: int | None = None,
        num_timesteps: int = 50,
        timestep_shift: float = 3.0,
        cfg_text_scale: float = 4.0,
        cfg_img_scale: float = 1.0,
        cfg_interval: tuple[float, float] = (0.4, 1.0),
        cfg_renorm_min: float = 0.0,
        cfg_renorm_type: str = "global",
        think: bool = False,
        max_think_tokens: int = 1000,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        initial_noise: torch.Tensor | None = None,
        progress: Any = False,
    ) -> GeneratedImage:
        """Draw ``prompt``. ``height`` / ``width``: multiples of :attr:`image_stride` up to
        :attr:`max_image_side` (default: that maximum). ``initial_noise``: ``x`` at t = 1 (see
        :func:`bagel.generate.sampler.sample_latent_tokens`)."""
        self._check_draw()
        side = self.max_image_side
        H = side if height is None else height
        W = side if width is None else width
        s = self.image_stride
        for name, v in (("height", H), ("width", W)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % s or v > side:
                raise ValueError(f"{name}={v!r} must be a positive multiple of {s} up to {side}")
        ids = self.encode(prompt)
        base = self.context()
        if think:
            base.add_text(self.encode(GEN_THINK_SYSTEM_PROMPT))
        text_uncond = base.fork()
        cond = base.add_text(ids)
        img_uncond = cond
        thinking = None
        if think:
            img_uncond = cond.fork()
            plan, thinking = self._think(cond, max_think_tokens)
            cond.add_text(plan)
        branches = Branches(cond, text_uncond, img_uncond)
        return self._draw(
            branches,
            (H // s, W // s),
            thinking,
            num_timesteps=num_timesteps,
            timestep_shift=timestep_shift,
            cfg_text_scale=cfg_text_scale,
            cfg_img_scale=cfg_img_scale,
            cfg_interval=cfg_interval,
            cfg_renorm_min=cfg_renorm_min,
            cfg_renorm_type=cfg_renorm_type,
            initial_noise=initial_noise,
            generator=self._rng(seed, generator),
            progress=progress,
        )

    @_full_weights
    @torch.no_grad()
    def edit(
        self,
        image: Any,
        prompt: str | Sequence[int],
        *,
        num_timesteps: int = 50,
        timestep_shift: float = 3.0,
        cfg_text_scale: float = 4.0,
        cfg_img_scale: float = 2.0,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        cfg_renorm_min: float = 0.0,
        cfg_renorm_type: str = "text_channel",
        think: bool = False,
        max_think_tokens: int = 1000,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        initial_noise: torch.Tensor | None = None,
        progress: Any = False,
    ) -> GeneratedImage:
        """Edit ``image`` (PIL, or ``[3, H, W]`` in [-1, 1]) as ``prompt`` says. The image is resized to
        multiples of :attr:`image_stride` (long side at most :attr:`max_image_side`), encoded with the
        VAE's posterior mean, and the result has that size."""
        self._check_draw()
        ids = self.encode(prompt)
        pixels = to_tensor(image)
        H, W = self._vae_size(*pixels.shape[-2:])
        vae_px = resize(pixels, (H, W))
        device = _model_device(self.model)
        latent = self.vae.encode(vae_px[None].to(device), sample=False)[0].float()
        vit_px = resize(vae_px, self._vit_size(H, W))
        base = self.context()
        if think:
            base.add_text(self.encode(GEN_THINK_SYSTEM_PROMPT))
        img_uncond = base.fork().add_text(ids)
        cond = base.add_inputs([("vae", latent), ("vit", vit_px)])  # one prefill forward
        text_uncond = cond.fork()
        cond.add_text(ids)
        thinking = None
        if think:
            plan, thinking = self._think(cond, max_think_tokens)
            cond.add_text(plan)
        s = self.image_stride
        return self._draw(
            Branches(cond, text_uncond, img_uncond),
            (H // s, W // s),
            thinking,
            num_timesteps=num_timesteps,
            timestep_shift=timestep_shift,
            cfg_text_scale=cfg_text_scale,
            cfg_img_scale=cfg_img_scale,
            cfg_interval=cfg_interval,
            cfg_renorm_min=cfg_renorm_min,
            cfg_renorm_type=cfg_renorm_type,
            initial_noise=initial_noise,
            generator=self._rng(seed, generator),
            progress=progress,
        )

    @torch.no_grad()
    def answer(
        self,
        image: Any,
        question: str | Sequence[int],
        *,
        max_new_tokens: int = 512,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        think: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> str:
        """Answer ``question`` about ``image`` (None: a text-only question): greedy by default, or
        sampled with ``temperature`` / ``top_p``; stops at the end token or after ``max_new_tokens``."""
        return self.decode(
            self.answer_ids(
                image,
                question,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_p=top_p,
                think=think,
                seed=seed,
                generator=generator,
            )
        )

    @_full_weights
    @torch.no_grad()
    def answer_ids(
        self,
        image: Any,
        question: str | Sequence[int],
        *,
        max_new_tokens: int = 512,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        think: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[int]:
        """:meth:`answer` as token ids (the end token included when generated)."""
        ids = self.encode(question)
        ctx = self.context()
        if think:
            ctx.add_text(self.encode(VLM_THINK_SYSTEM_PROMPT))
        if image is not None:
            pixels = to_tensor(image)
            ctx.add_vit_image(resize(pixels, self._vit_size(*pixels.shape[-2:])))
        ctx.add_text(ids)
        return generate_text(
            ctx,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            generator=self._rng(seed, generator),
        )

    @_full_weights
    def save_samples(
        self,
        prompts: Sequence[Any],
        folder: str | os.PathLike,
        step: int,
        *,
        seed: int = 0,
        **kwargs: Any,
    ) -> list[str]:
        """Draw a fixed prompt set, for a training runner every N steps: each item is a prompt (text to
        image) or an ``(image, instruction)`` pair (an edit); item ``i`` is drawn with ``seed + i`` (the
        same noise at every step, so that the images show what training changed). Writes
        ``folder/samples/step{step:08d}_{i:02d}.png`` (temporary name, then renamed) and appends one JSON
        line per image to ``folder/samples.jsonl`` (step, index, prompt, file, seconds). The model is in
        eval mode while sampling and back in its previous mode after. Returns the files written.

        A model sharded with FSDP2: call it on every rank at the same step (the weights are gathered by
        an all-gather, :func:`gathered_parameters`); rank 0 draws and writes, the others return ``[]``.
        ``kwargs`` go to :meth:`text_to_image` / :meth:`edit` (``num_timesteps=25`` ...; an edit keeps its
        image's size and ignores ``height`` / ``width``)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_rank() != 0:
                return []  # the weights were gathered with the other ranks; rank 0 draws and writes
        out_dir = os.path.join(os.fspath(folder), "samples")
        os.makedirs(out_dir, exist_ok=True)
        was_training = self.model.training
        self.model.eval()
        files = []
        try:
            for i, item in enumerate(prompts):
                start = time.perf_counter()
                if isinstance(item, tuple):
                    image, prompt = item
                    edit_kw = {k: v for k, v in kwargs.items() if k not in ("height", "width")}
                    result = self.edit(image, prompt, seed=seed + i, **edit_kw)
                else:
                    prompt = item
                    result = self.text_to_image(prompt, seed=seed + i, **kwargs)
                name = os.path.join(out_dir, f"step{int(step):08d}_{i:02d}.png")
                tmp = name + f".tmp-{os.getpid()}.png"
                result.to_pil().save(tmp)
                os.replace(tmp, name)
                files.append(name)
                record = dict(
                    step=int(step),
                    index=i,
                    prompt=prompt if isinstance(prompt, str) else list(prompt),
                    file=os.path.relpath(name, os.fspath(folder)),
                    seconds=round(time.perf_counter() - start, 3),
                )
                if result.thinking is not None:
                    record["thinking"] = result.thinking
                with open(os.path.join(os.fspath(folder), "samples.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
        finally:
            self.model.train(was_training)
        return files

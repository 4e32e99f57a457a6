"""The flow-matching Euler sampler with BAGEL's timestep shift and classifier-free guidance.

Training (``BagelForUnifiedMultimodal.forward``) noises a clean latent ``x_0`` as
``x_t = (1 - t) x_0 + t eps`` and regresses ``llm2vae(h)`` on the velocity ``dx_t/dt = eps - x_0``. The
sampler integrates that ODE backwards from pure noise (t = 1) to the image (t = 0):

    t_k   = s u_k / (1 + (s - 1) u_k),  u = linspace(1, 0, num_timesteps)   (s = timestep_shift)
    x_{k+1} = x_k - v(x_k, t_k) (t_k - t_{k+1})                              k = 0 .. num_timesteps - 2

so ``num_timesteps - 1`` model evaluations, as upstream's ``generate_image``. ``v`` at time ``t`` is the
guided velocity (:func:`bagel.generate.guidance.apply_cfg`) of the latent tokens, a ``noise`` split at the
context's next RoPE position whose tokens embed as ``vae2llm(x_t) + time_embedder(t) + latent_pos_embed``,
run by the generation expert and attending to the whole cached context and to the image itself.

The guidance branches (full context, context without the text, context without the image) run as ONE
batched forward per step (:func:`bagel.generate.context.run_chunks`): their latent tokens are the same
embeddings at each context's own position. A branch whose scale is off at time ``t`` is not run, and
a branch that is the same context as another is run once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bagel.generate.context import Context, latent_chunk, run_chunks
from bagel.generate.guidance import apply_cfg, cfg_scales_at, check_cfg_args
from bagel.model.inference import Chunk

__all__ = ["Branches", "timestep_schedule", "sample_latent_tokens", "unpatchify_latent", "check_steps"]


@dataclass
class Branches:
    """The guidance contexts of one image: ``cond`` (everything), ``text_uncond`` (without the prompt
    text; used when ``cfg_text_scale > 1``) and ``img_uncond`` (without the input image; used when also
    ``cfg_img_scale > 1``). The same object may serve two roles (then it runs once)."""

    cond: Context
    text_uncond: Context | None = None
    img_uncond: Context | None = None


def check_steps(num_timesteps: int, timestep_shift: float) -> None:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(
            f"num_timesteps must be an int >= 2 (num_timesteps - 1 steps), got {num_timesteps!r}"
        )
    if (
        isinstance(timestep_shift, bool)
        or not isinstance(timestep_shift, (int, float))
        or not timestep_shift > 0
    ):
        raise ValueError(f"timestep_shift must be a positive number, got {timestep_shift!r}")


def timestep_schedule(num_timesteps: int, timestep_shift: float) -> torch.Tensor:
    """``[num_timesteps]`` fp32 times from 1 to 0 with BAGEL's shift ``s t / (1 + (s - 1) t)``."""
    check_steps(num_timesteps, timestep_shift)
    u = torch.linspace(1.0, 0.0, num_timesteps, dtype=torch.float64)
    s = float(timestep_shift)
    return (s * u / (1 + (s - 1) * u)).float()


def unpatchify_latent(tokens: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """``[h*w, p*p*C]`` latent tokens -> ``[C, h*p, w*p]`` (the inverse of BAGEL's patchify)."""
    h, w = grid
    C = tokens.shape[1] // (patch * patch)
    x = tokens.reshape(h, w, patch, patch, C)
    return torch.einsum("hwpqc->chpwq", x).reshape(C, h * patch, w * patch)


def _velocity(model, contexts: list[Context], x: torch.Tensor, grid, t: float) -> list[torch.Tensor]:
    """The conditional velocity ``[V, P]`` (fp32) of ``x`` at time ``t`` after each context, one forward."""
    first = latent_chunk(model, contexts[0].tokens, x, grid, t, contexts[0].next_position, "noise")
    chunks = [first] + [
        Chunk(
            first.embeds,
            torch.full_like(first.positions, c.next_position),
            first.gen,
            first.split_lens,
            first.attn_modes,
        )
        for c in contexts[1:]
    ]
    hidden = run_chunks(contexts, chunks, update=False)  # [B * (V + 2), H]
    n = len(first)
    rows = hidden.view(len(contexts), n, -1)[:, 1:-1]  # the latent tokens, brackets dropped
    v = model.model.llm2vae(rows.reshape(-1, rows.shape[-1])).float()
    return list(v.view(len(contexts), n - 2, -1))


@torch.no_grad()
def sample_latent_tokens(
    model,
    branches: Branches,
    grid: tuple[int, int],
    *,
    num_timesteps: int = 50,
    timestep_shift: float = 3.0,
    cfg_text_scale: float = 1.0,
    cfg_img_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    cfg_renorm_min: float = 0.0,
    cfg_renorm_type: str = "global",
    initial_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool | Callable[[int, int], None] = False,
) -> torch.Tensor:
    """Draw one image's latent tokens ``[h*w, p*p*C]`` (fp32) on the model's device.

    Args:
        model: a stage-2 ``BagelForUnifiedMultimodal``.
        branches: the guidance contexts.
        cfg_*: see :mod:`bagel.generate.guidance` (defaults here: no guidance; the :class:`Generator`
            has upstream's defaults per task).
        grid: ``(h, w)`` latent tokens per side (pixels / (8 * latent_patch_size)).
        initial_noise: ``x`` at t = 1, ``[h*w, p*p*C]`` tokens (upstream's ``packed_init_noises``) or a
            ``[C, h*p, w*p]`` latent; default ``randn`` from ``generator`` (on the CPU, so a seed gives the
            same noise on every device).
        progress: True for a tqdm bar, or a callable ``(step, total)``.
    """
    if not model.config.visual_gen:
        raise ValueError(
            "this model has no generation weights (stage 1, visual_gen=False): it cannot draw; "
            "load a stage-2 checkpoint with stage=2"
        )
    check_steps(num_timesteps, timestep_shift)
    interval = check_cfg_args(cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_min, cfg_renorm_type)
    cfg = model.config
    p, C = cfg.latent_patch_size, cfg.latent_channels
    h, w = grid
    if not (0 < h <= cfg.max_latent_size and 0 < w <= cfg.max_latent_size):
        raise ValueError(
            f"latent grid {grid} must be within 1..max_latent_size={cfg.max_latent_size} per side"
        )
    V, P = h * w, p * p * C
    device = next(iter(model.get_input_embeddings().parameters())).device
    if initial_noise is None:
        x = torch.randn(V, P, generator=generator, dtype=torch.float32)
    else:
        x = initial_noise
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError("initial_noise must be a floating tensor")
        if x.shape == (C, h * p, w * p):
            from bagel.data.packing import patchify

            x = patchify(x, p)
        if x.shape != (V, P):
            raise ValueError(
                f"initial_noise must be [{V}, {P}] latent tokens or a [{C}, {h * p}, {w * p}] latent, got {list(x.shape)}"
            )
    x = x.to(device=device, dtype=torch.float32)

    times = timestep_schedule(num_timesteps, timestep_shift).tolist()
    total = num_timesteps - 1
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="sampling", unit="step")
    for k in range(total):
        t, dt = times[k], times[k] - times[k + 1]
        s_text, s_img = cfg_scales_at(t, cfg_text_scale, cfg_img_scale, interval)
        roles = {"cond": branches.cond}
        if s_text > 1.0:
            if branches.text_uncond is None:
                raise ValueError("cfg_text_scale > 1 needs a text-unconditional context")
            roles["text"] = branches.text_uncond
            if s_img > 1.0:
                if branches.img_uncond is None:
                    raise ValueError("cfg_img_scale > 1 needs an image-unconditional context")
                roles["img"] = branches.img_uncond
        distinct: list[Context] = []
        for c in roles.values():
            if all(c is not d for d in distinct):
                distinct.append(c)
        vs = _velocity(model, distinct, x, grid, t)
        by_role = {r: vs[next(i for i, d in enumerate(distinct) if d is c)] for r, c in roles.items()}
        v = apply_cfg(
            by_role["cond"],
            by_role.get("text"),
            by_role.get("img"),
            s_text,
            s_img,
            cfg_renorm_min,
            cfg_renorm_type,
        )
        x = x - v * dt
        if bar is not None:
            bar.update(1)
        elif callable(progress):
            progress(k + 1, total)
    if bar is not None:
        bar.close()
    return x

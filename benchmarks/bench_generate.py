"""Sampling speed: seconds per image (text-to-image, editing) and per answer token, the cached path against
recomputing the context every step, and the step attention backends.

    python benchmarks/bench_generate.py [--out DIR] [--layers N] [--timesteps T] [--quick] [--tiny]

Model: BAGEL-7B-MoT shapes (``BagelConfig.bagel_7b_mot``, random weights, bf16; ``--layers`` cuts the
language model's depth, default all 28) and the FLUX VAE (random weights) for the decode. Cases:

    t2i 1024 / 512   prompt of 32 tokens, a 64x64 (32x32) latent grid: 4096 (1024) generation tokens per
                     branch; branches: full prompt and empty context (cfg_text 4, cfg_img 1)
    edit 1024        context [VAE image 1024 px (4096 tokens), ViT image 980 px (4900 patches), 32-token
                     instruction]; three branches (cfg_text 4, cfg_img 2)
    answer           context [ViT image 980 px, 32-token question], greedy decoding

Rows: "prefill <backend>" (building the guidance contexts, ViT and VAE-image embedding included) and
"step <backend>" (one guided Euler step: every branch in one batched forward, median ms) for each backend of
:mod:`bagel.model.inference` ("sdpa", "packed" = our packed-attention kernel over [cache; chunk],
"flash" when flash-attn is installed) and "step recompute" (no cache: the whole context through the
training forward every step), "image" (a whole image: prefill + ``--timesteps - 1`` steps + VAE decode,
wall clock, one run), and "token cached" / "token recompute" (ms per generated answer token). Peak
memory is ``torch.cuda.max_memory_allocated`` over the row.

Without CUDA the script prints "needs CUDA" and exits 0; ``--tiny`` runs the same code on the CPU with the
tiny model (checks the script; its times mean nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from common import Table, device_info, run_script, sync, time_ms, use_checkout  # noqa: E402

use_checkout()

from bagel import BagelConfig, BagelForUnifiedMultimodal  # noqa: E402
from bagel.generate import Branches, Context, generate_text, sample_latent_tokens  # noqa: E402
from bagel.generate.sampler import unpatchify_latent  # noqa: E402
from bagel.model.inference import flash_attn_available  # noqa: E402
from bagel.vae import FluxVAE, FluxVAEConfig  # noqa: E402


def build(args, device, dtype):
    if args.tiny:
        cfg = BagelConfig.tiny(max_latent_size=8)
        vae_cfg = FluxVAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=cfg.latent_channels)
    else:
        cfg = BagelConfig.bagel_7b_mot(llm_layers=args.layers)
        vae_cfg = FluxVAEConfig()
    with torch.device("meta"):
        model = BagelForUnifiedMultimodal(cfg)
    model.to(dtype)  # on meta: materialised once, in bf16 (no fp32 copy of 14.6 B parameters)
    model.to_empty(device=device)
    model.initialize_weights()
    with torch.no_grad():  # llm2vae starts at zero: give the velocities a scale
        for p in model.model.llm2vae.parameters():
            p.normal_(0.0, 0.02)
    model.eval()
    vae = FluxVAE(vae_cfg, dtype=dtype, device=device).initialize_weights(0)
    return model, vae


def cases(args, cfg) -> list[dict]:
    if args.tiny:
        p = cfg.vision_config.patch_size * cfg.vit_max_num_patch_per_side
        return [
            dict(name="t2i tiny", task="t2i", grid=(8, 8)),
            dict(name="edit tiny", task="edit", grid=(8, 8), vit=(p, p)),
            dict(name="answer tiny", task="answer", vit=(p, p)),
        ]
    out = [dict(name="t2i 1024", task="t2i", grid=(64, 64))]
    if not args.quick:
        out.append(dict(name="t2i 512", task="t2i", grid=(32, 32)))
    out += [
        dict(name="edit 1024", task="edit", grid=(64, 64), vit=(980, 980)),
        dict(name="answer 980", task="answer", vit=(980, 980)),
    ]
    return out


def contexts(model, case, backend: str, use_cache: bool, device) -> Branches:
    """The guidance contexts of ``case`` (as :class:`bagel.generate.Generator` builds them)."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.text_config.vocab_size - 8
    text = torch.randint(0, vocab, (32,), generator=g).tolist()
    base = Context(model, use_cache=use_cache, backend=backend)
    if case["task"] == "t2i":
        text_uncond = base.fork()
        cond = base.add_text(text)
        return Branches(cond, text_uncond, cond)
    pixels = torch.rand(3, *case["vit"], generator=g) * 2 - 1
    if case["task"] == "answer":
        return Branches(base.add_vit_image(pixels).add_text(text))
    p = model.config.latent_patch_size
    h, w = case["grid"]
    latent = torch.randn(model.config.latent_channels, h * p, w * p, generator=g)
    img_uncond = base.fork().add_text(text)
    cond = base.add_vae_image(latent).add_vit_image(pixels)
    text_uncond = cond.fork()
    cond.add_text(text)
    return Branches(cond, text_uncond, img_uncond)


def guidance(case) -> dict:
    img = 2.0 if case["task"] == "edit" else 1.0
    return dict(cfg_text_scale=4.0, cfg_img_scale=img, cfg_interval=(0.0, 1.0), timestep_shift=3.0)


def _writer(out: str | None, table: Table):
    """Rewrites ``out/bench_generate.md`` whole after every row (temporary name, then renamed), so that
    a run cut off by a time limit keeps every row measured before the cut."""

    def write() -> None:
        if not out:
            return
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "bench_generate.md")
        with open(path + ".tmp", "w") as f:
            f.write(table.render())
        os.replace(path + ".tmp", path)

    return write


def run(args) -> str:
    if args.tiny:  # a check of the script: a few steps and tokens
        args.timesteps, args.tokens = min(args.timesteps, 3), min(args.tokens, 4)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    reps, warmup = (1, 0) if args.tiny else (2, 1) if args.quick else (5, 2)
    model, vae = build(args, device, dtype)
    table = Table(
        "bagel-generate: sampling speed", ["case", "row", "ms", "s per image / ms per token", "peak GiB"]
    )
    write = _writer(args.out, table)
    backends = ["sdpa", "packed"] + (["flash"] if flash_attn_available() and device.type == "cuda" else [])

    def peak_reset():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak() -> str:
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device.type == "cuda" else "-"

    def row(case, name, ms, derived=""):
        table.add([case["name"], name, f"{ms:.2f}", derived, peak()])
        write()

    def fail(case, name, exc):
        table.add([case["name"], name, "failed", f"{type(exc).__name__}: {exc}"[:120], "-"])
        write()

    for case in cases(args, model.config):
        for backend in backends:
            name = f"prefill {backend}"
            try:
                peak_reset()
                ms = time_ms(
                    lambda c=case, b=backend: contexts(model, c, b, True, device),
                    device,
                    reps,
                    warmup,
                    wall=True,
                )
                row(case, name, ms)
            except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
                fail(case, name, exc)
        if case["task"] == "answer":
            for use_cache, n in ((True, args.tokens), (False, min(args.tokens, 4))):
                name = "token cached" if use_cache else "token recompute"
                try:
                    ctx = contexts(model, case, "auto", use_cache, device).cond
                    peak_reset()
                    sync(device)
                    t0 = time.perf_counter()
                    out = generate_text(ctx, max_new_tokens=n)
                    sync(device)
                    ms = (time.perf_counter() - t0) * 1e3 / len(out)
                    row(case, name, ms, f"{ms:.2f} ms/token ({len(out)} tokens)")
                except Exception as exc:  # noqa: BLE001
                    fail(case, name, exc)
            continue
        kw = guidance(case)
        grid = case["grid"]
        for backend in [*backends, "recompute"]:
            name = f"step {backend}"
            try:
                branches = contexts(
                    model, case, "sdpa" if backend == "recompute" else backend, backend != "recompute", device
                )
                peak_reset()
                ms = time_ms(
                    lambda b=branches, g=grid, k=kw: sample_latent_tokens(model, b, g, num_timesteps=2, **k),
                    device,
                    reps,
                    warmup,
                    wall=True,
                )
                row(case, name, ms)
            except Exception as exc:  # noqa: BLE001
                fail(case, name, exc)
        try:
            peak_reset()
            sync(device)
            t0 = time.perf_counter()
            branches = contexts(model, case, "auto", True, device)
            tokens = sample_latent_tokens(model, branches, grid, num_timesteps=args.timesteps, **kw)
            latent = unpatchify_latent(tokens, grid, model.config.latent_patch_size)
            vae.decode(latent[None])
            sync(device)
            s = time.perf_counter() - t0
            row(case, f"image ({args.timesteps} timesteps)", s * 1e3, f"{s:.2f} s/image")
        except Exception as exc:  # noqa: BLE001
            fail(case, "image", exc)
    table.note(device_info(device))
    table.note(
        f"model: {'tiny' if args.tiny else f'BAGEL-7B-MoT shapes, {args.layers} LM layers'}, random weights, "
        f"{dtype}; step rows: median of {reps} wall-clock runs after {warmup} warm-up runs (sync after each)"
    )
    table.note(
        "step = one guided Euler step (all guidance branches in one forward); image = prefill + steps + VAE "
        "decode, one run, step backend 'auto'"
    )
    write()
    return table.render()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out", help="folder for bench_generate.md")
    ap.add_argument("--layers", type=int, default=28, help="language-model layers (BAGEL-7B-MoT: 28)")
    ap.add_argument("--timesteps", type=int, default=50, help="num_timesteps of the whole-image row")
    ap.add_argument("--tokens", type=int, default=64, help="answer tokens to generate")
    ap.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    ap.add_argument(
        "--tiny", action="store_true", help="tiny model on the CPU (checks the script; times mean nothing)"
    )
    return run_script(ap, run, "bench_generate", "BAGEL-7B-MoT sampling in bf16", argv)


if __name__ == "__main__":
    sys.exit(main())

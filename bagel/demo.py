"""``bagel-demo``: train a small BAGEL (random init, stage 2) on built-in packed mixed-modal data.

    bagel-demo [--steps 300] [--out bagel-demo-out] [--device cpu|cuda] [--attention auto|triton|flex|sdpa]
               [--mot auto|triton|torch] [--patch-embed auto|cuda|torch] [--tokens 512] [--seed 0]

The data are real images that matplotlib ships (its sample photographs and elevation maps), cropped at
random, described by short captions over a 32-word vocabulary (which image, which part, which colour,
how bright), and packed the way BAGEL's pipeline packs them (``bagel.packing``):

- understanding: the crop through the ViT, then "describe" and the caption (CE on the caption);
- text-to-image: the caption, then the crop's latent to generate (flow-matching MSE);
- edit: the crop (clean latent + ViT), an instruction (flip / darken / mirror), then the edited crop's
  latent to generate.

Latents come from a small fixed random encoder standing in for the VAE (average pooling by the
downsample factor, then a fixed random 1x1 projection to the latent channels). The model is the tiny
config of :meth:`bagel.BagelConfig.tiny`; backends are chosen automatically (fast kernels on a GPU,
reference paths on the CPU) unless overridden. Writes ``losses.csv`` and ``losses.png`` and prints a
final line with tokens/s.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import sys
import time

import numpy as np
import torch

WORDS = (
    # captions: image, region, colour, brightness
    "hopper",
    "pack",
    "logo",
    "terrain",
    "bathymetry",
    "top",
    "bottom",
    "left",
    "right",
    "centre",
    "red",
    "green",
    "blue",
    "grey",
    "dark",
    "light",
    # prompts and instructions
    "describe",
    "draw",
    "flip",
    "darken",
    "mirror",
    "a",
    "the",
    "image",
    "of",
    "part",
)


# ---------------------------------------------------------------------------------------------- data
def _load_images() -> dict[str, np.ndarray]:
    """RGB float arrays in [0, 1] from matplotlib's sample data (photographs and colour-mapped DEMs)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import cbook, colormaps
    from matplotlib import image as mpimg

    images = {}
    for name, fname in (
        ("hopper", "grace_hopper.jpg"),
        ("pack", "Minduka_Present_Blue_Pack.png"),
        ("logo", "logo2.png"),
    ):
        with cbook.get_sample_data(fname, asfileobj=True) as f:
            arr = mpimg.imread(f, format=fname.rsplit(".", 1)[1])
        arr = np.asarray(arr, dtype=np.float32)
        if arr.max() > 1.0:
            arr = arr / 255.0
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        images[name] = arr[..., :3]
    for name, fname, key, cmap in (
        ("terrain", "jacksboro_fault_dem.npz", "elevation", "gist_earth"),
        ("bathymetry", "topobathy.npz", "topo", "terrain"),
    ):
        data = np.load(cbook.get_sample_data(fname, asfileobj=False))
        z = np.asarray(data[key], dtype=np.float32)
        z = (z - z.min()) / max(float(z.max() - z.min()), 1e-6)
        images[name] = colormaps[cmap](z)[..., :3].astype(np.float32)
    return images


class DemoData:
    """Random crops of the sample images as understanding / text-to-image / edit samples."""

    def __init__(self, config, seed: int = 0, side_units: tuple[int, int] = (2, 4)):
        from bagel.packing import SpecialTokens

        self.config = config
        self.rng = random.Random(seed)
        self.images = {
            k: torch.from_numpy(v).permute(2, 0, 1).contiguous() for k, v in _load_images().items()
        }
        self.names = list(self.images)
        tok = SpecialTokens.for_config(config)
        if len(WORDS) >= min(tok.bos, tok.eos, tok.start_of_image, tok.end_of_image):
            raise ValueError(
                f"vocab_size={config.text_config.vocab_size} is too small for the demo's {len(WORDS)} words"
            )
        self.word = {w: i for i, w in enumerate(WORDS)}
        self.vit_patch = config.vision_config.patch_size
        self.lat_patch = config.latent_patch_size
        self.down = int(config.vae_config.get("downsample", 8)) if isinstance(config.vae_config, dict) else 8
        self.side_units = side_units  # crop sides, in multiples of the smallest side both towers accept
        # the stand-in VAE: fixed random 1x1 projection of pooled RGB to the latent channels
        g = torch.Generator().manual_seed(1234)
        self.vae_proj = torch.randn(config.latent_channels, 3, generator=g) / math.sqrt(3)
        self.unit = math.lcm(self.vit_patch, self.down * self.lat_patch)

    def ids(self, text: str) -> list[int]:
        return [self.word[w] for w in text.split()]

    def _crop(self):
        name = self.rng.choice(self.names)
        img = self.images[name]
        side = self.unit * self.rng.randint(*self.side_units)
        _, H, W = img.shape
        # a crop of a random region, resized to side x side
        frac = self.rng.uniform(0.3, 0.6)
        ch, cw = int(H * frac), int(W * frac)
        y, x = self.rng.randint(0, H - ch), self.rng.randint(0, W - cw)
        crop = img[:, y : y + ch, x : x + cw]
        crop = torch.nn.functional.interpolate(
            crop[None], size=(side, side), mode="bilinear", align_corners=False
        )[0]
        cy, cx = (y + ch / 2) / H, (x + cw / 2) / W
        if abs(cy - 0.5) < 0.12 and abs(cx - 0.5) < 0.12:
            region = "centre"
        elif abs(cy - 0.5) >= abs(cx - 0.5):
            region = "top" if cy < 0.5 else "bottom"
        else:
            region = "left" if cx < 0.5 else "right"
        mean = crop.mean(dim=(1, 2))
        colour = (
            "grey" if float(mean.max() - mean.min()) < 0.06 else ("red", "green", "blue")[int(mean.argmax())]
        )
        light = "light" if float(mean.mean()) > 0.5 else "dark"
        return crop, f"{name} {region} {colour} {light}"

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[3, H, W] in [0, 1] -> latent [C, H/down, W/down] (fixed random stand-in for the VAE)."""
        pooled = torch.nn.functional.avg_pool2d(pixels[None], self.down)[0]
        return torch.tanh(torch.einsum("cr,rhw->chw", self.vae_proj, pooled * 2 - 1) * 1.5)

    def sample(self):
        from bagel.packing import EditSample, T2ISample, UnderstandingSample

        crop, caption = self._crop()
        pixels = crop * 2 - 1  # the ViT sees [-1, 1]
        kind = self.rng.choice(("und", "und", "t2i", "edit"))
        if kind == "und":
            return UnderstandingSample(pixels, self.ids("describe the image"), self.ids(caption))
        if kind == "t2i":
            return T2ISample(self.ids("draw " + caption), self.encode(crop))
        op = self.rng.choice(("flip", "darken", "mirror"))
        target = {"flip": crop.flip(1), "mirror": crop.flip(2), "darken": crop * 0.5}[op]
        return EditSample(pixels, self.encode(crop), self.ids(op + " the image"), self.encode(target))

    def pack(self, tokens: int, device):
        """Samples until about ``tokens`` tokens, packed and padded flex-style to exactly ``tokens``."""
        from bagel.packing import pack_samples

        samples = []
        while True:
            samples.append(self.sample())
            if pack_samples(samples, self.config, rng=0)["sequence_length"] > tokens:
                samples.pop()
                break
        if not samples:
            raise ValueError(f"--tokens {tokens} is too small for one sample")
        return pack_samples(
            samples, self.config, max_num_tokens=tokens, rng=self.rng.randrange(2**31), device=device
        )


# ---------------------------------------------------------------------------------------------- training
def _progress(step: int, total: int, ce: float, mse: float, tps: float) -> None:
    width = 30
    filled = int(width * step / total)
    bar = "#" * filled + "-" * (width - filled)
    sys.stderr.write(f"\r[{bar}] {step}/{total} ce {ce:.3f} mse {mse:.4f} {tps:,.0f} tok/s")
    sys.stderr.flush()
    if step == total:
        sys.stderr.write("\n")


def _plot(path: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "ce", "understanding CE"), (axes[1], "mse", "flow-matching MSE")):
        ys = np.array([r[key] for r in rows], dtype=np.float64)
        ax.plot(steps, ys, alpha=0.3, label="per step")
        k = max(1, len(ys) // 20)
        smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, label=f"mean of {k}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(args, rank: int = 0, world: int = 1, device: torch.device | None = None) -> dict:
    """Train on one process, or as rank ``rank`` of ``world`` (process group already initialised: the
    model is sharded with FSDP2, each rank packs its own batches, rank 0 reports)."""
    from bagel import BagelBackendConfig, BagelConfig, BagelForUnifiedMultimodal

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if device is None:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = BagelBackendConfig(attention=args.attention, mot=args.mot, patch_embed=args.patch_embed)
    config = BagelConfig.tiny(
        visual_gen=True,
        llm_hidden=args.hidden,
        llm_layers=args.layers,
        vae_config={"z_channels": 4, "downsample": 4},
        max_latent_size=16,
    )
    model = BagelForUnifiedMultimodal(config, backend=backend).to(device)
    model.initialize_weights()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    if world > 1:
        from bagel.distributed import apply_fsdp2

        apply_fsdp2(model)
    data = DemoData(config, seed=args.seed + 1000 * rank)  # each rank its own batches
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
        ),
    )
    os.makedirs(args.out, exist_ok=True)
    rows = []
    tokens_done, t_train = 0, 0.0
    log = print if rank == 0 else (lambda *a, **k: None)
    log(
        f"bagel-demo: {n_params / 1e6:.2f} M parameters, device {device}"
        f"{f' x {world} processes (FSDP2)' if world > 1 else ''}, "
        f"backends attention={backend.attention} mot={backend.mot} patch_embed={backend.patch_embed}, "
        f"{args.steps} steps of {args.tokens}-token packs",
        flush=True,
    )
    for step in range(1, args.steps + 1):
        batch = data.pack(args.tokens, device)
        t0 = time.perf_counter()
        out = model(**batch)
        ce = out["ce"].mean() if out["ce"] is not None else torch.zeros((), device=device)
        mse = out["mse"].mean() if out["mse"] is not None else torch.zeros((), device=device)
        loss = ce + mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_train += time.perf_counter() - t0
        n_tok = int(batch["sequence_length"])
        vals = torch.tensor([ce.item(), mse.item(), float(n_tok)], dtype=torch.float64)
        if world > 1:  # the curves show the mean over ranks; tokens count all ranks
            vals = _all_reduce(vals, device, "sum") / torch.tensor([world, world, 1.0], dtype=torch.float64)
        tokens_done += int(vals[2])
        rows.append(
            {
                "step": step,
                "ce": float(vals[0]),
                "mse": float(vals[1]),
                "tokens": int(vals[2]),
                "lr": sched.get_last_lr()[0],
            }
        )
        if not (math.isfinite(rows[-1]["ce"]) and math.isfinite(rows[-1]["mse"])):
            raise RuntimeError(f"non-finite loss at step {step}: ce={rows[-1]['ce']} mse={rows[-1]['mse']}")
        if rank == 0 and (step % max(1, args.steps // 100) == 0 or step == args.steps):
            _progress(step, args.steps, rows[-1]["ce"], rows[-1]["mse"], tokens_done / max(t_train, 1e-9))
    if world > 1:  # the slowest rank sets the pace
        t_train = float(_all_reduce(torch.tensor([t_train], dtype=torch.float64), device, "max")[0])
    k = max(1, min(20, len(rows) // 5))
    first = {key: float(np.mean([r[key] for r in rows[:k]])) for key in ("ce", "mse")}
    last = {key: float(np.mean([r[key] for r in rows[-k:]])) for key in ("ce", "mse")}
    tps = tokens_done / max(t_train, 1e-9)
    if rank == 0:
        with open(os.path.join(args.out, "losses.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        _plot(os.path.join(args.out, "losses.png"), rows)
    log(f"ce  {first['ce']:.4f} -> {last['ce']:.4f} (mean of first / last {k} steps)")
    log(f"mse {first['mse']:.4f} -> {last['mse']:.4f}")
    log(f"wrote {os.path.join(args.out, 'losses.csv')} and {os.path.join(args.out, 'losses.png')}")
    log(
        f"trained {args.steps} steps, {tokens_done} tokens in {t_train:.1f} s of training: {tps:,.0f} tokens/s"
    )
    return {"first": first, "last": last, "tokens_per_s": tps, "rows": rows}


def _all_reduce(t: torch.Tensor, device: torch.device, op: str) -> torch.Tensor:
    import torch.distributed as dist

    t = t.to(device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu()


def _worker(rank: int, world: int, port: int, args) -> None:
    """One process of ``bagel-demo --nproc N`` (a torchrun-style environment on one machine)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    _run_distributed(args)


def _run_distributed(args) -> dict:
    from bagel.distributed import cleanup, init_distributed

    rank, world, device = init_distributed(device=args.device)
    try:
        return train(args, rank, world, device)
    finally:
        cleanup()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bagel-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tokens", type=int, default=512, help="tokens per pack (flex-style padded to this)")
    p.add_argument("--out", default="bagel-demo-out")
    p.add_argument("--device", default=None)
    p.add_argument("--attention", default="auto", help="auto, triton, flex or sdpa")
    p.add_argument("--mot", default="auto", help="auto, triton or torch")
    p.add_argument("--patch-embed", dest="patch_embed", default="auto", help="auto, cuda or torch")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes on this machine (FSDP2; gloo on CPU, nccl on GPUs); under torchrun it is implied",
    )
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 1 or args.tokens < 16:
        raise SystemExit("bagel-demo: --steps must be >= 1 and --tokens >= 16")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: this process is one rank
        _run_distributed(args)
    elif args.nproc > 1:
        import socket

        import torch.multiprocessing as mp

        if torch.cuda.is_available() and args.device != "cpu" and args.nproc > torch.cuda.device_count():
            raise SystemExit(
                f"bagel-demo: --nproc {args.nproc} exceeds the {torch.cuda.device_count()} visible GPUs"
            )
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_worker, args=(args.nproc, port, args), nprocs=args.nproc)
    else:
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

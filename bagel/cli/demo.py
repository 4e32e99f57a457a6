"""``bagel-demo``: train a small BAGEL (random init, stage 2) on built-in packed mixed-modal data.

    bagel-demo [--steps 300] [--out bagel-demo-out] [--device cpu|cuda] [--attention auto|triton|flex|sdpa]
               [--mot auto|triton|torch] [--patch-embed auto|cuda|cpu_ext|torch] [--tokens 512] [--seed 0]

The data are real images that matplotlib ships (its sample photographs and elevation maps), cropped at
random, described by short captions over a 32-word vocabulary (which image, which part, which colour,
how bright), and packed the way BAGEL's pipeline packs them (``bagel.data.packing``):

- understanding: the crop through the ViT, then "describe" and the caption (CE on the caption);
- text-to-image: the caption, then the crop's latent to generate (flow-matching MSE);
- edit: the crop (clean latent + ViT), an instruction (flip / darken / mirror), then the edited crop's
  latent to generate.

Latents come from a small fixed random encoder standing in for the VAE (average pooling by the
downsample factor, then a fixed random 1x1 projection to the latent channels). The model is the tiny
config of :meth:`bagel.BagelConfig.tiny`; backends are chosen automatically (fast kernels on a GPU,
reference paths on the CPU) unless overridden. Writes ``losses.csv`` and ``losses.png`` and prints a
final line with tokens/s.

Arguments are checked before any work (no model is built, torch is not imported for a bad name or
number): a bad value is a one-line usage error with exit status 2. ``--tokens`` must hold the largest
sample the data can draw (:func:`min_tokens`). The output folder is checked (created, writable) first;
the CSV and the plot are written to temporary files and renamed into place, the plot only with the CSV
of the same run. Ctrl-C stops training and still writes what is done (exit status 130).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import random
import sys
import tempfile
import time

# torch and numpy are imported inside the functions that need them: argument errors come first

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


# The demo's model: BagelConfig.tiny with these image settings (see demo_config).
DEMO_VIT_PATCH = 4
DEMO_VAE = {"z_channels": 4, "downsample": 4}
DEMO_LATENT_PATCH = 2
DEMO_SIDE_UNITS = (2, 4)  # crop sides, in multiples of the smallest side both towers accept
CAPTION_WORDS = 4  # "<image> <region> <colour> <brightness>"


def max_sample_tokens(
    vit_patch: int = DEMO_VIT_PATCH,
    downsample: int = DEMO_VAE["downsample"],
    latent_patch: int = DEMO_LATENT_PATCH,
    side_units: tuple[int, int] = DEMO_SIDE_UNITS,
) -> int:
    """Tokens of the largest sample :class:`DemoData` can draw (an edit sample of the largest crop),
    computed from the settings alone, as :func:`bagel.data.packing.sample_num_tokens` counts them."""
    side = math.lcm(vit_patch, downsample * latent_patch) * max(side_units)
    vit = (side // vit_patch) ** 2 + 2  # patches + image bracket tokens
    vae = (side // (downsample * latent_patch)) ** 2 + 2
    und = vit + (3 + 2) + (CAPTION_WORDS + 2)  # image, "describe the image", caption
    t2i = (1 + CAPTION_WORDS + 2) + vae  # "draw <caption>", latent
    edit = vae + vit + (3 + 2) + vae  # clean latent, ViT image, "<op> the image", target latent
    return max(und, t2i, edit)


def min_tokens() -> int:
    """The smallest ``--tokens``: every pack must be able to hold any one sample."""
    return max_sample_tokens()


# ---------------------------------------------------------------------------------------------- data
def _load_images() -> dict:
    """RGB float arrays in [0, 1] from matplotlib's sample data (photographs and colour-mapped DEMs)."""
    import numpy as np

    from bagel.extras import needs_extra

    with needs_extra():
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

    def __init__(self, config, seed: int = 0, side_units: tuple[int, int] = DEMO_SIDE_UNITS):
        import torch

        from bagel.data.packing import SpecialTokens

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
        import torch

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

    def encode(self, pixels):
        """[3, H, W] in [0, 1] -> latent [C, H/down, W/down] (fixed random stand-in for the VAE)."""
        import torch

        pooled = torch.nn.functional.avg_pool2d(pixels[None], self.down)[0]
        return torch.tanh(torch.einsum("cr,rhw->chw", self.vae_proj, pooled * 2 - 1) * 1.5)

    def sample(self):
        from bagel.data.packing import EditSample, T2ISample, UnderstandingSample

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
        """Samples until the next one would not fit in ``tokens``, packed once and padded flex-style to
        exactly ``tokens``. Linear in the pack size: each sample's tokens are counted on its own
        (:func:`bagel.data.packing.sample_num_tokens`), and :func:`bagel.data.packing.pack_samples` runs once."""
        from bagel.data.packing import pack_samples, sample_num_tokens

        samples, used = [], 0
        while True:
            sample = self.sample()
            n = sample_num_tokens(sample, self.config)
            if used + n > tokens:
                break
            samples.append(sample)
            used += n
        if not samples:
            raise ValueError(f"--tokens {tokens} is too small for one sample (at least {min_tokens()})")
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
    import numpy as np

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
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def demo_config(args):
    from bagel import BagelConfig

    return BagelConfig.tiny(
        visual_gen=True,
        llm_hidden=args.hidden,
        llm_layers=args.layers,
        vit_patch=DEMO_VIT_PATCH,
        latent_patch_size=DEMO_LATENT_PATCH,
        vae_config=dict(DEMO_VAE),
        max_latent_size=16,
    )


def _replace_atomically(path: str, write) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path``, then rename it over ``path``: a reader
    sees the old file or the whole new one, never a half-written one."""
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_outputs(out: str, rows: list[dict]) -> tuple[str, str | None]:
    """``losses.csv`` and ``losses.png`` of one run in ``out``, each written atomically. The plot is
    replaced only together with the CSV: when plotting fails, a plot of an earlier run is removed (with
    a warning) so that the folder never pairs this run's CSV with another run's plot. Returns the paths
    written (the plot's None when it failed)."""
    csv_path, png_path = os.path.join(out, "losses.csv"), os.path.join(out, "losses.png")

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    fd, png_tmp = tempfile.mkstemp(prefix=".losses.png.", suffix=".tmp", dir=out)
    os.close(fd)
    try:
        try:
            _plot(png_tmp, rows)
            plotted = True
        except Exception as exc:  # the CSV still counts; the plot is optional
            plotted = False
            sys.stderr.write(
                f"bagel-demo: warning: the plot could not be drawn ({type(exc).__name__}: {exc})\n"
            )
        _replace_atomically(csv_path, write_csv)
        if plotted:
            os.replace(png_tmp, png_path)
        elif os.path.isfile(png_path):
            os.remove(png_path)  # an earlier run's plot must not sit beside this run's CSV
    finally:
        if os.path.exists(png_tmp):
            os.remove(png_tmp)
    return csv_path, (png_path if plotted else None)


def train(args, rank: int = 0, world: int = 1, device=None) -> dict:
    """Train on one process, or as rank ``rank`` of ``world`` (process group already initialised: the
    model is sharded with FSDP2, each rank packs its own batches, rank 0 reports).

    A KeyboardInterrupt (Ctrl-C) on a single process stops training after the last finished step; the
    outputs of the finished steps are written and the result has ``interrupted=True``."""
    import torch

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if device is None:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, n_params = _build_model(args, world, device)
    data = DemoData(model.config, seed=args.seed + 1000 * rank)  # each rank its own batches
    opt, sched = _optimizer(model, args)
    os.makedirs(args.out, exist_ok=True)
    log = print if rank == 0 else (lambda *a, **k: None)
    be = model.backend
    log(
        f"bagel-demo: {n_params / 1e6:.2f} M parameters, device {device}"
        f"{f' x {world} processes (FSDP2)' if world > 1 else ''}, "
        f"backends attention={be.attention} mot={be.mot} patch_embed={be.patch_embed}, "
        f"{args.steps} steps of {args.tokens}-token packs",
        flush=True,
    )
    rows, tokens_done, t_train, interrupted = [], 0, 0.0, False
    try:
        for step in range(1, args.steps + 1):
            batch = data.pack(args.tokens, device)
            ce, mse, seconds = _train_step(model, opt, sched, batch, device)
            t_train += seconds
            rows.append(
                _step_row(step, ce, mse, int(batch["sequence_length"]), sched.get_last_lr()[0], world)
            )
            tokens_done += rows[-1]["tokens"]
            if not (math.isfinite(rows[-1]["ce"]) and math.isfinite(rows[-1]["mse"])):
                raise RuntimeError(
                    f"non-finite loss at step {step}: ce={rows[-1]['ce']} mse={rows[-1]['mse']}"
                )
            if rank == 0 and (step % max(1, args.steps // 100) == 0 or step == args.steps):
                _progress(step, args.steps, rows[-1]["ce"], rows[-1]["mse"], tokens_done / max(t_train, 1e-9))
    except KeyboardInterrupt:
        if world > 1:
            raise  # the other ranks wait in collectives: no partial report from one rank
        interrupted = True
        sys.stderr.write(f"\nbagel-demo: interrupted after {len(rows)} finished step(s)\n")
    if world > 1:  # the slowest rank sets the pace
        t_train = float(_all_reduce(torch.tensor([t_train], dtype=torch.float64), device, "max")[0])
    result = {
        "first": None,
        "last": None,
        "tokens_per_s": tokens_done / max(t_train, 1e-9),
        "rows": rows,
        "interrupted": interrupted,
    }
    if not rows:
        log("no step finished: nothing written")
        return result
    _summarise(result, args.out if rank == 0 else None, tokens_done, t_train, log)
    return result


def _build_model(args, world: int, device):
    """The demo's tiny BAGEL on ``device`` in training mode (sharded with FSDP2 when ``world > 1``) and
    its parameter count."""
    from bagel import BagelBackendConfig, BagelForUnifiedMultimodal

    backend = BagelBackendConfig(attention=args.attention, mot=args.mot, patch_embed=args.patch_embed)
    model = BagelForUnifiedMultimodal(demo_config(args), backend=backend).to(device)
    model.initialize_weights()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    if world > 1:
        from bagel.train.distributed import apply_fsdp2

        apply_fsdp2(model)
    return model, n_params


def _optimizer(model, args):
    """AdamW with a linear warm-up over 5% of the steps, then a cosine decay to zero."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
        ),
    )
    return opt, sched


def _train_step(model, opt, sched, batch: dict, device):
    """One optimizer step on ``batch``: ``(mean CE, mean MSE, seconds)`` (packing not timed)."""
    import torch

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
    return ce, mse, time.perf_counter() - t0


def _step_row(step: int, ce, mse, n_tok: int, lr: float, world: int) -> dict:
    """The CSV row of one step; with several processes the losses are the mean over ranks and the
    tokens count all ranks."""
    import torch

    vals = torch.tensor([ce.item(), mse.item(), float(n_tok)], dtype=torch.float64)
    if world > 1:
        vals = _all_reduce(vals, ce.device, "sum") / torch.tensor([world, world, 1.0], dtype=torch.float64)
    return {"step": step, "ce": float(vals[0]), "mse": float(vals[1]), "tokens": int(vals[2]), "lr": lr}


def _summarise(result: dict, out: str | None, tokens_done: int, t_train: float, log) -> None:
    """The first / last loss means into ``result``; with ``out`` (rank 0) the outputs and the report."""
    import numpy as np

    rows = result["rows"]
    k = max(1, min(20, len(rows) // 5))
    first = {key: float(np.mean([r[key] for r in rows[:k]])) for key in ("ce", "mse")}
    last = {key: float(np.mean([r[key] for r in rows[-k:]])) for key in ("ce", "mse")}
    result.update(first=first, last=last)
    if out is None:
        return
    csv_path, png_path = write_outputs(out, rows)
    log(f"ce  {first['ce']:.4f} -> {last['ce']:.4f} (mean of first / last {k} steps)")
    log(f"mse {first['mse']:.4f} -> {last['mse']:.4f}")
    log(f"wrote {csv_path}" + (f" and {png_path}" if png_path else " (no plot)"))
    log(
        f"trained {len(rows)} steps, {tokens_done} tokens in {t_train:.1f} s of training: "
        f"{result['tokens_per_s']:,.0f} tokens/s"
    )


def _all_reduce(t, device, op: str):
    import torch.distributed as dist

    t = t.to(device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu()


def _worker(rank: int, world: int, port: int, args) -> None:
    """One process of ``bagel-demo --nproc N`` (a torchrun-style environment on one machine)."""
    from bagel.train.distributed import set_local_env

    set_local_env(rank, world, port)
    _run_distributed(args)


def _run_distributed(args) -> dict:
    from bagel.train.distributed import cleanup, init_distributed

    rank, world, device = init_distributed(device=args.device)
    try:
        return train(args, rank, world, device)
    finally:
        cleanup()


# ---------------------------------------------------------------------------------------------- command line
class UsageError(Exception):
    """A bad command-line value; ``main`` prints it as one line and exits with status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: ...``, exit status 2), no usage block, no traceback."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# Upper bounds of the integer flags: past them a run would take hours or exhaust memory before its
# first step (a pack is padded to --tokens; the kernels address at most 2**31 rows), so they are usage
# errors at once rather than a hang.
MAX_TOKENS = 1 << 20
MAX_LAYERS = 256
MAX_HIDDEN = 16384
MAX_STEPS = 10**9
MAX_NPROC = 1024
MAX_SEED = 2**32 - 1  # rank r draws its data with seed + 1000 * r: well inside every generator's range


def _int_at_least(minimum: int, maximum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {minimum}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"{value} is above the maximum {maximum}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def make_parser() -> argparse.ArgumentParser:
    from bagel_kernels.backends import names  # the registries' names, declared torch-free

    p = OneLineParser(prog="bagel-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=_int_at_least(1, MAX_STEPS), default=300)
    p.add_argument(
        "--tokens",
        type=_int_at_least(min_tokens(), MAX_TOKENS),
        default=512,
        help=f"tokens per pack (flex-style padded to this; {min_tokens()} (the largest sample) to {MAX_TOKENS})",
    )
    p.add_argument("--out", default="bagel-demo-out", help="output folder (created; must be writable)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--attention", default="auto", choices=names("attention"))
    p.add_argument("--mot", default="auto", choices=names("mot"))
    p.add_argument("--patch-embed", dest="patch_embed", default="auto", choices=names("patch_embed"))
    p.add_argument(
        "--hidden", type=_int_at_least(8, MAX_HIDDEN), default=64, help="LLM width (a multiple of 8)"
    )
    p.add_argument("--layers", type=_int_at_least(1, MAX_LAYERS), default=2)
    p.add_argument("--lr", type=_positive_float, default=2e-3)
    p.add_argument("--seed", type=_int_at_least(0, MAX_SEED), default=0)
    p.add_argument(
        "--nproc",
        type=_int_at_least(1, MAX_NPROC),
        default=1,
        help="processes on this machine (FSDP2; gloo on CPU, nccl on GPUs); under torchrun it is implied",
    )
    return p


def _check_device(device: str | None) -> None:
    if device is None or device == "cpu":
        return
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise UsageError(f"--device {device!r} is not supported: use cpu, cuda or cuda:N")
    import torch  # only to ask whether there is a GPU

    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is visible")
    if index and int(index) >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")


def _check_backends(args) -> None:
    """Combinations refused before any work (each would fail at the first step on the CPU)."""
    needs_gpu = []
    from bagel_kernels.backends import interpreting as triton_interprets  # no torch

    interpreting = triton_interprets()
    for flag, value in (("--attention", args.attention), ("--mot", args.mot)):
        if value == "triton" and not interpreting:
            needs_gpu.append(f"{flag} triton needs a GPU (or TRITON_INTERPRET=1 to interpret on the CPU)")
    if args.attention == "flex":
        needs_gpu.append("--attention flex cannot train on the CPU: FlexAttention has no CPU backward")
    if args.patch_embed == "cuda":
        needs_gpu.append("--patch-embed cuda needs a GPU")
    if needs_gpu and (args.device == "cpu" or (args.device is None and not _cuda_visible())):
        raise UsageError(needs_gpu[0])


def _cuda_visible() -> bool:
    import torch  # only asked when a GPU-only backend was named without --device

    return torch.cuda.is_available()


def _check_out(out: str) -> None:
    """The output folder exists or can be created, is writable, and the output names are free to write."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out!r} exists and is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".bagel-demo-probe.", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"--out {out!r} is not a writable folder ({exc.strerror or exc})") from None
    for name in ("losses.csv", "losses.png"):
        path = os.path.join(out, name)
        if os.path.exists(path) and not os.path.isfile(path):
            raise UsageError(f"--out {out!r}: {name} exists and is not a file")


def check_args(args) -> None:
    """Every check that needs no model, before any work; raises UsageError. torch is imported only
    to ask about CUDA (``--device cuda``, or a GPU-only backend without ``--device``)."""
    if args.hidden % 8:
        raise UsageError(f"--hidden {args.hidden} must be a multiple of 8 (4 heads of an even head dim)")
    _check_out(args.out)
    _check_device(args.device)
    _check_backends(args)


def main(argv=None) -> int:
    p = make_parser()
    args = p.parse_args(argv)
    try:
        check_args(args)
    except UsageError as exc:
        p.error(str(exc))
    world = os.environ.get("WORLD_SIZE", "1")
    if not (world.isascii() and world.isdigit() and int(world) >= 1):
        p.error(f"the environment variable WORLD_SIZE={world!r} must be an integer >= 1 (set by torchrun)")
    if int(world) > 1:  # launched by torchrun: this process is one rank
        _run_distributed(args)
    elif args.nproc > 1:
        import torch
        import torch.multiprocessing as mp

        from bagel.train.distributed import free_port

        if torch.cuda.is_available() and args.device != "cpu" and args.nproc > torch.cuda.device_count():
            p.error(f"--nproc {args.nproc} exceeds the {torch.cuda.device_count()} visible GPUs")
        mp.spawn(_worker, args=(args.nproc, free_port(), args), nprocs=args.nproc)
    else:
        return 130 if train(args)["interrupted"] else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``bagel-generate``: see what a checkpoint does: draw from a prompt, edit an image, answer a question.

    bagel-generate --model DIR --prompt "a red fox" --out fox.png [--steps 50 --cfg-text 4 --seed 0]
    bagel-generate --model DIR --prompt "make it night" --image in.png --edit --out out.png [--cfg-img 2]
    bagel-generate --model DIR --ask "what is in the picture?" [--image in.png]

``DIR`` is a BAGEL checkpoint folder (``config.json`` + ``ema.safetensors``, or upstream's layout); the
tokenizer is read from ``--tokenizer`` (default ``DIR``) and the FLUX autoencoder from ``--vae`` (default
``DIR/ae.safetensors``; its size is read from the file). Sampling arguments mirror upstream BAGEL's
(``--steps`` = num_timesteps, ``--shift`` = timestep_shift, ``--cfg-text`` / ``--cfg-img`` /
``--cfg-interval`` / ``--cfg-renorm-type`` / ``--cfg-renorm-min``); unset ones take upstream's defaults
for the task (text-to-image: cfg-img 1, interval 0.4 1, renorm global; editing: cfg-img 2, interval 0 1,
renorm text_channel). A bad argument is a one-line usage error (exit status 2); a checkpoint that cannot
do what is asked (a stage-1 checkpoint asked to draw) is a one-line error (exit status 1).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

# torch and the model are imported after the arguments are checked: usage errors come at once

__all__ = ["main"]

_DEFAULTS = {
    "t2i": dict(cfg_img=1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type="global"),
    "edit": dict(cfg_img=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: ...``, exit status 2), no usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be finite")
    return value


def _parser() -> _Parser:
    p = _Parser(
        prog="bagel-generate",
        description="Draw, edit or answer with a BAGEL checkpoint.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="BAGEL checkpoint folder")
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument(
        "--prompt", metavar="TEXT", help="draw this (with --image and --edit: the edit instruction)"
    )
    task.add_argument("--ask", metavar="QUESTION", help="answer this question (about --image when given)")
    p.add_argument("--image", metavar="IN.png", help="input image (to edit, or to ask about)")
    p.add_argument("--edit", action="store_true", help="edit --image as --prompt says")
    p.add_argument("--out", metavar="OUT.png", help="where to write the image (drawing and editing)")
    p.add_argument("--vae", metavar="PATH", help="FLUX ae.safetensors (default: DIR/ae.safetensors)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the model folder)")
    p.add_argument(
        "--steps", type=int, default=50, help="num_timesteps (steps = num_timesteps - 1; default %(default)s)"
    )
    p.add_argument("--shift", type=_finite, default=3.0, help="timestep_shift (default %(default)s)")
    p.add_argument("--cfg-text", type=_finite, default=4.0, help="cfg_text_scale (default %(default)s)")
    p.add_argument(
        "--cfg-img", type=_finite, default=None, help="cfg_img_scale (default: 1 drawing, 2 editing)"
    )
    p.add_argument(
        "--cfg-interval",
        type=_finite,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="guidance where LOW < t <= HIGH (default: 0.4 1 drawing, 0 1 editing)",
    )
    p.add_argument(
        "--cfg-renorm-type",
        choices=("global", "channel", "text_channel"),
        default=None,
        help="cfg_renorm_type (default: global drawing, text_channel editing)",
    )
    p.add_argument("--cfg-renorm-min", type=_finite, default=0.0, help="cfg_renorm_min (default %(default)s)")
    p.add_argument(
        "--height", type=_positive_int, default=None, help="image height (drawing; default the largest)"
    )
    p.add_argument(
        "--width", type=_positive_int, default=None, help="image width (drawing; default the largest)"
    )
    p.add_argument("--seed", type=int, default=0, help="noise and sampling seed (default %(default)s)")
    p.add_argument("--think", action="store_true", help="let the model write its plan/reasoning first")
    p.add_argument(
        "--max-think-tokens",
        type=_positive_int,
        default=1000,
        help="plan length limit with --think (default %(default)s)",
    )
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=512, help="answer length limit (default %(default)s)"
    )
    p.add_argument("--do-sample", action="store_true", help="sample the answer (default greedy)")
    p.add_argument("--temperature", type=_finite, default=1.0, help="with --do-sample (default %(default)s)")
    p.add_argument("--top-p", type=_finite, default=1.0, help="with --do-sample (default %(default)s)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16 on cuda, fp32 on cpu"
    )
    p.add_argument(
        "--backend",
        choices=("auto", "sdpa", "flash", "packed"),
        default="auto",
        help="attention of the cached steps (default %(default)s)",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="recompute the context every step (reference; slow)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check(p: _Parser, args: argparse.Namespace) -> None:
    """Every argument check that needs no file read beyond existence."""
    drawing = args.prompt is not None
    if not os.path.isdir(args.model):
        p.error(f"--model {args.model!r} is not a folder")
    if args.edit and not drawing:
        p.error("--edit goes with --prompt (the instruction), not --ask")
    if args.edit and args.image is None:
        p.error("--edit needs --image IN.png")
    if drawing and args.image is not None and not args.edit:
        p.error("--image with --prompt needs --edit (or ask about the image with --ask)")
    if args.image is not None and not os.path.isfile(args.image):
        p.error(f"--image {args.image!r} does not exist")
    if drawing:
        if args.out is None:
            p.error("drawing needs --out OUT.png")
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            p.error(f"--out {args.out!r}: the folder {folder!r} does not exist")
        if args.steps < 2:
            p.error(f"--steps must be at least 2, got {args.steps}")
        if args.edit and (args.height is not None or args.width is not None):
            p.error("--height/--width are for drawing; an edit keeps the input image's size")
        vae = args.vae if args.vae is not None else os.path.join(args.model, "ae.safetensors")
        if not os.path.isfile(vae):
            p.error(
                f"no VAE at {vae!r}: pass --vae PATH to FLUX.1's ae.safetensors (the autoencoder BAGEL draws with)"
            )
        args.vae = vae
    elif args.out is not None:
        p.error("--out is for drawing (--prompt); an answer is printed")
    if args.shift <= 0:
        p.error(f"--shift must be positive, got {args.shift}")
    if not 0 <= args.cfg_renorm_min <= 1:
        p.error(f"--cfg-renorm-min must lie in [0, 1], got {args.cfg_renorm_min}")
    if args.cfg_interval is not None and not 0 <= args.cfg_interval[0] <= args.cfg_interval[1] <= 1:
        p.error(f"--cfg-interval must satisfy 0 <= LOW <= HIGH <= 1, got {args.cfg_interval}")
    if args.temperature <= 0:
        p.error(f"--temperature must be positive, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must lie in (0, 1], got {args.top_p}")
    tok = args.tokenizer if args.tokenizer is not None else args.model
    if not os.path.isdir(tok):
        p.error(f"--tokenizer {tok!r} is not a folder")
    args.tokenizer = tok
    if args.device is not None and args.device.split(":")[0] not in ("cpu", "cuda"):
        p.error(f"--device {args.device!r} must be cpu or cuda[:N]")


class _Refusal(Exception):
    """The checkpoint cannot do what is asked; printed as one line, exit status 1 (2: an argument that
    only the loaded model shows to be bad)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _vae_config(path: str):
    """The FluxVAEConfig of an ``ae.safetensors`` from its tensor shapes (FLUX.1's file gives FLUX.1's)."""
    from bagel.io.files import read_safetensors_header
    from bagel.vae import FluxVAEConfig

    header = read_safetensors_header(path)

    def shape(key):
        if key not in header:
            raise _Refusal(f"{path} is not a FLUX autoencoder file: no {key}")
        return header[key]["shape"]

    ch = shape("encoder.conv_in.weight")[0]
    z = shape("decoder.conv_in.weight")[1]
    levels = sorted({int(k.split(".")[2]) for k in header if k.startswith("encoder.down.")})
    mult = tuple(shape(f"encoder.down.{i}.block.0.conv2.weight")[0] // ch for i in levels)
    blocks = len({k.split(".")[4] for k in header if k.startswith("encoder.down.0.block.")})
    return FluxVAEConfig(ch=ch, ch_mult=mult, num_res_blocks=blocks, z_channels=z)


_GEN_PREFIXES = ("llm2vae.", "vae2llm.", "time_embedder.", "latent_pos_embed.")


def _load(args: argparse.Namespace, drawing: bool):
    import torch

    from bagel.data.tokenizer import load_tokenizer
    from bagel.model.config import BagelConfig
    from bagel.model.modeling import BagelForUnifiedMultimodal

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _Refusal(f"--device {args.device}: no CUDA device here (use --device cpu)", code=2)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    config = BagelConfig.from_pretrained(args.model)
    if drawing and not config.visual_gen:
        raise _Refusal(
            f"{args.model} is a stage-1 checkpoint (visual_gen=False, no generation weights): it cannot draw or edit"
        )
    stage = 2 if drawing else 1
    model = BagelForUnifiedMultimodal.from_pretrained(
        args.model, stage=stage, dtype=dtype, device=device
    ).eval()
    report = model.load_report
    if drawing and report is not None:
        lacking = [k for k in report.missing if "_moe_gen" in k or k.startswith(_GEN_PREFIXES)]
        if lacking:
            raise _Refusal(
                f"{args.model} lacks the generation weights ({len(lacking)} keys, e.g. {lacking[0]}): a stage-1 "
                "checkpoint cannot draw or edit"
            )
    try:
        tokenizer, special = load_tokenizer(args.tokenizer)
    except FileNotFoundError as exc:
        raise _Refusal(f"--tokenizer: {exc}") from None
    vocab = model.config.text_config.vocab_size
    if max(special.bos, special.eos, special.start_of_image, special.end_of_image) >= vocab:
        raise _Refusal(
            f"the tokenizer's special tokens {special} lie outside the model's vocabulary of {vocab}"
        )
    vae = None
    if drawing:
        from bagel.vae import FluxVAE

        vae = FluxVAE.from_pretrained(args.vae, dtype=dtype, device=device, config=_vae_config(args.vae))
    return model, vae, tokenizer, special


def _save_image(image, out: str) -> None:
    """Written to a temporary name in the same folder, then renamed (a kill leaves no half file)."""
    root, ext = os.path.splitext(out)
    tmp = f"{root}.tmp-{os.getpid()}{ext or '.png'}"
    image.save(tmp)
    os.replace(tmp, out)


def _run(args: argparse.Namespace) -> int:
    from bagel.generate import Generator

    drawing = args.prompt is not None
    model, vae, tokenizer, special = _load(args, drawing)
    gen = Generator(
        model, vae, tokenizer, special_tokens=special, backend=args.backend, use_cache=not args.no_cache
    )
    start = time.perf_counter()
    if not drawing:
        image = None
        if args.image is not None:
            from PIL import Image

            image = Image.open(args.image)
        text = gen.answer(
            image,
            args.ask,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_p=args.top_p,
            think=args.think,
            seed=args.seed,
        )
        print(text)
        print(f"(answered in {time.perf_counter() - start:.2f} s)", file=sys.stderr)
        return 0
    task = "edit" if args.edit else "t2i"
    d = _DEFAULTS[task]
    kw = dict(
        num_timesteps=args.steps,
        timestep_shift=args.shift,
        cfg_text_scale=args.cfg_text,
        cfg_img_scale=d["cfg_img"] if args.cfg_img is None else args.cfg_img,
        cfg_interval=d["cfg_interval"] if args.cfg_interval is None else tuple(args.cfg_interval),
        cfg_renorm_min=args.cfg_renorm_min,
        cfg_renorm_type=d["cfg_renorm_type"] if args.cfg_renorm_type is None else args.cfg_renorm_type,
        think=args.think,
        max_think_tokens=args.max_think_tokens,
        seed=args.seed,
        progress=not args.no_progress,
    )
    if args.edit:
        from PIL import Image

        result = gen.edit(Image.open(args.image), args.prompt, **kw)
    else:
        s, top = gen.image_stride, gen.max_image_side
        for name in ("height", "width"):
            v = getattr(args, name)
            if v is not None and (v % s or v > top):
                raise _Refusal(f"--{name} {v} must be a multiple of {s} up to {top} for this model", code=2)
        result = gen.text_to_image(args.prompt, height=args.height, width=args.width, **kw)
    if result.thinking is not None:
        print(result.thinking)
    _save_image(result.to_pil(), args.out)
    H, W = result.image.shape[-2:]
    print(f"wrote {args.out} ({W}x{H}) in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check(p, args)
    try:
        return _run(args)
    except _Refusal as exc:
        print(f"bagel-generate: error: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())

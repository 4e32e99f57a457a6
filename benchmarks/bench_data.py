"""Data-loader throughput at BAGEL-7B-MoT's image settings and 16k-token packs (CPU only).

    python benchmarks/bench_data.py [--packs 20] [--workers 2] [--tokens 16384] [--data DIR]

Writes a dataset in upstream's layout with realistic image sizes (t2i 512-1024 px JPEGs, edit chains
of 512-768 px PNGs, understanding images of 384-980 px, text of ~150 words), from matplotlib's sample
pictures, then measures:

- in the main process (``num_workers=0``): CPU seconds per pack and per sample (``time.process_time``),
  samples and tokens per pack;
- with ``--workers`` DataLoader workers: packs per second, wall clock, after the first pack (the
  workers' start-up is reported apart);
- ``pack_samples`` on such a pack (stand-in latents of the right shapes): what the trainer's process
  adds per pack after the VAE.

The tokenizer is :func:`bagel.data.tiny_tokenizer` (byte-level BPE, so it makes more tokens per word
than Qwen2's, a little more tokenizer work than the real one). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time

import torch

from bagel import BagelConfig
from bagel.data import DataConfig, VaeImage, build_loader, pack_samples, tiny_tokenizer
from bagel.data.example import example_images

VAE_ARGS = {"image_stride": 16, "max_image_size": 1024, "min_image_size": 512}
VIT_EDIT_ARGS = {"image_stride": 14, "max_image_size": 518, "min_image_size": 224}
VIT_ARGS = {"image_stride": 14, "max_image_size": 980, "min_image_size": 378, "max_pixels": 2_007_040}
WORDS = (
    "a the of photo picture portrait map blue green dark light top left right bottom part image shows".split()
)


def _crop(rng: random.Random, img, w: int, h: int):
    from PIL import Image

    W, H = img.size
    side = rng.randint(min(W, H) // 2, min(W, H))
    x, y = rng.randint(0, W - side), rng.randint(0, H - side)
    return img.crop((x, y, x + side, y + side)).resize((w, h), Image.BICUBIC)


def _bytes(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_bench_data(folder: str, rows: int = 48, seed: int = 0) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    rng = random.Random(seed)
    pics = list(example_images().values())

    def pic(lo: int, hi: int):
        return _crop(rng, rng.choice(pics), rng.randrange(lo, hi + 1, 16), rng.randrange(lo, hi + 1, 16))

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    os.makedirs(os.path.join(folder, "t2i"), exist_ok=True)
    t2i = {
        "image": [_bytes(pic(512, 1024), "JPEG") for _ in range(rows)],
        "captions": [json.dumps({"c": words(30)}) for _ in range(rows)],
    }
    pq.write_table(pa.table(t2i), os.path.join(folder, "t2i", "part-0.parquet"), row_group_size=16)
    os.makedirs(os.path.join(folder, "edit"), exist_ok=True)
    chains = []
    for _ in range(rows // 2):
        a = pic(512, 768)
        chains.append([_bytes(a, "PNG"), _bytes(a.transpose(0), "PNG")])
    edit = {"image_list": chains, "instruction_list": [[[words(8)]] for _ in chains]}
    pq.write_table(pa.table(edit), os.path.join(folder, "edit", "part-0.parquet"), row_group_size=8)
    os.makedirs(os.path.join(folder, "vlm"), exist_ok=True)
    with open(os.path.join(folder, "vlm", "data.jsonl"), "w") as f:
        for i in range(rows):
            pic(384, 980).save(os.path.join(folder, "vlm", f"{i}.jpg"), quality=90)
            conv = [{"from": "human", "value": "<image>\n" + words(12)}, {"from": "gpt", "value": words(60)}]
            f.write(json.dumps({"image": f"{i}.jpg", "conversations": conv}) + "\n")
    with open(os.path.join(folder, "text.jsonl"), "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": words(150)}) + "\n")
    groups = {
        "t2i_pretrain": {
            "dataset_names": ["t2i"],
            "image_transform_args": VAE_ARGS,
            "is_mandatory": True,
            "weight": 1,
        },
        "unified_edit": {
            "dataset_names": ["edit"],
            "image_transform_args": VAE_ARGS,
            "vit_image_transform_args": VIT_EDIT_ARGS,
            "weight": 1,
        },
        "vlm_sft": {
            "dataset_names": ["vlm"],
            "image_transform_args": VIT_ARGS,
            "is_mandatory": True,
            "weight": 1,
        },
        "text_pretrain": {"dataset_names": ["text"], "weight": 0.5},
    }
    info = {
        "t2i_pretrain": {"t2i": {"data_dir": "t2i"}},
        "unified_edit": {"edit": {"data_dir": "edit"}},
        "vlm_sft": {"vlm": {"data_dir": "vlm", "jsonl_path": "vlm/data.jsonl"}},
        "text_pretrain": {"text": {"jsonl_path": "text.jsonl"}},
    }
    with open(os.path.join(folder, "dataset_info.yaml"), "w") as f:
        yaml.safe_dump(info, f)
    path = os.path.join(folder, "bench.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(groups, f)
    return path


def fake_latents(samples, config):
    out = []
    for segs in samples:
        new = []
        for s in segs:
            if isinstance(s, VaeImage):
                H, W = s.pixels.shape[1:]
                f = config.vae_config["downsample"]
                s = VaeImage(
                    latent=torch.zeros(config.latent_channels, H // f, W // f, dtype=torch.bfloat16),
                    noised=s.noised,
                    timestep=s.timestep,
                )
            new.append(s)
        out.append(new)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--packs", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16384, help="expected_num_tokens (max_num_tokens = 1.25x)")
    p.add_argument("--rows", type=int, default=48, help="rows per dataset")
    p.add_argument("--data", default=None, help="folder for the dataset (default: a temporary one)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    folder = args.data or tempfile.mkdtemp(prefix="bench_data_")
    t0 = time.perf_counter()
    yaml_path = write_bench_data(folder, args.rows)
    print(f"dataset written to {folder} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    config = BagelConfig.bagel_7b_mot(llm_layers=1, vit_layers=1)
    tok = tiny_tokenizer()
    common = dict(
        dataset_config_file=yaml_path,
        expected_num_tokens=args.tokens,
        max_num_tokens=args.tokens * 5 // 4,
        max_num_tokens_per_sample=args.tokens,
        prefer_buffer_before=args.tokens // 2,
        seed=0,
    )
    rows = []

    # main process: CPU time per pack and per sample
    loader = build_loader(DataConfig(**common, num_workers=0), config, tok)
    it = iter(loader)
    next(it)  # warm-up (file caches, first row groups)
    c0, w0 = time.process_time(), time.perf_counter()
    packs = [next(it) for _ in range(args.packs)]
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    n_samples = sum(len(pk.samples) for pk in packs)
    tokens = sum(pk.num_tokens for pk in packs) / len(packs)
    rows.append(
        (
            "main process (num_workers=0)",
            f"{args.packs / wall:.2f}",
            f"{cpu / args.packs * 1e3:.0f}",
            f"{cpu / n_samples * 1e3:.1f}",
            f"{n_samples / args.packs:.1f}",
            f"{tokens:.0f}",
        )
    )

    # pack_samples in the trainer's process (after the VAE)
    c0 = time.process_time()
    for pk in packs[:5]:
        pack_samples(
            fake_latents(pk.samples, config),
            config,
            max_num_tokens=common["max_num_tokens"],
            special_tokens=loader.special_tokens,
        )
    pack_ms = (time.process_time() - c0) / min(5, len(packs)) * 1e3

    # worker processes: packs per second
    if args.workers > 0:
        loader = build_loader(DataConfig(**common, num_workers=args.workers), config, tok)
        w0 = time.perf_counter()
        it = iter(loader)
        next(it)
        startup = time.perf_counter() - w0
        w0 = time.perf_counter()
        got = [next(it) for _ in range(args.packs)]
        wall = time.perf_counter() - w0
        n_samples = sum(len(pk.samples) for pk in got)
        rows.append(
            (
                f"{args.workers} DataLoader workers",
                f"{args.packs / wall:.2f}",
                "-",
                "-",
                f"{n_samples / args.packs:.1f}",
                f"{sum(pk.num_tokens for pk in got) / len(got):.0f}",
            )
        )
        print(f"workers' start-up to the first pack: {startup:.2f} s", file=sys.stderr)

    print(
        f"expected_num_tokens={args.tokens}, max_num_tokens={common['max_num_tokens']}, {args.packs} packs, torch threads 1, {os.cpu_count()} CPUs\n"
    )
    print("| loader | packs/s | CPU ms/pack | CPU ms/sample | samples/pack | tokens/pack |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\npack_samples on such a pack (stand-in bf16 latents): {pack_ms:.0f} CPU ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Built-in example data in upstream BAGEL's layout, made from the pictures matplotlib ships
(``matplotlib.cbook.get_sample_data``): random crops, flips and colour changes of three photographs and
two elevation maps, with captions that say which picture, which part and what was done.

    write_example_dataset(folder, model_config)  ->  folder/example.yaml (+ folder/dataset_info.yaml)

    folder/t2i/part-0000{0,1}.parquet             image (bytes), captions (JSON string)
    folder/editing/example_edit/part-00000.parquet  image_list, instruction_list
    folder/editing/parquet_info/example_edit.json   {file: {"num_row_groups": n}} as upstream writes it
    folder/vlm/images/*.png, folder/vlm/example.jsonl   {"image", "conversations"}
    folder/text/example.jsonl                     {"text"}
    folder/example.yaml, folder/dataset_info.yaml

The transform sizes in the YAML follow ``model_config`` (its latent stride and grid, its ViT patch and
grid), so the same files serve the tiny model and BAGEL-7B-MoT. Deterministic given ``seed``.
"""

from __future__ import annotations

import io
import json
import os
import random
from typing import Any

import numpy as np

__all__ = ["write_example_dataset", "example_images"]

_PHOTOS = (("hopper", "grace_hopper.jpg"), ("pack", "Minduka_Present_Blue_Pack.png"), ("logo", "logo2.png"))
_MAPS = (
    ("terrain", "jacksboro_fault_dem.npz", "elevation", "gist_earth"),
    ("bathymetry", "topobathy.npz", "topo", "terrain"),
)
_MAX_EXAMPLES = 10_000  # per kind: each is an image written to disk (10**12 ran for ever)
_DESCRIPTIONS = {
    "hopper": "a portrait of grace hopper",
    "pack": "a blue present pack",
    "logo": "the matplotlib logo",
    "terrain": "a terrain map in green and brown",
    "bathymetry": "a map of sea depth and land height",
}


def example_images() -> dict[str, Any]:
    """The five source pictures as RGB ``PIL.Image`` objects, by name."""
    from matplotlib import cbook, colormaps
    from PIL import Image

    out = {}
    for name, fname in _PHOTOS:
        with cbook.get_sample_data(fname, asfileobj=True) as f:
            img = Image.open(f)
            img.load()
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            bg = Image.new("RGB", rgba.size, (255, 255, 255))
            bg.paste(rgba, mask=rgba.getchannel("A"))
            img = bg
        out[name] = img.convert("RGB")
    for name, fname, key, cmap in _MAPS:
        z = np.load(cbook.get_sample_data(fname, asfileobj=False))[key].astype(np.float64)
        z = (z - z.min()) / max(float(np.ptp(z)), 1e-9)
        rgb = (colormaps[cmap](z)[..., :3] * 255).astype(np.uint8)
        out[name] = Image.fromarray(rgb, "RGB")
    return out


def _crop(rng: random.Random, img: Any, out_side: tuple[int, int]) -> tuple[Any, str]:
    """A random crop (``region`` named by where it lies), resized to ``out_side`` (w, h)."""
    from PIL import Image

    W, H = img.size
    side = rng.randint(min(W, H) // 3, min(W, H))
    x, y = rng.randint(0, W - side), rng.randint(0, H - side)
    cx, cy = (x + side / 2) / W, (y + side / 2) / H
    region = ("top " if cy < 0.4 else "bottom " if cy > 0.6 else "") + (
        "left" if cx < 0.4 else "right" if cx > 0.6 else "centre"
    )
    region = region.strip() if region.strip() != "centre" or cy < 0.4 or cy > 0.6 else "centre"
    crop = img.crop((x, y, x + side, y + side)).resize(out_side, Image.BICUBIC)
    return crop, region


_EDITS = (
    ("flip", ("flip the image horizontally", "mirror it left to right")),
    ("upside", ("turn the image upside down", "flip it vertically")),
    ("dark", ("make the picture darker", "darken it")),
    ("grey", ("remove the colour", "make it black and white")),
)


def _edit(img: Any, kind: str) -> Any:
    from PIL import Image, ImageEnhance, ImageOps

    if kind == "flip":
        return ImageOps.mirror(img)
    if kind == "upside":
        return ImageOps.flip(img)
    if kind == "dark":
        return ImageEnhance.Brightness(img).enhance(0.5)
    return Image.merge("RGB", [img.convert("L")] * 3)


def _bytes(img: Any, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _write_parquet(path: str, columns: dict[str, list], row_group_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    pq.write_table(pa.table(columns), tmp, row_group_size=row_group_size)
    os.replace(tmp, path)


def _transform_sizes(model_config: Any) -> tuple[dict[str, int], dict[str, int], int, int]:
    """(VAE transform args, ViT transform args, VAE side, ViT side) for ``model_config``."""
    if model_config is None:
        stride, grid, patch, vgrid = 16, 64, 14, 70
    else:
        stride, grid = int(model_config.latent_downsample), int(model_config.max_latent_size)
        patch, vgrid = (
            int(model_config.vision_config.patch_size),
            int(model_config.vit_max_num_patch_per_side),
        )
    vae_max = min(grid, 8) * stride  # small images: a few dozen latent tokens each
    vit_max = min(vgrid, 8) * patch
    vae = {"image_stride": stride, "max_image_size": vae_max, "min_image_size": max(stride, vae_max // 2)}
    vit = {"image_stride": patch, "max_image_size": vit_max, "min_image_size": max(patch, vit_max // 2)}
    return vae, vit, vae_max, vit_max


def write_example_dataset(
    folder: str | os.PathLike,
    model_config: Any = None,
    *,
    seed: int = 0,
    num_t2i: int = 32,
    num_edit: int = 16,
    num_vlm: int = 24,
    num_text: int = 24,
) -> str:
    """Write the example dataset into ``folder`` (created) and return the path of its group YAML.

    ``model_config``: a ``bagel.BagelConfig`` whose strides and grids the transform sizes follow (None:
    BAGEL-7B-MoT's). Images are at most 8 latent / ViT patches a side, so packs stay small."""
    import yaml

    counts = {"num_t2i": num_t2i, "num_edit": num_edit, "num_vlm": num_vlm, "num_text": num_text}
    for name, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _MAX_EXAMPLES:
            raise ValueError(f"{name} must be an int in [1, {_MAX_EXAMPLES}], got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if model_config is not None and not all(
        hasattr(model_config, a) for a in ("latent_downsample", "max_latent_size", "vision_config")
    ):
        raise TypeError(
            f"model_config must be a bagel.BagelConfig or None, got {type(model_config).__name__}"
        )
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"folder {folder!r} exists and is not a folder")
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    pics = example_images()
    names = sorted(pics)
    vae_args, vit_args, vae_side, vit_side = _transform_sizes(model_config)
    side = max(vae_side, vit_side)

    def crop(rng: random.Random) -> tuple[Any, str, str]:
        name = names[rng.randrange(len(names))]
        w = rng.choice([side // 2, 3 * side // 4, side])
        h = rng.choice([side // 2, 3 * side // 4, side])
        img, region = _crop(rng, pics[name], (w, h))
        if rng.random() < 0.5:
            from PIL import ImageOps

            img = ImageOps.mirror(img)
        return img, name, region

    # text-to-image: two files, row groups of 8
    images, captions = [], []
    for _ in range(num_t2i):
        img, name, region = crop(rng)
        desc = _DESCRIPTIONS[name]
        captions.append(json.dumps({"caption": f"the {region} part of {desc}", "short": desc}))
        images.append(_bytes(img, "JPEG" if name == "hopper" else "PNG"))
    half = num_t2i // 2
    for k, (a, b) in enumerate(((0, half), (half, num_t2i))):
        _write_parquet(
            os.path.join(folder, "t2i", f"part-{k:05d}.parquet"),
            {"image": images[a:b], "captions": captions[a:b]},
            8,
        )

    # editing: chains of two or three images
    image_lists, instruction_lists = [], []
    for i in range(num_edit):
        img, _, _ = crop(rng)
        chain, instr = [img], []
        for _ in range(1 + (i % 3 == 0)):
            kind, phrasings = _EDITS[rng.randrange(len(_EDITS))]
            chain.append(_edit(chain[-1], kind))
            instr.append(list(phrasings))
        image_lists.append([_bytes(c, "PNG") for c in chain])
        instruction_lists.append(instr)
    edit_file = os.path.join(folder, "editing", "example_edit", "part-00000.parquet")
    _write_parquet(edit_file, {"image_list": image_lists, "instruction_list": instruction_lists}, 4)
    os.makedirs(os.path.join(folder, "editing", "parquet_info"), exist_ok=True)
    with open(os.path.join(folder, "editing", "parquet_info", "example_edit.json"), "w") as f:
        json.dump({edit_file: {"num_row_groups": (num_edit + 3) // 4}}, f)

    # understanding: images on disk, conversations in JSONL
    img_dir = os.path.join(folder, "vlm", "images")
    os.makedirs(img_dir, exist_ok=True)
    lines = []
    for i in range(num_vlm):
        img, name, region = crop(rng)
        fname = f"{i:04d}.png"
        img.save(os.path.join(img_dir, fname))
        if i % 4 == 3:
            img2, name2, _ = crop(rng)
            fname2 = f"{i:04d}_b.png"
            img2.save(os.path.join(img_dir, fname2))
            conv = [
                {"from": "human", "value": "<image>\n<image>\nWhat do the two pictures show?"},
                {
                    "from": "gpt",
                    "value": f"The first shows {_DESCRIPTIONS[name]}, the second {_DESCRIPTIONS[name2]}.",
                },
            ]
            lines.append({"id": i, "image": [fname, fname2], "conversations": conv})
        else:
            conv = [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": f"It is the {region} part of {_DESCRIPTIONS[name]}."},
                {"from": "human", "value": "Which picture is it from?"},
                {"from": "gpt", "value": f"From {_DESCRIPTIONS[name]}."},
            ]
            lines.append({"id": i, "image": fname, "conversations": conv})
    with open(os.path.join(folder, "vlm", "example.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)

    # text only
    os.makedirs(os.path.join(folder, "text"), exist_ok=True)
    with open(os.path.join(folder, "text", "example.jsonl"), "w") as f:
        for _ in range(num_text):
            a, b = rng.sample(names, 2)
            f.write(json.dumps({"text": f"{_DESCRIPTIONS[a]} is not {_DESCRIPTIONS[b]}."}) + "\n")

    groups = {
        "t2i_pretrain": {
            "dataset_names": ["example_t2i"],
            "image_transform_args": vae_args,
            "is_mandatory": True,
            "num_used_data": [2],
            "weight": 1,
        },
        "unified_edit": {
            "dataset_names": ["example_edit"],
            "image_transform_args": vae_args,
            "vit_image_transform_args": vit_args,
            "is_mandatory": False,
            "num_used_data": [1],
            "weight": 1,
        },
        "vlm_sft": {
            "dataset_names": ["example_vlm"],
            "image_transform_args": vit_args,
            "is_mandatory": True,
            "shuffle_lines": True,
            "shuffle_seed": 0,
            "num_used_data": [num_vlm],
            "weight": 1,
        },
        "text_pretrain": {
            "dataset_names": ["example_text"],
            "is_mandatory": False,
            "num_used_data": [num_text],
            "weight": 0.5,
        },
    }
    info = {
        "t2i_pretrain": {"example_t2i": {"data_dir": "t2i", "num_files": 2, "num_total_samples": num_t2i}},
        "unified_edit": {
            "example_edit": {
                "data_dir": "editing/example_edit",
                "num_files": 1,
                "num_total_samples": num_edit,
                "parquet_info_path": "editing/parquet_info/example_edit.json",
            }
        },
        "vlm_sft": {
            "example_vlm": {
                "data_dir": "vlm/images",
                "jsonl_path": "vlm/example.jsonl",
                "num_total_samples": num_vlm,
            }
        },
        "text_pretrain": {
            "example_text": {"jsonl_path": "text/example.jsonl", "num_total_samples": num_text}
        },
    }
    yaml_path = os.path.join(folder, "example.yaml")
    for path, data in ((os.path.join(folder, "dataset_info.yaml"), info), (yaml_path, groups)):
        with open(path + ".tmp", "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)
        os.replace(path + ".tmp", path)
    return yaml_path

"""Small datasets in upstream BAGEL's formats, written in a test's temporary folder: images made with
numpy (gradients and blocks, so resizing has something to do), parquet through pyarrow, JSONL by hand."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import yaml

from bagel import BagelConfig
from bagel.data.config import DataConfig


def image_bytes(w: int, h: int, fmt: str = "PNG", seed: int = 0, mode: str = "RGB") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack(
        [x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, int(rng.integers(0, 256)))], -1
    )
    img = Image.fromarray(base.astype(np.uint8), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_parquet(path: str, columns: dict, row_group_size: int = 4) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def write_jsonl(path: str, records: list) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


VAE_ARGS = {"image_stride": 16, "max_image_size": 64, "min_image_size": 16}
VIT_ARGS = {"image_stride": 4, "max_image_size": 16, "min_image_size": 8}


def write_config(folder: str, groups: dict, info: dict) -> str:
    """The group YAML and dataset_info.yaml in ``folder``; returns the YAML's path."""
    with open(os.path.join(folder, "dataset_info.yaml"), "w") as f:
        yaml.safe_dump(info, f)
    path = os.path.join(folder, "groups.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(groups, f)
    return path


def t2i_group(name: str = "t2i", files: int = 1, **kw) -> dict:
    return {
        "dataset_names": [name],
        "image_transform_args": VAE_ARGS,
        "num_used_data": [files],
        "weight": 1,
        **kw,
    }


def model_config(tokenizer) -> BagelConfig:
    """The tiny model with FLUX's 16 latent channels (stride 16 = 8 x 2), sized to ``tokenizer``."""
    return BagelConfig.tiny(vocab_size=len(tokenizer), latent_channels=16)


def data_config(yaml_path: str, **kw) -> DataConfig:
    base = dict(
        dataset_config_file=yaml_path,
        expected_num_tokens=1,
        max_num_tokens=512,
        max_num_tokens_per_sample=512,
        prefer_buffer_before=0,
        max_buffer_size=0,
        text_cond_dropout_prob=0.0,
        vit_cond_dropout_prob=0.0,
        vae_cond_dropout_prob=0.0,
        num_workers=0,
        seed=0,
        min_image_side=8,
    )
    base.update(kw)
    return DataConfig(**base)

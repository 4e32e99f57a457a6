"""Upstream BAGEL's ``PackedDataset`` and our loader on the same files, CPU time per pack and per sample.

    python benchmarks/bench_data_upstream.py --upstream PATH/TO/Bagel [--packs 20] [--tokens 16384]

``PATH/TO/Bagel`` is a checkout of ByteDance-Seed/Bagel (its ``data/`` package is imported from
there, unmodified). Its imports need pandas and OpenCV (``pip install pandas opencv-python-headless``,
into a folder on ``PYTHONPATH`` if you keep them out of the environment), torchvision's PIL transforms
and decord. Where no torchvision build matches the installed torch, a shim of the three transforms
upstream uses on PIL images (``F.resize`` = PIL bicubic resize, ``ToTensor``, ``Normalize``) is put in
front; decord (videos, unused here) is stubbed. The dataset is ``bench_data.py``'s (t2i, edit,
understanding; upstream has no text-only group, so both loaders read these three), BAGEL-7B-MoT's
image settings, 16k-token packs, everything in the main process with one torch thread.

Upstream's number includes its ``to_tensor`` (patchify, position ids, padded images); ours is the
loader's ``RawPack`` plus ``pack_samples`` with stand-in latents (what the trainer's process adds after
the VAE), printed separately and summed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import random
import sys
import tempfile
import time

_SHIM = {
    "torchvision/__init__.py": '"""PIL-path shim of torchvision for bench_data_upstream.py."""\n',
    "torchvision/transforms/__init__.py": """import enum
import numpy as np
import torch
from . import functional

class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"

class ToTensor:
    def __call__(self, pic):
        return torch.from_numpy(np.asarray(pic, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)

class Normalize:
    def __init__(self, mean, std, inplace=False):
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    def __call__(self, t):
        return t.sub_(self.mean).div_(self.std)
""",
    "torchvision/transforms/functional.py": """from PIL import Image
_MODES = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
def resize(img, size, interpolation=None, antialias=True):
    return img.resize((size[1], size[0]), _MODES[getattr(interpolation, "value", "bilinear")])
""",
    "decord/__init__.py": "class VideoReader:\n    def __init__(self, *a, **k):\n        raise RuntimeError('decord stub')\ndef cpu(*a, **k):\n    return None\n",
}


def _shim(folder: str, torchvision_too: bool) -> None:
    for rel, text in _SHIM.items():
        if rel.startswith("torchvision") and not torchvision_too:
            continue
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    sys.path.insert(0, folder)


def _torchvision_works() -> bool:
    try:
        from torchvision.transforms import functional  # noqa: F401

        return True
    except Exception:
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="a checkout of ByteDance-Seed/Bagel")
    p.add_argument("--packs", type=int, default=20)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--data", default=None, help="bench_data.py's dataset folder (default: write one)")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.upstream, "data", "dataset_base.py")):
        p.error(f"{args.upstream!r} is not a Bagel checkout (no data/dataset_base.py)")

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    import yaml

    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_data import VAE_ARGS, VIT_ARGS, VIT_EDIT_ARGS, fake_latents, write_bench_data

    from bagel import BagelConfig
    from bagel.data import DataConfig, add_special_tokens, build_loader, pack_samples, tiny_tokenizer

    D = args.data or tempfile.mkdtemp(prefix="bench_data_")
    if not os.path.isfile(os.path.join(D, "bench.yaml")):
        write_bench_data(D, args.rows)
    shim_dir = tempfile.mkdtemp(prefix="upstream_shim_")
    tv_shim = not _torchvision_works()
    _shim(shim_dir, tv_shim)
    sys.path.insert(0, os.path.abspath(args.upstream))
    from data import dataset_info
    from data.dataset_base import DataConfig as UpstreamDataConfig
    from data.dataset_base import PackedDataset

    tok = tiny_tokenizer()
    special, _ = add_special_tokens(tok)
    edit_file = os.path.join(D, "edit", "part-0.parquet")
    info_path = os.path.join(D, "edit_parquet_info.json")
    with open(info_path, "w") as f:
        json.dump({edit_file: {"num_row_groups": pq.ParquetFile(edit_file).num_row_groups}}, f)
    n_vlm = sum(1 for _ in open(os.path.join(D, "vlm", "data.jsonl")))
    dataset_info.DATASET_INFO.clear()
    dataset_info.DATASET_INFO.update(
        {
            "t2i_pretrain": {"t2i": {"data_dir": os.path.join(D, "t2i")}},
            "unified_edit": {"edit": {"data_dir": os.path.join(D, "edit"), "parquet_info_path": info_path}},
            "vlm_sft": {
                "vlm": {
                    "data_dir": os.path.join(D, "vlm"),
                    "jsonl_path": os.path.join(D, "vlm", "data.jsonl"),
                }
            },
        }
    )
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
    }
    T = args.tokens
    budgets = dict(
        expected_num_tokens=T,
        max_num_tokens=T * 5 // 4,
        max_num_tokens_per_sample=T,
        prefer_buffer_before=T // 2,
    )
    up_groups = copy.deepcopy(groups)
    for name, g in up_groups.items():
        g["num_used_data"] = [n_vlm if name == "vlm_sft" else 1]
        g.setdefault("is_mandatory", False)
    up_groups["vlm_sft"]["frame_sampler_args"] = {"max_num_frames": 12, "min_num_frames": 8}
    up_cfg = UpstreamDataConfig(
        grouped_datasets=up_groups,
        text_cond_dropout_prob=0.1,
        vit_cond_dropout_prob=0.3,
        vae_cond_dropout_prob=0.3,
        vae_image_downsample=16,
        max_latent_size=64,
        vit_patch_size=14,
        max_num_patch_per_side=70,
    )
    ids = dict(
        bos_token_id=special.bos,
        eos_token_id=special.eos,
        start_of_image=special.start_of_image,
        end_of_image=special.end_of_image,
    )
    random.seed(0)
    np.random.seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # upstream prints per pack
        ds = PackedDataset(
            up_cfg,
            tokenizer=tok,
            special_tokens=ids,
            local_rank=0,
            world_size=1,
            num_workers=1,
            use_flex=True,
            **budgets,
        )
        ds.set_epoch(42)
        it = iter(ds)
        next(it)
        c0 = time.process_time()
        up = [next(it) for _ in range(args.packs)]
        up_cpu = time.process_time() - c0
    up_n = sum(len(x["sample_lens"]) - 1 for x in up)

    with open(os.path.join(D, "cmp.yaml"), "w") as f:
        yaml.safe_dump(groups, f)
    with open(os.path.join(D, "cmp_info.yaml"), "w") as f:
        info = {"t2i_pretrain": {"t2i": {"data_dir": "t2i"}}, "unified_edit": {"edit": {"data_dir": "edit"}}}
        info["vlm_sft"] = {"vlm": {"data_dir": "vlm", "jsonl_path": "vlm/data.jsonl"}}
        yaml.safe_dump(info, f)
    config = BagelConfig.bagel_7b_mot(llm_layers=1, vit_layers=1)
    dc = DataConfig(
        dataset_config_file=os.path.join(D, "cmp.yaml"),
        dataset_info_file=os.path.join(D, "cmp_info.yaml"),
        num_workers=0,
        seed=0,
        **budgets,
    )
    loader = build_loader(dc, config, tok)
    it = iter(loader)
    next(it)
    c0 = time.process_time()
    ours = [next(it) for _ in range(args.packs)]
    our_cpu = time.process_time() - c0
    c0 = time.process_time()
    for raw in ours:
        pack_samples(
            fake_latents(raw.samples, config),
            config,
            max_num_tokens=dc.max_num_tokens,
            special_tokens=loader.special_tokens,
        )
    pack_cpu = time.process_time() - c0
    our_n = sum(len(x.samples) for x in ours)

    print(
        f"{args.packs} packs of >= {T} tokens (max {T * 5 // 4}), main process, 1 torch thread; torchvision shim: {tv_shim}\n"
    )
    print("| loader | CPU ms/pack | CPU ms/sample | samples/pack | tokens/pack |")
    print("|---|---|---|---|---|")
    up_tok = np.mean([x["sequence_length"] for x in up])
    print(
        f"| upstream PackedDataset (with to_tensor) | {up_cpu / args.packs * 1e3:.0f} | {up_cpu / up_n * 1e3:.1f} | {up_n / args.packs:.1f} | {up_tok:.0f} |"
    )
    total = our_cpu + pack_cpu
    our_tok = np.mean([x.num_tokens for x in ours])
    print(
        f"| ours: build_loader (RawPack) | {our_cpu / args.packs * 1e3:.0f} | {our_cpu / our_n * 1e3:.1f} | {our_n / args.packs:.1f} | {our_tok:.0f} |"
    )
    print(f"| ours: + pack_samples | {total / args.packs * 1e3:.0f} | {total / our_n * 1e3:.1f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

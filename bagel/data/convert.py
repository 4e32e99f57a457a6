"""Convert a plain folder of images with captions (or a JSONL of them) into upstream BAGEL's
text-to-image layout: parquet files with ``image`` (the file's bytes, unchanged) and ``captions`` (a JSON
string), plus a ``dataset_info.yaml`` and a group YAML that :func:`bagel.data.build_loader` reads.

Inputs (``source``):

- a folder: every image (``.jpg``, ``.jpeg``, ``.png``, ``.webp``, ``.bmp``, ``.gif``), searched
  recursively, with its caption in a text file of the same stem (``cat.jpg`` + ``cat.txt``); or a
  ``metadata.jsonl`` in the folder (Hugging Face ``imagefolder`` style: ``{"file_name", "text"}``);
- a JSONL file: ``{"image": path, "caption": str}`` (also ``file_name`` / ``text``; paths relative to
  the JSONL's folder); ``caption`` may also be a mapping of several captions.

Images without a caption are left out and counted; nothing is decoded or re-encoded (a bad image is
found and skipped by the loader). Files are written to temporary names and renamed when complete.

    bagel-convert SOURCE OUT [--name NAME] [--rows-per-file N] [--row-group-size N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["convert_folder", "ConvertResult", "main", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclass
class ConvertResult:
    """What :func:`convert_folder` wrote: the group YAML, the parquet files, rows, images left out."""

    yaml_path: str
    files: list[str]
    num_rows: int
    num_without_caption: int


def _pairs_from_folder(folder: str) -> tuple[list[tuple[str, object]], int]:
    meta = os.path.join(folder, "metadata.jsonl")
    if os.path.isfile(meta):
        return _pairs_from_jsonl(meta)
    pairs, missing = [], 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            txt = os.path.join(root, stem + ".txt")
            caption = ""
            if os.path.isfile(txt):
                with open(txt, encoding="utf-8", errors="replace") as fh:
                    caption = fh.read().strip()
            if caption:
                pairs.append((os.path.join(root, f), caption))
            else:
                missing += 1
    return pairs, missing


def _pairs_from_jsonl(path: str) -> tuple[list[tuple[str, object]], int]:
    base = os.path.dirname(os.path.abspath(path))
    pairs, missing = [], 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: a line must be a JSON object")
            img = rec.get("image", rec.get("file_name"))
            cap = rec.get("caption", rec.get("text"))
            if not isinstance(img, str) or not img:
                raise ValueError(f"{path}:{n}: needs an 'image' (or 'file_name') path")
            ok = (isinstance(cap, str) and cap.strip()) or (
                isinstance(cap, dict) and any(isinstance(v, str) and v.strip() for v in cap.values())
            )
            if ok:
                pairs.append((img if os.path.isabs(img) else os.path.join(base, img), cap))
            else:
                missing += 1
    return pairs, missing


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def convert_folder(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str = "my_t2i",
    rows_per_file: int = 1000,
    row_group_size: int = 100,
    image_stride: int = 16,
    max_image_size: int = 1024,
    min_image_size: int = 512,
) -> ConvertResult:
    """Write ``source`` (a folder or a JSONL, see the module docs) as t2i parquet files under
    ``out/<name>/`` and ``out/dataset_info.yaml`` + ``out/<name>.yaml`` (one ``t2i_pretrain`` group using
    every file, with the given transform sizes). Returns a :class:`ConvertResult`.

    Raises FileNotFoundError for a missing source or image, ValueError when nothing has a caption."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    source, out = os.fspath(source), os.fspath(out)
    _positive(rows_per_file, "rows_per_file")
    _positive(row_group_size, "row_group_size")
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"name must be a plain folder name, got {name!r}")
    if os.path.isdir(source):
        pairs, missing = _pairs_from_folder(source)
    elif os.path.isfile(source):
        pairs, missing = _pairs_from_jsonl(source)
    else:
        raise FileNotFoundError(f"source {source!r} is neither a folder nor a JSONL file")
    if not pairs:
        raise ValueError(f"{source!r}: no image with a caption found ({missing} image(s) without one)")
    data_dir = os.path.join(out, name)
    os.makedirs(data_dir, exist_ok=True)
    files = []
    for k in range(0, len(pairs), rows_per_file):
        chunk = pairs[k : k + rows_per_file]
        images, captions = [], []
        for path, cap in chunk:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"image {path!r} does not exist")
            with open(path, "rb") as f:
                images.append(f.read())
            captions.append(json.dumps(cap if isinstance(cap, dict) else {"caption": cap}))
        dest = os.path.join(data_dir, f"part-{k // rows_per_file:05d}.parquet")
        pq.write_table(
            pa.table({"image": images, "captions": captions}), dest + ".tmp", row_group_size=row_group_size
        )
        os.replace(dest + ".tmp", dest)
        files.append(dest)
    info_path = os.path.join(out, "dataset_info.yaml")
    info = {}
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            info = yaml.safe_load(f) or {}
    info.setdefault("t2i_pretrain", {})[name] = {
        "data_dir": name,
        "num_files": len(files),
        "num_total_samples": len(pairs),
    }
    group = {
        "t2i_pretrain": {
            "dataset_names": [name],
            "image_transform_args": {
                "image_stride": image_stride,
                "max_image_size": max_image_size,
                "min_image_size": min_image_size,
            },
            "is_mandatory": True,
            "num_used_data": [len(files)],
            "weight": 1,
        }
    }
    yaml_path = os.path.join(out, f"{name}.yaml")
    for path, data in ((info_path, info), (yaml_path, group)):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            yaml.safe_dump(data, f, sort_keys=False)
        os.replace(path + ".tmp", path)
    return ConvertResult(yaml_path, files, len(pairs), missing)


def main(argv: Sequence[str] | None = None) -> int:
    """``bagel-convert``: exit 0 on success, 2 on a usage error, 1 when the conversion fails."""
    parser = argparse.ArgumentParser(prog="bagel-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "source", help="a folder of images with same-stem .txt captions (or metadata.jsonl), or a JSONL"
    )
    parser.add_argument("out", help="output folder (parquet files, dataset_info.yaml, NAME.yaml)")
    parser.add_argument("--name", default="my_t2i", help="dataset name (default my_t2i)")
    parser.add_argument("--rows-per-file", type=int, default=1000)
    parser.add_argument("--row-group-size", type=int, default=100)
    args = parser.parse_args(argv)
    if args.rows_per_file < 1 or args.row_group_size < 1:
        parser.error("--rows-per-file and --row-group-size must be positive")
    try:
        res = convert_folder(
            args.source,
            args.out,
            name=args.name,
            rows_per_file=args.rows_per_file,
            row_group_size=args.row_group_size,
        )
    except (OSError, ValueError) as e:
        print(f"bagel-convert: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {res.num_rows} rows in {len(res.files)} file(s); {res.num_without_caption} image(s) without a caption "
        f"left out; dataset config: {res.yaml_path}"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

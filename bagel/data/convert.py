"""Convert a plain folder of images with captions (or a JSONL of them) into upstream BAGEL's
text-to-image layout: parquet files with ``image`` (the file's bytes, unchanged) and ``captions`` (a JSON
string), plus a ``dataset_info.yaml`` and a group YAML that :func:`bagel.data.build_loader` reads.

Inputs (``source``):

- a folder: every image (``.jpg``, ``.jpeg``, ``.png``, ``.webp``, ``.bmp``, ``.gif``), searched
  recursively, with its caption in a text file of the same stem (``cat.jpg`` + ``cat.txt``); or a
  ``metadata.jsonl`` in the folder (Hugging Face ``imagefolder`` style: ``{"file_name", "text"}``);
- a JSONL file: ``{"image": path, "caption": str}`` (also ``file_name`` / ``text``; paths relative to
  the JSONL's folder); ``caption`` may also be a mapping of several captions.

Images without a caption, and images that are missing or not readable files (a dangling symlink, a
folder named ``x.png``), are left out and counted; nothing is decoded or re-encoded (an image that
does not decode is found and skipped by the loader). Files are written to temporary names and renamed when complete.

Edits (``--edit``, :func:`convert_edits`): a JSONL of ``{"source", "target", "instruction"}`` (or chains
``{"images": [...], "instructions": [...]}``) becomes ``unified_edit`` parquet (``image_list``,
``instruction_list``).

    bagel-convert SOURCE OUT [--edit] [--name NAME] [--rows-per-file N] [--row-group-size N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["convert_folder", "convert_edits", "ConvertResult", "main", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclass
class ConvertResult:
    """What :func:`convert_folder` wrote: the group YAML, the parquet files, rows, images left out."""

    yaml_path: str
    files: list[str]
    num_rows: int
    num_without_caption: int
    num_unreadable: int = 0  # rows left out because an image is missing, not a file, or unreadable


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


def _jsonl_records(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line; ValueError naming ``path:line`` otherwise."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
                raise ValueError(f"{path}:{n}: not JSON ({type(e).__name__}: {e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: a line must be a JSON object, got a {type(rec).__name__}")
            yield n, rec


def _pairs_from_jsonl(path: str) -> tuple[list[tuple[str, object]], int]:
    base = os.path.dirname(os.path.abspath(path))
    pairs, missing = [], 0
    for n, rec in _jsonl_records(path):
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


_MAX_ROWS = 2**31 - 1  # pyarrow takes row counts as C longs: 2**70 was an OverflowError traceback


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_ROWS:
        raise ValueError(f"{name} must be an int in [1, {_MAX_ROWS}], got {value!r}")
    return value


def _usable(path: str) -> bool:
    """A regular file we may read (a dangling symlink, a symlink loop or a folder named .png is not)."""
    return os.path.isfile(path) and os.access(path, os.R_OK)


def _read(path: str) -> bytes:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist")
    with open(path, "rb") as f:
        return f.read()


def _write_dataset(
    out: str,
    name: str,
    group: str,
    rows: list,
    to_columns,
    rows_per_file: int,
    row_group_size: int,
    group_entry: dict,
) -> tuple[str, list[str]]:
    """Parquet files ``out/<name>/part-NNNNN.parquet`` (``to_columns(chunk)`` -> column dict), then
    ``out/dataset_info.yaml`` (merged with an existing one) and ``out/<name>.yaml`` (one group)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    data_dir = os.path.join(out, name)
    os.makedirs(data_dir, exist_ok=True)
    files = []
    for k in range(0, len(rows), rows_per_file):
        dest = os.path.join(data_dir, f"part-{k // rows_per_file:05d}.parquet")
        table = pa.table(to_columns(rows[k : k + rows_per_file]))
        pq.write_table(table, dest + ".tmp", row_group_size=row_group_size)
        os.replace(dest + ".tmp", dest)
        files.append(dest)
    info_path = os.path.join(out, "dataset_info.yaml")
    info = _existing_info(info_path)
    info.setdefault(group, {})[name] = {
        "data_dir": name,
        "num_files": len(files),
        "num_total_samples": len(rows),
    }
    spec = {group: {"dataset_names": [name], **group_entry, "num_used_data": [len(files)], "weight": 1}}
    yaml_path = os.path.join(out, f"{name}.yaml")
    for path, data in ((info_path, info), (yaml_path, spec)):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            yaml.safe_dump(data, f, sort_keys=False)
        os.replace(path + ".tmp", path)
    return yaml_path, files


def _existing_info(info_path: str) -> dict[str, Any]:
    """The dataset info already in the output folder (merged into), checked before anything is written."""
    import yaml

    if not os.path.exists(info_path):
        return {}
    try:
        with open(info_path, encoding="utf-8") as f:
            info = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(
            f"{info_path} exists but is not readable YAML ({' '.join(str(e).split())[:200]}); "
            "move it away or choose another output folder"
        ) from None
    if info is None:
        return {}
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise ValueError(
            f"{info_path} exists but is not a dataset info (group -> dataset -> paths): "
            f"{type(info).__name__}; move it away or choose another output folder"
        )
    return info


def _check_common(
    out: Any, name: str, rows_per_file: int, row_group_size: int, transforms: dict[str, dict[str, Any]]
) -> str:
    from bagel.data.config import ImageTransformArgs

    _positive(rows_per_file, "rows_per_file")
    _positive(row_group_size, "row_group_size")
    if (
        not isinstance(name, str)
        or not name
        or os.sep in name
        or name.startswith(".")
        or not name.isprintable()
    ):
        raise ValueError(f"name must be a plain folder name, got {name!r}")
    for where, args in transforms.items():  # what the loader will check, checked before writing
        ImageTransformArgs.from_dict(args, where)
    out = os.fspath(out)
    _existing_info(os.path.join(out, "dataset_info.yaml"))
    return out


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

    Raises FileNotFoundError for a missing source, ValueError when no readable image has a caption."""
    args = {"image_stride": image_stride, "max_image_size": max_image_size, "min_image_size": min_image_size}
    out = _check_common(out, name, rows_per_file, row_group_size, {"image_transform_args": args})
    source = os.fspath(source)
    if os.path.isdir(source):
        pairs, missing = _pairs_from_folder(source)
    elif os.path.isfile(source):
        pairs, missing = _pairs_from_jsonl(source)
    else:
        raise FileNotFoundError(f"source {source!r} is neither a folder nor a JSONL file")
    usable = [pair for pair in pairs if _usable(pair[0])]
    unreadable = len(pairs) - len(usable)
    pairs = usable
    if not pairs:
        raise ValueError(
            f"{source!r}: no image with a caption found ({missing} image(s) without one, {unreadable} "
            "missing or unreadable)"
        )

    def columns(chunk: list) -> dict:
        return {
            "image": [_read(path) for path, _ in chunk],
            "captions": [json.dumps(cap if isinstance(cap, dict) else {"caption": cap}) for _, cap in chunk],
        }

    entry = {"image_transform_args": args, "is_mandatory": True}
    yaml_path, files = _write_dataset(
        out, name, "t2i_pretrain", pairs, columns, rows_per_file, row_group_size, entry
    )
    return ConvertResult(yaml_path, files, len(pairs), missing, unreadable)


def convert_edits(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str = "my_edit",
    rows_per_file: int = 1000,
    row_group_size: int = 100,
    image_stride: int = 16,
    max_image_size: int = 1024,
    min_image_size: int = 512,
    vit_patch_size: int = 14,
    vit_max_image_size: int = 518,
    vit_min_image_size: int = 224,
) -> ConvertResult:
    """Write a JSONL of edits as ``unified_edit`` parquet files (``image_list``, ``instruction_list``)
    under ``out/<name>/``, plus ``out/dataset_info.yaml`` and ``out/<name>.yaml``.

    A line is ``{"source": path, "target": path, "instruction": str or [phrasings]}``, or a chain
    ``{"images": [p0, p1, ...], "instructions": [i01, i12, ...]}`` (each instruction a string or a list
    of phrasings); paths are relative to the JSONL's folder. A line without instruction text is left
    out and counted (``num_without_caption``), as is one with a missing or unreadable image
    (``num_unreadable``)."""
    transforms = {
        "image_transform_args": {
            "image_stride": image_stride,
            "max_image_size": max_image_size,
            "min_image_size": min_image_size,
        },
        "vit_image_transform_args": {
            "image_stride": vit_patch_size,
            "max_image_size": vit_max_image_size,
            "min_image_size": vit_min_image_size,
        },
    }
    out = _check_common(out, name, rows_per_file, row_group_size, transforms)
    source = os.fspath(source)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"source {source!r} is not a JSONL file")
    base = os.path.dirname(os.path.abspath(source))
    rows, missing = [], 0
    for n, rec in _jsonl_records(source):
        if "images" in rec:
            images, instructions = rec["images"], rec.get("instructions")
        else:
            images, instructions = [rec.get("source"), rec.get("target")], [rec.get("instruction")]
        if (
            not isinstance(images, list)
            or len(images) < 2
            or not all(isinstance(p, str) and p for p in images)
        ):
            raise ValueError(f"{source}:{n}: needs 'source' and 'target' paths (or 'images', two or more)")
        if not isinstance(instructions, list) or len(instructions) != len(images) - 1:
            raise ValueError(f"{source}:{n}: needs one instruction per edit ({len(images) - 1})")
        phrasings = [[x] if isinstance(x, str) else x for x in instructions]
        if not all(
            isinstance(x, list) and any(isinstance(t, str) and t.strip() for t in x) for x in phrasings
        ):
            missing += 1
            continue
        paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in images]
        rows.append((paths, [[t for t in x if isinstance(t, str) and t.strip()] for x in phrasings]))
    usable = [row for row in rows if all(_usable(p) for p in row[0])]
    unreadable = len(rows) - len(usable)
    rows = usable
    if not rows:
        raise ValueError(
            f"{source!r}: no edit with an instruction found ({missing} without one, {unreadable} with a "
            "missing or unreadable image)"
        )

    def columns(chunk: list) -> dict:
        return {
            "image_list": [[_read(p) for p in paths] for paths, _ in chunk],
            "instruction_list": [instr for _, instr in chunk],
        }

    entry = {**transforms, "is_mandatory": False}
    yaml_path, files = _write_dataset(
        out, name, "unified_edit", rows, columns, rows_per_file, row_group_size, entry
    )
    return ConvertResult(yaml_path, files, len(rows), missing, unreadable)


def main(argv: Sequence[str] | None = None) -> int:
    """``bagel-convert``: exit 0 on success, 2 on a usage error, 1 when the conversion fails."""
    parser = argparse.ArgumentParser(prog="bagel-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "source", help="a folder of images with same-stem .txt captions (or metadata.jsonl), or a JSONL"
    )
    parser.add_argument("out", help="output folder (parquet files, dataset_info.yaml, NAME.yaml)")
    parser.add_argument(
        "--edit", action="store_true", help="SOURCE is a JSONL of edits (source, target, instruction)"
    )
    parser.add_argument("--name", default=None, help="dataset name (default my_t2i, or my_edit with --edit)")
    parser.add_argument("--rows-per-file", type=int, default=1000)
    parser.add_argument("--row-group-size", type=int, default=100)
    args = parser.parse_args(argv)
    for flag, value in (("--rows-per-file", args.rows_per_file), ("--row-group-size", args.row_group_size)):
        if not 1 <= value <= _MAX_ROWS:
            parser.error(f"{flag} must be in [1, {_MAX_ROWS}], got {value}")
    convert = convert_edits if args.edit else convert_folder
    name = args.name or ("my_edit" if args.edit else "my_t2i")
    try:
        res = convert(
            args.source,
            args.out,
            name=name,
            rows_per_file=args.rows_per_file,
            row_group_size=args.row_group_size,
        )
    except (OSError, ValueError) as e:
        print(f"bagel-convert: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {res.num_rows} rows in {len(res.files)} file(s); {res.num_without_caption} "
        f"{'edit(s) without an instruction' if args.edit else 'image(s) without a caption'} and "
        f"{res.num_unreadable} with a missing or unreadable image left out; dataset config: {res.yaml_path}"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

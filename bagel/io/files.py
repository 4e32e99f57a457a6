"""Readers of checkpoint files that need no model: JSON objects, safetensors headers (validated against
the file without reading tensor data), and the weight files of a checkpoint folder.

This is the lowest room of ``bagel``: it imports nothing else from the package, so that the config
(``bagel.model.config``), the checkpoint loader (``bagel.io.checkpoint``) and the tools above can all read
files without an import circle.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct

__all__ = [
    "WEIGHTS_NAME",
    "ST_FLOAT_DTYPES",
    "ST_ITEMSIZE",
    "find_weight_files",
    "read_json",
    "read_safetensors_header",
]

WEIGHTS_NAME = "ema.safetensors"
_FALLBACK_NAMES = ("model.safetensors",)
_INDEX_NAMES = ("ema.safetensors.index.json", "model.safetensors.index.json")


def read_json(file: str | os.PathLike) -> dict:
    """A JSON object from ``file``; ValueError naming the file for bytes that are not UTF-8, text that
    is not JSON, or JSON that is not an object."""
    file = os.fspath(file)
    try:
        with open(file, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ValueError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file}: not UTF-8 text (byte {exc.start}); expected a JSON file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{file}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


# safetensors dtype name -> bytes per element
ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
ST_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on the JSON header


def _allowed_roots(folder: str) -> list[str]:
    """Real paths under which the files of checkpoint ``folder`` may live: the folder itself, plus, for
    a Hugging Face cache snapshot (``.../models--X/snapshots/<rev>``), that repository's ``blobs/``."""
    root = os.path.realpath(folder)
    roots = [root]
    parent = os.path.dirname(root)
    if os.path.basename(parent) == "snapshots":
        blobs = os.path.join(os.path.dirname(parent), "blobs")
        if os.path.isdir(blobs):
            roots.append(os.path.realpath(blobs))
    return roots


def _inside(path: str, roots: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, r]) == r for r in roots)


def _shard_path(folder: str, name, index_file: str, roots: list[str]) -> str:
    """``folder/name`` for a shard listed in an index, refusing names that leave the folder."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index_file}: weight_map values must be shard file names, got {name!r}")
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(
            f"{index_file}: weight_map names the shard {name!r}, which is outside the checkpoint folder "
            f"{folder!r}; shard names must be relative paths inside it"
        )
    path = os.path.join(folder, name)
    if not _inside(path, roots):
        raise ValueError(
            f"{index_file}: the shard {name!r} resolves to {os.path.realpath(path)!r}, outside the "
            f"checkpoint folder {folder!r} (a symlink leading out is refused)"
        )
    if not os.path.isfile(path):
        raise ValueError(
            f"{index_file}: the shard {name!r} listed in weight_map does not exist in {folder!r}"
        )
    return path


def find_weight_files(path: str | os.PathLike) -> list[str]:
    """The safetensors files of a checkpoint directory: ``ema.safetensors``, else ``model.safetensors``,
    else the shards listed by an ``*.safetensors.index.json`` (each inside the directory)."""
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return [path]
    roots = _allowed_roots(path) if os.path.isdir(path) else []
    for name in (WEIGHTS_NAME, *_FALLBACK_NAMES):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            if not _inside(f, roots):
                raise ValueError(
                    f"{f} resolves to {os.path.realpath(f)!r}, outside the checkpoint folder {path!r} "
                    "(a symlink leading out is refused)"
                )
            return [f]
    for name in _INDEX_NAMES:
        f = os.path.join(path, name)
        if os.path.isfile(f):
            weight_map = read_json(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{f}: field 'weight_map' must be a non-empty object {{key: shard file}}")
            names = set()
            for key, shard in weight_map.items():
                if not isinstance(shard, str):
                    raise ValueError(f"{f}: weight_map[{key!r}] must be a shard file name, got {shard!r}")
                names.add(shard)
            return [_shard_path(path, s, f, roots) for s in sorted(names)]
    raise ValueError(f"no {WEIGHTS_NAME} (or model.safetensors / safetensors index) found in {path!r}")


def read_safetensors_header(file: str) -> dict:
    """The JSON header of a safetensors file (``{key: {"dtype", "shape", "data_offsets"}}``), without
    reading any tensor data, validated against the file: ValueError naming the file (and the key and
    field) when the header length, the JSON, a dtype, a shape or a tensor's byte range is wrong, e.g.
    for random bytes, a file cut short, or another format."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(
                    f"{file}: not a safetensors file: {size} bytes, fewer than the 8-byte header length"
                )
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise ValueError(
                    f"{file}: header length field says {n} bytes but the file holds {size - 8} after it "
                    f"(limit {_MAX_HEADER}): not a safetensors file, or cut short"
                )
            raw = f.read(n)
    except OSError as exc:
        raise ValueError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) < n:
        raise ValueError(f"{file}: header cut short ({len(raw)} of {n} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{file}: the safetensors header is not UTF-8: not a safetensors file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: the safetensors header is not valid JSON ({exc.msg})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: the safetensors header must be a JSON object, got {type(header).__name__}")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError(f"{file}: field '__metadata__' must map strings to strings")
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        where = f"{file}: tensor {key!r}"
        if not isinstance(info, dict):
            raise ValueError(f"{where}: expected an object with dtype, shape and data_offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in ST_ITEMSIZE:
            raise ValueError(f"{where}: field 'dtype' = {dtype!r} is not a safetensors dtype")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ValueError(f"{where}: field 'shape' = {shape!r} must be a list of non-negative ints")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise ValueError(
                f"{where}: field 'data_offsets' = {offsets!r} must be [begin, end] within the file's "
                f"{data_len} data bytes (a file cut short?)"
            )
        nbytes = math.prod(shape) * ST_ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(
                f"{where}: field 'data_offsets' = {offsets} spans {offsets[1] - offsets[0]} bytes but "
                f"{dtype} {shape} needs {nbytes}"
            )
        spans.append((offsets[0], offsets[1], key))
    spans.sort()
    for (_, end, a), (begin, _, b) in itertools.pairwise(spans):
        if begin < end:
            raise ValueError(f"{file}: the data of tensors {a!r} and {b!r} overlap")
    return header

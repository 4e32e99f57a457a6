"""Readers for upstream BAGEL's dataset formats: addressable sources (parquet row groups, JSONL lines)
and the builders that turn one raw record into one sample (a list of ``bagel.data.packing`` segments).

Formats (as upstream's ``data/`` reads them):

- ``t2i_pretrain`` parquet: column ``image`` (encoded image bytes), column ``captions`` (a JSON string
  ``{"key": "caption", ...}``; one caption is chosen at random). Sample: the caption (no loss, dropped
  with ``text_cond_dropout_prob``), then the image to generate (VAE, ``noise``, MSE).
- ``unified_edit`` parquet: ``image_list`` (a chain of image bytes) and ``instruction_list``
  (``instruction_list[i]``: phrasings of the edit from image ``i`` to ``i + 1``). A random sub-chain
  ``start -> end`` is drawn as upstream does: the source image as a clean VAE image and a ViT image
  (each dropped with its CFG probability), the instruction(s) (no loss, CFG dropout), intermediate
  images generated and then given clean (VAE + ViT), and the final image generated (MSE).
- ``vlm_sft`` JSONL: ``{"image": "a.jpg" | ["a.jpg", ...], "conversations": [{"from": "human" |
  "gpt", "value": "..."}]}``; image paths are relative to the dataset's ``data_dir``; ``<image>`` in a
  human turn marks where an image goes. Human text carries no loss, gpt answers carry CE; no CFG
  dropout. ViT images are resized with ``img_num`` = the number of images (area budget shared).
- ``text_pretrain`` JSONL (ours): ``{"text": "..."}`` (CE on all of it) or ``{"conversations": ...}``
  without images (CE on the gpt turns).

Every problem with one record raises :class:`bagel.data.transforms.SkipSample`; problems that make a
whole dataset unusable (no files, a missing column, an unreadable file list) raise ValueError at build
time naming the files.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from bagel.data.config import DataConfig, DatasetInfo, GroupSpec
from bagel.data.packing import DroppedImage, Segment, Text, VaeImage, VitImage
from bagel.data.tokenizer import encode_text
from bagel.data.transforms import ImageTransform, SkipSample, open_image

__all__ = [
    "ParquetSource",
    "JsonlSource",
    "SampleBuilder",
    "parquet_files",
    "build_sources",
    "PARQUET_COLUMNS",
]

logger = logging.getLogger("bagel.data")

MAX_FILE_REPEATS = 1000  # num_used_data may cycle through a dataset's parquet files at most this many times

PARQUET_COLUMNS = {"t2i_pretrain": ("image", "captions"), "unified_edit": ("image_list", "instruction_list")}


# ---------------------------------------------------------------------------------------------- sources
def parquet_files(info: DatasetInfo, num_used: int | None) -> list[str]:
    """The dataset's ``*.parquet`` files (sorted); ``num_used``: that many, cycling through the files
    when more are asked for than exist (upstream's ``get_parquet_data_paths``)."""
    d = info.data_dir
    if d is None or not os.path.isdir(d):
        raise ValueError(f"dataset {info.name!r}: data_dir {d!r} is not a folder")
    files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".parquet"))
    if not files:
        raise ValueError(f"dataset {info.name!r}: no .parquet files in {d!r}")
    if num_used is None:
        return files
    if num_used > len(files) * MAX_FILE_REPEATS:
        # cycling is upstream's way to weigh a dataset up; past this it only builds a huge list
        raise ValueError(
            f"dataset {info.name!r}: num_used_data={num_used} would read each of its {len(files)} "
            f"parquet file(s) {num_used // len(files)} times per epoch (at most {MAX_FILE_REPEATS}); "
            "use the group's weight to sample it more often"
        )
    return (files * (num_used // len(files) + 1))[:num_used]


class ParquetSource:
    """Records of parquet files, addressed by unit = one row group of one file, and row within it.

    ``unit_sizes[u]`` = rows of unit ``u``. Only ``columns`` are read; the last row group read is
    cached (rows of a unit are visited together)."""

    def __init__(self, name: str, files: list[str], columns: tuple[str, ...]):
        import pyarrow.parquet as pq

        self.name = name
        self.files = files
        self.columns = columns
        units, sizes, bad = [], [], []
        meta_cache: dict[str, Any] = {}
        for fi, path in enumerate(files):
            try:
                if path not in meta_cache:
                    pf = pq.ParquetFile(path)
                    meta_cache[path] = (
                        pf.schema_arrow.names,
                        [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)],
                    )
                names, rows = meta_cache[path]
            except Exception as e:
                bad.append(f"{path} ({type(e).__name__}: {e})")
                continue
            missing = [c for c in columns if c not in names]
            if missing:
                raise ValueError(f"dataset {name!r}: {path} lacks the column(s) {missing} (has {names})")
            for rg, n in enumerate(rows):
                if n > 0:
                    units.append((fi, rg))
                    sizes.append(n)
        if bad:
            logger.warning(
                "dataset %r: %d unreadable parquet file(s) left out: %s", name, len(bad), "; ".join(bad[:5])
            )
        if not units:
            raise ValueError(
                f"dataset {name!r} has no rows: files {files[:8]}"
                + (f"; unreadable: {bad[:5]}" if bad else "")
            )
        self.units = units
        self.unit_sizes = np.asarray(sizes, dtype=np.int64)
        self._cache: tuple[int, int, Any] | None = None

    def describe(self) -> str:
        return ", ".join(sorted(set(self.files))[:8])

    def __getstate__(self) -> dict[str, Any]:  # worker processes start without the cached row group
        return {**self.__dict__, "_cache": None}

    def read(self, unit: int, row: int) -> dict[str, Any]:
        import pyarrow.parquet as pq

        pid = os.getpid()
        if self._cache is None or self._cache[0] != pid or self._cache[1] != unit:
            fi, rg = self.units[unit]
            try:
                table = pq.ParquetFile(self.files[fi]).read_row_group(rg, columns=list(self.columns))
                cols = {c: table.column(c).to_pylist() for c in self.columns}
            except Exception as e:
                self._cache = None
                raise SkipSample(
                    "bad_record", f"{self.files[fi]} row group {rg}: {type(e).__name__}: {e}"
                ) from None
            self._cache = (pid, unit, cols)
        cols = self._cache[2]
        return {c: cols[c][row] for c in self.columns}

    def where(self, unit: int, row: int) -> str:
        fi, rg = self.units[unit]
        return f"{self.files[fi]} row group {rg} row {row}"


class JsonlSource:
    """Records of a JSONL file: one unit per non-blank line. ``num_used``: the first that many lines
    (after shuffling them with ``shuffle_seed`` when ``shuffle_lines``), as upstream's SFT reader."""

    def __init__(
        self,
        name: str,
        path: str,
        num_used: int | None,
        *,
        shuffle_lines: bool = False,
        shuffle_seed: int = 0,
    ):
        if not os.path.isfile(path):
            what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
            raise ValueError(f"dataset {name!r}: jsonl_path {path!r} {what}")
        offsets = []
        with open(path, "rb") as f:
            pos = 0
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        if shuffle_lines:
            random.Random(shuffle_seed).shuffle(offsets)
        if num_used is not None:
            offsets = offsets[:num_used]
        if not offsets:
            raise ValueError(f"dataset {name!r}: {path} has no lines")
        self.name = name
        self.path = path
        self.files = [path]
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.unit_sizes = np.ones(len(offsets), dtype=np.int64)
        self._fh: tuple[int, Any] | None = None

    def describe(self) -> str:
        return self.path

    def __getstate__(self) -> dict[str, Any]:  # an open file does not travel to a spawned worker
        return {**self.__dict__, "_fh": None}

    def read(self, unit: int, row: int) -> Any:
        pid = os.getpid()
        if self._fh is None or self._fh[0] != pid:
            self._fh = (pid, open(self.path, "rb"))  # noqa: SIM115 - kept open for the stream's life
        fh = self._fh[1]
        fh.seek(int(self.offsets[unit]))
        line = fh.readline()
        try:
            rec = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # deep nesting: RecursionError
            raise SkipSample("bad_record", f"{self.path}: not JSON ({type(e).__name__}: {e})") from None
        if not isinstance(rec, dict):
            raise SkipSample("bad_record", f"{self.path}: a line is a {type(rec).__name__}, not an object")
        return rec

    def where(self, unit: int, row: int) -> str:
        return f"{self.path} byte {int(self.offsets[unit])}"


def build_sources(group: GroupSpec) -> list[ParquetSource | JsonlSource]:
    """One source per dataset of ``group``."""
    out: list[ParquetSource | JsonlSource] = []
    for info, used in zip(group.datasets, group.num_used_data, strict=True):
        if group.file_format == "parquet":
            out.append(ParquetSource(info.name, parquet_files(info, used), PARQUET_COLUMNS[group.name]))
        else:
            out.append(
                JsonlSource(
                    info.name,
                    info.jsonl_path,
                    used,
                    shuffle_lines=group.shuffle_lines,
                    shuffle_seed=group.shuffle_seed,
                )
            )
    return out


# ---------------------------------------------------------------------------------------------- builders
@dataclass
class SampleBuilder:
    """Turns raw records of one group into samples (lists of segments; VAE images as pixels).

    ``vae_transform`` / ``vit_transform``: the group's transforms (None when the group has no such
    image); ``rng``: the sample's own generator (keyed by its identity, so a re-read gives the same
    sample)."""

    group: GroupSpec
    config: DataConfig
    tokenizer: Any
    vae_transform: ImageTransform | None
    vit_transform: ImageTransform | None

    def build(self, record: Any, rng: random.Random, image_dir: str | None) -> list[Segment]:
        kind = self.group.name
        if kind == "t2i_pretrain":
            return self._t2i(record, rng)
        if kind == "unified_edit":
            return self._edit(record, rng)
        if kind == "vlm_sft":
            return self._conversation(record, image_dir, allow_images=True)
        return self._text(record)

    # --- helpers
    def _ids(self, text: Any, what: str) -> list[int]:
        if not isinstance(text, str):
            raise SkipSample("unknown_field", f"{what} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise SkipSample("empty_text", what)
        ids = self._encode(text, what)
        if not ids:
            raise SkipSample("empty_text", f"{what} tokenizes to nothing")
        return ids

    def _encode(self, text: str, what: str) -> list[int]:
        try:
            return encode_text(self.tokenizer, text)
        except ValueError as e:  # not valid Unicode (a lone surrogate from a JSON escape)
            raise SkipSample("bad_record", f"{what}: {e}") from None

    def _image(self, source: Any) -> Any:
        if isinstance(source, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            source = source.get("bytes") or source.get("path")
            if source is None:
                raise SkipSample("missing_field", "an image with neither bytes nor path")
        return open_image(
            source, min_side=self.config.min_image_side, max_pixels=self.config.max_image_pixels
        )

    def _field(self, record: dict[str, Any], key: str) -> Any:
        value = record.get(key)
        if value is None:
            raise SkipSample("missing_field", key)
        return value

    # --- kinds
    def _t2i(self, record: dict[str, Any], rng: random.Random) -> list[Segment]:
        image = self._image(self._field(record, "image"))
        raw = self._field(record, "captions")
        if isinstance(raw, (bytes, bytearray)):
            raw = raw.decode("utf-8", errors="replace")
        try:
            caps = json.loads(raw) if isinstance(raw, str) else raw
        except (ValueError, RecursionError):  # RecursionError: nested too deep for the decoder
            raise SkipSample("bad_record", "captions is not a JSON object") from None
        if not isinstance(caps, dict):
            raise SkipSample("unknown_field", f"captions must be a JSON object, got {type(caps).__name__}")
        texts = [v for v in caps.values() if isinstance(v, str) and v.strip()]
        if not texts:
            raise SkipSample("empty_text", "no caption")
        ids = self._ids(texts[rng.randrange(len(texts))], "caption")
        pixels = self.vae_transform(image)
        segs: list[Segment] = []
        if not rng.random() < self.config.text_cond_dropout_prob:
            segs.append(Text(ids, loss=False))
        segs.append(VaeImage(pixels=pixels, noised=True, timestep=rng.gauss(0.0, 1.0)))
        return segs

    def _edit(self, record: dict[str, Any], rng: random.Random) -> list[Segment]:
        images = self._field(record, "image_list")
        instructions = self._field(record, "instruction_list")
        if not isinstance(images, (list, tuple)) or not isinstance(instructions, (list, tuple)):
            raise SkipSample("unknown_field", "image_list and instruction_list must be lists")
        n = len(images)
        if n < 2:
            raise SkipSample("missing_field", f"image_list has {n} image(s); an edit needs 2")
        if len(instructions) < n - 1:
            raise SkipSample(
                "missing_field", f"{n} images need {n - 1} instructions, got {len(instructions)}"
            )
        cfg = self.config

        def instruction(i: int) -> str:
            options = instructions[i]
            if isinstance(options, str):
                options = [options]
            if not isinstance(options, (list, tuple)):
                raise SkipSample("unknown_field", f"instruction_list[{i}] must be a list of strings")
            options = [o for o in options if isinstance(o, str) and o.strip()]
            if not options:
                raise SkipSample("empty_text", f"instruction_list[{i}]")
            return options[rng.randrange(len(options))]

        segs: list[Segment] = []

        def condition(img: Any) -> None:  # a clean image: VAE then ViT, each with CFG dropout
            drop_vae = rng.random() < cfg.vae_cond_dropout_prob
            drop_vit = rng.random() < cfg.vit_cond_dropout_prob
            segs.append(
                DroppedImage("vae") if drop_vae else VaeImage(pixels=self.vae_transform(img), noised=False)
            )
            segs.append(DroppedImage("vit") if drop_vit else VitImage(self.vit_transform(img)))

        def generate(img: Any) -> None:
            segs.append(VaeImage(pixels=self.vae_transform(img), noised=True, timestep=rng.gauss(0.0, 1.0)))

        def text(s: str) -> None:
            ids = self._ids(s, "instruction")
            if not rng.random() < cfg.text_cond_dropout_prob:
                segs.append(Text(ids, loss=False))

        start = rng.randrange(n - 1)
        end = rng.randrange(start + 1, min(start + 3, n))
        condition(self._image(images[start]))
        if end - start > 1 and rng.random() < 0.5:  # several edits given as one instruction
            if end == n - 1:
                end -= 1
            text(" ".join(instruction(i - 1).rstrip(". ") + "." for i in range(start + 1, end + 1)))
            generate(self._image(images[end]))
        else:
            for i in range(start + 1, end + 1):
                text(instruction(i - 1))
                img = self._image(images[i])
                generate(img)
                if i != end:
                    condition(img)
        return segs

    def _conversation(
        self, record: dict[str, Any], image_dir: str | None, allow_images: bool
    ) -> list[Segment]:
        if "video" in record:
            raise SkipSample("video_unsupported")
        paths: list[Any] = []
        if "image" in record and record["image"] is not None:
            if not allow_images:
                raise SkipSample("unknown_field", "image in a text-only dataset")
            paths = record["image"] if isinstance(record["image"], list) else [record["image"]]
        turns = self._field(record, "conversations")
        if not isinstance(turns, list) or not turns:
            raise SkipSample("unknown_field", "conversations must be a non-empty list")
        placeholders = 0
        for t in turns:
            if (
                not isinstance(t, dict)
                or t.get("from") not in ("human", "gpt")
                or not isinstance(t.get("value"), str)
            ):
                raise SkipSample(
                    "unknown_field", f"a turn must be {{'from': 'human'|'gpt', 'value': str}}, got {t!r:.80}"
                )
            if t["from"] == "human":
                placeholders += t["value"].count("<image>")
        if placeholders != len(paths):
            raise SkipSample(
                "image_placeholder_mismatch", f"{placeholders} <image> for {len(paths)} image(s)"
            )
        pixels = []
        for p in paths:
            if not isinstance(p, str) or not p:
                raise SkipSample("unknown_field", f"an image path must be a string, got {p!r}")
            full = p if os.path.isabs(p) or image_dir is None else os.path.join(image_dir, p)
            pixels.append(self.vit_transform(self._image(full), img_num=len(paths)))
        segs: list[Segment] = []
        k = 0
        for t in turns:
            if t["from"] == "gpt":
                ids = self._encode(t["value"], "a gpt turn")
                if ids:
                    segs.append(Text(ids, loss=True))
                continue
            parts = t["value"].split("<image>")
            for j, part in enumerate(parts):
                ids = self._encode(part.strip(), "a human turn") if part.strip() else []
                if ids:
                    segs.append(Text(ids, loss=False))
                if j < len(parts) - 1:
                    segs.append(VitImage(pixels[k]))
                    k += 1
        if not any(isinstance(s, Text) and s.loss for s in segs):
            raise SkipSample("no_loss", "no gpt answer with text")
        return segs

    def _text(self, record: dict[str, Any]) -> list[Segment]:
        if "text" in record:
            return [Text(self._ids(record["text"], "text"), loss=True)]
        if "conversations" in record:
            return self._conversation(record, None, allow_images=False)
        raise SkipSample("missing_field", "text (or conversations)")

"""Typed configuration of the data pipeline: :class:`DataConfig` (the loader's knobs, embedded in the
trainer's config tree) and the dataset-group YAML of upstream BAGEL (``data/configs/*.yaml``) with its
dataset info (upstream's ``DATASET_INFO``), read into :class:`GroupSpec` / :class:`DatasetInfo`.

The group YAML, as upstream writes it::

    t2i_pretrain:                  # the group name is its kind: t2i_pretrain, unified_edit, vlm_sft,
      dataset_names: [t2i]         #   or text_pretrain (plain text JSONL, ours)
      image_transform_args: {image_stride: 16, max_image_size: 1024, min_image_size: 512}
      is_mandatory: true           # one sample of this group opens every pack
      num_used_data: [10]          # per dataset: parquet files (parquet kinds) or JSONL lines (JSONL kinds)
      weight: 1                    # sampling weight among the groups

The dataset info (``dataset_info.yaml``, or JSON; upstream keeps it in ``data/dataset_info.py``) maps
group -> dataset name -> ``{data_dir, jsonl_path, num_files, num_total_samples, parquet_info_path}``;
relative paths are taken from the info file's folder.

Unknown keys are errors everywhere, with the key and the allowed names in the message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DataConfig",
    "GROUP_KINDS",
    "ImageTransformArgs",
    "GroupSpec",
    "DatasetInfo",
    "load_groups",
    "field_docs",
    "MAX_NUM_TOKENS",
    "MAX_BUFFER_SIZE",
    "MAX_PREFETCH_FACTOR",
    "MAX_TRANSFORM_SIDE",
    "MAX_TRANSFORM_PIXELS",
]

# group kind -> file format of its datasets
GROUP_KINDS = {
    "t2i_pretrain": "parquet",  # columns: image (bytes), captions (JSON string {key: caption})
    "unified_edit": "parquet",  # columns: image_list (list of bytes), instruction_list (list of lists of str)
    "vlm_sft": "jsonl",  # {"image": path or [paths], "conversations": [{"from": "human"|"gpt", "value"}]}
    "text_pretrain": "jsonl",  # {"text": "..."} or {"conversations": [...]} without images
}


# upper bounds on knobs whose huge values would hang or exhaust memory instead of failing
MAX_NUM_TOKENS = 2**30 - 2  # the attention kernels' limit on a packed sequence (int32 offsets, halved)
MAX_BUFFER_SIZE = 1000  # samples (with their pixels) waiting in the overflow buffer; upstream uses 50
MAX_PREFETCH_FACTOR = 64  # packs each worker prepares ahead (the stream is endless)
MAX_TRANSFORM_SIDE = 2**15  # image_transform_args sides and stride, in pixels
MAX_TRANSFORM_PIXELS = 2**26  # image_transform_args.max_pixels (an 8192 x 8192 image)


def _check_int(value: Any, name: str, minimum: int | None = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _check_prob(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def _refuse_unknown(d: Any, allowed: list[str] | tuple[str, ...], where: str) -> None:
    if not isinstance(d, dict):
        raise TypeError(f"{where} must be a mapping, got {type(d).__name__}")
    unknown = sorted(str(k) for k in d if k not in allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")


# ---------------------------------------------------------------------------------------------- DataConfig
@dataclass
class DataConfig:
    """The data pipeline's settings. Defaults follow upstream BAGEL's training script.

    Attributes:
        dataset_config_file: the dataset-group YAML (upstream's ``data/configs/example.yaml`` format).
        dataset_info_file: where each dataset's files are (upstream's ``DATASET_INFO``, as YAML or
            JSON); None: ``dataset_info.yaml`` next to ``dataset_config_file``.
        expected_num_tokens: a pack is handed over once it holds at least this many tokens.
        max_num_tokens: a pack never holds more tokens than this (and is padded to it for flex).
        max_num_tokens_per_sample: samples with more tokens are dropped or truncated (``long_samples``).
        prefer_buffer_before: while a pack holds fewer tokens, samples come from the overflow buffer first.
        max_buffer_size: samples that did not fit the current pack wait in a buffer of this size; when it
            is full, a sample that does not fit closes the pack and opens the next one.
        long_samples: "drop" a sample over ``max_num_tokens_per_sample`` (upstream), or "truncate" its
            trailing text when the sample ends in text and the text keeps at least one token (else drop);
            a truncated text still closes with ``<|im_end|>``, which then carries a CE label.
        text_cond_dropout_prob: probability that a conditioning text (t2i caption, edit instruction) is
            dropped, for classifier-free guidance.
        vit_cond_dropout_prob: the same for a conditioning ViT image (edit source).
        vae_cond_dropout_prob: the same for a clean conditioning VAE image (edit source).
        num_workers: DataLoader worker processes per rank (0: packs are built in the main process).
        prefetch_factor: packs each worker prepares ahead (with ``num_workers > 0``).
        seed: the data seed: shuffling, group choice, dropout, caption choice, timesteps.
        min_image_side: source images with a side below this many pixels are skipped ("image_too_small").
        max_image_pixels: source images with more pixels are skipped before decoding ("image_too_large").
    """

    dataset_config_file: str = ""
    dataset_info_file: str | None = None
    expected_num_tokens: int = 32768
    max_num_tokens: int = 36864
    max_num_tokens_per_sample: int = 16384
    prefer_buffer_before: int = 16384
    max_buffer_size: int = 50
    long_samples: str = "drop"
    text_cond_dropout_prob: float = 0.1
    vit_cond_dropout_prob: float = 0.3
    vae_cond_dropout_prob: float = 0.3
    num_workers: int = 4
    prefetch_factor: int = 2
    seed: int = 42
    min_image_side: int = 16
    max_image_pixels: int = 200_000_000

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (types and ranges); raises TypeError / ValueError naming the field."""
        if not isinstance(self.dataset_config_file, (str, os.PathLike)):
            raise TypeError(
                f"DataConfig.dataset_config_file must be a path, got {self.dataset_config_file!r}"
            )
        if self.dataset_info_file is not None and not isinstance(self.dataset_info_file, (str, os.PathLike)):
            raise TypeError(
                f"DataConfig.dataset_info_file must be a path or None, got {self.dataset_info_file!r}"
            )
        for name in ("expected_num_tokens", "max_num_tokens", "max_num_tokens_per_sample"):
            _check_int(getattr(self, name), f"DataConfig.{name}", 1, MAX_NUM_TOKENS)
        for name in ("prefer_buffer_before", "num_workers", "min_image_side"):
            _check_int(getattr(self, name), f"DataConfig.{name}", 0)
        _check_int(self.max_buffer_size, "DataConfig.max_buffer_size", 0, MAX_BUFFER_SIZE)
        _check_int(self.prefetch_factor, "DataConfig.prefetch_factor", 1, MAX_PREFETCH_FACTOR)
        _check_int(self.seed, "DataConfig.seed", 0)
        _check_int(self.max_image_pixels, "DataConfig.max_image_pixels", 1)
        if self.max_num_tokens_per_sample > self.max_num_tokens:
            raise ValueError(
                f"DataConfig.max_num_tokens_per_sample={self.max_num_tokens_per_sample} exceeds "
                f"max_num_tokens={self.max_num_tokens}: such a sample could never be packed"
            )
        if self.expected_num_tokens > self.max_num_tokens:
            raise ValueError(
                f"DataConfig.expected_num_tokens={self.expected_num_tokens} exceeds "
                f"max_num_tokens={self.max_num_tokens}"
            )
        if self.long_samples not in ("drop", "truncate"):
            raise ValueError(
                f"DataConfig.long_samples must be 'drop' or 'truncate', got {self.long_samples!r}"
            )
        for name in ("text_cond_dropout_prob", "vit_cond_dropout_prob", "vae_cond_dropout_prob"):
            setattr(self, name, _check_prob(getattr(self, name), f"DataConfig.{name}"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Build from a mapping (e.g. a YAML section); unknown keys are a ValueError listing them."""
        _refuse_unknown(d, [f.name for f in dataclasses.fields(cls)], "the data config")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def info_file(self) -> str:
        """The dataset-info file to read (``dataset_info_file`` or its default)."""
        if self.dataset_info_file is not None:
            return os.fspath(self.dataset_info_file)
        return os.path.join(os.path.dirname(os.path.abspath(self.dataset_config_file)), "dataset_info.yaml")


# ---------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class ImageTransformArgs:
    """Upstream's ``ImageTransform`` arguments: sides become multiples of ``image_stride``, the long side
    at most ``max_image_size``, the short side at least ``min_image_size`` (unless that breaks the long
    side's cap), and the area at most ``max_pixels`` (divided among the images of a sample)."""

    image_stride: int
    max_image_size: int
    min_image_size: int
    max_pixels: int = 14 * 14 * 9 * 1024

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> ImageTransformArgs:
        names = [f.name for f in dataclasses.fields(cls)]
        _refuse_unknown(d, names, where)
        missing = [n for n in names[:3] if n not in d]
        if missing:
            raise ValueError(f"{where} is missing {missing}")
        out = cls(**d)
        for n in names:
            # bounded: with the model's grid uncapped (interpolate_pos) a huge min_image_size and
            # max_pixels would resize every image to gigapixels and exhaust memory
            limit = MAX_TRANSFORM_PIXELS if n == "max_pixels" else MAX_TRANSFORM_SIDE
            _check_int(getattr(out, n), f"{where}.{n}", 1, limit)
        if out.min_image_size > out.max_image_size:
            raise ValueError(
                f"{where}: min_image_size {out.min_image_size} > max_image_size {out.max_image_size}"
            )
        return out


@dataclass(frozen=True)
class DatasetInfo:
    """Where one dataset's files are. Parquet kinds: ``data_dir`` (a folder of ``*.parquet``); JSONL
    kinds: ``jsonl_path`` and, for images, ``data_dir`` (their root folder)."""

    name: str
    data_dir: str | None = None
    jsonl_path: str | None = None
    num_files: int | None = None
    num_total_samples: int | None = None
    parquet_info_path: str | None = None


@dataclass(frozen=True)
class GroupSpec:
    """One group of the YAML: its kind (= its name), datasets, sampling weight and transforms."""

    name: str
    datasets: tuple[DatasetInfo, ...]
    num_used_data: tuple[int | None, ...]
    weight: float = 1.0
    is_mandatory: bool = False
    image_transform_args: ImageTransformArgs | None = None
    vit_image_transform_args: ImageTransformArgs | None = None
    shuffle_lines: bool = False
    shuffle_seed: int = 0
    resume_data_status: bool = True

    @property
    def kind(self) -> str:
        return self.name

    @property
    def file_format(self) -> str:
        return GROUP_KINDS[self.name]


_GROUP_KEYS = (
    "dataset_names",
    "image_transform_args",
    "vit_image_transform_args",
    "is_mandatory",
    "num_used_data",
    "weight",
    "shuffle_lines",
    "shuffle_seed",
    "frame_sampler_args",  # upstream's video frame sampling: accepted, videos are skipped ("video_unsupported")
    "resume_data_status",  # false: on resume this group starts from the beginning (upstream's option)
)
_INFO_KEYS = ("data_dir", "jsonl_path", "num_files", "num_total_samples", "parquet_info_path")


def _no_duplicates(pairs: list[tuple[Any, Any]], where: str) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(
                f"{where}: the key {k!r} appears twice (the second would silently replace the first)"
            )
        out[k] = v
    return out


def _safe_load_unique(text: str, where: str) -> Any:
    """``yaml.safe_load`` that refuses a mapping with a repeated key (PyYAML keeps the last silently)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        loader.flatten_mapping(node)
        pairs = [
            (loader.construct_object(k, deep=True), loader.construct_object(v, deep=True))
            for k, v in node.value
        ]
        return _no_duplicates(pairs, where)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _read_mapping(path: str, what: str) -> dict[str, Any]:
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text, object_pairs_hook=lambda pairs: _no_duplicates(pairs, f"{what} {path!r}"))
        else:
            data = _safe_load_unique(text, f"{what} {path!r}")
    except ValueError as e:  # JSON syntax, or a repeated key
        raise ValueError(str(e) if path in str(e) else f"{what} {path!r} is not valid JSON: {e}") from None
    except Exception as e:  # yaml.YAMLError: a syntax error, with its line and column
        raise ValueError(f"{what} {path!r} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{what} {path!r} must be a non-empty mapping")
    return data


def _resolve(base: str, path: Any, where: str) -> str:
    if not isinstance(path, str) or not path:
        raise TypeError(f"{where} must be a path string, got {path!r}")
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def load_groups(config: DataConfig) -> list[GroupSpec]:
    """Read ``config.dataset_config_file`` and the dataset info into :class:`GroupSpec` objects, in the
    YAML's order. Raises ValueError / TypeError / FileNotFoundError naming the file and the key."""
    yaml_path = os.fspath(config.dataset_config_file)
    if not yaml_path:
        raise ValueError("DataConfig.dataset_config_file is empty: give the dataset-group YAML")
    groups_raw = _read_mapping(yaml_path, "dataset config")
    info_path = config.info_file()
    info_raw = _read_mapping(info_path, "dataset info")
    info_base = os.path.dirname(os.path.abspath(info_path))
    groups = []
    for gname, g in groups_raw.items():
        where = f"{yaml_path}: group {gname!r}"
        if gname not in GROUP_KINDS:
            raise ValueError(
                f"{where}: unknown group; the group name is its kind, one of {sorted(GROUP_KINDS)}"
            )
        _refuse_unknown(g, _GROUP_KEYS, where)
        names = g.get("dataset_names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where}: dataset_names must be a non-empty list of names, got {names!r}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"{where}: dataset_names lists {repeated} more than once (each dataset would be read twice "
                "per epoch); list a dataset once and use num_used_data / weight to weigh it"
            )
        used = g.get("num_used_data")
        if used is None:
            used = [None] * len(names)
        if not isinstance(used, list) or len(used) != len(names):
            raise ValueError(
                f"{where}: num_used_data must be a list with one entry per dataset name, got {used!r}"
            )
        for i, u in enumerate(used):
            if u is not None:
                _check_int(u, f"{where}: num_used_data[{i}]", 1)
        weight = g.get("weight", 1.0)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not (math.isfinite(weight) and weight >= 0)
        ):
            raise ValueError(f"{where}: weight must be a number >= 0, got {weight!r}")
        group_info = info_raw.get(gname)
        if gname in info_raw and not isinstance(group_info, dict):
            raise ValueError(
                f"{info_path}: group {gname!r} must map dataset names to paths, got {type(group_info).__name__}"
            )
        if not isinstance(group_info, dict):
            raise ValueError(
                f"{info_path}: no entry for group {gname!r} (groups there: {sorted(map(str, info_raw))})"
            )
        datasets = []
        for n in names:
            d = group_info.get(n)
            if not isinstance(d, dict):
                raise ValueError(
                    f"{info_path}: group {gname!r} has no dataset {n!r} (has: {sorted(map(str, group_info))})"
                )
            dwhere = f"{info_path}: {gname}/{n}"
            _refuse_unknown(d, _INFO_KEYS, dwhere)
            paths = {
                k: _resolve(info_base, d[k], f"{dwhere}.{k}")
                for k in ("data_dir", "jsonl_path", "parquet_info_path")
                if d.get(k) is not None
            }
            info = DatasetInfo(
                name=n,
                num_files=d.get("num_files"),
                num_total_samples=d.get("num_total_samples"),
                **paths,
            )
            fmt = GROUP_KINDS[gname]
            if fmt == "parquet" and info.data_dir is None:
                raise ValueError(f"{dwhere}: a parquet dataset needs data_dir (the folder of .parquet files)")
            if fmt == "jsonl" and info.jsonl_path is None:
                raise ValueError(f"{dwhere}: a JSONL dataset needs jsonl_path")
            datasets.append(info)
        tr = g.get("image_transform_args")
        vtr = g.get("vit_image_transform_args")
        spec = GroupSpec(
            name=gname,
            datasets=tuple(datasets),
            num_used_data=tuple(used),
            weight=float(weight),
            is_mandatory=_check_bool(g.get("is_mandatory", False), f"{where}: is_mandatory"),
            image_transform_args=None
            if tr is None
            else ImageTransformArgs.from_dict(tr, f"{where}: image_transform_args"),
            vit_image_transform_args=None
            if vtr is None
            else ImageTransformArgs.from_dict(vtr, f"{where}: vit_image_transform_args"),
            shuffle_lines=_check_bool(g.get("shuffle_lines", False), f"{where}: shuffle_lines"),
            shuffle_seed=_check_int(g.get("shuffle_seed", 0), f"{where}: shuffle_seed"),
            resume_data_status=_check_bool(g.get("resume_data_status", True), f"{where}: resume_data_status"),
        )
        needs = {
            "t2i_pretrain": ["image_transform_args"],
            "unified_edit": ["image_transform_args", "vit_image_transform_args"],
            "vlm_sft": ["image_transform_args"],
        }
        for key in needs.get(gname, []):
            if getattr(spec, key) is None:
                raise ValueError(f"{where}: {gname} needs {key}")
        groups.append(spec)
    if sum(g.weight for g in groups) <= 0:
        raise ValueError(f"{yaml_path}: the group weights sum to 0")
    return groups


def field_docs() -> dict[str, str]:
    """Field name -> one-line description of :class:`DataConfig` (for --help and docs)."""
    doc = DataConfig.__doc__ or ""
    out: dict[str, str] = {}
    current = None
    for line in doc.splitlines():
        s = line.strip()
        head = s.split(":", 1)[0]
        if ":" in s and head in {f.name for f in dataclasses.fields(DataConfig)}:
            current = head
            out[current] = s.split(":", 1)[1].strip()
        elif current and s:
            out[current] += " " + s
        elif not s:
            current = None
    return out

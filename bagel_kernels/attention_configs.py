"""Tile configurations of the Triton attention kernels: built-in defaults per GPU architecture and
Triton version, plus a tuned table (``attention_tuned.json``) written by ``benchmarks/tune_attention.py``.

Lookup (:func:`config_for`), first match wins:

1. the tuned table: an entry with the same GPU architecture (``"sm90"``), Triton ``major.minor``
   (``"3.6"``), dtype (``"bf16"``) and head dim (``72``). The table is the package's
   ``attention_tuned.json``, or the file named by ``BAGEL_KERNELS_ATTN_TABLE`` (``gpu_check.sh`` points
   it at the table it has just tuned). An entry's ``config`` may name only some fields of
   :class:`AttnConfig`; the others come from step 2, so tables written before a field existed stay valid.
2. the built-in defaults: :data:`_DEFAULTS` per (architecture family, fp32 or 16-bit, padded head dim),
   then :data:`_OVERRIDES` for Triton versions whose compiler needs other tiles there.

Architecture families: ``90`` for compute capability >= 9.0 (Hopper: 227 KiB of shared memory per
block), ``80`` below (the table is checked for A100, sm_80, 163 KiB); there are no tables before sm_80.
Every default is compiled by ``python -m bagel_kernels.compile_check --report`` for sm_90 and sm_80 on
the oldest and newest Triton the package supports, which fails when a kernel spills registers inside a
main loop or needs more shared memory than the architecture has.

Adding a program or a tile field (e.g. the one-pass atomic dQ backward of issue 15): give
:class:`AttnConfig` a new field with a default, set it per key in the tables below where the default is
not right, and add the launch to :func:`bagel_kernels.attention_triton.compile_cases` (the compile check
derives signatures, alignment and the values launched from the launchers themselves).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from .backends import interpreting
from .checks import as_int

__all__ = [
    "AttnConfig",
    "Blocks",
    "Launch",
    "ONEPASS_DEFAULT",
    "default_for",
    "dim_split",
    "check_interpreter",
    "TABLE_PATH",
    "arch_family",
    "config_for",
    "compile_target",
    "config_origin",
    "load_tuned_table",
    "table_key",
    "triton_version",
]

TABLE_PATH = Path(__file__).with_name("attention_tuned.json")
TABLE_ENV = "BAGEL_KERNELS_ATTN_TABLE"
TABLE_FORMAT = 1
FLAG_FIELDS = ("onepass", "dsplit", "tma")
# The backward ``deterministic=False`` runs where no tuned entry says otherwise: 0 = the two-program
# backward (today's), 1 = the one-pass backward. Decided by the first GPU measurement
# (``benchmarks/gpu_check.sh``: the tuner times both and writes ``onepass`` into each tuned entry;
# ``bench_attention`` reports both); flipping it here flips every built-in default.
ONEPASS_DEFAULT = 0


class Blocks(NamedTuple):
    """Tile sizes handed to the attention ops (``list[int]`` in their schema): forward, the
    deterministic backward's dK/dV programs (the one-pass program's when it runs), its dQ programs."""

    block_m: int
    block_n: int
    block_m1: int
    block_n1: int
    block_m2: int
    block_n2: int


class Launch(NamedTuple):
    """Launch parameters handed to the attention ops (``list[int]`` in their schema); the backward
    slots carry the one-pass program's when it runs."""

    fwd_warps: int
    fwd_stages: int
    bwd_warps: int
    bwd_stages: int


@dataclass(frozen=True)
class AttnConfig:
    """Tile shapes, launch parameters and kernel variants.

    Forward tiles are ``block_m x block_n``; the deterministic (two-program) backward's dK/dV programs
    use ``block_m1 x block_n1`` (key blocks of ``block_n1``) and its dQ programs ``block_m2 x block_n2``;
    the one-pass backward's programs ``onepass_block_m x onepass_block_n`` (key blocks of
    ``onepass_block_n``). ``*_warps``/``*_stages`` matter on the GPU only.

    Variants (0 or 1):
        onepass  ``deterministic=False`` runs the one-pass backward (dK/dV programs that also add
                 dS K to an fp32 dQ accumulator with atomics: 5 products per tile pair instead of 7);
                 ``deterministic=True`` never does. Default :data:`ONEPASS_DEFAULT`.
        dsplit   a head dim that is no power of two runs as two column blocks when that is narrower
                 than padding (72 -> 64 + 16 instead of 128); 0 pads as before.
        tma      the forward reads K/V through tensor descriptors (TMA) where usable: sm_90+, no
                 row index, 16-byte aligned strides; elsewhere it falls back to pointer loads.
    The defaults of this class are the interpreter's (CPU tests): small tiles, every program kind a
    different shape, so that a mixed-up block index cannot go unnoticed."""

    block_m: int = 64
    block_n: int = 32
    block_m1: int = 32
    block_n1: int = 64
    block_m2: int = 64
    block_n2: int = 32
    fwd_warps: int = 4
    fwd_stages: int = 2
    bwd_warps: int = 4
    bwd_stages: int = 2
    onepass: int = 0
    onepass_block_m: int = 64
    onepass_block_n: int = 16
    onepass_warps: int = 4
    onepass_stages: int = 2
    dsplit: int = 1
    tma: int = 0

    def blocks(self) -> Blocks:
        return Blocks(*(getattr(self, f) for f in Blocks._fields))

    def launch(self) -> Launch:
        return Launch(*(getattr(self, f) for f in Launch._fields))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, base: AttnConfig | None = None) -> AttnConfig:
        """``base`` (default: the class defaults) with the fields named in ``d`` replaced."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown AttnConfig fields {unknown} (known: {sorted(names)})")
        for k, v in d.items():
            if k in FLAG_FIELDS:
                if not isinstance(v, int) or isinstance(v, bool) or v not in (0, 1):
                    raise ValueError(f"AttnConfig field {k} must be 0 or 1, got {v!r}")
            elif not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"AttnConfig field {k} must be a positive int, got {v!r}")
        return dataclasses.replace(base if base is not None else cls(), **d)

    def check(self) -> AttnConfig:
        """``self`` if the launchers take it (the rules of :func:`check_tiles`, for the two-program
        tiles and the one-pass ones), else ValueError naming the field."""
        check_tiles(self.blocks(), self.launch())
        onepass = Blocks(self.block_m, self.block_n, self.onepass_block_m, self.onepass_block_n, 16, 16)
        check_tiles(onepass, Launch(self.fwd_warps, self.fwd_stages, self.onepass_warps, self.onepass_stages),
                    names=("block_m", "block_n", "onepass_block_m", "onepass_block_n", "-", "-"),
                    launch_names=("fwd_warps", "fwd_stages", "onepass_warps", "onepass_stages"))  # fmt: skip
        return self


MAX_BLOCK = 256  # the widest tile side the kernels take
WARPS = (1, 2, 4, 8, 16)
MAX_STAGES = 8


def check_tiles(blocks, launch, *, names=Blocks._fields, launch_names=Launch._fields) -> None:
    """The launchers' rules for tiles and launch parameters (the registered ops check them, and so does
    the tuned-table loader): six tile sides, each a power of two in ``[16, MAX_BLOCK]``; warps in
    :data:`WARPS`; stages an int in ``[1, MAX_STAGES]``."""
    if not isinstance(blocks, (list, tuple)) or len(blocks) != len(Blocks._fields):
        raise ValueError(f"blocks must be 6 tile sizes ({', '.join(Blocks._fields)}), got {blocks!r}")
    for name, b in zip(names, blocks, strict=True):
        if not isinstance(b, int) or isinstance(b, bool) or b < 16 or b > MAX_BLOCK or b & (b - 1):
            raise ValueError(f"{name}={b} must be a power of two between 16 and {MAX_BLOCK}")
    if not isinstance(launch, (list, tuple)) or len(launch) != len(Launch._fields):
        raise ValueError(f"launch must be [{', '.join(Launch._fields)}], got {launch!r}")
    lp = Launch(*launch)
    for name, w in ((launch_names[0], lp.fwd_warps), (launch_names[2], lp.bwd_warps)):
        if isinstance(w, bool) or w not in WARPS:
            raise ValueError(f"{name}={w} must be 1, 2, 4, 8 or 16")
    for name, st in ((launch_names[1], lp.fwd_stages), (launch_names[3], lp.bwd_stages)):
        if not isinstance(st, int) or isinstance(st, bool) or not 1 <= st <= MAX_STAGES:
            raise ValueError(f"{name}={st} must be an int in [1, {MAX_STAGES}]")


def _pad_dim(d: int) -> int:
    return max(16, 1 << (int(d) - 1).bit_length())


def dim_split(d: int, split: bool = True) -> tuple[int, int]:
    """``(DA, DB)``: the column blocks the attention kernels cut a head dim ``d`` into, powers of two
    >= 16 (``DB = 0``: one block). Without ``split``, or where it saves nothing, one block of ``d``
    padded to a power of two (72 -> 128); with it, the largest power of two <= ``d`` plus the rest
    padded, when that is narrower: 72 -> 64 + 16 (80 of the padded 128 columns), 80 -> 64 + 16,
    96 -> 64 + 32, 40 -> 32 + 16, 136 -> 128 + 16; 24 (16 + 16 = 32) and 100 (64 + 64) stay one block."""
    d = int(d)
    pad = _pad_dim(d)
    if split and d > 16:
        a = 1 << (d.bit_length() - 1)  # largest power of two <= d
        b = _pad_dim(d - a) if d > a else 0
        if b and a + b < pad:
            return a, b
    return pad, 0


def arch_family(capability: tuple[int, int] | int) -> int:
    """90 for sm_90 and newer, 80 for sm_8x (tables exist for these two)."""
    major = capability[0] if isinstance(capability, tuple) else int(capability) // 10
    if major >= 9:
        return 90
    if major == 8:
        return 80
    raise ValueError(f"the Triton attention kernels need sm_80 or newer, got compute capability {capability}")


def triton_version() -> str:
    """``major.minor`` of the installed Triton."""
    import triton

    parts = triton.__version__.split(".")
    return ".".join(parts[:2])


def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:2])


# ------------------------------------------------------------------------------------------ defaults
# (arch family, fp32, padded head dim) -> config. 16-bit D=128 on sm_90 starts from PyTorch
# FlexAttention's H100 choice for the forward (128x64, 8 warps, 3 stages). The backward of D=128 uses
# 32x128 dK/dV and 128x32 dQ tiles: the 64x128 / 128x64 tiles FlexAttention uses spill 240/168 bytes
# inside the dK/dV loop on triton 3.6 (255 registers). On sm_80 (mma.sync keeps the accumulators and
# the operands in registers) 16-bit D=128 runs 64x64 backward tiles, D<=64 32x64 / 64x32 with 4 warps;
# the 8-warp 64x64 D=64 backward and the 32x128 D=128 backward spill there. fp32 runs exact ``ieee``
# dots (no tensor cores): correctness, not speed, is its purpose; its D=128 backward needs 16x16 tiles
# on triton 3.6 (larger ones spill in the loop). Every entry at the model's layouts is compiled and
# resource-checked by ``python -m bagel_kernels.compile_check --report`` for sm_90 and sm_80 on triton
# 3.6 and 3.9 (CI), which fails on a spill inside a loop or too much shared memory.
def _tiles(*, fwd: tuple[int, int, int, int], bwd: tuple[int, int, int, int, int, int]) -> AttnConfig:
    """A config from ``fwd = (block_m, block_n, fwd_warps, fwd_stages)`` and ``bwd = (block_m1, block_n1,
    block_m2, block_n2, bwd_warps, bwd_stages)`` (the tuner's candidate format), other fields default."""
    bm, bn, fw, fs = fwd
    bm1, bn1, bm2, bn2, bw, bs = bwd
    return AttnConfig(
        block_m=bm, block_n=bn, block_m1=bm1, block_n1=bn1, block_m2=bm2, block_n2=bn2,
        fwd_warps=fw, fwd_stages=fs, bwd_warps=bw, bwd_stages=bs,
    )  # fmt: skip


_DEFAULTS: dict[tuple[int, bool, int], AttnConfig] = {
    (90, False, 16): _tiles(fwd=(128, 128, 8, 3), bwd=(64, 64, 64, 64, 4, 3)),
    (90, False, 32): _tiles(fwd=(128, 128, 8, 3), bwd=(64, 64, 64, 64, 4, 3)),
    (90, False, 64): _tiles(fwd=(128, 128, 8, 3), bwd=(64, 64, 64, 64, 4, 3)),
    (90, False, 128): _tiles(fwd=(128, 64, 8, 3), bwd=(32, 128, 128, 32, 8, 3)),
    (90, False, 256): _tiles(fwd=(64, 32, 4, 3), bwd=(32, 64, 64, 32, 8, 2)),
    (90, True, 16): _tiles(fwd=(128, 32, 8, 3), bwd=(16, 32, 32, 16, 4, 1)),
    (90, True, 32): _tiles(fwd=(128, 32, 8, 3), bwd=(16, 32, 32, 16, 4, 1)),
    (90, True, 64): _tiles(fwd=(128, 32, 8, 3), bwd=(16, 32, 32, 16, 4, 1)),
    (90, True, 128): _tiles(fwd=(32, 64, 8, 3), bwd=(16, 16, 16, 16, 4, 1)),
    (90, True, 256): _tiles(fwd=(32, 32, 4, 2), bwd=(32, 32, 32, 32, 8, 1)),
    # A100: 163 KiB of shared memory per block, mma.sync (no wgmma), 2 warp groups less forgiving
    (80, False, 16): _tiles(fwd=(128, 64, 4, 3), bwd=(32, 64, 64, 32, 4, 2)),
    (80, False, 32): _tiles(fwd=(128, 64, 4, 3), bwd=(32, 64, 64, 32, 4, 2)),
    (80, False, 64): _tiles(fwd=(128, 64, 4, 3), bwd=(32, 64, 64, 32, 4, 2)),
    (80, False, 128): _tiles(fwd=(128, 64, 8, 2), bwd=(64, 64, 64, 64, 8, 2)),
    (80, False, 256): _tiles(fwd=(64, 32, 4, 2), bwd=(32, 64, 64, 32, 8, 1)),
    (80, True, 16): _tiles(fwd=(64, 32, 8, 2), bwd=(16, 32, 32, 16, 4, 1)),
    (80, True, 32): _tiles(fwd=(64, 32, 8, 2), bwd=(16, 32, 32, 16, 4, 1)),
    (80, True, 64): _tiles(fwd=(64, 32, 8, 2), bwd=(16, 32, 32, 16, 4, 1)),
    (80, True, 128): _tiles(fwd=(64, 32, 8, 2), bwd=(16, 16, 16, 16, 4, 1)),
    (80, True, 256): _tiles(fwd=(32, 32, 4, 1), bwd=(32, 32, 32, 32, 8, 1)),
}
# The one-pass backward's tiles and launch (block_m, block_n, warps, stages) where they are not those of
# the two-program backward's dK/dV programs (block_m1, block_n1, bwd_warps, bwd_stages): its programs
# hold a fifth product's operands and result. sm_90 D=256: 32x64 spills in the loop (255 registers).
_ONEPASS_TILES: dict[tuple[int, bool, int], tuple[int, int, int, int]] = {
    (90, False, 256): (32, 32, 8, 2),
}
# Split head dims (``dsplit``; see :func:`dim_split`): (arch family, fp32, DA, DB) -> fields replacing
# those of the padded head dim's entry where its tiles do not fit the split layout. sm_80, 72 = 64 + 16:
# the 8-warp 64x64 backward of D=128 spills 1-10 KB inside the loop with two column blocks (mma.sync
# keeps both blocks' operands in registers), the one-pass backward's 64x64 2 KB.
_SPLIT_TILES: dict[tuple[int, bool, int, int], dict] = {
    (80, False, 64, 16): dict(
        block_m1=16, block_n1=64, block_m2=64, block_n2=16, bwd_warps=4, bwd_stages=2,
        onepass_block_m=16, onepass_block_n=64, onepass_warps=8, onepass_stages=2,
    ),
}  # fmt: skip
# (arch family, oldest Triton, newest Triton (inclusive), fp32, padded head dim) -> fields to replace
_OVERRIDES: list[tuple[int, str, str, bool, int, dict]] = []


def default_for(
    arch: int, fp32: bool, head_dim: int, version: str | None = None, dsplit: bool = True
) -> AttnConfig:
    """The built-in configuration (no tuned table) for an architecture family and Triton version.
    ``dsplit=False``: the padded head-dim layout with its tiles (the kernels before the split)."""
    fam = arch_family(arch)
    d = _pad_dim(head_dim)
    cfg = _DEFAULTS[(fam, bool(fp32), d)]
    bm, bn, w, st = _ONEPASS_TILES.get(
        (fam, bool(fp32), d), (cfg.block_m1, cfg.block_n1, cfg.bwd_warps, cfg.bwd_stages)
    )
    cfg = dataclasses.replace(
        cfg, onepass=ONEPASS_DEFAULT, onepass_block_m=bm, onepass_block_n=bn, onepass_warps=w,
        onepass_stages=st, dsplit=int(bool(dsplit)),
    )  # fmt: skip
    da, db = dim_split(head_dim, dsplit)
    if db:
        cfg = dataclasses.replace(cfg, **_SPLIT_TILES.get((fam, bool(fp32), da, db), {}))
    v = _vtuple(version or triton_version())
    for a, lo, hi, f32, dp, fields in _OVERRIDES:
        if a == fam and f32 == bool(fp32) and dp == d and _vtuple(lo) <= v <= _vtuple(hi):
            cfg = dataclasses.replace(cfg, **fields)
    return cfg


# ------------------------------------------------------------------------------------------ tuned table
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_table_cache: dict[str, dict] = {}


def table_key(arch: int, version: str, dtype: torch.dtype | str, head_dim: int) -> tuple[str, str, str, int]:
    """``("sm90", "3.6", "bf16", 72)``: the key of a tuned-table entry (ValueError for a dtype the
    kernels do not take, or a head dim that is not an int in ``[1, 256]``)."""
    dt = dtype if isinstance(dtype, str) else _DTYPE_NAMES.get(dtype)
    if dt not in _DTYPE_NAMES.values():
        raise ValueError(f"dtype {dtype!r} is not one the kernels take ({', '.join(_DTYPE_NAMES.values())})")
    d = as_int(head_dim, "head_dim")
    if not 1 <= d <= MAX_BLOCK:
        raise ValueError(f"head_dim {d} is outside [1, {MAX_BLOCK}]")
    return (f"sm{arch_family(arch)}", ".".join(version.split(".")[:2]), dt, d)


def _table_path() -> Path:
    env = os.environ.get(TABLE_ENV, "").strip()
    return Path(env) if env else TABLE_PATH


def load_tuned_table(path: str | os.PathLike | None = None) -> dict[tuple, dict]:
    """``{key: config fields}`` of a tuned table (empty when the file does not exist). A malformed
    file raises ValueError naming it."""
    named = path is not None or bool(os.environ.get(TABLE_ENV, "").strip())
    p = Path(path) if path is not None else _table_path()
    if p.is_dir():
        raise ValueError(f"tuned attention table {p} is a directory, not a JSON file")
    if not p.exists():
        if named and path is None:  # named by the environment variable: say so, never silently ignore it
            raise ValueError(f"tuned attention table {p} (from {TABLE_ENV}) does not exist")
        return {}
    try:
        data = json.loads(p.read_text())
        if data.get("format") != TABLE_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {TABLE_FORMAT}")
        out = {}
        for i, e in enumerate(data["entries"]):
            try:
                key = table_key(int(e["arch"].removeprefix("sm")), e["triton"], e["dtype"], e["head_dim"])
                # validated now with the launchers' own rules, not at the first launch
                AttnConfig.from_dict(e["config"]).check()
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"entry {i}: {exc}") from None
            out[key] = dict(e["config"])
        return out
    except (ValueError, KeyError, TypeError, AttributeError, OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"tuned attention table {p} is malformed: {exc}") from exc


def clear_table_cache() -> None:
    """Forget the tuned tables read so far (the next configuration lookup reads the file again)."""
    _table_cache.clear()


def _tuned() -> dict[tuple, dict]:
    p = str(_table_path())
    hit = _table_cache.get(p)
    if hit is None:
        try:
            hit = load_tuned_table()  # (None: the environment variable or the packaged table)
        except ValueError as exc:  # a broken table must not stop training: warn, use the defaults
            warnings.warn(f"{exc}; using the built-in tile defaults", stacklevel=3)
            hit = {}
        _table_cache[p] = hit
    return hit


def config_for(
    arch: int | tuple[int, int], dtype: torch.dtype, head_dim: int, version: str | None = None
) -> AttnConfig:
    """Configuration for a GPU (compute capability ``(9, 0)`` or ``90``), dtype, head dim and Triton
    version (default: the installed one): the tuned entry if there is one, else the default."""
    cap = arch if isinstance(arch, int) else arch[0] * 10 + arch[1]
    v = version or triton_version()
    base = default_for(cap, dtype == torch.float32, head_dim, v)
    fields = _tuned().get(table_key(cap, v, dtype, head_dim))
    return base if fields is None else AttnConfig.from_dict(fields, base)


def config_origin(
    arch: int | tuple[int, int], dtype: torch.dtype, head_dim: int, version: str | None = None
) -> str:
    """Where :func:`config_for` takes its answer from: the tuned table (and which file) or the default."""
    cap = arch if isinstance(arch, int) else arch[0] * 10 + arch[1]
    key = table_key(cap, version or triton_version(), dtype, head_dim)
    return (
        f"tuned entry {key} of {_table_path()}"
        if key in _tuned()
        else f"built-in default (no tuned entry {key})"
    )


# ------------------------------------------------------------------------------------------ compile target
# Which GPU the launchers choose configs for when they see "meta" tensors: the compile check runs the
# launchers on meta tensors with the kernels' run() intercepted, so that it compiles exactly the launches
# the launchers make on that GPU.
_compile_arch: contextvars.ContextVar[int | None] = contextvars.ContextVar("bagel_compile_arch", default=None)


@contextlib.contextmanager
def compile_target(arch: int):
    token = _compile_arch.set(int(arch))
    try:
        yield
    finally:
        _compile_arch.reset(token)


def device_arch(device: torch.device) -> int | None:
    """Compute capability as ``major * 10 + minor`` of a CUDA device, the compile target for meta
    tensors, or None (CPU: the interpreter)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    if device.type == "meta":
        arch = _compile_arch.get()
        if arch is None:
            raise ValueError("meta tensors reach the Triton launchers only under compile_target(arch)")
        return arch
    return None


# ------------------------------------------------------------------------------------------ interpreter
_interp_ok: bool | None = None


def check_interpreter() -> None:
    """Under ``TRITON_INTERPRET=1``: triton 3.6's interpreter turns loop bounds into Python ints with
    ``int(array)``, which numpy >= 2.4 refuses for 1-element arrays (fixed in triton 3.7). Raise a
    clear error instead of that TypeError from inside a kernel."""
    global _interp_ok
    if _interp_ok is None:
        import numpy as np

        np_v = tuple(int(x) for x in np.__version__.split(".")[:2])
        _interp_ok = not (_vtuple(triton_version()) < (3, 7) and np_v >= (2, 4))
    if not _interp_ok and interpreting():
        import numpy as np

        raise RuntimeError(
            f"the Triton interpreter of triton {triton_version()} fails with numpy {np.__version__} "
            "(loop bounds: 'only 0-dimensional arrays can be converted'); install numpy<2.4 "
            "or triton>=3.7 to run the kernels on the CPU"
        )

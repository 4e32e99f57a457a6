"""Safetensors files tensor by tensor: a streaming writer (the header first, then each tensor's bytes
as it comes; the file appears under its name only when complete) and a reader of row ranges straight
into a destination tensor (plain file reads, no memory map, so that reading a rank's rows of a
checkpoint costs that rank's share of memory and no more).

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length ``n``, a
JSON header of ``n`` bytes ``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}`` (offsets relative to the end of the header), then the data, row-major, little-endian.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable

import torch

from bagel.io.files import read_safetensors_header

__all__ = ["DTYPES", "SafetensorsWriter", "TensorFile", "atomic_write_text", "replace_dir_atomically"]

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}
# bounded staging buffer of the row reader when the file's dtype differs from the destination's
STAGE_BYTES = 64 * 2**20


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def replace_dir_atomically(tmp: str, final: str) -> None:
    """Move the finished folder ``tmp`` to ``final``; an older ``final`` is moved aside first and removed
    after, so that at every moment one complete folder carries the name (or, for a moment, none)."""
    import shutil

    old = None
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time, in the declared order.

    ``entries``: ``(key, dtype, shape)`` of every tensor, known in advance (the header holds every
    offset). :meth:`write` appends one tensor's bytes (any device; copied to the CPU one tensor at a
    time). On :meth:`close` with every tensor written the temporary file is renamed to ``path``; on
    an error (or a missing tensor) it is removed and ``path`` is untouched. Use as a context manager."""

    def __init__(
        self,
        path: str | os.PathLike,
        entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.entries = [(k, dt, tuple(int(d) for d in shape)) for k, dt, shape in entries]
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for key, dtype, shape in self.entries:
            if dtype not in DTYPES:
                raise ValueError(
                    f"{self.path}: tensor {key!r} has dtype {dtype}, which safetensors cannot hold"
                )
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        folder = os.path.dirname(self.path) or "."
        fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".tmp", dir=folder)
        self.file = os.fdopen(fd, "wb")
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)
        self.next = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.entries):
            raise ValueError(f"{self.path}: tensor {key!r} was not declared")
        want_key, dtype, shape = self.entries[self.next]
        if key != want_key or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{self.path}: expected tensor {want_key!r} {dtype} {list(shape)} next, got {key!r} "
                f"{tensor.dtype} {list(tensor.shape)}"
            )
        t = tensor.detach().to("cpu").contiguous()
        self.file.write(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        self.next += 1

    def close(self) -> None:
        self.file.close()
        if self.next != len(self.entries):
            self.abort()
            raise ValueError(
                f"{self.path}: only {self.next} of {len(self.entries)} declared tensors were written"
            )
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            os.remove(self.tmp)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TensorFile:
    """One safetensors file read by row ranges (validated header, plain reads; no memory map)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.header = read_safetensors_header(path)  # validated: offsets, dtypes, shapes
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        self.data_start = 8 + n
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self.header[key]["dtype"]
        if name not in TORCH_DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has dtype {name}, which this reader does not read")
        return TORCH_DTYPES[name]

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_rows(self, key: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``key`` (along dim 0; a 0-d tensor is one row) copied into
        ``out`` (any dtype and device; shape ``[stop - start, *rest]`` or the same number of elements).
        Same dtype on the CPU: read straight into ``out``. Otherwise through a staging buffer of at
        most :data:`STAGE_BYTES`, converted chunk by chunk."""
        shape = self.shape(key)
        src_dtype = self.dtype(key)
        rows = shape[0] if shape else 1
        if not 0 <= start <= stop <= rows:
            raise ValueError(f"{self.path}: rows [{start}, {stop}) of {key!r} are outside its {rows} rows")
        row_elems = math.prod(shape[1:]) if shape else 1
        if out.numel() != (stop - start) * row_elems:
            raise ValueError(
                f"{self.path}: {key!r} rows [{start}, {stop}) hold {(stop - start) * row_elems} elements, "
                f"the destination {out.numel()}"
            )
        itemsize = torch.empty((), dtype=src_dtype).element_size()
        row_bytes = row_elems * itemsize
        base = self.data_start + self.header[key]["data_offsets"][0]
        flat = out.view(-1) if out.is_contiguous() else None
        if flat is not None and out.device.type == "cpu" and out.dtype == src_dtype:
            self._read_into(base + start * row_bytes, flat.view(torch.uint8), key)
            return out
        chunk_rows = max(1, STAGE_BYTES // max(row_bytes, 1))
        stage = torch.empty(min(chunk_rows, stop - start) * row_elems, dtype=src_dtype)
        dest = out.reshape(stop - start, row_elems) if flat is None else flat.view(stop - start, row_elems)
        for r in range(start, stop, chunk_rows):
            n = min(chunk_rows, stop - r)
            buf = stage[: n * row_elems]
            self._read_into(base + r * row_bytes, buf.view(torch.uint8), key)
            dest[r - start : r - start + n].copy_(buf.view(n, row_elems))
        if flat is None:
            out.copy_(dest.view(out.shape))
        return out

    def _read_into(self, offset: int, buf: torch.Tensor, key: str) -> None:
        view = memoryview(buf.numpy())
        done = 0
        while done < len(view):
            n = os.preadv(self.file.fileno(), [view[done:]], offset + done)
            if n <= 0:
                raise ValueError(f"{self.path}: unexpected end of file while reading {key!r}")
            done += n

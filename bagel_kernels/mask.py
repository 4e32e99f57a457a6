"""The packed attention mask of BAGEL as per-key query intervals.

Within one sample, query ``q`` may attend key ``k`` iff

    (q >= k  or  q and k lie in the same full/noise split)
    and not (k lies in a noise split and q is outside that split)

and never across samples. For every key ``k`` the queries that see it form one contiguous interval
``[kv_lo[k], kv_hi[k])``:

    key's split          kv_lo      kv_hi
    causal               k          end of sample
    full  [a, b)         a          end of sample
    noise [a, b)         a          b

so the whole mask is two int32 vectors (O(N) memory) and ``visible(q, k) = kv_lo[k] <= q < kv_hi[k]``.
Block tables for tiled kernels are derived from these vectors in O(N + tiles).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch

from .checks import as_int, as_int_list, has_values, to_device

__all__ = [
    "PackedMask",
    "BlockTables",
    "MaskVectors",
    "Derived",
    "derived",
    "ATTN_MODES",
    "TILE_EMPTY",
    "TILE_PARTIAL",
    "TILE_FULL",
]

ATTN_MODES = ("causal", "full", "noise")
TILE_EMPTY, TILE_PARTIAL, TILE_FULL = 0, 1, 2

_BIG = np.iinfo(np.int32).max


_MAX_BLOCK = 1 << 16  # largest tile side block_tables takes (a bigger block only pads the tables)


def _host(x: np.ndarray) -> np.ndarray:
    """A read-only int32 copy of host interval values (never handed to torch.from_numpy)."""
    out = np.array(x, dtype=np.int32)
    out.flags.writeable = False
    return out


class Derived(dict):
    """The memo of values derived from one mask's intervals (block tables, truncations, each backend's
    preparations): not part of the mask's value (the mask is immutable and never reads it), freed with
    the mask, shared by the masks that share its intervals (a mask and its row-indexed copies: nothing
    in it depends on the row index). Reached through :func:`derived` only. (It hangs off the mask
    object rather than a global table, so that ``torch.compile`` guards on it through the mask, an
    input of the compiled region, and one graph serves every pack.)"""


def derived(mask: PackedMask) -> Derived:
    """The memo of values derived from ``mask`` (block tables, a backend's prepared tables, ...). Keys
    are the caller's; values must depend only on the mask's intervals and sample lengths (never on its
    row index)."""
    return mask._derived  # the one accessor of the memo, in the mask's own module


@dataclass(frozen=True)
class BlockTables:
    """Tile tables of a :class:`PackedMask` for query blocks of ``block_m`` rows and key blocks of
    ``block_n`` columns. All tensors are int32 on the mask's device.

    Forward (per query block ``m``): the non-empty key blocks are
    ``q_kv_idx[q_kv_ptr[m]:q_kv_ptr[m+1]]`` (ascending), and ``q_kv_full`` flags those tiles that
    need no per-element masking. ``q_kv_start``/``q_kv_end`` give the key-block range they span.

    Backward (per key block ``n``): the query blocks touching it are ``[kv_q_start[n], kv_q_end[n])``;
    ``kv_max_lo``/``kv_min_hi`` decide fullness in the kernel: tile ``(m, n)`` is full iff
    ``kv_max_lo[n] <= m * block_m`` and ``kv_min_hi[n] >= min((m + 1) * block_m, total_len)``.
    For masks built from splits the query range of a key block is exact (every tile in it is
    non-empty); for arbitrary ``from_dense`` masks it is a superset, and tiles in it may be empty.
    """

    block_m: int
    block_n: int
    num_m: int
    num_n: int
    total_len: int
    q_kv_ptr: torch.Tensor
    q_kv_idx: torch.Tensor
    q_kv_full: torch.Tensor
    q_kv_start: torch.Tensor
    q_kv_end: torch.Tensor
    kv_q_start: torch.Tensor
    kv_q_end: torch.Tensor
    kv_max_lo: torch.Tensor
    kv_min_hi: torch.Tensor

    @property
    def num_tiles(self) -> int:
        """Number of non-empty (visited) tiles."""
        return int(self.q_kv_idx.numel())

    def to(self, device: torch.device | str) -> BlockTables:
        """The same tables on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved.update({k: to_device(v, device) for k, v in moved.items() if isinstance(v, torch.Tensor)})
        return BlockTables(**moved)

    def tile_kinds(self) -> torch.Tensor:
        """Dense ``[num_m, num_n]`` int8 table of TILE_EMPTY / TILE_PARTIAL / TILE_FULL (O(tiles); tests)."""
        kinds = torch.zeros(self.num_m, self.num_n, dtype=torch.int8, device=self.q_kv_idx.device)
        counts = (self.q_kv_ptr[1:] - self.q_kv_ptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(self.num_m, device=counts.device), counts)
        kinds[rows, self.q_kv_idx.long()] = torch.where(self.q_kv_full.bool(), TILE_FULL, TILE_PARTIAL).to(
            torch.int8
        )
        return kinds


class MaskVectors(NamedTuple):
    """A mask's own device tensors, as the backends of this package read them (no copy). Never write
    into them: the mask is an immutable value (its public attributes hand out copies)."""

    kv_lo: torch.Tensor
    kv_hi: torch.Tensor
    row_index: torch.Tensor | None


class PackedMask:
    """BAGEL's packed attention mask in interval form: an immutable value.

    Attributes (read-only):
        kv_lo, kv_hi: int32 ``[total_len]``; key ``k`` is seen by queries ``kv_lo[k] <= q < kv_hi[k]``.
            Reading them returns a copy, so that no change made through them can reach the backends
            (sdpa, flex and Triton read the same intervals, always).
        sample_lens: tuple of per-sample token counts (the trailing pad sample included).
        total_len: ``sum(sample_lens)``.
        row_index: None, or (after :meth:`with_row_index`) int32 ``[total_len]``: token ``i`` lives at
            row ``row_index[i]`` of the attention inputs. Reading it returns a copy.
        has_row_index: whether a row index is attached (no copy made).

    Build with :meth:`from_splits` (``split_lens``/``attn_modes``) or :meth:`from_dense` (upstream's
    ``nested_attention_masks``). ``to_dense()`` materialises ``[N, N]`` booleans for references only.

    Every mask keeps a host (CPU) copy of its intervals next to the device ones: the checks
    (:meth:`truncated`) and the derived block tables (:meth:`block_tables`) are computed from host data,
    so that nothing reads device memory after construction: a mask moved to ``meta`` (``.to("meta")``)
    or used under ``FakeTensorMode`` works like any other. Derived values live outside the mask
    (:func:`derived`), never in it.

    The constructor ``PackedMask(kv_lo, kv_hi, sample_lens)`` takes the interval vectors directly and
    validates what every backend relies on (O(N), one host sync: the vectors are copied to the host):
    integer tensors (no float, no bool; values compared in int64, so nothing wraps), one per key, and
    for every key ``k`` of a sample ``[s, e)``: ``s <= kv_lo[k] <= kv_hi[k] <= e``. An interval never
    leaves its sample (the per-sample sdpa backend and the tiled backends would otherwise disagree) and
    never leaves ``[0, total_len]`` (the block tables index tiles by it). An empty interval is
    ``kv_lo == kv_hi``. The interval need not contain the key itself: masks built from splits always do
    (so the query rows of a key block are one contiguous range, DESIGN.md section 3), ``from_dense``
    accepts any column-contiguous mask, and the kernels iterate a superset range, in which tiles may be
    empty, so they do not depend on it. The vectors are copied: later changes to the caller's tensors
    do not reach the mask.
    """

    _FIELDS = ("_lo", "_hi", "_lo_host", "_hi_host", "_row_index", "_sample_lens", "_total_len", "_derived")

    def __init__(self, kv_lo: torch.Tensor, kv_hi: torch.Tensor, sample_lens: Sequence[int]):
        for name, t in (("kv_lo", kv_lo), ("kv_hi", kv_hi)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a 1-D integer tensor, got {type(t).__name__}")
            if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
                raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
        if kv_lo.shape != kv_hi.shape or kv_lo.dim() != 1:
            raise ValueError(
                f"kv_lo and kv_hi must be 1-D of equal length, got {tuple(kv_lo.shape)} and {tuple(kv_hi.shape)}"
            )
        if kv_lo.device != kv_hi.device:
            raise ValueError(f"kv_lo is on {kv_lo.device} but kv_hi is on {kv_hi.device}")
        if not has_values(kv_lo, kv_hi):
            raise ValueError(
                f"kv_lo/kv_hi on {kv_lo.device} hold no values to validate: build the mask from host (CPU) "
                "vectors, then move it with .to(device)"
            )
        lens = as_int_list(sample_lens, "sample_lens")
        if not lens:
            raise ValueError("sample_lens is empty: a pack needs at least one sample")
        if any(n < 0 for n in lens):
            raise ValueError(f"sample_lens has a negative length: {lens}")
        total = sum(lens)
        if total >= _BIG:
            raise ValueError(f"sample_lens sum to {total}, beyond the int32 range of the interval vectors")
        if total != kv_lo.numel():
            raise ValueError(
                f"sample_lens sum to {total} but the interval vectors have {kv_lo.numel()} entries"
            )
        # the one host sync of a mask built from device vectors; the host copy is numpy, so that the
        # host-side work never meets a torch mode (FakeTensorMode, dispatch modes counting reads)
        lo = kv_lo.detach().to("cpu", torch.long).numpy()
        hi = kv_hi.detach().to("cpu", torch.long).numpy()
        if total:
            lens_a = np.asarray(lens, dtype=np.int64)
            ends_a = np.cumsum(lens_a)
            s = np.repeat(ends_a - lens_a, lens_a)  # sample start per key
            e = np.repeat(ends_a, lens_a)  # sample end per key
            bad = (lo < s) | (lo > hi) | (hi > e)
            if bad.any():
                k = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"kv_lo/kv_hi of key {k} give the query interval [{int(lo[k])}, {int(hi[k])}), which is not "
                    f"inside the key's sample [{int(s[k])}, {int(e[k])}); every key needs "
                    "sample_start <= kv_lo <= kv_hi <= sample_end"
                )
        self._init(
            kv_lo.detach().to(torch.int32, copy=True).contiguous(),
            kv_hi.detach().to(torch.int32, copy=True).contiguous(),
            _host(lo),
            _host(hi),
            tuple(lens),
        )

    def _init(self, lo: torch.Tensor, hi: torch.Tensor, lo_host: np.ndarray, hi_host: np.ndarray,
              sample_lens: tuple[int, ...], row_index: torch.Tensor | None = None,
              derived_memo: Derived | None = None) -> None:  # fmt: skip
        """Sets every field once: owned int32 contiguous vectors on the device, their read-only numpy copy
        on the host, the sample lengths and the row index (an owned int32 copy or None)."""
        self._lo, self._hi = lo, hi
        self._lo_host, self._hi_host = lo_host, hi_host
        self._sample_lens = sample_lens
        self._total_len = int(sum(sample_lens))
        self._row_index = row_index
        self._derived = derived_memo if derived_memo is not None else Derived()

    def __setattr__(self, name, value):
        if name in self.__dict__ or name not in PackedMask._FIELDS:
            raise AttributeError(f"PackedMask is immutable: {name} cannot be set")
        object.__setattr__(self, name, value)

    @classmethod
    def _from_host(cls, lo_host: np.ndarray, hi_host: np.ndarray, sample_lens: Sequence[int]) -> PackedMask:
        """A CPU mask from host (numpy) vectors that are valid by construction (inside their samples):
        the builders below use it and skip the constructor's O(N) check."""
        out = cls.__new__(cls)
        lo, hi = _host(lo_host), _host(hi_host)
        out._init(torch.from_numpy(lo.copy()), torch.from_numpy(hi.copy()), lo, hi, tuple(sample_lens))
        return out

    # ------------------------------------------------------------------ read-only attributes
    @property
    def kv_lo(self) -> torch.Tensor:
        """int32 ``[total_len]``: the first query row that sees each key (a copy)."""
        return self._lo.clone()

    @property
    def kv_hi(self) -> torch.Tensor:
        """int32 ``[total_len]``: one past the last query row that sees each key (a copy)."""
        return self._hi.clone()

    @property
    def sample_lens(self) -> tuple[int, ...]:
        return self._sample_lens

    @property
    def total_len(self) -> int:
        return self._total_len

    @property
    def row_index(self) -> torch.Tensor | None:
        """int32 ``[total_len]`` or None. A copy: the tensor the kernels read cannot be changed through it."""
        return None if self._row_index is None else self._row_index.clone()

    @property
    def has_row_index(self) -> bool:
        """Whether a row index is attached (:meth:`with_row_index`)."""
        return self._row_index is not None

    def vectors(self) -> MaskVectors:
        """The mask's own device tensors ``(kv_lo, kv_hi, row_index)``, with no copy: for backends that
        read them on every call. They must never be written (the public attributes are copies)."""
        return MaskVectors(self._lo, self._hi, self._row_index)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_splits(
        cls,
        sample_lens: Sequence[int],
        split_lens: Sequence[int],
        attn_modes: Sequence[str],
        device: torch.device | str | None = None,
    ) -> PackedMask:
        """Build the mask from per-sample lengths and the splits (``causal``/``full``/``noise``) of all
        samples, in order. A trailing pad sample (possibly of length 0) is an ordinary causal split."""
        sample_lens = as_int_list(sample_lens, "sample_lens")
        split_lens = as_int_list(split_lens, "split_lens")
        if isinstance(attn_modes, str):
            raise ValueError("attn_modes must be a sequence of strings, one per split, not a single string")
        attn_modes = list(attn_modes)
        if len(sample_lens) == 0:
            raise ValueError("sample_lens is empty: a pack needs at least one sample")
        if any(s < 0 for s in sample_lens):
            raise ValueError(f"sample_lens has a negative length: {sample_lens}")
        if any(s < 0 for s in split_lens):
            raise ValueError(f"split_lens has a negative length: {split_lens}")
        if len(attn_modes) != len(split_lens):
            raise ValueError(f"attn_modes has {len(attn_modes)} entries but split_lens has {len(split_lens)}")
        for i, m in enumerate(attn_modes):
            if m not in ATTN_MODES:
                raise ValueError(f"attn_modes[{i}] = {m!r} is not one of {ATTN_MODES}")
        total = sum(sample_lens)
        if sum(split_lens) != total:
            raise ValueError(f"split_lens sum to {sum(split_lens)} but sample_lens sum to {total}")
        sample_ends = np.cumsum(np.asarray(sample_lens, dtype=np.int64))
        split_ends = np.cumsum(np.asarray(split_lens, dtype=np.int64))
        split_starts = split_ends - np.asarray(split_lens, dtype=np.int64)
        # a split [a, b) crosses a sample iff the first sample end after a lies before b
        nxt = np.searchsorted(sample_ends, split_starts, side="right")
        nxt_end = sample_ends[np.minimum(nxt, len(sample_ends) - 1)]
        crosses = (nxt < len(sample_ends)) & (nxt_end < split_ends)
        if crosses.any():
            i = int(np.nonzero(crosses)[0][0])
            raise ValueError(
                f"split_lens[{i}] covers tokens [{split_starts[i]}, {split_ends[i]}) which cross a sample boundary "
                f"at {int(nxt_end[i])}; splits must partition each sample"
            )
        if total >= _BIG:
            raise ValueError(f"sample_lens sum to {total}, beyond the int32 range of the interval vectors")

        lens = np.asarray(split_lens, dtype=np.int64)
        mode_id = np.asarray([ATTN_MODES.index(m) for m in attn_modes], dtype=np.int64)
        # sample end of each split: the first sample end >= split end (zero-length splits handled alike)
        split_sample_end = (
            sample_ends[np.searchsorted(sample_ends, split_ends, side="left")] if total else split_ends
        )
        tok = np.arange(total, dtype=np.int64)
        t_mode = np.repeat(mode_id, lens)
        t_start = np.repeat(split_starts, lens)
        t_end = np.repeat(split_ends, lens)
        t_sample_end = np.repeat(split_sample_end, lens)
        lo = np.where(t_mode == 0, tok, t_start)
        hi = np.where(t_mode == 2, t_end, t_sample_end)
        mask = cls._from_host(lo, hi, sample_lens)
        return mask.to(device) if device is not None else mask

    @classmethod
    def from_dense(
        cls, masks: Sequence[torch.Tensor], device: torch.device | str | None = None
    ) -> PackedMask:
        """Build the mask from per-sample dense masks ``[L, L]`` (query rows, key columns): float with
        0 = attend and -inf = masked (upstream's ``nested_attention_masks``), or bool with True = attend.
        Each key column's visible rows must be contiguous (true of every BAGEL mask)."""
        if isinstance(masks, torch.Tensor):
            masks = [masks]
        if len(masks) == 0:
            raise ValueError("nested_attention_masks is empty: a pack needs at least one sample")
        los, his, lens = [], [], []
        offset = 0
        for i, m in enumerate(masks):
            if not isinstance(m, torch.Tensor):
                raise ValueError(f"nested_attention_masks[{i}] is not a tensor")
            if m.dim() == 4 and m.shape[0] == 1 and m.shape[1] == 1:
                m = m[0, 0]
            if m.dim() != 2 or m.shape[0] != m.shape[1]:
                raise ValueError(
                    f"nested_attention_masks[{i}] must be square [L, L], got shape {tuple(m.shape)}"
                )
            if m.dtype == torch.bool:
                vis = m
            elif m.is_floating_point():
                finite0 = m == 0
                neg_inf = torch.isneginf(m)
                if not bool((finite0 | neg_inf).all()):
                    raise ValueError(
                        f"nested_attention_masks[{i}] holds values other than 0 and -inf; only boolean masks "
                        "(additive 0/-inf or bool) can be represented"
                    )
                vis = finite0
            else:
                raise ValueError(
                    f"nested_attention_masks[{i}] has dtype {m.dtype}; expected float (0/-inf) or bool"
                )
            vis = vis.detach().to("cpu")
            L = vis.shape[0]
            if L == 0:  # an empty (pad) sample
                lens.append(0)
                continue
            any_row = vis.any(dim=0)
            rows = torch.arange(L).unsqueeze(1).expand(L, L)
            first = torch.where(vis, rows, L).min(dim=0).values
            last = torch.where(vis, rows, -1).max(dim=0).values
            count = vis.sum(dim=0)
            lo = torch.where(any_row, first, 0)
            hi = torch.where(any_row, last + 1, 0)
            if bool((any_row & (count != hi - lo)).any()):
                col = int(torch.nonzero(any_row & (count != hi - lo))[0])
                raise ValueError(
                    f"nested_attention_masks[{i}]: the queries that see key {col} are not one contiguous range; "
                    "such a mask has no interval form"
                )
            los.append(lo + offset)
            his.append(torch.where(any_row, hi + offset, offset))
            lens.append(L)
            offset += L
        empty = np.zeros(0, dtype=np.int64)
        lo_all = torch.cat(los).numpy() if los else empty
        hi_all = torch.cat(his).numpy() if his else empty
        mask = cls._from_host(lo_all, hi_all, lens)
        return mask.to(device) if device is not None else mask

    # ------------------------------------------------------------------ utilities
    @property
    def device(self) -> torch.device:
        return self._lo.device

    def to(self, device: torch.device | str) -> PackedMask:
        """The same mask on ``device`` (``self`` when it is there already). The host copy of the
        intervals comes along, so a mask on ``meta`` still answers every host-side question."""
        device = torch.device(device)
        if device == self.device:
            return self
        out = PackedMask.__new__(PackedMask)
        ridx = None if self._row_index is None else to_device(self._row_index, device)  # validated, owned
        out._init(
            to_device(self._lo, device),
            to_device(self._hi, device),
            self._lo_host,
            self._hi_host,
            self._sample_lens,
            ridx,
        )
        return out

    def __repr__(self) -> str:
        return (
            f"PackedMask(total_len={self.total_len}, samples={len(self.sample_lens)}, device={self.device})"
        )

    def to_dense(self) -> torch.Tensor:
        """``[N, N]`` bool, True where query row may attend key column. O(N^2): references and tests only."""
        q = torch.arange(self.total_len, device=self.device, dtype=torch.int32).unsqueeze(1)
        return (self._lo.unsqueeze(0) <= q) & (q < self._hi.unsqueeze(0))

    def num_visible_pairs(self, length: int | None = None) -> int:
        """Number of visible (query, key) pairs among the first ``length`` tokens (FLOP counting; host data)."""
        m = self if length is None else self.truncated(length)
        return int(np.clip(m._hi_host.astype(np.int64) - m._lo_host, 0, None).sum())

    def truncated(self, length: int) -> PackedMask:
        """The mask restricted to the first ``length`` tokens (pad rows of flex-style packing dropped).

        Raises ValueError when a query before ``length`` would need a key at or after it. Checked on the
        host copy of the intervals: no device read, no sync."""
        cache = derived(self)
        hit = cache.get(("truncated", length)) if type(length) is int else None
        if hit is not None:  # (looked up first: a torch.compile region finds the prepared truncation)
            return hit
        length = as_int(length, "length")
        if length == self.total_len:
            return self
        if length < 0 or length > self.total_len:
            raise ValueError(f"sequence length {length} is outside [0, total_len={self.total_len}]")
        if self._row_index is not None:
            raise ValueError("truncate the mask before attaching a row_index (with_row_index)")
        tail_lo = self._lo_host[length:]
        tail_hi = self._hi_host[length:]
        bad = (tail_lo < length) & (tail_hi > tail_lo)
        if bad.any():
            k = length + int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"sequence length {length} cuts the pack inside an attention span: key {k} is seen by query "
                f"{int(self._lo_host[k])} < {length}; the rows beyond the sequence must form whole splits (the pad "
                "sample)"
            )
        ends = np.cumsum(self.sample_lens)
        lens = []
        start = 0
        for e in ends:
            e = min(int(e), length)
            lens.append(max(e - start, 0))
            start = max(start, e)

        # keys before the cut seen only by rows after it get an empty interval inside their sample
        hi_h = np.minimum(self._hi_host[:length], length)
        lo_h = np.minimum(self._lo_host[:length], hi_h)
        lo_h, hi_h = _host(lo_h), _host(hi_h)
        # the device vectors from the host ones (one small copy; no device op, so fake tensors and meta
        # masks take the same path)
        lo = to_device(torch.from_numpy(lo_h.copy()), self.device)
        hi = to_device(torch.from_numpy(hi_h.copy()), self.device)
        out = PackedMask.__new__(PackedMask)
        out._init(lo, hi, lo_h, hi_h, tuple(lens))
        cache[("truncated", length)] = out
        return out

    def with_row_index(self, row_index) -> PackedMask:
        """The same mask whose token ``i`` lives at row ``row_index[i]`` of q, k, v and the output.

        Used by the MoT model, which keeps its hidden states grouped by expert: the attention kernel
        reads and writes rows through this permutation while iterating in mask order.

        ``row_index`` is either a :class:`bagel_kernels.mot.GroupedOrder` (validated when it was built:
        its ``inv`` is taken with no further check and no sync) or an integer tensor, validated here
        (a permutation of ``range(total_len)``; one host sync; skipped for tensors without values, i.e.
        meta and fake tensors). Either way the mask keeps its own int32 copy (a caller reusing its
        buffer changes nothing) and hands out copies only."""
        from .mot import GroupedOrder  # the typed, validated row order (mot imports no mask)

        if isinstance(row_index, GroupedOrder):
            if row_index.total != self.total_len:
                raise ValueError(
                    f"the grouped order covers {row_index.total} tokens but the mask has total_len={self.total_len}"
                )
            idx = row_index.inv
        else:
            if not isinstance(row_index, torch.Tensor) or row_index.dim() != 1:
                raise ValueError("row_index must be a 1-D integer tensor (or a mot.GroupedOrder)")
            if row_index.is_floating_point() or row_index.is_complex() or row_index.dtype == torch.bool:
                raise ValueError(f"row_index must hold integers, got dtype {row_index.dtype}")
            if row_index.numel() != self.total_len:
                raise ValueError(
                    f"row_index has {row_index.numel()} entries but the mask has total_len={self.total_len}"
                )
            idx = row_index
        if idx.device != self.device:
            raise ValueError(f"row_index is on {idx.device} but the mask is on {self.device}")
        # copy first, then validate the copy (in its own dtype, so an int64 beyond int32 cannot wrap)
        idx = idx.detach().clone()
        if not isinstance(row_index, GroupedOrder) and has_values(idx):
            seen = torch.zeros(self.total_len, dtype=torch.bool, device=self.device)
            seen[idx.long().clamp(0, max(self.total_len - 1, 0))] = True
            ok = ((idx >= 0) & (idx < self.total_len)).all() & seen.all()
            if not bool(ok):  # one host sync
                raise ValueError("row_index is not a permutation of range(total_len)")
        out = PackedMask.__new__(PackedMask)
        out._init(
            self._lo,
            self._hi,
            self._lo_host,
            self._hi_host,
            self._sample_lens,
            idx.to(torch.int32).contiguous(),
            self._derived,
        )  # fmt: skip (memo shared: see Derived)
        return out

    def sample_bounds(self) -> list[tuple[int, int]]:
        """``[(start, end)]`` of every sample."""
        out, s = [], 0
        for n in self.sample_lens:
            out.append((s, s + n))
            s += n
        return out

    # ------------------------------------------------------------------ block tables
    def block_tables(self, block_m: int, block_n: int, *, on_host: bool = False) -> BlockTables:
        """Tile tables for query blocks of ``block_m`` rows and key blocks of ``block_n`` columns
        (cached per block shape, outside the mask: :func:`derived`). O(N + non-empty tiles) memory.
        Built from the host copy of the intervals, then moved to the mask's device (``on_host``: the
        host tables, as built)."""
        bm = as_int(block_m, "block_m")
        bn = as_int(block_n, "block_n")
        for name, b in (("block_m", bm), ("block_n", bn)):
            if not 0 < b <= _MAX_BLOCK:
                raise ValueError(f"{name}={b} must be a positive block size of at most {_MAX_BLOCK} rows")
        cache = derived(self)
        key = ("tables", bm, bn, self.device if not on_host else torch.device("cpu"))
        hit = cache.get(key)
        if hit is None:
            host_key = ("tables", bm, bn, torch.device("cpu"))
            host = cache.get(host_key)
            if host is None:
                host = cache[host_key] = _build_tables(self._lo_host, self._hi_host, bm, bn)
            hit = cache[key] = host if key == host_key else host.to(self.device)
        return hit


def _build_tables(lo_host: np.ndarray, hi_host: np.ndarray, block_m: int, block_n: int) -> BlockTables:
    """:class:`BlockTables` of host interval vectors, computed in numpy (no torch op, so no torch mode
    sees it), as CPU tensors."""
    N = lo_host.size
    num_m = -(-N // block_m)
    num_n = -(-N // block_n)
    pad = num_n * block_n - N
    lo = lo_host.astype(np.int64)
    hi = hi_host.astype(np.int64)
    nonempty = hi > lo
    lo_ne = np.where(nonempty, lo, _BIG)
    hi_ne = np.where(nonempty, hi, 0)
    lo_all = lo
    hi_all = np.where(nonempty, hi, -1)

    def blocks(x: np.ndarray, fill: int) -> np.ndarray:
        return np.concatenate((x, np.full(pad, fill, dtype=np.int64))).reshape(num_n, block_n)

    q_first = blocks(lo_ne, _BIG).min(axis=1)  # first query row touching the key block
    q_last = blocks(hi_ne, 0).max(axis=1)  # one past the last query row
    has = q_last > 0
    kv_q_start = np.where(has, q_first // block_m, 0)
    kv_q_end = np.where(has, (q_last + block_m - 1) // block_m, 0)
    kv_max_lo = blocks(lo_all, _BIG).max(axis=1)  # padding keys -> never full
    kv_min_hi = blocks(hi_all, -1).min(axis=1)

    # CSR per query block of the non-empty key blocks
    counts = np.clip(kv_q_end - kv_q_start, 0, None)
    n_ids = np.repeat(np.arange(num_n, dtype=np.int64), counts)
    first_of = np.cumsum(counts) - counts
    m_ids = kv_q_start[n_ids] + (np.arange(n_ids.size, dtype=np.int64) - first_of[n_ids])
    order = np.argsort(m_ids * num_n + n_ids, kind="stable")  # the keys are unique
    m_ids, n_ids = m_ids[order], n_ids[order]
    q_rows_end = np.minimum((m_ids + 1) * block_m, N)
    full = (kv_max_lo[n_ids] <= m_ids * block_m) & (kv_min_hi[n_ids] >= q_rows_end)
    per_m = np.bincount(m_ids, minlength=num_m)
    q_kv_ptr = np.zeros(num_m + 1, dtype=np.int64)
    q_kv_ptr[1:] = np.cumsum(per_m)
    # key-block span per query block (first and one past last non-empty key block)
    q_kv_start = np.full(num_m, num_n, dtype=np.int64)
    q_kv_end = np.zeros(num_m, dtype=np.int64)
    np.minimum.at(q_kv_start, m_ids, n_ids)
    np.maximum.at(q_kv_end, m_ids, n_ids + 1)
    q_kv_start = np.where(per_m > 0, q_kv_start, 0)

    def i32(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int32))

    return BlockTables(
        block_m=block_m,
        block_n=block_n,
        num_m=num_m,
        num_n=num_n,
        total_len=N,
        q_kv_ptr=i32(q_kv_ptr),
        q_kv_idx=i32(n_ids),
        q_kv_full=i32(full),
        q_kv_start=i32(q_kv_start),
        q_kv_end=i32(q_kv_end),
        kv_q_start=i32(kv_q_start),
        kv_q_end=i32(kv_q_end),
        kv_max_lo=i32(np.minimum(kv_max_lo, _BIG)),
        kv_min_hi=i32(kv_min_hi),
    )

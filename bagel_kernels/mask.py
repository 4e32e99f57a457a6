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

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["PackedMask", "BlockTables", "ATTN_MODES", "TILE_EMPTY", "TILE_PARTIAL", "TILE_FULL"]

ATTN_MODES = ("causal", "full", "noise")
TILE_EMPTY, TILE_PARTIAL, TILE_FULL = 0, 1, 2

_BIG = np.iinfo(np.int32).max


def _as_int(value, name: str) -> int:
    """``value`` as a Python int, refusing anything that is not an integer already: bools, floats
    (integral ones too: ``2.0`` is refused, so that ``2.5`` can never be truncated by accident),
    strings, and non-integer tensors. Accepts ints, numpy integers and one-element integer tensors."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an int, got the bool {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise ValueError(
                f"{name} must be an int, got a {value.dtype} tensor of shape {tuple(value.shape)}"
            )
        return int(value.item())
    if isinstance(value, (float, np.floating, str, bytes)):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None


def _as_int_list(values, name: str) -> list[int]:
    """A 1-D sequence of ints (list/tuple of ints, integer numpy array or tensor) as a list of Python
    ints; every element goes through :func:`_as_int` (no float, bool or string is coerced)."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(
                f"{name} must be a 1-D sequence of ints, got a tensor of shape {tuple(values.shape)}"
            )
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got dtype {values.dtype}")
        return [int(v) for v in values.tolist()]
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.dtype.kind not in "iu":
            raise ValueError(
                f"{name} must be a 1-D sequence of ints, got a numpy array of dtype {values.dtype} "
                f"and shape {values.shape}"
            )
        return [int(v) for v in values.tolist()]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a sequence of ints, got {type(values).__name__}")
    return [_as_int(v, f"{name}[{i}]") for i, v in enumerate(values)]


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

    def tile_kinds(self) -> torch.Tensor:
        """Dense ``[num_m, num_n]`` int8 table of TILE_EMPTY / TILE_PARTIAL / TILE_FULL (O(tiles); tests)."""
        kinds = torch.zeros(self.num_m, self.num_n, dtype=torch.int8, device=self.q_kv_idx.device)
        counts = (self.q_kv_ptr[1:] - self.q_kv_ptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(self.num_m, device=counts.device), counts)
        kinds[rows, self.q_kv_idx.long()] = torch.where(self.q_kv_full.bool(), TILE_FULL, TILE_PARTIAL).to(
            torch.int8
        )
        return kinds


class PackedMask:
    """BAGEL's packed attention mask in interval form.

    Attributes:
        kv_lo, kv_hi: int32 ``[total_len]``; key ``k`` is seen by queries ``kv_lo[k] <= q < kv_hi[k]``.
        sample_lens: tuple of per-sample token counts (the trailing pad sample included).
        total_len: ``sum(sample_lens)``.
        row_index: None, or (after :meth:`with_row_index`) int32 ``[total_len]``: token ``i`` lives at
            row ``row_index[i]`` of the attention inputs. Reading it returns a copy.

    Build with :meth:`from_splits` (``split_lens``/``attn_modes``) or :meth:`from_dense` (upstream's
    ``nested_attention_masks``). ``to_dense()`` materialises ``[N, N]`` booleans for references only.

    The constructor ``PackedMask(kv_lo, kv_hi, sample_lens)`` takes the interval vectors directly and
    validates what every backend relies on (O(N), one host sync): integer tensors (no float, no bool;
    values compared in int64, so nothing wraps), one per key, and for every key ``k`` of a sample
    ``[s, e)``: ``s <= kv_lo[k] <= kv_hi[k] <= e``. An interval never leaves its sample (the per-sample
    sdpa backend and the tiled backends would otherwise disagree) and never leaves ``[0, total_len]``
    (the block tables index tiles by it). An empty interval is ``kv_lo == kv_hi``. The interval need
    not contain the key itself: masks built from splits always do (so the query rows of a key block
    are one contiguous range, DESIGN.md section 3), ``from_dense`` accepts any column-contiguous mask,
    and the kernels iterate a superset range, in which tiles may be empty, so they do not depend on it.
    The vectors are copied: later changes to the caller's tensors do not reach the mask.
    """

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
        lens = _as_int_list(sample_lens, "sample_lens")
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
        if total:
            dev = kv_lo.device
            lens_t = torch.tensor(lens, dtype=torch.long, device=dev)
            ends_t = torch.cumsum(lens_t, 0)
            s = torch.repeat_interleave(ends_t - lens_t, lens_t, output_size=total)  # sample start per key
            e = torch.repeat_interleave(ends_t, lens_t, output_size=total)  # sample end per key
            lo, hi = kv_lo.long(), kv_hi.long()
            bad = (lo < s) | (lo > hi) | (hi > e)
            if bool(bad.any()):  # the one host sync of a valid mask
                k = int(torch.nonzero(bad)[0])
                raise ValueError(
                    f"kv_lo/kv_hi of key {k} give the query interval [{int(lo[k])}, {int(hi[k])}), which is not "
                    f"inside the key's sample [{int(s[k])}, {int(e[k])}); every key needs "
                    "sample_start <= kv_lo <= kv_hi <= sample_end"
                )
        self._init(
            kv_lo.to(torch.int32, copy=True).contiguous(),
            kv_hi.to(torch.int32, copy=True).contiguous(),
            tuple(lens),
        )

    def _init(self, kv_lo: torch.Tensor, kv_hi: torch.Tensor, sample_lens: tuple[int, ...]) -> None:
        self.kv_lo = kv_lo
        self.kv_hi = kv_hi
        self.sample_lens = sample_lens
        self.total_len = int(sum(sample_lens))
        self._row_index: torch.Tensor | None = None
        self._tables: dict = {}
        self._truncated: dict = {}
        self._cache: dict = {}  # per-backend derived objects (e.g. a FlexAttention block mask)

    @classmethod
    def _trusted(cls, kv_lo: torch.Tensor, kv_hi: torch.Tensor, sample_lens: Sequence[int]) -> PackedMask:
        """A mask from vectors that are valid by construction (int32, owned, inside their samples):
        the builders below use it and skip the constructor's O(N) check."""
        out = cls.__new__(cls)
        out._init(kv_lo.to(torch.int32).contiguous(), kv_hi.to(torch.int32).contiguous(), tuple(sample_lens))
        return out

    @property
    def row_index(self) -> torch.Tensor | None:
        """int32 ``[total_len]`` or None. A copy: the tensor the kernels read cannot be changed through it."""
        return None if self._row_index is None else self._row_index.clone()

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
        sample_lens = _as_int_list(sample_lens, "sample_lens")
        split_lens = _as_int_list(split_lens, "split_lens")
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
        mask = cls._trusted(
            torch.from_numpy(lo.astype(np.int32)), torch.from_numpy(hi.astype(np.int32)), sample_lens
        )
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
        empty = torch.zeros(0, dtype=torch.int64)
        mask = cls._trusted(torch.cat(los) if los else empty, torch.cat(his) if his else empty, lens)
        return mask.to(device) if device is not None else mask

    # ------------------------------------------------------------------ utilities
    @property
    def device(self) -> torch.device:
        return self.kv_lo.device

    def to(self, device: torch.device | str) -> PackedMask:
        device = torch.device(device)
        if device == self.device:
            return self
        out = PackedMask._trusted(self.kv_lo.to(device), self.kv_hi.to(device), self.sample_lens)
        if self._row_index is not None:
            out._row_index = self._row_index.to(device)  # validated here already, owned by the copy
        return out

    def __repr__(self) -> str:
        return (
            f"PackedMask(total_len={self.total_len}, samples={len(self.sample_lens)}, device={self.device})"
        )

    def to_dense(self) -> torch.Tensor:
        """``[N, N]`` bool, True where query row may attend key column. O(N^2): references and tests only."""
        q = torch.arange(self.total_len, device=self.device, dtype=torch.int32).unsqueeze(1)
        return (self.kv_lo.unsqueeze(0) <= q) & (q < self.kv_hi.unsqueeze(0))

    def num_visible_pairs(self, length: int | None = None) -> int:
        """Number of visible (query, key) pairs among the first ``length`` tokens (FLOP counting)."""
        m = self if length is None else self.truncated(length)
        return int((m.kv_hi.long() - m.kv_lo.long()).clamp_min(0).sum())

    def truncated(self, length: int) -> PackedMask:
        """The mask restricted to the first ``length`` tokens (pad rows of flex-style packing dropped).

        Raises ValueError when a query before ``length`` would need a key at or after it."""
        length = _as_int(length, "length")
        if length == self.total_len:
            return self
        if length < 0 or length > self.total_len:
            raise ValueError(f"sequence length {length} is outside [0, total_len={self.total_len}]")
        if self._row_index is not None:
            raise ValueError("truncate the mask before attaching a row_index (with_row_index)")
        if length in self._truncated:
            return self._truncated[length]
        bad = self._cut_flags(length)
        if bool(bad.any()):
            k = length + int(torch.nonzero(bad)[0])
            raise ValueError(
                f"sequence length {length} cuts the pack inside an attention span: key {k} is seen by query "
                f"{int(self.kv_lo[k])} < {length}; the rows beyond the sequence must form whole splits (the pad sample)"
            )
        return self._truncated_trusted(length)

    def _cut_flags(self, length: int) -> torch.Tensor:
        """bool per key at or after ``length``: True where a query before ``length`` sees it, i.e. where
        :meth:`truncated` refuses the cut. On the device, no sync: for callers that read back all their
        checks at once before calling :meth:`_truncated_trusted`."""
        tail_lo = self.kv_lo[length:]
        tail_hi = self.kv_hi[length:]
        return (tail_lo < length) & (tail_hi > tail_lo)

    def _truncated_trusted(self, length: int) -> PackedMask:
        """:meth:`truncated` for an int ``length`` in ``[0, total_len]`` whose cut the caller has checked
        (no key at or after it seen before it: :meth:`_cut_flags` all False); no host sync."""
        if length == self.total_len:
            return self
        if length in self._truncated:
            return self._truncated[length]
        ends = np.cumsum(self.sample_lens)
        lens = []
        start = 0
        for e in ends:
            e = min(int(e), length)
            lens.append(max(e - start, 0))
            start = max(start, e)
        # keys before the cut seen only by rows after it get an empty interval inside their sample
        hi = torch.clamp(self.kv_hi[:length], max=length)
        lo = torch.minimum(self.kv_lo[:length], hi)
        out = PackedMask._trusted(lo, hi, lens)
        self._truncated[length] = out
        return out

    def with_row_index(self, row_index: torch.Tensor) -> PackedMask:
        """The same mask whose token ``i`` lives at row ``row_index[i]`` of q, k, v and the output.

        Used by the MoT model, which keeps its hidden states grouped by expert: the attention kernel
        reads and writes rows through this permutation while iterating in mask order. Validated once
        here (a permutation of ``range(total_len)``), so kernels can trust it: the mask keeps its own
        copy (a caller reusing its buffer changes nothing) and hands out copies only."""
        if not isinstance(row_index, torch.Tensor) or row_index.dim() != 1:
            raise ValueError("row_index must be a 1-D integer tensor")
        if row_index.is_floating_point() or row_index.is_complex() or row_index.dtype == torch.bool:
            raise ValueError(f"row_index must hold integers, got dtype {row_index.dtype}")
        if row_index.numel() != self.total_len:
            raise ValueError(
                f"row_index has {row_index.numel()} entries but the mask has total_len={self.total_len}"
            )
        if row_index.device != self.device:
            raise ValueError(f"row_index is on {row_index.device} but the mask is on {self.device}")
        # copy first, then validate the copy (in its own dtype, so an int64 beyond int32 cannot wrap)
        idx = row_index.detach().clone()
        seen = torch.zeros(self.total_len, dtype=torch.bool, device=self.device)
        seen[idx.long().clamp(0, max(self.total_len - 1, 0))] = True
        ok = ((idx >= 0) & (idx < self.total_len)).all() & seen.all()
        if not bool(ok):  # one host sync
            raise ValueError("row_index is not a permutation of range(total_len)")
        return self._with_row_index_trusted(idx)

    def _with_row_index_trusted(self, row_index: torch.Tensor) -> PackedMask:
        """:meth:`with_row_index` for a permutation that the caller built from indexes it validated
        itself (the model's grouped order): no value check, no host sync. The mask still keeps its own
        int32 copy, so later changes to the caller's tensor do not reach the kernels."""
        out = PackedMask.__new__(PackedMask)
        out.__dict__.update(self.__dict__)
        out._row_index = row_index.detach().to(torch.int32, copy=True).contiguous()
        out._truncated = {}
        return out

    def sample_bounds(self) -> list[tuple[int, int]]:
        """``[(start, end)]`` of every sample."""
        out, s = [], 0
        for n in self.sample_lens:
            out.append((s, s + n))
            s += n
        return out

    # ------------------------------------------------------------------ block tables
    def block_tables(self, block_m: int, block_n: int) -> BlockTables:
        """Tile tables for query blocks of ``block_m`` rows and key blocks of ``block_n`` columns
        (cached per block shape). O(N + non-empty tiles) memory."""
        key = (int(block_m), int(block_n))
        if key not in self._tables:
            self._tables[key] = self._build_tables(*key)
        return self._tables[key]

    def _build_tables(self, block_m: int, block_n: int) -> BlockTables:
        if block_m <= 0 or block_n <= 0:
            raise ValueError(f"block sizes must be positive, got block_m={block_m}, block_n={block_n}")
        dev = self.device
        N = self.total_len
        num_m = -(-N // block_m)
        num_n = -(-N // block_n)
        pad = num_n * block_n - N
        lo = self.kv_lo.long()
        hi = self.kv_hi.long()
        nonempty = hi > lo
        big = torch.tensor(_BIG, dtype=torch.long, device=dev)
        lo_ne = torch.where(nonempty, lo, big)
        hi_ne = torch.where(nonempty, hi, 0)
        lo_all = lo
        hi_all = torch.where(nonempty, hi, -1)

        def blocks(x: torch.Tensor, fill: int) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, pad), value=fill).view(num_n, block_n)

        q_first = blocks(lo_ne, _BIG).min(dim=1).values  # first query row touching the key block
        q_last = blocks(hi_ne, 0).max(dim=1).values  # one past the last query row
        has = q_last > 0
        kv_q_start = torch.where(has, q_first // block_m, 0)
        kv_q_end = torch.where(has, (q_last + block_m - 1) // block_m, 0)
        kv_max_lo = blocks(lo_all, _BIG).max(dim=1).values  # padding keys -> never full
        kv_min_hi = blocks(hi_all, -1).min(dim=1).values

        # CSR per query block of the non-empty key blocks
        counts = (kv_q_end - kv_q_start).clamp_min(0)
        n_ids = torch.repeat_interleave(torch.arange(num_n, device=dev), counts)
        first_of = torch.cumsum(counts, 0) - counts
        m_ids = kv_q_start[n_ids] + (torch.arange(n_ids.numel(), device=dev) - first_of[n_ids])
        order = torch.argsort(m_ids * num_n + n_ids)
        m_ids, n_ids = m_ids[order], n_ids[order]
        q_rows_end = torch.clamp((m_ids + 1) * block_m, max=N)
        full = (kv_max_lo[n_ids] <= m_ids * block_m) & (kv_min_hi[n_ids] >= q_rows_end)
        per_m = torch.bincount(m_ids, minlength=num_m)
        q_kv_ptr = torch.zeros(num_m + 1, dtype=torch.long, device=dev)
        q_kv_ptr[1:] = torch.cumsum(per_m, 0)
        # key-block span per query block (first and one past last non-empty key block)
        q_kv_start = torch.full((num_m,), num_n, dtype=torch.long, device=dev)
        q_kv_end = torch.zeros(num_m, dtype=torch.long, device=dev)
        if n_ids.numel():
            q_kv_start.scatter_reduce_(0, m_ids, n_ids, reduce="amin")
            q_kv_end.scatter_reduce_(0, m_ids, n_ids + 1, reduce="amax")
        q_kv_start = torch.where(per_m > 0, q_kv_start, 0)

        def i32(x: torch.Tensor) -> torch.Tensor:
            return x.to(torch.int32).contiguous()

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
            kv_max_lo=i32(kv_max_lo.clamp(max=_BIG)),
            kv_min_hi=i32(kv_min_hi),
        )

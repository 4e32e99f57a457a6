"""The streaming packer and the loader the trainer iterates.

    loader = build_loader(data_config, model_config, tokenizer, rank=rank, world_size=world_size)
    for raw in loader:                                    # RawPack: samples with VAE images as pixels
        samples = encode_vae_images(raw.samples, vae, micro_batch_size=8)   # on the GPU
        batch = pack_samples(samples, model_config, max_num_tokens=data_config.max_num_tokens,
                             special_tokens=loader.special_tokens, device=device)
        loss = model(**batch) ...
    state = loader.state_dict()                           # this rank's position; load_state_dict(state)

**Order and sharding.** Each group's records form one list per epoch: its units (parquet row groups,
JSONL lines) in a permutation seeded by ``(seed, group, epoch)``, the rows of each unit in a
permutation of their own. The list is cut into ``world_size * num_workers`` contiguous shards (shard
``rank * num_workers + worker``), so shards are disjoint and together hold every record once per
epoch; a shard that runs out starts the group's next epoch. A sample's own randomness (caption choice,
edit sub-chain, CFG dropout, timestep logit) comes from a generator keyed by its identity ``(group,
epoch, position)``, so reading a sample again gives the same sample.

**Packing** (per shard, as upstream's ``PackedDataset``, plus: nothing is lost). A pack opens with the
samples left over from the previous one, then one sample of every ``is_mandatory`` group not already
in the pack or waiting (a mandatory sample that does not fit waits for the next pack). Then, while
it holds fewer than ``expected_num_tokens`` and no sample is waiting: take a sample from the overflow buffer while the pack is
below ``prefer_buffer_before`` tokens, else from a group chosen by weight. A sample that does not fit
(``max_num_tokens``) goes to the buffer if it came fresh and the buffer has room; otherwise the pack is
closed and the sample opens the next one. Samples over ``max_num_tokens_per_sample`` are dropped or
truncated (``long_samples``), and counted.

**State.** Per worker: each group's ``(epoch, position)``, the group-choice generator's state, the
ids of the samples in the buffer and the carry-over, and the skip counters. Restoring re-reads those
samples. The loader hands packs over in the DataLoader's round-robin worker order and records, per
worker, the state right after the last pack it handed over, and which worker comes next: a run
restored from :meth:`PackLoader.state_dict` sees exactly the packs an uninterrupted run would.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bagel.data.config import DataConfig, GroupSpec, load_groups
from bagel.data.packing import Segment, SpecialTokens, Text, VaeImage, sample_num_tokens
from bagel.data.readers import SampleBuilder, build_sources
from bagel.data.tokenizer import BAGEL_SPECIAL_TOKENS
from bagel.data.transforms import SKIP_REASONS, ImageTransform, SkipSample

__all__ = [
    "RawSample",
    "RawPack",
    "GroupReader",
    "ShardPacker",
    "PackStream",
    "PackLoader",
    "build_loader",
    "encode_vae_images",
    "STATE_FORMAT",
]

logger = logging.getLogger("bagel.data")
STATE_FORMAT = 1


@dataclass
class RawSample:
    """One sample: its identity ``(group, epoch, position)``, its segments, its token count."""

    id: tuple[int, int, int]
    segments: list[Segment]
    num_tokens: int


@dataclass
class RawPack:
    """What the loader yields: ``samples`` (lists of segments; VAE images as pixels ``[3, H, W]`` in
    [-1, 1], to be encoded by :func:`encode_vae_images`), their ids, the pack's token count, the
    worker that built it, and that worker's state and cumulative skip counters after it."""

    samples: list[list[Segment]]
    sample_ids: list[tuple[int, int, int]]
    num_tokens: int
    worker_id: int
    state: dict[str, Any] = field(repr=False)
    skipped: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- one group
class GroupReader:
    """One group's records in epoch order, restricted to one shard, read into samples."""

    def __init__(
        self,
        index: int,
        spec: GroupSpec,
        sources: list[Any],
        builder: SampleBuilder,
        *,
        seed: int,
        shard: int,
        num_shards: int,
    ):
        self.index = index
        self.spec = spec
        self.sources = sources
        self.builder = builder
        self.seed = seed
        src, unit, sizes = [], [], []
        for si, s in enumerate(sources):
            src.append(np.full(len(s.unit_sizes), si, dtype=np.int64))
            unit.append(np.arange(len(s.unit_sizes), dtype=np.int64))
            sizes.append(s.unit_sizes)
        self.unit_src = np.concatenate(src)
        self.unit_idx = np.concatenate(unit)
        self.unit_sizes = np.concatenate(sizes)
        self.total = int(self.unit_sizes.sum())
        if self.total < num_shards:
            raise ValueError(
                f"group {spec.name!r} has {self.total} samples, fewer than the {num_shards} shards "
                f"(world_size x num_workers): some workers would get none. Add data (num_used_data) or "
                f"use fewer workers. Files: {self.describe()}"
            )
        self.lo = self.total * shard // num_shards
        self.hi = self.total * (shard + 1) // num_shards
        self._order: tuple[int, np.ndarray, np.ndarray] | None = None
        self._rows: tuple[int, int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Samples of this shard per epoch."""
        return self.hi - self.lo

    def describe(self) -> str:
        return "; ".join(s.describe() for s in self.sources)

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self._order is None or self._order[0] != epoch:
            perm = np.random.default_rng([self.seed, self.index, epoch]).permutation(len(self.unit_sizes))
            # one record per unit (JSONL lines): the position is the index into the permutation
            ends = None if self.total == len(self.unit_sizes) else np.cumsum(self.unit_sizes[perm])
            self._order = (epoch, perm, ends)
        return self._order[1], self._order[2]

    def locate(self, epoch: int, pos: int) -> tuple[int, int, int]:
        """Position ``pos`` of epoch ``epoch``'s order -> ``(source, unit in source, row)``."""
        if not 0 <= pos < self.total:
            raise IndexError(f"position {pos} is outside the group's {self.total} records")
        perm, ends = self._epoch_order(epoch)
        if ends is None:
            u = int(perm[pos])
            return int(self.unit_src[u]), int(self.unit_idx[u]), 0
        k = int(np.searchsorted(ends, pos, side="right"))
        u = int(perm[k])
        r = pos - (int(ends[k - 1]) if k else 0)
        size = int(self.unit_sizes[u])
        if size > 1:
            if self._rows is None or self._rows[:2] != (epoch, u):
                rows = np.random.default_rng([self.seed, self.index, epoch, u, 1]).permutation(size)
                self._rows = (epoch, u, rows)
            r = int(self._rows[2][r])
        return int(self.unit_src[u]), int(self.unit_idx[u]), r

    def read(self, epoch: int, pos: int) -> list[Segment]:
        """The sample at ``pos`` of epoch ``epoch`` (raises :class:`SkipSample`)."""
        si, unit, row = self.locate(epoch, pos)
        source = self.sources[si]
        record = source.read(unit, row)
        rng = random.Random(f"{self.seed}/{self.index}/{epoch}/{pos}")
        info = self.spec.datasets[si]
        try:
            return self.builder.build(record, rng, info.data_dir)
        except SkipSample as e:
            e.detail = f"{e.detail} ({source.where(unit, row)})" if e.detail else source.where(unit, row)
            raise


# ---------------------------------------------------------------------------------------------- one shard
class ShardPacker:
    """Packs of one shard (one rank's one worker), with a savable position."""

    def __init__(
        self, groups: list[GroupReader], config: DataConfig, model_config: Any, *, seed: int, shard: int
    ):
        self.groups = groups
        self.config = config
        self.model_config = model_config
        self.cursors = [[0, g.lo] for g in groups]  # per group: epoch, next position (in [lo, hi))
        self.good = [0] * len(groups)  # samples used from each group in its current epoch
        self.rng = random.Random(f"{seed}/packer/{shard}")
        self.buffer: list[RawSample] = []
        self.pending: list[RawSample] = []
        self.skipped: Counter[str] = Counter()
        self.logged: set[str] = set()  # each skip reason is logged once per shard (worker)
        self.packs = 0
        weights = [g.spec.weight for g in groups]
        total = sum(weights)
        self.cumprobs = [sum(weights[: i + 1]) / total for i in range(len(weights))]
        self.mandatory = [i for i, g in enumerate(groups) if g.spec.is_mandatory]

    # --- samples
    def _skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if reason not in self.logged:
            self.logged.add(reason)
            what = "truncated a sample" if reason == "truncated" else "skipped a sample"
            logger.warning(
                "bagel.data: %s: %s (%s); further ones are counted (loader.skip_counts()), not logged",
                what,
                reason,
                detail,
            )

    def _finish(self, gid: tuple[int, int, int], segs: list[Segment]) -> RawSample | None:
        """Count tokens; drop or truncate a sample over ``max_num_tokens_per_sample``."""
        cap = self.config.max_num_tokens_per_sample
        n = sample_num_tokens(segs, self.model_config)
        if n > cap:
            last = segs[-1]
            keep = len(last.ids) - (n - cap) if isinstance(last, Text) else 0
            if self.config.long_samples == "truncate" and keep >= 1:
                segs = segs[:-1] + [Text(list(last.ids)[:keep], loss=last.loss)]
                n = cap
                self._skip("truncated", f"{n} tokens kept of a longer sample")
            else:
                self._skip("too_many_tokens", f"{n} > max_num_tokens_per_sample={cap}")
                return None
        return RawSample(gid, segs, n)

    def reread(self, gid: tuple[int, int, int]) -> RawSample:
        """The sample ``gid`` again (for restored buffers): same records, same randomness."""
        g, epoch, pos = gid
        try:
            segs = self.groups[g].read(epoch, pos)
        except SkipSample as e:  # a SkipSample escaping load_state_dict would look like a data bug
            raise ValueError(
                f"sample {gid} was usable when the state was saved but is not now ({e}): the data changed"
            ) from None
        s = self._finish(gid, segs)
        if s is None:
            raise ValueError(f"sample {gid} was packable when saved but is not now: the data changed")
        return s

    def draw(self, g: int) -> RawSample:
        """The next usable sample of group ``g`` in this shard (skipping and counting bad ones)."""
        reader = self.groups[g]
        cur = self.cursors[g]
        while True:
            if cur[1] >= reader.hi:
                if self.good[g] == 0:
                    raise ValueError(
                        f"group {reader.spec.name!r} yielded no usable sample in a whole epoch of this shard "
                        f"({len(reader)} records; skips so far: {dict(self.skipped)}). Files: {reader.describe()}"
                    )
                cur[0] += 1
                cur[1] = reader.lo
                self.good[g] = 0
            gid = (g, cur[0], cur[1])
            cur[1] += 1
            try:
                segs = reader.read(gid[1], gid[2])
            except SkipSample as e:
                self._skip(e.reason, e.detail)
                continue
            sample = self._finish(gid, segs)
            if sample is not None:
                self.good[g] += 1
                return sample

    def _choose(self) -> int:
        x = self.rng.random()
        for i, c in enumerate(self.cumprobs):
            if x < c:
                return i
        return len(self.cumprobs) - 1

    # --- packs
    def next_pack(self) -> list[RawSample]:
        cfg = self.config
        limit = cfg.max_num_tokens
        samples: list[RawSample] = []
        curr = 0
        while self.pending and curr + self.pending[0].num_tokens <= limit:
            s = self.pending.pop(0)
            samples.append(s)
            curr += s.num_tokens
        # one sample of every mandatory group, unless one is already in the pack or waiting for the next
        # (so the carry-over stays bounded when mandatory samples are too large to share a pack)
        present = {s.id[0] for s in samples} | {s.id[0] for s in self.pending}
        for g in self.mandatory:
            if g in present:
                continue
            s = self.draw(g)
            if curr + s.num_tokens <= limit:
                samples.append(s)
                curr += s.num_tokens
            else:
                self.pending.append(s)
        # samples still waiting did not fit: this pack is as full as it gets without passing them over
        # (drawing more here would only add to the waiting list, which then grows without bound)
        while curr < cfg.expected_num_tokens and not self.pending:
            from_buffer = curr < cfg.prefer_buffer_before and bool(self.buffer)
            s = self.buffer.pop(0) if from_buffer else self.draw(self._choose())
            if curr + s.num_tokens > limit:
                if not from_buffer and len(self.buffer) < cfg.max_buffer_size:
                    self.buffer.append(s)
                    continue
                self.pending.append(s)  # closes this pack and opens the next
                break
            samples.append(s)
            curr += s.num_tokens
        self.packs += 1
        return samples

    # --- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "cursors": [list(c) for c in self.cursors],
            "good": list(self.good),
            "rng": self.rng.getstate(),
            "buffer": [s.id for s in self.buffer],
            "pending": [s.id for s in self.pending],
            "skipped": dict(self.skipped),
            "packs": self.packs,
        }

    def _check_state(self, state: Any) -> None:
        """Refuse a worker state that this shard could not have saved (ValueError naming the field): a
        corrupted or hand-edited state would otherwise read other shards' records or crash later."""
        where = "the saved data-loader state"
        if not isinstance(state, dict):
            raise ValueError(f"{where}: a worker's state must be a dict, got {type(state).__name__}")
        missing = [
            k for k in ("cursors", "good", "rng", "buffer", "pending", "skipped", "packs") if k not in state
        ]
        if missing:
            raise ValueError(f"{where} lacks {missing}")
        n = len(self.groups)

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        cursors, good = state["cursors"], state["good"]
        if not isinstance(cursors, (list, tuple)) or len(cursors) != n:
            raise ValueError(f"{where} has cursors for {_count(cursors)} groups, the dataset config {n}")
        for g, (c, r) in enumerate(zip(cursors, self.groups, strict=True)):
            if (
                not isinstance(c, (list, tuple))
                or len(c) != 2
                or not all(is_int(v) for v in c)
                or c[0] < 0
                or not r.lo <= c[1] <= r.hi
            ):
                raise ValueError(
                    f"{where}: cursors[{g}] must be [epoch >= 0, position in [{r.lo}, {r.hi}]] for this "
                    f"shard, got {c!r}"
                )
        if (
            not isinstance(good, (list, tuple))
            or len(good) != n
            or not all(is_int(v) and v >= 0 for v in good)
        ):
            raise ValueError(f"{where}: good must be {n} ints >= 0, got {good!r:.80}")
        # pending holds at most one sample per group (see next_pack); +1 for slack. A huge list would
        # make the restore re-read that many samples
        for key, cap in (("buffer", self.config.max_buffer_size), ("pending", n + 1)):
            ids = state[key]
            if not isinstance(ids, (list, tuple)) or (cap is not None and len(ids) > cap):
                limit = "" if cap is None else f" of at most {cap}"
                raise ValueError(f"{where}: {key} must be a list{limit} of sample ids, got {ids!r:.80}")
            for i in ids:
                ok = isinstance(i, (list, tuple)) and len(i) == 3 and all(is_int(v) for v in i)
                if (
                    not ok
                    or not 0 <= i[0] < n
                    or i[1] < 0
                    or not self.groups[i[0]].lo <= i[2] < self.groups[i[0]].hi
                ):
                    raise ValueError(
                        f"{where}: {key} holds {i!r}, not a sample id (group, epoch, position) of this shard"
                    )
        skipped = state["skipped"]
        if not isinstance(skipped, dict) or not all(
            k in SKIP_REASONS and is_int(v) and v >= 0 for k, v in skipped.items()
        ):
            raise ValueError(f"{where}: skipped must map skip reasons to counts >= 0, got {skipped!r:.80}")
        if not is_int(state["packs"]) or state["packs"] < 0:
            raise ValueError(f"{where}: packs must be an int >= 0, got {state['packs']!r}")
        try:
            random.Random().setstate(_as_rng_state(state["rng"]))
        except (TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{where}: rng is not a random.Random state ({e})") from None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        self.cursors = [list(c) for c in state["cursors"]]
        self.good = list(state["good"])
        self.rng.setstate(_as_rng_state(state["rng"]))
        self.skipped = Counter(state["skipped"])
        self.packs = int(state["packs"])
        # a group with resume_data_status: false (upstream's option) starts over, its waiting samples dropped
        fresh = {g for g, r in enumerate(self.groups) if not r.spec.resume_data_status}
        for g in fresh:
            self.cursors[g] = [0, self.groups[g].lo]
            self.good[g] = 0
        self.buffer = [self.reread(tuple(i)) for i in state["buffer"] if i[0] not in fresh]
        self.pending = [self.reread(tuple(i)) for i in state["pending"] if i[0] not in fresh]


def _count(x: Any) -> Any:
    return len(x) if isinstance(x, (list, tuple)) else repr(x)[:40]


def _as_rng_state(s: Any) -> tuple:
    """``random.Random.getstate()`` after a round trip through lists (JSON, some checkpoint formats)."""
    return (s[0], tuple(s[1]), s[2])


# ---------------------------------------------------------------------------------------------- the dataset
class PackStream(torch.utils.data.IterableDataset):
    """An endless stream of :class:`RawPack` for one rank; each DataLoader worker builds its own shard."""

    def __init__(
        self,
        specs: list[GroupSpec],
        sources: list[list[Any]],
        builders: list[SampleBuilder],
        config: DataConfig,
        model_config: Any,
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        resume: dict[int, dict[str, Any]] | None = None,
    ):
        super().__init__()
        self.specs = specs
        self.sources = sources
        self.builders = builders
        self.config = config
        self.model_config = model_config
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.seed = seed
        self.resume = resume or {}
        self.packer(0)  # fail early, in the main process (e.g. fewer samples than shards)

    @property
    def num_shards(self) -> int:
        return self.world_size * max(1, self.num_workers)

    def packer(self, worker: int) -> ShardPacker:
        shard = self.rank * max(1, self.num_workers) + worker
        groups = [
            GroupReader(
                g,
                spec,
                self.sources[g],
                self.builders[g],
                seed=self.seed,
                shard=shard,
                num_shards=self.num_shards,
            )
            for g, spec in enumerate(self.specs)
        ]
        return ShardPacker(groups, self.config, self.model_config, seed=self.seed, shard=shard)

    def __iter__(self) -> Iterator[RawPack]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        packer = self.packer(worker)
        if worker in self.resume:
            packer.load_state_dict(self.resume[worker])
        while True:
            samples = packer.next_pack()
            yield RawPack(
                samples=[s.segments for s in samples],
                sample_ids=[s.id for s in samples],
                num_tokens=sum(s.num_tokens for s in samples),
                worker_id=worker,
                state=packer.state_dict(),
                skipped=dict(packer.skipped),
            )


def _no_collate(x: Any) -> Any:
    return x


class PackLoader:
    """Iterates :class:`RawPack` for one rank (endless; ``for raw in loader`` continues from the current
    position each time it is started). ``state_dict`` / ``load_state_dict``: this rank's position, a
    plain picklable dict. ``skip_counts()``: samples skipped so far, per reason, over this rank's workers.
    ``special_tokens``: the ids :func:`bagel.data.packing.pack_samples` needs."""

    def __init__(self, stream: PackStream, special_tokens: SpecialTokens):
        self.stream = stream
        self.special_tokens = special_tokens
        self.config = stream.config
        self._workers = max(1, stream.num_workers)
        self._states: dict[int, dict[str, Any]] = {}
        self._skipped: dict[int, dict[str, int]] = {}
        self._next_worker = 0

    def __iter__(self) -> Iterator[RawPack]:
        stream = self.stream
        stream.resume = dict(self._states)
        if stream.num_workers == 0:
            source: Any = iter(stream)
        else:
            source = iter(
                torch.utils.data.DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=stream.num_workers,
                    prefetch_factor=self.config.prefetch_factor,
                    collate_fn=_no_collate,
                )
            )
        # the DataLoader starts at worker 0; after a restore the next pack belongs to _next_worker, so
        # packs of the workers before it wait (at most num_workers - 1 of them, in the first round)
        held: dict[int, deque[RawPack]] = {w: deque() for w in range(self._workers)}
        for pack in source:
            held[pack.worker_id].append(pack)
            while held[self._next_worker]:
                p = held[self._next_worker].popleft()
                self._states[p.worker_id] = p.state
                self._skipped[p.worker_id] = p.skipped
                self._next_worker = (self._next_worker + 1) % self._workers
                yield p

    def skip_counts(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for c in self._skipped.values():
            total.update(c)
        return {r: total[r] for r in SKIP_REASONS if total[r]}

    def state_dict(self) -> dict[str, Any]:
        s = self.stream
        return {
            "format": STATE_FORMAT,
            "rank": s.rank,
            "world_size": s.world_size,
            "num_workers": s.num_workers,
            "seed": s.seed,
            "groups": [g.name for g in s.specs],
            "group_records": self._group_records(),
            "next_worker": self._next_worker,
            "workers": {int(w): st for w, st in self._states.items()},
        }

    def _group_records(self) -> list[int]:
        """Records per group per epoch (all shards): a changed dataset changes them."""
        return [int(sum(int(x.unit_sizes.sum()) for x in sources)) for sources in self.stream.sources]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.stream
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a data-loader state of format {STATE_FORMAT}: {str(state)[:80]}")
        mine = {
            "rank": s.rank,
            "world_size": s.world_size,
            "num_workers": s.num_workers,
            "seed": s.seed,
            "groups": [g.name for g in s.specs],
        }
        if "group_records" in state:  # states saved before it was recorded are taken on trust
            # rows added to or removed from a dataset reshuffle every shard: the saved positions would
            # silently point at other records
            mine["group_records"] = self._group_records()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError(
                "the saved data-loader state does not match this loader (saved, now): "
                + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
                + "; an exact resume needs the same rank, world size, workers, seed, groups and data"
            )
        workers, next_worker = state.get("workers"), state.get("next_worker")
        if not isinstance(workers, dict):
            raise ValueError(f"the saved data-loader state: workers must be a dict, got {workers!r:.80}")
        # JSON turns the int keys into strings; accept those, nothing else
        if not all(
            (isinstance(w, int) and not isinstance(w, bool)) or (isinstance(w, str) and w.isdigit())
            for w in workers
        ):
            raise ValueError(
                f"the saved data-loader state: worker ids must be ints, got {sorted(map(repr, workers))}"
            )
        if (
            isinstance(next_worker, bool)
            or not isinstance(next_worker, int)
            or not 0 <= next_worker < self._workers
        ):
            raise ValueError(
                f"the saved data-loader state: next_worker must be an int in [0, {self._workers}), got {next_worker!r}"
            )
        states = {int(w): st for w, st in workers.items()}
        for w, st in states.items():  # re-read buffered samples now: a changed dataset fails here
            if not 0 <= w < self._workers:
                raise ValueError(f"the saved state has worker {w}; this loader has {self._workers}")
            s.packer(w).load_state_dict(st)
        self._states = states
        self._skipped = {w: dict(st["skipped"]) for w, st in states.items()}
        self._next_worker = next_worker


# ---------------------------------------------------------------------------------------------- building
def _special_tokens(tokenizer: Any, model_config: Any) -> SpecialTokens:
    vocab = tokenizer.get_vocab()
    missing = [t for _, t in BAGEL_SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(
            f"the tokenizer lacks {missing}: load it with bagel.data.load_tokenizer (or call "
            "bagel.data.add_special_tokens) and size the model's vocabulary to len(tokenizer)"
        )
    tok = SpecialTokens(**{name: vocab[t] for name, t in BAGEL_SPECIAL_TOKENS})
    model_vocab = int(model_config.text_config.vocab_size)
    if (
        max(tok.bos, tok.eos, tok.start_of_image, tok.end_of_image) >= model_vocab
        or len(tokenizer) > model_vocab
    ):
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens (special ids {tok}) but the model's vocab_size is "
            f"{model_vocab}: resize the model's embeddings to len(tokenizer)"
        )
    return tok


def build_loader(
    data_config: DataConfig,
    model_config: Any,
    tokenizer: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> PackLoader:
    """A :class:`PackLoader` over ``data_config.dataset_config_file`` for ``rank`` of ``world_size``.

    ``model_config`` (a ``bagel.BagelConfig``) gives the ViT patch size and grid, the latent stride
    (``latent_downsample``) and grid, and the vocabulary; ``tokenizer`` must hold BAGEL's special tokens
    (:func:`bagel.data.load_tokenizer` / :func:`bagel.data.tiny_tokenizer`). Everything that can be
    checked before training is: files, columns, strides against the model, enough samples per shard."""
    if not isinstance(data_config, DataConfig):
        raise TypeError(f"data_config must be a DataConfig, got {type(data_config).__name__}")
    data_config.validate()
    for name, v, lo in (("rank", rank, 0), ("world_size", world_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if rank >= world_size:
        raise ValueError(f"rank {rank} is not below world_size {world_size}")
    if not callable(getattr(tokenizer, "get_vocab", None)) or not callable(
        getattr(tokenizer, "encode", None)
    ):
        raise TypeError(
            f"tokenizer must be a transformers tokenizer (bagel.data.load_tokenizer / tiny_tokenizer), got "
            f"{type(tokenizer).__name__}"
        )
    if not hasattr(model_config, "text_config") or not hasattr(model_config, "visual_gen"):
        raise TypeError(f"model_config must be a bagel.BagelConfig, got {type(model_config).__name__}")
    special = _special_tokens(tokenizer, model_config)
    specs = load_groups(data_config)
    sources, builders = [], []
    mc = model_config
    for spec in specs:
        where = f"{data_config.dataset_config_file}: group {spec.name!r}"
        vae_tr = vit_tr = None
        if spec.name in ("t2i_pretrain", "unified_edit"):
            if not mc.visual_gen:
                raise ValueError(f"{where} generates images but the model has visual_gen=False (stage 1)")
            stride = int(mc.latent_downsample)
            args = spec.image_transform_args
            if args.image_stride != stride:
                raise ValueError(
                    f"{where}: image_transform_args.image_stride={args.image_stride} but the model's latent "
                    f"stride is {stride} (VAE downsample {mc.vae_config['downsample']} x latent_patch_size "
                    f"{mc.latent_patch_size})"
                )
            vae_tr = ImageTransform(
                args, max_side=None if mc.interpolate_pos else mc.max_latent_size * stride
            )
        vit_args = spec.vit_image_transform_args if spec.name == "unified_edit" else spec.image_transform_args
        if spec.name in ("unified_edit", "vlm_sft"):
            if not mc.visual_und:
                raise ValueError(f"{where} has ViT images but the model has visual_und=False")
            p = int(mc.vision_config.patch_size)
            key = "vit_image_transform_args" if spec.name == "unified_edit" else "image_transform_args"
            if vit_args.image_stride != p:
                raise ValueError(
                    f"{where}: {key}.image_stride={vit_args.image_stride} but the ViT patch size is {p}"
                )
            vit_tr = ImageTransform(
                vit_args, max_side=None if mc.interpolate_pos else mc.vit_max_num_patch_per_side * p
            )
        sources.append(build_sources(spec))
        builders.append(SampleBuilder(spec, data_config, tokenizer, vae_tr, vit_tr))
    stream = PackStream(
        specs,
        sources,
        builders,
        data_config,
        model_config,
        rank=rank,
        world_size=world_size,
        num_workers=data_config.num_workers,
        seed=data_config.seed,
    )
    return PackLoader(stream, special)


# ---------------------------------------------------------------------------------------------- VAE
def encode_vae_images(
    samples: Sequence[Sequence[Segment]],
    vae: Any,
    *,
    micro_batch_size: int | None = None,
    generator: torch.Generator | None = None,
    sample: bool = True,
    dtype: torch.dtype | None = None,
) -> list[list[Segment]]:
    """Encode every VAE image given as pixels in ``samples`` with ``vae`` (a ``bagel.vae.FluxVAE``; all
    images of the pack in one call, same-size images batched, ``micro_batch_size`` at a time) and
    return new samples whose :class:`VaeImage` carry the latent (``[16, H/8, W/8]`` on the VAE's
    device, in ``dtype`` or the VAE's dtype) instead of the pixels. Other segments are passed through."""
    if not callable(getattr(vae, "encode_images", None)):
        raise TypeError(f"vae must be a bagel.vae.FluxVAE, got {type(vae).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        # dtype=torch.int64 truncated every latent; "float16" said "Invalid device string"
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
        raise TypeError(
            f"samples must be a list of samples (lists of segments), got {type(samples).__name__}"
        )
    for si, segs in enumerate(samples):
        if isinstance(segs, (str, bytes)) or not isinstance(segs, Sequence):
            raise TypeError(f"samples[{si}] must be a list of segments, got {type(segs).__name__}")
    todo = []
    for si, segs in enumerate(samples):
        for j, seg in enumerate(segs):
            if isinstance(seg, VaeImage) and seg.latent is None:
                if seg.pixels is None:
                    raise ValueError(f"samples[{si}][{j}] is a VaeImage with neither latent nor pixels")
                todo.append((si, j))
    out = [list(segs) for segs in samples]
    if not todo:
        return out
    latents = vae.encode_images(
        [samples[si][j].pixels for si, j in todo],
        sample=sample,
        generator=generator,
        micro_batch_size=micro_batch_size,
    )
    for (si, j), lat in zip(todo, latents, strict=True):
        seg = samples[si][j]
        out[si][j] = VaeImage(
            latent=lat if dtype is None else lat.to(dtype), noised=seg.noised, timestep=seg.timestep
        )
    return out

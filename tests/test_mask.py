"""PackedMask: the interval form against an independent dense construction of DESIGN.md section 3."""

import random

import pytest
import torch

from bagel_kernels import PackedMask
from bagel_kernels.mask import TILE_EMPTY, TILE_FULL, TILE_PARTIAL
from bagel_kernels.reference import dense_mask_from_rule
from bagel_kernels.testing import SAMPLE_KINDS, random_pack


def _random_layouts(n, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        pad = rng.choice([None, 0, rng.randint(1, 9)])
        kinds = rng.choice([SAMPLE_KINDS, ("und",), ("t2i",), ("edit",), ("interleaved",)])
        yield random_pack(rng, rng.randint(1, 5), kinds=kinds, text=(1, 9), image=(1, 14), pad=pad)


def test_intervals_match_rule_on_random_packs():
    for layout in _random_layouts(300):
        mask = PackedMask.from_splits(*layout.as_tuple())
        expected = dense_mask_from_rule(*layout.as_tuple())
        assert mask.total_len == layout.total_len
        assert mask.sample_lens == tuple(layout.sample_lens)
        assert torch.equal(mask.to_dense(), expected), layout


def test_interval_table_rows():
    # causal [0,3) | full [3,6) | noise [6,8) in one sample, then a causal sample of 2
    mask = PackedMask.from_splits([8, 2], [3, 3, 2, 2], ["causal", "full", "noise", "causal"])
    assert mask.kv_lo.tolist() == [0, 1, 2, 3, 3, 3, 6, 6, 8, 9]
    assert mask.kv_hi.tolist() == [8, 8, 8, 8, 8, 8, 8, 8, 10, 10]
    assert mask.kv_lo.dtype == torch.int32 and mask.kv_hi.dtype == torch.int32


def test_noise_split_hidden_from_later_tokens():
    mask = PackedMask.from_splits([6], [2, 2, 2], ["causal", "noise", "causal"])
    dense = mask.to_dense()
    assert not dense[4:, 2:4].any()  # later text does not see the noised image
    assert dense[2:4, 2:4].all()  # the noised image sees itself
    assert dense[2:4, 0:2].all()  # and the preceding text


def test_from_dense_matches_from_splits():
    for layout in _random_layouts(60, seed=1):
        mask = PackedMask.from_splits(*layout.as_tuple())
        full = dense_mask_from_rule(*layout.as_tuple())
        nested_float, nested_bool = [], []
        for s, e in mask.sample_bounds():
            block = full[s:e, s:e]
            nested_bool.append(block)
            nested_float.append(torch.zeros(e - s, e - s).masked_fill(~block, float("-inf")))
        for nested in (nested_float, nested_bool):
            other = PackedMask.from_dense(nested)
            assert torch.equal(other.to_dense(), full)
            assert other.sample_lens == mask.sample_lens


def test_from_dense_rejects_non_interval_and_bad_values():
    m = torch.zeros(3, 3, dtype=torch.bool)
    m[0, 0] = m[2, 0] = True  # key 0 seen by rows 0 and 2 but not 1
    with pytest.raises(ValueError, match="contiguous"):
        PackedMask.from_dense([m])
    with pytest.raises(ValueError, match="other than 0 and -inf"):
        PackedMask.from_dense([torch.full((2, 2), 0.5)])
    with pytest.raises(ValueError, match="square"):
        PackedMask.from_dense([torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="dtype"):
        PackedMask.from_dense([torch.zeros(2, 2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="empty"):
        PackedMask.from_dense([])


def test_from_dense_row_that_sees_nothing():
    m = torch.zeros(3, 3, dtype=torch.bool)
    m[1, 0] = m[2, 0] = m[2, 2] = True  # row 0 sees nothing, key 1 is seen by nobody
    mask = PackedMask.from_dense([m])
    assert torch.equal(mask.to_dense(), m)


@pytest.mark.parametrize(
    "args, field",
    [
        (([4], [4], ["diagonal"]), "attn_modes"),
        (([4], [3], ["causal"]), "split_lens sum"),
        (([3, 3], [2, 4], ["causal", "full"]), "cross a sample"),
        (([4, -1], [4, -1], ["causal", "causal"]), "sample_lens has a negative"),
        (([4], [5, -1], ["causal", "full"]), "split_lens has a negative"),
        (([4], [2, 2], ["causal"]), "attn_modes has 1 entries"),
        (([], [], []), "sample_lens is empty"),
        (([4], [4], "causal"), "attn_modes must be a sequence"),
        (([4.5], [4], ["causal"]), "sample_lens"),
    ],
)
def test_from_splits_validation(args, field):
    with pytest.raises(ValueError, match=field):
        PackedMask.from_splits(*args)


def test_zero_length_pad_sample_is_valid():
    mask = PackedMask.from_splits([3, 0], [3, 0], ["causal", "causal"])
    assert mask.total_len == 3 and mask.sample_lens == (3, 0)


def test_truncated_drops_pad_rows_and_refuses_cuts():
    mask = PackedMask.from_splits([5, 4], [2, 3, 4], ["causal", "full", "causal"])
    t = mask.truncated(5)
    assert t.total_len == 5 and t.sample_lens == (5, 0)
    assert torch.equal(t.to_dense(), mask.to_dense()[:5, :5])
    with pytest.raises(ValueError, match="cuts the pack"):
        mask.truncated(3)  # inside the full split
    with pytest.raises(ValueError, match="outside"):
        mask.truncated(10)
    # cutting the causal pad sample anywhere is fine
    assert torch.equal(mask.truncated(7).to_dense(), mask.to_dense()[:7, :7])


def test_row_index_validation():
    mask = PackedMask.from_splits([4], [4], ["causal"])
    good = mask.with_row_index(torch.tensor([2, 0, 3, 1]))
    assert good.row_index.dtype == torch.int32 and good.kv_lo is mask.kv_lo
    with pytest.raises(ValueError, match="permutation"):
        mask.with_row_index(torch.tensor([0, 0, 1, 2]))
    with pytest.raises(ValueError, match="permutation"):
        mask.with_row_index(torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="entries"):
        mask.with_row_index(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integers"):
        mask.with_row_index(torch.zeros(4))


def _tile_kinds_dense(dense, bm, bn):
    N = dense.shape[0]
    nm, nn = -(-N // bm), -(-N // bn)
    kinds = torch.zeros(nm, nn, dtype=torch.int8)
    for m in range(nm):
        for n in range(nn):
            tile = dense[m * bm : (m + 1) * bm, n * bn : (n + 1) * bn]
            full_cols = (n + 1) * bn <= N
            if not tile.any():
                kinds[m, n] = TILE_EMPTY
            elif tile.all() and full_cols:
                kinds[m, n] = TILE_FULL
            else:
                kinds[m, n] = TILE_PARTIAL
    return kinds


@pytest.mark.parametrize("bm,bn", [(4, 4), (8, 4), (4, 16), (16, 16)])
def test_block_tables_match_dense_tiles(bm, bn):
    for layout in _random_layouts(40, seed=bm * 100 + bn):
        mask = PackedMask.from_splits(*layout.as_tuple())
        if mask.total_len == 0:
            continue
        bt = mask.block_tables(bm, bn)
        dense = mask.to_dense()
        expected = _tile_kinds_dense(dense, bm, bn)
        assert torch.equal(bt.tile_kinds(), expected), layout
        # per key block: the query-block range is exactly the non-empty tiles of that column
        for n in range(bt.num_n):
            rows = torch.nonzero(expected[:, n] != TILE_EMPTY).flatten()
            if rows.numel():
                assert (int(bt.kv_q_start[n]), int(bt.kv_q_end[n])) == (int(rows[0]), int(rows[-1]) + 1)
                assert rows.numel() == int(rows[-1]) - int(rows[0]) + 1  # contiguous, as DESIGN.md promises
            else:
                assert int(bt.kv_q_end[n]) <= int(bt.kv_q_start[n])
        # CSR lists are ascending and the span matches
        for m in range(bt.num_m):
            ids = bt.q_kv_idx[bt.q_kv_ptr[m] : bt.q_kv_ptr[m + 1]]
            assert torch.all(ids[1:] > ids[:-1])
            if ids.numel():
                assert (int(bt.q_kv_start[m]), int(bt.q_kv_end[m])) == (int(ids[0]), int(ids[-1]) + 1)


def test_block_tables_memory_is_linear_in_tiles():
    # a 64k-token pack of small causal samples: only the near-diagonal tiles are stored
    n = 65536
    mask = PackedMask.from_splits([1024] * (n // 1024), [1024] * (n // 1024), ["causal"] * (n // 1024))
    bt = mask.block_tables(128, 128)
    assert bt.num_tiles == (n // 1024) * (8 * 9 // 2)
    assert bt.q_kv_idx.numel() < 0.01 * bt.num_m * bt.num_n
    assert mask.block_tables(128, 128) is bt  # cached


def test_num_visible_pairs():
    layout = next(_random_layouts(1, seed=5))
    mask = PackedMask.from_splits(*layout.as_tuple())
    assert mask.num_visible_pairs() == int(mask.to_dense().sum())

"""fastlmdb.order: the epoch order and its split across ranks and workers (pure numpy)."""

import collections
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlmdb.loading import order
from fastlmdb.loading.order import BLOCK, WINDOW_BLOCKS

WINDOW = BLOCK * WINDOW_BLOCKS

counts = st.integers(0, 3 * WINDOW + 77)
seeds = st.integers(0, 2**32 - 1)
epochs = st.integers(0, 10_000)


@settings(max_examples=60, deadline=None, database=None)
@given(count=counts, shuffle=st.booleans(), seed=seeds, epoch=epochs)
def test_epoch_order_is_a_permutation(count, shuffle, seed, epoch):
    result = order.epoch_order(count, shuffle=shuffle, seed=seed, epoch=epoch)
    assert result.dtype == np.int64
    assert len(result) == count
    np.testing.assert_array_equal(np.sort(result), np.arange(count))


@settings(max_examples=40, deadline=None, database=None)
@given(count=counts, seed=seeds, epoch=epochs)
def test_epoch_order_is_deterministic(count, seed, epoch):
    first = order.epoch_order(count, shuffle=True, seed=seed, epoch=epoch)
    again = order.epoch_order(count, shuffle=True, seed=seed, epoch=epoch)
    np.testing.assert_array_equal(first, again)


@settings(max_examples=30, deadline=None, database=None)
@given(count=counts, seed=seeds, epoch=epochs)
def test_unshuffled_is_identity(count, seed, epoch):
    np.testing.assert_array_equal(
        order.epoch_order(count, shuffle=False, seed=seed, epoch=epoch), np.arange(count))


@pytest.mark.parametrize("count", [20, 64, 65, 1000, 5000])
def test_shuffled_differs_between_epochs_and_seeds(count):
    base = order.epoch_order(count, shuffle=True, seed=7, epoch=0)
    assert not np.array_equal(base, np.arange(count))
    for other in (order.epoch_order(count, shuffle=True, seed=7, epoch=1),
                  order.epoch_order(count, shuffle=True, seed=7, epoch=2),
                  order.epoch_order(count, shuffle=True, seed=8, epoch=0)):
        assert not np.array_equal(base, other)


def test_shuffle_moves_blocks_not_only_records():
    """With several windows the blocks themselves are reordered, not just records in place."""
    count = 4 * WINDOW
    result = order.epoch_order(count, shuffle=True, seed=0, epoch=0)
    first_window_blocks = set((result[:WINDOW] // BLOCK).tolist())
    assert first_window_blocks != set(range(WINDOW_BLOCKS))


def _shares(epoch_order, world_size, num_workers, drop_last):
    """{(rank, worker): indices} as LMDBIterDataset computes them (num_workers=0: one)."""
    out = {}
    for rank in range(world_size):
        share = order.rank_share(epoch_order, rank, world_size, drop_last)
        assert len(share) == order.per_rank(len(epoch_order), world_size, drop_last)
        if num_workers == 0:
            out[rank, None] = share
        else:
            for worker in range(num_workers):
                out[rank, worker] = order.worker_share(share, worker, num_workers)
    return out


def _sampler_indices(count, world_size, drop_last):
    from torch.utils.data.distributed import DistributedSampler

    samplers = [DistributedSampler(range(count), num_replicas=world_size, rank=r,
                                   shuffle=False, drop_last=drop_last)
                for r in range(world_size)]
    return [len(s) for s in samplers], [list(s) for s in samplers]


COMBOS = list(itertools.product(
    [0, 1, 2, 5, 11, 63, 64, 65, 129, 1000, 1027],  # count
    [1, 2, 3, 4, 7, 8],  # world_size
    [0, 1, 2, 3, 5],  # num_workers
    [False, True],  # drop_last
))


@pytest.mark.parametrize("shuffle", [False, True])
def test_shares_cover_every_index_exactly_once(shuffle):
    for count, world_size, num_workers, drop_last in COMBOS:
        where = (count, world_size, num_workers, drop_last, shuffle)
        epoch_order = order.epoch_order(count, shuffle=shuffle, seed=3, epoch=1)
        shares = _shares(epoch_order, world_size, num_workers, drop_last)
        union = np.concatenate(list(shares.values()))
        seen = collections.Counter(union.tolist())
        per_rank = order.per_rank(count, world_size, drop_last)
        assert len(union) == per_rank * world_size, where

        # Equal lengths per rank; workers of a rank differ by at most one.
        for rank in range(world_size):
            lengths = [len(v) for (r, _), v in shares.items() if r == rank]
            assert sum(lengths) == per_rank, where
            assert max(lengths) - min(lengths) <= 1, where

        if count % world_size == 0:
            assert sorted(seen) == list(range(count)) and set(seen.values()) <= {1}, where
        elif drop_last:
            dropped = count - per_rank * world_size
            assert 0 < dropped < world_size, where
            assert set(seen.values()) <= {1}, where
            # The last samples of the epoch order are the dropped ones.
            assert set(seen) == set(epoch_order[:count - dropped].tolist()), where
        else:
            padding = per_rank * world_size - count
            assert 0 < padding < world_size, where
            assert set(seen) == set(range(count)), where
            extra = collections.Counter({k: v - 1 for k, v in seen.items() if v > 1})
            # Padding repeats the first samples of the epoch order (wrapping around when
            # there are fewer samples than ranks), as DistributedSampler does.
            expected = np.resize(epoch_order, padding)
            if padding <= count:
                np.testing.assert_array_equal(expected, epoch_order[:padding])
            assert extra == collections.Counter(expected.tolist()), where


def test_counts_match_distributed_sampler():
    for count, world_size, _, drop_last in COMBOS:
        where = (count, world_size, drop_last)
        lengths, sampled = _sampler_indices(count, world_size, drop_last)
        per_rank = order.per_rank(count, world_size, drop_last)
        assert lengths == [per_rank] * world_size, where
        ours = [order.rank_share(np.arange(count), r, world_size, drop_last)
                for r in range(world_size)]
        assert [len(s) for s in ours] == lengths, where
        # Unshuffled, the same multiset of indices overall (padding and dropping agree).
        assert (collections.Counter(itertools.chain.from_iterable(sampled))
                == collections.Counter(np.concatenate(ours).tolist())), where


def test_padding_wraps_around_when_count_is_smaller_than_world_size():
    shares = [order.rank_share(np.array([5, 9]), r, 5) for r in range(5)]
    assert [s.tolist() for s in shares] == [[5], [9], [5], [9], [5]]
    assert [order.rank_share(np.array([5, 9]), r, 5, drop_last=True).tolist()
            for r in range(5)] == [[]] * 5


@pytest.mark.parametrize("rank, world_size", [(-1, 2), (2, 2), (0, 0)])
def test_bad_rank_refused(rank, world_size):
    with pytest.raises((ValueError, ZeroDivisionError)):
        order.rank_share(np.arange(10), rank, world_size)


def test_rank_share_bad_rank_message():
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        order.rank_share(np.arange(10), 2, 2)


def test_windows_are_consecutive_pieces():
    indices = np.arange(1000) * 3
    pieces = list(order.windows(indices, 300))
    assert [len(p) for p in pieces] == [300, 300, 300, 100]
    np.testing.assert_array_equal(np.concatenate(pieces), indices)
    assert list(order.windows(np.empty(0, np.int64), 300)) == []


@pytest.mark.parametrize("count", [WINDOW, 3 * WINDOW, 5 * WINDOW + 2 * BLOCK])
@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_full_blocks_windows_hold_whole_blocks(count, epoch):
    """count a multiple of BLOCK: each window is exactly WINDOW_BLOCKS (or fewer, last) whole
    blocks, so a reader fetches a window as a few sequential runs."""
    result = order.epoch_order(count, shuffle=True, seed=1, epoch=epoch)
    for piece in order.windows(result, WINDOW):
        blocks = np.unique(piece // BLOCK)
        assert len(blocks) <= WINDOW_BLOCKS
        assert len(piece) == len(blocks) * BLOCK  # whole blocks only
        np.testing.assert_array_equal(np.sort(piece),
                                      (blocks[:, None] * BLOCK + np.arange(BLOCK)).ravel())


@settings(max_examples=40, deadline=None, database=None)
@given(count=st.integers(1, 6 * WINDOW), seed=seeds, epoch=epochs,
       world_size=st.integers(1, 4), num_workers=st.integers(1, 3))
def test_reader_pieces_stay_mostly_sequential(count, seed, epoch, world_size, num_workers):
    """What a worker reads at once (a WINDOW of its share) touches few blocks: at most two
    windows' worth (a share need not start on a window boundary), plus the blocks of the
    padding (fewer than world_size samples from the start of the order) in the last rank's."""
    result = order.epoch_order(count, shuffle=True, seed=seed, epoch=epoch)
    for rank in range(world_size):
        share = order.rank_share(result, rank, world_size)
        for worker in range(num_workers):
            for piece in order.windows(order.worker_share(share, worker, num_workers), WINDOW):
                blocks = np.unique(piece // BLOCK)
                assert len(blocks) <= 2 * WINDOW_BLOCKS + 1 + (world_size - 1)


def _split_into_windows(result, count):
    """Cut `result` into consecutive segments that are each a shuffle of whole blocks, closing a
    segment as soon as it holds WINDOW_BLOCKS complete blocks; fails if one needs more."""
    sizes = {b: min(BLOCK, count - b * BLOCK) for b in range(-(-count // BLOCK))}
    segments, seen = [], collections.Counter()
    start = 0
    for position, index in enumerate(result.tolist()):
        seen[index // BLOCK] += 1
        assert len(seen) <= WINDOW_BLOCKS, f"window at {start} touches more than the limit"
        complete = all(seen[b] == sizes[b] for b in seen)
        if complete and (len(seen) == WINDOW_BLOCKS or position == len(result) - 1):
            segments.append(result[start:position + 1])
            seen, start = collections.Counter(), position + 1
    assert start == len(result), "the order does not end on a whole window"
    return segments


@pytest.mark.parametrize("count", [1, 63, WINDOW + 1, 4 * WINDOW + 37, 10 * WINDOW - 5])
def test_order_is_windows_of_whole_blocks(count):
    """Each window of the order is a shuffle of at most WINDOW_BLOCKS whole blocks, so it can be
    read as that many sequential runs; the window a position belongs to may shift by one short
    block, so an aligned piece of WINDOW records spans at most two windows."""
    for epoch in range(5):
        result = order.epoch_order(count, shuffle=True, seed=epoch, epoch=epoch)
        segments = _split_into_windows(result, count)
        assert sum(map(len, segments)) == count
        assert len(segments) == -(-(-(-count // BLOCK)) // WINDOW_BLOCKS)
        spans = [len(np.unique(piece // BLOCK)) for piece in order.windows(result, WINDOW)]
        assert max(spans) <= 2 * WINDOW_BLOCKS


def test_a_short_last_block_keeps_later_windows_whole():
    """Found by the property test above (count=3009, seed 0, epoch 1, 3 workers: a piece
    touched 24 blocks): a short block shuffled into the middle shifted every later window."""
    result = order.epoch_order(3009, shuffle=True, seed=0, epoch=1)
    for piece in order.windows(result, WINDOW):
        assert len(np.unique(piece // BLOCK)) <= WINDOW_BLOCKS

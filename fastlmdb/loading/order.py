"""Sample order for sequential readers: a pure function of (seed, epoch), split exactly once.

The global order of an epoch shuffles contiguous *blocks* of records, then shuffles records
within each *window* of consecutive blocks. A reader can therefore fetch one window's records
in ascending key order (sequential I/O) and yield them shuffled, holding one window in memory.
The order does not depend on how many ranks or workers read it; they each take a contiguous
share, so every sample is read exactly once per epoch across all of them.
"""

import numpy as np

BLOCK = 64  # records read together
WINDOW_BLOCKS = 8  # blocks shuffled together: a reader's buffer is BLOCK * WINDOW_BLOCKS records


def epoch_order(count, *, shuffle, seed=0, epoch=0, block=BLOCK, window_blocks=WINDOW_BLOCKS):
    """Indices 0..count-1 in this epoch's order."""
    if not shuffle:
        return np.arange(count, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    starts = np.arange(0, count, block, dtype=np.int64)
    # A short last block stays last: in the middle it would make its window short and shift
    # every later window off the WINDOW grid that readers cut their pieces on.
    rng.shuffle(starts[:count // block])
    blocks = [np.arange(s, min(s + block, count), dtype=np.int64) for s in starts]
    windows = []
    for w in range(0, len(blocks), window_blocks):
        window = np.concatenate(blocks[w:w + window_blocks])
        rng.shuffle(window)
        windows.append(window)
    return np.concatenate(windows) if windows else np.empty(0, dtype=np.int64)


def per_rank(count, world_size, drop_last):
    """Samples each rank gets: equal for all ranks, as DistributedSampler does."""
    if drop_last:
        return count // world_size
    return -(-count // world_size)


def rank_share(order, rank, world_size, drop_last=False):
    """Rank `rank`'s contiguous share of `order`, padded or cut to an equal length.

    Padding repeats the first samples of the order (fewer than `world_size` of them), and
    `drop_last` drops the last ones instead, exactly like DistributedSampler.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    size = per_rank(len(order), world_size, drop_last)
    total = size * world_size
    if total > len(order):
        order = np.concatenate([order, np.resize(order, total - len(order))])
    return order[rank * size:(rank + 1) * size]


def worker_share(share, worker, num_workers):
    """Worker `worker`'s contiguous part of a rank's share (parts differ by at most one)."""
    return np.array_split(share, num_workers)[worker]


def batch_share(share, worker, num_workers, batch_size):
    """Worker `worker`'s batches of a share: batches worker, worker + N, worker + 2N, ...

    The DataLoader takes batches from its workers in turn, so the rank then sees its share in
    order, whatever the number of workers: a job that stops after n samples resumes with
    exactly share[n:], with as many workers as it likes.
    """
    starts = range(worker * batch_size, len(share), num_workers * batch_size)
    pieces = [share[start:start + batch_size] for start in starts]
    return np.concatenate(pieces) if pieces else share[:0]


def windows(indices, size):
    """Consecutive pieces of `indices`, each at most `size` long."""
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


def shard_order(counts, *, shuffle, seed=0, epoch=0, window=1):
    """Keys of a sharded database (shard k holding `counts[k]` consecutive keys) in an epoch's
    streaming order: the shards permuted, then the records of each `window` consecutive shards
    of that permutation shuffled together; without `shuffle`, key order. A pure function of
    its arguments: every rank and worker knows which shards it reads, and when."""
    offsets = np.cumsum([0] + list(counts)).astype(np.int64)
    if not shuffle:
        return np.arange(offsets[-1], dtype=np.int64)
    rng = np.random.default_rng([seed, epoch, len(counts)])
    shards = rng.permutation(len(counts))
    windows = []
    for w in range(0, len(shards), window):
        keys = np.concatenate([np.arange(offsets[k], offsets[k + 1]) for k in shards[w:w + window]])
        rng.shuffle(keys)
        windows.append(keys)
    return np.concatenate(windows) if windows else np.empty(0, dtype=np.int64)

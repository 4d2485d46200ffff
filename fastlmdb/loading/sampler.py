"""A map-style sampler for distributed training that resumes mid-epoch.

The epoch's order is a permutation that is a pure function of (seed, epoch), so it does not
depend on the number of ranks or workers; each rank takes an equal contiguous share, padded
or cut exactly as ``DistributedSampler`` does. ``state_dict``/``load_state_dict`` follow
torchdata's ``StatefulDataLoader`` protocol (it calls them at the right moment, in spite of
prefetching); with a plain DataLoader pass the number of samples consumed.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sized, cast

import numpy as np
import torch.utils.data

from fastlmdb.loading import order


def ranks(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): as given, else from torch.distributed when initialised, else (0, 1)."""
    if world_size is not None:
        return rank or 0, world_size
    if distributed():
        import torch.distributed as dist

        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distributed() -> bool:
    """Whether this process has joined a torch.distributed process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


class EpochSampler(torch.utils.data.Sampler[int]):
    """Indices of this rank's share of each epoch; ``set_epoch`` before each epoch.

    Args:
        dataset: anything with a length (an LMDBDataset).
        shuffle: a new permutation every epoch (default) or the dataset's order.
        seed, rank, world_size, drop_last: as for ``DistributedSampler``.
    """

    def __init__(self, dataset: Sized, shuffle: bool = True, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None,
                 drop_last: bool = False) -> None:
        self.count = len(dataset)
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = ranks(rank, world_size)
        self.epoch = 0
        self.start = 0  # where the next iteration starts in this rank's share
        self.begun = self.yielded = 0  # where the running one started, and where it is now

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = int(epoch), 0

    def __len__(self) -> int:
        return cast(int, order.per_rank(self.count, self.world_size, self.drop_last))

    def share(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        """This rank's whole share of the epoch, in order."""
        if self.shuffle:
            epoch_order = np.random.default_rng([self.seed, self.epoch]).permutation(self.count)
        else:
            epoch_order = np.arange(self.count)
        return cast("np.ndarray[Any, np.dtype[np.int64]]",
                    order.rank_share(epoch_order, self.rank, self.world_size, self.drop_last))

    def __iter__(self) -> Iterator[int]:
        share, begun = self.share(), self.start
        self.start, self.begun, self.yielded = 0, begun, begun
        for index in share[begun:].tolist():
            self.yielded += 1
            yield index

    def state_dict(self, samples_seen: int | None = None) -> dict[str, Any]:
        """Where this rank stands: after the indices handed out so far (what StatefulDataLoader
        asks for), or after `samples_seen` samples of the running iteration were consumed."""
        seen = self.yielded if samples_seen is None else self.begun + samples_seen
        return {"seed": self.seed, "shuffle": self.shuffle, "epoch": self.epoch,
                "samples_seen": int(seen)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (state["seed"], state["shuffle"]) != (self.seed, self.shuffle):
            raise ValueError(f"state is for seed={state['seed']}, shuffle={state['shuffle']}; "
                             f"this sampler has seed={self.seed}, shuffle={self.shuffle}")
        self.epoch, self.start = int(state["epoch"]), int(state["samples_seen"])

"""A map-style sampler for distributed training that resumes mid-epoch.

The epoch's order is a permutation that is a pure function of (seed, epoch), so it does not
depend on the number of ranks or workers; each rank takes an equal contiguous share, padded
or cut exactly as ``DistributedSampler`` does. ``state_dict``/``load_state_dict`` follow
torchdata's ``StatefulDataLoader`` protocol (it calls them at the right moment, in spite of
prefetching); with a plain DataLoader pass the number of samples consumed.

After an iteration that handed out its whole share, the next one is the next epoch unless
``set_epoch`` says which, so loops that never call it still get a new order every epoch. (Only
a finished iteration counts: DataLoaders make iterators they drop, torchdata's
StatefulDataLoader several while it restores a state.)

EpochSampler is a ``DistributedSampler`` (same arguments, attributes and length), so that
training frameworks that shard the data of a DataLoader whose sampler is not one leave it as it
is: PyTorch Lightning's Trainer (``use_distributed_sampler=True``, its default, only replaces
or wraps samplers that are not ``DistributedSampler``s) calls its ``set_epoch`` each epoch and
keeps its split and its mid-epoch resume.
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


class EpochSampler(torch.utils.data.DistributedSampler[int]):
    """Indices of this rank's share of each epoch: after a finished iteration the next
    epoch's, unless ``set_epoch`` names the epoch the next one is (as for
    ``DistributedSampler``, which it is).

    Args:
        dataset: anything with a length (an LMDBDataset).
        shuffle: a new permutation every epoch (default) or the dataset's order.
        seed, rank, drop_last: as for ``DistributedSampler``; `world_size` is its
            `num_replicas`. Ranks not given come from torch.distributed when initialised,
            else (0, 1).
    """

    def __init__(self, dataset: Sized, shuffle: bool = True, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None,
                 drop_last: bool = False) -> None:
        rank, world_size = ranks(rank, world_size)
        super().__init__(dataset, num_replicas=world_size, rank=rank,  # type: ignore[arg-type]
                         shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.count = len(dataset)
        self.world_size = world_size
        self.start = 0  # where the next iteration starts in this rank's share
        self.begun = self.yielded = 0  # where the running one started, and where it is now
        self._named = True  # whether the next iteration's epoch was set
        self._finished = False  # whether the last iteration handed out its whole share

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start, self._named = int(epoch), 0, True

    def __len__(self) -> int:
        return cast(int, order.per_rank(self.count, self.world_size, self.drop_last))

    def share(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        """This rank's whole share of the epoch, in order."""
        if self.shuffle:
            epoch_order = np.random.default_rng([self.seed, self.epoch]).permutation(self.count)
        else:
            epoch_order = np.arange(self.count)
        return cast("np.ndarray[Any, np.dtype[np.int64]]",
                    order.rank_share(epoch_order, self.rank, self.world_size,
                                     self.drop_last))

    def __iter__(self) -> Iterator[int]:
        if self._finished and not self._named:  # nobody said which epoch: the next one
            self.epoch, self.start = self.epoch + 1, 0
        self._named = self._finished = False
        return self._indices()

    def _indices(self) -> Iterator[int]:
        share, begun = self.share(), self.start
        self.start, self.begun, self.yielded = 0, begun, begun
        last = len(share)
        for index in share[begun:].tolist():
            self.yielded += 1
            self._finished = self.yielded == last
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
        self._named = True

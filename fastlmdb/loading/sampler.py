"""A map-style sampler for distributed training that resumes mid-epoch.

The epoch's order is a permutation that is a pure function of (seed, epoch), so it does not
depend on the number of ranks or workers; each rank takes an equal contiguous share, padded
or cut exactly as ``DistributedSampler`` does. ``state_dict``/``load_state_dict`` follow
torchdata's ``StatefulDataLoader`` protocol (it calls them at the right moment, in spite of
prefetching); with a plain DataLoader pass the number of samples consumed.

After an iteration that handed out its whole share, the next one is the next epoch unless
``set_epoch`` says which, so loops that never call it still get a new order every epoch. (Only
a finished iteration counts: DataLoaders make iterators they drop, torchdata's
StatefulDataLoader several while it restores a state.) Under Lightning's DDP with
``use_distributed_sampler=True`` (its default) the Trainer wraps any custom sampler in its own
``DistributedSamplerWrapper``, which lists the sampler and splits that list across ranks:
listed by it, EpochSampler yields the whole epoch (its own order, every rank the same), so
that Lightning's split is the only one and each sample is still seen once per epoch.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Iterator, Mapping, Sized, cast

import numpy as np
import torch.utils.data

from fastlmdb.loading import order

log = logging.getLogger(__name__)


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
    """Indices of this rank's share of each epoch: after a finished iteration the next
    epoch's, unless ``set_epoch`` names the epoch the next one is (as for
    ``DistributedSampler``).

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
        self._named = True  # whether the next iteration's epoch was set
        self._finished = False  # whether the last iteration handed out its whole share
        self._told = False  # whether the log says that Lightning's wrapper lists this sampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start, self._named = int(epoch), 0, True

    def __len__(self) -> int:
        if self._listed_by_lightning(sys._getframe(1)):
            return cast(int, order.per_rank(self.count, 1, False))
        return cast(int, order.per_rank(self.count, self.world_size, self.drop_last))

    def share(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        """This rank's whole share of the epoch, in order."""
        return self._share(self.rank, self.world_size, self.drop_last)

    def _share(self, rank: int, world_size: int,
               drop_last: bool) -> np.ndarray[Any, np.dtype[np.int64]]:
        if self.shuffle:
            epoch_order = np.random.default_rng([self.seed, self.epoch]).permutation(self.count)
        else:
            epoch_order = np.arange(self.count)
        return cast("np.ndarray[Any, np.dtype[np.int64]]",
                    order.rank_share(epoch_order, rank, world_size, drop_last))

    def __iter__(self) -> Iterator[int]:
        if self._finished and not self._named:  # nobody said which epoch: the next one
            self.epoch, self.start = self.epoch + 1, 0
        self._named = self._finished = False
        if self._listed_by_lightning(sys._getframe(1)):
            self._finished = True  # listed whole at once
            return iter(cast("list[int]", self._share(0, 1, False).tolist()))  # Lightning splits it
        return self._indices()

    def _indices(self) -> Iterator[int]:
        share, begun = self.share(), self.start
        self.start, self.begun, self.yielded = 0, begun, begun
        last = len(share)
        for index in share[begun:].tolist():
            self.yielded += 1
            self._finished = self.yielded == last
            yield index

    def _listed_by_lightning(self, frame: Any) -> bool:
        """Whether the caller (`frame`) is Lightning's _DatasetSamplerWrapper, which lists
        this sampler for its DistributedSamplerWrapper to split across ranks."""
        caller = frame.f_locals.get("self") if frame is not None else None
        if (type(caller).__name__ != "_DatasetSamplerWrapper"
                or getattr(caller, "_sampler", self) is not self):
            return False
        if not self._told and self.world_size > 1:
            self._told = True
            log.warning("EpochSampler is wrapped by Lightning's DistributedSamplerWrapper "
                        "(Trainer(use_distributed_sampler=True) under DDP): it yields every "
                        "rank the whole epoch for Lightning to split, and state_dict cannot "
                        "resume mid-epoch; pass Trainer(use_distributed_sampler=False) to "
                        "keep EpochSampler's own split and its resume")
        return True

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

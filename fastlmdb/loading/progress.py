"""Which epoch an LMDBIterDataset iteration is, shared by the dataset's copies in its workers.

Training loops that never call ``set_epoch`` (PyTorch Lightning, for one) still get a new order
every epoch: each process counts the iterations it begins, so the n-th iteration since
``set_epoch(e)`` (or since construction, e = 0) is epoch e + n. A DataLoader worker begins one
iteration per pass of its loader, persistent or not, so all workers of a pass agree without
talking to each other: each writes only its own counter, in shared memory, which survives
workers that come and go. ``set_epoch`` resets every counter, so an explicit epoch always wins.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.data

MAX_WORKERS = 1024  # counters for DataLoader workers 0..MAX_WORKERS-1 (8 KB of shared memory)


class Progress:
    """Epoch, resume point and the DataLoader's batch size, shared across processes."""

    def __init__(self) -> None:
        # [epoch, samples of it already consumed, the DataLoader's batch size (0: not given),
        #  whether a worker has warned that the batch size is missing]
        self.shared = torch.zeros(4, dtype=torch.int64).share_memory_()
        # Iterations begun since set(): slot 0 for a process iterating itself, 1 + id a worker's.
        self.passes = torch.zeros(1 + MAX_WORKERS, dtype=torch.int64).share_memory_()
        self.current: tuple[int, int] | None = None  # (epoch, offset) this process iterates

    def set(self, epoch: int, samples_seen: int = 0, *, everywhere: bool = True) -> None:
        """The next iteration is epoch `epoch` from sample `samples_seen` of this rank's share.

        `everywhere=False` resets only this process's counter (a worker restoring its state
        while the other workers may have begun already)."""
        self.shared[0], self.shared[1] = int(epoch), int(samples_seen)
        if everywhere:
            self.passes.zero_()
        else:
            self.passes[_slot()] = 0
        self.current = None

    def begin(self) -> tuple[int, int]:
        """(epoch, offset) of the iteration this process begins now."""
        slot = _slot()
        begun = int(self.passes[slot])
        self.passes[slot] = begun + 1
        offset = int(self.shared[1]) if begun == 0 else 0  # a resume point is for one pass
        self.current = (int(self.shared[0]) + begun, offset)
        return self.current

    def now(self) -> tuple[int, int]:
        """(epoch, offset) of the iteration this process runs or ran last; in a process that
        iterates none itself (one whose workers do), the workers' latest; before any, the
        next one."""
        if self.current is not None:
            return self.current
        begun = int(self.passes.max())
        return (int(self.shared[0]) + max(begun - 1, 0),
                int(self.shared[1]) if begun <= 1 else 0)

    def upcoming(self) -> tuple[int, int]:
        """(epoch, offset) of the iteration this process would begin next."""
        begun = int(self.passes[_slot()])
        return int(self.shared[0]) + begun, int(self.shared[1]) if begun == 0 else 0

    @property
    def batch_size(self) -> int | None:
        """The DataLoader's batch size, once the dataset was given it."""
        return int(self.shared[2]) or None

    @batch_size.setter
    def batch_size(self, size: int) -> None:
        self.shared[2] = int(size)

    def first_to_tell(self) -> bool:
        """True the first time it is asked, in whichever process: a warning said once."""
        told = int(self.shared[3])
        self.shared[3] = 1
        return not told

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "current": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # Unpickled from a file (torch.save of the dataset) the tensors come back private:
        # shared again, so that set_epoch reaches forked workers.
        for tensor in (self.shared, self.passes):
            if not tensor.is_shared():
                tensor.share_memory_()


def _slot() -> int:
    worker = torch.utils.data.get_worker_info()
    if worker is None:
        return 0
    if worker.id >= MAX_WORKERS:
        raise ValueError(f"num_workers={worker.num_workers}: LMDBIterDataset counts epochs for "
                         f"at most {MAX_WORKERS} DataLoader workers; use fewer")
    return 1 + worker.id

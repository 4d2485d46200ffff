"""Measuring loaders fairly: wall time and CPU time of the whole process tree.

CPU seconds of the main process plus every DataLoader worker (workers are counted once they
have exited and been reaped, so measure whole epochs with ``persistent_workers=False``):
that figure barely moves when other load shares the machine, unlike wall time.
"""

import dataclasses
import resource
import time


def cpu_seconds():
    """User + system CPU seconds of this process and its reaped children so far."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


@dataclasses.dataclass(frozen=True)
class Timing:
    images: int
    wall: float
    cpu: float

    @property
    def per_second(self):
        return self.images / self.wall

    @property
    def per_cpu_second(self):
        return self.images / self.cpu


def time_epoch(make_loader):
    """Run one epoch of `make_loader()` (workers started and reaped inside) and time it."""
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    images = 0
    loader = make_loader()
    for batch in loader:
        images += len(batch[1])
    del loader  # shuts the workers down, so their CPU time is counted
    return Timing(images, time.perf_counter() - wall0, cpu_seconds() - cpu0)

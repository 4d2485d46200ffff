"""Distributed ranks for test_ranks.py, started the two ways training jobs start them:

    python -m probes.dist_probe spawn ROOT OUT PORT SECONDS  # 2 ranks by mp.spawn
    python -m probes.dist_probe env ROOT OUT SECONDS         # one rank, as torchrun starts it:
                                                             # RANK, WORLD_SIZE, MASTER_ADDR/PORT

Each rank joins a gloo group, reads ROOT/train.lmdb through a DataLoader of 2 workers in each
configuration of CONFIGS (PROGRAM_CONFIGS for separate programs), for EPOCHS epochs (set_epoch before each), and writes
OUT/rank<r>.json: {config: [[[checksum, label], ...] of each epoch]}. The spawn launcher
gives up after SECONDS (exit status 124), and every collective has a timeout, so nothing
waits for ever.
"""

import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from fastlmdb import EpochSampler, LMDBDataset, LMDBIterDataset
from probes.lmdb_probes import checksum

EPOCHS = 2
SEED = 3
WORKERS = 2
CONTEXTS = ("fork", "spawn", "forkserver")
# (name, dataset, start method of the DataLoader workers, persistent workers)
CONFIGS = [(f"iter-{context}-{'persistent' if persistent else 'restarted'}", "iter", context,
            persistent) for context in CONTEXTS for persistent in (False, True)]
CONFIGS += [("map-EpochSampler", "EpochSampler", "spawn", True),
            ("map-DistributedSampler", "DistributedSampler", "fork", False)]


def _loader(root, kind, context, persistent):
    """(set_epoch, loader) of one configuration."""
    common = dict(batch_size=4, num_workers=WORKERS, multiprocessing_context=context,
                  persistent_workers=persistent)
    if kind == "iter":
        dataset = LMDBIterDataset(root, "train", checksum, output="numpy", shuffle=True,
                                  seed=SEED, batch_size=common["batch_size"])
        return dataset.set_epoch, DataLoader(dataset, **common)
    dataset = LMDBDataset(root, "train", checksum, output="numpy")
    sampler = (EpochSampler(dataset, seed=SEED) if kind == "EpochSampler"
               else DistributedSampler(dataset, seed=SEED))  # ranks from torch.distributed
    return sampler.set_epoch, DataLoader(dataset, sampler=sampler, **common)


# Separate programs: what differs from spawned ranks is how the rank is found, not the map-style
# samplers, which run in the rank's own process.
PROGRAM_CONFIGS = [config for config in CONFIGS if config[1] == "iter"]


def read_epochs(root, configs):
    results = {}
    for name, kind, context, persistent in configs:
        set_epoch, loader = _loader(root, kind, context, persistent)
        results[name] = []
        for epoch in range(EPOCHS):
            set_epoch(epoch)
            results[name].append([[int(c), int(label)] for checks, labels in loader
                                  for c, label in zip(checks, labels)])
            dist.barrier()  # ranks move in step, as in training
        del loader  # persistent workers go now
    return results


def rank_main(root, out, configs):
    """One rank, its process group already joined: read, then write OUT/rank<r>.json."""
    rank = dist.get_rank()
    results = read_epochs(root, configs)
    with open(os.path.join(out, f"rank{rank}.json.tmp"), "w") as file:
        json.dump(results, file)
    os.replace(os.path.join(out, f"rank{rank}.json.tmp"), os.path.join(out, f"rank{rank}.json"))
    dist.barrier()
    dist.destroy_process_group()


def _spawned_rank(rank, world_size, root, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    rank_main(root, out, CONFIGS)


def spawn_ranks(root, out, port, seconds, world_size=2):
    context = torch.multiprocessing.spawn(_spawned_rank, args=(world_size, root, out, port),
                                          nprocs=world_size, join=False)
    deadline = time.monotonic() + seconds
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            print(f"the ranks did not finish in {seconds} s", file=sys.stderr)
            sys.exit(124)


if __name__ == "__main__":
    mode, root, out, *rest = sys.argv[1:]
    if mode == "spawn":
        port, seconds = rest
        spawn_ranks(root, out, int(port), float(seconds))
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(rest[0])))
        rank_main(root, out, PROGRAM_CONFIGS)

"""One distributed rank for test_load.py: python -m probes.rank_probe ROOT RANK WORLD PORT EPOCHS.

Joins a gloo process group on loopback, reads ROOT/train.lmdb with LMDBIterDataset through a
DataLoader with two persistent workers, and prints JSON: the sample checksums of each epoch and
the PSS of each worker after each epoch.
"""

import json
import os
import sys

import psutil
import torch
import torch.distributed as dist

from fastlmdb import LMDBIterDataset
from probes.lmdb_probes import checksum


def main(root, rank, world, port, epochs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dataset = LMDBIterDataset(root, "train", checksum, output="numpy", shuffle=True, seed=7,
                              batch_size=8)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2,
                                         persistent_workers=True)
    seen, pss = [], []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        seen.append([int(c) for batch, _ in loader for c in batch])
        workers = psutil.Process().children()
        pss.append([w.memory_full_info().pss for w in workers])
        dist.barrier()  # ranks move in step, as in training
    dist.destroy_process_group()
    print(json.dumps({"seen": seen, "pss": pss}))


if __name__ == "__main__":
    root, rank, world, port, epochs = sys.argv[1:]
    main(root, int(rank), int(world), int(port), int(epochs))

"""Run by test_fused_tail.py under a 64 MB /dev/shm (Docker's default): float32 batches from
DataLoader workers, through the fused tail (reused memfd segments) or through torch's own
collate (shared memory in /dev/shm, the control). Prints one line: batches, dtype, shape.

    python -m probes.shm_probe DB fused|torch BATCH SIZE CONTEXT
"""

import sys

import torch
from torch.utils.data import DataLoader, RandomSampler
from torchvision.transforms import v2

import fastlmdb
from fastlmdb import LMDBDataset

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dataset(db, mode, size):
    pipeline = v2.Compose([fastlmdb.RandomResizedCrop(size), v2.RandomHorizontalFlip(),
                           v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    # fused: the recipe runs native (fastlmdb.loading.recipes); torch: exact=True, per-sample
    # float tensors stacked by torch's collate in the worker.
    return LMDBDataset(db, "train", pipeline, output="tensor", exact=mode == "torch")


def main(db, mode, batch_size, size, context):
    data = dataset(db, mode, int(size))
    sampler = RandomSampler(data, replacement=True, num_samples=4 * int(batch_size))
    loader = DataLoader(data, batch_size=int(batch_size), sampler=sampler, num_workers=2,
                        multiprocessing_context=context, timeout=300)
    shapes = {(images.dtype, tuple(images.shape)) for images, _ in loader}
    print(f"batches 4 {shapes}")


if __name__ == "__main__":
    main(*sys.argv[1:])

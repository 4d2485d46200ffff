"""Run as `python -m probes.portability_probe SRC DST LOCAL`: convert SRC's train split to DST,
read it with both datasets in DataLoader workers (batches decoded in place, so handed over through
handover.py), stage it to LOCAL; print JSON of what it saw. tests/test_portability.py runs it
with and without a sitecustomize that removes the Linux-only calls, and compares."""

import json
import os
import sys

import torch

from fastlmdb import LMDBDataset, LMDBIterDataset, ResizeCenterCrop
from fastlmdb.converter import Options, convert, default_procs
from fastlmdb.tools import stage


def batches(dataset):
    out = []
    for images, labels in torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2):
        out.append([images.sum(dim=(1, 2, 3)).tolist(), labels.tolist()])
    return sorted(out)


def main(src, dst, local):
    stats = convert(Options(src, dst, "train", procs=2))
    crop = ResizeCenterCrop(40, 32)
    seen = {
        "memfd_create": hasattr(os, "memfd_create"),
        "sched_getaffinity": hasattr(os, "sched_getaffinity"),
        "fcntl": "fcntl" in sys.modules and sys.modules["fcntl"] is not None,
        "default_procs_is_cpu_count": default_procs() == os.cpu_count(),
        "images": stats.images,
        "map": batches(LMDBDataset(dst, "train", transform=crop, output="tensor")),
        "iter": batches(LMDBIterDataset(dst, "train", transform=crop, output="tensor",
                                        batch_size=4)),
        "staged": os.path.basename(stage.stage(os.path.join(dst, "train.lmdb"), local)),
        "left_in_dst": sorted(os.listdir(dst)),
    }
    print(json.dumps(seen))


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""A tiny LightningModule that records which samples it trains on, and DataModules over both
datasets, for test_clients.py and the DDP probe (python -m probes.client_probes ROOT KIND OUT)."""

import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

import fastlmdb
from fastlmdb import EpochSampler, LMDBDataset
from probes.lmdb_probes import pooled_and_checksum

BATCH = 8
CLASSES = 3


class Recorder(pl.LightningModule):
    """A Linear on each image's mean colour; `seen[epoch]` lists the checksums it trained on."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, CLASSES)
        self.seen = {}

    def training_step(self, batch, batch_idx):
        (pooled, checks), labels = batch
        self.seen.setdefault(self.current_epoch, []).extend(checks.tolist())
        return torch.nn.functional.cross_entropy(self.layer(pooled / 255), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(pl.LightningDataModule):
    """kind: "map" (LMDBDataset + EpochSampler), "iter" (LMDBIterDataset, shuffled), or either
    with "-stateful" (torchdata's StatefulDataLoader, which Lightning checkpoints)."""

    def __init__(self, root, kind, workers=2, context=None, persistent=False):
        super().__init__()
        self.root, self.kind, self.workers = root, kind, workers
        self.options = dict(num_workers=workers, multiprocessing_context=context if workers else None,
                            persistent_workers=persistent and workers > 0)
        self.sampler = self.dataset = None

    def train_dataloader(self):
        loader = StatefulDataLoader if self.kind.endswith("-stateful") else DataLoader
        if self.kind.startswith("map"):
            self.dataset = LMDBDataset(self.root, "train", pooled_and_checksum, output="numpy")
            self.sampler = EpochSampler(self.dataset, seed=3)  # after DDP joined: its ranks
            return loader(self.dataset, batch_size=BATCH, sampler=self.sampler, **self.options)
        self.dataset = fastlmdb.LMDBIterDataset(self.root, "train", pooled_and_checksum,
                                                output="numpy", shuffle=True, seed=3)
        return fastlmdb.loader(self.dataset, batch_size=BATCH, loader_class=loader,
                               **self.options)


def trainer(**options):
    options = {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "logger": False,
               "enable_checkpointing": False, "enable_progress_bar": False,
               "enable_model_summary": False, "num_sanity_val_steps": 0, **options}
    return pl.Trainer(**options)


def main(root, kind, out, use_distributed_sampler):
    """One DDP job of 2 CPU ranks (Lightning starts the second by running this again); each
    rank writes out/rank<N>.json: {epoch: checksums}, and the sampler's length if any."""
    from lightning.pytorch.strategies import DDPStrategy

    model, data = Recorder(), Data(root, kind, workers=1)
    job = trainer(devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                  use_distributed_sampler=use_distributed_sampler == "1")
    job.fit(model, data)
    with open(os.path.join(out, f"rank{job.global_rank}.json"), "w") as f:
        json.dump({"seen": model.seen, "batches": job.num_training_batches,
                   "sampler": type(job.train_dataloader.sampler).__name__}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])

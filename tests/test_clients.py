"""Training clients as they are really written: plain loops that never call set_epoch,
PyTorch Lightning (one process, two DDP ranks, a mid-epoch checkpoint), timm's create_loader,
and torchvision's reference recipe (DistributedSampler, transform reassigned, the dataset
cached with torch.save). Every sample once per epoch, a new order each epoch, no batch lost.

100 images, batches of 8: two workers splitting the epoch in halves would each end on a
partial batch and yield 14 batches where len(loader) says 13.
"""

import collections
import glob
import json
import logging
import os
import signal
import subprocess
import warnings

import probes
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import fastlmdb
import helpers
from probes.lmdb_probes import checksum
from fastlmdb import EpochSampler, LMDBDataset, LMDBIterDataset

COUNT, BATCH = 100, 8
CONTEXTS = helpers.START_METHODS
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    base = tmp_path_factory.mktemp("clients")
    helpers.make_tree(base / "src", {"train": {"a": 34, "b": 33, "c": 33}})
    helpers.run_convert(base / "src", base / "dst")
    return os.fspath(base / "dst")


@pytest.fixture(scope="module")
def src(db):
    return os.path.join(os.path.dirname(db), "src", "train")


@pytest.fixture(scope="module")
def everything(db):
    """The checksum of every sample, in ImageFolder's order, and their labels."""
    return [(c, label) for c, label in LMDBDataset(db, "train", checksum, output="numpy")]


def _checksums(loader):
    return [int(c) for batch, _ in loader for c in batch]


# --------------------------------------------------------------------------- plain loops


@pytest.mark.timeout(180)
@pytest.mark.parametrize("context, persistent", [
    ("fork", False), ("fork", True), pytest.param("spawn", True, marks=pytest.mark.slow),
    pytest.param("forkserver", True, marks=pytest.mark.slow)])
def test_iter_loader_length_is_what_workers_yield_and_epochs_move_on(db, everything, context,
                                                                    persistent):
    stream = LMDBIterDataset(db, "train", checksum, output="numpy", shuffle=True, seed=2)
    loader = fastlmdb.loader(stream, batch_size=BATCH, num_workers=2,
                             multiprocessing_context=context, persistent_workers=persistent)
    assert stream.batch_size == BATCH  # told by fastlmdb.loader: the workers take turns by batch
    assert len(loader) == 13
    epochs = []
    for _ in range(2):  # nobody calls set_epoch
        batches = [[int(c) for c in batch] for batch, _ in loader]
        assert len(batches) == len(loader)
        epochs.append([c for batch in batches for c in batch])
        assert sorted(epochs[-1]) == sorted(c for c, _ in everything)
    assert epochs[0] != epochs[1], "the second iteration repeated the first epoch's order"
    stream.set_epoch(1)  # an explicit epoch wins, and gives that epoch's order again
    assert _checksums(loader) == epochs[1]
    assert _checksums(loader) != epochs[1]  # then epoch 2


@pytest.mark.timeout(120)
def test_without_the_batch_size_every_sample_still_arrives(db, everything):
    stream = LMDBIterDataset(db, "train", checksum, output="numpy")
    loader = DataLoader(stream, batch_size=BATCH, num_workers=2)
    assert len(loader) == 13  # asking it teaches the dataset nothing
    batches = [batch for batch in loader]
    # Halves per worker: 7 + 7 batches, where len(loader) says 13.
    assert len(batches) == 14
    assert sorted(int(c) for b, _ in batches for c in b) == sorted(c for c, _ in everything)
    assert stream.batch_size is None


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_an_unknown_batch_size_is_said_once_naming_what_to_pass(db, capfd):
    """Worker 0 warns, once across epochs and workers started again (spawn: the worker's
    stderr is the test's, where warnings print by default)."""
    stream = LMDBIterDataset(db, "train", checksum, output="numpy")
    loader = DataLoader(stream, batch_size=BATCH, num_workers=2, multiprocessing_context="spawn")
    for _ in range(2):
        assert len([batch for batch in loader]) == 14
    err = capfd.readouterr().err
    assert err.count("does not know the DataLoader's batch size") == 1, err
    assert "pass batch_size=<the DataLoader's> to LMDBIterDataset" in err
    assert "fastlmdb.loader(dataset, batch_size=n, ...)" in err


@pytest.mark.timeout(120)
def test_set_batch_size_reaches_persistent_workers(db, everything):
    stream = LMDBIterDataset(db, "train", checksum, output="numpy")
    loader = DataLoader(stream, batch_size=BATCH, num_workers=2, persistent_workers=True)
    assert len([batch for batch in loader]) == 14
    stream.set_batch_size(BATCH)  # as LitData's loader does
    assert stream.batch_size == BATCH
    batches = [batch for batch in loader]
    assert len(batches) == len(loader) == 13
    assert sorted(int(c) for b, _ in batches for c in b) == sorted(c for c, _ in everything)


def test_a_batch_size_unlike_the_loaders_is_refused(db):
    stream = LMDBIterDataset(db, "train", batch_size=4)
    with pytest.raises(ValueError, match="batch_size=4 was given to LMDBIterDataset, but the "
                                         "loader has batch_size=8: give both the same"):
        fastlmdb.loader(stream, batch_size=BATCH)
    assert len(fastlmdb.loader(stream, batch_size=4)) == 25
    for bad in (0, -1, True, 2.0, "8"):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            LMDBIterDataset(db, "train", batch_size=bad)
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            stream.set_batch_size(bad)
    assert stream.batch_size == 4


def test_loader_passes_everything_else_on(db):
    """Map-style datasets (no set_batch_size) and other loader classes go through as they are."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    dataset = LMDBDataset(db, "train", checksum, output="numpy")
    loader = fastlmdb.loader(dataset, batch_size=BATCH, drop_last=True)
    assert type(loader) is DataLoader and loader.drop_last and len(loader) == 12
    stream = LMDBIterDataset(db, "train", checksum, output="numpy")
    stateful = fastlmdb.loader(stream, batch_size=BATCH, loader_class=StatefulDataLoader)
    assert isinstance(stateful, StatefulDataLoader) and stream.batch_size == BATCH


# --------------------------------------------------------------------------- Lightning


def _quiet():
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["map", "iter"])
@pytest.mark.parametrize("context, persistent",
                         [("fork", False), ("spawn", True), ("forkserver", True)])
def test_lightning_sees_every_sample_once_per_epoch_in_a_new_order(db, everything, kind,
                                                                  context, persistent):
    from probes import client_probes

    _quiet()
    model = client_probes.Recorder()
    job = client_probes.trainer(max_epochs=2)
    job.fit(model, client_probes.Data(db, kind, workers=2, context=context,
                                      persistent=persistent))
    assert job.num_training_batches == 13
    assert sorted(model.seen) == [0, 1]
    for epoch, seen in model.seen.items():
        assert len(seen) == COUNT, f"epoch {epoch}: {len(seen)} samples (a batch dropped?)"
        assert sorted(seen) == sorted(c for c, _ in everything)
    assert model.seen[0] != model.seen[1], "epoch 2 repeated epoch 1's order"


def _ddp(root, kind, out, use_distributed_sampler, seconds=400):
    """Run probes/client_probes.py as a 2-rank Lightning DDP job; {rank: result}."""
    process = subprocess.Popen(
        probes.command("client_probes", root, kind, out, int(use_distributed_sampler)),
        env=probes.env(PYTHONWARNINGS="ignore"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # its own group: Lightning's second rank and the workers
    try:
        _, err = process.communicate(timeout=seconds)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    assert process.returncode == 0, err[-4000:]
    results = {}
    for path in glob.glob(os.path.join(out, "rank*.json")):
        with open(path) as f:
            results[int(os.path.basename(path)[4:-5])] = json.load(f)
    assert sorted(results) == [0, 1], err[-4000:]
    return results


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind, use_distributed_sampler",
                         [("map", False), ("map", True), ("iter", True)])
def test_lightning_ddp_two_ranks_share_each_epoch_exactly(db, everything, tmp_path, kind,
                                                          use_distributed_sampler):
    """Lightning's default use_distributed_sampler=True replaces or wraps only samplers that
    are not DistributedSamplers: EpochSampler is one, so it keeps its own split either way."""
    results = _ddp(db, kind, os.fspath(tmp_path), use_distributed_sampler)
    if kind == "map":
        assert [results[r]["sampler"] for r in (0, 1)] == ["EpochSampler"] * 2
    per_rank = -(-COUNT // 2)
    assert [results[r]["batches"] for r in (0, 1)] == [-(-per_rank // BATCH)] * 2
    orders = []
    for epoch in ("0", "1"):
        shares = [results[r]["seen"][epoch] for r in (0, 1)]
        assert [len(s) for s in shares] == [per_rank] * 2
        union = collections.Counter(shares[0] + shares[1])
        assert set(union) == {c for c, _ in everything}, f"epoch {epoch}: samples missing"
        assert sum(union.values()) == COUNT  # 100 divides by 2: no padding
        orders.append(shares[0])
    assert orders[0] != orders[1]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("kind", ["iter-stateful", "map-stateful"])
def test_lightning_resumes_mid_epoch_from_a_checkpoint(db, tmp_path, kind):
    """A job checkpointed after 5 steps (torchdata's StatefulDataLoader, whose state Lightning
    saves) and restarted from it: what it saw + what the restart sees == one whole epoch."""
    from probes import client_probes
    from lightning.pytorch.callbacks import ModelCheckpoint

    _quiet()

    def data():
        return client_probes.Data(db, kind, workers=2, context="fork")

    whole = client_probes.Recorder()
    client_probes.trainer(max_epochs=1).fit(whole, data())
    first = client_probes.Recorder()
    every_5 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    client_probes.trainer(max_epochs=1, max_steps=5, enable_checkpointing=True,
                          callbacks=[every_5]).fit(first, data())
    path = tmp_path / "epoch=0-step=5.ckpt"
    assert path.exists(), os.listdir(tmp_path)
    rest = client_probes.Recorder()
    client_probes.trainer(max_epochs=2).fit(rest, data(), ckpt_path=path)
    assert len(first.seen[0]) == 5 * BATCH
    assert first.seen[0] + rest.seen[0] == whole.seen[0]
    assert sorted(rest.seen[1]) == sorted(whole.seen[0]) and rest.seen[1] != whole.seen[0]


# --------------------------------------------------------------------------- timm


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("use_prefetcher", [False, True])
@pytest.mark.parametrize("context", CONTEXTS)
def test_timm_create_loader_eval_gives_imagefolders_batches(db, src, context, use_prefetcher):
    """timm reassigns dataset.transform with its own eval transforms; with exact=True the
    batches equal those of torchvision's ImageFolder through the same loader, bit for bit; by
    default (timm's recipe run natively) they have its dtype, shape and labels, and pixels
    close to its."""
    from timm.data import create_loader
    from torchvision.datasets import ImageFolder

    def batches(dataset, workers):
        loader = create_loader(dataset, input_size=(3, 32, 32), batch_size=BATCH,
                               is_training=False, use_prefetcher=use_prefetcher,
                               device=torch.device("cpu"), num_workers=workers,
                               persistent_workers=workers > 0)  # timm 0.9.0: True always
        if workers:
            torch_loader = loader.loader if use_prefetcher else loader
            torch_loader.multiprocessing_context = context
        return [(images.clone(), labels.clone()) for images, labels in loader]

    ours, native = LMDBDataset(db, "train", exact=True), LMDBDataset(db, "train")
    got, expected = batches(ours, 2), batches(ImageFolder(src), 0)
    fast = batches(native, 2)
    assert ours.transform is not None  # timm's, assigned after construction
    assert native.pipeline().startswith("native")
    assert len(got) == len(expected) == len(fast) == 13
    for (images, labels), (ref_images, ref_labels), (fast_images, fast_labels) in zip(
            got, expected, fast):
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
        assert torch.equal(labels, ref_labels) and torch.equal(fast_labels, ref_labels)
        assert torch.equal(images, ref_images)
        assert fast_images.shape == ref_images.shape and fast_images.dtype == ref_images.dtype
        assert (fast_images - ref_images).abs().mean() < 0.1  # normalised units (0.02-0.05)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("use_prefetcher", [False, True])
def test_timm_create_loader_training_every_sample(db, everything, use_prefetcher):
    """Training: timm's random crops and flips, shuffled, drop_last (100 = 10 batches of 10)."""
    from timm.data import create_loader

    dataset = LMDBDataset(db, "train")
    loader = create_loader(dataset, input_size=(3, 32, 32), batch_size=10, is_training=True,
                           use_prefetcher=use_prefetcher, device=torch.device("cpu"),
                           num_workers=2)
    for _ in range(2):
        labels = []
        for images, batch_labels in loader:
            assert images.shape == (10, 3, 32, 32) and images.dtype == torch.float32
            assert -3 < float(images.mean()) < 3  # normalised, by the transform or prefetcher
            labels += batch_labels.tolist()
        assert collections.Counter(labels) == collections.Counter(dataset.targets)
        assert labels != dataset.targets  # shuffled
    assert len(labels) == COUNT


# --------------------------------------------------------------------------- torchvision


@pytest.mark.timeout(300)
@pytest.mark.parametrize("context", CONTEXTS)
def test_torchvision_reference_recipe_with_a_cached_dataset(db, everything, tmp_path, context):
    """references/classification/train.py: the dataset built once and cached with torch.save
    (--cache-dataset), loaded with weights_only=False, its transform reassigned, read through
    DistributedSampler (set_epoch each epoch) by DataLoader workers."""
    dataset = LMDBDataset(db, "train", output="numpy")
    cache = tmp_path / "dataset.pt"
    torch.save(dataset, cache)
    dataset = torch.load(cache, weights_only=False)
    dataset.transform = checksum
    per_epoch = []
    for epoch in range(2):
        shares = []
        for rank in range(2):
            sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, seed=1)
            sampler.set_epoch(epoch)
            loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=2,
                                multiprocessing_context=context)
            shares.append([(int(c), int(label)) for batch, labels in loader
                           for c, label in zip(batch, labels)])
        assert sorted(shares[0] + shares[1]) == sorted(everything)  # pairs, exactly once
        per_epoch.append(shares[0])
    assert per_epoch[0] != per_epoch[1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("context", CONTEXTS)
def test_cached_iterable_dataset_keeps_its_epochs_in_persistent_workers(db, everything,
                                                                       tmp_path, context):
    """A torch.load-ed LMDBIterDataset: set_epoch and the epoch count still reach persistent
    workers (its shared counters are shared again when unpickled from a file)."""
    cache = tmp_path / "stream.pt"
    torch.save(LMDBIterDataset(db, "train", output="numpy", shuffle=True, seed=4,
                               batch_size=BATCH), cache)
    stream = torch.load(cache, weights_only=False)
    stream.transform = checksum
    assert stream.batch_size == BATCH  # kept in the cache
    loader = DataLoader(stream, batch_size=BATCH, num_workers=2, persistent_workers=True,
                        multiprocessing_context=context)
    assert len(loader) == 13
    orders = [_checksums(loader), _checksums(loader)]
    stream.set_epoch(0)
    orders.append(_checksums(loader))
    for seen in orders:
        assert sorted(seen) == sorted(c for c, _ in everything)
    assert orders[0] != orders[1] and orders[2] == orders[0]


def test_epoch_sampler_without_set_epoch_in_a_plain_loop(db, everything):
    dataset = LMDBDataset(db, "train", checksum, output="numpy")
    sampler = EpochSampler(dataset, seed=9)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler)
    first, second = _checksums(loader), _checksums(loader)
    assert sorted(first) == sorted(second) == sorted(c for c, _ in everything)
    assert first != second and sampler.epoch == 1
    sampler.set_epoch(0)
    assert _checksums(loader) == first


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_after_a_resumed_epoch_comes_the_next_one(db, workers):
    def stream():
        return LMDBIterDataset(db, "train", checksum, output="numpy", shuffle=True, seed=6,
                               batch_size=BATCH)

    def epoch(dataset):
        return _checksums(DataLoader(dataset, batch_size=BATCH, num_workers=workers))

    reference = stream()
    reference.set_epoch(3)
    third = epoch(reference)
    fourth = epoch(reference)  # nobody calls set_epoch
    job = stream()
    job.load_state_dict({"seed": 6, "shuffle": True, "epoch": 3, "samples_seen": 2 * BATCH})
    assert epoch(job) == third[2 * BATCH:]
    assert epoch(job) == fourth  # the whole next epoch, not the resume point again

"""Batches decoded in place (fastlmdb.batch) and handed over through reused shared memory
(fastlmdb.handover): the same pixels, labels and random draws as the per-sample path, in the
main process and in DataLoader workers; other pipelines keep the per-sample path.
"""

import os
import pickle
import shutil

import lmdb
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate
from torchvision import transforms as v1
from torchvision.transforms import v2

import fastlmdb
from fastlmdb import converter
from fastlmdb.testing import sample_tree
from fastlmdb.loading import batch, handover
from fastlmdb.core import format as fmt
from fastlmdb import DecodeError, LMDBDataset, LMDBIterDataset
from helpers import key_of

SIZE = 48
COUNT = 21  # 3 classes x 7: batches of 4 and 8 leave a partial one


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    """{"jpeg": DST, "numpy": DST} of one small tree of photo-like JPEGs, 70-170 px."""
    root = tmp_path_factory.mktemp("batch")
    sample_tree.make_tree(root / "src", classes=3, per_class={"train": 7}, size=(100, 130), seed=5)
    found = {}
    for save_as in ("jpeg", "numpy"):
        found[save_as] = os.fspath(root / save_as)
        converter.convert(converter.Options(os.fspath(root / "src"), found[save_as], "train",
                                        save_as=save_as, procs=1))
    return found


def _crop():
    return fastlmdb.RandomResizedCrop(SIZE, scale=(0.1, 1.0))


PIPELINES = {
    "crop": lambda: _crop(),
    "v2 flips": lambda: v2.Compose([_crop(), v2.RandomHorizontalFlip(),
                                    v2.RandomVerticalFlip(p=0.3)]),
    "v1 flip": lambda: v1.Compose([_crop(), v1.RandomHorizontalFlip()]),
    "centre crop": lambda: fastlmdb.ResizeCenterCrop(56, SIZE),
}


def _same_pipeline_per_sample(transform):
    """`transform` plus a step that changes nothing and draws nothing, so that the dataset
    takes the per-sample path: the reference."""
    steps = transform.transforms if hasattr(transform, "transforms") else [transform]
    return v2.Compose([*steps, v2.Identity()])


def _batch_and_reference(db, transform, positions, seed=0):
    """(dataset, its batch, the per-sample path's samples); each path starts from `seed` and
    must leave torch's generator in the same state."""
    dataset = LMDBDataset(db, "train", transform, output="tensor")
    torch.manual_seed(seed)
    built = dataset.__getitems__(positions)
    after_batch = torch.get_rng_state()
    torch.manual_seed(seed)
    reference = [dataset[i] for i in positions]
    assert torch.equal(torch.get_rng_state(), after_batch)
    return dataset, built, reference


@pytest.mark.parametrize("kind", ["jpeg", "numpy"])
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_batch_equals_the_per_sample_path(dbs, kind, pipeline):
    positions = [3, 0, 20, 7, 7, 11, 19, 5]
    dataset, built, reference = _batch_and_reference(dbs[kind], PIPELINES[pipeline](),
                                                     positions)
    assert all(isinstance(s, batch.Sample) for s in built)
    images, labels = default_collate(built)
    expected_images, expected_labels = default_collate(reference)
    assert images.dtype == torch.uint8 and images.shape == (8, 3, SIZE, SIZE)
    assert images.is_contiguous()
    assert torch.equal(images, expected_images)
    assert labels.dtype == torch.int64 and torch.equal(labels, expected_labels)
    assert [s[1] for s in built] == [label for _, label in reference]
    assert all(type(s[1]) is int for s in built)


def test_prebuilt_batch_is_handed_over_not_stacked(dbs):
    dataset = LMDBDataset(dbs["jpeg"], "train", PIPELINES["v2 flips"](), output="tensor")
    built = dataset.__getitems__(list(range(6)))
    for collate in (default_collate, fastlmdb.collate):
        images, labels = collate(built)
        assert images is built[0].batch[0] and labels is built[0].batch[1]
    # A part of a batch, or a mix, is stacked like any samples: the same values, a copy.
    images, labels = default_collate(built[1:4])
    assert torch.equal(images, built[0].batch[0][1:4]) and labels.tolist() == [
        s[1] for s in built[1:4]]
    assert images.data_ptr() != built[0].batch[0][1].data_ptr()
    mixed = [built[0], tuple(built[1])]
    assert torch.equal(fastlmdb.collate(mixed)[0], built[0].batch[0][:2])
    # Pickled, a sample is the plain tuple it stands for.
    assert type(pickle.loads(pickle.dumps(built[2]))) is tuple


@pytest.mark.parametrize("make, options", [
    # A float tail or torchvision's crop go in place by default (test_recipes.py); not exact.
    (lambda: v2.Compose([_crop(), v2.ToDtype(torch.float32, scale=True)]), {"exact": True}),
    (lambda: v2.Compose([_crop(), v2.RandomHorizontalFlip(), v2.Identity()]), {}),
    (lambda: v2.Compose([_crop(), type("MyFlip", (v2.RandomHorizontalFlip,), {})()]), {}),
    (lambda: v2.Compose([v2.RandomResizedCrop(SIZE, antialias=True)]), {"exact": True}),
    (lambda: _crop(), {"output": "numpy"}),
    (lambda: _crop(), {"output": "pil"}),
    (lambda: _crop(), {"target_transform": str}),
], ids=["float", "identity step", "flip subclass", "torchvision crop", "numpy", "pil",
        "target_transform"])
def test_other_pipelines_keep_the_per_sample_path(dbs, make, options):
    options = {"output": "tensor", **options}
    samples = LMDBDataset(dbs["jpeg"], "train", make(), **options).__getitems__([0, 1, 2])
    assert [type(s) for s in samples] == [tuple] * 3


def _corrupt(db, tmp_path, index):
    shutil.copy(fmt.db_path(db, "train"), fmt.db_path(tmp_path, "train"))
    env = lmdb.open(fmt.db_path(tmp_path, "train"), subdir=False, max_dbs=3)
    images, meta = env.open_db(fmt.IMAGES_DB), env.open_db(fmt.META_DB)
    with env.begin(write=True, db=images) as txn:
        txn.put(fmt.key(key_of(txn, meta, index)), b"\x00garbage" * 40)
    env.close()
    return os.fspath(tmp_path)


def test_skipped_record_as_on_the_per_sample_path(dbs, tmp_path):
    db = _corrupt(dbs["jpeg"], tmp_path, 6)
    positions = [5, 6, 7, 20]
    transform = PIPELINES["v2 flips"]()
    results = []
    for pipeline in (transform, _same_pipeline_per_sample(transform)):
        dataset = LMDBDataset(db, "train", pipeline, output="tensor", on_error="skip")
        torch.manual_seed(0)
        results.append((dataset.__getitems__(positions), dataset.errors))
    (built, errors), (reference, reference_errors) = results
    assert type(built[0]) is batch.Sample and type(reference[0]) is tuple
    images, labels = default_collate(built)
    expected_images, expected_labels = default_collate(reference)
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    assert labels[1] == labels[2]  # record 6 replaced by record 7, as for one sample
    assert errors == reference_errors == 1
    raising = LMDBDataset(db, "train", transform, output="tensor")
    with pytest.raises(DecodeError, match=r"train record 6 \(class 'n00000000'\)"):
        raising.__getitems__(positions)


# --------------------------------------------------------------------------- handover


def _send(built):
    """What the main process receives of a collated batch from a worker."""
    from multiprocessing.reduction import ForkingPickler

    return pickle.loads(ForkingPickler.dumps(default_collate(built)))


def test_segments_are_reused_only_once_released(dbs, as_worker):
    dataset = LMDBDataset(dbs["jpeg"], "train", PIPELINES["v2 flips"](), output="tensor")
    built = dataset.__getitems__(list(range(8)))
    expected = built[0].batch[0].clone()
    received = _send(built)
    assert type(received) is list and torch.equal(received[0], expected)
    assert received[1].dtype == torch.int64 and received[1].tolist() == [s[1] for s in built]
    (segment,) = handover._segments()
    del built
    assert not segment.free()  # the main process holds the batch
    held_view = received[0][3:5]
    del received
    assert not segment.free()  # ... a view of it still
    other = dataset.__getitems__(list(range(8, 16)))
    assert len(handover._segments()) == 2  # not written over
    assert torch.equal(held_view, expected[3:5])
    del held_view
    assert segment.free()
    del other
    again = dataset.__getitems__(list(range(8)))
    assert len(handover._segments()) == 2  # reused
    assert again[0].batch[0].data_ptr() in {s.address for s in handover._segments()}


def test_segments_are_bounded_then_torch_shared_memory(dbs, as_worker):
    dataset = LMDBDataset(dbs["jpeg"], "train", _crop(), output="tensor")
    held = [_send(dataset.__getitems__([i, i + 1])) for i in range(handover.MAX_SEGMENTS + 2)]
    assert len(handover._segments()) == handover.MAX_SEGMENTS
    last = dataset.__getitems__([0, 1])
    assert last[0].batch[0].is_shared()  # torch's fresh shared memory
    assert all(images.shape == (2, 3, SIZE, SIZE) for images, _ in held)


def test_a_sample_pickled_alone_copies_and_frees_its_segment(dbs, as_worker):
    from multiprocessing.reduction import ForkingPickler

    dataset = LMDBDataset(dbs["jpeg"], "train", _crop(), output="tensor")
    built = dataset.__getitems__([0, 1, 2])
    image = built[1][0].clone()
    received = pickle.loads(ForkingPickler.dumps(built[1]))  # a custom collate_fn's way
    assert type(received) is tuple and torch.equal(received[0], image)
    del built
    assert handover._segments()[0].free()


# --------------------------------------------------------------------------- workers


def _epochs(dataset, context, persistent, epochs=2, batch_size=4):
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=2,
                        generator=torch.Generator().manual_seed(3),
                        multiprocessing_context=context, persistent_workers=persistent)
    return [batch_ for _ in range(epochs) for batch_ in loader]  # every batch held


@pytest.mark.timeout(180)
@pytest.mark.parametrize("context, persistent", [
    ("fork", True), ("fork", False), pytest.param("spawn", True, marks=pytest.mark.slow)])
def test_workers_give_the_per_sample_pixels(dbs, context, persistent):
    transform = PIPELINES["v2 flips"]()
    fast = _epochs(LMDBDataset(dbs["jpeg"], "train", transform, output="tensor"),
                   context, persistent)
    slow = _epochs(LMDBDataset(dbs["jpeg"], "train", _same_pipeline_per_sample(transform),
                               output="tensor"), context, persistent)
    # 12 batches held, more than two workers' segments: none was written over.
    assert len(fast) == len(slow) == 2 * -(-COUNT // 4) > 2 * handover.MAX_SEGMENTS
    if hasattr(os, "memfd_create"):  # the first batches came through segments, not torch's
        assert not fast[0][0].is_shared() and slow[0][0].is_shared()
    for (images, labels), (expected_images, expected_labels) in zip(fast, slow):
        assert images.shape[1:] == (3, SIZE, SIZE) and images.is_contiguous()
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    assert sorted(np.concatenate([labels.numpy() for _, labels in fast[:6]])) == sorted(
        LMDBDataset(dbs["jpeg"], "train").targets)


# --------------------------------------------------------------------------- iterable


def _stream_batches(db, transform, workers, batch_size=4, seed=0):
    stream = LMDBIterDataset(db, "train", transform, output="tensor", shuffle=True, seed=2,
                             batch_size=batch_size)
    torch.manual_seed(seed)  # the workers' seeds come from it
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers)
    return [batch_ for batch_ in loader]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["jpeg", "numpy"])
def test_iterable_batches_equal_the_per_sample_path(dbs, workers, kind):
    transform = PIPELINES["v2 flips"]()
    fast = _stream_batches(dbs[kind], transform, workers)
    slow = _stream_batches(dbs[kind], _same_pipeline_per_sample(transform), workers)
    assert len(fast) == len(slow) == -(-COUNT // 4)  # workers take turns by whole batches
    for (images, labels), (expected_images, expected_labels) in zip(fast, slow):
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    if workers and hasattr(os, "memfd_create"):
        assert not fast[0][0].is_shared() and slow[0][0].is_shared()


def test_iterable_batch_is_handed_over_not_stacked(dbs):
    stream = LMDBIterDataset(dbs["jpeg"], "train", PIPELINES["crop"](), output="tensor",
                             batch_size=8)
    samples = list(stream)
    assert len(samples) == COUNT and all(isinstance(s, batch.Sample) for s in samples)
    images, labels = default_collate(samples[8:16])
    assert images is samples[8].batch[0] and labels.tolist() == [s[1] for s in samples[8:16]]
    assert images.shape == (8, 3, SIZE, SIZE)


def test_iterable_skips_a_bad_record_from_its_batch(dbs, tmp_path):
    db = _corrupt(dbs["jpeg"], tmp_path, 6)
    stream = LMDBIterDataset(db, "train", PIPELINES["crop"](), output="tensor", batch_size=4,
                             on_error="skip")
    samples = list(stream)
    assert len(samples) == COUNT - 1 and stream.errors == 1
    assert len(samples[4].batch[1]) == 3  # the batch of records 4..7 lost record 6
    with pytest.raises(DecodeError, match="record 6"):
        list(LMDBIterDataset(db, "train", PIPELINES["crop"](), output="tensor", batch_size=4))


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:.set_vital. is deprecated")
def test_iterable_batches_resume_under_stateful_dataloader(dbs):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader():
        stream = LMDBIterDataset(dbs["jpeg"], "train", PIPELINES["crop"](), output="tensor",
                                 shuffle=True, batch_size=4)
        return StatefulDataLoader(stream, batch_size=4, num_workers=2)

    def labels(batches):
        return [label for _, batch_labels in batches for label in batch_labels.tolist()]

    whole = labels(loader())
    first = loader()
    iterator = iter(first)
    seen = labels([next(iterator) for _ in range(3)])
    state = first.state_dict()
    again = loader()
    again.load_state_dict(state)
    assert seen + labels(again) == whole

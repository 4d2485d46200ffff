"""LMDBDataset / LMDBIterDataset: drop-in for ImageFolder, outputs, decoders, DataLoader
workers and ranks (exactly once), and clear errors on bad databases.

The data is built here (module-scoped): a 14-image ImageFolder tree with plain, 4:4:4,
grayscale and progressive JPEGs of 32-96 px, converted once in JPEG mode and once in numpy
mode.
"""

import collections
import io
import json
import os
import pickle
import shutil

import lmdb
import numpy as np
import pytest
import simplejpeg
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from probes import lmdb_probes
import helpers
from helpers import usable_decoders
from fastlmdb import converter
from fastlmdb.core import jpeg, store
from fastlmdb.core import format as fmt
from fastlmdb import DecodeError, LMDBDataset, LMDBIterDataset
from fastlmdb.core.errors import DatabaseError, IncompleteDatabaseError
from fastlmdb.testing.sample_tree import synthetic_photo

SPLIT = "train"
# class -> [(relative file name, kind)]; ImageFolder sorts classes and files (and walks subdirs).
LAYOUT = {
    "cat": [("a.JPEG", "plain"), ("b.JPEG", "gray"), ("c.jpg", "progressive"),
            ("d.JPEG", "444"), ("sub/e.jpeg", "plain")],
    "dog": [("a.JPEG", "progressive"), ("b.JPEG", "plain"), ("c.JPEG", "plain"),
            ("d.JPEG", "gray"), ("e.JPEG", "444")],
    "fish": [("a.JPEG", "plain"), ("b.JPEG", "444"), ("c.JPEG", "gray"),
             ("d.JPEG", "progressive")],
}
COUNT = sum(map(len, LAYOUT.values()))  # 14: not divisible by 3 (ranks) nor 4 (batch)


DECODERS = usable_decoders()
TURBO = "turbojpeg" in DECODERS
CONTEXTS = helpers.START_METHODS


def _jpeg_bytes(kind, rng):
    height, width = (int(v) for v in rng.integers(32, 97, 2))
    pixels = synthetic_photo(rng, height, width)
    if kind == "plain":
        return simplejpeg.encode_jpeg(pixels, quality=90, colorsubsampling="420")
    if kind == "444":
        return simplejpeg.encode_jpeg(pixels, quality=85, colorsubsampling="444")
    image = Image.fromarray(pixels)
    buf = io.BytesIO()
    if kind == "gray":
        image.convert("L").save(buf, format="JPEG", quality=90)
    elif kind == "progressive":
        image.save(buf, format="JPEG", quality=90, progressive=True)
    else:
        raise ValueError(kind)
    return buf.getvalue()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """SRC with SRC/train/<class>/<image>; returns SRC."""
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(1234)
    for cls, files in LAYOUT.items():
        for name, kind in files:
            path = root / SPLIT / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_jpeg_bytes(kind, rng))
    return os.fspath(root)


def _convert(src, dst, save_as):
    stats = converter.convert(converter.Options(src, dst, SPLIT, save_as=save_as, procs=1))
    assert stats.images == COUNT and not stats.skipped
    return dst


@pytest.fixture(scope="module")
def db(src, tmp_path_factory):
    """DST holding train.lmdb in JPEG mode."""
    return _convert(src, os.fspath(tmp_path_factory.mktemp("db")), "jpeg")


@pytest.fixture(scope="module")
def npdb(src, tmp_path_factory):
    """DST holding train.lmdb in numpy mode."""
    return _convert(src, os.fspath(tmp_path_factory.mktemp("npdb")), "numpy")


class Ref:
    """What torchvision's ImageFolder gives for the same tree."""

    def __init__(self, root):
        self.folder = torchvision.datasets.ImageFolder(os.path.join(root, SPLIT))
        self.pixels = [np.asarray(self.folder[i][0]) for i in range(len(self.folder))]
        self.labels = list(self.folder.targets)
        self.checksums = [lmdb_probes.checksum(p) for p in self.pixels]
        assert len(set(self.checksums)) == len(self.checksums) == COUNT  # identifies samples
        self.index_of = {c: i for i, c in enumerate(self.checksums)}


@pytest.fixture(scope="module")
def ref(src):
    return Ref(src)


def _copy_db(db, tmp_path):
    """A private copy of DST/train.lmdb in tmp_path (returns the copy's DST)."""
    shutil.copy(fmt.db_path(db, SPLIT), fmt.db_path(tmp_path, SPLIT))
    return os.fspath(tmp_path)


def _edit(dst, name, key, value):
    """Overwrite `key` in the named table `name` of DST/train.lmdb with plain lmdb."""
    env = lmdb.open(fmt.db_path(dst, SPLIT), subdir=False, max_dbs=3)
    try:
        table = env.open_db(name)
        with env.begin(write=True, db=table) as txn:
            old = txn.get(key)
            assert old is not None, key
            txn.put(key, value)
            return old
    finally:
        env.close()


def _collect(loader):
    """(checksums, labels) of everything a loader yields (transform=checksum)."""
    checks, labels = [], []
    for images, targets in loader:
        checks += images.tolist()
        labels += targets.tolist()
    return checks, labels


# --------------------------------------------------------------------------- drop-in


def test_same_catalog_as_imagefolder(db, ref):
    ds = LMDBDataset(db, SPLIT)
    assert ds.classes == ref.folder.classes == sorted(LAYOUT)
    assert ds.class_to_idx == ref.folder.class_to_idx
    assert ds.targets == ref.labels
    assert len(ds) == len(ref.folder) == COUNT
    assert ds.imgtype == "jpeg"


def test_pil_pixels_equal_imagefolder(db, ref):
    ds = LMDBDataset(db, SPLIT)
    for i in range(len(ds)):
        image, label = ds[i]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert label == ref.labels[i] and isinstance(label, int)
        np.testing.assert_array_equal(np.asarray(image), ref.pixels[i], err_msg=f"index {i}")


def test_transform_receives_pil_rgb(db):
    seen = []

    def transform(image):
        seen.append((type(image), image.mode))
        return "transformed"

    ds = LMDBDataset(db, SPLIT, transform=transform)
    assert ds[1][0] == "transformed" and ds[3][0] == "transformed"
    assert len(seen) == 2
    assert all(issubclass(t, Image.Image) and mode == "RGB" for t, mode in seen)


def test_torchvision_v1_transforms(db, ref):
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(24), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406],
                                                    [0.229, 0.224, 0.225])])
    ds = LMDBDataset(db, SPLIT, transform=transform, exact=True)  # the default: test_recipes
    for i in (0, 1, COUNT - 1):
        torch.manual_seed(i)
        image, label = ds[i]
        assert image.shape == (3, 24, 24) and image.dtype == torch.float32
        torch.manual_seed(i)  # the same random crop applied to ImageFolder's image
        torch.testing.assert_close(image, transform(Image.fromarray(ref.pixels[i])))
    batch, labels = next(iter(DataLoader(ds, batch_size=5)))
    assert batch.shape == (5, 3, 24, 24) and labels.tolist() == ds.targets[:5]


def test_target_transform(db, ref):
    ds = LMDBDataset(db, SPLIT, target_transform=lmdb_probes.plus_hundred)
    assert [ds[i][1] for i in range(COUNT)] == [label + 100 for label in ref.labels]
    it = LMDBIterDataset(db, SPLIT, target_transform=lmdb_probes.plus_hundred)
    assert [label for _, label in it] == [label + 100 for label in ref.labels]


def test_repr(db):
    for cls in (LMDBDataset, LMDBIterDataset):
        text = repr(cls(db, SPLIT, transform=lmdb_probes.checksum))
        assert text.startswith(f"Dataset {cls.__name__}")
        assert f"Number of datapoints: {COUNT}" in text
        assert f"Split: {SPLIT}" in text
        assert db in text and "checksum" in text
    assert "Number of datapoints: 5" in repr(LMDBIterDataset(db, SPLIT, rank=1, world_size=3))


# --------------------------------------------------------------------------- outputs


def test_tensor_output(db, ref):
    ds = LMDBDataset(db, SPLIT, output="tensor")
    for i in range(COUNT):
        image, label = ds[i]
        assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8
        height, width, _ = ref.pixels[i].shape
        assert image.shape == (3, height, width)
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), ref.pixels[i])
        assert label == ref.labels[i]


def test_numpy_output(db, ref):
    ds = LMDBDataset(db, SPLIT, output="numpy")
    for i in range(COUNT):
        image, _ = ds[i]
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8
        assert image.shape == ref.pixels[i].shape
        np.testing.assert_array_equal(image, ref.pixels[i])


def test_torchvision_v2_transforms_on_tensors(db, ref):
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomResizedCrop(24, antialias=True), v2.RandomHorizontalFlip(),
                            v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = LMDBDataset(db, SPLIT, output="tensor", transform=transform, exact=True)
    for i in range(COUNT):
        torch.manual_seed(i)
        image, _ = ds[i]
        assert image.shape == (3, 24, 24) and image.dtype == torch.float32
        torch.manual_seed(i)  # the same random crop applied to the reference pixels
        expected = transform(torch.tensor(ref.pixels[i]).permute(2, 0, 1).contiguous())
        torch.testing.assert_close(image, expected)
    batch, _ = next(iter(DataLoader(ds, batch_size=4)))
    assert batch.shape == (4, 3, 24, 24)


@pytest.mark.parametrize("kwargs, match", [
    ({"output": "cv2"}, "output must be one of 'pil', 'tensor', 'numpy', got 'cv2'"),
    ({"on_error": "ignore"}, "on_error must be one of 'raise', 'skip', got 'ignore'"),
    ({"decoder": "nvjpeg"}, "decoder must be one of .*'nvjpeg'"),
])
def test_bad_arguments(db, kwargs, match):
    for cls in (LMDBDataset, LMDBIterDataset):
        with pytest.raises(ValueError, match=match):
            cls(db, SPLIT, **kwargs)


# --------------------------------------------------------------------------- numpy mode


@pytest.mark.parametrize("output", ["pil", "numpy", "tensor"])
def test_numpy_database_pixels_equal_imagefolder(npdb, ref, output):
    ds = LMDBDataset(npdb, SPLIT, output=output)
    assert ds.imgtype == "numpy"
    assert ds.targets == ref.labels and ds.classes == ref.folder.classes
    for i in range(COUNT):
        image, label = ds[i]
        pixels = image.permute(1, 2, 0).numpy() if output == "tensor" else np.asarray(image)
        np.testing.assert_array_equal(pixels, ref.pixels[i], err_msg=f"index {i}")
        assert label == ref.labels[i]


def test_imgtype_read_and_checked(db, npdb):
    assert LMDBDataset(db, SPLIT, imgtype="jpeg").imgtype == "jpeg"
    assert LMDBIterDataset(npdb, SPLIT, imgtype="numpy").imgtype == "numpy"
    with pytest.raises(ValueError, match="imgtype='numpy'.*jpeg") as info:
        LMDBDataset(db, SPLIT, imgtype="numpy")
    assert "'numpy'" in str(info.value) and "jpeg" in str(info.value)
    with pytest.raises(ValueError, match="imgtype='jpeg'.*numpy"):
        LMDBIterDataset(npdb, SPLIT, imgtype="jpeg")


# --------------------------------------------------------------------------- decoders


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoders_give_identical_pixels(db, ref, decoder):
    ds = LMDBDataset(db, SPLIT, output="numpy", decoder=decoder)
    assert ds.decoder == decoder
    for i in range(COUNT):
        image = ds[i][0]
        assert image.flags.writeable and image.flags.c_contiguous
        np.testing.assert_array_equal(image, ref.pixels[i], err_msg=f"{decoder} {i}")


def test_turbojpeg_usable_or_refused_with_install_command(db, ref):
    if TURBO:
        ds = LMDBDataset(db, SPLIT, output="numpy", decoder="turbojpeg")
        for i in range(COUNT):
            np.testing.assert_array_equal(ds[i][0], ref.pixels[i])
    else:
        for cls in (LMDBDataset, LMDBIterDataset):
            with pytest.raises(ImportError, match="libturbojpeg0"):
                cls(db, SPLIT, decoder="turbojpeg")


def test_missing_turbojpeg_refused_at_construction(db, monkeypatch):
    def missing():
        raise OSError("Unable to locate turbojpeg library automatically")

    monkeypatch.setattr(jpeg, "_turbojpeg", missing)
    with pytest.raises(ImportError, match="libturbojpeg0"):
        LMDBDataset(db, SPLIT, decoder="turbojpeg")


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("min_size", [(16, 8), (8, 16), 16])
def test_min_size_decodes_smaller(db, ref, decoder, min_size):
    ds = LMDBDataset(db, SPLIT, output="numpy", decoder=decoder, min_size=min_size)
    want = (min_size, min_size) if isinstance(min_size, int) else min_size
    for i in range(COUNT):
        image, label = ds[i]
        full = ref.pixels[i].shape
        assert image.dtype == np.uint8 and image.shape[2] == 3
        assert image.shape[0] >= want[0] and image.shape[1] >= want[1], (i, image.shape)
        assert image.shape[0] < full[0] and image.shape[1] < full[1], (i, image.shape, full)
        assert label == ref.labels[i]


# --------------------------------------------------------------------------- iterable, in-process


def test_iter_in_process_yields_everything_in_key_order(db, ref):
    ds = LMDBIterDataset(db, SPLIT, output="numpy", transform=lmdb_probes.checksum)
    assert len(ds) == COUNT and ds.targets == ref.labels
    checks, labels = zip(*ds)
    assert list(checks) == ref.checksums and list(labels) == ref.labels


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_iter_yields_its_indices(db, ref, world_size):
    """What a rank yields is exactly the records indices() names, in that order: the windowed
    reads (one cursor scan or a batch of gets, padding duplicates included) map back right."""
    for rank in range(world_size):
        ds = LMDBIterDataset(db, SPLIT, output="numpy", transform=lmdb_probes.checksum,
                             shuffle=True, seed=5, rank=rank, world_size=world_size)
        ds.set_epoch(3)
        indices = ds.indices().tolist()
        assert len(indices) == len(ds) == -(-COUNT // world_size)
        got = list(ds)
        assert [c for c, _ in got] == [ref.checksums[i] for i in indices]
        assert [label for _, label in got] == [ref.labels[i] for i in indices]


def test_iter_same_seed_and_epoch_same_order(db):
    def order(seed, epoch):
        ds = LMDBIterDataset(db, SPLIT, output="numpy", transform=lmdb_probes.checksum,
                             shuffle=True, seed=seed)
        ds.set_epoch(epoch)
        assert ds.epoch == epoch
        return [c for c, _ in ds]

    first = order(0, 0)
    assert order(0, 0) == first
    assert sorted(first) == sorted(order(0, 1)) and order(0, 1) != first
    assert order(1, 0) != first
    unshuffled = [c for c, _ in LMDBIterDataset(db, SPLIT, output="numpy",
                                                transform=lmdb_probes.checksum)]
    assert first != unshuffled and sorted(first) == sorted(unshuffled)


# --------------------------------------------------------------------------- DataLoader workers


@pytest.mark.timeout(90)
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("context", CONTEXTS)
def test_map_dataset_in_workers(db, ref, context, persistent):
    ds = LMDBDataset(db, SPLIT, output="numpy", transform=lmdb_probes.checksum)
    assert ds[0][0] == ref.checksums[0]  # used in the main process before the workers start
    epochs = 2 if persistent else 1
    common = dict(batch_size=3, num_workers=2, multiprocessing_context=context,
                  persistent_workers=persistent)

    loader = DataLoader(ds, shuffle=False, **common)
    for _ in range(epochs):
        checks, labels = _collect(loader)
        assert labels == ref.labels
        assert checks == ref.checksums

    shuffled = DataLoader(ds, shuffle=True, generator=torch.Generator().manual_seed(0), **common)
    seen = []
    for _ in range(epochs):
        checks, labels = _collect(shuffled)
        assert sorted(checks) == sorted(ref.checksums)
        assert collections.Counter(labels) == collections.Counter(ref.labels)
        assert labels == [ref.labels[ref.index_of[c]] for c in checks]  # pairs kept
        seen.append(checks)
    assert seen[0] != ref.checksums
    # The main process still reads after its workers came and went.
    assert ds[COUNT - 1][0] == ref.checksums[-1]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("context", CONTEXTS)
def test_iter_dataset_in_workers(db, ref, context, persistent):
    ds = LMDBIterDataset(db, SPLIT, output="numpy", transform=lmdb_probes.checksum,
                         shuffle=True, seed=11)
    assert next(iter(ds))[0] in ref.index_of  # used in the main process first
    loader = DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context=context,
                        persistent_workers=persistent)
    epochs = [0, 1, 0] if persistent or context == "fork" else [0, 1]
    orders = []
    for epoch in epochs:
        ds.set_epoch(epoch)
        checks, labels = _collect(loader)
        assert sorted(checks) == sorted(ref.checksums), f"epoch {epoch}: not exactly once"
        assert labels == [ref.labels[ref.index_of[c]] for c in checks]
        orders.append(checks)
    assert orders[0] != orders[1], "set_epoch did not reach the workers"
    if len(orders) == 3:
        assert orders[2] == orders[0], "same (seed, epoch) gave another order"


@pytest.mark.timeout(60)
def test_fork_after_main_process_reads(db, ref):
    """The LMDB trap: the parent opened the environment and began a transaction, then forks;
    children must use transactions of their own and the parent must keep working."""
    ds = LMDBDataset(db, SPLIT, output="numpy", transform=lmdb_probes.checksum)
    it = LMDBIterDataset(db, SPLIT, output="numpy", transform=lmdb_probes.checksum)
    assert [ds[i][0] for i in range(COUNT)] == ref.checksums
    assert [c for c, _ in it] == ref.checksums
    for _ in range(2):
        loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="fork")
        assert _collect(loader) == (ref.checksums, ref.labels)
        loader = DataLoader(it, batch_size=4, num_workers=2, multiprocessing_context="fork")
        checks, _ = _collect(loader)
        assert sorted(checks) == sorted(ref.checksums)
    assert [ds[i][0] for i in reversed(range(COUNT))] == ref.checksums[::-1]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("cls", [LMDBDataset, LMDBIterDataset])
def test_forked_workers_read_through_environments_of_their_own(db, ref, cls, persistent):
    """py-lmdb: an environment must not be used after fork. The parent has read (its
    environment open, a transaction begun); each forked worker must open its own."""
    path = fmt.db_path(db, SPLIT)
    ds = cls(db, SPLIT, output="numpy", transform=lmdb_probes.EnvOwner(path))

    def in_main():
        samples = [ds[i] for i in range(COUNT)] if cls is LMDBDataset else list(ds)
        assert {owner for (_, _, owner), _ in samples} == {os.getpid()}
        return sorted(check for (check, _, _), _ in samples)

    assert in_main() == sorted(ref.checksums)
    loader = DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context="fork",
                        persistent_workers=persistent)
    workers = set()
    for _ in range(2):
        checks, pids, owners = [], [], []
        for (check, pid, owner), _ in loader:
            checks += check.tolist()
            pids += pid.tolist()
            owners += owner.tolist()
        assert sorted(checks) == sorted(ref.checksums)
        assert owners == pids and os.getpid() not in pids  # each worker opened its own
        workers |= set(pids)
    assert len(workers) == (2 if persistent else 4)
    assert in_main() == sorted(ref.checksums)  # the parent's environment is its own, and works


def test_a_database_replaced_with_overwrite_is_read_anew(src, tmp_path):
    """Environments are kept per file (device, inode): a dataset made after `convert
    --overwrite` in the same process reads the new file; one made before keeps the old."""
    other = tmp_path / "other"
    shutil.copytree(os.path.join(src, SPLIT, "cat"), other / SPLIT / "cat")
    dst = os.fspath(tmp_path / "dst")
    converter.convert(converter.Options(os.fspath(other), dst, SPLIT, procs=1))
    before = LMDBDataset(dst, SPLIT, output="numpy", transform=lmdb_probes.checksum)
    old = [before[i][0] for i in range(len(before))]
    assert len(old) == len(LAYOUT["cat"])
    converter.convert(converter.Options(src, dst, SPLIT, procs=1, overwrite=True))
    after = LMDBDataset(dst, SPLIT, output="numpy", transform=lmdb_probes.checksum)
    assert len(after) == COUNT and after.classes == sorted(LAYOUT)
    assert [after[i][0] for i in range(COUNT)] == Ref(src).checksums
    assert [before[i][0] for i in range(len(before))] == old  # its own file, still mapped


# --------------------------------------------------------------------------- ranks


def _ranks_yield(db, world_size, drop_last, num_workers=2):
    per_rank = []
    for rank in range(world_size):
        ds = LMDBIterDataset(db, SPLIT, output="numpy", transform=lmdb_probes.checksum,
                             shuffle=True, seed=2, rank=rank, world_size=world_size,
                             drop_last=drop_last)
        ds.set_epoch(1)
        loader = DataLoader(ds, batch_size=2, num_workers=num_workers,
                            multiprocessing_context="fork" if num_workers else None)
        checks, labels = _collect(loader)
        assert len(checks) == len(ds)
        per_rank.append(checks)
    return per_rank


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_and_workers_cover_exactly_once(db, ref, world_size):
    per_rank = _ranks_yield(db, world_size, drop_last=False)
    size = -(-COUNT // world_size)
    assert [len(c) for c in per_rank] == [size] * world_size
    union = collections.Counter(c for checks in per_rank for c in checks)
    assert set(union) == set(ref.checksums)
    padding = size * world_size - COUNT
    assert padding == (0 if COUNT % world_size == 0 else world_size - COUNT % world_size)
    assert sum(union.values()) - COUNT == padding
    assert all(n <= 2 for n in union.values())


@pytest.mark.timeout(60)
def test_ranks_drop_last(db, ref):
    per_rank = _ranks_yield(db, 3, drop_last=True)
    assert [len(c) for c in per_rank] == [COUNT // 3] * 3
    union = collections.Counter(c for checks in per_rank for c in checks)
    assert set(union.values()) == {1}
    assert len(union) == COUNT - COUNT % 3 and set(union) < set(ref.checksums)


def test_ranks_in_process(db, ref):
    """Same as with workers, num_workers=0 (rank share alone)."""
    per_rank = _ranks_yield(db, 4, drop_last=False, num_workers=0)
    assert [len(c) for c in per_rank] == [4] * 4
    union = collections.Counter(c for checks in per_rank for c in checks)
    assert set(union) == set(ref.checksums) and sum(union.values()) == 16


def test_ranks_from_torch_distributed(db, ref, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    seen = []
    for rank in range(2):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        ds = LMDBIterDataset(db, SPLIT, output="numpy", transform=lmdb_probes.checksum)
        assert len(ds) == COUNT // 2
        seen.append([c for c, _ in ds])
    assert seen[0] + seen[1] == ref.checksums


def test_pickled_for_workers_the_dataset_carries_its_rank(db, ref, monkeypatch):
    """What a spawn or forkserver worker gets: the rank of the process that pickled it, which
    the worker (no process group) cannot find itself; unpickled where no group is, too."""
    import torch.distributed as dist

    alone = pickle.dumps(LMDBIterDataset(db, SPLIT, output="numpy"))
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    ds = LMDBIterDataset(db, SPLIT, output="numpy", transform=lmdb_probes.checksum)
    pickled = pickle.dumps(ds)
    assert pickle.loads(alone)._ranks() == (1, 2)  # pickled outside a group: asks its own
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # a worker: no group
    copy = pickle.loads(pickled)
    assert copy._ranks() == (1, 2) and len(copy) == COUNT // 2
    assert [c for c, _ in copy] == ref.checksums[COUNT // 2:]
    assert ds._ranks() == (0, 1)  # the original still asks torch.distributed
    given = pickle.loads(pickle.dumps(LMDBIterDataset(db, SPLIT, rank=0, world_size=3)))
    assert given._ranks() == (0, 3)


@pytest.mark.parametrize("shuffle", [False, True])
def test_map_dataset_with_distributed_sampler(db, ref, shuffle):
    ds = LMDBDataset(db, SPLIT, output="numpy", transform=lmdb_probes.checksum)
    got = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=shuffle, seed=4)
        sampler.set_epoch(1)
        checks, labels = _collect(DataLoader(ds, batch_size=3, sampler=sampler))
        assert len(checks) == len(sampler) == COUNT // 2
        assert labels == [ref.labels[ref.index_of[c]] for c in checks]
        got += checks
    assert sorted(got) == sorted(ref.checksums)


# --------------------------------------------------------------------------- shuffled mapping


def test_map_shuffle_is_a_reproducible_permutation(db, ref):
    def make(seed):
        return LMDBDataset(db, SPLIT, output="numpy", transform=lmdb_probes.checksum,
                           shuffle=True, seed=seed)

    a, b, c = make(0), make(0), make(1)
    assert a.targets == b.targets
    assert [a[i][0] for i in range(COUNT)] == [b[i][0] for i in range(COUNT)]
    checks = [a[i][0] for i in range(COUNT)]
    assert sorted(checks) == sorted(ref.checksums) and checks != ref.checksums
    assert [c[i][0] for i in range(COUNT)] != checks
    for ds in (a, c):
        for i in range(COUNT):
            check, label = ds[i]
            assert ds.targets[i] == label == ref.labels[ref.index_of[check]]
    assert sorted(a.targets) == sorted(ref.labels)


# --------------------------------------------------------------------------- bad databases


@pytest.mark.parametrize("cls", [LMDBDataset, LMDBIterDataset])
def test_missing_database(tmp_path, cls):
    with pytest.raises(DatabaseError, match=r"train\.lmdb does not exist; make it with "
                                            r"`fastlmdb convert`"):
        cls(tmp_path / "nowhere", SPLIT)


@pytest.mark.parametrize("content", [b"x", b"not an lmdb file\n" * 500,
                                     bytes(range(256)) * 64])
def test_file_that_is_not_lmdb(tmp_path, content):
    (tmp_path / "train.lmdb").write_bytes(content)
    with pytest.raises(DatabaseError, match=r"train\.lmdb is not an LMDB database"):
        LMDBDataset(tmp_path, SPLIT)


def test_empty_file(tmp_path):
    (tmp_path / "train.lmdb").write_bytes(b"")
    with pytest.raises(DatabaseError, match=r"train\.lmdb is empty \(0 bytes\).*copy it again"):
        LMDBDataset(tmp_path, SPLIT)


def test_plain_lmdb_file(tmp_path):
    env = lmdb.open(os.fspath(tmp_path / "train.lmdb"), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    with pytest.raises(DatabaseError, match=r"train\.lmdb is an LMDB file but not a fastlmdb "
                                            r"database \(no 'meta' table\)"):
        LMDBIterDataset(tmp_path, SPLIT)


def test_incomplete_conversion(tmp_path):
    (tmp_path / "train.lmdb.partial").write_bytes(b"")
    with pytest.raises(IncompleteDatabaseError, match=r"not finished.*partial.*resume"):
        LMDBDataset(tmp_path, SPLIT)


def test_missing_final_metadata(db, tmp_path):
    dst = _copy_db(db, tmp_path)
    env = lmdb.open(fmt.db_path(dst, SPLIT), subdir=False, max_dbs=3)
    with env.begin(write=True, db=env.open_db(fmt.META_DB)) as txn:
        assert txn.delete(fmt.INFO_KEY)
    env.close()
    with pytest.raises(IncompleteDatabaseError, match="did not finish.*resume"):
        LMDBDataset(dst, SPLIT)


def test_newer_format_says_upgrade(db, tmp_path):
    dst = _copy_db(db, tmp_path)
    info = json.loads(bytes(_edit(dst, fmt.META_DB, fmt.INFO_KEY, b"{}")))
    assert info["version"] == fmt.FORMAT_VERSION
    _edit(dst, fmt.META_DB, fmt.INFO_KEY, json.dumps({**info, "version": 999}).encode())
    with pytest.raises(DatabaseError, match=r"format version 999, newer than this fastlmdb "
                                            r"reads \(2\): upgrade"):
        LMDBDataset(dst, SPLIT)


def _corrupt(db, tmp_path, index, garbage=b"\x00garbage" * 40):
    key = int(store.read_file_catalog(fmt.db_path(db, SPLIT))[1]["key"][index])  # record index's
    dst = _copy_db(db, tmp_path)
    _edit(dst, fmt.IMAGES_DB, fmt.key(key), garbage)
    return dst


@pytest.mark.parametrize("decoder", DECODERS)
def test_corrupt_record_raises_decode_error(db, ref, tmp_path, decoder):
    index = 6  # dog
    dst = _corrupt(db, tmp_path, index)
    ds = LMDBDataset(dst, SPLIT, decoder=decoder)
    np.testing.assert_array_equal(np.asarray(ds[index - 1][0]), ref.pixels[index - 1])
    with pytest.raises(DecodeError, match=r"train record 6 \(class 'dog'\) of .*train\.lmdb "
                                          r"could not be decoded") as info:
        ds[index]
    assert "on_error='skip'" in str(info.value)
    it = LMDBIterDataset(dst, SPLIT, decoder=decoder)
    with pytest.raises(DecodeError, match=r"train record 6 \(class 'dog'\)"):
        list(it)
    with pytest.raises(DecodeError, match=r"train record 6 \(class 'dog'\)"):
        list(DataLoader(LMDBDataset(dst, SPLIT, output="tensor", decoder=decoder),
                        batch_size=4, collate_fn=list))  # batched reads (__getitems__)


def test_corrupt_record_skipped(db, ref, tmp_path):
    index = 6
    dst = _corrupt(db, tmp_path, index)
    ds = LMDBDataset(dst, SPLIT, output="numpy", on_error="skip")
    assert ds.errors == 0
    image, label = ds[index]
    np.testing.assert_array_equal(image, ref.pixels[index + 1])  # the next decodable one
    assert label == ref.labels[index + 1]
    assert ds.errors == 1
    np.testing.assert_array_equal(ds[0][0], ref.pixels[0])
    assert ds.errors == 1

    batched = LMDBDataset(dst, SPLIT, output="numpy", transform=lmdb_probes.checksum,
                          on_error="skip")
    checks, labels = _collect(DataLoader(batched, batch_size=4))  # batched reads
    expected = list(range(COUNT))
    expected[index] = index + 1
    assert checks == [ref.checksums[i] for i in expected]
    assert labels == [ref.labels[i] for i in expected]
    assert batched.errors == 1

    it = LMDBIterDataset(dst, SPLIT, output="numpy", transform=lmdb_probes.checksum,
                         on_error="skip")
    checks = [c for c, _ in it]
    assert checks == ref.checksums[:index] + ref.checksums[index + 1:]
    assert it.errors == 1


def test_corrupt_numpy_record(npdb, tmp_path):
    dst = _corrupt(npdb, tmp_path, 13, garbage=b"\x01" * 10)
    ds = LMDBDataset(dst, SPLIT)
    with pytest.raises(DecodeError, match=r"train record 13 \(class 'fish'\).*10 bytes stored"):
        ds[13]
    skipping = LMDBDataset(dst, SPLIT, output="numpy", on_error="skip")
    assert skipping[13][0].shape == skipping[0][0].shape  # wrapped around to record 0
    assert skipping.errors == 1


# --------------------------------------------------------------------------- pickling


@pytest.mark.parametrize("cls", [LMDBDataset, LMDBIterDataset])
def test_pickle_before_and_after_reading(db, ref, cls):
    ds = cls(db, SPLIT, output="numpy", transform=lmdb_probes.checksum, shuffle=True)
    if cls is LMDBIterDataset:
        ds.set_epoch(2)
    before = pickle.loads(pickle.dumps(ds))
    expected = [ds[i][0] for i in range(COUNT)] if cls is LMDBDataset else [c for c, _ in ds]
    after = pickle.loads(pickle.dumps(ds))  # now holds an open transaction: not pickled
    for copy in (before, after):
        if cls is LMDBIterDataset:
            copy.set_epoch(2)  # `after` was pickled after an iteration: it would go on to 3
        got = ([copy[i][0] for i in range(COUNT)] if cls is LMDBDataset
               else [c for c, _ in copy])
        assert got == expected
        assert sorted(got) == sorted(ref.checksums)
    assert ds._reader._txn is not None and after._reader._pid is not None


def test_reader_close_and_reopen(db):
    reader = store.Reader(fmt.db_path(db, SPLIT))
    first = bytes(reader.get(0))
    assert bytes(reader.read_range(0, 3)[0]) == first
    reader.close()
    assert bytes(reader.get(0)) == first  # reopened on demand
    with pytest.raises(DatabaseError, match="record 99 is missing"):
        reader.get(99)
    with pytest.raises(DatabaseError, match="records 10..99 are not all there"):
        reader.read_range(10, 100)
    reader.close()

"""The write order (records shuffled at conversion, indices ImageFolder's), the mapped
per-sample tables and the drop-in `samples`/`imgs`."""

import os
import re
import shutil

import lmdb
import numpy as np
import pytest
import torch

from fastlmdb import LMDBDataset, LMDBIterDataset, cli
from fastlmdb.core import catalog, store
from fastlmdb.core import format as fmt
from fastlmdb.core.errors import ConversionError
from fastlmdb.loading import order
import helpers
from helpers import add_bad_files, db, imagefolder, make_tree, plain_layout, read_db, run_convert

from probes import memory_probe

CONTEXTS = helpers.START_METHODS


def distinct_per_batch(labels, batch=256):
    """Mean number of distinct labels in each whole batch of `labels`."""
    batches = np.sort(labels[:len(labels) // batch * batch].reshape(-1, batch), axis=1)
    return float(np.mean((np.diff(batches, axis=1) != 0).sum(axis=1) + 1))


def test_shuffled_write_order_mixes_imagenet_shaped_batches():
    """On ImageNet's shape (1,000 classes of 1,281, stored class by class), the write order
    composed with the block/window shuffle gives batches nearly as mixed as a uniform shuffle."""
    labels = np.repeat(np.arange(1000, dtype=np.int32), 1281)
    count = len(labels)
    written = labels[fmt.write_order(count, "shuffled", 0)]  # label of each key
    epoch = order.epoch_order(count, shuffle=True, seed=0, epoch=0)  # keys, as read
    uniform = distinct_per_batch(labels[np.random.default_rng(1).permutation(count)])
    mixed = distinct_per_batch(written[epoch])
    class_sorted = distinct_per_batch(labels[epoch])  # --order source
    assert uniform > 220
    assert mixed >= 0.9 * uniform, (mixed, uniform)
    assert class_sorted < 20, class_sorted


def test_write_order_is_a_pure_function_of_seed_and_count():
    first = fmt.write_order(1000, "shuffled", 7)
    assert np.array_equal(first, fmt.write_order(1000, "shuffled", 7))
    assert sorted(first.tolist()) == list(range(1000))
    assert not np.array_equal(first, fmt.write_order(1000, "shuffled", 8))
    assert fmt.write_order(5, "source", 7).tolist() == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("order-src"), plain_layout(classes=4, train=20, val=0))


@pytest.fixture(scope="module")
def shuffled(tree, tmp_path_factory):
    dst = tmp_path_factory.mktemp("shuffled")
    run_convert(tree, dst)
    return os.fspath(dst)


def test_indices_stay_imagefolders_while_keys_are_shuffled(tree, shuffled):
    split_dir = os.path.join(tree, "train")
    reference = imagefolder(split_dir)
    info, rows, values = read_db(db(shuffled))
    assert (info["order"], info["order_seed"]) == ("shuffled", 0)
    assert rows["key"].tolist() != list(range(80))  # written in another order
    assert sorted(rows["key"].tolist()) == list(range(80))
    for (path, target), value, row in zip(reference.samples, values, rows):
        assert value == open(path, "rb").read() and row["label"] == target
    ds = LMDBDataset(shuffled, "train", output="numpy")
    assert ds.targets == reference.targets and ds.classes == reference.classes
    assert ds.class_to_idx == reference.class_to_idx


def test_iterable_reads_the_write_order_and_yields_logical_indices(shuffled):
    ds = LMDBIterDataset(shuffled, "train", output="numpy", shuffle=True)
    keys = ds._keys(ds.indices())
    window = order.BLOCK * order.WINDOW_BLOCKS
    for start in range(0, len(keys), window):  # each window a contiguous range of keys
        piece = np.sort(keys[start:start + window])
        assert piece.tolist() == list(range(piece[0], piece[0] + len(piece)))
    expected = [ds.targets[i] for i in ds.indices().tolist()]  # indices() is the next pass's
    labels = [label for _, label in ds]
    assert labels == expected
    assert sorted(labels) == sorted(ds.targets)
    plain = LMDBIterDataset(shuffled, "train", output="numpy")
    assert plain.indices().tolist() == list(range(80))  # shuffle=False: ImageFolder's order
    assert [label for _, label in plain] == plain.targets


def test_source_order_keeps_keys_and_warns_when_shuffled(tree, tmp_path, capsys):
    assert cli.main(["convert", "--from_dir", tree, "--to_dir", os.fspath(tmp_path),
                     "--split", "train", "--order", "source", "--procs", "1"]) == 0
    info, rows, _ = read_db(db(tmp_path))
    assert info["order"] == "source" and rows["key"].tolist() == list(range(80))
    capsys.readouterr()
    assert cli.main(["info", db(tmp_path)]) == 0
    assert "stored in source order" in capsys.readouterr().out
    with pytest.warns(UserWarning, match=r"class order.*Convert it again without --order "
                                         r"source.*EpochSampler"):
        LMDBIterDataset(tmp_path, "train", shuffle=True)


def test_no_warning_for_a_shuffled_database(shuffled, recwarn):
    LMDBIterDataset(shuffled, "train", shuffle=True)
    assert not [w for w in recwarn if "class order" in str(w.message)]


def test_order_flags_are_checked_and_shown(tree, tmp_path, capsys):
    with pytest.raises(ValueError, match="--order must be one of shuffled, source, got 'x'"):
        run_convert(tree, tmp_path, order="x")
    with pytest.raises(ValueError, match="--order-seed must be a whole number >= 0"):
        run_convert(tree, tmp_path, order_seed=-1)
    assert cli.main(["convert", "--from_dir", tree, "--to_dir", os.fspath(tmp_path),
                     "--split", "train", "--order-seed", "5", "--procs", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["info", db(tmp_path)]) == 0
    assert "stored in shuffled order (seed 5)" in capsys.readouterr().out
    rows = read_db(db(tmp_path))[1]
    assert rows["key"].tolist() == np.argsort(fmt.write_order(80, "shuffled", 5)).tolist()


@pytest.mark.parametrize("flag, options, message", [
    ("--order", {"order": "source"}, "--order shuffled, this run asks for source"),
    ("--order-seed", {"order_seed": 3}, "--order-seed 0, this run asks for 3"),
])
@pytest.mark.slow
def test_resume_with_another_order_is_refused_naming_the_flag(tmp_path, flag, options,
                                                              message):
    src = make_tree(tmp_path / "src", plain_layout(classes=2, train=20, val=0))
    add_bad_files(os.path.join(src, "train", "n00000001"), kinds=["text"])
    with pytest.raises(ConversionError):
        run_convert(src, tmp_path / "dst", batch_bytes=1)
    with pytest.raises(ConversionError, match=re.escape(message) + ".*--overwrite"):
        run_convert(src, tmp_path / "dst", on_error="skip", **options)
    stats = run_convert(src, tmp_path / "dst", on_error="skip")  # the same order resumes
    assert stats.resumed_at > 0 and stats.images == 40 and len(stats.skipped) == 1


def test_sharded_and_merged_keep_the_write_order(tree, shuffled, tmp_path):
    from fastlmdb.tools import merge

    run_convert(tree, tmp_path, shards=3)
    one_info, one_rows, one_values = read_db(db(shuffled))
    info, rows, values = read_db(db(tmp_path))
    assert values == one_values and np.array_equal(rows, one_rows)
    assert info["order"] == "shuffled"
    mapped_info, mapped, logical = catalog.read_tables(db(tmp_path))
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, one_rows)
    assert np.array_equal(logical, fmt.logical_of_keys(one_rows))
    ds = LMDBDataset(tmp_path, "train", output="numpy")
    assert ds.samples == LMDBDataset(shuffled, "train").samples
    merged = merge.merge(db(tmp_path), os.fspath(tmp_path / "merged.lmdb"))
    merged_info, merged_rows, merged_values = read_db(merged)
    assert merged_values == one_values and np.array_equal(merged_rows, one_rows)
    assert store.read_file_paths(merged) == store.read_file_paths(db(shuffled))


@pytest.mark.parametrize("shards", [1, 2])
def test_samples_and_imgs_are_imagefolders(tree, tmp_path, shards):
    run_convert(tree, tmp_path, shards=shards)
    reference = imagefolder(os.path.abspath(os.path.join(tree, "train")))
    ds = LMDBDataset(tmp_path, "train")
    assert ds.samples == reference.samples and ds.imgs == reference.imgs
    assert LMDBIterDataset(tmp_path, "train").samples == reference.samples
    shuffled = LMDBDataset(tmp_path, "train", shuffle=True, seed=2)
    assert shuffled.samples == [reference.samples[i] for i in shuffled._index.tolist()]
    assert [target for _, target in shuffled.samples] == shuffled.targets


def _as_version_1(path):
    """Rewrite a source-order database as version 1 wrote it: no key column, no key index,
    no paths."""
    env = lmdb.open(path, subdir=False, max_dbs=3, lock=False)
    try:
        meta = env.open_db(fmt.META_DB)
        with env.begin(write=True, db=meta) as txn:
            info = fmt.load_json(txn.get(fmt.INFO_KEY), "info", path)
            rows = fmt.load_table(txn.get(fmt.TABLE_KEY), info["count"], path)
            old = np.empty(len(rows), fmt.ROW)
            for name in fmt.ROW.names:
                old[name] = rows[name]
            txn.put(fmt.TABLE_KEY, fmt.dump_table(old, fmt.ROW))
            info = {k: v for k, v in info.items() if k not in ("order", "order_seed")}
            txn.put(fmt.INFO_KEY, fmt.dump_json({**info, "version": 1}))
            txn.delete(fmt.LOGICAL_KEY)
            txn.delete(fmt.PATHS_KEY)
    finally:
        env.close()


def test_version_1_databases_still_read(tree, tmp_path):
    run_convert(tree, tmp_path / "v2", order="source")
    os.makedirs(tmp_path / "v1")
    shutil.copyfile(db(tmp_path / "v2"), db(tmp_path / "v1"))
    _as_version_1(db(tmp_path / "v1"))
    new = LMDBDataset(tmp_path / "v2", "train", output="numpy")
    old = LMDBDataset(tmp_path / "v1", "train", output="numpy")
    assert old.targets == new.targets
    assert all(np.array_equal(old[i][0], new[i][0]) for i in (0, 17, 79))
    with pytest.warns(UserWarning, match="class order"):  # version 1 is always source order
        it = LMDBIterDataset(tmp_path / "v1", "train", output="numpy", shuffle=True)
    assert sorted(label for _, label in it) == sorted(new.targets)
    with pytest.raises(AttributeError, match="does not record its source paths.*convert it"):
        old.samples


# --------------------------------------------------------------------- worker memory


def _tiny_database(root, count):
    """A numpy-mode database of `count` 1x1 records, written directly (nothing to decode)."""
    path = fmt.db_path(root, "train")
    os.makedirs(root, exist_ok=True)
    rows = np.zeros(count, fmt.ROW)
    rows["label"] = np.arange(count) % 10
    rows["height"] = rows["width"] = 1
    rows["nbytes"] = 3
    rows["source"] = np.arange(count)
    writer = store.Writer(path, map_size=1 << 30)
    for first in range(0, count, 50_000):
        part = rows[first:first + 50_000]
        writer.commit(first, [b"\x01\x02\x03"] * len(part), part, {})
    table = np.empty(count, fmt.TABLE)
    for name in fmt.ROW.names:
        table[name] = rows[name]
    table["key"] = np.arange(count)
    info = {"format": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION, "imgtype": "numpy",
            "count": count, "classes": [str(c) for c in range(10)],
            "class_to_idx": {str(c): c for c in range(10)}, "source": os.fspath(root),
            "split": "train", "transcoded": [], "skipped": [], "resized": 0, "max_size": 0,
            "quality": 90, "bytes_in": 0, "made_by": "a test", "started": 0, "finished": 0,
            "order": "source"}
    writer.commit(count, [], rows[:0], {fmt.TABLE_KEY: fmt.dump_table(table),
                                        fmt.LOGICAL_KEY: fmt.dump_table(table["key"], "<u4"),
                                        fmt.INFO_KEY: info})
    writer.close()
    return root


def _worker_private_dirty(root, context):
    """Private_Dirty of a DataLoader worker after it read a few samples."""
    ds = LMDBDataset(root, "train", output="numpy", transform=memory_probe.private_dirty)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1,
                                         multiprocessing_context=context,
                                         sampler=[0, 1, len(ds) - 1])
    return max(int(dirty) for dirty, _ in loader)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("context", CONTEXTS)
def test_worker_memory_does_not_grow_with_the_database(tmp_path, context):
    small = _worker_private_dirty(_tiny_database(tmp_path / "small", 2_000), context)
    large = _worker_private_dirty(_tiny_database(tmp_path / "large", 300_000), context)
    # A copy of the record table alone would cost 29 bytes x 298,000 more records = 8.6 MB in
    # the large database's worker (the int64 labels and shapes copies it used to make, 5.7 MB
    # more). Mapped, the table costs no private memory: 2 MB leaves room for allocator noise.
    assert large - small < 2 << 20, (small, large)

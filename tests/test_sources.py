"""Parquet shards (Hugging Face layout) and WebDataset shards through --from-archive: the
database equals the tree of the same images (bytes, labels, classes), with every rule of the
tree; bad inputs get one message naming the file and what to do."""

import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

import helpers
import shard_writers
from fastlmdb import converter
from fastlmdb.cli import main
from fastlmdb.core.errors import ConversionError
from fastlmdb.tools import verify


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    """(SRC/train of awkward files, classes .txt, (info, rows, values) of its tree database)."""
    root = tmp_path_factory.mktemp("awkward")
    src = helpers.make_tree(root / "src", helpers.AWKWARD_LAYOUT)
    stats = helpers.run_convert(src, root / "ref", procs=2)
    names = root / "classes.txt"
    names.write_text("n00000000\nn00000001\nn00000002\n")
    return os.path.join(src, "train"), str(names), helpers.read_db(stats.path)


def convert(pattern, dst, **options):
    options.setdefault("procs", 1)
    return converter.convert(converter.Options(None, os.fspath(dst), "train",
                                               from_archive=os.fspath(pattern), **options))


def assert_same_as_tree(stats, tree_db, order):
    ref_info, ref_rows, ref_values = tree_db
    info, rows, values = helpers.read_db(stats.path)
    assert values == ref_values  # same bytes, index for index (CMYK, PNG: the same transcode)
    for field in ("label", "height", "width", "transcoded"):
        assert np.array_equal(rows[field], ref_rows[field])
    assert info["classes"] == ref_info["classes"]
    assert info["order"] == order
    assert len(info["warnings"]) == len(ref_info["warnings"])


@pytest.mark.parametrize("order, stored", [("shuffled", "row-groups"), ("source", "source")])
def test_parquet_equals_tree(awkward, tmp_path, order, stored):
    split, _, tree_db = awkward
    shard_writers.parquet_from_tree(split, tmp_path / "data", files=2, rows_per_group=3)
    stats = convert(tmp_path / "data" / "train-*.parquet", tmp_path / "dst", order=order)
    assert_same_as_tree(stats, tree_db, stored)
    assert not verify.verify(stats.path, source=tmp_path / "data").problems


def test_parquet_write_order_is_row_group_by_row_group(awkward, tmp_path):
    split, _, _ = awkward
    shard_writers.parquet_from_tree(split, tmp_path / "data", files=1, rows_per_group=4)
    stats = convert(tmp_path / "data", tmp_path / "dst")
    _, rows, _ = helpers.read_db(stats.path)
    by_key = rows["source"][np.argsort(rows["key"])]  # source rows in the order written
    groups = by_key // 4
    assert sorted(by_key.tolist()) == list(range(len(rows)))
    # each row group is written whole, the groups out of order
    assert (np.diff(groups) != 0).sum() == len(set(groups.tolist())) - 1
    assert groups.tolist() != sorted(groups.tolist())


def test_parquet_cli_flags_sharded_and_unlabeled(awkward, tmp_path):
    split, _, tree_db = awkward
    items, classes = shard_writers.tree_items(split)
    shard_writers.write_parquet([(d, lab, n) for d, lab, n in items], tmp_path / "a.parquet",
                                classes=classes, image="jpg", label="y", rows_per_group=4)
    dst = tmp_path / "dst"
    assert main(["convert", "--from-archive", str(tmp_path / "a.parquet"), "--to-dir",
                 str(dst), "--split", "train", "--image-column", "jpg", "--label-column",
                 "y", "--shards", "2", "--procs", "1"]) == 0
    info, rows, values = helpers.read_db(helpers.db(dst))
    assert values == tree_db[2] and np.array_equal(rows["label"], tree_db[1]["label"])
    unlabeled = [(d, -1, n) for d, _, n in items[:3]]
    shard_writers.write_parquet(unlabeled, tmp_path / "test.parquet", classes=classes)
    with pytest.raises(ConversionError, match=r"test\.parquet: row 0 \(row group 0\) has "
                                              r"label -1.*--unlabeled"):
        convert(tmp_path / "test.parquet", tmp_path / "t")
    stats = convert(tmp_path / "test.parquet", tmp_path / "t", unlabeled=True)
    _, rows, values = helpers.read_db(stats.path)
    assert rows["label"].tolist() == [-1] * 3 and values == tree_db[2][:3]
    assert not verify.verify(stats.path, source=tmp_path / "test.parquet").problems


def test_parquet_row_without_bytes_reads_its_path(awkward, tmp_path):
    split, _, tree_db = awkward
    items, classes = shard_writers.tree_items(split)
    os.makedirs(tmp_path / "data" / "images")
    shutil.copy(os.path.join(split, "n00000000", "a_plain.JPEG"), tmp_path / "data" / "images")
    items[0] = (None, items[0][1], "images/a_plain.JPEG")  # the tree's first file
    shard_writers.write_parquet(items, tmp_path / "data" / "x.parquet", classes=classes)
    stats = convert(tmp_path / "data" / "x.parquet", tmp_path / "dst")
    assert helpers.read_db(stats.path)[2] == tree_db[2]


def test_parquet_bad_rows_follow_on_error_and_resume(awkward, tmp_path):
    split, _, tree_db = awkward
    items, classes = shard_writers.tree_items(split)
    good = list(items)
    items[7] = (b"this is no image", items[7][1], items[7][2])
    shard_writers.write_parquet(items, tmp_path / "x.parquet", classes=classes,
                                rows_per_group=3)
    with pytest.raises(ConversionError, match=r"x\.parquet#7 in .*x\.parquet \(row group 2\): "
                                              r"not a readable image.*--on-error skip"):
        convert(tmp_path / "x.parquet", tmp_path / "dst", order="source", batch_bytes=1)
    skipped = convert(tmp_path / "x.parquet", tmp_path / "skip", on_error="skip")
    assert skipped.images == len(items) - 1 and "x.parquet#7" in skipped.skipped[0][0]
    # the file mended in place (same rows, same row groups): the run resumes after row 6
    shard_writers.write_parquet(good, tmp_path / "x.parquet", classes=classes, rows_per_group=3)
    stats = convert(tmp_path / "x.parquet", tmp_path / "dst", order="source", batch_bytes=1)
    assert stats.resumed_at == 7
    assert helpers.read_db(stats.path)[2] == tree_db[2]


def test_parquet_bad_inputs_named(awkward, tmp_path):
    split, names, _ = awkward
    items, classes = shard_writers.tree_items(split)
    table = pa.table({"label": pa.array([0, 1], pa.int64())})
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "noimage.parquet")
    with pytest.raises(ConversionError, match=r"noimage\.parquet has no image column.*"
                                              r"--image-column"):
        convert(tmp_path / "noimage.parquet", tmp_path / "d")
    shard_writers.write_parquet([(d, str(lab), n) for d, lab, n in items[:2]],
                                tmp_path / "strings.parquet", label_type=pa.string())
    with pytest.raises(ConversionError, match=r"label column 'label' of .*strings\.parquet "
                                              r"holds string.*ClassLabel"):
        convert(tmp_path / "strings.parquet", tmp_path / "d")
    whole = shard_writers.write_parquet(items, tmp_path / "cut.parquet", classes=classes)
    with open(whole, "r+b") as file:
        file.truncate(os.path.getsize(whole) // 2)
    with pytest.raises(ConversionError, match=r"cut\.parquet is not a readable parquet file"
                                              r".*download it again"):
        convert(tmp_path / "cut.parquet", tmp_path / "d")
    shard_writers.write_parquet([(d, 5, n) for d, _, n in items[:4]],
                                tmp_path / "range.parquet", rows_per_group=2)
    with pytest.raises(ConversionError, match=r"range\.parquet: row 0 \(row group 0\) has "
                                              r"label 5, outside the 3 classes"):
        convert(tmp_path / "range.parquet", tmp_path / "d", classes_from=names)
    with pytest.raises(ConversionError, match=r"no file matches .*nothing-\*\.parquet.*quote"):
        convert(tmp_path / "nothing-*.parquet", tmp_path / "d")
    assert not os.path.exists(tmp_path / "d")  # nothing half-written


def test_parquet_without_class_names_uses_classes_from_or_values(awkward, tmp_path):
    split, names, tree_db = awkward
    items, _ = shard_writers.tree_items(split)
    shard_writers.write_parquet(items, tmp_path / "x.parquet", classes=None)
    assert helpers.read_db(convert(tmp_path / "x.parquet", tmp_path / "a").path)[0][
        "classes"] == ["0", "1", "2"]
    stats = convert(tmp_path / "x.parquet", tmp_path / "b", classes_from=names)
    assert helpers.read_db(stats.path)[0]["classes"] == tree_db[0]["classes"]


@pytest.mark.parametrize("compression, order", [(None, "shuffled"), ("gz", "archive")])
def test_webdataset_equals_tree(awkward, tmp_path, compression, order):
    split, names, tree_db = awkward
    shard_writers.wds_from_tree(split, tmp_path / "wds", shards=3, compression=compression,
                                label_first=True)
    suffix = ".tar.gz" if compression else ".tar"
    stats = convert(tmp_path / "wds" / f"shard-{{0000..0002}}{suffix}", tmp_path / "dst",
                    classes_from=names)
    assert_same_as_tree(stats, tree_db, order)
    if not compression:
        assert not verify.verify(stats.path, source=tmp_path / "wds").problems


def test_webdataset_one_shard_and_info_json(awkward, tmp_path):
    split, _, tree_db = awkward
    (shard,) = shard_writers.wds_from_tree(split, tmp_path / "wds", shards=1)
    (tmp_path / "wds" / "_info.json").write_text(
        '{"classes": ["n00000000", "n00000001", "n00000002"]}')
    stats = convert(shard, tmp_path / "dst")
    assert_same_as_tree(stats, tree_db, "shuffled")


def test_webdataset_bad_keys_named(awkward, tmp_path):
    split, names, _ = awkward
    items, _ = shard_writers.tree_items(split)
    data = items[0][0]
    shard_writers.write_wds([("a", {"jpg": data, "cls": b"0"}), ("b", {"jpg": data}),
                             ("c", {"json": b"{}", "cls": b"1"})], tmp_path / "bad.tar")
    with pytest.raises(ConversionError, match=r"key b in .*bad\.tar: no label.*key c in "
                                              r".*bad\.tar: no image.*--on-error skip"):
        convert(tmp_path / "bad.tar", tmp_path / "d", classes_from=names)
    stats = convert(tmp_path / "bad.tar", tmp_path / "d", classes_from=names, on_error="skip")
    assert stats.images == 1
    shard_writers.write_wds([("a", {"jpg": data, "cls": b"7"})], tmp_path / "range.tar")
    with pytest.raises(ConversionError, match=r"a\.jpg in .*range\.tar has label 7, outside "
                                              r"the 3 classes"):
        convert(tmp_path / "range.tar", tmp_path / "e", classes_from=names)


def test_patterns_expand_braces_globs_and_folders(tmp_path):
    from fastlmdb.sources import patterns

    for name in ("a-0008.tar", "a-0009.tar", "a-0010.tar", "b-0.parquet", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    names = lambda found: [os.path.basename(path) for path in found]  # noqa: E731
    assert names(patterns.expand(str(tmp_path / "a-{0008..0010}.tar"))) == \
        ["a-0008.tar", "a-0009.tar", "a-0010.tar"]
    assert names(patterns.expand(str(tmp_path / "{a-0009,b-0}.*"))) == \
        ["a-0009.tar", "b-0.parquet"]
    assert names(patterns.expand(str(tmp_path / "a-*.tar"))) == \
        ["a-0008.tar", "a-0009.tar", "a-0010.tar"]
    assert names(patterns.expand(str(tmp_path))) == \
        ["a-0008.tar", "a-0009.tar", "a-0010.tar", "b-0.parquet"]
    with pytest.raises(ConversionError, match=r"no file matches .*c-\{1\.\.2\}\.tar"):
        patterns.expand(str(tmp_path / "c-{1..2}.tar"))

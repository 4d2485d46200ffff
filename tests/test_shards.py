"""Sharded databases: K shard files and an index read exactly like one file, merged into one
file, resumed, refused when asked differently, and made on a real dask cluster."""

import json
import logging
import os

import numpy as np
import pytest
import torch
from helpers import (AWKWARD_LAYOUT, assert_same_database, db, make_tree, read_db, run_convert,
                     without_times)

from fastlmdb import LMDBDataset, LMDBIterDataset
from fastlmdb import cli
from fastlmdb.core import catalog, store
from fastlmdb.tools import merge, verify
from fastlmdb.core import format as fmt
from fastlmdb.core.errors import ConversionError, DatabaseError, IncompleteDatabaseError

LAYOUT = {"train": {**AWKWARD_LAYOUT["train"], "n00000003": 9}}  # 22 images, 4 classes


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards-src")
    make_tree(root, LAYOUT)
    # A file no loader reads, in the middle of a shard: skipped, and the order still matches.
    with open(os.path.join(root, "train", "n00000002", "bb_text.JPEG"), "wb") as file:
        file.write(b"not an image")
    return os.fspath(root)


@pytest.fixture(scope="module")
def single(source, tmp_path_factory):
    """The one-file database every sharded one must equal."""
    dst = tmp_path_factory.mktemp("single")
    run_convert(source, dst, on_error="skip")
    return db(dst)


def assert_same_as_single(path, single):
    info, rows, values = read_db(path)
    ref_info, ref_rows, ref_values = read_db(single)
    assert values == ref_values
    assert np.array_equal(rows, ref_rows)
    assert {k: v for k, v in without_times(info).items() if k != "shards"} == \
        without_times(ref_info)


# 30 > files: some shards are empty
@pytest.mark.parametrize("count", [2, pytest.param(3, marks=pytest.mark.slow),
                                   pytest.param(30, marks=pytest.mark.slow)])
def test_sharded_split_reads_as_the_one_file_database(source, single, dst, count):
    stats = run_convert(source, dst, on_error="skip", shards=count)
    path = db(dst)
    assert os.path.isdir(path) and not os.path.exists(fmt.partial_path(path))
    names = sorted(name for name in os.listdir(path) if name.endswith(".lmdb"))
    assert names == [fmt.shard_file("train", k, count) for k in range(count)]
    assert_same_as_single(path, single)
    assert catalog.read_catalog(path)[0]["shards"] == count
    ref_info = read_db(single)[0]
    assert (stats.images, stats.skipped, stats.transcoded) == \
        (ref_info["count"], ref_info["skipped"], ref_info["transcoded"])


@pytest.mark.slow
def test_each_shard_is_a_database_of_its_own(source, dst):
    run_convert(source, dst, on_error="skip", shards=3)
    index = catalog.read_index(db(dst))
    first = 0
    for k, entry in enumerate(index["shards"]):
        info, rows, values = read_db(os.path.join(db(dst), entry["file"]))
        assert info["shard"] == {"index": k, "count": 3, "first_source": entry["first_source"],
                                 "files": info["count"] + len(info["skipped"])}
        assert len(values) == info["count"] == entry["count"]
        report = verify.verify(os.path.join(db(dst), entry["file"]),
                               source=os.path.join(source, "train"))
        assert report.ok and report.records == entry["count"], report.problems
        # Shard k holds the k-th range of the split's write order (not of its source order).
        order = fmt.write_order(index["plan"]["files"], "shuffled", 0)
        start = entry["first_source"]
        assert set(rows["source"].tolist()) <= set(order[start:start + info["shard"]["files"]])
        assert sorted(rows["key"].tolist()) == list(range(info["count"]))
        first += entry["count"]
    assert first == index["count"]


@pytest.mark.slow
def test_numpy_shards_equal_numpy_one_file(source, tmp_path):
    run_convert(source, tmp_path / "one", on_error="skip", save_as="numpy")
    run_convert(source, tmp_path / "sharded", on_error="skip", save_as="numpy", shards=2)
    assert_same_as_single(db(tmp_path / "sharded"), db(tmp_path / "one"))


def test_datasets_open_a_sharded_split_like_one_file(source, single, dst):
    run_convert(source, dst, on_error="skip", shards=3)
    one = LMDBDataset(os.path.dirname(single), "train", output="numpy")
    sharded = LMDBDataset(dst, "train", output="numpy")
    assert (sharded.classes, sharded.class_to_idx, sharded.targets) == \
        (one.classes, one.class_to_idx, one.targets)
    for i in range(len(one)):
        assert np.array_equal(sharded[i][0], one[i][0]) and sharded[i][1] == one[i][1]
    batch = sharded.__getitems__([len(one) - 1, 0, 7, 16])  # from several shards at once
    assert [label for _, label in batch] == [one[i][1] for i in (len(one) - 1, 0, 7, 16)]
    for kwargs in ({}, {"shuffle": True, "seed": 3}):
        ours = [label for _, label in LMDBIterDataset(dst, "train", output="numpy", **kwargs)]
        ref = [label for _, label in LMDBIterDataset(os.path.dirname(single), "train",
                                                     output="numpy", **kwargs)]
        assert ours == ref


@pytest.mark.timeout(120)
def test_sharded_split_in_dataloader_workers(source, single, dst):
    run_convert(source, dst, on_error="skip", shards=3)
    dataset = LMDBIterDataset(dst, "train", output="tensor", transform=lambda t: t.sum())
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    labels = sorted(int(label) for _, batch in loader for label in batch)
    assert labels == sorted(LMDBDataset(os.path.dirname(single), "train").targets)


@pytest.mark.slow
def test_merge_in_place_and_to_another_file(source, single, dst, tmp_path):
    run_convert(source, dst, on_error="skip", shards=3)
    out = os.fspath(tmp_path / "merged.lmdb")
    assert merge.merge(db(dst), out) == out
    assert os.path.isdir(db(dst))  # --output keeps the shards
    assert_same_database(out, single)
    merge.merge(db(dst))
    assert os.path.isfile(db(dst))
    assert_same_database(db(dst), single)


@pytest.mark.slow
def test_cli_convert_info_verify_merge(source, dst, capsys):
    assert cli.main(["convert", "--from_dir", source, "--to_dir", dst, "--split", "train",
                     "--shards", "2", "--on-error", "skip", "--procs", "1"]) == 0
    assert cli.main(["info", db(dst)]) == 0
    assert "in 2 shards" in capsys.readouterr().out
    assert cli.main(["verify", db(dst), "--source", os.path.join(source, "train")]) == 0
    assert ": OK" in capsys.readouterr().out
    assert cli.main(["merge", db(dst)]) == 0
    assert "22 records in one file" in capsys.readouterr().out
    assert cli.main(["verify", db(dst), "--source", os.path.join(source, "train")]) == 0


@pytest.mark.slow
def test_stopped_sharded_conversion_resumes_finished_shards_untouched(source, dst, tmp_path):
    # In the source order the text file stops a run in shard 1; shard 0 is finished by then.
    with pytest.raises(ConversionError, match="bb_text.JPEG"):
        run_convert(source, dst, shards=3, order="source")
    partial = fmt.partial_path(db(dst))
    finished = os.path.join(partial, fmt.shard_file("train", 0, 3))
    assert os.path.isfile(finished) and not os.path.exists(db(dst))
    with pytest.raises(IncompleteDatabaseError):
        catalog.read_catalog(partial)  # no index yet: never mistaken for a finished one
    mtime = os.stat(finished).st_mtime_ns
    stats = run_convert(source, dst, shards=3, on_error="skip", order="source")  # on resume
    assert stats.resumed_at >= 7  # shard 0 (7 files) and what shard 1 committed
    assert os.stat(os.path.join(db(dst), fmt.shard_file("train", 0, 3))).st_mtime_ns == mtime
    run_convert(source, tmp_path / "one", on_error="skip", order="source")
    assert_same_as_single(db(dst), db(tmp_path / "one"))


@pytest.mark.slow
def test_resume_with_other_shards_is_refused_naming_the_flag(source, dst):
    with pytest.raises(ConversionError):
        run_convert(source, dst, shards=3)
    with pytest.raises(ConversionError, match="--shards 3, this run asks for 4"):
        run_convert(source, dst, shards=4, on_error="skip")
    with pytest.raises(ConversionError, match="as shards, this run asks for --shards 1"):
        run_convert(source, dst, on_error="skip")
    run_convert(source, dst, shards=4, on_error="skip", overwrite=True)
    assert catalog.read_catalog(db(dst))[0]["shards"] == 4


@pytest.mark.slow
def test_overwrite_replaces_one_file_by_shards_and_back(source, single, dst):
    run_convert(source, dst, on_error="skip")
    run_convert(source, dst, on_error="skip", shards=2, overwrite=True)
    assert os.path.isdir(db(dst))
    run_convert(source, dst, on_error="skip", overwrite=True)
    assert os.path.isfile(db(dst))
    assert_same_database(db(dst), single)
    assert not [name for name in os.listdir(dst) if ".old-" in name]


@pytest.mark.parametrize("change, message", [
    (lambda index: index.update(version=99), "newer than this fastlmdb reads"),
    (lambda index: index.update(format="other"), "not a fastlmdb shard index"),
    (lambda index: index["shards"][0].update(file="../elsewhere.lmdb"), "shard list"),
    (lambda index: index["shards"][0].update(file=".."), "shard list"),  # the parent folder
    (lambda index: index["shards"][1].update(count=1), "shard list"),
    (lambda index: index.update(count=5, shards=[{"file": index["shards"][0]["file"],
                                                  "count": 5}]), "the index says 5"),
])
@pytest.mark.slow
def test_tampered_index_is_a_clear_error(source, dst, change, message):
    run_convert(source, dst, on_error="skip", shards=2)
    index_path = os.path.join(db(dst), fmt.SHARD_INDEX)
    with open(index_path) as file:
        index = json.load(file)
    change(index)
    with open(index_path, "w") as file:
        json.dump(index, file)
    with pytest.raises(DatabaseError, match=message):
        LMDBDataset(dst, "train")


def test_folder_without_index_is_not_a_database(tmp_path):
    os.makedirs(tmp_path / "train.lmdb")
    with pytest.raises(IncompleteDatabaseError, match="without index.json"):
        LMDBDataset(tmp_path, "train")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_shards_as_loky_tasks_equal_local(source, single, dst):
    run_convert(source, dst, on_error="skip", shards=3, backend="loky", procs=2)
    assert_same_as_single(db(dst), single)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_shards_on_a_dask_cluster_equal_local(source, single, dst):
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        stats = run_convert(source, dst, on_error="skip", shards=3, backend="dask",
                            scheduler=cluster.scheduler_address)
        assert len(cluster.workers) == 2
    assert stats.images == read_db(single)[0]["count"]
    assert_same_as_single(db(dst), single)


def test_backend_needs_shards(source, dst):
    with pytest.raises(ValueError, match="pass --shards K"):
        run_convert(source, dst, backend="loky")
    with pytest.raises(ValueError, match="not both"):
        run_convert(source, dst, shards=2, shard_size=5)


@pytest.mark.slow
def test_shard_size_sets_the_number_of_shards(source, single, dst):
    run_convert(source, dst, on_error="skip", shard_size=5)  # 21 files: 5 shards
    assert catalog.read_catalog(db(dst))[0]["shards"] == 5
    assert_same_as_single(db(dst), single)


def test_shard_size_in_bytes_counts_the_source_bytes(source, single, dst):
    """--shard-size with a unit: shards of about that many bytes of source images (every file
    measured here: fewer than the sample), and the database is the one-file one."""
    paths = [os.path.join(folder, name) for folder, _, names in os.walk(source) for name in names]
    total = sum(os.path.getsize(path) for path in paths)
    run_convert(source, dst, on_error="skip", shard_size=f"{total // 3}B")
    assert catalog.read_catalog(db(dst))[0]["shards"] == 3
    assert_same_as_single(db(dst), single)


def test_shard_size_in_bytes_needs_sizes_and_a_known_unit(source, tmp_path):
    from fastlmdb.converter import conversion
    from fastlmdb.sources.refs import Ref

    class Unsized:
        paths = [Ref(f"item {i}") for i in range(10)]

        def __len__(self):
            return len(self.paths)

    with pytest.raises(ConversionError, match="does not tell its images' sizes"):
        conversion.shard_count("512MB", Unsized())
    assert conversion.shard_count("4", Unsized()) == 3 and conversion.shard_count(4, Unsized()) == 3
    for bad in ("12QB", "-5", "1.5", True):
        with pytest.raises(ValueError, match="--shard-size"):
            run_convert(tmp_path, tmp_path / "out", shard_size=bad)
    with pytest.raises(ValueError, match="not both"):
        run_convert(tmp_path, tmp_path / "out", shards=2, shard_size="1GB")
    run_convert(source, tmp_path / "out", on_error="skip", shard_size="0", shards=2)  # "0": unset
    assert catalog.read_catalog(db(tmp_path / "out"))[0]["shards"] == 2
    with pytest.raises(SystemExit):
        cli.main(["convert", "--from_dir", os.fspath(tmp_path), "--to_dir",
                  os.fspath(tmp_path / "out"), "--split", "train", "--shard-size", "12QB"])


def test_shard_size_in_bytes_warns_where_records_differ_from_the_source(source, tmp_path,
                                                                      caplog):
    with caplog.at_level(logging.WARNING, logger="fastlmdb.converter.conversion"):
        run_convert(source, tmp_path, on_error="skip", save_as="numpy", shard_size="1MB")
    assert "counts the source's bytes; with --save-as numpy" in caplog.text


def test_merge_of_one_file_says_so(single):
    with pytest.raises(DatabaseError, match="not a folder of shards"):
        merge.merge(single, single + ".out")


@pytest.mark.slow
def test_merged_plan_is_the_one_file_plan(source, single, dst):
    run_convert(source, dst, on_error="skip", shards=3)
    merge.merge(db(dst))
    assert store.read_meta(db(dst), fmt.PLAN_KEY) == store.read_meta(single, fmt.PLAN_KEY)


def test_a_worker_that_cannot_see_the_folders_says_so(source, dst):
    from fastlmdb import converter
    from fastlmdb.converter import prepare, shards
    from fastlmdb.sources import folder

    scan = folder.list_tree(os.path.join(source, "train"))
    options = converter.Options(source, dst, "train", shards=2, backend="loky")
    job = shards._job(options, scan, prepare.Settings(), os.path.join(dst, "nowhere"), 0)
    with pytest.raises(ConversionError, match=r"cannot see .*nowhere: every worker must see"):
        shards.make_shard(job)

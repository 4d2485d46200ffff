"""The converter: round trips, bad files, refusals, map growth, resume, and dying children."""

import json
import multiprocessing
import os
import queue
import re
import signal
import struct
import time
import types
import zlib

import filelock
import lmdb
import numpy as np
import pytest
import simplejpeg

from fastlmdb import converter
from fastlmdb.converter import pipeline, prepare, writer
from fastlmdb.core import files, store
from fastlmdb.sources import folder
from fastlmdb.core import format as fmt
from fastlmdb.core.errors import ConversionError, DatabaseError, IncompleteDatabaseError
from helpers import (AWKWARD_LAYOUT, BAD, TRANSCODED, assert_same_database, db, imagefolder,
                     make_tree, pil_rgb, pixels_of, plain_layout, psnr, read_db, run_convert,
                     without_times, write_image)

# Every test here starts spawn-context producer and writer processes: none may hang.
pytestmark = pytest.mark.timeout(60)

REASONS = {"truncated": "truncated or corrupt JPEG", "header-only": "unreadable JPEG header",
           "zero": "zero-byte file", "text": "not a readable image"}


def kind_of(path):
    """The kind a fixture file was written as, from its name (see helpers.AWKWARD_LAYOUT)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem.split("_", 1)[1] if "_" in stem else "plain"


def assert_labels_match_imagefolder(info, rows, split_dir, sources=None):
    reference = imagefolder(split_dir)
    sources = np.arange(len(reference)) if sources is None else np.asarray(sources)
    assert info["classes"] == reference.classes
    assert info["class_to_idx"] == reference.class_to_idx
    assert rows["source"].tolist() == sources.tolist()
    assert rows["label"].tolist() == [reference.targets[s] for s in sources]
    return reference


def assert_rows_describe_values(rows, values):
    assert rows["nbytes"].tolist() == [len(v) for v in values]
    assert rows["crc32"].tolist() == [zlib.crc32(v) for v in values]


def test_jpeg_mode_keeps_bytes_and_transcodes_only_what_it_must(awkward_tree, dst):
    split_dir = os.path.join(awkward_tree, "train")
    stats = run_convert(awkward_tree, dst)
    info, rows, values = read_db(db(dst))
    reference = assert_labels_match_imagefolder(info, rows, split_dir)
    paths = [path for path, _ in reference.samples]
    assert info["count"] == len(values) == len(paths) == 13
    assert info["imgtype"] == "jpeg" and info["split"] == "train"
    assert info["source"] == os.path.abspath(split_dir)
    assert info["skipped"] == []
    assert_rows_describe_values(rows, values)

    must_transcode = [i for i, p in enumerate(paths) if kind_of(p) in TRANSCODED]
    assert len(must_transcode) == 3  # two CMYK, one PNG named .JPEG
    assert [t[0] for t in info["transcoded"]] == must_transcode
    assert [t[1] for t in info["transcoded"]] == [paths[i] for i in must_transcode]
    assert np.flatnonzero(rows["transcoded"]).tolist() == must_transcode
    for index, path, why in info["transcoded"]:
        assert why == ("PNG RGB" if kind_of(path) == "png" else "JPEG CMYK") + \
            " image converted to RGB JPEG"

    kinds_seen = set()
    for i, (path, value, row) in enumerate(zip(paths, values, rows)):
        source = open(path, "rb").read()
        expected = pil_rgb(path)
        assert (row["height"], row["width"]) == expected.shape[:2], path
        if i in must_transcode:
            assert value != source
            decoded = simplejpeg.decode_jpeg(value, colorspace="RGB")
            assert decoded.shape == expected.shape
            assert psnr(decoded, expected) > 30, path
        else:
            assert value == source, f"{path} was not stored byte for byte"
        kinds_seen.add(kind_of(path))
    assert kinds_seen == {"plain", "cmyk", "gray", "progressive", "png", "exif",
                          "sampling-mixed", "junk-before-dqt"}
    # Kept as they are, and said why: PIL reads both, simplejpeg and PyTurboJPEG do not.
    assert [(i, kind_of(p)) for i, p, _ in info["warnings"]] == [
        (paths.index(p), kind) for p in paths
        if (kind := kind_of(p)) in ("sampling-mixed", "junk-before-dqt")]

    assert stats.path == db(dst) and stats.images == 13 and stats.resumed_at == 0
    assert stats.transcoded == info["transcoded"] and stats.skipped == []
    assert stats.bytes_in == info["bytes_in"] == sum(os.path.getsize(p) for p in paths)
    assert stats.bytes_out == os.path.getsize(db(dst))
    assert not os.path.exists(fmt.partial_path(db(dst)))


def test_on_disk_layout_read_with_lmdb_directly(awkward_tree, dst):
    run_convert(awkward_tree, dst, split="val")
    paths = [p for p, _ in imagefolder(os.path.join(awkward_tree, "val")).samples]
    env = lmdb.open(db(dst, "val"), subdir=False, readonly=True, lock=False, max_dbs=3)
    try:
        images, rows_db, meta = (env.open_db(n, create=False)
                                 for n in (fmt.IMAGES_DB, fmt.ROWS_DB, fmt.META_DB))
        with env.begin() as txn:
            records = list(txn.cursor(db=images))
            chunks = list(txn.cursor(db=rows_db))
            meta_items = dict(txn.cursor(db=meta))
    finally:
        env.close()
    assert [k for k, _ in records] == [struct.pack(">Q", i) for i in range(3)]
    assert set(meta_items) == {fmt.PLAN_KEY, fmt.PROGRESS_KEY, fmt.TABLE_KEY, fmt.INFO_KEY,
                               fmt.LOGICAL_KEY, fmt.PATHS_KEY}
    info = json.loads(meta_items[fmt.INFO_KEY])
    assert info["format"] == "fastlmdb" and info["version"] == fmt.FORMAT_VERSION == 2
    assert (info["order"], info["order_seed"]) == ("shuffled", 0)
    # The table is in logical (ImageFolder) order; its key column says where each record is,
    # in the write order fmt.write_order gives.
    table = fmt.load_table(meta_items[fmt.TABLE_KEY], 3, "x")
    assert table["source"].tolist() == [0, 1, 2]
    assert table["key"].tolist() == np.argsort(fmt.write_order(3, "shuffled", 0)).tolist()
    keys = table["key"].tolist()
    assert records[keys[0]][1] == open(paths[0], "rb").read()
    assert records[keys[2]][1] != open(paths[2], "rb").read()  # the PNG, transcoded
    by_key = np.concatenate([fmt.rows_from_bytes(v) for _, v in chunks])
    assert by_key["source"].tolist() == fmt.write_order(3, "shuffled", 0).tolist()
    assert np.frombuffer(meta_items[fmt.LOGICAL_KEY][-12:], "<u4")[table["key"]].tolist() \
        == [0, 1, 2]
    split_dir = os.path.join(awkward_tree, "val")
    assert fmt.split_paths(meta_items[fmt.PATHS_KEY], 3) == [
        os.path.relpath(p, split_dir) for p in paths]
    assert json.loads(meta_items[fmt.PLAN_KEY])["save_as"] == "jpeg"


def test_numpy_mode_stores_imagefolder_pixels(awkward_tree, dst):
    run_convert(awkward_tree, dst, save_as="numpy")
    info, rows, values = read_db(db(dst))
    reference = assert_labels_match_imagefolder(info, rows, os.path.join(awkward_tree, "train"))
    assert info["imgtype"] == "numpy" and info["count"] == 13
    assert_rows_describe_values(rows, values)
    for (path, _), value, row in zip(reference.samples, values, rows):
        expected = pil_rgb(path)
        assert len(value) == row["height"] * row["width"] * 3
        np.testing.assert_array_equal(pixels_of(value, row), expected, err_msg=path)


@pytest.mark.parametrize("save_as", ["jpeg", "numpy"])
def test_max_size_resizes_only_larger_images(awkward_tree, dst, save_as):
    from PIL import Image

    run_convert(awkward_tree, dst, save_as=save_as, max_size=80)
    info, rows, values = read_db(db(dst))
    reference = assert_labels_match_imagefolder(info, rows, os.path.join(awkward_tree, "train"))
    large = 0
    for (path, _), value, row in zip(reference.samples, values, rows):
        source = pil_rgb(path)
        height, width = source.shape[:2]
        if max(height, width) <= 80:
            assert (row["height"], row["width"]) == (height, width)
            if save_as == "jpeg":
                assert row["transcoded"] == (kind_of(path) in TRANSCODED)
                assert (value == open(path, "rb").read()) == (kind_of(path) not in TRANSCODED)
            continue
        large += 1
        assert row["transcoded"] == 2 and max(row["height"], row["width"]) == 80, path
        scale = 80 / max(height, width)
        expected = np.asarray(Image.fromarray(source).resize(
            (round(width * scale), round(height * scale)), Image.Resampling.LANCZOS))
        if save_as == "numpy":
            np.testing.assert_array_equal(pixels_of(value, row), expected, err_msg=path)
        else:
            # Re-encoded at --quality 90 with 4:2:0 chroma: the synthetic noise costs some dB.
            assert psnr(simplejpeg.decode_jpeg(value, colorspace="RGB"), expected) > 25, path
    assert 0 < large < len(values)
    assert info["resized"] == large and info["max_size"] == 80


@pytest.mark.slow
def test_several_producers_keep_source_order(tmp_path, dst):
    # 3 chunks of work per class set: with two producers results arrive out of order.
    src = make_tree(tmp_path / "src", plain_layout(classes=3, train=15, val=0))
    run_convert(src, dst, procs=2)
    run_convert(src, tmp_path / "one", procs=1)
    info2, rows2, values2 = read_db(db(dst))
    info1, rows1, values1 = read_db(db(tmp_path / "one"))
    assert values2 == values1
    assert np.array_equal(rows2, rows1)
    assert without_times(info2) == without_times(info1)
    paths = [p for p, _ in imagefolder(os.path.join(src, "train")).samples]
    assert values2 == [open(p, "rb").read() for p in paths]


def test_both_splits_and_progress(tree, dst):
    calls = []
    stats = converter.convert(converter.Options(tree, dst, "val", procs=1),
                            on_progress=lambda *a: calls.append(a))
    assert stats.images == 6
    assert calls and calls[-1][:2] == (6, 6)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    run_convert(tree, dst, split="train")
    assert store.read_file_catalog(db(dst, "train"))[0]["count"] == 12
    assert store.read_file_catalog(db(dst, "val"))[0]["count"] == 6


@pytest.mark.parametrize("kind", BAD)
def test_bad_file_fails_the_run_by_default(tree, dst, bad_files, kind):
    (bad,) = bad_files(os.path.join(tree, "train", "n00000001"), kinds=[kind])
    with pytest.raises(ConversionError,
                       match=re.escape(bad) + f": {REASONS[kind]}.*--on-error skip"):
        run_convert(tree, dst)
    assert not os.path.exists(db(dst))
    assert os.path.exists(fmt.partial_path(db(dst)))


def test_skip_leaves_bad_files_out_and_lists_them(tree, dst, bad_files):
    split_dir = os.path.join(tree, "train")
    bad = bad_files(os.path.join(split_dir, "n00000001"))
    bad += bad_files(os.path.join(split_dir, "n00000002"), kinds=["zero"], prefix="a")
    stats = run_convert(tree, dst, on_error="skip")
    info, rows, values = read_db(db(dst))

    all_paths = [p for p, _ in imagefolder(split_dir).samples]
    kept = [i for i, p in enumerate(all_paths) if p not in bad]
    assert len(all_paths) == 13 + len(BAD) and len(kept) == 12
    assert_labels_match_imagefolder(info, rows, split_dir, sources=kept)
    assert values == [open(all_paths[i], "rb").read() for i in kept]
    assert_rows_describe_values(rows, values)
    skipped = sorted(info["skipped"], key=lambda s: all_paths.index(s[0]))
    assert info["skipped"] == skipped  # listed in source order
    assert [s[0] for s in skipped] == sorted(bad, key=all_paths.index)
    for path, reason in skipped:
        assert reason.startswith(REASONS[kind_of(path)]), (path, reason)
    assert stats.skipped == info["skipped"] and stats.images == info["count"] == 12
    assert info["transcoded"] == []


@pytest.fixture
def awkward_tree_2(tmp_path):
    return make_tree(tmp_path / "src2", AWKWARD_LAYOUT, seed=7)


def test_existing_target_is_refused_then_replaced_with_overwrite(tree, awkward_tree_2, dst):
    run_convert(tree, dst, split="val")
    assert read_db(db(dst, "val"))[0]["imgtype"] == "jpeg"  # opened in this process
    before = os.stat(db(dst, "val")).st_mtime_ns
    with pytest.raises(ConversionError, match=r"val\.lmdb already exists; pass --overwrite"):
        run_convert(tree, dst, split="val")
    assert os.stat(db(dst, "val")).st_mtime_ns == before
    # Overwrite with different source content and mode: the new database replaces the old,
    # also for this process, which had the old one open.
    run_convert(awkward_tree_2, dst, split="val", save_as="numpy", overwrite=True)
    info, rows, values = read_db(db(dst, "val"))
    assert info["imgtype"] == "numpy" and info["count"] == 3
    paths = [p for p, _ in imagefolder(os.path.join(awkward_tree_2, "val")).samples]
    for path, value, row in zip(paths, values, rows):
        np.testing.assert_array_equal(pixels_of(value, row), pil_rgb(path))
    assert info["source"] == os.path.abspath(os.path.join(awkward_tree_2, "val"))
    assert not os.path.exists(fmt.partial_path(db(dst, "val")))


@pytest.mark.parametrize("options, flag", [
    ({"procs": 0}, "--procs"),
    ({"procs": 1.5}, "--procs"),
    ({"save_as": "png"}, "--save-as"),
    ({"on_error": "x"}, "--on-error"),
    ({"split": "a/b"}, "--split"),
    ({"max_pixels": 0}, "--max-pixels"),
])
def test_invalid_options_name_the_flag(tree, dst, options, flag):
    options = {"split": "train", "procs": 1, **options}
    with pytest.raises(ValueError, match=f"^{flag} "):
        converter.convert(converter.Options(tree, dst, **options))
    assert not os.path.exists(dst)


def test_images_over_max_pixels_are_refused(tree, dst):
    with pytest.raises(ConversionError, match=r"exceeds the limit of 100 .*--max-pixels"):
        run_convert(tree, dst, max_pixels=100)


def test_tiny_map_grows(tree, dst):
    stats = run_convert(tree, dst, save_as="numpy", map_size=64 << 10, batch_bytes=8 << 10)
    info, rows, values = read_db(db(dst))
    assert stats.images == info["count"] == 12
    assert sum(len(v) for v in values) > 64 << 10  # so the map had to grow
    assert os.path.getsize(db(dst)) > 64 << 10
    assert_rows_describe_values(rows, values)
    for (path, _), value, row in zip(imagefolder(os.path.join(tree, "train")).samples, values,
                                     rows):
        np.testing.assert_array_equal(pixels_of(value, row), pil_rgb(path))


@pytest.fixture
def interrupted(tmp_path, dst, bad_files):
    """A tree with a bad file written 17th and a run that stopped there (on_error="raise")."""
    src = make_tree(tmp_path / "src", plain_layout(classes=3, train=12, val=0))
    (bad,) = bad_files(os.path.join(src, "train", "n00000001"), kinds=["truncated"],
                       prefix="n00000001_005x")
    inputs = folder.list_tree(os.path.join(src, "train"))
    # Files are written in the shuffled write order: the bad one is the 17th written.
    index = fmt.write_order(len(inputs), "shuffled", 0).tolist().index(inputs.paths.index(bad))
    assert index == 16  # past the first 16-file chunk: there is a commit before it
    with pytest.raises(ConversionError, match=re.escape(bad)):
        run_convert(src, dst, batch_bytes=1)
    return types.SimpleNamespace(src=src, bad=bad, index=index)


def count_records(partial):
    env = lmdb.open(partial, subdir=False, readonly=True, lock=False, max_dbs=3)
    try:
        with env.begin(db=env.open_db(fmt.IMAGES_DB, create=False)) as txn:
            return txn.stat()["entries"]
    finally:
        env.close()


@pytest.mark.slow
def test_interrupted_run_keeps_committed_work_and_resumes(interrupted, tmp_path, dst):
    partial = fmt.partial_path(db(dst))
    assert count_records(partial) == interrupted.index  # everything before the bad file
    stats = run_convert(interrupted.src, dst, on_error="skip", batch_bytes=1)
    assert stats.resumed_at == interrupted.index
    assert stats.skipped == [[interrupted.bad, stats.skipped[0][1]]]
    assert not os.path.exists(partial)

    fresh = run_convert(interrupted.src, tmp_path / "fresh", on_error="skip")
    assert fresh.resumed_at == 0
    assert assert_same_database(db(dst), db(tmp_path / "fresh")) == 36


def test_resume_with_other_save_as_is_refused(interrupted, dst):
    with pytest.raises(ConversionError,
                       match=r"started with --save-as jpeg, this run asks for numpy.*--overwrite"):
        run_convert(interrupted.src, dst, on_error="skip", save_as="numpy")
    # Refusing left the committed work alone.
    assert count_records(fmt.partial_path(db(dst))) == interrupted.index


def test_resume_after_source_change_is_refused(interrupted, dst):
    write_image(os.path.join(interrupted.src, "train", "n00000000", "new.JPEG"))
    with pytest.raises(ConversionError, match=r"source files changed .*\(37 files then, 38 now\)"):
        run_convert(interrupted.src, dst, on_error="skip")


def test_overwrite_starts_a_partial_conversion_again(interrupted, dst):
    stats = run_convert(interrupted.src, dst, on_error="skip", save_as="numpy", overwrite=True)
    assert stats.resumed_at == 0 and stats.images == 36
    assert store.read_file_catalog(db(dst))[0]["imgtype"] == "numpy"


def test_overwrite_with_the_same_arguments_resumes(interrupted, dst):
    stats = run_convert(interrupted.src, dst, on_error="skip", overwrite=True)
    assert stats.resumed_at == interrupted.index and stats.images == 36


def test_partial_database_is_never_opened_as_complete(interrupted, dst):
    final, partial = db(dst), fmt.partial_path(db(dst))
    assert os.path.exists(partial) and not os.path.exists(final)
    with pytest.raises(IncompleteDatabaseError, match="not finished.*run the same"):
        store.read_file_catalog(final)
    with pytest.raises(IncompleteDatabaseError, match="not finished"):
        store.Reader(final).get(0)
    # Even opened by its own name, it has no final metadata.
    with pytest.raises(IncompleteDatabaseError, match="no final metadata"):
        store.read_file_catalog(partial)
    assert issubclass(IncompleteDatabaseError, DatabaseError)


def test_a_second_conversion_of_the_same_split_is_refused(tree, dst):
    os.makedirs(dst)
    lock_path = files.lock_path(fmt.partial_path(db(dst)))
    with filelock.FileLock(lock_path):  # as a running conversion holds it
        with pytest.raises(ConversionError, match="another fastlmdb process is writing"):
            run_convert(tree, dst)
    assert run_convert(tree, dst).images == 12  # the lock is released: it works now
    assert not os.path.exists(lock_path)  # and removed


# Dying children. Monkeypatching cannot reach spawned processes, and killing "some time
# later" is racy, so the kill happens inside on_progress, i.e. in the coordinator, right
# after a chunk was reported, while every child is certainly alive; joining the killed child
# there makes its death complete before the coordinator goes on. The run then cannot finish
# on its own: with one producer the coordinator hands out at most WINDOW files ahead of the
# writer, so the files past the window at the time of the kill are never prepared, and
# without the writer nothing is stored. Only the coordinator's watchdog can end the run.
WINDOW = (2 * 1 + 2) * pipeline.CHUNK  # _Pipeline.window with procs=1


def kill_child_on_progress(name, after):
    """An on_progress that SIGKILLs the child called `name` once `after` files are done."""
    killed = []

    def on_progress(done, total, bytes_in):
        if done >= after and not killed:
            assert done + WINDOW < total, "the tree must reach past the window"
            (child,) = [p for p in multiprocessing.active_children() if p.name == name]
            os.kill(child.pid, signal.SIGKILL)
            child.join(timeout=10)
            killed.append(child.exitcode)
    return on_progress, killed


def assert_no_children_left():
    assert [p.name for p in multiprocessing.active_children()] == []


@pytest.fixture
def long_tree(tmp_path):
    """100 files: more than one producer's window past the first chunks."""
    return make_tree(tmp_path / "src", plain_layout(classes=4, train=25, val=0))


def test_when_every_producer_dies_the_run_fails(long_tree, dst):
    on_progress, killed = kill_child_on_progress("fastlmdb-producer-0", after=16)
    started = time.monotonic()
    with pytest.raises(ConversionError,
                       match=r"every producer process died \(the last: killed by signal SIGKILL"
                             r".*Committed work is kept in .*train\.lmdb\.partial"):
        converter.convert(converter.Options(long_tree, dst, "train", procs=1, batch_bytes=1),
                        on_progress)
    assert killed == [-signal.SIGKILL]
    assert time.monotonic() - started < 20
    assert_no_children_left()  # the writer, waiting for the dead producer, was stopped
    assert not os.path.exists(db(dst))


@pytest.mark.slow
def test_a_dead_producers_work_goes_to_the_others(long_tree, tmp_path, dst):
    on_progress, killed = kill_child_on_progress("fastlmdb-producer-0", after=16)
    stats = converter.convert(converter.Options(long_tree, dst, "train", procs=2, batch_bytes=1,
                                            on_error="skip"), on_progress)
    assert killed == [-signal.SIGKILL]
    assert_no_children_left()
    # At most the one file it was preparing is blamed, and says why.
    assert len(stats.skipped) <= 1
    assert all("producer process died (killed by signal SIGKILL)" in why
               for _, why in stats.skipped)
    assert stats.images + len(stats.skipped) == 100
    fresh = run_convert(long_tree, tmp_path / "fresh")
    blamed = {path for path, _ in stats.skipped}
    info, rows, values = read_db(db(dst))
    _, _, fresh_values = read_db(db(tmp_path / "fresh"))
    paths = folder.list_tree(os.path.join(long_tree, "train")).paths
    assert values == [v for v, p in zip(fresh_values, paths) if p not in blamed]
    assert fresh.images == 100


@pytest.mark.slow
def test_a_writer_that_dies_fails_the_run_and_the_next_run_resumes(long_tree, tmp_path, dst):
    # Killed once 32 files are reported: the writer committed the first chunk before
    # taking the second, so at least 16 records survive.
    on_progress, killed = kill_child_on_progress("fastlmdb-writer", after=32)
    started = time.monotonic()
    with pytest.raises(ConversionError, match=r"fastlmdb-writer \(pid \d+\) died: killed"):
        converter.convert(converter.Options(long_tree, dst, "train", procs=1, batch_bytes=1),
                        on_progress)
    assert killed == [-signal.SIGKILL]
    assert time.monotonic() - started < 20
    assert_no_children_left()  # the producer too

    stats = run_convert(long_tree, dst, batch_bytes=1)
    assert 16 <= stats.resumed_at <= 32 + WINDOW
    run_convert(long_tree, tmp_path / "fresh")
    assert assert_same_database(db(dst), db(tmp_path / "fresh")) == 100


def test_a_fifo_named_like_an_image_is_refused_not_waited_for(tree, dst):
    fifo = os.path.join(tree, "train", "n00000001", "zz_fifo.JPEG")
    os.mkfifo(fifo)
    with pytest.raises(ConversionError, match=re.escape(fifo) + ": not a regular file"):
        run_convert(tree, dst)
    stats = run_convert(tree, dst, on_error="skip")
    assert stats.skipped == [[fifo, "not a regular file"]] and stats.images == 12


def test_a_child_exiting_just_after_its_last_message_is_not_called_dead():
    # Regression, deterministic without processes: the status poll timed out, then the
    # writer sent "done" and exited before the coordinator looked at its exit code.
    class Status:
        def __init__(self, late):
            self.late = list(late)

        def get(self, timeout):
            if self.late and self.late[0] is None:
                self.late.pop(0)
                raise queue.Empty
            if not self.late:
                raise queue.Empty
            return self.late.pop(0)

        def empty(self):
            return not self.late

    coordinator = object.__new__(pipeline._Pipeline)
    coordinator.writer = types.SimpleNamespace(exitcode=0, name="fastlmdb-writer", pid=1)
    coordinator.producers, coordinator.live, coordinator.partial = [], [], "x.partial"
    coordinator.status = Status([None, ("done", {"count": 1})])
    assert coordinator._next_message() == ("done", {"count": 1})
    coordinator.status = Status([None])  # nothing was said: it did die
    with pytest.raises(ConversionError, match=r"fastlmdb-writer \(pid 1\) died: exit status 0"):
        coordinator._next_message()


def test_broken_links_and_non_utf8_names(tree, dst):
    class_dir = os.path.join(tree, "train", sorted(os.listdir(os.path.join(tree, "train")))[0])
    with open(os.path.join(class_dir, sorted(os.listdir(class_dir))[0]), "rb") as good:
        data = good.read()
    os.symlink("/nonexistent/target.JPEG", os.path.join(class_dir, "broken.JPEG"))
    with open(os.path.join(os.fsencode(class_dir), b"odd-\xff\xfe.JPEG"), "wb") as file:
        file.write(data)
    stats = run_convert(tree, dst, on_error="skip")
    assert [os.path.basename(path) for path, _ in stats.skipped] == ["broken.JPEG"]
    assert "No such file" in stats.skipped[0][1]
    assert stats.images == len(imagefolder(os.path.join(tree, "train"))) - 1


def test_a_bug_while_preparing_stops_the_run_naming_the_file(tree, dst, monkeypatch):
    """A bad file is data (skipped, or it stops the run); any other exception is a bug and is
    never reported as a bad file, not even with --on-error skip."""
    def buggy(path, settings, data=None):
        raise AttributeError("module 'PIL.Image' has no attribute 'Resampling'")

    monkeypatch.setattr(prepare, "prepare", buggy)
    inputs = folder.list_tree(os.path.join(tree, "train"))
    assert "AttributeError" in pipeline.entry(inputs.paths[0], prepare.Settings())["bug"]
    options = converter.Options(tree, dst, "train", on_error="skip", procs=1)
    os.makedirs(dst)
    partial = os.path.join(dst, "train.lmdb.partial")
    job = pipeline.writer_job(options, inputs, partial, pipeline.plan_of(options, inputs))
    _, (kind, message) = writer.write_inline(
        job, inputs.paths, lambda paths: [pipeline.entry(p, prepare.Settings()) for p in paths],
        pipeline.CHUNK)
    assert kind == "fatal"
    assert f"preparing {inputs.paths[0]} failed with an unexpected error" in message
    assert "Resampling" in message

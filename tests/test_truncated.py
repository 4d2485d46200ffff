"""A database file cut short (an interrupted cp, scp or download) is refused with a message
naming the file, by every reader, in every process that opens it: never a SIGBUS.

LMDB maps the file and would read past its end. Each reader runs in a child process
(probes/reader_probe.py) so that a signal fails the test instead of killing pytest.
"""

import json
import os
import shutil
import subprocess

import probes
import pytest
import helpers
from helpers import make_tree, run_convert

from fastlmdb.core import format as fmt
from fastlmdb.core.errors import ConversionError

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]  # every reader in a child process

PAGE = 4096
# name -> bytes kept of a file of `size` bytes
CUTS = {
    "zero-length": lambda size: 0,
    "6000-bytes": lambda size: 6000,  # the first meta page and part of the second
    "1%": lambda size: size // 100,
    "50%": lambda size: size // 2,
    "90%": lambda size: size * 9 // 10,
    "one-page-short": lambda size: size - PAGE,
}
READERS = ["LMDBDataset", "LMDBIterDataset", "info", "verify", "stage"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """{"one-file": DB, "sharded": DB}: the same 60 images as one file and as 3 shards."""
    base = tmp_path_factory.mktemp("truncated")
    make_tree(base / "src", {"train": {"a": 30, "b": 30}})
    run_convert(base / "src", base / "one")
    run_convert(base / "src", base / "sharded", shards=3)
    return {"one-file": fmt.db_path(base / "one", "train"),
            "sharded": fmt.db_path(base / "sharded", "train")}


def _damaged_copy(db, tmp_path, cut):
    """(copy of `db` in tmp_path with one file cut to CUTS[cut], the cut file, its size)."""
    copy = os.path.join(tmp_path, "dst", os.path.basename(db))
    os.makedirs(os.path.dirname(copy))
    if os.path.isdir(db):
        shutil.copytree(db, copy)
        victim = os.path.join(copy, fmt.shard_file("train", 2, 3))  # the last: others open
    else:
        shutil.copyfile(db, copy)
        victim = copy
    size = os.path.getsize(victim)
    assert size > 10 * PAGE  # every cut is a different one
    keep = CUTS[cut](size)
    os.truncate(victim, keep)
    return copy, victim, keep


def _run_probe(*args):
    """The probe's reports, {reader: error}; fails the test on a signal or a crash."""
    run = subprocess.run(probes.command("reader_probe", *args), capture_output=True,
                         text=True, env=probes.env(), timeout=90)
    reports = [json.loads(line) for line in run.stdout.splitlines()]
    done = [r["reader"] for r in reports]
    assert run.returncode == 0, (f"the probe exited with {run.returncode} (negative: a "
                                 f"signal) after {done}:\n{run.stderr[-2000:]}")
    return {r["reader"]: r["error"] for r in reports}


def _assert_refused(error, victim, keep):
    assert error is not None, "read a damaged database without an error"
    assert victim in error, error
    if keep == 0:
        assert "is empty (0 bytes)" in error, error
    else:
        assert f"is cut short: it has {keep:,} bytes" in error, error
    assert "copy it again" in error, error


@pytest.mark.parametrize("layout", ["one-file", "sharded"])
@pytest.mark.parametrize("cut", list(CUTS))
def test_every_reader_refuses_a_cut_file_with_a_message(made, tmp_path, layout, cut):
    db, victim, keep = _damaged_copy(made[layout], tmp_path, cut)
    errors = _run_probe("readers", db, tmp_path)
    expected = READERS + (["merge"] if layout == "sharded" else [])
    assert list(errors) == expected
    for reader in expected:
        _assert_refused(errors[reader], victim, keep)
    assert not os.path.exists(tmp_path / "local" / os.path.basename(db))  # nothing staged
    assert not os.path.exists(tmp_path / "merged.lmdb")


@pytest.mark.parametrize("context", helpers.START_METHODS[:2])
@pytest.mark.parametrize("layout", ["one-file", "sharded"])
def test_dataloader_workers_refuse_a_file_cut_after_the_dataset_was_made(made, tmp_path,
                                                                         layout, context):
    db, victim, keep = _damaged_copy(made[layout], tmp_path, "50%")
    errors = _run_probe("workers", db, made[layout], context)
    _assert_refused(errors[f"workers-{context}"], victim, keep)
    assert "DataLoader worker" in errors[f"workers-{context}"]  # it was the worker that refused


def test_a_whole_file_with_room_to_spare_is_read(made, tmp_path):
    """The check refuses what is short, not what is longer than its pages (a file LMDB grew)."""
    db, _, _ = _damaged_copy(made["one-file"], tmp_path, "zero-length")
    shutil.copyfile(made["one-file"], db)
    with open(db, "ab") as file:
        file.write(bytes(3 * PAGE))
    errors = _run_probe("readers", db, tmp_path)
    assert errors == {reader: None for reader in READERS}


def test_a_cut_partial_database_stops_the_conversion_with_a_message(tmp_path):
    """The full-disk advice says to move the .partial file elsewhere: a move cut short must
    not kill the writer with SIGBUS (the run would die the same way at every retry)."""
    make_tree(tmp_path / "src", {"train": {"a": 20, "b": 20}})
    run_convert(tmp_path / "src", tmp_path / "dst")
    final = fmt.db_path(tmp_path / "dst", "train")
    partial = fmt.partial_path(final)
    os.replace(final, partial)
    keep = os.path.getsize(partial) // 2
    os.truncate(partial, keep)
    with pytest.raises(ConversionError, match=rf"{partial} is cut short: it has {keep:,} bytes"
                                              rf".*or delete {partial} to convert from the start"):
        run_convert(tmp_path / "src", tmp_path / "dst")

"""fastlmdb verify: a sound database passes; every kind of damage is found and listed."""

import os
import re
import shutil
import subprocess
import sys

import lmdb
import numpy as np
import pytest
import simplejpeg
from helpers import db, run_convert

from fastlmdb import cli
from fastlmdb.testing.sample_tree import synthetic_photo
from fastlmdb.sources import folder
from fastlmdb.core import format as fmt
from fastlmdb.tools import verify

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def made(awkward_tree, dst):
    run_convert(awkward_tree, dst)
    return db(dst)


def _poke(path, index, value):
    """Replace (or delete) the value under key `index`; returns its record's index."""
    env = lmdb.open(path, subdir=False, max_dbs=3, lock=False)
    with env.begin(write=True, db=env.open_db(fmt.IMAGES_DB)) as txn:
        if value is None:
            txn.delete(fmt.key(index))
        else:
            txn.put(fmt.key(index), value)
        meta = env.open_db(fmt.META_DB, txn=txn)
        count = fmt.load_json(txn.get(fmt.INFO_KEY, db=meta), "info", path)["count"]
        keys = fmt.load_table(txn.get(fmt.TABLE_KEY, db=meta), count, path)["key"]
    env.close()
    return keys.tolist().index(index)


@pytest.mark.parametrize("procs", [1, 2])
def test_a_sound_database_passes_against_its_source(made, awkward_tree, procs):
    report = verify.verify(made, source=os.path.join(awkward_tree, "train"), procs=procs)
    assert report.ok, report.problems
    assert report.records > 0


def test_changed_bytes_are_found(made):
    record = _poke(made, 3, b"\xff\xd8\xff" + b"x" * 100)
    report = verify.verify(made)
    assert [p.split(":")[0] for p in report.problems] == [f"record {record}"]
    assert "bytes stored" in report.problems[0] or "checksum" in report.problems[0]


def test_a_missing_record_is_found(made):
    _poke(made, 2, None)
    assert any("not all there" in p for p in verify.verify(made).problems)


def test_a_source_file_changed_since_is_found(made, awkward_tree):
    split = os.path.join(awkward_tree, "train")
    plain = sorted(p for p in _files(split) if "plain" in os.path.basename(p) or
                   os.path.basename(p).startswith("n0"))[0]
    with open(plain, "ab") as file:
        file.write(b"\0")
    problems = verify.verify(made, source=split).problems
    assert len(problems) == 1 and "bytes differ from source" in problems[0]


def test_an_incomplete_database_is_a_problem_not_a_crash(made, tmp_path):
    partial = fmt.partial_path(tmp_path / "train.lmdb")
    shutil.copy(made, partial)
    report = verify.verify(tmp_path / "train.lmdb")
    assert not report.ok and "resume" in report.problems[0]


def test_cli_exit_status_and_listing(made, tmp_path, capsys):
    damaged = str(tmp_path / "damaged.lmdb")
    shutil.copy(made, damaged)
    record = _poke(damaged, 1, b"garbage")
    assert cli.main(["verify", made, "--procs", "1"]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli.main(["verify", damaged, "--procs", "1"]) == 1
    out = capsys.readouterr().out
    assert f"record {record}:" in out and "1 problem(s)" in out


def _files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


DISK_FULL = """
import resource, signal, sys
from fastlmdb import converter
if __name__ == "__main__":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
    converter.convert(converter.Options(sys.argv[1], sys.argv[2], "train", procs=1,
                                        batch_bytes=int(sys.argv[4])))
"""
FULL_DISK_ADVICE = re.compile(r"The (\d+) records committed \(([\d.,]+) MB\) are intact; about "
                              r"([\d.,]+) MB more are needed for the remaining (\d+) files")


def _photo_tree(root, count):
    """An ImageFolder tree of `count` 240x320 photos (25-45 KB each) in 2 classes."""
    rng = np.random.default_rng(5)
    for i in range(count):
        path = os.path.join(root, "train", "ab"[i % 2], f"{i:03d}.JPEG")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as file:
            file.write(simplejpeg.encode_jpeg(synthetic_photo(rng, 240, 320), quality=90))
    return os.fspath(root)


# The first commit failing is the case that once said "27,011 MB more" for 65 MB of source.
@pytest.mark.slow
@pytest.mark.parametrize("batch_bytes, limit", [(10_000_000, 150_000), (100_000, 1_000_000)],
                         ids=["first-commit", "later-commit"])
def test_a_full_disk_stops_with_advice_and_the_run_resumes(dst, tmp_path, batch_bytes, limit):
    tree = _photo_tree(tmp_path / "src", 40)
    script = tmp_path / "full.py"
    script.write_text(DISK_FULL)
    run = subprocess.run([sys.executable, str(script), tree, str(dst), str(limit),
                          str(batch_bytes)], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    advice = FULL_DISK_ADVICE.search(run.stderr)
    assert advice, run.stderr
    committed, more, remaining = int(advice[1]), float(advice[3].replace(",", "")), int(advice[4])
    assert (committed == 0) == (batch_bytes > limit)
    paths = folder.list_tree(os.path.join(tree, "train")).paths
    assert remaining == len(paths) - committed
    # JPEG mode stores each file's bytes, on whole 4 KB pages: a little more than the source.
    source_left = sum(os.path.getsize(path) for path in paths[committed:]) / 1e6
    assert source_left <= more <= 1.3 * source_left, (more, source_left)
    assert "run the same command again to resume" in run.stderr
    stats = run_convert(tree, dst)
    assert stats.resumed_at == committed and stats.images == len(paths)
    assert verify.verify(db(dst), source=os.path.join(tree, "train")).ok

"""`fastlmdb stage`: a checked node-local copy, made once however many ranks ask at once,
made again when the source changes, refused when the copy is damaged."""

import multiprocessing
import os
import shutil

import pytest
from helpers import assert_same_database, db, make_tree, read_db, run_convert

from fastlmdb import cli
from fastlmdb.tools import stage
from fastlmdb.core.errors import DatabaseError


@pytest.fixture(params=[1, 3], ids=["one-file", "sharded"])
def made(request, tmp_path):
    make_tree(tmp_path / "src", {"train": {"a": 6, "b": 5}})
    run_convert(tmp_path / "src", tmp_path / "shared", shards=request.param)
    return tmp_path, db(tmp_path / "shared")


def test_stage_copies_once_and_checks(made):
    base, source = made
    local = base / "local"
    path = stage.stage(source, local)
    assert path == os.path.join(local, "train.lmdb")
    assert_same_database(path, source)
    inode = os.stat(path).st_ino
    assert stage.stage(source, local) == path and os.stat(path).st_ino == inode  # not again


def test_a_changed_source_is_copied_again(made):
    base, source = made
    local = base / "local"
    stage.stage(source, local)
    make_tree(base / "src", {"train": {"c": 2}}, seed=9)  # one more class
    run_convert(base / "src", base / "shared", overwrite=True,
                shards=3 if os.path.isdir(source) else 1)
    path = stage.stage(source, local)
    assert read_db(path)[0]["count"] == 13
    assert_same_database(path, source)


def _stage_and_stat(args):
    source, local = args
    path = stage.stage(source, local)
    return os.stat(path).st_ino


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ranks_of_a_node_staging_at_once_copy_once(made):
    base, source = made
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        inodes = pool.map(_stage_and_stat, [(source, os.fspath(base / "local"))] * 4)
    assert len(set(inodes)) == 1  # a second copy would have replaced the first


def test_a_damaged_copy_is_refused_and_removed(made, monkeypatch):
    base, source = made
    value = read_db(source)[2][3]  # a record's bytes, to find in the copied file
    copy = shutil.copyfile

    def damaging_copy(src, dst):
        copy(src, dst)
        with open(dst, "r+b") as file:
            data = file.read()
            at = data.find(value)
            if at >= 0:
                file.seek(at + len(value) // 2)
                file.write(bytes([data[at + len(value) // 2] ^ 0xFF]))

    monkeypatch.setattr(stage.shutil, "copyfile", damaging_copy)
    with pytest.raises(DatabaseError, match="does not match its checksums"):
        stage.stage(source, base / "local")
    assert not os.path.exists(base / "local" / "train.lmdb")
    assert not os.path.exists(base / "local" / "train.lmdb.partial")


def test_cli_stage_prints_the_local_path(made, capsys):
    base, source = made
    assert cli.main(["stage", source, os.fspath(base / "local"), "--procs", "1"]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(base / "local", "train.lmdb")
    assert cli.main(["stage", os.fspath(base / "nowhere.lmdb"), os.fspath(base / "l2")]) == 1
    assert "does not exist" in capsys.readouterr().err

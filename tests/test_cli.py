"""The `fastlmdb` command: summaries, flag spellings, `info`, and one-line errors."""

import json
import os
import re
import subprocess
import sys

import pytest

from fastlmdb import converter
from fastlmdb.core import format as fmt
from fastlmdb.core import store
from fastlmdb.cli.commands import main
from helpers import db

pytestmark = pytest.mark.timeout(60)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert_args(src, dst, *more, split=("train",)):
    return ["convert", "--from-dir", src, "--to-dir", dst, "--split", *split, "--procs", "1",
            *more]


def assert_one_error_line(err, command="convert"):
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fastlmdb {command}: error: ")
    return lines[0]


def test_convert_two_splits_prints_a_summary(tree, dst, capsys):
    assert main(convert_args(tree, dst, split=("train", "val"))) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^{re.escape(db(dst, 'train'))}: 12 images, .* img/s\)$", out, re.M)
    assert re.search(rf"^{re.escape(db(dst, 'val'))}: 6 images, ", out, re.M)
    assert out.count("  0 changed, 0 skipped") == 2
    assert store.read_file_catalog(db(dst, "val"))[0]["count"] == 6


def test_summary_lists_changed_and_skipped_files(awkward_tree, dst, bad_files, capsys):
    (bad,) = bad_files(os.path.join(awkward_tree, "val", "n00000000"), kinds=["zero"])
    assert main(convert_args(awkward_tree, dst, "--on-error", "skip", split=("val",))) == 0
    out = capsys.readouterr().out
    assert f"  skipped  {bad}: zero-byte file" in out
    assert re.search(r"  changed  #2 .*a_png\.JPEG: PNG RGB image converted to RGB JPEG", out)
    assert "  1 changed, 1 skipped" in out


@pytest.mark.parametrize("spelling", ["dashed", "underscored"])
def test_flags_work_dashed_and_underscored(tree, dst, spelling, capsys):
    flags = ["--from-dir", tree, "--to-dir", dst, "--save-as", "numpy", "--on-error", "skip",
             "--max-pixels", "100000"]
    if spelling == "underscored":
        flags = ["--" + f[2:].replace("-", "_") if f.startswith("--") else f for f in flags]
        assert flags[0] == "--from_dir"
    assert main(["convert", *flags, "--split", "val", "--procs", "1"]) == 0
    info = store.read_file_catalog(db(dst, "val"))[0]
    assert info["imgtype"] == "numpy" and info["count"] == 6
    assert "6 images" in capsys.readouterr().out


def test_info_prints_counts_and_json(tree, dst, capsys):
    assert main(convert_args(tree, dst, split=("val",))) == 0
    capsys.readouterr()
    assert main(["info", db(dst, "val")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{db(dst, 'val')}: fastlmdb format {fmt.FORMAT_VERSION}, made by")
    assert "  6 jpeg images in 3 classes, " in out
    assert "  0 changed at conversion, 0 skipped" in out
    assert main(["info", db(dst, "val"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 6 and info["classes"] == ["n00000000", "n00000001", "n00000002"]


def test_missing_source_is_one_error_line(tmp_path, dst, capsys):
    assert main(convert_args(os.fspath(tmp_path / "nowhere"), dst)) == 1
    captured = capsys.readouterr()
    line = assert_one_error_line(captured.err)
    assert re.search(r"source folder .*nowhere/train does not exist", line)
    assert captured.out == ""


def test_existing_target_is_one_error_line(tree, dst, capsys):
    assert main(convert_args(tree, dst, split=("val",))) == 0
    capsys.readouterr()
    assert main(convert_args(tree, dst, split=("val",))) == 1
    line = assert_one_error_line(capsys.readouterr().err)
    assert "val.lmdb already exists; pass --overwrite" in line
    assert main(convert_args(tree, dst, "--overwrite", split=("val",))) == 0


def test_bad_file_error_names_it_and_the_way_out(tree, dst, bad_files, capsys):
    (bad,) = bad_files(os.path.join(tree, "val", "n00000002"), kinds=["text"])
    assert main(convert_args(tree, dst, split=("val",))) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after whatever the progress bar drew
    assert last.startswith(f"fastlmdb convert: error: {bad}: not a readable image")
    assert "--on-error skip" in last
    # `info` on the unfinished database says so, in one line too.
    assert main(["info", db(dst, "val")]) == 1
    line = assert_one_error_line(capsys.readouterr().err, command="info")
    assert "is not finished" in line and "run the same `fastlmdb convert` command" in line


@pytest.mark.parametrize("value, message", [("0", "must be >= 1, got 0"),
                                            ("two", "must be a whole number, got 'two'")])
def test_bad_procs_is_a_usage_error(tree, dst, capsys, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--from-dir", tree, "--to-dir", dst, "--split", "val", "--procs", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"fastlmdb convert: error: argument --procs: {message}" in err
    assert "Traceback" not in err
    assert not os.path.exists(dst)


def test_info_of_a_missing_database(tmp_path, capsys):
    assert main(["info", os.fspath(tmp_path / "none.lmdb")]) == 1
    line = assert_one_error_line(capsys.readouterr().err, command="info")
    assert "none.lmdb does not exist; make it with `fastlmdb convert`" in line


def test_scripts_convert_py(tree, dst):
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "convert.py"), "--from-dir", tree,
         "--to-dir", dst, "--split", "val", "--procs", "1"],
        capture_output=True, text=True, timeout=50, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert f"{db(dst, 'val')}: 6 images" in done.stdout
    assert store.read_file_catalog(db(dst, "val"))[0]["count"] == 6


def test_ctrl_c_says_how_to_resume(tree, dst, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(converter, "convert", interrupted)
    code = main(["convert", "--from_dir", str(tree), "--to_dir", str(dst), "--split", "train"])
    err = capsys.readouterr().err
    assert code == 130
    assert "interrupted" in err and "run the same command again to resume" in err


def test_a_short_epoch_is_timed_on_clocks_that_see_it():
    """An epoch of a few milliseconds reads more than 0 CPU seconds (os.times counted 10 ms
    ticks: the demo divided by 0), and a tiny loader is repeated for at least min_seconds."""
    from fastlmdb.cli.demo import time_epoch

    def loader():
        return [(None, list(range(8)))]

    once = time_epoch(loader)
    assert once.images == 8 and once.cpu >= 0
    repeated = time_epoch(loader, min_seconds=0.05)
    assert repeated.images > 8 and repeated.images % 8 == 0 and repeated.wall >= 0.05
    assert repeated.cpu > 0 and repeated.per_cpu_second > 0


@pytest.mark.slow
@pytest.mark.timeout(300)  # 4 recipes x 2 loaders x (1 warm epoch + >= 1 s)
def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--dir", os.fspath(tmp_path), "--classes", "2", "--per-class", "4",
                 "--workers", "0"]) == 0
    out = capsys.readouterr().out
    for recipe in ("v1 train", "v2 train (float)", "v2 train (uint8)", "val"):
        for loader in ("ImageFolder", "LMDBDataset"):  # the one-line swap, recipe unchanged
            assert re.search(re.escape(f"{recipe:18} {loader}") + r"\s+\d+\s+\d+\s+\d+\.\d\dx",
                             out), out
    assert "path: native: decode-aware RandomResizedCrop(224) + flip + ToTensor + normalise" in out
    assert "train.lmdb: 8 images" in out

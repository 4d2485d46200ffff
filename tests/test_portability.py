"""macOS and Windows: each Linux-only call the package makes is taken away here, and the
converter, both datasets (in DataLoader workers), stage and merge still give the same results.
Linux is where this runs; the other systems themselves are not tested (see docs/api.md)."""

import json
import os
import subprocess
import sys

import lmdb
import numpy as np
import probes
import pytest

from fastlmdb.cli import main
from fastlmdb.converter import default_procs
from fastlmdb.core import files, store
from fastlmdb.core import format as fmt
from fastlmdb.tools import merge
from helpers import assert_same_database, db, run_convert

pytestmark = pytest.mark.slow  # conversions and loaders in child processes, twice

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Imported at start-up by every Python process of the run, spawned children included.
NOT_LINUX = """\
import os, sys
for name in ("sched_getaffinity", "memfd_create"):
    if hasattr(os, name):
        delattr(os, name)
sys.modules["fcntl"] = None  # `import fcntl` raises ImportError, as on Windows
"""


def probe(tree, base, shim):
    dst, local = os.path.join(base, "dst"), os.path.join(base, "local")
    done = subprocess.run(probes.command("portability_probe", tree, dst, local,
                                         python_options=("-W", "ignore")),
                          env=probes.env(*filter(None, [shim])), capture_output=True,
                          text=True, timeout=100, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1]), dst


def test_without_linux_only_calls_same_results(tree, tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(NOT_LINUX)
    linux, linux_dst = probe(tree, tmp_path / "linux", None)
    other, other_dst = probe(tree, tmp_path / "other", os.fspath(shim))
    assert linux["memfd_create"] and linux["sched_getaffinity"] and linux["fcntl"]
    assert not (other["memfd_create"] or other["sched_getaffinity"] or other["fcntl"])
    assert other["default_procs_is_cpu_count"]
    assert other["images"] == linux["images"] == 12
    assert len(other["map"]) == len(other["iter"]) == 3  # 12 samples, batches of 4
    for key in ("map", "iter", "staged", "left_in_dst"):
        assert other[key] == linux[key], key
    assert other["left_in_dst"] == ["train.lmdb"]  # no lock file left behind
    assert assert_same_database(db(other_dst), db(linux_dst)) == 12


def test_help_and_default_procs_without_sched_getaffinity(monkeypatch, capsys):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert default_procs() == os.cpu_count()
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "--help"])
    assert exit_.value.code == 0
    assert "--procs" in capsys.readouterr().out


def test_windows_map_starts_small_and_grows(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(store, "WINDOWS_FIRST_MAP", 1 << 20)
    path = os.fspath(tmp_path / "w.lmdb")
    writer = store.Writer(path, map_size=16 << 30)
    assert writer.env.info()["map_size"] == 1 << 20  # not 16 GiB of file on Windows
    payloads = [bytes([k]) * (256 << 10) for k in range(12)]  # 3 MiB: it must grow
    for k in range(0, 12, 4):
        writer.commit(k, payloads[k:k + 4], np.zeros(0, dtype=fmt.ROW), {})
    assert writer.env.info()["map_size"] >= 4 << 20
    writer.close()
    env = lmdb.open(path, subdir=False, max_dbs=store.MAX_DBS, readonly=True, lock=False)
    with env.begin(db=env.open_db(fmt.IMAGES_DB, create=False)) as txn:
        assert [bytes(v) for _, v in txn.cursor()] == payloads
    env.close()
    # Reopened (a resume), the map is never smaller than the file.
    assert store.Writer(path, map_size=16 << 30).env.info()["map_size"] >= os.path.getsize(path)


def test_windows_merge_same_as_one_file(tree, tmp_path, monkeypatch):
    run_convert(tree, tmp_path / "one")
    run_convert(tree, tmp_path / "sharded", shards=3)
    monkeypatch.setattr(sys, "platform", "win32")  # merge writes in this process
    monkeypatch.setattr(store, "WINDOWS_FIRST_MAP", 1 << 16)
    merged = merge.merge(db(tmp_path / "sharded"))
    assert assert_same_database(merged, db(tmp_path / "one")) == 12
    assert not os.path.exists(files.lock_path(merged + ".partial"))


def test_python_dash_m_fastlmdb_is_the_command():
    done = subprocess.run([sys.executable, "-m", "fastlmdb", "--help"], capture_output=True,
                          text=True, timeout=60, check=False,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr
    assert "convert" in done.stdout and "verify" in done.stdout


def test_top_level_api_is_typed_and_torch_free():
    done = subprocess.run([sys.executable, "-c", "import sys, fastlmdb\n"
                           "from fastlmdb import Options, Report, Stats, convert, merge, "
                           "stage, verify\nprint('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=60, check=False,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.stdout.strip() == "False", done.stderr
    assert os.path.exists(os.path.join(ROOT, "fastlmdb", "py.typed"))

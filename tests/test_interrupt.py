"""Fault injection: a conversion stopped at varied points, in varied ways, resumes to the
same database as an uninterrupted run, and leaves no process behind."""

import os
import subprocess

import psutil
import probes
import pytest
from helpers import db, make_tree, read_db, run_convert, without_times

from fastlmdb.converter import pipeline
from fastlmdb.core import format as fmt

pytestmark = pytest.mark.slow  # conversions killed in child processes

# A producer that dies does not stop the run: its work goes to the others (test_convert.py).
HOWS = ["main-SIGKILL", "main-SIGTERM", "main-SIGINT", "writer-SIGKILL"]
POINTS = [1, 40, 90]  # source files done before the stop (of 100)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    make_tree(root, {"train": {"a": 34, "b": 33, "c": 33}})
    return root


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    dst = tmp_path_factory.mktemp("reference")
    run_convert(source, dst, procs=2)
    return read_db(db(dst))


def _interrupt(source, dst, how, at, shards=1):
    probe = subprocess.run(probes.command("interrupt_probe", source, dst, how, at, shards),
                           env=probes.env(), capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0, probe.stdout + probe.stderr
    assert os.path.exists(fmt.partial_path(db(dst))) and not os.path.exists(db(dst))
    return [int(pid) for pid in probe.stdout.split()]


def _assert_all_gone(pids):
    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, f"left behind: {alive}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("at", POINTS)
@pytest.mark.parametrize("how", HOWS)
def test_stopped_conversion_resumes_to_the_same_database(source, reference, tmp_path, how, at):
    dst = tmp_path / "dst"
    children = _interrupt(source, dst, how, at)
    assert len(children) == 3  # the writer and two producers were running
    _assert_all_gone(children)
    stats = run_convert(source, dst, procs=2)
    info, rows, values = read_db(db(dst))
    ref_info, ref_rows, ref_values = reference
    # Committed work is kept: all but the chunk in flight when the stop came.
    assert stats.resumed_at >= at - pipeline.CHUNK
    assert without_times(info) == without_times(ref_info)
    assert (rows == ref_rows).all()
    assert values == ref_values


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["main-SIGKILL", "writer-SIGKILL"])
def test_stopped_sharded_conversion_resumes_to_the_same_database(source, reference, tmp_path,
                                                                 how):
    dst = tmp_path / "dst"
    _assert_all_gone(_interrupt(source, dst, how, 50, shards=3))  # in the second shard
    stats = run_convert(source, dst, procs=2, shards=3)
    assert stats.resumed_at >= 50 - pipeline.CHUNK
    info, rows, values = read_db(db(dst))
    ref_info, ref_rows, ref_values = reference
    assert without_times({k: v for k, v in info.items() if k != "shards"}) == \
        without_times(ref_info)
    assert (rows == ref_rows).all()
    assert values == ref_values

"""The loader under load: two distributed ranks (gloo, real processes), each with two
persistent DataLoader workers, several epochs: every sample exactly once per epoch, no hang,
and worker memory (PSS, not RSS, which counts the shared page cache) stays flat."""

import json
import os
import socket
import subprocess
import sys

import pytest
from helpers import make_tree, run_convert

from fastlmdb import LMDBDataset
from lmdb_probes import checksum

EPOCHS = 4
PROBE = os.path.join(os.path.dirname(__file__), "rank_probe.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expected(root):
    dataset = LMDBDataset(root, "train", checksum, output="numpy")
    return [dataset[i][0] for i in range(len(dataset))]


@pytest.mark.timeout(240)
def test_two_ranks_with_workers_read_each_sample_once_per_epoch(tmp_path):
    make_tree(tmp_path / "src", {"train": {"a": 40, "b": 40, "c": 41}})  # 121: uneven
    run_convert(tmp_path / "src", tmp_path / "dst")
    # The tests' folder for the probe, and this checkout's fastlmdb before any installed one.
    tests = os.path.dirname(os.path.abspath(__file__))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.path.dirname(tests)])}
    ranks = [subprocess.Popen([sys.executable, PROBE, str(tmp_path / "dst"), str(r), "2",
                               str(port), str(EPOCHS)], stdout=subprocess.PIPE, env=env,
                              text=True) for r in range(2)]
    outputs = [json.loads(rank.communicate(timeout=200)[0]) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0]
    expected = _expected(tmp_path / "dst")
    orders = []
    for epoch in range(EPOCHS):
        shares = [out["seen"][epoch] for out in outputs]
        assert len(shares[0]) == len(shares[1]) == 61  # equal: one sample padded
        union = sorted(shares[0] + shares[1])
        assert sorted(set(union)) == sorted(set(expected))  # nothing missing
        assert len(union) - len(set(union)) == 1  # the one pad, no other duplicate
        orders.append(shares[0])
    assert orders[0] != orders[1]  # set_epoch reached the persistent workers
    for out in outputs:
        first, last = out["pss"][0], out["pss"][-1]
        assert len(first) == len(last) == 2  # the same two persistent workers
        growth = max(b - a for a, b in zip(first, last))
        assert growth < 8 * 2 ** 20, f"a worker's PSS grew by {growth / 2 ** 20:.1f} MB"

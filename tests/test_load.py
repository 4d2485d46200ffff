"""The loader under load: two distributed ranks (gloo, real processes), each with two
persistent DataLoader workers, several epochs: every sample exactly once per epoch, no hang,
and worker memory (PSS, not RSS, which counts the shared page cache) stays flat."""

import json
import socket
import subprocess

import probes
import pytest
from helpers import make_tree, run_convert

from fastlmdb import LMDBDataset
from probes.lmdb_probes import checksum

pytestmark = pytest.mark.slow  # two gloo ranks with workers, four epochs

EPOCHS = 4


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
    port = _free_port()
    ranks = [subprocess.Popen(probes.command("rank_probe", tmp_path / "dst", r, 2, port, EPOCHS),
                              stdout=subprocess.PIPE, env=probes.env(), text=True)
             for r in range(2)]
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

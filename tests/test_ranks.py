"""Distributed ranks as training jobs start them, with DataLoader workers started by fork,
spawn and forkserver, persistent or not: every sample exactly once per epoch across ranks.

A worker started by spawn or forkserver has no process group of its own: the rank it reads
for must come with the dataset from the process that built the loader. Ranks run in child
programs (dist_probe.py) on gloo over loopback, started by torch.multiprocessing.spawn or
as separate programs configured by environment variables (as torchrun does).
"""

import collections
import json
import os
import signal
import socket
import subprocess
import time

import probes
import pytest
from torch.utils.data import DistributedSampler

from probes import dist_probe
from fastlmdb import EpochSampler, LMDBDataset
from fastlmdb.core import catalog
from fastlmdb.core import format as fmt
from fastlmdb.loading import order
from probes.lmdb_probes import checksum

pytestmark = pytest.mark.slow  # ranks started as programs and by torch.multiprocessing.spawn

WORLD = 2
SECONDS = 500  # for all configurations of one job: generous, the machine may be busy


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finish(processes):
    """Wait for every process (killing all of them if one hangs); their stderr."""
    errors, deadline = [], time.monotonic() + SECONDS
    try:
        for process in processes:
            left = max(1, deadline - time.monotonic())
            errors.append(process.communicate(timeout=left)[1])
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # with its ranks and workers
                process.wait(timeout=30)
    codes = [process.returncode for process in processes]
    assert codes == [0] * len(processes), f"exit statuses {codes}:\n" + "\n".join(
        e[-3000:] for e in errors)


def _results(out):
    results = []
    for rank in range(WORLD):
        with open(os.path.join(out, f"rank{rank}.json")) as file:
            results.append(json.load(file))
    return results


@pytest.fixture(scope="module")
def samples(uneven_db):
    """[(checksum, label)] of the 37 records, in index order."""
    ds = LMDBDataset(uneven_db, "train", checksum, output="numpy")
    return [tuple(ds[i]) for i in range(len(ds))]


@pytest.fixture(scope="module")
def logical(uneven_db):
    """The record index of each key: the iterable dataset's epoch order is over keys (the
    order records were written in)."""
    return catalog.read_tables(fmt.db_path(uneven_db, "train"))[2]


def _expected_share(name, samples, logical, rank, epoch):
    """The indices rank `rank` must see in epoch `epoch` under configuration `name`."""
    if name.startswith("iter"):
        epoch_order = order.epoch_order(len(samples), shuffle=True, seed=dist_probe.SEED,
                                        epoch=epoch)
        return logical[order.rank_share(epoch_order, rank, WORLD)].tolist()
    if name == "map-EpochSampler":
        sampler = EpochSampler(samples, seed=dist_probe.SEED, rank=rank, world_size=WORLD)
    else:
        sampler = DistributedSampler(samples, num_replicas=WORLD, rank=rank,
                                     seed=dist_probe.SEED)
    sampler.set_epoch(epoch)
    return list(sampler)


def _check(results, samples, logical, configs):
    names = [config[0] for config in configs]
    assert all(list(result) == names for result in results)
    pad = -len(samples) % WORLD
    for name in names:
        for epoch in range(dist_probe.EPOCHS):
            seen = [collections.Counter(map(tuple, r[name][epoch])) for r in results]
            # Without the library's arithmetic: equal shares that cover every sample, and
            # the only samples seen twice are the DistributedSampler-style pad.
            assert [sum(s.values()) for s in seen] == [-(-len(samples) // WORLD)] * WORLD, name
            union = sum(seen, collections.Counter())
            assert set(union) == set(samples), f"{name}, epoch {epoch}: samples missing"
            assert sum(union.values()) - len(samples) == pad, f"{name}, epoch {epoch}"
            for rank in range(WORLD):  # and exactly each rank's share
                share = _expected_share(name, samples, logical, rank, epoch)
                assert seen[rank] == collections.Counter(samples[i] for i in share), \
                    f"{name}, rank {rank}, epoch {epoch}: not its share"
        assert results[0][name][0] != results[0][name][1], f"{name}: set_epoch did not reach"


@pytest.mark.timeout(SECONDS + 60)
def test_ranks_started_by_torch_multiprocessing_spawn(uneven_db, samples, logical, tmp_path):
    launcher = subprocess.Popen(
        probes.command("dist_probe", "spawn", uneven_db, tmp_path, _free_port(), SECONDS - 20),
        env=probes.env(), stderr=subprocess.PIPE, text=True, start_new_session=True)
    _finish([launcher])
    _check(_results(tmp_path), samples, logical, dist_probe.CONFIGS)


@pytest.mark.timeout(SECONDS + 60)
def test_ranks_started_as_separate_programs(uneven_db, samples, logical, tmp_path):
    port = _free_port()
    ranks = [subprocess.Popen(
        probes.command("dist_probe", "env", uneven_db, tmp_path, 60),
        env=probes.env(RANK=rank, WORLD_SIZE=WORLD, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        stderr=subprocess.PIPE, text=True, start_new_session=True) for rank in range(WORLD)]
    _finish(ranks)
    _check(_results(tmp_path), samples, logical, dist_probe.PROGRAM_CONFIGS)

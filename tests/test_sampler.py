"""EpochSampler (map-style) and both datasets under torchdata's StatefulDataLoader: each rank
an equal disjoint share of an order that depends on (seed, epoch) only; a job stopped after k
batches resumes with exactly the rest of the epoch."""

import itertools

import numpy as np
import pytest
import torch

from probes.lmdb_probes import checksum
from torchdata.stateful_dataloader import StatefulDataLoader

from fastlmdb import EpochSampler, LMDBDataset, LMDBIterDataset

BATCH = 4
pytestmark = [pytest.mark.filterwarnings("ignore:This DataLoader will create"),
              pytest.mark.filterwarnings("ignore:.set_vital. is deprecated")]


@pytest.fixture(scope="module")
def dataset(uneven_db):
    return LMDBDataset(uneven_db, "train", checksum, output="numpy")


def _checksums(loader, batches=None):
    return [int(c) for batch, _ in itertools.islice(loader, batches) for c in batch]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_ranks_share_one_order_that_ignores_world_size(world_size):
    data = range(37)
    whole = list(EpochSampler(data, seed=7))
    shares = [list(EpochSampler(data, seed=7, rank=r, world_size=world_size))
              for r in range(world_size)]
    assert len({len(share) for share in shares}) == 1  # equal shares
    joined = [i for share in shares for i in share]
    assert joined[:37] == whole and sorted(whole) == list(range(37))
    assert joined[37:] == whole[:len(joined) - 37]  # padding repeats the first, as torch's


def test_epochs_differ_and_repeat():
    sampler = EpochSampler(range(50), seed=1)
    first = list(sampler)
    second = list(sampler)  # nobody called set_epoch: the next epoch
    assert sampler.epoch == 1 and second != first and sorted(second) == list(range(50))
    sampler.set_epoch(0)  # an explicit epoch wins, and repeats
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) == second
    assert list(EpochSampler(range(50), seed=1, shuffle=True)) == first
    partial = EpochSampler(range(50), seed=1)
    next(iter(partial)), iter(partial)  # iterators dropped unfinished (as loaders make them)
    assert list(partial) == first  # still epoch 0
    assert list(EpochSampler(range(50), shuffle=False)) == list(range(50))
    dropped = EpochSampler(range(37), rank=1, world_size=2, drop_last=True)
    assert len(dropped) == len(list(dropped)) == 18


@pytest.mark.parametrize("count, world_size, drop_last",
                         [(37, 1, False), (37, 2, False), (37, 2, True), (37, 5, True),
                          (40, 4, False)])
def test_it_is_a_distributed_sampler_of_the_same_shape(count, world_size, drop_last):
    """Frameworks leave a DistributedSampler as it is (Lightning's Trainer wraps or replaces
    only other samplers) and read its attributes: they are torch's."""
    for rank in range(world_size):
        ours = EpochSampler(range(count), rank=rank, world_size=world_size,
                            drop_last=drop_last, seed=3)
        torchs = torch.utils.data.DistributedSampler(range(count), num_replicas=world_size,
                                                     rank=rank, drop_last=drop_last, seed=3)
        assert isinstance(ours, torch.utils.data.DistributedSampler)
        assert len(ours) == len(list(ours)) == len(torchs) == ours.num_samples
        assert (ours.num_replicas, ours.rank, ours.total_size, ours.seed, ours.drop_last) == \
            (world_size, rank, torchs.total_size, 3, drop_last)
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(range(count), rank=world_size, world_size=world_size)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("before, after", [(2, 0), (0, 2)])
def test_plain_dataloader_resumes_with_samples_seen(dataset, before, after):
    def loader(sampler, workers):
        return torch.utils.data.DataLoader(dataset, batch_size=BATCH, sampler=sampler,
                                           num_workers=workers)

    reference = EpochSampler(dataset, seed=3)
    reference.set_epoch(4)
    whole = _checksums(loader(reference, 0))
    first = EpochSampler(dataset, seed=3)
    first.set_epoch(4)
    seen = _checksums(loader(first, before), batches=3)
    state = first.state_dict(samples_seen=len(seen))
    again = EpochSampler(dataset, seed=3)
    again.load_state_dict(state)
    assert seen + _checksums(loader(again, after)) == whole
    with pytest.raises(ValueError, match="seed=3"):
        EpochSampler(dataset, seed=4).load_state_dict(state)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resumes_the_map_style_dataset(dataset, workers):
    def loader(epoch=0):
        sampler = EpochSampler(dataset, seed=3)
        sampler.set_epoch(epoch)
        return StatefulDataLoader(dataset, batch_size=BATCH, sampler=sampler,
                                  num_workers=workers)

    whole = _checksums(loader(epoch=4))
    first = loader(epoch=4)
    iterator = iter(first)
    seen = [int(c) for batch, _ in itertools.islice(iterator, 3) for c in batch]
    state = first.state_dict()  # workers have prefetched beyond these 3 batches
    again = loader()  # epoch 0 until the state says 4
    again.load_state_dict(state)
    assert seen + _checksums(again) == whole


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resumes_the_iterable_dataset(uneven_db, workers):
    def loader(epoch=0):
        stream = LMDBIterDataset(uneven_db, "train", checksum, output="numpy", shuffle=True,
                                 seed=5, batch_size=BATCH)
        stream.set_epoch(epoch)
        return StatefulDataLoader(stream, batch_size=BATCH, num_workers=workers)

    whole = _checksums(loader(epoch=2))
    assert sorted(whole) == sorted(_checksums(torch.utils.data.DataLoader(
        LMDBDataset(uneven_db, "train", checksum, output="numpy"), batch_size=BATCH)))
    first = loader(epoch=2)
    iterator = iter(first)
    seen = [int(c) for batch, _ in itertools.islice(iterator, 3) for c in batch]
    state = first.state_dict()
    again = loader()  # epoch 0 until the state says 2
    again.load_state_dict(state)
    rest = _checksums(again)
    assert seen + rest == whole
    assert np.unique(seen + rest).size == len(whole)

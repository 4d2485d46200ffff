"""Mid-epoch resume of LMDBIterDataset: a job stopped after n samples continues with exactly the
rest of that epoch, in the same order, with another number of DataLoader workers."""

import itertools

import pytest
import torch

from probes.lmdb_probes import checksum

from fastlmdb import LMDBIterDataset

BATCH = 4
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def _stream(uneven_db, **kwargs):
    return LMDBIterDataset(uneven_db, "train", checksum, output="numpy", shuffle=True, seed=5,
                           batch_size=BATCH, **kwargs)


def _samples(dataset, workers, batches=None):
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=workers)
    return [int(c) for batch, _ in itertools.islice(loader, batches) for c in batch]



@pytest.mark.timeout(120)
@pytest.mark.parametrize("before, after", [(2, 3), (3, 0), (0, 2)])
@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_sees_exactly_the_rest_of_the_epoch(uneven_db, before, after, world_size):
    for rank in range(world_size):
        reference = _stream(uneven_db, rank=rank, world_size=world_size)
        reference.set_epoch(2)
        whole = _samples(reference, 0)
        reference.set_epoch(2)  # else the next iteration is epoch 3
        assert _samples(reference, before) == whole  # workers by batch keep the order

        first = _stream(uneven_db, rank=rank, world_size=world_size)
        first.set_epoch(2)
        seen = _samples(first, before, batches=3)
        state = first.state_dict(samples_seen=len(seen))

        again = _stream(uneven_db, rank=rank, world_size=world_size)
        again.load_state_dict(state)
        rest = _samples(again, after)
        assert seen + rest == whole
        assert len(whole) == -(-37 // world_size)


@pytest.mark.timeout(60)
def test_a_second_stop_in_the_same_epoch_adds_up(uneven_db):
    reference = _stream(uneven_db)
    reference.set_epoch(1)
    whole = _samples(reference, 0)
    job = _stream(uneven_db)
    job.set_epoch(1)
    seen = _samples(job, 2, batches=2)
    job.load_state_dict(job.state_dict(samples_seen=len(seen)))
    more = _samples(job, 2, batches=3)
    job.load_state_dict(job.state_dict(samples_seen=len(more)))
    assert seen + more + _samples(job, 1) == whole
    job.set_epoch(2)  # a new epoch starts from its beginning
    assert len(_samples(job, 0)) == 37


def test_a_state_from_another_order_is_refused(uneven_db):
    state = _stream(uneven_db).state_dict(samples_seen=8)
    other = LMDBIterDataset(uneven_db, "train", shuffle=True, seed=6, batch_size=BATCH)
    with pytest.raises(ValueError, match="seed=5"):
        other.load_state_dict(state)
    unbatched = LMDBIterDataset(uneven_db, "train", shuffle=True, seed=5)
    with pytest.raises(ValueError, match="batch_size"):
        unbatched.load_state_dict(state)

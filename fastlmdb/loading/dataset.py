"""PyTorch datasets over a fastlmdb database: drop-in replacements for ImageFolder.

``LMDBDataset`` is map-style (random access by key); ``LMDBIterDataset`` reads with a cursor in
key order, each sample exactly once per epoch across DataLoader workers and distributed ranks.
What both share (the records, their decode, the recipe) is records.py's.
"""

from __future__ import annotations

import logging
import numbers
import os
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence, cast

import numpy as np
import torch
import torch.utils.data

from fastlmdb.core import remote
from fastlmdb.loading import batch, crops, order, progress, sampler, streaming
from fastlmdb.loading.records import Records, Size, StrPath, Transform
from fastlmdb.core import format as fmt
from fastlmdb.core.errors import DatabaseError, DecodeError

if TYPE_CHECKING:
    from fastlmdb.loading.records import Ints

log = logging.getLogger(__name__)


class LMDBDataset(Records, torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Map-style dataset over ``root/<split>.lmdb``; a drop-in for ``ImageFolder``.

    Args:
        root: folder holding ``<split>.lmdb``.
        split: ``"train"``, ``"val"``, ...
        transform, target_transform: as for ImageFolder. The transform receives a PIL RGB
            image (``output="pil"``), a uint8 CHW tensor (``"tensor"``) or a uint8 HWC array
            (``"numpy"``).
        shuffle: permute the index mapping once, reproducibly from `seed`.
        imgtype: ``"jpeg"`` or ``"numpy"``; read from the database when None, checked if given.
        decoder: ``"simplejpeg"`` (default), ``"turbojpeg"`` or ``"pil"``.
        min_size: decode JPEGs at the smallest scale whose size is at least this (h, w).
        on_error: ``"raise"`` (default) or ``"skip"``: a record that fails to decode is
            replaced by the next decodable one and counted in ``errors``.
        decode_aware: accepted for older code; the default now does it (below).
        threads: threads that decode each in-place batch (below) in this process, with
            ``num_workers=0`` or inside each worker; the pixels do not depend on it.
        exact: decode whole images and run the transform as written, pixel for pixel what
            ImageFolder gives (only a fastlmdb crop at its head still runs on the bytes).

    By default the transform is planned (fastlmdb.loading.recipes, docs/recipes.md):
    torchvision's or timm's crop at its head runs decode-aware on the stored bytes (the same
    random draws, pixels within a few dB of torchvision's), then the flips, then the per-pixel
    steps (ToTensor, ToDtype, Normalize...) as one lookup table; the first other step and all
    after it run per sample on what they would have received. When all of it is native, the
    DataLoader's batches are decoded in place into one tensor each, of the dtype the transform
    gives, and handed over without stacking (fastlmdb.batch). ``pipeline()`` says which path.
    """

    def __init__(self, root: StrPath, split: str, transform: Transform | None = None,
                 target_transform: Transform | None = None, shuffle: bool = False,
                 imgtype: str | None = None, *, output: str = "pil",
                 decoder: str = "simplejpeg", min_size: Size | None = None,
                 on_error: str = "raise", seed: int = 0, decode_aware: bool = False,
                 threads: int = 1, exact: bool = False) -> None:
        threads = _checked_threads(threads)  # before the database is opened
        if remote.is_url(os.fspath(root)):
            raise DatabaseError(
                f"{root}: LMDBDataset reads records at random, which needs the database on "
                f"local disk: copy it with `fastlmdb stage {fmt.db_path(os.fspath(root), split)} "
                "LOCAL_DIR` and pass LOCAL_DIR, or stream it in order with "
                "LMDBIterDataset(..., cache_dir=..., cache_limit=...)")
        super().__init__(root, split, transform, target_transform, imgtype, output=output,
                         decoder=decoder, min_size=min_size, on_error=on_error,
                         decode_aware=decode_aware, exact=exact)
        self.shuffle, self.threads = shuffle, threads
        # None: the identity, which costs no memory in every worker.
        self._index = np.random.default_rng(seed).permutation(self._count) if shuffle else None

    def __len__(self) -> int:
        return self._count

    @property
    def targets(self) -> list[int]:
        labels = self._labels if self._index is None else self._labels[self._index]
        return labels.tolist()  # type: ignore[no-any-return]

    def _sample_order(self) -> Sequence[int]:
        return range(self._count) if self._index is None else self._index.tolist()

    def _position(self, i: int) -> int:
        """The record index of dataset position `i`."""
        if self._index is None:
            if not -self._count <= i < self._count:
                raise IndexError(f"index {i} is out of range for {self._count} records")
            return i % self._count
        return int(self._index[i])

    def __getitem__(self, i: int) -> Any:
        self._announce()
        index = self._position(i)
        for attempt in range(self._count):
            probe = (index + attempt) % self._count
            try:
                return self._record(probe, self._reader.get(self._key(probe)))
            except DecodeError as exc:
                self._skip_or_raise(exc)
        raise DatabaseError(f"no record of {self.path} could be decoded")

    def __getitems__(self, positions: Sequence[int]) -> list[Any]:
        """A whole batch (the DataLoader calls this): all lookups first, then the decodes;
        in place into one batch tensor where the pipeline allows (see fastlmdb.batch)."""
        self._announce()
        indices = [self._position(i) for i in positions]
        values = self._reader.get_many(self._keys(indices).tolist())
        if self._decodes_in_place():
            return self._batch_in_place(positions, indices, values)
        samples = []
        for i, index, value in zip(positions, indices, values):
            try:
                samples.append(self._record(index, value))
            except DecodeError:
                samples.append(self[i])  # raises, or substitutes and counts, as for one sample
        return samples

    def _batch_in_place(self, positions: Sequence[int], indices: list[int],
                        values: Sequence[Any]) -> list[batch.Sample]:
        """The samples of one batch, decoded into one images tensor (batch.Sample views):
        natively where it can be (batch.fill), else slot by slot."""
        crop, rows = cast(crops.DecodeCrop, self._crop), self._rows[indices]
        images, labels = batch.empty(len(positions), crop.size, self._recipe.dtype)
        label_list, _ = batch.fill(
            images, values, rows, crop, self._recipe.flips, self.threads, self._natively(rows),
            lambda n, slot: self._slot(positions[n], indices[n], values[n], slot),
            self._recipe.table)
        labels.numpy()[:] = label_list
        return batch.samples(images, labels, label_list)

    def _slot(self, i: int, index: int, value: Any, image: torch.Tensor) -> int:
        """The per-sample path into one slot: its label."""
        try:
            return self._record_into(index, value, image)
        except DecodeError:
            substitute, label = self[i]  # raises, or substitutes and counts, as for one sample
            if substitute.dtype != image.dtype and self._recipe.table is not None:
                substitute = batch.apply_table(substitute, self._recipe.table)
            image.copy_(substitute)
            return int(label)


# Physical orders that sequential reads do not mix: (where the records are, how to do better).
_UNMIXED = {"source": ("in class order", "without --order source"),
            fmt.ARCHIVE_ORDER: ("in the order of the compressed tar they came from (class order, "
                                "often)", "from the decompressed .tar")}


class LMDBIterDataset(Records, torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """Iterable dataset reading ``root/<split>.lmdb`` in key order.

    Each sample is yielded exactly once per epoch across all DataLoader workers and ranks.
    Ranks come from torch.distributed when it is initialised, or from `rank`/`world_size`;
    the dataset pickled for workers started by spawn or forkserver (which have no process
    group) carries the rank of the process that pickled it.
    Every rank gets the same number of samples: where the count does not divide evenly, the
    first samples of the epoch are repeated (fewer than `world_size` of them), or with
    ``drop_last=True`` the last ones dropped, exactly as ``DistributedSampler`` does.

    ``shuffle=True`` shuffles the order of blocks of records, then records within a window of
    blocks (``order.BLOCK * order.WINDOW_BLOCKS`` records), which a worker reads in key order
    and yields shuffled, so reads stay sequential. The order is a pure function of (seed,
    epoch). Each iteration is the next epoch: the n-th since ``set_epoch(e)`` (or since
    construction, e = 0) is epoch e + n, counted in each process (fastlmdb.loading.progress),
    so loops that never call ``set_epoch`` (Lightning) get a new order every epoch; calling
    it before each epoch (it reaches persistent workers too) pins the epoch explicitly.

    Give it the DataLoader's batch size: as `batch_size`, by ``set_batch_size(n)``, or by
    making the loader with ``fastlmdb.loader(dataset, batch_size=n, ...)``, which sets it.
    Workers then take turns by whole batches, so ``len(loader)`` is the number of batches they
    yield (Lightning and progress bars ask it): without it, each of several workers ends the
    epoch on a partial batch, a loop that stops after ``len(loader)`` batches drops one, and
    worker 0 warns once, saying what to pass.

    Mid-epoch resume needs the batch size too: each rank then sees its share of the epoch in
    order, and
    ``state_dict(samples_seen=n)`` / ``load_state_dict(state)`` continue after the n samples
    this rank has consumed, with any number of workers: none twice, none missing.
    With the batch size known and a transform that runs all native (see LMDBDataset and
    ``pipeline()``), each batch is decoded in place into one tensor, as LMDBDataset does
    (fastlmdb.batch), on `threads` threads. ``exact=True`` as for LMDBDataset.
    """

    def __init__(self, root: StrPath, split: str, transform: Transform | None = None,
                 target_transform: Transform | None = None, shuffle: bool = False,
                 imgtype: str | None = None, *, output: str = "pil",
                 decoder: str = "simplejpeg", min_size: Size | None = None,
                 on_error: str = "raise", seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = False,
                 batch_size: int | None = None, decode_aware: bool = False,
                 threads: int = 1, cache_dir: StrPath | None = None,
                 cache_limit: int | str | None = None,
                 storage_options: Mapping[str, Any] | None = None, window_shards: int = 1,
                 prefetch_shards: int = 2, exact: bool = False) -> None:
        threads = _checked_threads(threads)
        stream = streaming.open_split(
            fmt.db_path(os.fspath(root), split), cache_dir=cache_dir, cache_limit=cache_limit,
            storage_options=storage_options, window_shards=window_shards,
            prefetch_shards=prefetch_shards)
        super().__init__(root, split, transform, target_transform, imgtype, output=output,
                         decoder=decoder, min_size=min_size, on_error=on_error,
                         decode_aware=decode_aware, exact=exact, stream=stream)
        self._session: Any = None  # the streamed reads of the iteration under way
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.threads = threads
        self._rank, self._world_size = rank, world_size
        if shuffle and self.physical_order in _UNMIXED:
            where, again = _UNMIXED[self.physical_order]
            warnings.warn(
                f"{self.path} stores its records {where}: shuffle=True mixes blocks of "
                f"{order.BLOCK} within windows of {order.BLOCK * order.WINDOW_BLOCKS} records, so "
                f"a batch holds only a few classes. Convert it again {again} (the default "
                "shuffles the write order), or use LMDBDataset with EpochSampler",
                UserWarning, stacklevel=2)
        # Epoch, resume point, iterations begun, batch size: shared, so they reach persistent
        # workers.
        self._progress = progress.Progress()
        if batch_size is not None:
            self.set_batch_size(batch_size)
        # This process's own: samples its iteration handed out, and a worker's resume point.
        self._yielded = self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """The next iteration of every process (workers too) is epoch `epoch`."""
        self._progress.set(epoch)

    @property
    def epoch(self) -> int:
        """The epoch this process iterates (or its workers did last); before any, the next."""
        return self._progress.now()[0]

    @property
    def batch_size(self) -> int | None:
        """The DataLoader's batch size, which workers take turns by; None until given."""
        return self._progress.batch_size

    def set_batch_size(self, batch_size: int) -> None:
        """The DataLoader's batch size is `batch_size` (what fastlmdb.loader calls, as do
        loaders that tell the dataset their batch size, LitData's for one); it reaches workers
        already started (persistent ones) at their next iteration."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
                or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int (the DataLoader's), "
                             f"got {batch_size!r}")
        self._progress.batch_size = int(batch_size)

    def _batch_size(self) -> int | None:
        return self._progress.batch_size

    def state_dict(self, samples_seen: int | None = None) -> dict[str, Any]:
        """Where this rank stands after consuming `samples_seen` more samples of the epoch.

        Without `samples_seen`: where this process's iteration is, which is what torchdata's
        StatefulDataLoader asks each worker (and restores with the same number of workers)."""
        epoch, offset = self._progress.now()
        state = {"seed": self.seed, "shuffle": self.shuffle, "epoch": epoch,
                 "samples_seen": offset + int(samples_seen or 0)}
        if samples_seen is None and torch.utils.data.get_worker_info() is not None:
            state["worker_yielded"] = self._yielded
        elif samples_seen is None:
            state["samples_seen"] += self._yielded
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (state["seed"], state["shuffle"]) != (self.seed, self.shuffle):
            raise ValueError(f"state is for seed={state['seed']}, shuffle={state['shuffle']}; "
                             f"this dataset has seed={self.seed}, shuffle={self.shuffle}")
        if self._batch_size() is None and state["samples_seen"]:
            raise ValueError("resuming mid-epoch needs batch_size=<the DataLoader's batch size>")
        in_worker = torch.utils.data.get_worker_info() is not None
        self._progress.set(state["epoch"], state["samples_seen"], everywhere=not in_worker)
        self._skip = state.get("worker_yielded", 0)

    def _ranks(self) -> tuple[int, int]:
        return sampler.ranks(self._rank, self._world_size)

    def __getstate__(self) -> dict[str, Any]:
        # A DataLoader worker started by spawn or forkserver has no process group and would
        # take itself for rank 0 of 1: the process that pickles the dataset for its workers
        # (the one iterating the loader) carries its rank along. Without a process group here
        # nothing is fixed, so a copy unpickled in a distributed process still asks its own.
        state = {**super().__getstate__(), "_session": None}
        if self._world_size is None and sampler.distributed():
            state["_rank"], state["_world_size"] = self._ranks()
        return state

    def __len__(self) -> int:
        return cast(int, order.per_rank(self._count, self._ranks()[1], self.drop_last))

    @property
    def targets(self) -> list[int]:
        return self._labels.tolist()  # type: ignore[no-any-return]

    def indices(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        """The record indices this process's next iteration yields, in order."""
        return cast("np.ndarray[Any, np.dtype[np.int64]]",
                    self._indices(*self._progress.upcoming()))

    def _indices(self, epoch: int, offset: int) -> Any:
        keys = self._epoch_share(epoch, offset)
        return self._logical(keys) if self.shuffle or self._stream else keys

    def _epoch_share(self, epoch: int, offset: int) -> Any:
        """This process's share of `epoch` after `offset` samples of the rank's: keys when
        shuffled (blocks of the physical order, read sequentially), else the logical order."""
        rank, world_size = self._ranks()
        if self._stream:  # keys, shard by shard (shuffled or not)
            epoch_order = self._stream.order(shuffle=self.shuffle, seed=self.seed, epoch=epoch)
        else:
            epoch_order = order.epoch_order(self._count, shuffle=self.shuffle,
                                            seed=self.seed, epoch=epoch)
        share = order.rank_share(epoch_order, rank, world_size, self.drop_last)
        share = share[offset:]
        worker = torch.utils.data.get_worker_info()
        if worker is None:
            return share
        size = self._batch_size()
        if size:
            return order.batch_share(share, worker.id, worker.num_workers, size)
        if worker.num_workers > 1 and worker.id == 0 and self._progress.first_to_tell():
            warnings.warn(f"{self.path}: LMDBIterDataset does not know the DataLoader's batch "
                          f"size, so each of its {worker.num_workers} workers ends the epoch on "
                          "a partial batch and len(loader) counts fewer batches than they "
                          "yield; pass batch_size=<the DataLoader's> to LMDBIterDataset, call "
                          "dataset.set_batch_size(n), or make the loader with "
                          "fastlmdb.loader(dataset, batch_size=n, ...)", UserWarning)
        return order.worker_share(share, worker.id, worker.num_workers)

    def __iter__(self) -> Iterator[Any]:
        self._announce()
        self._yielded, self._skip = self._skip, 0
        indices = self._indices(*self._progress.begin())[self._yielded:]
        if self._stream is None:
            yield from self._iterate(indices)
            return
        self._session = self._stream.session(self._keys(indices), self._ranks()[0])
        try:
            yield from self._iterate(indices)
        finally:
            self._session.close()
            self._session = None

    def _iterate(self, indices: Ints) -> Iterator[Any]:
        if self._batch_size() and self._decodes_in_place():
            yield from self._batches_in_place(indices)
            return
        # Streamed: a batch at a time, so that the workers of a rank, which take turns by
        # batch, read each shard together (none done with it before another begins it).
        piece_size = (self._batch_size() or order.BLOCK) if self._stream \
            else order.BLOCK * order.WINDOW_BLOCKS
        for piece in order.windows(indices, piece_size):
            for index, value in zip(piece.tolist(), self._read(piece)):
                self._yielded += 1
                try:
                    yield self._record(index, value)
                except DecodeError as exc:
                    self._skip_or_raise(exc)

    def _batches_in_place(self, indices: Ints) -> Iterator[batch.Sample]:
        """The samples of `indices`, each `batch_size` of them decoded into one images tensor
        (batch.Sample views, as LMDBDataset's batches); a skipped record shortens its batch."""
        for piece in order.windows(indices, self._batch_size()):
            images, labels = batch.empty(len(piece), cast(crops.DecodeCrop, self._crop).size,
                                         self._recipe.dtype)
            kept, consumed = self._fill(images, piece.tolist(), self._read(piece))
            images, labels = images[:len(kept)], labels[:len(kept)]
            labels.numpy()[:] = kept
            start = self._yielded
            for sample, n in zip(batch.samples(images, labels, kept), consumed):
                self._yielded = start + n  # what StatefulDataLoader asks a worker
                yield sample
            self._yielded = start + len(piece)

    def _fill(self, images: torch.Tensor, indices: list[int],
              values: Sequence[Any]) -> tuple[list[int], list[int]]:
        """Decode records `indices` into the first slots of `images` (batch.fill), a skipped
        record leaving no slot; (labels kept, records consumed up to each)."""
        def one(n: int, slot: torch.Tensor) -> int | None:
            try:
                return self._record_into(indices[n], values[n], slot)
            except DecodeError as exc:
                self._skip_or_raise(exc)
                return None

        rows = self._rows[indices]
        return batch.fill(images, values, rows, cast(crops.DecodeCrop, self._crop),
                          self._recipe.flips, self.threads, self._natively(rows), one,
                          self._recipe.table)

    def _read(self, piece: Ints) -> list[Any]:
        """Buffers of `piece`'s records, read in key order (sequential I/O), in piece order."""
        wanted = self._keys(piece)
        if self._session is not None:
            return cast("list[Any]", self._session.read(wanted))
        keys = np.unique(wanted)
        if keys[-1] - keys[0] + 1 == len(keys):
            values = self._reader.read_range(int(keys[0]), int(keys[-1]) + 1)
        else:
            values = self._reader.get_many(keys.tolist())
        return [values[i] for i in np.searchsorted(keys, wanted).tolist()]


def _checked_threads(threads: int) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or \
            not 1 <= threads <= batch.MAX_THREADS:
        raise ValueError(f"threads must be an int from 1 to {batch.MAX_THREADS}, "
                         f"got {threads!r}")
    return threads

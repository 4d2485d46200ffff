"""PyTorch datasets over a fastlmdb database: drop-in replacements for ImageFolder.

``LMDBDataset`` is map-style (random access by key); ``LMDBIterDataset`` reads with a cursor in
key order, each sample exactly once per epoch across DataLoader workers and distributed ranks.
With crops.py, the only modules that import torch.
"""

from __future__ import annotations

import logging
import numbers
import os
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence, Tuple, Union, cast

import numpy as np
import torch
import torch.utils.data

from fastlmdb.core import catalog, jpeg, remote
from fastlmdb.loading import batch, crops, order, progress, recipes, sampler, streaming
from fastlmdb.core import format as fmt
from fastlmdb.core.errors import ON_ERROR, DatabaseError, DecodeError

log = logging.getLogger(__name__)

NO_EXTENSION = (
    "fastlmdb's C extension (fastlmdb.core._jpegcrop) is not built: no region decode and no "
    "native batches, so crops decode the whole image (at a reduced scale) and resize with "
    "torch, several times slower. To fix it, install a C compiler and the libjpeg-turbo "
    "headers (Debian/Ubuntu: apt-get install libjpeg62-turbo-dev; Fedora: libjpeg-turbo-devel)"
    ", then reinstall fastlmdb: pip install --force-reinstall --no-cache-dir fastlmdb")

OUTPUTS = ("pil", "tensor", "numpy")

Transform = Callable[[Any], Any]
StrPath = Union[str, "os.PathLike[str]"]
Size = Union[int, Tuple[int, int]]  # (height, width), or one number for both
if TYPE_CHECKING:
    Pixels = np.ndarray[Any, np.dtype[np.uint8]]  # HWC uint8
    Ints = np.ndarray[Any, np.dtype[np.int64]]
    Table = np.ndarray[Any, Any]  # a structured array (fmt.TABLE)


class _Records:
    """What both datasets share: the catalog, lazy per-process reads, decode, transforms."""

    def __init__(self, root: StrPath, split: str, transform: Transform | None,
                 target_transform: Transform | None, imgtype: str | None, *, output: str,
                 decoder: str, min_size: Size | None, on_error: str,
                 decode_aware: bool = False, exact: bool = False,
                 stream: Any = None) -> None:
        self.root, self.split = os.fspath(root), split
        self.path = fmt.db_path(self.root, split)
        _check_choice("output", output, OUTPUTS)
        _check_choice("on_error", on_error, ON_ERROR)
        if exact and decode_aware:
            raise ValueError("exact=True runs torchvision's own crops on whole images, "
                             "decode_aware=True runs them on the stored bytes: pass one")
        self.decode_aware, self.exact, self.output = decode_aware, exact, output
        self.transform, self.target_transform = transform, target_transform
        # A database at a URL (LMDBIterDataset only): a streaming.StreamedSplit.
        self._stream = stream
        info, rows, logical = stream.tables() if stream else catalog.read_tables(self.path)
        if imgtype is not None and imgtype != info["imgtype"]:
            raise ValueError(f"imgtype={imgtype!r}, but {self.path} holds {info['imgtype']} "
                             f"records: pass imgtype={info['imgtype']!r} or leave it out")
        self.imgtype, self.on_error = info["imgtype"], on_error
        self.classes, self.class_to_idx = info["classes"], info["class_to_idx"]
        self._decode: Any = jpeg.decoder(decoder) if self.imgtype == "jpeg" else None
        self.decoder, self.min_size = decoder, _min_height_width(min_size)
        self.physical_order = info.get("order", "source")  # the records' order in the file
        self._source = info["source"]
        self._count = len(rows)
        # The per-sample tables are views of the database's map, not copies: every process
        # maps the same pages (see _rows). Dropped on pickling, mapped again where unpickled.
        self._tables, self._tables_pid = (rows, logical), os.getpid()
        self._samples: list[tuple[str, int]] | None = None
        self._reader: Any = None if stream else catalog.reader(self.path)
        self.errors = 0  # records skipped in this process because they failed to decode

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tables": None, "_tables_pid": None, "_samples": None}

    @property
    def _rows(self) -> Table:
        """The record table in logical order (fmt.TABLE), mapped in this process."""
        if self._tables_pid != os.getpid():
            _, rows, logical = self._stream.tables() if self._stream \
                else catalog.read_tables(self.path)
            self._tables, self._tables_pid = (rows, logical), os.getpid()
        return cast("Table", self._tables[0])

    @property
    def _labels(self) -> Table:
        return self._rows["label"]

    def _keys(self, indices: Sequence[int] | np.ndarray[Any, Any]) -> Ints:
        """The keys of the records at logical `indices` (an integer array)."""
        rows = self._rows
        if "key" not in rows.dtype.names:  # version 1: key = index
            return np.asarray(indices, dtype=np.int64)
        return rows["key"][indices].astype(np.int64)

    def _key(self, index: int) -> int:
        """The key of record `index` (the per-sample path: no array made)."""
        rows = self._rows
        return int(rows["key"][index]) if "key" in rows.dtype.names else index

    def _logical(self, keys: Ints) -> Ints:
        """The logical indices of the records with `keys` (version 1: the keys themselves)."""
        self._rows  # noqa: B018 - maps the tables in this process
        logical = self._tables[1]
        return keys if logical is None else logical[keys].astype(np.int64)

    @property
    def samples(self) -> list[tuple[str, int]]:
        """(path, target) of every record in this dataset's order, as ImageFolder has them;
        read from the database on first use."""
        if self._samples is None:
            if self._stream:
                raise AttributeError(f"{self.path} is streamed: its source paths are in its "
                                     "shards; `fastlmdb stage` it to get `samples`")
            names = catalog.read_paths(self.path)
            if names is None:
                raise AttributeError(f"{self.path} does not record its source paths (made by "
                                     "an older fastlmdb): convert it again to get `samples`")
            root, labels = self._source, self._labels.tolist()
            samples = [(os.path.join(root, name), label) for name, label in zip(names, labels)]
            self._samples = [samples[i] for i in self._sample_order()]
        return self._samples

    @property
    def imgs(self) -> list[tuple[str, int]]:
        return self.samples

    def _sample_order(self) -> Sequence[int]:
        return range(self._count)

    @property
    def transform(self) -> Transform | None:
        return self._transform

    @transform.setter
    def transform(self, transform: Transform | None) -> None:
        # Code written for ImageFolder reassigns `dataset.transform`: plan it again.
        self._transform = transform
        self._recipe = recipes.plan(transform, output=self.output, exact=self.exact)
        self._crop, self._rest = self._recipe.head, self._recipe.rest
        self._told_pid: int | None = None  # the process that logged pipeline() (for this plan)

    def pipeline(self) -> str:
        """Which path the samples take, in one line: what runs native (decode-aware crop,
        flips, the per-pixel tail as a table, whole batches in place) and what per sample.
        Logged at INFO once per process when the first sample or batch is read."""
        return self._recipe.describe(native=self._natively(), fused=batch.native_built())

    def _announce(self) -> None:
        """Log pipeline() once per process (DataLoader workers are processes of their own)."""
        if self._told_pid == os.getpid():
            return
        self._told_pid = os.getpid()
        log.info("%s %s: %s", type(self).__name__, self.split, self.pipeline())
        if crops._jpegcrop is None and self.imgtype == "jpeg":
            log.warning(NO_EXTENSION)

    def _record(self, index: int, value: bytes | memoryview) -> tuple[Any, Any]:
        """(image, target) of record `index` from its stored value."""
        label = int(self._labels[index])
        if self._crop is not None and self._recipe.table is not None:
            # The tail in the resize's own pass, as in the batches (no uint8 image between).
            image = torch.empty((3, *self._crop.size), dtype=self._recipe.dtype)
            self._record_into(index, value, image)
        else:
            image = self._prefix(self._pixels(index, value))
        if self._rest is not None:
            image = self._rest(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

    def _pixels(self, index: int, value: bytes | memoryview,
                out: torch.Tensor | None = None) -> Any:
        """HWC uint8 pixels of a record: whole, or the crop box of a decode-aware head
        (resized into `out`, a 3xHxW slot of the in-place batch, through the tail's table where
        there is one, when given)."""
        row = self._rows[index]
        table = None if out is None else self._recipe.table
        height, width = int(row["height"]), int(row["width"])
        crop = self._crop
        try:
            if self.imgtype == "numpy":
                pixels = _stored_pixels(value, height, width)
                if crop is None:
                    return pixels.copy()  # detach from the map, writable
                top, left, h, w = box = crop.box(height, width)
                pixels = pixels[top:top + h, left:left + w]
            elif crop is None:
                return self._decode(value, min_height=self.min_size[0],
                                    min_width=self.min_size[1])
            else:
                box = crop.box(height, width)
                pixels = crops.decode_box(value, box, crop.size, height, width, self._decode)
            if isinstance(crop, crops.CenterCrop) and crop.pads(height, width):
                pixels = crops.center_crop_padded(pixels, crop.size)
            return crops.resize(pixels, crop.size, out, table)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this record's
            raise self._error(index, str(exc)) from None

    def _prefix(self, pixels: Pixels) -> Any:
        """What the native part of the recipe makes of a record's pixels (whole, or its crop):
        flipped, through the tail's table, as the type the rest of the transform expects."""
        recipe = self._recipe
        if recipe.flips is None and recipe.table is None and recipe.prefix != recipes.UINT8:
            return self._to_output(pixels)  # PIL or numpy, as the records reach the transform
        image = torch.from_numpy(pixels).permute(2, 0, 1)
        if recipe.flips is not None:
            image = recipe.flips(image)  # the same flip objects, so the same draws
        if recipe.table is not None:
            return batch.apply_table(image, recipe.table)
        if recipe.prefix == recipes.PIL:
            return self._to_output(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
        return image if self.output == "tensor" else image.contiguous()  # as PILToTensor's

    def _decodes_in_place(self) -> bool:
        """Whether every image of a batch is a 3xHxW tensor of the crop head's size, all of
        the transform native (the recipe's dtype: uint8, or its table's)."""
        return self._recipe.in_place and self.target_transform is None

    def _natively(self, rows: Table | None = None) -> bool:
        """Whether in-place batches (of records `rows`) go to the native batch decoder
        (batch.fill): not where a CenterCrop pads a record smaller than itself."""
        crop = self._crop
        if isinstance(crop, crops.CenterCrop) and rows is not None and \
                crop.pads(int(rows["height"].min()), int(rows["width"].min())):
            return False
        return self.imgtype == "jpeg" and batch.native_built()

    def _record_into(self, index: int, value: bytes | memoryview, image: torch.Tensor) -> int:
        """_record, the image written into `image`, a 3xHxW slot; returns the label."""
        self._pixels(index, value, out=image)
        if self._recipe.flips is not None:
            flipped = self._recipe.flips(image)  # the same transform objects and random draws
            if flipped is not image:
                image.copy_(flipped)
        return int(self._labels[index])

    def _error(self, index: int, why: str) -> DecodeError:
        name = self.classes[self._labels[index]]
        return DecodeError(f"{self.split} record {index} (class {name!r}) of {self.path} "
                           f"could not be decoded: {why}; check the database with "
                           f"`fastlmdb verify {self.path}`, or pass on_error='skip'")

    def _to_output(self, pixels: Pixels) -> Any:
        if self.output == "numpy":
            return pixels
        if self.output == "tensor":
            return torch.from_numpy(pixels).permute(2, 0, 1)  # CHW view, channels-last memory
        from PIL import Image

        return Image.fromarray(pixels, "RGB")

    def _skip_or_raise(self, exc: DecodeError) -> None:
        if self.on_error == "raise":
            raise exc
        self.errors += 1
        log.warning("skipping: %s", exc)

    if TYPE_CHECKING:
        def __len__(self) -> int: ...  # each dataset's own

    def __repr__(self) -> str:
        lines = [f"Dataset {type(self).__name__}", f"    Number of datapoints: {len(self)}",
                 f"    Root location: {self.root}",
                 f"    Split: {self.split} ({self.imgtype} records, output={self.output!r})"]
        for name in ("transform", "target_transform"):
            value = getattr(self, name)
            if value is not None:
                body = repr(value).replace("\n", "\n" + " " * 4)
                lines.append(f"    {name.replace('_', ' ').capitalize()}: {body}")
        return "\n".join(lines)


class LMDBDataset(_Records, torch.utils.data.Dataset):  # type: ignore[type-arg]
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


class LMDBIterDataset(_Records, torch.utils.data.IterableDataset):  # type: ignore[type-arg]
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


def _stored_pixels(value: bytes | memoryview, height: int, width: int) -> Pixels:
    if len(value) != height * width * 3:
        raise ValueError(f"{len(value)} bytes stored, {height}x{width}x3 expected")
    return np.frombuffer(value, np.uint8).reshape(height, width, 3)


def _checked_threads(threads: int) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or \
            not 1 <= threads <= batch.MAX_THREADS:
        raise ValueError(f"threads must be an int from 1 to {batch.MAX_THREADS}, "
                         f"got {threads!r}")
    return threads


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, "
                         f"got {value!r}")


def _min_height_width(size: Size | None) -> tuple[int | None, int | None]:
    """(min height, min width) of `min_size`: (None, None) when not given."""
    if size is None:
        return None, None
    if isinstance(size, int):
        return size, size
    height, width = size
    return height, width

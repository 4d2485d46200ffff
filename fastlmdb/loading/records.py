"""What both datasets (dataset.py) share: the catalog of a split, per-process lazy reads of
its tables, the decode of one record (whole, or the crop box of a decode-aware recipe head),
the recipe's native prefix and the rest of the transform per sample, errors and repr.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Sequence, Tuple, Union, cast

import numpy as np
import torch

from fastlmdb.core import catalog, jpeg
from fastlmdb.loading import batch, crops, recipes
from fastlmdb.core import format as fmt
from fastlmdb.core.errors import ON_ERROR, DecodeError


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


class Records:
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


def _stored_pixels(value: bytes | memoryview, height: int, width: int) -> Pixels:
    if len(value) != height * width * 3:
        raise ValueError(f"{len(value)} bytes stored, {height}x{width}x3 expected")
    return np.frombuffer(value, np.uint8).reshape(height, width, 3)


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

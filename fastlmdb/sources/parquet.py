"""Parquet shards as Hugging Face ``datasets`` writes them (``ILSVRC/imagenet-1k``): an image
column ``struct<bytes: binary, path: string>`` (the ``Image`` feature; a row without bytes is
read from its path, relative to the shard) or plain binary, and an integer label column
(``ClassLabel``, whose names are in the schema metadata under ``huggingface``).

Listing reads only the footers and the label columns. A Row names one image by (file, row
group, row); pyarrow reads a row group at a time, so a process keeps the last row group it
read, and the converter gives each row group's rows to one producer (Row.group). pyarrow is
imported here only.
"""

import json
import logging
import os

import numpy as np

from fastlmdb.core.errors import ConversionError, ImageError
from fastlmdb.sources import folder
from fastlmdb.sources.refs import Ref

log = logging.getLogger(__name__)

MAGIC = b"PAR1"
LABEL_NAMES = ("label", "labels", "cls", "target", "class")
UNLABELED = -1  # the hub's label for the test split's rows


class Row(Ref):
    """Row `row` (of row group `group`) of parquet file `file`; its image in column `column`.
    The name is ``<file name>#<row in the file>``."""

    def __new__(cls, name, file, group, row, column, size=0):
        ref = super().__new__(cls, name)
        ref.where = (file, group, row, column, size)
        return ref

    def __reduce__(self):
        return Row, (str(self), *self.where)

    @property
    def container(self):
        return f"{self.where[0]} (row group {self.where[1]})"

    def read(self, check_crc=True):
        file, group, row, column, _ = self.where
        blobs, paths = _row_group(file, group, column)
        if blobs[row] is not None:
            return blobs[row]
        if not paths[row]:
            raise ImageError("the row has neither image bytes nor a path")
        path = os.path.join(os.path.dirname(file), paths[row])
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise ImageError(f"no bytes in the row, and its path {path} cannot be read "
                             f"({exc.strerror or exc})") from None

    def identity(self):
        return b"%s\0%d\0%d\0" % (self.encode("utf-8", "surrogateescape"), *self.where[1:3])

    def group(self):
        return self.where[:2]

    def size(self):
        return self.where[4]


def is_parquet(path):
    with open(path, "rb") as file:
        return file.read(4) == MAGIC


def list_files(files, *, classes=None, image_column=None, label_column=None, unlabeled=False):
    """The Listing of the rows of parquet `files` (sorted), in file and row order."""
    paths, labels, names = [], [], None
    for file in files:
        found, file_labels, file_names = _list_file(file, image_column, label_column, unlabeled)
        paths += found
        labels.append(file_labels)
        names = names or file_names
    labels = np.concatenate(labels).astype(np.int32)
    if classes is None:
        classes = names or [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
        log.info("class names from %s", "the huggingface metadata" if names else
                 "the label values (no ClassLabel names in the metadata, no --classes-from)")
    _check_range(files, paths, labels, classes)
    if not paths:
        raise ConversionError(f"no rows in {', '.join(files[:3])}")
    return folder.Listing(os.path.dirname(files[0]), list(classes),
                          {name: i for i, name in enumerate(classes)}, paths, labels)


def _list_file(file, image_column, label_column, unlabeled):
    """(Rows, labels, ClassLabel names or None) of one file."""
    pf = _open(file)
    schema = pf.schema_arrow
    image = image_column or _image_column(schema, file)
    _check_image_column(schema, image, file)
    features = _features(schema)
    label = label_column or _label_column(schema, file, unlabeled)
    if label is None:
        labels = np.full(pf.metadata.num_rows, UNLABELED, np.int64)
    else:
        labels = _labels(pf, label, file, unlabeled)
    base, rows = os.path.basename(file), []
    for group in range(pf.metadata.num_row_groups):
        meta = pf.metadata.row_group(group)
        size = meta.total_byte_size // max(1, meta.num_rows)
        first = len(rows)
        rows += [Row(f"{base}#{first + k}", file, group, k, image, size)
                 for k in range(meta.num_rows)]
    names = (features.get(label) or {}).get("names") if label else None
    return rows, labels, names


def _open(file):
    import pyarrow.parquet as pq

    try:
        # no pre-buffering: a local file, read a row group at a time
        return pq.ParquetFile(file, pre_buffer=False)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ConversionError(f"{file} is not a readable parquet file ({exc}): it may be "
                              "truncated; download it again") from None


def _features(schema):
    """The features of the ``huggingface`` schema metadata (datasets' JSON), or {}."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta.get("info", meta).get("features") or {}


def _image_column(schema, file):
    for field in schema:
        if _is_binary(field.type) or (_is_struct(field.type) and "bytes" in _names(field.type)):
            return field.name
    raise ConversionError(f"{file} has no image column (a struct<bytes, path> as datasets' "
                          "Image feature writes, or binary); its columns: "
                          f"{', '.join(schema.names)}. Pass --image-column NAME")


def _check_image_column(schema, name, file):
    if name not in schema.names:
        raise ConversionError(f"{file} has no column {name!r} (--image-column); its "
                              f"columns: {', '.join(schema.names)}")
    kind = schema.field(name).type
    if not (_is_binary(kind) or (_is_struct(kind) and "bytes" in _names(kind))):
        raise ConversionError(f"column {name!r} of {file} is {kind}, not encoded images "
                              "(binary, or struct<bytes, path>): pass --image-column NAME")


def _label_column(schema, file, unlabeled):
    """The integer label column: the one named like a label, else the only integer one."""
    import pyarrow as pa

    ints = [f.name for f in schema if pa.types.is_integer(f.type)]
    named = [n for n in LABEL_NAMES if n in schema.names]
    if named and named[0] not in ints:
        raise ConversionError(
            f"the label column {named[0]!r} of {file} holds {schema.field(named[0]).type}, "
            "not class indices: store integer labels (datasets: cast_column with a "
            "ClassLabel), or pass --label-column for an integer column"
            + (" or --unlabeled" if not unlabeled else ""))
    if named:
        return named[0]
    if len(ints) == 1:
        return ints[0]
    if unlabeled:
        return None
    raise ConversionError(f"{file}: no label column found among {', '.join(schema.names)}: "
                          "pass --label-column NAME (integer class indices), or --unlabeled "
                          "to store every image with label -1")


def _labels(pf, name, file, unlabeled):
    import pyarrow as pa

    if name not in pf.schema_arrow.names:
        raise ConversionError(f"{file} has no column {name!r} (--label-column); its columns: "
                              f"{', '.join(pf.schema_arrow.names)}")
    if not pa.types.is_integer(pf.schema_arrow.field(name).type):
        raise ConversionError(f"the label column {name!r} of {file} holds "
                              f"{pf.schema_arrow.field(name).type}, not class indices: store "
                              "integer labels (datasets: cast_column with a ClassLabel)")
    column = pf.read(columns=[name]).column(0)
    if column.null_count:
        raise ConversionError(f"the label column {name!r} of {file} has {column.null_count} "
                              "empty rows: fill them, or pass --unlabeled (label -1)")
    labels = column.to_numpy()
    if not unlabeled and (labels == UNLABELED).any():
        row = int(np.flatnonzero(labels == UNLABELED)[0])
        raise ConversionError(f"{file}: row {row} ({_group_of(pf, row)}) has label -1, "
                              "no label (the hub's test split): pass --unlabeled to store such "
                              "rows with label -1")
    return labels


def _group_of(pf, row):
    for group in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        if row < rows:
            return f"row group {group}"
        row -= rows
    return "past the last row group"


def _check_range(files, paths, labels, classes):
    bad = np.flatnonzero((labels < UNLABELED) | (labels >= len(classes)))
    if len(bad):
        row = paths[int(bad[0])]
        raise ConversionError(f"{row.where[0]}: row {row.split('#')[-1]} (row group "
                              f"{row.where[1]}) has label {labels[bad[0]]}, outside the "
                              f"{len(classes)} classes: pass --classes-from with the full "
                              "class list")


def _is_binary(kind):
    import pyarrow as pa

    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _is_struct(kind):
    import pyarrow as pa

    return pa.types.is_struct(kind)


def _names(struct):
    return [struct.field(i).name for i in range(struct.num_fields)]


_files = {}
_cached = {}


def _row_group(file, group, column):
    """([bytes or None], [path or None]) of a row group's image column: the last one read
    in this process is kept (the converter reads a row group's rows one after another)."""
    key = (os.getpid(), file, group, column)
    if key not in _cached:
        _cached.clear()
        _cached[key] = _read_row_group(file, group, column)
    return _cached[key]


def _read_row_group(file, group, column):
    if (os.getpid(), file) not in _files:
        _files.clear()
        try:
            _files[(os.getpid(), file)] = _open(file)
        except ConversionError as exc:  # changed since the listing: this row is bad
            raise ImageError(str(exc)) from None
    try:
        # one thread: the converter's producers are the parallelism (measured 5-10% less CPU)
        values = _files[(os.getpid(), file)].read_row_group(group, columns=[column],
                                                            use_threads=False).column(0)
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors for damaged data vary
        raise ImageError(f"cannot read row group {group} of {file} ({exc}): the file is "
                         "damaged; download it again") from None
    if _is_binary(values.type):
        return values.to_pylist(), [None] * len(values)
    values = values.combine_chunks()
    paths = (values.field("path").to_pylist() if "path" in _names(values.type)
             else [None] * len(values))
    return values.field("bytes").to_pylist(), paths

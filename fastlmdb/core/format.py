"""The on-disk contract: file names, keys, record table, metadata and versions.

A split is one LMDB file, ``DST/<split>.lmdb`` (``subdir=False``), with three named databases:

``images``  key = 8-byte big-endian index, value = the stored image: the original JPEG bytes
            (``imgtype="jpeg"``) or raw uint8 HxWx3 pixels (``imgtype="numpy"``).
``rows``    key = 8-byte big-endian index of a transaction's first record, value = that
            transaction's rows of the record table (``ROW`` dtype, little-endian, no header).
``meta``    ``plan``: JSON, what the conversion was asked to do (written with the first records);
            ``progress``: JSON, how far it got (rewritten in every transaction);
            ``table``: the whole record table as one ``.npy`` (written last);
            ``info``: JSON, format version, classes, counts (written last: its absence means
            the conversion did not finish).

Nothing is pickled: JSON and ``.npy`` with ``allow_pickle=False`` only.
A conversion writes ``<split>.lmdb.partial`` and renames it when complete, so the final name
only ever holds a finished database.
"""

import io
import json
import os
import struct

import numpy as np

from fastlmdb.core.errors import DatabaseError

FORMAT_NAME = "fastlmdb"
FORMAT_VERSION = 1
IMGTYPES = ("jpeg", "numpy")

IMAGES_DB = b"images"
ROWS_DB = b"rows"
META_DB = b"meta"
PLAN_KEY = b"plan"
PROGRESS_KEY = b"progress"
TABLE_KEY = b"table"
INFO_KEY = b"info"

# One row per stored record: what loaders and `verify` need without parsing any image.
ROW = np.dtype(
    [
        ("label", "<i4"),
        ("height", "<u4"),
        ("width", "<u4"),
        ("nbytes", "<u4"),
        ("crc32", "<u4"),
        ("source", "<u4"),  # position of the file in the ImageFolder scan
        ("transcoded", "u1"),  # 0: the source bytes, 1: converted to RGB JPEG, 2: resized
    ]
)

def db_path(to_dir, split):
    """Where the finished database of `split` lives."""
    return os.path.join(os.fspath(to_dir), f"{split}.lmdb")


def partial_path(final_path):
    """Where a conversion writes before the database is complete."""
    return os.fspath(final_path) + ".partial"


def key(index):
    return struct.pack(">Q", index)


def dump_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def load_json(raw, what, path):
    try:
        obj = json.loads(bytes(raw))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DatabaseError(f"{path}: the {what} record is not valid JSON ({exc}); "
                            "the database is damaged: convert it again") from None
    if not isinstance(obj, dict):
        raise DatabaseError(f"{path}: the {what} record is not a JSON object; "
                            "the database is damaged: convert it again")
    return obj


def dump_table(rows):
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(rows, dtype=ROW), allow_pickle=False)
    return buf.getvalue()


def load_table(raw, count, path):
    """The record table, checked against the expected dtype and length."""
    try:
        rows = np.load(io.BytesIO(bytes(raw)), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy's header parser raises many kinds
        raise DatabaseError(f"{path}: the record table is unreadable ({exc!r}); "
                            "the database is damaged: convert it again") from None
    if rows.dtype != ROW or rows.shape != (count,):
        raise DatabaseError(f"{path}: the record table has dtype {rows.dtype} and shape "
                            f"{rows.shape}, expected {count} rows of {ROW}; "
                            "the database is damaged: convert it again")
    return rows


def rows_from_bytes(raw):
    raw = bytes(raw)
    if len(raw) % ROW.itemsize:
        raise DatabaseError(f"a chunk of the record table has {len(raw)} bytes, not a multiple "
                            f"of {ROW.itemsize}; the database is damaged: convert it again")
    return np.frombuffer(raw, dtype=ROW)


def check_info(info, path):
    """Validate the final metadata record; returns it. Raises DatabaseError with advice."""
    if info.get("format") != FORMAT_NAME:
        raise DatabaseError(f"{path} is an LMDB file but not a fastlmdb database")
    version = info.get("version")
    if not isinstance(version, int):
        raise DatabaseError(f"{path}: format version {version!r} is not an integer; "
                            "the database is damaged: convert it again")
    if version > FORMAT_VERSION:
        raise DatabaseError(f"{path} has format version {version}, newer than this fastlmdb "
                            f"reads ({FORMAT_VERSION}): upgrade with `pip install -U fastlmdb`")
    _check_fields(info, path)
    return info


# Every field of `info` that a reader uses, with its JSON type; `shard` only in a shard's.
INFO_FIELDS = {
    "count": int, "classes": list, "class_to_idx": dict, "imgtype": str, "split": str,
    "source": str, "transcoded": list, "skipped": list, "resized": int, "max_size": int,
    "quality": int, "bytes_in": int, "made_by": str, "started": (int, float),
    "finished": (int, float)}
SHARD_FIELDS = {"index": int, "count": int, "first_source": int, "files": int}


def _check_fields(info, path):
    _check_types(info, INFO_FIELDS, path, "")
    if "shard" in info:
        _check_types(info["shard"] if isinstance(info["shard"], dict) else {}, SHARD_FIELDS,
                     path, "shard.")
    if info["imgtype"] not in IMGTYPES:
        raise DatabaseError(f"{path}: unknown image type {info['imgtype']!r}; "
                            f"this fastlmdb reads {IMGTYPES}")
    if info["count"] < 0:
        raise DatabaseError(f"{path}: negative record count {info['count']}")
    checks = {
        "classes": all(isinstance(name, str) for name in info["classes"]),
        "class_to_idx": all(isinstance(i, int) for i in info["class_to_idx"].values()),
        "transcoded": all(_shaped(entry, (int, str, str)) for entry in info["transcoded"]),
        "skipped": all(_shaped(entry, (str, str)) for entry in info["skipped"]),
    }
    for name, ok in checks.items():
        if not ok:
            raise _field_error(path, name, "has an entry of the wrong type")


def _check_types(record, fields, path, prefix):
    for name, kind in fields.items():
        if not isinstance(record.get(name), kind):
            raise _field_error(path, prefix + name, "is missing or of the wrong type")


def _shaped(entry, kinds):
    return (isinstance(entry, list) and len(entry) == len(kinds)
            and all(isinstance(value, kind) for value, kind in zip(entry, kinds)))


def _field_error(path, name, what):
    return DatabaseError(f"{path}: metadata field {name!r} {what}; the database is damaged: "
                         "convert it again")


# A sharded split: the folder DST/<split>.lmdb holds K complete databases, shard k holding a
# contiguous range of the split's files in source order (its rows keep their `source`
# positions in the whole split), and an index written last.
SHARD_INDEX = "index.json"
SHARDS_FORMAT = "fastlmdb-shards"
SHARDS_VERSION = 1


def shard_file(split, index, count):
    return f"{split}-{index:05d}-of-{count:05d}.lmdb"


def shard_bounds(files, count, index):
    """Source positions [start, stop) of shard `index` of `count`: equal ranges of files."""
    return files * index // count, files * (index + 1) // count

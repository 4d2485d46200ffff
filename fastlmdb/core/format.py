"""The on-disk contract: file names, keys, record table, metadata and versions.

A split is one LMDB file, ``DST/<split>.lmdb`` (``subdir=False``), with three named databases:

``images``  key = 8-byte big-endian position in the write order (``write_order``: a seeded
            shuffle of the source files, or their order; version 1: the index), value = the
            stored image: the original JPEG bytes
            (``imgtype="jpeg"``) or raw uint8 HxWx3 pixels (``imgtype="numpy"``).
``rows``    key = 8-byte big-endian key of a transaction's first record, value = that
            transaction's rows (``ROW`` dtype, little-endian, no header), in key order.
``meta``    ``plan``: JSON, what the conversion was asked to do (written with the first records);
            ``progress``: JSON, how far it got (rewritten in every transaction);
            ``table``: the whole record table as one ``.npy``, in logical (ImageFolder) order,
            its ``key`` column naming each record's key (written last);
            ``logical``: ``.npy`` of ``<u4``, the logical index of each key (written last);
            ``paths``: the source paths, relative to the split folder, in logical order:
            ``os.fsencode``d names separated by NUL bytes (written last);
            ``info``: JSON, format version, classes, counts (written last: its absence means
            the conversion did not finish).

Nothing is pickled: JSON and ``.npy`` with ``allow_pickle=False`` only.
A conversion writes ``<split>.lmdb.partial`` and renames it when complete, so the final name
only ever holds a finished database.
"""

from __future__ import annotations

import io
import json
import os
import struct
from typing import Any, Dict, Iterable, Mapping, Sequence, Tuple, Type, Union, cast

import numpy as np
import numpy.typing as npt

from fastlmdb.core.errors import DatabaseError

StrPath = Union[str, "os.PathLike[str]"]
Buffer = Union[bytes, bytearray, memoryview]  # an LMDB value, copied or mapped
Json = Dict[str, Any]  # a JSON object
Rows = np.ndarray[Any, np.dtype[Any]]  # a structured array of ROW or TABLE rows
Kinds = Union[Type[Any], Tuple[Type[Any], ...]]  # what isinstance takes

FORMAT_NAME = "fastlmdb"
FORMAT_VERSION = 2  # 2: records in a write order of their own (the `key` column)
IMGTYPES = ("jpeg", "numpy")
ORDERS = ("shuffled", "source")  # the write order: seeded random (default), or ImageFolder's
# The write order of a compressed tar's members, read in one pass: the stream's.
ARCHIVE_ORDER = "archive"
# The write order of sources read a row group at a time (parquet): row groups in a seeded
# shuffled order, the rows of each shuffled (fmt.grouped_write_order).
GROUPS_ORDER = "row-groups"

IMAGES_DB = b"images"
ROWS_DB = b"rows"
META_DB = b"meta"
PLAN_KEY = b"plan"
PROGRESS_KEY = b"progress"
TABLE_KEY = b"table"
INFO_KEY = b"info"
LOGICAL_KEY = b"logical"
PATHS_KEY = b"paths"

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
# The final record table (version 2): ROW and the record's key, rows in logical order.
TABLE = np.dtype(ROW.descr + [("key", "<u4")])


def write_order(files: int, order: str, seed: int) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Source positions in the order they are written: a pure function of its arguments,
    fixed before any file is prepared, so a resumed or sharded conversion agrees on it."""
    if order == "source":
        return np.arange(files, dtype=np.int64)
    return np.random.default_rng([seed, files]).permutation(files)


def grouped_write_order(groups: Sequence[int], seed: int) -> np.ndarray[Any, Any]:
    """Source positions in write order for files in groups (`groups`: a group number per
    file, in source order, each group's files together): groups in a seeded random order,
    each group's files shuffled; a pure function of its arguments, like write_order."""
    numbers = np.asarray(groups, dtype=np.int64)
    rng = np.random.default_rng([seed, len(numbers), 1])
    rank = np.empty(int(numbers.max(initial=-1)) + 1, dtype=np.int64)
    rank[rng.permutation(len(rank))] = np.arange(len(rank))
    return np.lexsort((rng.random(len(numbers)), rank[numbers]))


def logical_of_keys(table: Rows) -> np.ndarray[Any, np.dtype[np.uint32]]:
    """The logical index of each key: the inverse of the table's `key` column."""
    logical = np.empty(len(table), dtype="<u4")
    logical[table["key"]] = np.arange(len(table), dtype="<u4")
    return logical


def join_paths(names: Iterable[StrPath]) -> bytes:
    return b"\0".join(os.fsencode(name) for name in names)


def split_paths(raw: Buffer, count: int) -> list[str]:
    names = [os.fsdecode(name) for name in bytes(raw).split(b"\0")] if count else []
    if len(names) != count:
        raise DatabaseError(f"{count} records but {len(names)} source paths recorded; "
                            "the database is damaged: convert it again")
    return names


def db_path(to_dir: StrPath, split: str) -> str:
    """Where the finished database of `split` lives."""
    return os.path.join(os.fspath(to_dir), f"{split}.lmdb")


def partial_path(final_path: StrPath) -> str:
    """Where a conversion writes before the database is complete."""
    return os.fspath(final_path) + ".partial"


def key(index: int) -> bytes:
    return struct.pack(">Q", index)


def dump_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def load_json(raw: Buffer, what: str, path: StrPath) -> Json:
    try:
        obj = json.loads(bytes(raw))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DatabaseError(f"{path}: the {what} record is not valid JSON ({exc}); "
                            "the database is damaged: convert it again") from None
    if not isinstance(obj, dict):
        raise DatabaseError(f"{path}: the {what} record is not a JSON object; "
                            "the database is damaged: convert it again")
    return obj


def dump_table(rows: Any, dtype: npt.DTypeLike = TABLE) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(rows, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


def load_table(raw: Buffer, count: int, path: StrPath) -> Rows:
    """The record table (TABLE dtype), checked against the expected dtype and length: a view
    of `raw` (no copy) when it is a current one; a version-1 table gets key = index."""
    rows = load_npy(raw, (TABLE, ROW), count, "record table", path)
    if rows.dtype == ROW:
        table = np.empty(count, dtype=TABLE)
        for name in ROW.names or ():
            table[name] = rows[name]
        table["key"] = np.arange(count)
        return table
    return rows


def load_npy(raw: Buffer, dtypes: Sequence[np.dtype[Any]], count: int, what: str,
             path: StrPath) -> Rows:
    """An ``.npy`` of `count` items of one of `dtypes` as a view of the buffer `raw` (an LMDB
    value read with buffers=True stays mapped, not copied); never unpickles."""
    try:
        head = io.BytesIO(bytes(raw[:4096]))
        version = np.lib.format.read_magic(head)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(head)
        if dtype.hasobject:  # a pickle: never loaded
            raise ValueError("it holds Python objects, which fastlmdb never unpickles")
        ok = dtype in dtypes and shape == (count,) and not fortran
        array = np.frombuffer(raw, dtype=dtype, count=count, offset=head.tell()) if ok else None
    except Exception as exc:  # noqa: BLE001 - numpy's header parser raises many kinds
        raise DatabaseError(f"{path}: the {what} is unreadable ({exc!r}); "
                            "the database is damaged: convert it again") from None
    if array is None:
        raise DatabaseError(f"{path}: the {what} has dtype {dtype} and shape {shape}, "
                            f"expected {count} items of {dtypes[0]}; "
                            "the database is damaged: convert it again")
    return array


def rows_from_bytes(raw: Buffer) -> Rows:
    raw = bytes(raw)
    if len(raw) % ROW.itemsize:
        raise DatabaseError(f"a chunk of the record table has {len(raw)} bytes, not a multiple "
                            f"of {ROW.itemsize}; the database is damaged: convert it again")
    return np.frombuffer(raw, dtype=ROW)


def check_info(info: Json, path: StrPath) -> Json:
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


def make_plan(source: str, files: int, files_sha256: str, *, split: str, save_as: str,
              max_pixels: int | None, max_size: int | None, quality: int,
              check_decode: bool = False, order: str = "source",
              order_seed: int = 0) -> Json:
    """The `plan` record: what a resumed run must agree on (the converter's settings that
    change the stored records, the source folder or archive, its number of files and the
    digest of their names and labels)."""
    plan = {"source": source, "split": split, "save_as": save_as, "max_pixels": max_pixels,
            "max_size": max_size, "quality": quality, "files": files,
            "files_sha256": files_sha256}
    # Only when it matters (numpy mode decodes anyway), so partial databases made before the
    # flag existed still resume.
    if check_decode and save_as == "jpeg":
        plan["check_decode"] = True
    if order != "source":  # absent: the source order, as before the flag existed
        plan.update(order=order, order_seed=order_seed)
    return plan


# The `progress` record, rewritten in every transaction: files done (in write order), records
# stored, and what the final `info` lists.
PROGRESS_FIELDS: dict[str, Kinds] = {
    "next_source": int, "stored": int, "bytes_in": int, "skipped": list, "transcoded": list,
    "warnings": list, "resized": int, "started": (int, float)}


def new_progress(started: float) -> Json:
    """The progress record of a conversion that has done nothing yet."""
    return {"next_source": 0, "stored": 0, "bytes_in": 0, "skipped": [], "transcoded": [],
            "warnings": [], "resized": 0, "started": started}


def check_progress(progress: Json | None, path: StrPath) -> Json:
    """A partial database's progress record, checked; returns it."""
    if progress is None:
        raise _field_error(path, "progress", "is missing")
    progress.setdefault("warnings", [])  # a partial database from before warnings existed
    _check_types(progress, PROGRESS_FIELDS, path, "progress.")
    return progress


def make_info(plan: Json, classes: Sequence[str], progress: Json, logical: Rows,
              skipped: list[Any], *, made_by: str, finished: float) -> Json:
    """The final `info` record; `logical`: the logical index of each key (the record indices
    in progress are keys, the write order's)."""
    def by_logical(entries: Iterable[Sequence[Any]]) -> list[list[Any]]:
        return sorted([int(logical[key]), path, why] for key, path, why in entries)

    info = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "order": plan.get("order", "source"), "order_seed": plan.get("order_seed"),
        "imgtype": plan["save_as"], "count": int(len(logical)), "classes": classes,
        "class_to_idx": {name: i for i, name in enumerate(classes)},
        "split": plan["split"], "source": plan["source"],
        "transcoded": by_logical(progress["transcoded"]),
        "warnings": by_logical(progress["warnings"]), "skipped": skipped,
        "resized": progress["resized"], "max_size": plan["max_size"],
        "quality": plan["quality"], "bytes_in": progress["bytes_in"], "made_by": made_by,
        "started": progress["started"], "finished": finished,
    }
    if "shard" in plan:
        info["shard"] = plan["shard"]
    return info


# Every field of `info` that a reader uses, with its JSON type; `shard` only in a shard's.
INFO_FIELDS: dict[str, Kinds] = {
    "count": int, "classes": list, "class_to_idx": dict, "imgtype": str, "split": str,
    "source": str, "transcoded": list, "skipped": list, "resized": int, "max_size": int,
    "quality": int, "bytes_in": int, "made_by": str, "started": (int, float),
    "finished": (int, float)}
SHARD_FIELDS: dict[str, Kinds] = {"index": int, "count": int, "first_source": int, "files": int}


def _check_fields(info: Json, path: StrPath) -> None:
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


def _check_types(record: Mapping[str, Any], fields: Mapping[str, Kinds], path: StrPath,
                 prefix: str) -> None:
    for name, kind in fields.items():
        if not isinstance(record.get(name), kind):
            raise _field_error(path, prefix + name, "is missing or of the wrong type")


def _shaped(entry: Any, kinds: Sequence[Kinds]) -> bool:
    return (isinstance(entry, list) and len(entry) == len(kinds)
            and all(isinstance(value, kind) for value, kind in zip(entry, kinds)))


def _field_error(path: StrPath, name: str, what: str) -> DatabaseError:
    return DatabaseError(f"{path}: metadata field {name!r} {what}; the database is damaged: "
                         "convert it again")


# A sharded split: the folder DST/<split>.lmdb holds K complete databases, shard k holding a
# contiguous range of the split's files in write order (its rows keep their `source`
# positions in the whole split), and an index written last.
SHARD_INDEX = "index.json"
# A sharded database published for streaming (`fastlmdb upload`) also holds the manifest:
# {"format": MANIFEST_FORMAT, "version": 1, "info": <the split's info>,
#  "files": [{"file": <shard>, "size": <bytes>, "sha256": <hex>}, ...]} (in the index's order).
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fastlmdb-manifest"
SHARDS_FORMAT = "fastlmdb-shards"
SHARDS_VERSION = 1


def make_shard_index(plan: Json, names: Sequence[str], infos: Sequence[Json]) -> Json:
    """The `index.json` of a folder whose shards are all finished (written last)."""
    entries = [{"file": name, "count": info["count"],
                "first_source": info["shard"]["first_source"]}
               for name, info in zip(names, infos)]
    return {"format": SHARDS_FORMAT, "version": SHARDS_VERSION, "plan": plan,
            "count": sum(entry["count"] for entry in entries), "shards": entries}


def check_shard_index(index: Json, index_path: StrPath) -> Json:
    """A shard index, checked: format, version, and a consistent list of plain file names."""
    if index.get("format") != SHARDS_FORMAT:
        raise DatabaseError(f"{index_path} is not a fastlmdb shard index")
    if not isinstance(index.get("version"), int) or index["version"] > SHARDS_VERSION:
        raise DatabaseError(f"{index_path} has version {index.get('version')!r}, newer than "
                            "this fastlmdb reads: upgrade with `pip install -U fastlmdb`")
    entries = index.get("shards")
    ok = isinstance(entries, list) and entries and all(
        isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("count"), int)
        and os.path.basename(e["file"]) == e["file"] and e["file"] not in ("", ".", "..")
        and e["count"] >= 0 for e in entries)
    if not ok or index.get("count") != sum(e["count"] for e in cast("list[Json]", entries)):
        raise DatabaseError(f"{index_path}: the shard list is missing or inconsistent; "
                            "the database is damaged: convert it again")
    return index


def shard_file(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.lmdb"


def shard_bounds(files: int, count: int, index: int) -> tuple[int, int]:
    """Positions [start, stop) in the write order of shard `index` of `count`: equal ranges
    of files."""
    return files * index // count, files * (index + 1) // count

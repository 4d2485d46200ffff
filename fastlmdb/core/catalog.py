"""Any database path, one file or a folder of shards, read as one database: the catalog and a
reader of global keys.

A sharded split is the folder ``DST/<split>.lmdb`` holding ``<split>-0000k-of-0000K.lmdb``
shard files (each a complete database of its own) and ``index.json``, written last:
``{"format": "fastlmdb-shards", "version": 1, "count": N, "plan": {...},
"shards": [{"file": ..., "count": ..., "first_source": ...}, ...]}``.
Shard k holds the k-th range of the split's keys (its write order): global key g is local key
g - offset of the shard holding it. The split's record table (logical order, global keys) is
built from the shards' tables, or mapped from ``table.npy`` and ``logical.npy`` in the folder
(written with the index), so indices, labels and order are those of a one-file database of
the same split.
"""

from __future__ import annotations

import bisect
import logging
import os
from typing import Any, Callable, Sequence, Union, cast

import numpy as np

from fastlmdb.core import store
from fastlmdb.core import format as fmt
from fastlmdb.core.errors import DatabaseError, IncompleteDatabaseError
from fastlmdb.core.format import Json, Rows, StrPath

log = logging.getLogger(__name__)


def is_sharded(path: StrPath) -> bool:
    return os.path.isdir(path)


def read_index(path: StrPath) -> Json:
    """The checked index of the sharded database `path`."""
    index_path = os.path.join(path, fmt.SHARD_INDEX)
    try:
        with open(index_path, "rb") as file:
            index = fmt.load_json(file.read(), "index", index_path)
    except FileNotFoundError:
        raise IncompleteDatabaseError(
            f"{path} is a folder without {fmt.SHARD_INDEX}: not a finished sharded database; "
            "if its conversion stopped, run the same `fastlmdb convert` command again") from None
    return fmt.check_shard_index(index, index_path)


def shard_paths(path: StrPath) -> list[str]:
    return [os.path.join(path, entry["file"]) for entry in read_index(path)["shards"]]


def read_catalog(path: StrPath) -> tuple[Json, Rows]:
    """(info, rows) of a finished database, one file or sharded."""
    path = os.fspath(path)
    if not is_sharded(path):
        return store.read_file_catalog(path)
    catalogs = _shard_catalogs(path)
    rows = split_table([rows for _, rows in catalogs])
    return _merged(path, catalogs, fmt.logical_of_keys(rows)), rows


def _shard_catalogs(path: str) -> list[tuple[Json, Rows]]:
    """(info, rows) of every shard of `path`, checked against its index."""
    index = read_index(path)
    catalogs = [store.read_file_catalog(p) for p in shard_paths(path)]
    for entry, (info, _) in zip(index["shards"], catalogs):
        if info["count"] != entry["count"]:
            raise DatabaseError(f"{path}/{entry['file']} holds {info['count']} records, the "
                                f"index says {entry['count']}: the database is damaged; "
                                "convert it again")
    return catalogs


def _merged(path: str, catalogs: Sequence[tuple[Json, Rows]], logical: Rows) -> Json:
    offsets = np.cumsum([0] + [info["count"] for info, _ in catalogs]).tolist()
    def index_of(k: int, i: int) -> int:
        return int(logical[offsets[k] + int(catalogs[k][1]["key"][i])])

    info = merged_info([info for info, _ in catalogs], path, index_of)
    return {**info, "shards": len(catalogs)}


def split_table(tables: Sequence[Rows]) -> Rows:
    """The record table of the whole split from its shards' (global keys, logical order)."""
    offset, parts = 0, []
    for table in tables:
        part = np.array(table, dtype=fmt.TABLE)
        part["key"] += offset
        offset += len(part)
        parts.append(part)
    rows = np.concatenate(parts) if parts else np.empty(0, fmt.TABLE)
    return rows[np.argsort(rows["source"], kind="stable")]


TABLE_FILE, LOGICAL_FILE = "table.npy", "logical.npy"


def read_tables(path: StrPath) -> tuple[Json, Rows, Rows | None]:
    """(info, rows, logical) as store.read_file_tables gives them, one file or sharded: the arrays
    mapped (shared by every process), not copied, where the database allows."""
    path = os.fspath(path)
    if not is_sharded(path):
        return store.read_file_tables(path)
    if not os.path.exists(os.path.join(path, TABLE_FILE)):  # made before the files existed
        info, rows = read_catalog(path)
        return info, rows, fmt.logical_of_keys(rows)
    rows = np.load(os.path.join(path, TABLE_FILE), mmap_mode="r", allow_pickle=False)
    logical = np.load(os.path.join(path, LOGICAL_FILE), mmap_mode="r", allow_pickle=False)
    catalogs = _shard_catalogs(path)
    count = sum(info["count"] for info, _ in catalogs)
    if rows.dtype != fmt.TABLE or rows.shape != (count,) or logical.shape != (count,):
        raise DatabaseError(f"{path}/{TABLE_FILE} does not match the shards; the database is "
                            "damaged: convert it again")
    return _merged(path, catalogs, logical), rows, logical


def write_tables(path: StrPath, shards: Sequence[StrPath]) -> None:
    """Write the mapped tables of the finished `shards` (paths, in order) in the folder `path`,
    before its index."""
    rows = split_table([store.read_file_catalog(p)[1] for p in shards])
    for name, array in ((TABLE_FILE, rows), (LOGICAL_FILE, fmt.logical_of_keys(rows))):
        partial = os.path.join(path, name + ".partial")
        np.save(partial, array, allow_pickle=False)
        os.replace(partial + ".npy", os.path.join(path, name))


def read_paths(path: StrPath) -> list[str] | None:
    """Source paths relative to the split folder in logical order, or None if not recorded."""
    path = os.fspath(path)
    if not is_sharded(path):
        return store.read_file_paths(path)
    shards = [store.read_file_paths(p) for p in shard_paths(path)]
    if any(names is None for names in shards):
        return None
    sources = np.concatenate([store.read_file_catalog(p)[1]["source"] for p in shard_paths(path)])
    names = [name for names in cast("list[list[str]]", shards) for name in names]
    return [names[k] for k in np.argsort(sources, kind="stable").tolist()]


def merged_info(infos: Sequence[Json], path: StrPath,
                index_of: Callable[[int, int], int] | None = None) -> Json:
    """The info of the one database the shards make together (as a one-file conversion's).
    `index_of(shard, i)`: the split's index of record i of a shard (default: offset + i)."""
    first = infos[0]
    for info in infos[1:]:
        for name in ("classes", "imgtype", "split", "source", "max_size", "quality"):
            if info[name] != first[name]:
                raise DatabaseError(f"{path}: shards differ in {name!r}; they were not made "
                                    "by one conversion: convert the split again")
    merged = {name: value for name, value in first.items() if name != "shard"}
    offsets = np.cumsum([0] + [info["count"] for info in infos]).tolist()

    def by_offset(k: int, i: int) -> int:
        return cast(int, offsets[k] + i)

    index_of = index_of or by_offset
    merged.update(
        count=offsets[-1],
        transcoded=sorted([index_of(k, i), p, why] for k, info in enumerate(infos)
                          for i, p, why in info["transcoded"]),
        skipped=[s for info in infos for s in info["skipped"]],
        warnings=sorted([index_of(k, i), p, why] for k, info in enumerate(infos)
                        for i, p, why in info.get("warnings", [])),  # not in older databases
        resized=sum(info["resized"] for info in infos),
        bytes_in=sum(info["bytes_in"] for info in infos),
        started=min(info["started"] for info in infos),
        finished=max(info["finished"] for info in infos))
    return merged


def reader(path: StrPath) -> RecordReader:
    """A picklable reader of records by global index, for one file or a sharded folder."""
    path = os.fspath(path)
    return ShardedReader(path) if is_sharded(path) else store.Reader(path)


class ShardedReader:
    """store.Reader's interface over the shards of a folder."""

    def __init__(self, path: str) -> None:
        self.path = path
        index = read_index(path)
        self._readers = [store.Reader(p) for p in shard_paths(path)]
        self._offsets = np.cumsum([0] + [entry["count"] for entry in index["shards"]])
        self._starts = self._offsets.tolist()  # for bisect: one sample, no numpy call

    def get(self, index: int) -> memoryview:
        """One record (a map-style dataset's per-sample path): the shard found by bisection."""
        shard = bisect.bisect_right(self._starts, index) - 1
        if not 0 <= index < self._starts[-1]:
            return self.get_many([index])[0]  # raises the out-of-range error
        return self._readers[shard].get(index - self._starts[shard])

    def get_many(self, indices: Sequence[int]) -> list[memoryview]:
        keys = np.asarray(indices, dtype=np.int64)
        values: list[Any] = [None] * len(keys)
        shard_of = np.searchsorted(self._offsets, keys, side="right") - 1
        for shard in np.unique(shard_of).tolist():
            where = np.flatnonzero(shard_of == shard)
            if not 0 <= shard < len(self._readers):
                raise DatabaseError(f"{self.path}: record {int(keys[where[0]])} is out of "
                                    f"range (0..{self._offsets[-1] - 1})")
            local = (keys[where] - self._offsets[shard]).tolist()
            for k, value in zip(where.tolist(), self._readers[shard].get_many(local)):
                values[k] = value
        return values

    def read_range(self, start: int, stop: int) -> list[memoryview]:
        """Records start..stop-1 in key order, one cursor per shard it spans."""
        values: list[memoryview] = []
        for shard, reader in enumerate(self._readers):
            low, high = self._offsets[shard], self._offsets[shard + 1]
            if start < high and stop > low:
                values += reader.read_range(int(max(start, low) - low), int(min(stop, high) - low))
        return values

    def close(self) -> None:
        for reader in self._readers:
            reader.close()


RecordReader = Union[store.Reader, ShardedReader]  # what `reader` returns: one interface

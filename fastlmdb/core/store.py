"""The only module that opens LMDB: the flags are written once, here.

Readers open ``readonly=True, lock=False`` (a finished database never changes, so no reader
table is needed) once per process and file, and begin their own transaction in each process;
a forked child closes the environments it inherited and opens its own (py-lmdb, "Process
model": an environment must not be used after fork). Every open first checks the file against
the size its own header declares: a file cut short would be mapped and read past its end,
which kills the process with SIGBUS instead of raising.
The converter's writer process alone writes, with batched transactions and append-only keys.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
import sys
from typing import Any, Mapping, Sequence, cast

import lmdb
import numpy as np

from fastlmdb.core import format as fmt
from fastlmdb.core.errors import DatabaseError, IncompleteDatabaseError
from fastlmdb.core.format import Buffer, Json, Rows, StrPath

log = logging.getLogger(__name__)

MAX_DBS = 3


# An LMDB file begins with two meta pages; each holds this magic number after its page header.
_META_MAGIC = struct.pack("<I", 0xBEEFC0DE)
_MAGIC_OFFSET = 16
_RECOPY = ("it was not copied or downloaded completely: copy it again (`fastlmdb stage DB DIR` "
           "copies a database and checks the copy), or make it again with `fastlmdb convert`")


def _open(path: StrPath, **flags: Any) -> lmdb.Environment:
    path = os.fspath(path)
    env = lmdb.open(path, subdir=False, max_dbs=MAX_DBS, **flags)
    try:
        _check_complete(env, path)
    except DatabaseError:
        env.close()
        raise
    return env


def _check_complete(env: lmdb.Environment, path: str) -> None:
    """Raise unless the file holds every page its header says is in use.

    The header (the two meta pages, read with pread when the file is opened) records the
    last page used; reading a page past the end of the file through the map is SIGBUS.
    info() and stat() answer from the meta pages alone, without touching the other pages.
    """
    page_size = env.stat()["psize"]
    pages = env.info()["last_pgno"] + 1
    size = os.path.getsize(path)
    if size < pages * page_size:
        raise DatabaseError(
            f"{path} is cut short: it has {size:,} bytes, its header says it needs "
            f"{pages * page_size:,} ({pages:,} pages of {page_size:,} bytes); {_RECOPY}")


def _unopenable(path: str, exc: Exception) -> DatabaseError:
    """The DatabaseError for a file lmdb.open refused: too short to hold the header of the
    LMDB file it starts as, or not LMDB at all."""
    with open(path, "rb") as file:
        head = file.read(_MAGIC_OFFSET + len(_META_MAGIC))
    if head[_MAGIC_OFFSET:] == _META_MAGIC:
        return DatabaseError(f"{path} is cut short: it has {os.path.getsize(path):,} bytes, "
                             f"less than the two header pages of an LMDB file; {_RECOPY}")
    return DatabaseError(f"{path} is not an LMDB database ({exc})")


def _open_readonly(path: StrPath) -> lmdb.Environment:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DatabaseError(f"{path} is a directory; a fastlmdb database is one file, "
                            "DST/<split>.lmdb, made by `fastlmdb convert`")
    if not os.path.exists(path):
        if os.path.exists(fmt.partial_path(path)):
            raise IncompleteDatabaseError(
                f"{path} is not finished: its conversion stopped at {fmt.partial_path(path)}; "
                "run the same `fastlmdb convert` command again to resume it")
        raise DatabaseError(f"{path} does not exist; make it with `fastlmdb convert`")
    if os.path.getsize(path) == 0:
        raise DatabaseError(f"{path} is empty (0 bytes), not an LMDB database; {_RECOPY}")
    try:
        # readahead=True, even for random access: a cold `get` faults in its whole value
        # (measured: ~21 synchronous 4 KB faults for an 85 KB record with readahead off, and
        # no madvise can come first, as the value's address is only known after the get).
        # Kernel readahead reads a typical 110 KB record in one or two I/Os.
        return _open(path, readonly=True, lock=False, readahead=True)
    except lmdb.Error as exc:
        raise _unopenable(path, exc) from None


def _open_db(env: lmdb.Environment, name: bytes, path: StrPath) -> Any:
    try:
        return env.open_db(name, create=False)
    except lmdb.Error:  # NotFoundError, or a main database that is not ours
        raise DatabaseError(f"{path} is an LMDB file but not a fastlmdb database "
                            f"(no {name.decode()!r} table)") from None


# The environments this process opened, one per database file: py-lmdb refuses to open a file
# twice in one process. A forked child inherits them (and py-lmdb's record of them) but must not
# use them: _drop_inherited closes them in the child, so that it opens its own.
_ENVS: dict[tuple[int, int], _Opened] = {}  # (st_dev, st_ino) -> _Opened


@dataclasses.dataclass
class _Opened:
    env: lmdb.Environment
    pid: int  # the process that opened it
    tables: Any = None  # the long read transaction whose buffers the mapped tables are


def _drop_inherited() -> None:
    """In a forked child: close the parent's environments (their transactions with them)."""
    for opened in _ENVS.values():
        try:
            opened.env.close()
        except lmdb.Error as exc:  # closing releases only this process's map and descriptor
            log.warning("closing an environment inherited across fork: %s", exc)
    _ENVS.clear()


os.register_at_fork(after_in_child=_drop_inherited)


def opened_by(path: StrPath) -> int | None:
    """The pid of the process that opened this process's environment of `path`, or None:
    after a fork, always the child itself (what the tests check)."""
    stat = os.stat(path)
    opened = _ENVS.get((stat.st_dev, stat.st_ino))
    return None if opened is None else opened.pid


def _shared_env(path: StrPath) -> lmdb.Environment:
    return _opened(path).env


def _opened(path: StrPath) -> _Opened:
    """This process's _Opened record of the database file `path`, opened if need be."""
    try:
        # By file identity, as py-lmdb counts it: a database renamed since it was opened (a
        # shard moved into its finished folder) is the same file, one replaced since
        # (convert --overwrite) another; an open env keeps its inode from being reused.
        stat = os.stat(path)
        key = (stat.st_dev, stat.st_ino)
    except OSError:  # _open_readonly says what is wrong (or, if it just appeared, opens it)
        return _Opened(_open_readonly(path), os.getpid())
    opened = _ENVS.get(key)
    if opened is None:
        opened = _ENVS[key] = _Opened(_open_readonly(path), os.getpid())
    return opened


def read_file_catalog(path: StrPath) -> tuple[Json, Rows]:
    """(info, rows) of a finished database; rows in logical order (fmt.TABLE)."""
    env = _shared_env(path)
    meta = _open_db(env, fmt.META_DB, path)
    with env.begin(db=meta) as txn:
        raw_info, raw_table = txn.get(fmt.INFO_KEY), txn.get(fmt.TABLE_KEY)
    info, rows = _catalog_of(raw_info, raw_table, path)
    _open_db(env, fmt.IMAGES_DB, path)
    return info, rows


def _catalog_of(raw_info: Buffer | None, raw_table: Buffer | None,
                path: StrPath) -> tuple[Json, Rows]:
    info = _final_info(raw_info, raw_table, path)
    return info, fmt.load_table(cast(Buffer, raw_table), info["count"], path)


def _final_info(raw_info: Buffer | None, raw_table: Buffer | None, path: StrPath) -> Json:
    if raw_info is None or raw_table is None:
        raise IncompleteDatabaseError(
            f"{path} has no final metadata: its conversion did not finish; run the same "
            "`fastlmdb convert` command again to resume it")
    return fmt.check_info(fmt.load_json(raw_info, "info", path), path)


def read_file_tables(path: StrPath) -> tuple[Json, Rows, Rows | None]:
    """(info, rows, logical) of a finished database, the arrays read-only views of the map
    (no copy: every process reading the file shares these pages). `logical`: the logical
    index of each key, or None where keys are the indices (version 1, whose rows are
    fmt.ROW, without a key column)."""
    opened = _opened(path)
    env = opened.env
    if opened.tables is None:
        # A finished database never changes: the transaction lives as long as its environment
        # (per file, not per path: a database replaced by --overwrite is another file).
        opened.tables = env.begin(db=_open_db(env, fmt.META_DB, path), buffers=True)
    txn = opened.tables
    raw_info, raw_table = txn.get(fmt.INFO_KEY), txn.get(fmt.TABLE_KEY)
    info = _final_info(raw_info, raw_table, path)
    # A version-1 table (fmt.ROW, no key column: key = index) is mapped as it is, too.
    rows = fmt.load_npy(raw_table, (fmt.TABLE, fmt.ROW), info["count"], "record table", path)
    raw_logical = txn.get(fmt.LOGICAL_KEY)
    logical = None if raw_logical is None else fmt.load_npy(
        raw_logical, (np.dtype("<u4"),), info["count"], "key index", path)
    _open_db(env, fmt.IMAGES_DB, path)
    return info, rows, logical


def read_file_paths(path: StrPath) -> list[str] | None:
    """The source paths of a database's records (relative to its split folder), in logical
    order; None if it was made before they were recorded."""
    env = _shared_env(path)
    with env.begin(db=_open_db(env, fmt.META_DB, path)) as txn:
        raw, raw_info = txn.get(fmt.PATHS_KEY), txn.get(fmt.INFO_KEY)
    if raw is None:
        return None
    return fmt.split_paths(raw, _final_info(raw_info, raw, path)["count"])  # written together


def read_meta(path: StrPath, name: bytes) -> Json | None:
    """The JSON metadata entry `name` (fmt.PLAN_KEY, ...) of a database, or None."""
    env = _shared_env(path)
    with env.begin(db=_open_db(env, fmt.META_DB, path)) as txn:
        raw = txn.get(name)
    return None if raw is None else fmt.load_json(raw, name.decode(), path)


class Reader:
    """Per-process read-only access to the records of one database.

    Picklable: transactions are dropped on pickling and begun anew in each process.
    """

    def __init__(self, path: StrPath) -> None:
        self.path = os.fspath(path)
        self._pid: int | None = None
        self._txn: Any = None  # an lmdb.Transaction of self._pid

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pid": None, "_txn": None}

    def _ensure_open(self) -> Any:
        if self._pid != os.getpid():
            # After a fork the parent's transaction must not be used, nor ended, here (the
            # child closed the environment it belonged to, see _drop_inherited).
            env = _shared_env(self.path)
            images = _open_db(env, fmt.IMAGES_DB, self.path)
            # One long read transaction: a finished database never changes.
            self._txn = env.begin(db=images, buffers=True)
            self._pid = os.getpid()
        return self._txn

    def get(self, index: int) -> memoryview:
        """The stored value of record `index`, as a zero-copy buffer."""
        return self.get_many([index])[0]

    def get_many(self, indices: Sequence[int]) -> list[memoryview]:
        """Zero-copy buffers of several records, in the order asked."""
        txn = self._ensure_open()
        values = [txn.get(fmt.key(index)) for index in indices]
        for index, value in zip(indices, values):
            if value is None:
                raise DatabaseError(f"{self.path}: record {index} is missing; "
                                    "the database is damaged: run `fastlmdb verify`")
        return values

    def read_range(self, start: int, stop: int) -> list[memoryview]:
        """Zero-copy buffers of records start..stop-1, read with one cursor in key order."""
        cursor = self._ensure_open().cursor()
        values = []
        if cursor.set_key(fmt.key(start)):
            for value in cursor.iternext(keys=False, values=True):
                values.append(value)
                if len(values) == stop - start:
                    break
        if len(values) != stop - start:
            raise DatabaseError(f"{self.path}: records {start}..{stop - 1} are not all there; "
                                "the database is damaged: run `fastlmdb verify`")
        return values

    def close(self) -> None:
        if self._txn is not None and self._pid == os.getpid():
            self._txn.abort()
        self._pid = self._txn = None


WINDOWS_FIRST_MAP = 64 << 20


def _first_map_size(path: str, map_size: int) -> int:
    """`map_size`, a virtual reservation; but on Windows LMDB makes the file as large as its
    map, so there the map starts at the file's size (64 MiB at least) and grows when full."""
    if sys.platform != "win32":
        return map_size
    existing = os.path.getsize(path) if os.path.exists(path) else 0
    return max(existing, min(map_size, WINDOWS_FIRST_MAP))


class Writer:
    """The writer process's handle: append-only batched commits, map growth, metadata last."""

    def __init__(self, path: StrPath, *, map_size: int) -> None:
        self.path = os.fspath(path)
        # lock=False: the converter holds its own exclusive lock on the file (see convert).
        self.env: Any = _open(self.path, map_size=_first_map_size(self.path, map_size),
                              lock=False, meminit=False, readahead=False)  # None once closed
        self.images = self.env.open_db(fmt.IMAGES_DB)
        self.rows = self.env.open_db(fmt.ROWS_DB)
        self.meta = self.env.open_db(fmt.META_DB)

    @property
    def page_size(self) -> int:
        return int(self.env.stat()["psize"])

    @property
    def committed_bytes(self) -> int:
        """Bytes of the file that committed transactions use (a failed one may have written
        pages past them, which the next commit reuses)."""
        return int(self.env.info()["last_pgno"] + 1) * self.page_size

    def read_meta(self, name: bytes) -> Json | None:
        with self.env.begin(db=self.meta) as txn:
            raw = txn.get(name)
        return None if raw is None else fmt.load_json(raw, name.decode(), self.path)

    def all_rows(self) -> Rows:
        with self.env.begin(db=self.rows) as txn:
            chunks = [fmt.rows_from_bytes(value) for _, value in txn.cursor()]
        return np.concatenate(chunks) if chunks else np.empty(0, dtype=fmt.ROW)

    def commit(self, first: int, payloads: Sequence[Buffer], rows: Rows,
               meta: Mapping[bytes, Any]) -> None:
        """Write records first.., their rows and the `meta` JSON entries in one transaction."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    self._put(txn, first, payloads, rows, meta)
                return
            except lmdb.MapFullError:
                self._grow()

    def _put(self, txn: Any, first: int, payloads: Sequence[Buffer], rows: Rows,
             meta: Mapping[bytes, Any]) -> None:
        items = [(fmt.key(first + k), p) for k, p in enumerate(payloads)]
        if items:
            txn.cursor(db=self.images).putmulti(items, append=True)
            txn.put(fmt.key(first), rows.tobytes(), db=self.rows, append=True)
        for name, value in meta.items():
            raw = value if isinstance(value, bytes) else fmt.dump_json(value)
            txn.put(name, raw, db=self.meta)

    def clear(self) -> None:
        """Empty every table: a partial database is being started again."""
        with self.env.begin(write=True) as txn:
            for db in (self.images, self.rows, self.meta):
                txn.drop(db, delete=False)

    def _grow(self) -> None:
        size = self.env.info()["map_size"] * 2
        log.info("growing the map of %s to %.1f GB", self.path, size / 1e9)
        self.env.set_mapsize(size)

    def close(self) -> None:
        if self.env is not None:
            self.env.sync(True)
            self.env.close()
            self.env = None

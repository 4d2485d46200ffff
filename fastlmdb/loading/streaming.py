"""A sharded database at a URL (s3://, gs://, http(s)://, any fsspec URL), streamed: its
index, manifest and record table fetched when the dataset is made (small), its shards fetched
when an iteration needs them, into the node's bounded cache (shardcache.py), a few ahead of
the reader in the epoch's order.

The database is the folder that `fastlmdb upload` writes: the shards, ``table.npy`` and
``logical.npy``, ``manifest.json`` (the split's info; each shard's size and SHA-256) and
``index.json``, last. A shard's download is checked against the manifest's size and SHA-256
before it is renamed into place; the index's version (ETag, ...) is checked again before each
shard is fetched, so a database replaced in the bucket during a run is refused, not mixed.
"""

import collections
import contextlib
import concurrent.futures
import hashlib
import json
import logging
import os
import threading
import zlib

import numpy as np

from fastlmdb.core import format as fmt
from fastlmdb.core import catalog, remote, store
from fastlmdb.core.sizes import parse_size
from fastlmdb.core.errors import DatabaseError
from fastlmdb.loading import order, shardcache

log = logging.getLogger(__name__)

MANIFEST = fmt.MANIFEST
TABLE, LOGICAL = catalog.TABLE_FILE, catalog.LOGICAL_FILE
META = "meta"
CHUNK = 8 << 20  # bytes per ranged GET
PARALLEL_RANGES = 4  # ranged GETs of one shard in flight at once (bounded memory: 4 chunks)


def open_split(path, *, cache_dir, cache_limit, storage_options, window_shards,
               prefetch_shards):
    """A StreamedSplit when `path` is a URL; None for a local path (which takes no streaming
    argument)."""
    if not remote.is_url(path):
        given = [name for name, value in (("cache_dir", cache_dir), ("cache_limit", cache_limit),
                                          ("storage_options", storage_options)) if value]
        if given:
            raise ValueError(f"{', '.join(given)}: only for a database at a URL (s3://...), "
                             f"and {path} is a local path")
        return None
    if cache_dir is None or cache_limit is None:
        raise ValueError(f"{path} is a URL: streaming it needs cache_dir= (a folder on local "
                         "disk, shared by the node's processes) and cache_limit= (e.g. '20GB')")
    return StreamedSplit(path, cache_dir=cache_dir, cache_limit=cache_limit,
                         storage_options=storage_options, window=window_shards,
                         prefetch=prefetch_shards)


def _count_arg(name, value, least):
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return value


class StreamedSplit:
    """The sharded database at `url`, read through a ShardCache in `cache_dir`."""

    def __init__(self, url, *, cache_dir, cache_limit, storage_options=None, window=1,
                 prefetch=2):
        self.window = _count_arg("window_shards", window, 1)
        self.prefetch = _count_arg("prefetch_shards", prefetch, 0)
        limit = parse_size(cache_limit)
        self.url = url.rstrip("/")
        self.remote = remote.RemoteFolder(self.url, storage_options)
        name = f"{os.path.basename(self.url)}-{hashlib.sha1(self.url.encode()).hexdigest()[:12]}"
        self.cache = shardcache.ShardCache(os.path.join(os.fspath(cache_dir), name), limit)
        self.cache.prepare()
        self._tables = self._tables_pid = None
        self.version = self._index_version()
        self._fetch_meta()
        self._read_manifest()
        self._check_limit(limit)
        log.info("streaming %s: %d shards of up to %.1f MB through %s (cache_limit %.1f MB, "
                 "window %d shards, %d fetched ahead)", self.url, len(self.names),
                 max(self.sizes) / 1e6, self.cache.folder, limit / 1e6, self.window,
                 self.prefetch)

    def __getstate__(self):
        return {**self.__dict__, "_tables": None, "_tables_pid": None}

    # What the dataset is made from: fetched once per node and version.

    def _index_version(self):
        found = self.remote.stat(fmt.SHARD_INDEX, missing_ok=True)
        if found is None:
            raise DatabaseError(
                f"{self.url}: no {fmt.SHARD_INDEX} there. Streaming reads a sharded database "
                "(`fastlmdb convert --shards`) published with `fastlmdb upload DB URL`; a "
                "one-file database must be copied first (`fastlmdb stage URL LOCAL_DIR`)")
        return [found[0], found[1]]

    def _meta(self, name):
        return os.path.join(self.cache.folder, META, name)

    def _fetch_meta(self):
        """The index, manifest and tables in the cache folder, of the bucket's version: fetched
        (and the shards of another version deleted) by one process of the node."""
        stamp = self._meta("source.json")
        with self.cache.locked("meta"):
            if _read_json(stamp) == {"url": self.url, "index": self.version}:
                return
            self.cache.clear()
            os.makedirs(self._meta(""), exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._meta(MANIFEST))
            for name in (MANIFEST, TABLE, LOGICAL, fmt.SHARD_INDEX):
                data = self._read_object(name)
                if data is None:
                    continue
                with open(self._meta(name) + ".tmp", "wb") as file:
                    file.write(data)
                os.replace(self._meta(name) + ".tmp", self._meta(name))
            self.check_unchanged()  # the files read are of the version stamped
            _write_json(stamp, {"url": self.url, "index": self.version})

    def _read_object(self, name):
        """The object's bytes; None for a missing manifest (a database copied to the bucket
        another way: its shards are then checked record by record)."""
        if name in (MANIFEST, TABLE, LOGICAL) and self.remote.stat(name, True) is None:
            if name == MANIFEST:
                return None
            raise DatabaseError(f"{self.url}: no {name}; publish the database with "
                                "`fastlmdb upload DB URL`, which writes it")
        return self.remote.read(name)

    def _read_manifest(self):
        with open(self._meta(fmt.SHARD_INDEX), "rb") as file:
            index = fmt.check_shard_index(fmt.load_json(file.read(), "index", self.url),
                                          self.url)
        self.names = [entry["file"] for entry in index["shards"]]
        self.counts = [entry["count"] for entry in index["shards"]]
        self.offsets = np.cumsum([0] + self.counts).astype(np.int64)
        if not os.path.exists(self._meta(MANIFEST)):
            self._without_manifest()
            return
        with open(self._meta(MANIFEST), "rb") as file:
            manifest = fmt.load_json(file.read(), "manifest", self.remote.url_of(MANIFEST))
        entries = manifest.get("files")
        if manifest.get("format") != fmt.MANIFEST_FORMAT or manifest.get("version") != 1:
            raise DatabaseError(f"{self.remote.url_of(MANIFEST)} is not a fastlmdb manifest "
                                "this version reads; upgrade fastlmdb or upload again")
        if not isinstance(entries, list) or [e.get("file") for e in entries] != self.names:
            raise DatabaseError(f"{self.remote.url_of(MANIFEST)} does not list the shards of "
                                f"{fmt.SHARD_INDEX}; upload the database again")
        self.sizes = [int(entry["size"]) for entry in entries]
        self.digests = [entry["sha256"] for entry in entries]
        self.info = fmt.check_info(manifest.get("info", {}), self.remote.url_of(MANIFEST))

    def _without_manifest(self):
        """Sizes from the server; each shard checked by its records' sizes and CRC-32 (the
        table's); the info from the first shard's (every shard has the split's classes)."""
        log.info("%s has no %s: shard sizes asked of the server, downloads checked record by "
                 "record (`fastlmdb upload` writes it)", self.url, MANIFEST)
        self.sizes = [self.remote.stat(name)[0] for name in self.names]
        self.digests, self.info = None, {"classes": []}
        path = self.fetch(0, lambda: False)
        try:
            self.info = store.read_file_catalog(path)[0]
        finally:
            self.release(0)

    def _check_limit(self, limit, ranks=None, error=ValueError):
        """Refuse a limit that could deadlock: each rank of the node holds up to its window,
        the shards fetched ahead and one it finishes (`ranks` on the node: LOCAL_WORLD_SIZE,
        as torchrun says, else 1)."""
        ranks = ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        held = self.window + self.prefetch + 1
        least = ranks * held * max(self.sizes)
        if limit < least:
            raise error(
                f"cache_limit={limit:,} bytes is below the minimum for {self.url}: "
                f"{least:,} ({least / 1e6:.1f} MB) = {ranks} rank(s) on this node x "
                f"(window_shards {self.window} + prefetch_shards {self.prefetch} + 1) x the "
                f"largest shard ({max(self.sizes):,} bytes); raise cache_limit or lower "
                "prefetch_shards")

    def check_unchanged(self):
        now = self._index_version()
        if now != self.version:
            raise DatabaseError(f"{self.url} changed in the bucket during this run ("
                                f"{fmt.SHARD_INDEX} was {self.version}, is now {now}): a run "
                                "reads one version of a database; start it again")

    def tables(self):
        """(info, rows, logical) as catalog.read_tables gives them, mapped in this process."""
        if self._tables_pid != os.getpid():
            count = int(self.offsets[-1])
            rows = np.load(self._meta(TABLE), mmap_mode="r", allow_pickle=False)
            logical = np.load(self._meta(LOGICAL), mmap_mode="r", allow_pickle=False)
            if rows.dtype != fmt.TABLE or rows.shape != (count,) or logical.shape != (count,):
                raise DatabaseError(f"{self.remote.url_of(TABLE)} does not match the shards; "
                                    "upload the database again")
            self._tables, self._tables_pid = (rows, logical), os.getpid()
        return ({**self.info, "count": int(self.offsets[-1]), "shards": len(self.names)},
                *self._tables)

    # An epoch's reads.

    def order(self, *, shuffle, seed, epoch):
        return order.shard_order(self.counts, shuffle=shuffle, seed=seed, epoch=epoch,
                                 window=self.window)

    def shard_of(self, keys):
        return np.searchsorted(self.offsets, keys, side="right") - 1

    def session(self, keys, rank):
        """The reads of one iteration of `rank`, refused when more ranks of the node read this
        cache now than its limit was checked for."""
        registration, ranks = self.cache.join(rank)
        try:
            self._check_limit(self.cache.limit, ranks, DatabaseError)
        except DatabaseError:
            self.cache.leave(registration)
            raise
        return Session(self, keys, registration)

    def fetch(self, shard, stopping):
        """The local path of shard `shard`, pinned (release() it)."""
        return self.cache.acquire(self.names[shard], self.sizes[shard],
                                  lambda part: self._download(shard, part, stopping), stopping)

    def release(self, shard):
        path = self.cache.path(self.names[shard])
        store.close_file(path)
        self.cache.unpin(self.names[shard])

    def _download(self, shard, part, stopping):
        """Shard `shard` into the allocated file `part`, checked against the manifest."""
        self.check_unchanged()
        name, size = self.names[shard], self.sizes[shard]
        digest = hashlib.sha256()
        with open(part, "r+b") as file:
            for data in self._chunks(name, size, stopping):
                file.write(data)
                digest.update(data)
        if self.digests is None:
            self._check_records(shard, part)
        elif digest.hexdigest() != self.digests[shard]:
            raise shardcache.ShardMismatch(f"{self.remote.url_of(name)}: the downloaded bytes "
                                           "do not match the SHA-256 in manifest.json")

    def _check_records(self, shard, part):
        """Every record of the downloaded shard `part` against the split's table."""
        url = self.remote.url_of(self.names[shard])
        _, rows, logical = self.tables()
        wanted = rows[logical[self.offsets[shard]:self.offsets[shard + 1]]]
        reader = store.Reader(part)
        try:
            values = reader.read_range(0, self.counts[shard])
            bad = [k for k, (value, row) in enumerate(zip(values, wanted))
                   if len(value) != row["nbytes"] or zlib.crc32(value) != row["crc32"]]
        except DatabaseError as exc:
            raise shardcache.ShardMismatch(f"{url}: not a complete shard ({exc})") from None
        finally:
            reader.close()
            store.close_file(part)
        if bad:
            raise shardcache.ShardMismatch(f"{url}: {len(bad)} record(s) do not match their "
                                           f"size and CRC-32 in the table (the first: record "
                                           f"{bad[0]} of the shard)")

    def _chunks(self, name, size, stopping):
        """The object's bytes in order, PARALLEL_RANGES ranged GETs in flight."""
        spans = [(start, min(start + CHUNK, size)) for start in range(0, size, CHUNK)]
        pool = concurrent.futures.ThreadPoolExecutor(PARALLEL_RANGES)
        pending = collections.deque()
        try:
            for start, end in spans:
                pending.append(pool.submit(self.remote.read_range, name, start, end, size))
                if len(pending) == PARALLEL_RANGES:
                    yield self._next(pending, stopping)
            while pending:
                yield self._next(pending, stopping)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _next(pending, stopping):
        data = pending.popleft().result()
        if stopping():
            raise shardcache.Stopped()
        return data


class Session:
    """One iteration's reads in one process: its keys in order (`keys`), the shards they are in
    fetched by a thread ahead of the reader (the first `prefetch` not yet touched), each
    released once the reader is past its last record."""

    def __init__(self, split, keys, registration):
        self.split, self.registration = split, registration
        keys = np.asarray(keys, dtype=np.int64)
        shards = split.shard_of(keys)
        unique, first = np.unique(shards, return_index=True)
        self.seq = unique[np.argsort(first)].tolist()  # shards in order of first use
        self.where = {shard: i for i, shard in enumerate(self.seq)}
        _, last = np.unique(shards[::-1], return_index=True)
        self.last = dict(zip(unique.tolist(), (len(keys) - 1 - last).tolist()))
        self.pos = self.front = 0
        self.ready, self.readers, self.error, self.stop = {}, {}, None, False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._prefetch, daemon=True,
                                       name="fastlmdb-prefetch")
        self.thread.start()

    def _prefetch(self):
        try:
            for i, shard in enumerate(self.seq):
                with self.cond:
                    self.cond.wait_for(lambda: self.stop or i < self.front + self.split.prefetch)
                    if self.stop:
                        return
                path = self.split.fetch(shard, lambda: self.stop)
                with self.cond:
                    self.ready[shard] = path
                    self.cond.notify_all()
        except shardcache.Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def _reader(self, shard):
        reader = self.readers.get(shard)
        if reader is None:
            with self.cond:
                self.front = max(self.front, self.where[shard] + 1)
                self.cond.notify_all()
                self.cond.wait_for(lambda: shard in self.ready or self.error is not None)
                if shard not in self.ready:
                    raise self.error
            reader = self.readers[shard] = store.Reader(self.ready[shard])
        return reader

    def read(self, wanted):
        """Copies of the records with keys `wanted`, the next keys of the plan, in order."""
        wanted = np.asarray(wanted, dtype=np.int64)
        shards = self.split.shard_of(wanted)
        unique, first = np.unique(shards, return_index=True)
        values = [None] * len(wanted)
        end = self.pos + len(wanted)
        for shard in unique[np.argsort(first)].tolist():
            where = np.flatnonzero(shards == shard)
            local = (wanted[where] - self.split.offsets[shard]).tolist()
            for k, value in zip(where.tolist(), self._reader(shard).get_many(local)):
                values[k] = bytes(value)  # a copy: the shard may go once released
            if self.last[shard] < end:
                self._release(shard)
        self.pos = end
        return values

    def _release(self, shard):
        self.readers.pop(shard).close()
        with self.cond:
            self.ready.pop(shard)
        self.split.release(shard)

    def close(self):
        """Stop fetching; release every shard this session holds."""
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        self.thread.join()
        for shard in list(self.ready):
            reader = self.readers.pop(shard, None)
            if reader is not None:
                reader.close()
            self.split.release(shard)
        self.ready.clear()
        self.split.cache.leave(self.registration)


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _write_json(path, obj):
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(obj, file)
    os.replace(path + ".tmp", path)

"""A bounded folder of downloaded shards, shared by every process of a node.

Every DataLoader worker of every rank on a node that streams one database uses one folder:
a shard is downloaded once per node, by whichever process wants it first, while the others
wait for it. The promises, and how they are kept (POSIX file locks, `flock`, which the kernel
drops when a process dies, so a crash leaves no lock behind):

* Never a half-written shard: a download goes to ``NAME.part``, is checked, and only then
  renamed to ``NAME``. A ``.part`` whose downloader is gone (its ``locks/NAME.fetch`` lock is
  free) is deleted by the next process that makes room.
* A hard limit: space is reserved before a download begins (the ``.part`` is allocated at
  the shard's full size, under the node's ``locks/cache`` lock), so the bytes of shards and
  downloads in the folder never exceed the limit. To make room, finished shards are evicted
  least recently used first (a reader touches its shard), never one a process has pinned:
  a reader holds a shared lock on ``locks/NAME.pin`` from before it looks for the shard until
  it is done with it, and eviction takes that lock exclusively, without waiting.
* ``stats.json``: the peak of the folder's shard bytes, the bytes fetched and evictions,
  written under the node's lock (what the tests and the benchmark measure).
"""

import contextlib
import errno
import json
import logging
import os
import time

from fastlmdb.core import files
from fastlmdb.core.errors import DatabaseError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): the node-shared cache needs flock; local reads don't
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

PART = ".part"
LOCKS = "locks"
STATS = "stats.json"
WAIT_S = 600.0  # a process waits this long for space that others hold before it says so
_POLL_S = 0.05  # space freed by another process has no event to wait on: poll for it

class ShardMismatch(DatabaseError):
    """A downloaded shard whose bytes do not match their checks."""


class Stopped(Exception):
    """The reader no longer wants the shard being fetched."""


class ShardCache:
    """The node's folder of shards of one database, at most `limit` bytes of them.
    Picklable: the locks this process holds stay with it."""

    def __init__(self, folder, limit):
        if fcntl is None:
            raise DatabaseError(f"streaming into {folder} needs POSIX file locks (flock), which "
                                "this platform lacks: copy the database to local disk with "
                                "`fastlmdb stage` and read the copy")
        self.folder, self.limit = os.fspath(folder), int(limit)
        self._pins, self._pid = {}, os.getpid()

    def __getstate__(self):
        return {**self.__dict__, "_pins": {}, "_pid": None}

    def prepare(self):
        """Make the folder; a clear error when the disk refuses."""
        try:
            os.makedirs(os.path.join(self.folder, LOCKS), exist_ok=True)
            probe = os.path.join(self.folder, f".probe-{os.getpid()}")
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except OSError as exc:
            raise _disk_error(self.folder, exc, "the cache") from None

    def path(self, name):
        return os.path.join(self.folder, name)

    # Pins: a reader's shared lock on a shard.

    def _own_pins(self):
        if self._pid != os.getpid():  # a forked copy: the parent's descriptors are not ours
            self._pins, self._pid = {}, os.getpid()
        return self._pins

    def pin(self, name):
        pins = self._own_pins()
        if name not in pins:
            pins[name] = self._lock(f"{name}.pin", fcntl.LOCK_SH)

    def unpin(self, name):
        fd = self._own_pins().pop(name, None)
        if fd is not None:
            os.close(fd)  # releases the lock

    def pinned(self):
        return sorted(self._own_pins())

    def _lock(self, lock_name, how):
        """A descriptor of locks/`lock_name` holding flock `how`; None if LOCK_NB refused."""
        fd = os.open(os.path.join(self.folder, LOCKS, lock_name), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, how)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def _held(self, lock_name, how=None):
        fd = self._lock(lock_name, fcntl.LOCK_EX if how is None else how)
        try:
            yield fd is not None
        finally:
            if fd is not None:
                os.close(fd)

    def locked(self, lock_name="cache"):
        """A node-wide lock of the folder: "cache" (usage, reservations, evictions, stats),
        or another name of the caller's."""
        return self._held(lock_name)

    # Getting a shard.

    def acquire(self, name, size, fetch, stopping=lambda: False):
        """The local path of shard `name` (`size` bytes), pinned: found in the folder, or
        downloaded by fetch(part) into the reserved file `part` (fetch raises ShardMismatch
        when the bytes fail their checks: they are fetched once more, then reported).
        `stopping()` true ends a wait for space with Stopped."""
        self.pin(name)
        try:
            path = self.path(name)
            if _touch(path):
                return path
            with self._held(f"{name}.fetch"):  # waits while another process downloads it
                if not _touch(path):
                    self._fetch(name, size, fetch, stopping)
            return path
        except BaseException:
            self.unpin(name)
            raise

    def _fetch(self, name, size, fetch, stopping):
        part = self.path(name) + PART
        with contextlib.suppress(FileNotFoundError):  # we hold its fetch lock: a dead one's
            os.remove(part)
        for attempt in range(2):
            self._reserve(part, size, stopping)
            try:
                fetch(part)
            except ShardMismatch as exc:
                _remove(part)
                if attempt:
                    raise ShardMismatch(f"{exc} (fetched twice); the object in the bucket "
                                        "is damaged: upload the database again") from None
                log.warning("%s; fetching it again", exc)
                continue
            except BaseException:
                _remove(part)
                raise
            os.replace(part, self.path(name))
            with self.locked():
                self._update_stats(fetched_bytes=size, fetches=1)
            return

    def _reserve(self, part, size, stopping):
        """Allocate `part` at `size` bytes once the folder has room, evicting unpinned shards."""
        if size > self.limit:
            raise DatabaseError(f"{part}: a shard of {size:,} bytes cannot fit in "
                                f"cache_limit={self.limit:,}")
        started = time.monotonic()
        while True:
            with self.locked():
                self._remove_stale_parts()
                used = self.usage()
                if used + size > self.limit:
                    used -= self._evict(used + size - self.limit)
                if used + size <= self.limit:
                    _allocate(part, size, self.folder)
                    self._update_stats(peak_bytes=used + size)
                    return
            if time.monotonic() - started > WAIT_S:
                raise DatabaseError(
                    f"{self.folder}: waited {WAIT_S:.0f} s for {size:,} bytes of cache that "
                    f"other processes hold (cache_limit={self.limit:,}, {used:,} in use and "
                    "pinned): more processes of this node stream this database than the limit "
                    "was sized for; raise cache_limit")
            if stopping():
                raise Stopped(part)
            time.sleep(_POLL_S)

    def usage(self):
        """Bytes of shards and reserved downloads in the folder."""
        return sum(size for _, size, _ in self._entries(parts=True))

    def _entries(self, parts):
        """(name, size, mtime) of the finished shards (and the downloads when `parts`)."""
        found = []
        for entry in os.scandir(self.folder):
            if entry.is_file() and (entry.name.endswith(".lmdb")
                                    or (parts and entry.name.endswith(".lmdb" + PART))):
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat()
                    found.append((entry.name, stat.st_size, stat.st_mtime_ns))
        return found

    def _evict(self, need):
        """Delete unpinned shards, least recently used first, until `need` bytes are freed
        (or none is left to delete); returns the bytes freed."""
        freed = 0
        for name, size, _ in sorted(self._entries(parts=False), key=lambda e: e[2]):
            if freed >= need:
                break
            with self._held(f"{name}.pin", fcntl.LOCK_EX | fcntl.LOCK_NB) as free:
                if free:
                    _remove(self.path(name))
                    freed += size
                    self._update_stats(evictions=1)
        return freed

    def _remove_stale_parts(self):
        for entry in os.scandir(self.folder):
            if entry.name.endswith(PART):
                name = entry.name[:-len(PART)]
                with self._held(f"{name}.fetch", fcntl.LOCK_EX | fcntl.LOCK_NB) as free:
                    if free:  # no process downloads it: left by one that died
                        log.info("removing %s, left by a process that stopped", entry.path)
                        _remove(entry.path)

    def join(self, rank):
        """Register this process as a reader for `rank` (until leave(fd)): (its lock's
        descriptor, the ranks of the node reading now, this one included)."""
        fd = self._lock(f"rank-{rank}.{os.getpid()}.reader", fcntl.LOCK_EX)
        ranks = set()
        for entry in os.scandir(os.path.join(self.folder, LOCKS)):
            if entry.name.startswith("rank-") and entry.name.endswith(".reader"):
                with self._held(entry.name, fcntl.LOCK_EX | fcntl.LOCK_NB) as gone:
                    if gone:  # its process ended
                        _remove(entry.path)
                    else:
                        ranks.add(entry.name.split(".")[0])
        return fd, len(ranks)

    @staticmethod
    def leave(fd):
        os.close(fd)

    def clear(self):
        """Delete every shard (another version of the database is cached): refused while a
        process of the node reads one."""
        with self.locked():
            self._remove_stale_parts()
            for name, _, _ in self._entries(parts=True):
                if name.endswith(PART):
                    raise DatabaseError(f"{self.folder}: another process downloads {name} "
                                        "of another version of this database; give each job "
                                        "its own cache_dir")
                with self._held(f"{name}.pin", fcntl.LOCK_EX | fcntl.LOCK_NB) as free:
                    if not free:
                        raise DatabaseError(f"{self.folder}: another process reads {name} of "
                                            "another version of this database; give each "
                                            "job its own cache_dir")
                    _remove(self.path(name))

    def stats(self):
        """What stats.json says: peak_bytes, fetched_bytes, fetches, evictions."""
        try:
            with open(os.path.join(self.folder, STATS), encoding="utf-8") as file:
                return json.load(file)
        except (OSError, ValueError):
            return {"peak_bytes": 0, "fetched_bytes": 0, "fetches": 0, "evictions": 0}

    def _update_stats(self, peak_bytes=0, **counts):
        """Under the node's lock: the peak raised to `peak_bytes`, the counts added."""
        stats = self.stats()
        stats["peak_bytes"] = max(stats["peak_bytes"], peak_bytes)
        for name, value in counts.items():
            stats[name] += value
        files.write_json_atomically(os.path.join(self.folder, STATS), stats)


def _touch(path):
    """Mark a shard used now (the LRU order); whether it is there."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


def _remove(path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _allocate(part, size, folder):
    """`part` at its full size on disk now: a full disk fails here, not mid-download."""
    try:
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError as exc:
        _remove(part)
        raise _disk_error(folder, exc, f"{size:,} bytes for {os.path.basename(part)}") from None


def _disk_error(folder, exc, what):
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "the disk is full; free space there or lower cache_limit"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "it is not writable; give a cache_dir on a writable local disk"
    else:
        why = "check the disk"
    return DatabaseError(f"cache_dir {folder}: cannot write {what} ({exc.strerror}): {why}")

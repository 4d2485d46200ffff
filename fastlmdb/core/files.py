"""File-system steps that keep the promise "a database's final name only ever holds a finished
database": an exclusive lock while writing, an atomic publish, sizes of files and shard folders.
"""

import contextlib
import json
import os
import shutil
from typing import Iterator, Union

import filelock

from fastlmdb.core.errors import ConversionError


def lock_path(partial: str) -> str:
    """The lock file of database `partial` (a file or a folder of shards), beside it."""
    return f"{os.fspath(partial).rstrip(os.sep)}.lock"


@contextlib.contextmanager
def exclusive(partial: str) -> Iterator[None]:
    """An exclusive lock on `partial` (a database file or a folder of shards) for as long as it
    is written: two runs must never write one database. The lock is the file lock_path(partial)
    (flock on POSIX, msvcrt on Windows, through filelock), removed when released."""
    path = lock_path(partial)
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise ConversionError(f"another fastlmdb process is writing {partial} (it holds "
                              f"{path}); wait for it to finish or stop it first") from None
    try:
        yield
    finally:
        lock.release()
        with contextlib.suppress(OSError):  # Windows: filelock removed it already
            os.remove(path)


def publish(partial: str, final: str) -> None:
    """Rename a finished database into place; an old one (--overwrite) goes only then."""
    if not os.path.lexists(final):
        os.replace(partial, final)
        return
    old = f"{final}.old-{os.getpid()}"
    os.replace(final, old)
    os.replace(partial, final)
    remove(old)


def remove(path: str) -> None:
    """Delete a database file or a folder of shards."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def size(path: str) -> int:
    """Bytes of a database file, or of every file in a folder of shards."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(entry.stat().st_size for entry in os.scandir(path) if entry.is_file())


def write_json_atomically(path: Union[str, "os.PathLike[str]"], obj: object) -> None:
    """Write `obj` as JSON at `path`: complete or not there at all, and on disk."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as file:
        json.dump(obj, file, indent=1, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)

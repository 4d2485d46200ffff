"""File-system steps that keep the promise "a database's final name only ever holds a finished
database": an exclusive lock while writing, an atomic publish, sizes of files and shard folders.
"""

import contextlib
import fcntl
import json
import os
import shutil

from fastlmdb.core.errors import ConversionError


@contextlib.contextmanager
def exclusive(partial):
    """An exclusive lock on `partial` (a database file, made if missing, or a folder of shards)
    for as long as it is written: two runs must never write one database."""
    flags = os.O_RDONLY if os.path.isdir(partial) else os.O_WRONLY | os.O_CREAT | os.O_APPEND
    fd = os.open(partial, flags, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConversionError(f"another fastlmdb process is writing {partial}; "
                                  "wait for it to finish or stop it first") from None
        yield
    finally:
        os.close(fd)


def publish(partial, final):
    """Rename a finished database into place; an old one (--overwrite) goes only then."""
    if not os.path.lexists(final):
        os.replace(partial, final)
        return
    old = f"{final}.old-{os.getpid()}"
    os.replace(final, old)
    os.replace(partial, final)
    remove(old)


def remove(path):
    """Delete a database file or a folder of shards."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def size(path):
    """Bytes of a database file, or of every file in a folder of shards."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(entry.stat().st_size for entry in os.scandir(path) if entry.is_file())


def write_json_atomically(path, obj):
    """Write `obj` as JSON at `path`: complete or not there at all, and on disk."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as file:
        json.dump(obj, file, indent=1, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)

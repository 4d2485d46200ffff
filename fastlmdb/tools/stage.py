"""Copy a database from shared storage to node-local disk once per node, checked.

On a network filesystem a cold random read costs a round trip per page fault; one sequential
copy per node runs at the network's bandwidth instead. Every rank of a node may call `stage`:
the first takes the node's lock and copies, the others wait for it and then use its copy.
A copy is checked record by record (sizes and CRC-32s against the record table) before it
takes the final name, and is made again when the source changes (size or mtime of any file;
for a URL, size and ETag or modification time). A URL (s3://, gs://, http(s)://, any fsspec
URL) is read through fsspec: see remote.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import TYPE_CHECKING, Any

import filelock

from fastlmdb.core import catalog, files
from fastlmdb.core import remote
from fastlmdb.tools import verify
from fastlmdb.tools.verify import StrPath
from fastlmdb.core import format as fmt
from fastlmdb.core.errors import DatabaseError

log = logging.getLogger(__name__)

STAMP = ".staged-from.json"

if TYPE_CHECKING:
    from typing import Protocol

    class _Database(Protocol):
        """What `stage` needs of its source: a _LocalDatabase or a remote.RemoteDatabase."""

        url: str
        name: str

        def identity(self) -> dict[str, Any]: ...

        def copy(self, partial: str) -> None: ...


def stage(db: StrPath, local_dir: StrPath, *, procs: int = 1,
          storage_options: dict[str, Any] | None = None) -> str:
    """The path of a checked copy of database `db` (file or sharded folder, a local path or an
    fsspec URL) in `local_dir`. `storage_options` go to fsspec for a URL, e.g.
    ``{"client_kwargs": {"endpoint_url": "http://minio:9000"}}``."""
    source: _Database = remote.RemoteDatabase(db, storage_options) if remote.is_url(db) \
        else _LocalDatabase(db)
    os.makedirs(local_dir, exist_ok=True)
    target = os.path.join(local_dir, source.name)
    # Waits while another rank of this node copies (flock on POSIX, msvcrt on Windows).
    with filelock.FileLock(os.path.join(local_dir, f".{source.name}.stage-lock")):
        identity = source.identity()
        if _stamp_of(local_dir, source.name) == identity and os.path.exists(target):
            return target
        started = time.monotonic()
        partial = target + ".partial"
        if os.path.lexists(partial):
            files.remove(partial)
        try:
            source.copy(partial)
            _check(partial, source.url, local_dir, procs)
        except BaseException:
            if os.path.lexists(partial):
                files.remove(partial)
            raise
        files.publish(partial, target)
        files.write_json_atomically(_stamp_path(local_dir, source.name), identity)
        log.info("staged %s to %s in %.1f s", source.url, target, time.monotonic() - started)
    return target


def _check(partial: str, url: str, local_dir: StrPath, procs: int) -> None:
    """Every record of the copy against its record table, or DatabaseError naming `url`."""
    try:
        report = verify.verify(partial, procs=procs, decode=False)
    except DatabaseError as exc:
        raise DatabaseError(f"the copy of {url} in {local_dir} is not a readable database "
                            f"({exc}); the source is damaged or was cut short: check it and "
                            "run again") from exc
    if not report.ok:
        raise DatabaseError(f"the copy of {url} in {local_dir} does not match its "
                            f"checksums ({report.problems[0]}); check the source and the "
                            "local disk and run again")


class _LocalDatabase:
    """A database on a mounted filesystem (NFS, Lustre, local)."""

    def __init__(self, db: StrPath) -> None:
        self.url = os.path.abspath(os.fspath(db)).rstrip(os.sep)
        self.name = os.path.basename(self.url)
        catalog.read_catalog(self.url)  # a finished database, or a clear error now

    def identity(self) -> dict[str, Any]:
        """What says the source is unchanged: every file's name, size and mtime."""
        source = self.url
        paths = [os.path.join(source, n) for n in sorted(os.listdir(source))] \
            if os.path.isdir(source) else [source]
        stats = [(os.path.basename(p), os.stat(p)) for p in paths]
        return {"source": source,
                "files": [[name, st.st_size, st.st_mtime_ns] for name, st in stats]}

    def copy(self, partial: str) -> None:
        """Copy to `partial` (a file, or a folder whose index is copied last)."""
        if not os.path.isdir(self.url):
            shutil.copyfile(self.url, partial)
            return
        os.makedirs(partial)
        names = sorted(os.listdir(self.url), key=lambda n: n == fmt.SHARD_INDEX)
        for name in names:
            shutil.copyfile(os.path.join(self.url, name), os.path.join(partial, name))


def _stamp_path(local_dir: StrPath, name: str) -> str:
    return os.path.join(local_dir, f".{name}{STAMP}")


def _stamp_of(local_dir: StrPath, name: str) -> Any:
    try:
        with open(_stamp_path(local_dir, name), encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None

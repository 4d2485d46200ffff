"""Copy a database from shared storage to node-local disk once per node, checked.

On a network filesystem a cold random read costs a round trip per page fault; one sequential
copy per node runs at the network's bandwidth instead. Every rank of a node may call `stage`:
the first takes the node's lock and copies, the others wait for it and then use its copy.
A copy is checked record by record (sizes and CRC-32s against the record table) before it
takes the final name, and is made again when the source changes (size or mtime of any file).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import filelock

from fastlmdb.core import catalog, files
from fastlmdb.tools import verify
from fastlmdb.tools.verify import StrPath
from fastlmdb.core import format as fmt
from fastlmdb.core.errors import DatabaseError

log = logging.getLogger(__name__)

STAMP = ".staged-from.json"


def stage(db: StrPath, local_dir: StrPath, *, procs: int = 1) -> str:
    """The path of a checked copy of database `db` (file or sharded folder) in `local_dir`."""
    source = os.path.abspath(os.fspath(db)).rstrip(os.sep)
    catalog.read_catalog(source)  # a finished database, or a clear error now
    os.makedirs(local_dir, exist_ok=True)
    name = os.path.basename(source)
    target = os.path.join(local_dir, name)
    # Waits while another rank of this node copies (flock on POSIX, msvcrt on Windows).
    with filelock.FileLock(os.path.join(local_dir, f".{name}.stage-lock")):
        identity = _identity(source)
        if _stamp_of(local_dir, name) == identity and os.path.exists(target):
            return target
        started = time.monotonic()
        partial = _copy(source, target)
        report = verify.verify(partial, procs=procs, decode=False)
        if not report.ok:
            files.remove(partial)
            raise DatabaseError(f"the copy of {source} in {local_dir} does not match its "
                                f"checksums ({report.problems[0]}); check the local disk and "
                                "run again")
        files.publish(partial, target)
        files.write_json_atomically(_stamp_path(local_dir, name), identity)
        log.info("staged %s to %s in %.1f s", source, target, time.monotonic() - started)
    return target


def _identity(source):
    """What says the source is unchanged: every file's name, size and mtime."""
    paths = [os.path.join(source, n) for n in sorted(os.listdir(source))] \
        if os.path.isdir(source) else [source]
    stats = [(os.path.basename(p), os.stat(p)) for p in paths]
    return {"source": source, "files": [[name, st.st_size, st.st_mtime_ns] for name, st in stats]}


def _stamp_path(local_dir, name):
    return os.path.join(local_dir, f".{name}{STAMP}")


def _stamp_of(local_dir, name):
    try:
        with open(_stamp_path(local_dir, name), encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _copy(source, target):
    """Copy to `target`.partial (a file, or a folder whose index is copied last)."""
    partial = target + ".partial"
    if os.path.lexists(partial):
        files.remove(partial)
    if not os.path.isdir(source):
        shutil.copyfile(source, partial)
        return partial
    os.makedirs(partial)
    names = sorted(os.listdir(source), key=lambda n: n == fmt.SHARD_INDEX)
    for name in names:
        shutil.copyfile(os.path.join(source, name), os.path.join(partial, name))
    return partial

"""Publish a database to object storage (`stage`'s reverse): a one-file database as one
object; a sharded one as the folder that streaming reads (fastlmdb.loading.streaming): its
shards, ``table.npy`` and ``logical.npy``, ``manifest.json`` (the split's info and each
shard's size and SHA-256), then ``index.json``, last. An index already there is deleted first,
so a reader sees the old database, no database, or the new one: never a mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np

from fastlmdb.core import catalog, remote
from fastlmdb.core import format as fmt
from fastlmdb.tools.verify import StrPath

log = logging.getLogger(__name__)


def upload(db: StrPath, url: str, *, storage_options: dict[str, Any] | None = None) -> str:
    """Copy the finished database `db` (a file or a sharded folder) to `url` (any fsspec URL);
    returns `url`."""
    db = os.fspath(db)
    if not remote.is_url(url):
        raise ValueError(f"url must be an fsspec URL such as s3://bucket/db/train.lmdb, "
                         f"got {url!r}")
    info, rows, logical = catalog.read_tables(db)  # a finished database, or a clear error
    started = time.monotonic()
    if os.path.isdir(db):
        total = _upload_shards(db, remote.RemoteFolder(url, storage_options), info, rows,
                               logical)
    else:
        parent, name = url.rstrip("/").rsplit("/", 1)
        remote.RemoteFolder(parent, storage_options).put(db, name)
        total = os.path.getsize(db)
    seconds = time.monotonic() - started
    log.info("uploaded %s to %s: %.1f MB in %.1f s", db, url, total / 1e6, seconds)
    return url


def _upload_shards(db: str, target: remote.RemoteFolder, info: dict[str, Any], rows: Any,
                   logical: Any) -> int:
    target.remove(fmt.SHARD_INDEX)
    entries, total = [], 0
    for name in [os.path.basename(p) for p in catalog.shard_paths(db)]:
        path = os.path.join(db, name)
        entries.append({"file": name, "size": os.path.getsize(path), "sha256": _sha256(path)})
        target.put(path, name)
        total += entries[-1]["size"]
    manifest = {"format": fmt.MANIFEST_FORMAT, "version": 1, "info": info, "files": entries}
    with tempfile.TemporaryDirectory() as tmp:
        for name, array in ((catalog.TABLE_FILE, rows), (catalog.LOGICAL_FILE, logical)):
            np.save(os.path.join(tmp, name), np.ascontiguousarray(array), allow_pickle=False)
        with open(os.path.join(tmp, fmt.MANIFEST), "w", encoding="utf-8") as file:
            json.dump(manifest, file, sort_keys=True)
        for name in (catalog.TABLE_FILE, catalog.LOGICAL_FILE, fmt.MANIFEST):
            target.put(os.path.join(tmp, name), name)
    for name in ("plan.json",):
        if os.path.exists(os.path.join(db, name)):
            target.put(os.path.join(db, name), name)
    target.put(os.path.join(db, fmt.SHARD_INDEX), fmt.SHARD_INDEX)  # last
    return total


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

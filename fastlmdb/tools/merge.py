"""`merge`: join the shards of a sharded database into one database file, in place or not."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Union, cast

import numpy as np

from fastlmdb.core import catalog, files, store
from fastlmdb.core import format as fmt
from fastlmdb.core.errors import DatabaseError

log = logging.getLogger(__name__)

MERGE_BATCH_BYTES = 64 << 20

StrPath = Union[str, "os.PathLike[str]"]


def merge(path: StrPath, output: StrPath | None = None,
          on_progress: Callable[[int, int], object] | None = None) -> str:
    """Join the shards of `path` into one database file at `output` (default: replace `path`
    itself). Returns the output path. An interrupted merge starts again."""
    path = os.fspath(path)
    output = os.fspath(output or path)
    if not catalog.is_sharded(path):
        raise DatabaseError(f"{path} is not a folder of shards (one file already?): "
                            "`fastlmdb merge` joins the shards that --shards made")
    index = catalog.read_index(path)
    info, rows = catalog.read_catalog(path)
    partial = fmt.partial_path(output)
    if os.path.lexists(partial):
        log.info("removing %s, left by an interrupted merge", partial)
        files.remove(partial)
    with files.exclusive(partial):
        writer = store.Writer(partial, map_size=max(files.size(path), 1 << 20))
        # Records keep their keys (the write order); the table stays in logical order.
        by_key = np.empty(len(rows), dtype=fmt.ROW)
        for name in cast("tuple[str, ...]", fmt.ROW.names):
            by_key[name] = rows[name][np.argsort(rows["key"])]
        _copy_records(catalog.reader(path), writer, by_key, on_progress)
        # The plan and info of the whole split, as a one-file conversion of it writes them.
        plan = {name: value for name, value in index["plan"].items() if name != "shards"}
        info = {name: value for name, value in info.items() if name != "shards"}
        meta = {fmt.PLAN_KEY: plan, fmt.INFO_KEY: info, fmt.TABLE_KEY: fmt.dump_table(rows),
                fmt.LOGICAL_KEY: fmt.dump_table(fmt.logical_of_keys(rows), "<u4")}
        names = catalog.read_paths(path)
        if names is not None:
            meta[fmt.PATHS_KEY] = fmt.join_paths(names)
        writer.commit(len(rows), [], by_key[:0], meta)
        writer.close()
        files.publish(partial, output)
    return output


def _copy_records(source: Any, writer: store.Writer, rows: np.ndarray[Any, Any],
                  on_progress: Callable[[int, int], object] | None) -> None:
    """Copy every record in transactions of about MERGE_BATCH_BYTES."""
    ends = np.cumsum(rows["nbytes"], dtype=np.int64)
    first = 0
    while first < len(rows):
        done = int(ends[first - 1]) if first else 0
        last = max(first + 1, int(np.searchsorted(ends, done + MERGE_BATCH_BYTES, "right")))
        writer.commit(first, source.read_range(first, last), rows[first:last], {})
        first = last
        if on_progress:
            on_progress(first, len(rows))
    source.close()

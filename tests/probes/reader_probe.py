"""Every reader of a database, run one after another in this process, for test_truncated.py:

    python -m probes.reader_probe readers DB WORK         # LMDBDataset, LMDBIterDataset, the CLI
    python -m probes.reader_probe workers DB GOOD CONTEXT  # DataLoader workers, see _workers

DB is a database path (a file or a folder of shards, DST/<split>.lmdb), WORK a scratch folder.
Prints one JSON line per reader as it finishes: {"reader", "error"} where error is the message
it failed with (None if it did not fail). A reader killed by a signal ends the output there,
and the test sees the signal as the exit status.
"""

import contextlib
import io
import json
import os
import shutil
import sys

from fastlmdb import cli
from fastlmdb.core.errors import FastLMDBError


def _report(reader, error):
    print(json.dumps({"reader": reader, "error": error}), flush=True)


def _dataset(cls, db):
    from fastlmdb.loading import dataset

    root, name = os.path.split(db)
    try:
        ds = getattr(dataset, cls)(root, name[:-len(".lmdb")], output="numpy")
        next(iter(ds))
    except FastLMDBError as exc:
        return str(exc)
    return None


def _cli(args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(args)
    return out.getvalue() if code else None


def readers(db, work):
    _report("LMDBDataset", _dataset("LMDBDataset", db))
    _report("LMDBIterDataset", _dataset("LMDBIterDataset", db))
    _report("info", _cli(["info", db]))
    _report("verify", _cli(["verify", db, "--procs", "1"]))
    _report("stage", _cli(["stage", db, os.path.join(work, "local"), "--procs", "1"]))
    if os.path.isdir(db):
        _report("merge", _cli(["merge", db, "--output", os.path.join(work, "merged.lmdb")]))


def _files(db):
    return sorted(os.path.join(db, n) for n in os.listdir(db)) if os.path.isdir(db) else [db]


def _put(source, target):
    """Copy `source` over `target` as a new file (a new inode): maps of the old one stay whole."""
    shutil.copyfile(source, target + ".new")
    os.replace(target + ".new", target)


def _put_all(source, db):
    for path in _files(source):
        _put(path, os.path.join(db, os.path.basename(path)) if os.path.isdir(db) else db)


def _workers(db, good, context):
    """A dataset made and read in full while DB is intact (GOOD's files copied over DB's), then
    DB's damaged files put back, as an interrupted copy over a database would: DataLoader
    workers open DB themselves, and must refuse it with a message."""
    import torch.utils.data

    from fastlmdb.loading import dataset
    from probes.lmdb_probes import checksum

    damaged = db + ".damaged"
    (shutil.copytree if os.path.isdir(db) else shutil.copyfile)(db, damaged)
    _put_all(good, db)
    root, name = os.path.split(db)
    ds = dataset.LMDBDataset(root, name[:-len(".lmdb")], checksum, output="numpy")
    ds[len(ds) - 1]  # this process has opened every file
    _put_all(damaged, db)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1,
                                         multiprocessing_context=context)
    try:
        for _ in loader:
            pass
    except FastLMDBError as exc:  # raised in the worker, raised again here by the DataLoader
        return str(exc)
    return None


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "readers":
        readers(*args)
    else:
        db, good, context = args
        _report(f"workers-{context}", _workers(db, good, context))

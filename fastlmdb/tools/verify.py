"""Check a database record by record: checksums, decodes, shapes, labels, and the source tree.

Work is spread over processes with joblib; each opens the database itself.
"""

import dataclasses
import os
import zlib

import joblib
import numpy as np

from fastlmdb.core import catalog, folder, jpeg
from fastlmdb.core.errors import FastLMDBError

CHUNK = 512


@dataclasses.dataclass(frozen=True)
class Report:
    path: str
    records: int
    problems: list  # one line each

    @property
    def ok(self):
        return not self.problems


def verify(path, *, source=None, procs=1, decode=True, on_progress=None):
    """Report on every record of `path`; `source` is the split's folder to compare against;
    decode=False checks sizes and checksums only (about disk speed)."""
    try:
        info, rows = catalog.read_catalog(path)
    except FastLMDBError as exc:
        return Report(os.fspath(path), 0, [str(exc)])
    problems = _check_catalog(info, rows)
    paths = _source_paths(source, info, rows, problems) if source else None
    chunks = [range(start, min(start + CHUNK, len(rows))) for start in range(0, len(rows), CHUNK)]
    reader = catalog.reader(path)  # picklable: each process begins its own transaction
    by_key = np.argsort(rows["key"], kind="stable")  # read in key order: sequential I/O
    work = (joblib.delayed(_check_records)(
        reader, info["imgtype"], decode, rows[by_key[c.start:c.stop]], c.start,
        by_key[c.start:c.stop].tolist(), paths and [paths[i] for i in by_key[c.start:c.stop]])
        for c in chunks)
    done = 0
    for found in joblib.Parallel(n_jobs=procs, return_as="generator")(work):
        problems += found
        done += CHUNK
        if on_progress:
            on_progress(min(done, len(rows)), len(rows))
    reader.close()
    return Report(os.fspath(path), len(rows), problems)


def _check_catalog(info, rows):
    problems = []
    classes = info["classes"]
    if info["class_to_idx"] != {name: i for i, name in enumerate(classes)}:
        problems.append("class_to_idx does not match the sorted class list")
    bad = np.flatnonzero((rows["label"] < 0) | (rows["label"] >= len(classes)))
    problems += [f"record {i}: label {rows['label'][i]} is not a class index" for i in bad[:20]]
    return problems


def _source_paths(source, info, rows, problems):
    """Source file of every record (None where it cannot be compared)."""
    scan = folder.scan(source)
    if scan.classes != info["classes"]:
        problems.append(f"classes differ from {source}: {len(scan.classes)} there, "
                        f"{len(info['classes'])} in the database")
        return None
    # A shard on its own holds a range of the split's files.
    files = info["shard"]["files"] if "shard" in info else len(scan)
    if len(rows) + len(info["skipped"]) != files:
        problems.append(f"{source} has {files} images for this database, which holds "
                        f"{len(rows)} (+{len(info['skipped'])} skipped)")
        return None
    labels_match = scan.labels[rows["source"]] == rows["label"]
    problems += [f"record {i}: label differs from {scan.paths[rows['source'][i]]}"
                 for i in np.flatnonzero(~labels_match)[:20]]
    return [scan.paths[s] for s in rows["source"].tolist()]


def _check_records(reader, imgtype, decode, rows, first_key, indices, paths):
    """Problems of the records with keys first_key.. (`rows`, at record `indices`)."""
    problems = []
    try:
        values = reader.scan(first_key, first_key + len(rows))
    except FastLMDBError as exc:
        return [str(exc)]
    for k, (row, value) in enumerate(zip(rows, values)):
        why = _check_value(imgtype, decode, row, value)
        if why is None and paths is not None and not row["transcoded"]:
            why = _compare_source(imgtype, value, paths[k])
        if why:
            problems.append(f"record {indices[k]}: {why}")
    return problems


def _check_value(imgtype, decode, row, value):
    if len(value) != row["nbytes"]:
        return f"{len(value)} bytes stored, {row['nbytes']} recorded"
    if zlib.crc32(value) != row["crc32"]:
        return "checksum mismatch: the stored bytes changed"
    shape = (int(row["height"]), int(row["width"]))
    if not decode:
        return None
    if imgtype == "numpy":
        return None if len(value) == shape[0] * shape[1] * 3 else "size does not match its shape"
    try:
        decoded = jpeg.decode_simplejpeg(value).shape[:2]
    except ValueError as exc:
        return f"does not decode ({exc})"
    return None if decoded == shape else f"decodes to {decoded}, {shape} recorded"


def _compare_source(imgtype, value, source_path):
    if imgtype != "jpeg":
        return None  # pixels were checked against their shape and checksum
    try:
        with open(source_path, "rb") as file:
            same = file.read() == bytes(value)
    except OSError as exc:
        return f"cannot read source {source_path} ({exc.strerror})"
    return None if same else f"bytes differ from source {source_path}"

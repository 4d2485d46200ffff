"""Check a database record by record: checksums, decodes, shapes, labels, and the source tree.

A JPEG record that decodes only leniently (libjpeg warns: extraneous bytes, a bad Huffman
code) is a warning, not a problem: the loaders decode it as PIL does. A problem is a record
that the loaders cannot decode, or that differs from what the table or the source says.
Work is spread over processes with joblib; each opens the database itself.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any, Callable, Union

import joblib  # type: ignore[import-untyped]
from joblib.externals.loky import get_reusable_executor  # type: ignore[import-untyped]
import numpy as np

from fastlmdb.sources import labels as label_files
from fastlmdb.sources import listing
from fastlmdb.core import catalog, jpeg
from fastlmdb.sources import archive, folder, parquet, patterns, refs
from fastlmdb.sources.refs import Ref
from fastlmdb.core.errors import ConversionError, FastLMDBError

CHUNK = 512

StrPath = Union[str, "os.PathLike[str]"]


@dataclasses.dataclass(frozen=True)
class Report:
    path: str
    records: int
    problems: list[str]  # one line each
    warnings: list[str] = dataclasses.field(default_factory=list)  # one line each; still ok

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: StrPath, *, source: StrPath | None = None, labels: StrPath | None = None,
           procs: int = 1, decode: bool = True,
           on_progress: Callable[[int, int], object] | None = None) -> Report:
    """Report on every record of `path`; `source` is the split's folder or archive to compare
    against (`labels`: the label file of a flat one); decode=False checks sizes and checksums
    only (about disk speed)."""
    try:
        info, rows = catalog.read_catalog(path)
    except FastLMDBError as exc:
        return Report(os.fspath(path), 0, [str(exc)])
    problems = _check_catalog(info, rows)
    paths = _source_paths(source, labels, info, rows, problems) if source else None
    chunks = [range(start, min(start + CHUNK, len(rows))) for start in range(0, len(rows), CHUNK)]
    reader = catalog.reader(path)  # picklable: each process begins its own transaction
    by_key = np.argsort(rows["key"], kind="stable")  # read in key order: sequential I/O
    work = (joblib.delayed(_check_records)(
        reader, info["imgtype"], decode, rows[by_key[c.start:c.stop]], c.start,
        by_key[c.start:c.stop].tolist(), paths and [paths[i] for i in by_key[c.start:c.stop]])
        for c in chunks)
    done, warnings = 0, []
    try:
        for found, warned in joblib.Parallel(n_jobs=procs, return_as="generator")(work):
            problems += found
            warnings += warned
            done += CHUNK
            if on_progress:
                on_progress(min(done, len(rows)), len(rows))
    finally:  # no worker processes left waiting once the check is over
        reader.close()
        if procs > 1:
            get_reusable_executor().shutdown(wait=True)
    return Report(os.fspath(path), len(rows), problems, warnings)


def _check_catalog(info: dict[str, Any], rows: np.ndarray[Any, Any]) -> list[str]:
    problems = []
    classes = info["classes"]
    if info["class_to_idx"] != {name: i for i, name in enumerate(classes)}:
        problems.append("class_to_idx does not match the sorted class list")
    # -1: no label, kept only from an unlabeled source (parquet rows with --unlabeled)
    bad = np.flatnonzero((rows["label"] < -1) | (rows["label"] >= len(classes)))
    problems += [f"record {i}: label {rows['label'][i]} is not a class index" for i in bad[:20]]
    return problems


def _source_paths(source: StrPath, labels: StrPath | None, info: dict[str, Any],
                  rows: np.ndarray[Any, Any], problems: list[str]) -> list[str] | None:
    """Source file of every record (None where it cannot be compared)."""
    inputs = _list_source(source, labels, info)
    if inputs.classes != info["classes"]:
        problems.append(f"classes differ from {source}: {len(inputs.classes)} there, "
                        f"{len(info['classes'])} in the database")
        return None
    # A shard on its own holds a range of the split's files.
    files = info["shard"]["files"] if "shard" in info else len(inputs)
    if len(rows) + len(info["skipped"]) != files:
        problems.append(f"{source} has {files} images for this database, which holds "
                        f"{len(rows)} (+{len(info['skipped'])} skipped)")
        return None
    labels_match = inputs.labels[rows["source"]] == rows["label"]
    problems += [f"record {i}: label differs from {inputs.paths[rows['source'][i]]}"
                 for i in np.flatnonzero(~labels_match)[:20]]
    return [inputs.paths[s] for s in rows["source"].tolist()]


def _list_source(source: StrPath, labels: StrPath | None, info: dict[str, Any]) -> Any:
    """The source's Listing; an archive's or a flat folder's with the database's classes."""
    labels = label_files.read(labels) if labels else None
    if not _shards(source):
        if labels is not None:  # files left out by the conversion are not in the database
            return listing.list_flat_folder(source, labels, info["classes"], on_error="skip")
        return folder.list_tree(source)
    compressed = [f for f in patterns.expand(source)
                  if not parquet.is_parquet(f) and archive.compression(f)]
    if compressed:
        raise ConversionError(f"--source {compressed[0]} is a compressed tar, which can only "
                              "be read in order: decompress it (gunzip -k, bunzip2 -k or "
                              "unxz -k) and pass the .tar, or pass the folder it extracts to")
    # unlabeled: rows without a label are compared too (the database has them only if the
    # conversion kept them)
    return listing.list_shards(source, info["split"], labels=labels, classes=info["classes"],
                               on_error="skip", unlabeled=_parquet(source))


def _shards(source: StrPath) -> bool:
    """Whether `source` names archives or shards (a file, a pattern, a folder of shards), not
    a tree or flat folder of images."""
    source = os.fspath(source)
    if os.path.isfile(source) or (patterns.is_pattern(source) and not os.path.isdir(source)):
        return True
    return os.path.isdir(source) and any(
        entry.is_file() and entry.name.lower().endswith(patterns.SHARD_SUFFIXES)
        for entry in os.scandir(source))


def _parquet(source: StrPath) -> bool:
    return bool(parquet.is_parquet(patterns.expand(source)[0]))


def _check_records(reader: Any, imgtype: str, decode: bool, rows: np.ndarray[Any, Any],
                   first_key: int, indices: list[int],
                   paths: list[str] | None) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the records with keys first_key.. (`rows`, at record
    `indices`)."""
    problems, warnings = [], []
    try:
        values = reader.read_range(first_key, first_key + len(rows))
    except FastLMDBError as exc:
        return [str(exc)], []
    for k, (row, value) in enumerate(zip(rows, values)):
        why, warning = _check_value(imgtype, decode, row, value)
        if why is None and paths is not None and not row["transcoded"]:
            why = _compare_source(imgtype, value, paths[k])
        if why:
            problems.append(f"record {indices[k]}: {why}")
        if warning:
            warnings.append(f"record {indices[k]}: {warning}")
    return problems, warnings


def _check_value(imgtype: str, decode: bool, row: Any,
                 value: bytes | memoryview) -> tuple[str | None, str | None]:
    """(problem or None, warning or None) of one record."""
    if len(value) != row["nbytes"]:
        return f"{len(value)} bytes stored, {row['nbytes']} recorded", None
    if zlib.crc32(value) != row["crc32"]:
        return "checksum mismatch: the stored bytes changed", None
    shape = (int(row["height"]), int(row["width"]))
    if not decode:
        return None, None
    if imgtype == "numpy":
        size_ok = len(value) == shape[0] * shape[1] * 3
        return (None if size_ok else "size does not match its shape"), None
    try:
        decoded, warning = _decode_jpeg(value)
    except ValueError as exc:
        return f"does not decode ({exc})", None
    return (None if decoded == shape else f"decodes to {decoded}, {shape} recorded"), warning


def _decode_jpeg(value: bytes | memoryview) -> tuple[tuple[int, ...], str | None]:
    """(decoded shape, None) of a JPEG that decodes strictly, (shape, warning) of one that the
    loaders decode only leniently; ValueError if they cannot decode it."""
    try:
        return jpeg.decode_strict(value).shape[:2], None
    except ValueError as exc:
        strict = exc
    decoded = jpeg.decode_libjpeg(value).shape[:2]  # what every loader falls back to
    return decoded, (f"strict decoding fails ({strict}); the loaders decode it leniently, "
                     "as PIL does")


def _compare_source(imgtype: str, value: bytes | memoryview, source_path: str) -> str | None:
    if imgtype != "jpeg":
        return None  # pixels were checked against their shape and checksum
    if isinstance(source_path, Ref):
        where = refs.describe(source_path)
        try:
            return None if source_path.read() == bytes(value) else f"bytes differ from {where}"
        except FastLMDBError as exc:
            return f"cannot read {where} ({exc})"
    try:
        with open(source_path, "rb") as file:
            same = file.read() == bytes(value)
    except OSError as exc:
        return f"cannot read source {source_path} ({exc.strerror})"
    return None if same else f"bytes differ from source {source_path}"

"""Convert an ImageFolder split into one LMDB file, or into K shard files and an index.

The database is written as ``<split>.lmdb.partial`` (a file, or a folder of shards) under an
exclusive lock and renamed when complete; running the same command again after any
interruption resumes after the last committed transaction (of each shard). How one database
is made: pipeline.py (local processes) or shards.py (one task per shard, here or on a cluster).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from fastlmdb.converter import pipeline, prepare, shards
from fastlmdb.core import catalog, files, sizes
from fastlmdb.sources import archive
from fastlmdb.sources import dataset as dataset_source
from fastlmdb.sources import listing, patterns
from fastlmdb.sources.refs import source_size
from fastlmdb.core import format as fmt
from fastlmdb.core.errors import ON_ERROR, ConversionError

log = logging.getLogger(__name__)

def default_procs() -> int:
    """The CPUs this process may use; all of the machine's where the OS cannot say (macOS,
    Windows have no os.sched_getaffinity)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class Options:
    from_dir: str | None  # None: from_archive (or convert_dataset's dataset)
    to_dir: str
    split: str
    save_as: str = "jpeg"
    procs: int = dataclasses.field(default_factory=default_procs)
    on_error: str = "raise"
    overwrite: bool = False
    max_pixels: int = prepare.DEFAULT_MAX_PIXELS
    max_size: int = 0  # re-encode images whose longer side is larger; 0: keep all as they are
    quality: int = 90  # JPEG quality of those re-encoded images
    check_decode: bool = False  # jpeg mode: decode every JPEG, so damaged scan data is found
    # The records' physical order: "shuffled" (seeded, so sequential reads give mixed
    # batches) or "source" (ImageFolder's). Indices stay ImageFolder's either way.
    order: str = "shuffled"
    order_seed: int = 0
    batch_bytes: int = 64 << 20
    map_size: int = 16 << 30  # virtual reservation only; grows by doubling when full
    shards: int = 1  # 1: one file; K: K shard files in a folder, one writer each
    # if set, as many shards as give about this many images each (an int), or this many
    # bytes of source images each (a string with a unit, "512MB")
    shard_size: int | str = 0
    backend: str = "local"  # how shards are run: see shards.BACKENDS
    scheduler: str | None = None  # the dask scheduler's address (backend "dask"); None: local
    # instead of from_dir: a tar or zip holding the split, or parquet or WebDataset shards
    # (a file, a folder, a glob or brace pattern)
    from_archive: str | None = None
    labels: str | None = None  # the classes of a flat split's files (see sources/labels.py)
    classes_from: str | None = None  # a database, tree or .txt whose class list this split uses
    image_column: str | None = None  # parquet: the image column (None: found by its type)
    label_column: str | None = None  # parquet: the integer label column (None: found)
    unlabeled: bool = False  # parquet: keep rows with label -1 (no label) as they are


@dataclasses.dataclass(frozen=True)
class Stats:
    path: str
    images: int
    skipped: list[Any]
    transcoded: list[Any]
    bytes_in: int
    bytes_out: int
    seconds: float
    resumed_at: int  # source files already done when this run started
    # [index, path, why] of records kept although they decode only leniently or through the
    # loaders' fallback decoder (prepare.Record.warning)
    warnings: list[Any] = dataclasses.field(default_factory=list)


def convert(options: Options,
            on_progress: Callable[[int, int, int], object] | None = None) -> Stats:
    """Convert one split; returns Stats. `on_progress(done, total, bytes_in)` is optional."""
    _validate_source(options)
    _validate(options)
    inputs = listing.list_split(options.split, from_dir=options.from_dir,
                                from_archive=options.from_archive, labels=options.labels,
                                classes_from=options.classes_from, on_error=options.on_error,
                                columns=(options.image_column, options.label_column),
                                unlabeled=options.unlabeled)
    return convert_listing(options, inputs, on_progress)


def convert_dataset(dataset: Any, to_dir: str, split: str, *, classes: Sequence[str] | None = None,
                    unlabeled: bool = False,
                    on_progress: Callable[[int, int, int], object] | None = None,
                    **options: Any) -> Stats:
    """Convert a map-style Python dataset whose items are (image, label) into
    `to_dir`/<split>.lmdb (sources/dataset.py says which images and items); `classes`: the
    class names (default: the dataset's `classes`); `unlabeled`: keep label -1; `options`:
    Options' fields (procs, save_as, on_error, max_size, order, shards, overwrite, ...)."""
    for name in ("from_dir", "from_archive", "labels", "classes_from", "image_column",
                 "label_column", "unlabeled"):
        if name in options:
            raise ValueError(f"{name} is for convert()'s files, not for convert_dataset")
    settings = Options(None, os.fspath(to_dir), split, **options)
    _validate(settings)
    inputs = dataset_source.list_dataset(dataset, classes=classes, unlabeled=unlabeled)
    log.info("converting a Python dataset (%s, %d items) read by %d producer processes",
             type(dataset).__name__, len(inputs), settings.procs)
    return convert_listing(settings, inputs, on_progress)


def convert_listing(options: Options, inputs: Any,
                    on_progress: Callable[[int, int, int], object] | None = None) -> Stats:
    """Convert the Listing `inputs` (sources/) with `options` (its source fields unused)."""
    if _shard_size_given(options.shard_size):
        options = dataclasses.replace(options, shards=shard_count(options.shard_size, inputs))
        if sizes.has_unit(options.shard_size) and (options.save_as != "jpeg" or options.max_size):
            log.warning("--shard-size %s counts the source's bytes; with --save-as %s%s the "
                        "records differ in size from the source, and so will the shards",
                        options.shard_size, options.save_as,
                        f" --max-size {options.max_size}" if options.max_size else "")
    if archive.in_order_only(inputs.paths):
        options = _in_archive_order(options)
    elif pipeline.task_bounds(inputs.paths[:1]) is not None and options.order == "shuffled":
        log.info("the source is read a row group at a time: records are written row group by "
                 "row group, row groups in a seeded shuffled order, rows shuffled within each "
                 "(--order %s)", fmt.GROUPS_ORDER)
        options = dataclasses.replace(options, order=fmt.GROUPS_ORDER)
    final = fmt.db_path(options.to_dir, options.split)
    if os.path.exists(final) and not options.overwrite:
        raise ConversionError(f"{final} already exists; pass --overwrite to replace it "
                              "(the old one stays until the new one is complete)")
    os.makedirs(options.to_dir, exist_ok=True)
    partial = fmt.partial_path(final)
    plan = pipeline.plan_of(options, inputs)
    inputs, positions = pipeline.in_write_order(inputs, options)
    started = time.monotonic()
    _check_layout(partial, options)
    if options.shards > 1:
        os.makedirs(partial, exist_ok=True)
    with files.exclusive(partial):
        if options.shards == 1:
            results = [pipeline.run(options, inputs, partial, plan, settings_of(options),
                                    on_progress, positions)]
        else:
            results = shards.convert_shards(options, inputs, positions, partial,
                                     {**plan, "shards": options.shards}, settings_of(options),
                                     on_progress)
        files.publish(partial, final)
    return _stats(final, results, time.monotonic() - started)


def _in_archive_order(options: Options) -> Options:
    """The options for a compressed tar: one pass, records in the stream's order."""
    if options.shards > 1:
        raise ConversionError(f"{options.from_archive} is compressed, so it is read in one pass "
                              "from its start: --shards would read it once per shard. Convert "
                              "it without --shards, or decompress it first (gunzip -k, "
                              "bunzip2 -k or unxz -k) and pass the .tar")
    log.warning("%s is compressed: the records are written in its members' order (--order "
                "%s cannot be kept in one pass over the stream); indices are ImageFolder's. "
                "For sequential reads of well-mixed batches (LMDBIterDataset), decompress it "
                "and convert the .tar", options.from_archive, options.order)
    return dataclasses.replace(options, order=fmt.ARCHIVE_ORDER)


def _check_layout(partial: str, options: Options) -> None:
    """A partial database of the other layout (one file vs shards) is refused, or removed
    with --overwrite."""
    if not os.path.exists(partial) or os.path.isdir(partial) == (options.shards > 1):
        return
    if not options.overwrite:
        was = "as one file (--shards 1)" if os.path.isfile(partial) else "as shards"
        raise ConversionError(f"{partial} was started {was}, this run asks for --shards "
                              f"{options.shards}: rerun with the same arguments to resume, or "
                              "pass --overwrite to start again")
    files.remove(partial)


def _stats(final: str, results: Sequence[Any], seconds: float) -> Stats:
    # Shards' record indices become the split's through the split's table.
    info = results[0][0] if len(results) == 1 else catalog.read_catalog(final)[0]
    if info["warnings"]:  # one line: the list is in Stats and info (thousands, on web data)
        index, path, why = info["warnings"][0]
        log.warning("%d records kept with warnings (Stats.warnings, `fastlmdb info --json`), "
                    "the first: %s (record %d): %s", len(info["warnings"]), path, index, why)
    return Stats(final, info["count"], info["skipped"], info["transcoded"], info["bytes_in"],
                 files.size(final), seconds, sum(resumed for _, resumed in results),
                 info["warnings"])


def _validate_source(o: Options) -> None:
    if (o.from_dir is None) == (o.from_archive is None):
        raise ValueError("give --from_dir SRC or --from-archive FILE (one of them), got "
                         f"{'both' if o.from_dir else 'neither'}")
    for flag, path in (("--from-archive", o.from_archive), ("--labels", o.labels),
                       ("--classes-from", o.classes_from)):
        if path is not None and not os.path.exists(path) and not (
                flag == "--from-archive" and patterns.is_pattern(path)):
            raise ValueError(f"{flag} {path} does not exist")


def _validate(o: Options) -> None:
    if o.save_as not in fmt.IMGTYPES:
        raise ValueError(f"--save-as must be one of {', '.join(fmt.IMGTYPES)}, got {o.save_as!r}")
    if not isinstance(o.procs, int) or o.procs < 1:
        raise ValueError(f"--procs must be a whole number >= 1, got {o.procs!r}")
    if o.on_error not in ON_ERROR:
        raise ValueError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {o.on_error!r}")
    if not o.split or os.sep in o.split or o.split in (".", ".."):
        raise ValueError(f"--split must be a folder name such as train or val, got {o.split!r}")
    if o.max_pixels < 1:
        raise ValueError(f"--max-pixels must be >= 1, got {o.max_pixels}")
    if o.max_size < 0:
        raise ValueError(f"--max-size must be >= 0 (0 keeps every size), got {o.max_size}")
    if not 1 <= o.quality <= 100:
        raise ValueError(f"--quality must be between 1 and 100, got {o.quality}")
    if o.order not in fmt.ORDERS:
        raise ValueError(f"--order must be one of {', '.join(fmt.ORDERS)}, got {o.order!r}")
    if not isinstance(o.order_seed, int) or o.order_seed < 0:
        raise ValueError(f"--order-seed must be a whole number >= 0, got {o.order_seed!r}")
    if not isinstance(o.shards, int) or o.shards < 1:
        raise ValueError(f"--shards must be a whole number >= 1, got {o.shards!r}")
    if sizes.has_unit(o.shard_size):
        sizes.parse_size(o.shard_size, "--shard-size")
    elif isinstance(o.shard_size, bool) or not str(o.shard_size).isdigit():
        raise ValueError(f"--shard-size must be a number of images per shard (e.g. 4500) or of "
                         f"bytes with a unit (e.g. 512MB), got {o.shard_size!r}")
    if _shard_size_given(o.shard_size) and o.shards != 1:
        raise ValueError("give --shards K or --shard-size N (images or bytes per shard), "
                         "not both")
    if o.backend not in shards.BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(shards.BACKENDS)}, "
                         f"got {o.backend!r}")
    if o.backend != "local" and o.shards == 1 and not _shard_size_given(o.shard_size):
        raise ValueError(f"--backend {o.backend} runs shards as tasks: pass --shards K "
                         "(K > 1, e.g. a few per worker)")


def _shard_size_given(shard_size: int | str) -> bool:
    """Whether a (validated) --shard-size asks for shards: 0 or "0" is the default, none."""
    return sizes.has_unit(shard_size) or int(shard_size) > 0


def shard_count(shard_size: int | str, inputs: Any, sample: int = 2000) -> int:
    """The shards that give about `shard_size` per shard: images (a number) or bytes of the
    source's images ("512MB"), the latter from the sizes of `sample` evenly spread inputs."""
    if not sizes.has_unit(shard_size):
        return max(1, -(-len(inputs) // int(shard_size)))
    target = sizes.parse_size(shard_size, "--shard-size")
    picked = np.unique(np.linspace(0, len(inputs) - 1, min(sample, len(inputs))).astype(int))
    mean = sum(source_size(inputs.paths[i]) for i in picked) / max(1, len(picked))
    if mean == 0:
        raise ConversionError(f"--shard-size {shard_size}: this source does not tell its "
                              "images' sizes (a Python dataset); give a number of images per "
                              "shard instead, e.g. --shard-size 4500")
    count = max(1, int(round(len(inputs) * mean / target)))
    log.info("--shard-size %s: %d images of about %.0f KB (%d sampled) -> %d shards of about "
             "%d images", shard_size, len(inputs), mean / 1e3, len(picked), count,
             -(-len(inputs) // count))
    return count


def settings_of(options: Options) -> prepare.Settings:
    return prepare.Settings(options.save_as, options.max_pixels, options.max_size,
                            options.quality, options.check_decode)

"""The `fastlmdb` command. The only place that prints and draws progress bars."""

import argparse
import datetime
import json
import logging
import sys

from fastlmdb import converter
from fastlmdb.version import __version__
from fastlmdb.cli import terminal
from fastlmdb.converter import prepare, shards
from fastlmdb.core import catalog, errors, files, sizes
from fastlmdb.core.errors import FastLMDBError


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # file names need not be valid UTF-8
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        return args.run(args)
    except (FastLMDBError, ValueError, OSError) as exc:
        print(f"fastlmdb {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nfastlmdb {args.command}: interrupted. Committed work is kept: run the same "
              "command again to resume.", file=sys.stderr)
        return 130


def _parser():
    parser = argparse.ArgumentParser(
        prog="fastlmdb", description="ImageFolder trees into one LMDB file per split, "
                                     "for fast PyTorch loading.")
    parser.add_argument("--version", action="version", version=f"fastlmdb {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_convert(commands)
    _add_verify(commands)
    _add_stage(commands)
    _add_upload(commands)
    info_command = commands.add_parser("info", help="describe a database")
    info_command.add_argument("db", help="a DST/<split>.lmdb file")
    info_command.add_argument("--json", action="store_true", help="print the metadata as JSON")
    info_command.set_defaults(run=_info)
    merge_command = commands.add_parser(
        "merge", help="join the shards of a database into one file",
        description="Join DST/<split>.lmdb's shards into one database file with the same "
                    "records, in place by default.")
    merge_command.add_argument("db", help="a sharded DST/<split>.lmdb folder")
    merge_command.add_argument("--output", metavar="FILE",
                               help="write the one file here and keep the shards (default: "
                                    "replace the folder by the file, once it is complete)")
    merge_command.set_defaults(run=_merge)
    from fastlmdb.cli import demo

    demo.add_command(commands)
    for command in commands.choices.values():
        command.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return parser


def _shard_size(text):
    """Images per shard ("4500") or bytes with a unit ("512MB", kept as written)."""
    if not sizes.has_unit(text):
        return _positive(text)
    try:
        sizes.parse_size(text, "--shard-size")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_convert(commands):
    p = commands.add_parser(
        "convert", help="convert ImageFolder splits into LMDB files",
        description="Convert SRC/<split>/<class>/<image> into DST/<split>.lmdb.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from_dir", "--from-dir", metavar="SRC",
                        help="folder holding <split>/<class>/<image> (or a flat <split>/ "
                             "with --labels)")
    source.add_argument("--from-archive", "--from_archive", metavar="FILE_OR_PATTERN",
                        help="a tar or zip holding one split as downloaded: a tar of "
                             "per-class tars (ILSVRC2012_img_train.tar), a tree "
                             "[prefix/][<split>/]<class>/<image> (Kaggle's zip), or flat "
                             "files with --labels; nothing is extracted. A .tar.gz/.bz2/.xz "
                             "is read twice in order (list, convert), records in its order. "
                             "Or shards as the Hugging Face hub ships them: parquet files or "
                             "WebDataset tars, named by a file, a folder, or a quoted glob or "
                             "brace pattern ('data/train-*.parquet', "
                             "'imagenet1k-train-{0000..1023}.tar')")
    p.add_argument("--labels", metavar="FILE",
                   help="classes of a flat split's files: LOC_val_solution.csv, a text file "
                        "of FILENAME CLASS lines, or ILSVRC2012_devkit_t12.tar.gz")
    p.add_argument("--classes-from", "--classes_from", metavar="DB_OR_DIR",
                   help="take the class list from this database or tree (e.g. train's), so "
                        "class indices match it even where this split lacks a class, or "
                        "from a .txt file of one name per line (shards without class names)")
    p.add_argument("--image-column", "--image_column", metavar="NAME",
                   help="parquet: the image column (default: the struct<bytes, path> or "
                        "binary column)")
    p.add_argument("--label-column", "--label_column", metavar="NAME",
                   help="parquet: the integer label column (default: 'label', else the only "
                        "integer column)")
    p.add_argument("--unlabeled", action="store_true",
                   help="parquet: store rows whose label is -1 (the hub's test split) with "
                        "label -1 instead of refusing them")
    p.add_argument("--to_dir", "--to-dir", required=True, metavar="DST",
                   help="where <split>.lmdb is written")
    p.add_argument("--split", required=True, nargs="+", help="split folder name(s): train val")
    p.add_argument("--save-as", "--save_as", default="jpeg", choices=("jpeg", "numpy"),
                   help="store original JPEG bytes (default) or decoded uint8 arrays")
    p.add_argument("--procs", type=_positive, default=converter.default_procs(),
                   help="producer processes (default: the CPUs this process may use)")
    p.add_argument("--on-error", "--on_error", default="raise", choices=errors.ON_ERROR,
                   help="a file that is not a readable image stops the run (raise, default) "
                        "or is left out and listed (skip)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing database (kept until the new one is complete)")
    p.add_argument("--max-pixels", "--max_pixels", type=_positive,
                   default=prepare.DEFAULT_MAX_PIXELS,
                   help="refuse images with more pixels (decompression bombs); "
                        "default %(default)s")
    p.add_argument("--max-size", "--max_size", type=int, default=0, metavar="N",
                   help="re-encode images whose longer side exceeds N pixels, resized to N; "
                        "smaller ones keep their bytes (default 0: keep every image)")
    p.add_argument("--quality", type=int, default=90,
                   help="JPEG quality of images re-encoded by --max-size (default 90)")
    p.add_argument("--shards", type=_positive, default=1, metavar="K",
                   help="write each split as K shard files in the folder DST/<split>.lmdb, "
                        "one writer each (default 1: one file)")
    p.add_argument("--shard-size", "--shard_size", type=_shard_size, default=0, metavar="N",
                   help="instead of --shards: as many shards as give about N images each, "
                        "or N bytes of source images each when N has a unit (512MB, 1GB); "
                        "for streaming (docs/streaming.md) 256MB-1GB")
    p.add_argument("--backend", default="local", choices=shards.BACKENDS,
                   help="where shards are made: local (one after another, each with --procs "
                        "processes; default), loky (shards side by side in local processes), "
                        "dask (one task per shard on a dask.distributed cluster)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="the dask scheduler, e.g. tcp://10.0.0.1:8786 (--backend dask; "
                        "default: a local cluster of --procs workers)")
    p.add_argument("--order", default="shuffled", choices=("shuffled", "source"),
                   help="the records' physical order: shuffled (default: seeded, so "
                        "LMDBIterDataset's sequential reads give well-mixed batches) or source "
                        "(ImageFolder's, class by class); indices are ImageFolder's either way")
    p.add_argument("--order-seed", "--order_seed", type=int, default=0, metavar="N",
                   help="seed of the shuffled order (default 0)")
    p.add_argument("--check-decode", "--check_decode", action="store_true",
                   help="jpeg mode: decode every JPEG while converting, to report files with "
                        "damaged scan data (slower; numpy mode always decodes)")
    p.set_defaults(run=_convert)


def _add_verify(commands):
    p = commands.add_parser("verify", help="check every record of a database",
                            description="Read every record, check its checksum, that it "
                                        "decodes to its recorded shape, and its label; with "
                                        "--source, compare with the source tree.")
    p.add_argument("db", help="a DST/<split>.lmdb file")
    p.add_argument("--source", metavar="SRC/SPLIT",
                   help="the split folder, archive or shards it was made from, e.g. "
                        "/data/imagenet/train, ILSVRC2012_img_train.tar or "
                        "'data/validation-*.parquet'")
    p.add_argument("--labels", metavar="FILE",
                   help="with a flat --source: the label file it was converted with")
    p.add_argument("--procs", type=_positive, default=converter.default_procs(),
                   help="processes (default: the CPUs this process may use)")
    p.add_argument("--no-decode", "--no_decode", dest="decode", action="store_false",
                   help="check sizes and checksums only, not that every image decodes")
    p.set_defaults(run=_verify)


def _add_stage(commands):
    p = commands.add_parser("stage", help="copy a database to node-local disk, checked, once",
                            description="Copy DB (a file or a sharded folder) into LOCAL_DIR "
                                        "unless an up-to-date copy is there, check every "
                                        "record's checksum, and print the local path. Ranks "
                                        "of one node may run it together: one copies.")
    p.add_argument("db", help="a DST/<split>.lmdb file or folder, e.g. on NFS, or its URL: "
                              "s3://bucket/prefix/train.lmdb, gs://..., https://... (pip "
                              "install 'fastlmdb[remote]'; S3 not on AWS, e.g. MinIO: set "
                              "AWS_ENDPOINT_URL)")
    p.add_argument("local_dir", help="a folder on node-local disk")
    p.add_argument("--procs", type=_positive, default=converter.default_procs(),
                   help="processes checking the copy (default: the CPUs this process may use)")
    p.add_argument("--storage-options", "--storage_options", type=_json_object, default=None,
                   metavar="JSON", help="for a URL: fsspec options as a JSON object, e.g. "
                                        "'{\"anon\": true}' or '{\"client_kwargs\": "
                                        "{\"endpoint_url\": \"http://minio:9000\"}}'")
    p.set_defaults(run=_stage)


def _add_upload(commands):
    p = commands.add_parser("upload", help="publish a database to object storage",
                            description="Copy DB (a file or a sharded folder) to URL, the "
                                        "index last, so readers never see a partial database. "
                                        "A sharded database is then ready to stream "
                                        "(LMDBIterDataset(URL's folder, split, cache_dir=..., "
                                        "cache_limit=...)).")
    p.add_argument("db", help="a DST/<split>.lmdb file or folder")
    p.add_argument("url", help="where it goes, e.g. s3://bucket/prefix/train.lmdb (S3 not on "
                               "AWS, e.g. MinIO: set AWS_ENDPOINT_URL)")
    p.add_argument("--storage-options", "--storage_options", type=_json_object, default=None,
                   metavar="JSON", help="fsspec options as a JSON object, as for stage")
    p.set_defaults(run=_upload)


def _json_object(text):
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _convert(args):
    for split in args.split:
        options = converter.Options(
            from_dir=args.from_dir, from_archive=args.from_archive, labels=args.labels,
            classes_from=args.classes_from, to_dir=args.to_dir, split=split,
            image_column=args.image_column, label_column=args.label_column,
            unlabeled=args.unlabeled,
            save_as=args.save_as,
            procs=args.procs, on_error=args.on_error, overwrite=args.overwrite,
            max_pixels=args.max_pixels, max_size=args.max_size, quality=args.quality,
            check_decode=args.check_decode, order=args.order, order_seed=args.order_seed,
            shards=args.shards, shard_size=args.shard_size,
            backend=args.backend, scheduler=args.scheduler)
        with terminal.ProgressBar(split) as bar:
            stats = converter.convert(options, on_progress=bar.update)
        terminal.print_summary(stats)
    return 0


def _verify(args):
    from fastlmdb.tools import verify

    with terminal.ProgressBar("verify") as bar:
        report = verify.verify(args.db, source=args.source, labels=args.labels,
                               procs=args.procs,
                               decode=args.decode, on_progress=bar.update)
    for problem in report.problems:
        print(f"  {problem}")
    for warning in report.warnings:
        print(f"  warning: {warning}")
    verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    if report.warnings:
        verdict += f", {len(report.warnings)} warning(s)"
    print(f"{report.path}: {report.records} records checked: {verdict}")
    return 0 if report.ok else 1


def _merge(args):
    from fastlmdb.tools import merge

    with terminal.ProgressBar("merge") as bar:
        output = merge.merge(args.db, args.output, on_progress=bar.update)
    info, _ = catalog.read_catalog(output)
    print(f"{output}: {info['count']} records in one file, {files.size(output) / 1e6:.1f} MB")
    return 0


def _stage(args):
    from fastlmdb.tools import stage

    print(stage.stage(args.db, args.local_dir, procs=args.procs,
                      storage_options=args.storage_options))
    return 0


def _upload(args):
    from fastlmdb.tools import upload

    print(upload.upload(args.db, args.url, storage_options=args.storage_options))
    return 0


def _info(args):
    info, rows = catalog.read_catalog(args.db)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    when = datetime.datetime.fromtimestamp(info["finished"]).isoformat(timespec="seconds")
    print(f"{args.db}: fastlmdb format {info['version']}, made by {info['made_by']} on {when}")
    print(f"  split {info['split']} from {info['source']}")
    order = info.get("order", "source")
    print(f"  stored in {order} order"
          + (f" (seed {info['order_seed']})" if order in ("shuffled", "row-groups") else ""))
    print(f"  {info['count']} {info['imgtype']} images in {len(info['classes'])} classes, "
          f"{files.size(args.db) / 1e6:.1f} MB"
          + (f" in {info['shards']} shards" if "shards" in info else ""))
    if len(rows):
        print(f"  height {rows['height'].min()}-{rows['height'].max()}, "
              f"width {rows['width'].min()}-{rows['width'].max()}, "
              f"mean record {rows['nbytes'].mean() / 1e3:.1f} KB")
    print(f"  {len(info['transcoded'])} changed at conversion, {len(info['skipped'])} skipped, "
          f"{len(info.get('warnings', []))} kept with warnings, "
          f"{info['resized']} resized to --max-size {info['max_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

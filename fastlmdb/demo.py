"""`fastlmdb demo`: make a sample tree, convert it, and time loading it against ImageFolder."""

import os
import tempfile


def add_command(commands):
    p = commands.add_parser("demo", help="end to end on a generated sample tree")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--classes", type=int, default=10)
    p.set_defaults(run=run)


def run(args):
    from fastlmdb import cli, convert, sample

    work = args.dir or tempfile.mkdtemp(prefix="fastlmdb-demo-")
    src, dst = os.path.join(work, "imagenet"), os.path.join(work, "lmdb")
    sample.make_tree(src, classes=args.classes)
    print(f"sample tree: {src}")
    for split in ("train", "val"):
        stats = convert.convert(convert.Options(src, dst, split, overwrite=True))
        cli._print_summary(stats)
    return 0

"""Converting what users download (parquet, WebDataset shards) and Python datasets, against
converting the extracted tree of the same images, per CPU-second of the process tree.

Rows: the tree (baseline); the same images as parquet files in the Hugging Face layout
(struct<bytes, path> + int64 label, row groups of 100 rows as `datasets` writes image data),
as uncompressed WebDataset shards and as .tar.gz ones (read in one pass); and
`fastlmdb.convert_dataset` over a dataset yielding (path, label), (bytes, label), PIL images
opened from their files (their bytes are kept), and PIL images decoded from bytes (no file:
encoded once at quality 95, 4:4:4). Everything runs in this process (the converter's spawned
producers and writer are reaped children: their CPU time counts).

    .venv/bin/python bench/sources.py            # 1,000 samples x2 = 2,000 images, 3 repeats
    .venv/bin/python bench/sources.py --quick    # seconds
"""

import io
import os
import sys

import harness

from fastlmdb.core import catalog
from fastlmdb.sources import folder

TREE = "tree (already extracted)"
ROWS_PER_GROUP = 100  # datasets' row group size for image data
SHARDS = 4


class Items:
    """Item i: file i of a tree split in ImageFolder's order, as `kind`, with its label."""

    def __init__(self, split_dir, kind):
        self.listing, self.kind = folder.list_tree(split_dir), kind
        self.classes = self.listing.classes

    def __len__(self):
        return len(self.listing)

    def __getitem__(self, i):
        path, label = self.listing.paths[i], int(self.listing.labels[i])
        if self.kind == "path":
            return path, label
        from PIL import Image

        if self.kind == "pil-file":
            return Image.open(path), label
        with open(path, "rb") as file:
            data = file.read()
        return (data if self.kind == "bytes" else Image.open(io.BytesIO(data))), label


def main(argv=None):
    p = harness.parser(__doc__.split("\n")[0], repeats=3)
    harness.add_tree_args(p, replicate=2)
    args = harness.parse(p, argv, quick_limit=48)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import shard_writers  # the test suite's writers of parquet and WebDataset shards

    with harness.work_dir(args) as work:
        out = os.path.join(work, "out")
        files = harness.tree_from_args(args, os.path.join(work, "src"))
        ways, packed = _ways(shard_writers, os.path.join(work, "src"), out)
        candidates = [harness.Candidate(label, run, files=(*files, *packed), cache="warm",
                                        setup=_fresh(out)) for label, run in ways.items()]
        fixed = _fixed_costs(shard_writers, work, out, args)
        results = harness.measure(candidates, repeats=args.repeats, warmup=args.warmup)
        info = [*harness.machine_info(work),
                f"input: {len(files)} files, {harness.total_bytes(files) / 1e6:.0f} MB; "
                f"{SHARDS} parquet files (row groups of {ROWS_PER_GROUP}), {SHARDS} .tar and "
                f"{SHARDS} .tar.gz WebDataset shards of the same images; --save-as jpeg "
                "--procs 2"]
    net = _net(fixed)
    base = net(next(r for r in results if r.candidate.label == TREE))
    columns = [harness.Column("img/CPU-s net of start-up",
                              lambda r: "-" if net(r) is None else f"{net(r):,.0f}"),
               harness.Column("net vs baseline", lambda r: "-" if None in (net(r), base)
                              else f"{net(r) / base:.2f}x")]
    harness.report(harness.result_name(args, "convert-sources"), results, baseline=TREE,
                   title="Converting parquet, WebDataset shards and Python datasets vs the "
                         "tree", info=info, columns=columns,
                   notes=["Targets (issue 20): parquet and WebDataset >= 1.0x the tree per "
                          "CPU-second; convert_dataset over paths or bytes >= 0.8x.",
                          "Net of start-up: images / (CPU-s - the CPU-s of converting one "
                          "image the same way: starting the processes, importing pyarrow, "
                          "the final fsync), the rate that counts at ImageNet's scale.",
                          *[f"start-up of `{label}`: {r.cpu:.2f} CPU-s"
                            for label, r in fixed.items()]])


def _ways(shard_writers, src, out):
    """({label: run} of every way to convert the tree at `src`, the shard files made)."""
    work, train = os.path.dirname(src), os.path.join(src, "train")
    tag = os.path.basename(src)
    parquet = shard_writers.parquet_from_tree(train, os.path.join(work, f"{tag}-pq"),
                                              files=SHARDS, rows_per_group=ROWS_PER_GROUP)
    wds = shard_writers.wds_from_tree(train, os.path.join(work, f"{tag}-wds"), shards=SHARDS)
    wds_gz = shard_writers.wds_from_tree(train, os.path.join(work, f"{tag}-wdsgz"),
                                         shards=SHARDS, compression="gz")
    classes = os.path.join(work, f"{tag}-classes.txt")
    with open(classes, "w") as file:
        file.write("\n".join(folder.find_classes(train)[0]) + "\n")
    shards = ["--classes-from", classes]
    ways = {TREE: _convert(["--from-dir", src], out),
            "parquet, 4 files (--from-archive 'pq/*.parquet')":
                _convert(["--from-archive", os.path.join(work, f"{tag}-pq", "*.parquet")], out),
            "WebDataset, 4 .tar shards":
                _convert(["--from-archive", os.path.join(work, f"{tag}-wds"), *shards], out),
            "WebDataset, 4 .tar.gz shards (one pass, in order)":
                _convert(["--from-archive", os.path.join(work, f"{tag}-wdsgz"), *shards], out),
            **{f"convert_dataset: {what}": _dataset(Items(train, kind), out)
               for kind, what in (("path", "(path, label)"), ("bytes", "(bytes, label)"),
                                  ("pil-file", "(PIL opened from a file, label)"),
                                  ("pil-bytes", "(PIL decoded from bytes: encoded again), "
                                                "label)"))}}
    return ways, (*parquet, *wds, *wds_gz)


def _fixed_costs(shard_writers, work, out, args):
    """{label: Result} of converting a one-image source each way."""
    tiny = os.path.join(work, "tiny")
    harness.make_tree(tiny, harness.sample_files(args.images_dir, 1))
    print("start-up cost per run, on a one-image source:", file=sys.stderr)
    ways, _ = _ways(shard_writers, tiny, out)
    candidates = [harness.Candidate(label, run, setup=_fresh(out))
                  for label, run in ways.items()]
    results = harness.measure(candidates, repeats=args.repeats, warmup=args.warmup)
    return {r.candidate.label: r for r in results}


def _net(fixed):
    def net(result):
        start = fixed[result.candidate.label]  # None where start-up is most of the run
        spent = result.cpu - start.cpu
        return result.images / spent if spent > 0.25 * result.cpu else None
    return net


def _fresh(out):
    import shutil

    return lambda: shutil.rmtree(out, ignore_errors=True)


def _convert(source, out):
    """`fastlmdb convert` from `source` (its flags) in this process; the images it converted
    (bench/convert.py's runner, default JPEG storage, 2 producers)."""
    import convert

    return convert._convert(None, out, "jpeg", 2, extra=source)


def _dataset(items, out):
    import fastlmdb

    def run():
        fastlmdb.convert_dataset(items, out, "train", procs=2)
        return _count(out)
    return run


def _count(out):
    return catalog.read_catalog(os.path.join(out, "train.lmdb"))[0]["count"]


if __name__ == "__main__":
    main()

"""How fast is `fastlmdb convert` on real JPEGs, next to the I/O floor and the naive recipe?

Rows, on a warm page cache (or a cold one, --cache cold): reading every source file once
(the I/O floor); the same plus writing the bytes to one file and fsync (the floor with the
write the converter must do); `fastlmdb convert` storing JPEG bytes and decoded numpy pixels
with 1 and 2 producer processes; the recipe most blog posts use: one process, one `txn.put`
and one commit per image; and that loop done right: one process, `putmulti` and a commit per
64 MB. The converter runs in this process (`cli.main`), so its spawned producers and writer
are reaped children and their CPU time counts. Its fixed cost per run (starting those
processes, the final fsync) is measured on a one-image tree, and the table shows its rate net
of that too.

With --backends, the rows are the ways to run a sharded conversion instead: one file (the
default), 4 shards made one after another by the local pipeline, and 4 shards as joblib tasks on
loky and on a dask LocalCluster of 2 worker processes that the command starts and stops (all
counted: they are this process's children).

    .venv/bin/python bench/convert.py             # 1,000 samples x2 = 2,000 files, 3 repeats
    .venv/bin/python bench/convert.py --quick     # seconds
    .venv/bin/python bench/convert.py --backends  # one file vs shards: local, loky, dask
    .venv/bin/python bench/convert.py --archives  # from the archives vs extract + convert

With --archives, the rows are the ways to convert ImageNet as it is downloaded: the tree
(already extracted), the tar of per-class tars and a zip of the tree read in place
(`--from-archive`), a gzip-compressed tar of the tree (read twice in order: listed, then
converted) and its first pass alone, and extracting the tar first (tarfile) and then converting,
which also costs the tree's size again on disk.
"""

import contextlib
import io
import os
import pickle
import shutil
import sys

import harness

from fastlmdb.core import catalog

NAIVE = "naive: 1 put + commit per image"
ONE_FILE = "one file (default)"
BATCHED = "1 process: putmulti + commit per 64 MB"
FLOOR = "read every file once (I/O floor)"
TARGET = 0.7  # jpeg-mode conversion speed over the I/O floor that the design asks for


def main(argv=None):
    p = harness.parser(__doc__.split("\n")[0], repeats=3)
    harness.add_tree_args(p, replicate=2)
    p.add_argument("--cache", choices=("warm", "cold"), default="warm",
                   help="page-cache state of the source files before each run "
                        "(default %(default)s)")
    p.add_argument("--backends", action="store_true",
                   help="compare the sharded backends instead (needs dask[distributed])")
    p.add_argument("--archives", action="store_true",
                   help="compare converting from the archives with extracting them first")
    args = harness.parse(p, argv, quick_limit=48)
    if args.backends:
        return _backends(args)
    if args.archives:
        return _archives(args)
    with harness.work_dir(args) as work:
        src, out = os.path.join(work, "src"), os.path.join(work, "out")
        files = harness.tree_from_args(args, src)
        mb = harness.total_bytes(files) / len(files) / 1e6
        info = [*harness.machine_info(work),
                f"input: {len(files)} files (each sample x{args.replicate}), "
                f"{mb * 1e3:.0f} KB mean, {mb * len(files):.0f} MB; {args.cache} page cache"]
        results = harness.measure(_candidates(src, out, files, args.cache),
                                  repeats=args.repeats, warmup=args.warmup)
        fixed = _fixed_costs(work, out, args)
    harness.report(harness.result_name(args, "convert"), results, baseline=NAIVE,
                   title="Converting an ImageFolder tree of real ImageNet JPEGs to LMDB",
                   info=info, columns=_columns(results, mb, fixed),
                   notes=_notes(results, fixed))


def _backends(args):
    with harness.work_dir(args) as work:
        src, out = os.path.join(work, "src"), os.path.join(work, "out")
        files = harness.tree_from_args(args, src)
        ways = {ONE_FILE: [], "--shards 4 (local: one after another)": ["--shards", "4"],
                "--shards 4 --backend loky": ["--shards", "4", "--backend", "loky"],
                "--shards 4 --backend dask (local cluster)": ["--shards", "4",
                                                              "--backend", "dask"]}
        candidates = [harness.Candidate(label, _convert(src, out, "jpeg", 2, extra),
                                        files=tuple(files), cache="warm", setup=_fresh(out))
                      for label, extra in ways.items()]
        results = harness.measure(candidates, repeats=args.repeats, warmup=args.warmup)
        info = [*harness.machine_info(work), f"input: {len(files)} files, --save-as jpeg, "
                                             "--procs 2 (dask: 2 workers x 1 thread)"]
    harness.report(harness.result_name(args, "convert-backends"), results, baseline=ONE_FILE,
                   title="One file vs shards on each backend", info=info,
                   notes=["Each run starts its own processes (and the dask cluster), as a "
                          "command does. On a real cluster the dask workers run on other "
                          "machines, reading --from_dir and writing --to_dir on a shared "
                          "filesystem; here the 2 cores are shared by all of them."])


def _archives(args):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import archives  # the test suite's packers: members in reversed order

    with harness.work_dir(args) as work:
        src, out = os.path.join(work, "src"), os.path.join(work, "out")
        files = harness.tree_from_args(args, src)
        train = os.path.join(src, "train")
        tar = archives.tar_of_tars(train, os.path.join(work, "ILSVRC2012_img_train.tar"))
        zipped = archives.tree(train, os.path.join(work, "train.zip"), prefix="train/")
        gzipped = archives.tree(train, os.path.join(work, "train.tar.gz"), prefix="train/",
                                compression="gz")
        extracted = os.path.join(work, "extracted")
        ways = {"tree (already extracted)": _convert(src, out, "jpeg", 2),
                "--from-archive train.tar (tar of per-class tars)":
                    _convert(None, out, "jpeg", 2, ["--from-archive", tar]),
                "--from-archive train.zip (a tree, stored)":
                    _convert(None, out, "jpeg", 2, ["--from-archive", zipped]),
                "--from-archive train.tar.gz (a tree; list, then read)":
                    _convert(None, out, "jpeg", 2, ["--from-archive", gzipped]),
                "list train.tar.gz only (its first pass)": _list_stream(gzipped),
                "extract the tar, then convert the tree": _extract_then_convert(
                    tar, extracted, _convert(extracted, out, "jpeg", 2), len(files)),
                "extract the tar only": _extract_then_convert(tar, extracted, None,
                                                              len(files))}
        packed = (tar, zipped, gzipped)
        candidates = [harness.Candidate(label, run, files=(*files, *packed), cache="warm",
                                        setup=_fresh(out)) for label, run in ways.items()]
        results = harness.measure(candidates, repeats=args.repeats, warmup=args.warmup)
        info = [*harness.machine_info(work),
                f"input: {len(files)} files, {harness.total_bytes(files) / 1e6:.0f} MB; tar "
                f"{os.path.getsize(tar) / 1e6:.0f} MB, zip {os.path.getsize(zipped) / 1e6:.0f} "
                f"MB, tar.gz {os.path.getsize(gzipped) / 1e6:.0f} MB; --save-as jpeg --procs 2"]
    harness.report(harness.result_name(args, "convert-archives"), results,
                   baseline="tree (already extracted)",
                   title="Converting from the downloaded archives vs extracting them first",
                   info=info, notes=["Extracting writes the whole tree once more (as much disk "
                                     "as the tar, ~140 GB for ImageNet train) and creates one "
                                     "file per image; converting in place reads each byte once."])


def _list_stream(path):
    from fastlmdb.sources import stream

    return lambda: len(stream.members(path, "gzip"))


def _extract_then_convert(tar, extracted, convert, count):
    import tarfile

    def run():
        shutil.rmtree(extracted, ignore_errors=True)
        with tarfile.open(tar) as outer:
            for member in outer:
                with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                    inner.extractall(os.path.join(extracted, "train", member.name[:-4]),
                                     filter="data")
        return convert() if convert else count
    return run


def _fresh(out):
    def setup():  # untimed: each run writes into an empty folder
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
    return setup


def _candidates(src, out, files, cache):
    runs = {FLOOR: _read_all(files), "read + write one file + fsync": _read_write(files, out)}
    runs.update(_converters(src, out))
    runs[NAIVE] = _naive(files, out)
    runs[BATCHED] = _batched(files, out)
    return [harness.Candidate(label, run, files=tuple(files), cache=cache, setup=_fresh(out))
            for label, run in runs.items()]


def _converters(src, out):
    return {_convert_label(save_as, procs): _convert(src, out, save_as, procs)
            for save_as in ("jpeg", "numpy") for procs in (1, 2)}


def _fixed_costs(work, out, args):
    """{converter label: median Result} of converting a one-image tree."""
    tiny = os.path.join(work, "tiny")
    harness.make_tree(tiny, harness.sample_files(args.images_dir, 1))
    print("fixed cost per run, on a one-image tree:", file=sys.stderr)
    candidates = [harness.Candidate(label, run, setup=_fresh(out))
                  for label, run in _converters(tiny, out).items()]
    results = harness.measure(candidates, repeats=args.repeats, warmup=args.warmup)
    return {r.candidate.label: r for r in results}


def _convert_label(save_as, procs):
    return f"fastlmdb convert --save-as {save_as} --procs {procs}"


def _read_all(files):
    def run():
        for path in files:
            harness.read_bytes(path)
        return len(files)
    return run


def _read_write(files, out):
    def run():
        with open(os.path.join(out, "all.bin"), "wb") as sink:
            for path in files:
                sink.write(harness.read_bytes(path))
            sink.flush()
            os.fsync(sink.fileno())
        return len(files)
    return run


def _convert(src, out, save_as, procs, extra=()):
    """`fastlmdb convert` in this process; the images it converted (every file, or it fails)."""
    from fastlmdb import cli

    source = ["--from-dir", src] if src else []
    argv = ["convert", *source, "--to-dir", out, "--split", "train",
            "--save-as", save_as, "--procs", str(procs), *extra]

    def run():
        with contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()) as err:
            code = cli.main(argv)
        if code:
            raise SystemExit(f"fastlmdb {' '.join(argv)} failed ({code}):\n{err.getvalue()}")
        return catalog.read_catalog(os.path.join(out, "train.lmdb"))[0]["count"]
    return run


def _naive(files, out):
    """The blog-post recipe: pickle (bytes, class) and commit every image on its own."""
    import lmdb

    def run():
        env = lmdb.open(os.path.join(out, "naive"), map_size=1 << 40)
        for index, path in enumerate(files):
            label = os.path.basename(os.path.dirname(path))
            value = pickle.dumps((harness.read_bytes(path), label))
            with env.begin(write=True) as txn:
                txn.put(f"{index:08d}".encode(), value)
        env.close()
        return len(files)
    return run


def _batched(files, out, batch_bytes=64 << 20):
    """The naive loop done right, still in one process: what the converter's writer does."""
    import lmdb

    def run():
        env = lmdb.open(os.path.join(out, "batched.lmdb"), subdir=False, map_size=1 << 40)
        items, size = [], 0
        for index, path in enumerate(files):
            items.append((index.to_bytes(8, "big"), harness.read_bytes(path)))
            size += len(items[-1][1])
            if size >= batch_bytes or index == len(files) - 1:
                with env.begin(write=True) as txn:
                    txn.cursor().putmulti(items, append=True)
                items, size = [], 0
        env.close()
        return len(files)
    return run


def _columns(results, mb, fixed):
    floor = _find(results, FLOOR)

    def net(r):
        start = fixed.get(r.candidate.label)
        return r.images / (r.wall - start.wall) if start and r.wall > start.wall else None

    return [
        harness.Column("MB/s", lambda r: f"{r.per_second * mb:,.0f}"),
        harness.Column("vs I/O floor", lambda r: f"{r.per_second / floor:.3f}x"),
        harness.Column("img/s net of start-up", lambda r: _maybe(net(r), "{:,.0f}")),
        harness.Column("net vs I/O floor", lambda r: _maybe(net(r), "{:.3f}x", floor)),
    ]


def _maybe(value, form, over=1.0):
    return "-" if value is None else form.format(value / over)


def _find(results, label):
    return next(r.per_second for r in results if r.candidate.label == label)


def _notes(results, fixed):
    notes = ["MB/s: source bytes per wall second. vs I/O floor: img/s over the I/O floor's "
             f"img/s; the design's target for `--save-as jpeg` is >= {TARGET}x. Net of "
             "start-up: images / (wall seconds - the fixed cost below)."]
    notes += [f"fixed cost of `{label}` (a one-image tree): {r.wall:.2f} s wall, "
              f"{r.cpu:.2f} CPU-s" for label, r in fixed.items()]
    for save_as in ("jpeg", "numpy"):
        one, two = (_find(results, _convert_label(save_as, p)) for p in (1, 2))
        notes.append(f"--save-as {save_as}: --procs 2 / --procs 1 = {two / one:.2f}x img/s "
                     "(the writer and the coordinator are processes too, on the same cores)")
    notes.append("The converter's rows include starting its spawned processes (Python, "
                 "numpy, lmdb imports) and the final fsync; the naive loop commits with "
                 "LMDB's default sync=True, so every image is an fsync. Nothing here drops "
                 "the written files from the page cache: writes reach the disk at the "
                 "fsyncs, and the kernel's writeback CPU time is not charged to any process.")
    return notes


if __name__ == "__main__":
    main()

"""What does the native batch decoder gain: per sample against the region-decode floor, and per
DataLoader epoch against the in-place path it replaces and ImageFolder + PIL?

Two tables, RandomResizedCrop(224) + horizontal flip, uint8 CHW, batch 64:

1. `--part floor` (one process, one thread, records in memory): the bare region decode of the
   same boxes (bench/decoders.py's floor), `_jpegcrop.decode_batch` alone (boxes drawn
   beforehand), and `LMDBDataset.__getitems__` natively and as before (per slot: region
   decode, torch's interpolate, torch's flip). The `x floor` column is the target (<= 1.3x).
2. `--part loaders`: DataLoader epochs with 2 workers, and with 0 workers + `threads=2`, on the
   database as converted and on a `--max-size 512 --quality 90` one (FFCV's recommended
   max_resolution=512, jpeg_quality=90); FFCV side by side where `import ffcv` works.
   First-batch time (a fresh loader, workers started) is measured once per row after the runs.

    .venv/bin/python bench/batch.py --limit 640 --repeats 3
    .venv/bin/python bench/batch.py --quick
"""

import contextlib
import functools
import os
import time

import harness
import loaders

FLOOR = "region decode of the same boxes (floor)"
BASELINE = "ImageFolder + PIL"


def main(argv=None):
    p = harness.parser(__doc__.split("\n")[0], repeats=3)
    harness.add_tree_args(p, replicate=1)
    p.add_argument("--part", nargs="+", choices=("floor", "loaders"),
                   default=["floor", "loaders"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ffcv-only", action="store_true",
                   help="loaders: only the 2-worker native rows, ImageFolder and FFCV (for a "
                        "venv with FFCV, whose process may run torch's interpolate slower)")
    args = harness.parse(p, argv, quick_limit=128)
    import torch

    torch.set_num_threads(1)
    with harness.work_dir(args) as work:
        files = harness.tree_from_args(args, os.path.join(work, "src"))
        root = loaders._convert(work, "jpeg")
        info = [*harness.machine_info(work), f"input: {len(files)} images, "
                f"{harness.total_bytes(files) / 1e6:.0f} MB of JPEG files"]
        if "floor" in args.part:
            _floor(args, root, info)
        if "loaders" in args.part:
            small = loaders._convert(work, "jpeg", name="max512", max_size=512, quality=90)
            _loaders(args, work, {"as converted": root, "--max-size 512 --quality 90": small},
                     info, args.ffcv_only)


# --- per sample, one thread ---------------------------------------------------------------

def _floor(args, root, info):
    import numpy as np
    import torch

    from fastlmdb import LMDBDataset
    from fastlmdb.loading import crops

    dataset = LMDBDataset(root, "train", _pipeline(), output="tensor")
    count = len(dataset) - len(dataset) % args.batch_size or len(dataset)
    indices = list(range(count))
    values = [bytes(v) for v in dataset._reader.get_many(dataset._keys(indices).tolist())]
    rows = dataset._rows[indices]
    shapes = np.stack([rows["height"], rows["width"]], axis=1)
    torch.manual_seed(0)
    boxes = [dataset._crop.box(h, w) for h, w in shapes.tolist()]
    batches = [list(range(i, min(i + args.batch_size, count)))
               for i in range(0, count, args.batch_size)]

    def floor():
        for value, (top, left, h, w) in zip(values, boxes):
            crops._jpegcrop.decode_region(value, top, left, h, w, crops.scale_for(h, w, (224, 224)))
        return count

    candidates = [harness.Candidate(FLOOR, floor),
                  harness.Candidate("_jpegcrop.decode_batch alone (boxes drawn before)",
                                    functools.partial(_decode_batch, values, boxes, batches)),
                  harness.Candidate("LMDBDataset.__getitems__, native batch",
                                    functools.partial(_getitems, dataset, batches, False)),
                  harness.Candidate("LMDBDataset.__getitems__, per-slot path (before)",
                                    functools.partial(_getitems, dataset, batches, True))]
    results = harness.measure(candidates, repeats=args.repeats, warmup=args.warmup)
    columns = [harness.Column("CPU us/img", lambda r: f"{1e6 / r.per_cpu_second:,.0f}"),
               harness.Column("x floor", lambda r: f"{_floor_of(results) / r.per_cpu_second:.2f}x")]
    harness.report(harness.result_name(args, "batch-floor"), results, baseline=FLOOR,
                   title="Per sample: the decode-aware batch vs the region-decode floor, "
                         "1 thread, in memory", info=info, columns=columns,
                   notes=["x floor: CPU time per image over the floor's (target <= 1.3x)."])


def _floor_of(results):
    return next(r.per_cpu_second for r in results if r.candidate.label == FLOOR)


def _decode_batch(values, boxes, batches):
    import numpy as np

    from fastlmdb.loading import crops

    out = np.empty((len(batches[0]), 3, 224, 224), np.uint8)
    for positions in batches:
        chunk = np.array([boxes[i] for i in positions], np.int64)
        flips = np.array([i % 2 for i in positions], np.uint8)
        crops._jpegcrop.decode_batch([values[i] for i in positions], chunk, flips,
                                     out[:len(positions)], 224, 224)
    return sum(map(len, batches))


def _getitems(dataset, batches, before):
    with _before() if before else contextlib.nullcontext():
        for positions in batches:
            dataset.__getitems__(positions)
    return sum(map(len, batches))


class _RegionOnly:
    """_jpegcrop with its region decoder only: the path before the native batch."""

    def __init__(self, module):
        self.decode_region = module.decode_region


@contextlib.contextmanager
def _before():
    """The in-place path as it was: per slot, region decode + torch's interpolate + flip."""
    from fastlmdb.loading import batch, crops

    saved = crops._jpegcrop, batch.native_built
    crops._jpegcrop, batch.native_built = _RegionOnly(saved[0]), lambda: False
    try:
        yield
    finally:
        crops._jpegcrop, batch.native_built = saved


# --- DataLoader epochs --------------------------------------------------------------------

def _pipeline():
    from torchvision.transforms import v2

    import fastlmdb

    return v2.Compose([fastlmdb.RandomResizedCrop(224), v2.RandomHorizontalFlip()])


def _loaders(args, work, databases, info, ffcv_only=False):
    from torchvision import transforms as v1
    from torchvision.datasets import ImageFolder

    from fastlmdb import LMDBDataset

    pil = v1.Compose([v1.RandomResizedCrop(224), v1.RandomHorizontalFlip(), v1.PILToTensor()])
    folder = functools.partial(ImageFolder, os.path.join(work, "src", "train"), pil)
    candidates = []
    for workers, threads in ((2, 1),) if ffcv_only else ((2, 1), (0, 2)):
        setting = f"{workers} workers" + (f", threads={threads}" if threads > 1 else "")
        candidates.append(_row(BASELINE, folder, workers, args.batch_size, setting))
        for name, root in databases.items():
            group = f"{setting}, {name}"
            native = functools.partial(LMDBDataset, root, "train", _pipeline(),
                                       output="tensor", threads=threads)
            before = functools.partial(LMDBDataset, root, "train", _pipeline(), output="tensor")
            candidates.append(_row("LMDBDataset native batch", native, workers,
                                   args.batch_size, setting, group))
            if not ffcv_only:
                candidates.append(_row("LMDBDataset in-place, per slot (before)", before,
                                       workers, args.batch_size, setting, group, legacy=True))
    candidates += _ffcv(work, databases, args.batch_size)
    results = harness.measure(candidates, repeats=args.repeats, warmup=args.warmup)
    for c in candidates:
        c.info["pss"] = harness.peak_pss(c.run)[1]
        c.info["first"] = _first_batch(c)
    columns = [harness.Column("first batch", lambda r: r.candidate.info["first"]),
               harness.Column("peak PSS", lambda r: f"{r.candidate.info['pss'] / 2**30:.2f} GB")]
    name = "batch-loaders-ffcv" if ffcv_only else "batch-loaders"
    harness.report(harness.result_name(args, name), results, baseline=BASELINE,
                   title=f"Loaders, batch {args.batch_size}, RandomResizedCrop(224) + flip, "
                         "uint8", info=info, columns=columns,
                   notes=["ImageFolder + PIL reads the tree's files, from which the databases "
                          "were converted, in every group (its baseline is that of the same "
                          "worker setting).",
                          "Warm page cache; persistent workers started in the warm-up run.",
                          "first batch: seconds from creating a fresh dataset and DataLoader "
                          "(FFCV: its Loader, which compiles its pipeline) to the first batch "
                          "(workers started by fork), once, after the timed runs.",
                          "peak PSS: the most proportional set size of the process tree (main + "
                          "workers; shared and mapped pages counted once), sampled every 0.1 s "
                          "in one more, untimed epoch.",
                          "data read: " + _sizes(databases, candidates)]
                   + _ffcv_note(args.reencode))


def _row(label, make, workers, batch_size, setting, group=None, legacy=False):
    """A row of epochs of make()'s dataset; make() again gives a fresh one."""
    epoch = loaders._epoch(make(), workers, batch_size, persistent=True)
    if legacy:  # workers forked in the warm-up run inherit the patch; the main process not
        epoch = _patched(epoch)
    candidate = harness.Candidate(label, epoch, group=group or setting)
    candidate.info["first"] = functools.partial(_first_torch, make, workers, batch_size, legacy)
    return candidate


def _patched(epoch):
    def run():
        with _before():
            return epoch()
    return run


def _first_batch(candidate):
    make = candidate.info.get("first")
    if make is None:
        return "-"
    start = time.perf_counter()
    make()
    return f"{time.perf_counter() - start:.2f} s"


def _first_torch(make, workers, batch_size, legacy):
    """The first batch of a fresh dataset, make(), in a fresh DataLoader."""
    import torch

    with _before() if legacy else contextlib.nullcontext():
        loader = torch.utils.data.DataLoader(
            make(), batch_size=batch_size, shuffle=True, num_workers=workers,
            multiprocessing_context="fork" if workers else None)
        next(iter(loader))
        del loader


def _ffcv(work, databases, batch_size):
    """FFCV rows, 2 workers (its workers are threads): its .beton written from the sample tree
    as FFCV's ImageNet example does, JPEG at quality 90, and with max_resolution=512."""
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return []
    rows = []
    for name, max_resolution in (("as converted", None), ("--max-size 512 --quality 90", 512)):
        path = _ffcv_write(work, max_resolution)
        row = harness.Candidate("FFCV (JPEGs re-encoded by FFCV, quality 90)",
                                loaders._ffcv_epoch(path, 2, batch_size),
                                group=f"2 workers, {name}")
        row.info["first"] = functools.partial(_first_ffcv, path, batch_size)
        row.info["bytes"] = os.path.getsize(path)
        rows.append(row)
    return rows


def _first_ffcv(path, batch_size):
    loader = loaders._ffcv_loader(path, 2, batch_size)
    next(iter(loader))
    del loader


def _ffcv_write(work, max_resolution):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    path = os.path.join(work, f"train-{max_resolution}.beton")
    field = RGBImageField(write_mode="jpg", max_resolution=max_resolution, jpeg_quality=90)
    DatasetWriter(path, {"image": field, "label": IntField()}).from_indexed_dataset(
        ImageFolder(os.path.join(work, "src", "train")))
    return path


def _sizes(databases, candidates):
    """The bytes each store holds, so rows over different data are seen to be."""
    sizes = [f"{name} database {harness.total_bytes(_files(root)) / 1e6:.0f} MB"
             for name, root in databases.items()]
    sizes += [f"FFCV .beton ({c.group}) {c.info['bytes'] / 1e6:.0f} MB"
              for c in candidates if "bytes" in c.info]
    return "; ".join(sizes) + "."


def _files(root):
    return [os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names]


def _ffcv_note(reencoded):
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return ["FFCV: not importable here; no row (it builds from PyPI given `apt-get install "
                "pkg-config libturbojpeg0-dev libopencv-dev`, numpy<2.3)."]
    same = (f"the tree was re-encoded at quality {reencoded} first (--reencode), so every row "
            "decodes JPEGs of that quality" if reencoded else
            "the other rows read the sample JPEGs as they are: its data differs")
    return ["FFCV: RandomResizedCropRGBImageDecoder((224, 224)) + RandomHorizontalFlip + "
            "ToTensor + ToTorchImage, uint8, OrderOption.RANDOM; its workers are threads of "
            "this process, so its img/CPU-s counts them all. It re-encodes every JPEG at "
            f"quality 90 (write_mode='jpg'); {same}."]


if __name__ == "__main__":
    main()

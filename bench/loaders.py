"""How many training samples per CPU-second do the loaders deliver, against ImageFolder?

Whole DataLoader epochs (batch 64, shuffled) over the real sample JPEGs: ImageFolder + PIL +
torchvision v1 transforms (the baseline); LMDBDataset with PIL output and the same transforms;
LMDBDataset and LMDBIterDataset with uint8 tensor output and v2 transforms, emitting float32 or
uint8 batches; a numpy-mode database; and, where the library has it, its decode-aware
RandomResizedCrop (uint8 batches decoded in place, and the same pipeline per sample). Each with
a warm page cache and a cold one (the files a row reads are evicted before each of its runs).
FFCV gets a row only where `import ffcv` works.

Workers: warm rows keep theirs (persistent_workers=True, started in the warm-up run), as a
training run does over epochs of 1.28 M images, where starting them costs nothing per image; a
1,000-image run that started them would count that start-up against 1,000 images. Their CPU
time is read from their CPU clocks while they live (harness.tree_cpu_seconds). Cold rows start
and reap workers in every run: a worker keeps the database pages it read mapped, and mapped
pages cannot be evicted. `--restart-workers` restarts them for warm rows too.

    .venv/bin/python bench/loaders.py                         # 1,000 images, 2 workers
    .venv/bin/python bench/loaders.py --workers 0 2 --quick   # seconds
"""

import functools
import os
import shutil

import harness

BASELINE = "ImageFolder + PIL, v1"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def main(argv=None):
    p = harness.parser(__doc__.split("\n")[0], repeats=3)
    harness.add_tree_args(p, replicate=1)
    p.add_argument("--workers", type=int, nargs="+", default=[2],
                   help="DataLoader num_workers values to run (default 2)")
    p.add_argument("--cache", nargs="+", choices=("warm", "cold"), default=["warm", "cold"],
                   help="page-cache states to run (default warm cold)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--restart-workers", action="store_true",
                   help="start and reap the workers in every run of warm rows too (cold rows "
                        "always do)")
    args = harness.parse(p, argv, quick_limit=128)
    import torch

    torch.set_num_threads(1)  # as in DataLoader workers; the main process only collates
    with harness.work_dir(args) as work:
        files = harness.tree_from_args(args, os.path.join(work, "src"))
        databases = _databases(work)
        ffcv_rows, ffcv_note = _ffcv_rows(work)
        # Cold rows read copies of the databases: a persistent worker of a warm row keeps the
        # pages it read mapped, and mapped pages cannot be evicted.
        rows = {cache: _rows(work, databases if cache == "warm" else
                             _copies(databases, os.path.join(work, "cold")),
                             args.batch_size) + ffcv_rows
                for cache in args.cache}
        candidates = [
            harness.Candidate(label, epoch(workers, args.batch_size,
                                           cache == "warm" and not args.restart_workers),
                              group=f"{workers} workers, {cache}", cache=cache,
                              files=tuple(files) if reads is None else reads)
            for workers in args.workers for cache in args.cache
            for label, epoch, reads in rows[cache]]
        info = [*harness.machine_info(work),
                *_describe(work, files, args.batch_size, args.restart_workers)]
        results = harness.measure(candidates, repeats=args.repeats, warmup=args.warmup)
    columns = [_vs_in_process(results)] if 0 in args.workers and len(args.workers) > 1 else []
    harness.report(harness.result_name(args, "loaders"), results, baseline=BASELINE,
                   title=f"Training loaders, batch {args.batch_size}, real ImageNet JPEGs",
                   info=info, columns=columns, notes=[ffcv_note, *_notes()])


def _vs_in_process(results):
    """A column: img/CPU-s over that of the same row with 0 workers (same cache state): what
    handing samples between processes costs."""
    def value(result):
        cache = result.candidate.cache
        same = [r for r in results if r.candidate.label == result.candidate.label
                and r.candidate.group == f"0 workers, {cache}"]
        return f"{result.per_cpu_second / same[0].per_cpu_second:.2f}x" if same else "-"
    return harness.Column("vs 0 workers", value)


def _describe(work, files, batch_size, restart_workers):
    sizes = {kind: os.path.getsize(_db(work, kind)) / 1e6 for kind in ("jpeg", "numpy")}
    persistent = "False" if restart_workers else "True for warm rows, False for cold ones"
    return [f"input: {len(files)} images, {harness.total_bytes(files) / 1e6:.0f} MB of JPEG "
            f"files; train.lmdb {sizes['jpeg']:.0f} MB (jpeg), {sizes['numpy']:.0f} MB (numpy)",
            f"DataLoader(batch_size={batch_size}, shuffle=True for map-style, "
            f"persistent_workers={persistent}, fork); torch.set_num_threads(1) in the main "
            "process"]


def _notes():
    return ["cold: posix_fadvise(DONTNEED) on the row's own files (the source JPEGs, or the "
            ".lmdb) before each run; directory entries and inodes stay cached (dropping those "
            "needs root), so cold ImageFolder rows are a little warmer than a real cold start.",
            "Workers: persistent in warm rows (started in the warm-up run, as over the epochs of "
            "a training run); cold rows start and reap them in every run (mapped pages cannot "
            "be evicted), so their start-up counts against the run's images, more than in a "
            "real epoch, and read copies of the databases that no persistent worker maps."]


# --- datasets -----------------------------------------------------------------------------

def _db(work, kind):
    return os.path.join(work, kind, "train.lmdb")


def _convert(work, save_as, name=None, **options):
    """DST of a new database of the sample tree."""
    from fastlmdb import converter

    name = name or save_as
    converter.convert(converter.Options(os.path.join(work, "src"), os.path.join(work, name),
                                    "train", save_as=save_as, **options))
    return os.path.join(work, name)


def _databases(work):
    """{name: DST}: jpeg, numpy, and for decode-aware versions a --max-size 256 jpeg one."""
    import fastlmdb

    found = {"jpeg": _convert(work, "jpeg"), "numpy": _convert(work, "numpy")}
    if hasattr(fastlmdb, "RandomResizedCrop"):
        found["max256"] = _convert(work, "jpeg", name="max256", max_size=256)
    return found


def _copies(databases, folder):
    """{name: DST} of copies of `databases` under `folder`."""
    copies = {}
    for name, root in databases.items():
        copies[name] = os.path.join(folder, name)
        os.makedirs(copies[name], exist_ok=True)
        shutil.copyfile(os.path.join(root, "train.lmdb"), os.path.join(copies[name], "train.lmdb"))
    return copies


def _transforms():
    import torch
    from torchvision import transforms as v1
    from torchvision.transforms import v2

    pil = v1.Compose([v1.RandomResizedCrop(224), v1.RandomHorizontalFlip(), v1.ToTensor(),
                      v1.Normalize(MEAN, STD)])
    uint8 = [v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()]
    floats = v2.Compose([*uint8, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    return pil, floats, v2.Compose(uint8)


def _rows(work, databases, batch_size):
    """[(label, epoch(workers, batch_size, persistent) -> run, files it reads or None: the
    source tree)] over `databases` ({name: DST})."""
    from torchvision.datasets import ImageFolder

    from fastlmdb import LMDBDataset, LMDBIterDataset

    pil, floats, uint8 = _transforms()
    root, numpy_root = databases["jpeg"], databases["numpy"]
    jpeg_db, numpy_db = (os.path.join(root, "train.lmdb"),), (
        os.path.join(numpy_root, "train.lmdb"),)
    datasets = [
        (BASELINE, ImageFolder(os.path.join(work, "src", "train"), pil), None),
        ("LMDBDataset PIL output, v1", LMDBDataset(root, "train", pil), jpeg_db),
        ("LMDBDataset tensor, v2 float32", LMDBDataset(root, "train", floats,
                                                      output="tensor"), jpeg_db),
        ("LMDBDataset tensor, v2 uint8 (normalise on the GPU)",
         LMDBDataset(root, "train", uint8, output="tensor"), jpeg_db),
        ("LMDBIterDataset tensor, v2 float32",
         LMDBIterDataset(root, "train", floats, output="tensor", shuffle=True,
                         batch_size=batch_size), jpeg_db),
        ("LMDBDataset numpy db, tensor, v2 float32",
         LMDBDataset(numpy_root, "train", floats, output="tensor"), numpy_db),
    ]
    if "max256" in databases:
        datasets += _decode_aware(root, databases["max256"], batch_size)
    return [(label, functools.partial(_epoch, dataset), reads)
            for label, dataset, reads in datasets]


def _decode_aware(root, small_root, batch_size):
    """Rows for fastlmdb's decode-aware RandomResizedCrop."""
    import torch
    from torchvision.transforms import v2

    import fastlmdb
    from fastlmdb import LMDBDataset, LMDBIterDataset

    head = [fastlmdb.RandomResizedCrop(224), v2.RandomHorizontalFlip()]
    tf = v2.Compose([*head, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    jpeg_db, small_db = (os.path.join(root, "train.lmdb"),), (
        os.path.join(small_root, "train.lmdb"),)
    return [("LMDBDataset tensor, fastlmdb.RandomResizedCrop + v2 float32",
             LMDBDataset(root, "train", tf, output="tensor"), jpeg_db),
            ("LMDBDataset tensor, fastlmdb.RandomResizedCrop + v2 uint8",
             LMDBDataset(root, "train", v2.Compose(head), output="tensor"), jpeg_db),
            # v2.Identity: any step but a flip keeps the per-sample path (before fastlmdb.batch)
            ("same, per sample (no in-place batch)",
             LMDBDataset(root, "train", v2.Compose([*head, v2.Identity()]), output="tensor"),
             jpeg_db),
            ("LMDBIterDataset tensor, fastlmdb.RandomResizedCrop + v2 uint8",
             LMDBIterDataset(root, "train", v2.Compose(head), output="tensor", shuffle=True,
                             batch_size=batch_size), jpeg_db),
            ("--max-size 256 db (data differs), fastlmdb.RandomResizedCrop + uint8",
             LMDBDataset(small_root, "train", v2.Compose(head), output="tensor"), small_db)]


def _epoch(dataset, workers, batch_size, persistent):
    import torch

    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    kept = []

    def make():
        # fork: workers are this process's children, whose CPU time the harness counts.
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=not iterable, num_workers=workers,
            multiprocessing_context="fork" if workers else None,
            persistent_workers=bool(persistent and workers))

    def run():
        if persistent and workers:
            if not kept:
                kept.append(make())  # its workers start in the first (warm-up) run
            loader = kept[0]
        else:
            loader = make()
        images = 0
        for _, labels in loader:
            images += len(labels)
        return images  # a loader without persistent workers has joined them now
    return run


def _ffcv_rows(work):
    """An FFCV row when `import ffcv` works, and a note. FFCV builds from PyPI given
    `apt-get install pkg-config libturbojpeg0-dev libopencv-dev`, in a venv with numpy<2.3
    (numba's limit)."""
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return [], "FFCV: not installed (`pip install ffcv`), no row"
    try:
        path = _ffcv_write(work)
    except Exception as exc:  # noqa: BLE001 - an unusable FFCV is a note, not a crash
        return [], f"FFCV: imports but failed here ({type(exc).__name__}: {exc}), no row"
    return ([("FFCV uint8 (JPEGs re-encoded by FFCV)", functools.partial(_ffcv_epoch, path),
              (path,))],
            "FFCV: its workers are threads of this process; uint8 output, like the uint8 row")


def _ffcv_write(work):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    path = os.path.join(work, "train.beton")
    DatasetWriter(path, {"image": RGBImageField(write_mode="jpg"), "label": IntField()}
                  ).from_indexed_dataset(ImageFolder(os.path.join(work, "src", "train")))
    return path


def _ffcv_loader(path, workers, batch_size):  # its workers are threads
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

    pipelines = {"image": [RandomResizedCropRGBImageDecoder((224, 224)), RandomHorizontalFlip(),
                           ToTensor(), ToTorchImage()],
                 "label": [IntDecoder(), ToTensor()]}
    return Loader(path, batch_size=batch_size, num_workers=max(workers, 1),
                  order=OrderOption.RANDOM, pipelines=pipelines)


def _ffcv_epoch(path, workers, batch_size, persistent=True):
    # One Loader for all epochs, as in training: it JIT-compiles its pipeline (seconds) when
    # made, which the warm-up epoch absorbs; FFCV keeps state in the operations, so they
    # cannot be reused by a second Loader either.
    loader = _ffcv_loader(path, workers, batch_size)

    def run():
        return sum(len(labels) for _, labels in loader)
    return run


if __name__ == "__main__":
    main()

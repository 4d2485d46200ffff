"""`fastlmdb demo`: make a sample tree, convert it, and time loading it against ImageFolder.

Needs the `demo` extra (torch, torchvision): ``pip install 'fastlmdb[demo]'``.
"""

import dataclasses
import os
import tempfile
import time

BATCH = 64
MIN_SECONDS = 1.0  # per timed row: whole epochs, repeated while a tiny tree is faster


def add_command(commands):
    p = commands.add_parser("demo", help="end to end on a generated sample tree",
                            description=__doc__)
    p.add_argument("--dir", default=None, help="work folder (default: a new temporary one)")
    p.add_argument("--classes", type=int, default=20, help="classes in the sample tree")
    p.add_argument("--per-class", type=int, default=24, help="train images per class")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.set_defaults(run=run)


def run(args):
    from fastlmdb import converter
    from fastlmdb.cli import terminal
    from fastlmdb.testing import sample_tree

    work = args.dir or tempfile.mkdtemp(prefix="fastlmdb-demo-")
    src, dst = os.path.join(work, "imagenet"), os.path.join(work, "lmdb")
    sample_tree.make_tree(src, classes=args.classes,
                          per_class={"train": args.per_class, "val": max(1, args.per_class // 4)})
    print(f"sample tree of real JPEGs: {src}")
    for split in ("train", "val"):
        stats = converter.convert(converter.Options(src, dst, split, overwrite=True))
        terminal.print_summary(stats)
    print(f"\nthe one-line swap, ImageFolder(...) -> LMDBDataset(...), the same transform, on "
          f"{dst}/train.lmdb, batch {BATCH}, {args.workers} workers:")
    _compare(src, dst, args.workers)
    return 0


def _compare(src, dst, workers):
    import torch
    import torchvision.datasets

    from fastlmdb.loading.dataset import LMDBDataset

    print(f"  {'recipe':18} {'loader':12} {'img/s':>8} {'img/CPU-s':>10} {'vs ImageFolder':>15}")
    for recipe, transform in recipes().items():
        baseline = None
        for name, dataset in (
                ("ImageFolder", torchvision.datasets.ImageFolder(os.path.join(src, "train"),
                                                                 transform)),
                ("LMDBDataset", LMDBDataset(dst, "train", transform))):
            def loader():
                return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True,
                                                   num_workers=workers)

            time_epoch(loader)  # warm the page cache and imports
            timing = time_epoch(loader, MIN_SECONDS)
            baseline = baseline or timing.per_cpu_second
            print(f"  {recipe:18} {name:12} {timing.per_second:8.0f} "
                  f"{timing.per_cpu_second:10.0f} {timing.per_cpu_second / baseline:14.2f}x")
        print(f"  {'':18} path: {dataset.pipeline()}")


def recipes():
    """The transforms people write (torchvision's docs and classification reference), by name;
    timed unchanged on ImageFolder and on LMDBDataset."""
    import torch
    from torchvision import transforms as v1
    from torchvision.transforms import v2

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    return {
        "v1 train": v1.Compose([v1.RandomResizedCrop(224), v1.RandomHorizontalFlip(),
                                v1.ToTensor(), v1.Normalize(mean, std)]),
        "v2 train (float)": v2.Compose([
            v2.ToImage(), v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]),
        "v2 train (uint8)": v2.Compose([
            v2.ToImage(), v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()]),
        "val": v1.Compose([v1.Resize(256), v1.CenterCrop(224), v1.ToTensor(),
                           v1.Normalize(mean, std)]),
    }


# Measuring loaders fairly: wall time and CPU time of the whole process tree. Workers are
# counted once they have exited and been reaped, so whole epochs without persistent workers.
def cpu_seconds():
    """User + system CPU seconds of this process and its reaped children so far (Windows
    counts no children). process_time and getrusage read in microseconds; os.times counts
    clock ticks (10 ms), which reads 0 for a short epoch."""
    try:
        import resource
    except ImportError:  # not POSIX
        t = os.times()
        return time.process_time() + t.children_user + t.children_system
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@dataclasses.dataclass(frozen=True)
class Timing:
    images: int
    wall: float
    cpu: float

    @property
    def per_second(self):
        return self.images / self.wall if self.wall > 0 else float("nan")

    @property
    def per_cpu_second(self):
        return self.images / self.cpu if self.cpu > 0 else float("nan")


def time_epoch(make_loader, min_seconds=0.0):
    """Run epochs of `make_loader()` (workers started and reaped inside each) until at least
    `min_seconds` have passed (one epoch at least), and time them together: a tiny tree's one
    epoch is too short for a clock to tell loaders apart."""
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    images = epochs = 0
    while epochs == 0 or time.perf_counter() - wall0 < min_seconds:
        epochs += 1
        loader = make_loader()
        for batch in loader:
            images += len(batch[1])
        del loader  # shuts the workers down, so their CPU time is counted
    return Timing(images, time.perf_counter() - wall0, cpu_seconds() - cpu0)

"""What every benchmark script shares: the sample tree, page-cache control, timing, reporting.

A benchmark is a list of `Candidate`s. `measure` warms each one up, then runs them interleaved
(A, B, C, A, B, C, ...) so that drift and other load hit all of them alike, timing wall seconds
and CPU seconds of the whole process tree (this process, its reaped children, such as the
converter's processes or DataLoader workers of a finished epoch, and its live ones, such as
persistent DataLoader workers). `report` prints a markdown table of the
medians, with the ratio of images per CPU-second to a baseline candidate, and writes it to
bench/results/<name>.md together with a bar plot, bench/results/<name>.png.
"""

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import mmap
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

from fastlmdb.cli.demo import cpu_seconds  # this process and its reaped children


IMAGES_DIR = "/work/shared/imagenet-sample"
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
JPEG_EXTENSIONS = (".jpeg", ".jpg")


# --- command line -------------------------------------------------------------------------

def parser(description, *, repeats, warmup=1):
    """An ArgumentParser with the options every script has."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="tiny inputs and one repeat: a smoke test that takes seconds")
    p.add_argument("--repeats", type=int, default=repeats,
                   help="timed runs per candidate, interleaved (default %(default)s)")
    p.add_argument("--warmup", type=int, default=warmup,
                   help="untimed runs per candidate first (default %(default)s)")
    p.add_argument("--name", help="results file name (default: the script's name, "
                                  "with -quick for --quick)")
    p.add_argument("--images-dir", default=IMAGES_DIR,
                   help="folder of sample JPEGs named <wnid>_<anything>.JPEG "
                        "(default %(default)s)")
    p.add_argument("--limit", type=int, help="use only the first N sample images")
    return p


def parse(p, argv, *, quick_limit):
    """Parse; --quick means the first `quick_limit` images, no replicas, one timed run."""
    args = p.parse_args(argv)
    if args.quick:
        args.limit, args.repeats = args.limit or quick_limit, 1
        if hasattr(args, "replicate"):
            args.replicate = 1
    return args


def add_tree_args(p, *, replicate):
    p.add_argument("--replicate", type=int, default=replicate,
                   help="copies of each sample image in the tree (default %(default)s)")
    p.add_argument("--symlink", action="store_true",
                   help="link to the samples instead of copying them (faster to set up, but "
                        "replicas share one file's page cache, so cold rows are not cold)")
    p.add_argument("--work-dir", help="where the temporary tree and databases go "
                                      "(default: a new folder under $TMPDIR or /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    p.add_argument("--reencode", type=int, metavar="Q",
                   help="re-encode every sample with PIL at JPEG quality Q first (4:2:0, "
                        "as FFCV stores them): every loader then reads the same JPEGs")
    p.add_argument("--mosaic", type=int, metavar="N",
                   help="large photos: image i becomes an N x N mosaic of samples i .. i + "
                        "N*N - 1, cells of 500 x 375, at quality --reencode (default 92)")


def command_line():
    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def result_name(args, script):
    return args.name or (f"{script}-quick" if args.quick else script)


# --- sample data --------------------------------------------------------------------------

def sample_files(images_dir, limit=None):
    """Sorted paths of the sample JPEGs (the first `limit` of them)."""
    names = sorted(n for n in os.listdir(images_dir) if n.lower().endswith(JPEG_EXTENSIONS))
    if not names:
        raise SystemExit(f"no JPEGs in {images_dir}; pass --images-dir")
    return [os.path.join(images_dir, n) for n in names[:limit]]


def make_tree(root, sources, replicate=1, symlink=False):
    """Lay `sources` out as root/train/<wnid>/<file> (xN replicas); returns the new paths."""
    paths = []
    for source in sources:
        name = os.path.basename(source)
        stem, ext = os.path.splitext(name)
        folder = os.path.join(root, "train", name.split("_")[0])
        os.makedirs(folder, exist_ok=True)
        for copy in range(replicate):
            path = os.path.join(folder, f"{stem}_r{copy}{ext}" if replicate > 1 else name)
            (os.symlink if symlink else shutil.copyfile)(source, path)
            paths.append(path)
    return paths


@contextlib.contextmanager
def work_dir(args):
    """A new temporary folder (under --work-dir if given), removed afterwards unless --keep."""
    path = tempfile.mkdtemp(prefix="fastlmdb-bench-", dir=args.work_dir)
    try:
        yield path
    finally:
        if args.keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def tree_from_args(args, root):
    """The sample tree the tree options ask for; returns its file paths."""
    sources = sample_files(args.images_dir, args.limit)
    if getattr(args, "mosaic", None) or getattr(args, "reencode", None):
        sources = prepared(sources, os.path.join(os.path.dirname(root), "prepared"),
                           args.reencode or 92, args.mosaic or 1)
    return make_tree(root, sources, args.replicate, args.symlink)


def prepared(sources, folder, quality, side=1, cell=(500, 375)):
    """Each source re-encoded by PIL at `quality` (``side`` > 1: as the first of `side`**2
    consecutive sources tiled into one photo of `cell`s), under `folder` with its name."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, source in enumerate(sources):
        if side == 1:
            with Image.open(source) as image:
                photo = image.convert("RGB")
        else:
            photo = Image.new("RGB", (cell[0] * side, cell[1] * side))
            for k in range(side * side):
                with Image.open(sources[(i + k) % len(sources)]) as tile:
                    photo.paste(tile.convert("RGB").resize(cell, Image.Resampling.BICUBIC),
                                (cell[0] * (k % side), cell[1] * (k // side)))
        path = os.path.join(folder, os.path.basename(source))
        photo.save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths


def read_bytes(path):
    with open(path, "rb") as file:
        return file.read()


def total_bytes(paths):
    return sum(os.path.getsize(p) for p in paths)


# --- page cache ---------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_MAP_FAILED = ctypes.c_void_p(-1).value


def _resident_pages(path):
    """(pages of `path` in the page cache, pages of `path`), from mincore(2)."""
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    if not size:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if address in (None, _MAP_FAILED):
        raise OSError(ctypes.get_errno(), f"mmap {path}")
    try:
        vector = ctypes.create_string_buffer(pages)
        if _libc.mincore(address, size, vector) != 0:
            raise OSError(ctypes.get_errno(), f"mincore {path}")
        return sum(b & 1 for b in vector.raw), pages
    finally:
        _libc.munmap(address, size)


def resident_fraction(paths):
    """Fraction of the pages of `paths` that are in the page cache (1.0: warm, 0.0: cold)."""
    resident = total = 0
    for path in paths:
        r, t = _resident_pages(path)
        resident, total = resident + r, total + t
    return resident / total if total else 1.0


def drop_cache(paths):
    """Evict `paths` from the page cache (no root needed): posix_fadvise(DONTNEED) per file.

    The kernel keeps pages that some process has mapped, so this process's own mappings of
    the file (an LMDB environment opened here) are unmapped first with madvise(DONTNEED),
    which for a read-only shared file mapping only drops page-table entries.
    """
    mapped = _own_mappings()
    for path in paths:
        for start, end in mapped.get(os.path.realpath(path), ()):
            _libc.madvise(start, end - start, mmap.MADV_DONTNEED)
        fd = os.open(path, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):
                os.fdatasync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _own_mappings():
    """{file path: [(start, end), ...]} of this process's read-only file mappings."""
    mapped = {}
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[1].startswith("r-") and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                mapped.setdefault(fields[5].rstrip("\n"), []).append((start, end))
    return mapped


def warm_cache(paths, chunk=8 << 20):
    """Read `paths` into the page cache if they are not all there already."""
    if resident_fraction(paths) > 0.999:
        return
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while file.read(chunk):
                pass


# --- measuring ----------------------------------------------------------------------------

_libc.clock_getcpuclockid.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.c_int))


def tree_cpu_seconds():
    """User + system CPU seconds so far of this process, its reaped children and the
    descendants still running (persistent DataLoader workers: getrusage counts a child only
    once it has exited and been waited for)."""
    import psutil

    live = psutil.Process().children(recursive=True)
    return cpu_seconds() + sum(_process_cpu(child) for child in live)


def tree_pss():
    """Bytes of PSS of this process and its live descendants: shared pages (the mapped
    database, shared memory) counted once across them, unlike RSS."""
    import psutil

    total = 0
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        with contextlib.suppress(Exception):  # psutil.NoSuchProcess: it has just gone
            total += process.memory_full_info().pss
    return total


def peak_pss(run, interval=0.1):
    """(what run() returned, the peak of tree_pss() while it ran), sampled every `interval`
    seconds by a thread. Reading smaps costs CPU: use it in an untimed run."""
    import threading

    peak, done = [tree_pss()], threading.Event()

    def sample():
        while not done.wait(interval):
            peak[0] = max(peak[0], tree_pss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        value = run()
    finally:
        done.set()
        sampler.join()
    return value, max(peak[0], tree_pss())


def _process_cpu(process):
    """CPU seconds of a live process, to the nanosecond (its CPU-time clock; psutil's figure
    counts clock ticks, 10 ms); 0 for one that has just gone."""
    clock = ctypes.c_int()
    if _libc.clock_getcpuclockid(process.pid, ctypes.byref(clock)) == 0:
        with contextlib.suppress(OSError):
            return time.clock_gettime(clock.value)
    try:
        times = process.cpu_times()
    except Exception:  # noqa: BLE001 - psutil.NoSuchProcess and friends: it is gone
        return 0.0
    return times.user + times.system


@dataclasses.dataclass
class Candidate:
    """One row: `run()` does the work once and returns how many images it handled."""
    label: str
    run: Callable[[], int]
    group: str = ""  # conditions shared by the rows compared with each other
    files: tuple = ()  # what run() reads; its page-cache state is measured before each run
    cache: Optional[str] = None  # "warm" or "cold": make `files` so before each run
    setup: Optional[Callable[[], None]] = None  # untimed, before each run
    info: dict = dataclasses.field(default_factory=dict)  # for extra columns

    @property
    def name(self):
        return f"{self.group} · {self.label}" if self.group else self.label


@dataclasses.dataclass(frozen=True)
class Run:
    images: int
    wall: float
    cpu: float
    cached: Optional[float]  # fraction of `files` in the page cache when the run started


@dataclasses.dataclass
class Result:
    candidate: Candidate
    runs: list

    def _median(self, values):
        return statistics.median(values) if values else float("nan")

    @property
    def images(self):
        return self._median([r.images for r in self.runs])

    @property
    def wall(self):
        return self._median([r.wall for r in self.runs])

    @property
    def cpu(self):
        return self._median([r.cpu for r in self.runs])

    @property
    def per_second(self):
        return self._median([r.images / r.wall for r in self.runs])

    @property
    def per_cpu_second(self):
        return self._median([r.images / r.cpu for r in self.runs])

    @property
    def spread(self):
        """(max - min) / median of images per CPU-second: how noisy the runs were."""
        rates = [r.images / r.cpu for r in self.runs]
        return (max(rates) - min(rates)) / self.per_cpu_second if rates else float("nan")

    @property
    def cached(self):
        values = [r.cached for r in self.runs if r.cached is not None]
        return self._median(values) if values else None


def run_once(candidate):
    if candidate.setup:
        candidate.setup()
    if candidate.cache == "cold":
        drop_cache(candidate.files)
    elif candidate.cache == "warm":
        warm_cache(candidate.files)
    cached = resident_fraction(candidate.files) if candidate.files else None
    gc.collect()
    wall, cpu = time.perf_counter(), tree_cpu_seconds()
    images = candidate.run()
    return Run(images, time.perf_counter() - wall, tree_cpu_seconds() - cpu, cached)


def measure(candidates, *, repeats, warmup):
    """Warm-up runs, then `repeats` interleaved rounds; one Result per candidate."""
    for round_ in range(warmup):
        for c in candidates:
            _progress(f"warm-up {round_ + 1}/{warmup}", c, run_once(c))
    runs = {id(c): [] for c in candidates}
    for round_ in range(repeats):
        for c in candidates:
            runs[id(c)].append(run_once(c))
            _progress(f"run {round_ + 1}/{repeats}", c, runs[id(c)][-1])
    return [Result(c, runs[id(c)]) for c in candidates]


def _progress(what, candidate, run):
    print(f"  {what:14} {candidate.name:60.60} {run.images / run.wall:9.0f} img/s "
          f"{run.images / run.cpu:9.0f} img/CPU-s", file=sys.stderr, flush=True)


# --- machine ------------------------------------------------------------------------------

def machine_info(work=None):
    """Lines describing the machine and the software, for the top of a report."""
    lines = [
        f"CPU: {_cpu_model()}, {os.cpu_count()} logical cores "
        f"({len(os.sched_getaffinity(0))} usable), {_mem_gb():.0f} GB RAM",
        f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"OS: {platform.platform()}",
        f"versions: {_versions()}",
        f"measuring {_fastlmdb()}",
    ]
    if work:
        lines.append(f"work folder {work} on {_filesystem(work)}")
    return lines


def _cpu_model():
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_gb():
    with open("/proc/meminfo") as meminfo:
        return int(meminfo.readline().split()[1]) / 2**20


def _versions():
    found = [f"python {platform.python_version()}"]
    for module in ("numpy", "torch", "torchvision", "simplejpeg", "lmdb", "PIL", "turbojpeg",
                   "cv2"):
        version = module_version(module)
        if version:
            found.append(f"{module} {version}")
    import multiprocessing

    found.append(f"multiprocessing start method {multiprocessing.get_start_method()}")
    return ", ".join(found)


def _fastlmdb():
    """Which fastlmdb is measured: version, folder and git revision (the tree may be dirty)."""
    import fastlmdb

    folder = os.path.dirname(os.path.dirname(os.path.abspath(fastlmdb.__file__)))
    git = subprocess.run(["git", "-C", folder, "describe", "--always", "--dirty"],
                         capture_output=True, text=True)
    revision = f", git {git.stdout.strip()}" if git.returncode == 0 else ""
    return f"fastlmdb {fastlmdb.__version__} from {folder}{revision}"


def module_version(module):
    """The module's version string, or None when it does not import."""
    try:
        imported = __import__(module)
    except Exception:  # noqa: BLE001 - a broken install is as good as a missing one here
        return None
    version = getattr(imported, "__version__", "?")
    if module == "lmdb":
        version += f" (LMDB {'.'.join(map(str, imported.version()))})"
    return version


def _filesystem(path):
    best = ("", "?", "?")
    with open("/proc/mounts") as mounts:
        for line in mounts:
            device, point, kind = line.split()[:3]
            if os.path.realpath(path).startswith(point) and len(point) > len(best[0]):
                best = (point, kind, device)
    return f"{best[1]} ({best[2]} at {best[0]})"


# --- reporting ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Column:
    """An extra column: `value(result)` -> text."""
    header: str
    value: Callable


def report(name, results, *, baseline, title, info=(), columns=(), notes=()):
    """Print the markdown table and write results/<name>.md and results/<name>.png."""
    text = "\n".join([f"# {title}", "", f"`{command_line()}`", "",
                      *[f"- {line}" for line in info], "",
                      *table(results, baseline, columns), "",
                      *[f"- {note}" for note in _notes(results, baseline, notes)]]) + "\n"
    print("\n" + text)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, f"{name}.md"), "w") as out:
        out.write(text)
    try:
        plot(results, baseline, title, os.path.join(RESULTS_DIR, f"{name}.png"))
    except ImportError as exc:  # matplotlib is only for the picture
        print(f"no plot ({exc})")
    print(f"wrote {os.path.relpath(os.path.join(RESULTS_DIR, name))}.md (and .png with "
          "matplotlib)")


def _notes(results, baseline, notes):
    cached = any(r.cached is not None for r in results)
    return [
        "Medians of the timed runs. img/CPU-s: images per CPU-second of the whole process "
        "tree (user + system of this process, its reaped children and its live ones, such as "
        "persistent DataLoader workers); it moves little when other load shares the machine, "
        "unlike img/s (wall).",
        f"vs baseline: img/CPU-s over that of `{baseline}` in the same group "
        "(or in the first group that has it). spread: (max - min) / median of img/CPU-s.",
        *(["cached: fraction of the files the row reads that were in the page cache when a "
           "run started (warm 100%, cold ~0%)."] if cached else []),
        *notes,
        f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]


def table(results, baseline, columns=()):
    """Markdown lines: one row per result."""
    groups = any(r.candidate.group for r in results)
    cached = any(r.cached is not None for r in results)
    head = [*(["group"] if groups else []), "candidate", "images", "img/s", "img/CPU-s",
            "vs baseline", "spread", *(["cached"] if cached else []),
            *(c.header for c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        base = baseline_of(r, results, baseline)
        cells = [*([r.candidate.group] if groups else []), r.candidate.label,
                 f"{r.images:.0f}", f"{r.per_second:,.0f}", f"{r.per_cpu_second:,.0f}",
                 _ratio(r.per_cpu_second, base.per_cpu_second if base else None),
                 f"{r.spread:.0%}", *([_percent(r.cached)] if cached else []),
                 *(c.value(r) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def baseline_of(result, results, label):
    """The result labelled `label` in `result`'s group, else the first one so labelled."""
    same = [r for r in results if r.candidate.label == label]
    in_group = [r for r in same if r.candidate.group == result.candidate.group]
    return (in_group or same or [None])[0]


def _ratio(value, base):
    return f"{value / base:.2f}x" if base else "-"


def _percent(fraction):
    return "-" if fraction is None else f"{fraction:.0%}"


def plot(results, baseline, title, path):
    """Horizontal bars of images per CPU-second; baseline rows in a second colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.candidate.name for r in results][::-1]
    values = [r.per_cpu_second for r in results][::-1]
    colours = ["tab:orange" if r.candidate.label == baseline else "tab:blue"
               for r in results][::-1]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.38 * len(results)))
    ax.barh(names, values, color=colours)
    for y, value in enumerate(values):
        ax.text(value, y, f" {value:,.0f}", va="center", fontsize=8)
    ax.set_xlabel("images per CPU-second of the whole process tree (median; higher is better)")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

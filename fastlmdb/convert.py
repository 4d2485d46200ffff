"""Convert an ImageFolder split into one LMDB file: producers -> bounded queue -> one writer.

The coordinator (the calling process) scans the tree, hands the producers chunks of files in
source order, never more than a fixed window ahead of the writer (so memory stays bounded
whatever the dataset size), relays progress, and watches every child: a producer or writer that
dies fails the run within a second instead of hanging it. The database is written as
``<split>.lmdb.partial`` under an exclusive lock and renamed when complete; running the same
command again after any interruption resumes after the last committed transaction.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import multiprocessing
import os
import queue
import signal
import time
import zlib

from fastlmdb import children, folder, prepare
from fastlmdb import format as fmt
from fastlmdb.errors import ConversionError
from fastlmdb.writer import Job, writer_main

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
CHUNK = 16  # files per task: small enough to balance, large enough to amortise messages
POLL_SECONDS = 0.25


def default_procs():
    return len(os.sched_getaffinity(0))


@dataclasses.dataclass(frozen=True)
class Options:
    from_dir: str
    to_dir: str
    split: str
    save_as: str = "jpeg"
    procs: int = dataclasses.field(default_factory=default_procs)
    on_error: str = "raise"
    overwrite: bool = False
    max_pixels: int = prepare.DEFAULT_MAX_PIXELS
    max_size: int = 0  # re-encode images whose longer side is larger; 0: keep all as they are
    quality: int = 90  # JPEG quality of those re-encoded images
    batch_bytes: int = 64 << 20
    map_size: int = 16 << 30  # virtual reservation only; grows by doubling when full


@dataclasses.dataclass(frozen=True)
class Stats:
    path: str
    images: int
    skipped: list
    transcoded: list
    bytes_in: int
    bytes_out: int
    seconds: float
    resumed_at: int  # source files already done when this run started


def convert(options, on_progress=None):
    """Convert one split; returns Stats. `on_progress(done, total, bytes_in)` is optional."""
    _validate(options)
    scan = folder.scan(os.path.join(options.from_dir, options.split))
    final = fmt.db_path(options.to_dir, options.split)
    if os.path.exists(final) and not options.overwrite:
        raise ConversionError(f"{final} already exists; pass --overwrite to replace it "
                              "(the old one stays until the new one is complete)")
    os.makedirs(options.to_dir, exist_ok=True)
    partial = fmt.partial_path(final)
    started = time.monotonic()
    with _exclusive(partial):
        pipeline = _Pipeline(options, scan, partial, on_progress)
        info = pipeline.run()
        os.replace(partial, final)
    return Stats(final, info["count"], info["skipped"], info["transcoded"], info["bytes_in"],
                 os.path.getsize(final), time.monotonic() - started, pipeline.resumed_at)


def _validate(o):
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


@contextlib.contextmanager
def _exclusive(partial):
    with open(partial, "ab") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConversionError(f"another conversion is writing {partial}; "
                                  "wait for it to finish or stop it first") from None
        yield


def plan_of(options, scan):
    """What a resumed run must agree on: everything that changes the stored records."""
    digest = hashlib.sha256()
    for path, label in zip(scan.paths, scan.labels.tolist()):
        digest.update(os.path.relpath(path, scan.root).encode("utf-8", "surrogateescape"))
        digest.update(b"\0%d\0" % label)
    return {"source": os.path.abspath(scan.root), "split": options.split,
            "save_as": options.save_as, "max_pixels": options.max_pixels,
            "max_size": options.max_size, "quality": options.quality,
            "files": len(scan), "files_sha256": digest.hexdigest()}


class _Pipeline:
    def __init__(self, options, scan, partial, on_progress):
        self.options, self.scan, self.on_progress = options, scan, on_progress
        self.partial = partial
        self.plan = plan_of(options, scan)
        self.window = (2 * options.procs + 2) * CHUNK
        ctx = multiprocessing.get_context("spawn")
        self.tasks, self.status = ctx.Queue(), ctx.Queue()
        # Kept on self: Process.start() drops its reference to its arguments.
        self.results = results = ctx.Queue(maxsize=2 * options.procs + 2)
        job = Job(partial, self.plan, scan.labels, scan.classes, options.on_error,
                  options.batch_bytes, options.map_size, options.overwrite)
        self.writer = ctx.Process(target=writer_main,
                                  args=(job, results, self.status, os.getpid()),
                                  name="fastlmdb-writer")
        self.producers = [
            ctx.Process(target=producer_main, name=f"fastlmdb-producer-{i}",
                        args=(self.tasks, results, _settings(options), os.getpid()))
            for i in range(options.procs)]
        self.resumed_at = 0

    def run(self):
        for process in [self.writer, *self.producers]:
            process.start()
        try:
            return self._drive()
        finally:
            self._stop()

    def _drive(self):
        kind, *args = self._next_message()
        if kind != "start":
            self._fail(kind, args)
        self.resumed_at, stored = args
        if self.resumed_at:
            log.info("resuming %s: %d files done, %d records stored",
                     self.plan["source"], self.resumed_at, stored)
        done = dispatched = self.resumed_at
        total = len(self.scan)
        while True:
            while dispatched < total and dispatched - done < self.window:
                self.tasks.put((dispatched, self.scan.paths[dispatched:dispatched + CHUNK]))
                dispatched += CHUNK
            kind, *args = self._next_message()
            if kind == "advance" and self.on_progress:
                self.on_progress(args[0] - self.resumed_at, total - self.resumed_at, args[2])
            if kind == "advance":
                done = args[0]
            elif kind == "done":
                return args[0]
            elif kind != "committed":
                self._fail(kind, args)

    def _next_message(self):
        while True:
            try:
                message = self.status.get(timeout=POLL_SECONDS)
            except queue.Empty:
                self._check_children([self.writer, *self.producers])
            else:
                # Producers exit only when told to: a dead one is noticed at once, even while
                # the others keep the messages coming.
                self._check_children(self.producers)
                return message

    def _check_children(self, processes):
        for process in processes:
            if process.exitcode is not None:
                if process is self.writer and not self.status.empty():
                    return  # what it said just before exiting ("done", "bad") comes first
                raise ConversionError(
                    f"{process.name} (pid {process.pid}) died: {_exit_reason(process.exitcode)}. "
                    f"Committed work is kept in {self.partial}: run the same "
                    "command again to resume")

    def _fail(self, kind, args):
        if kind == "bad":
            path, reason = args
            raise ConversionError(f"{path}: {reason}. Pass --on-error skip to leave such files "
                                  "out; run the same command again to resume")
        if kind == "mismatch":
            raise ConversionError(_mismatch_message(args[0], self.plan, self.partial))
        raise ConversionError(args[0])

    def _stop(self):
        for _ in self.producers:
            self.tasks.put(None)
        for process in [self.writer, *self.producers]:
            process.join(timeout=POLL_SECONDS)
            if process.is_alive():
                process.terminate()
                process.join()


def _settings(options):
    return prepare.Settings(options.save_as, options.max_pixels, options.max_size,
                            options.quality)


def producer_main(tasks, results, settings, coordinator):
    """Process entry point: prepare chunks of files until the None sentinel."""
    children.detach(coordinator)
    while (task := tasks.get()) is not None:
        start, paths = task
        results.put(("chunk", start, [_entry(path, settings) for path in paths]))


def _entry(path, settings):
    try:
        record = prepare.prepare(path, settings)
    except Exception as exc:  # noqa: BLE001 - any failure is this file's, reported as data
        return {"path": path, "error": str(exc) or type(exc).__name__}
    # Unchanged source bytes are not sent: the writer reads the file again from the page cache
    # (measured 3x cheaper than pickling 110 KB through a pipe) and checks the checksum.
    unchanged = settings.imgtype == "jpeg" and not (record.transcoded or record.resized)
    return {"path": path, "payload": None if unchanged else record.payload,
            "height": record.height, "width": record.width, "crc32": zlib.crc32(record.payload),
            "source_bytes": record.source_bytes, "transcoded": record.transcoded,
            "resized": record.resized}


def _exit_reason(code):
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit status {code}"


_FLAGS = {"source": "--from_dir", "split": "--split", "save_as": "--save-as",
          "max_pixels": "--max-pixels", "max_size": "--max-size", "quality": "--quality"}


def _mismatch_message(old, new, partial):
    for name, flag in _FLAGS.items():
        if old.get(name) != new.get(name):
            return (f"{partial} was started with {flag} {old.get(name)}, this run asks for "
                    f"{new.get(name)}: rerun with the same arguments to resume, or pass "
                    "--overwrite to start again")
    return (f"the source files changed since {partial} was started ({old.get('files')} files "
            f"then, {new.get('files')} now): pass --overwrite to start again")

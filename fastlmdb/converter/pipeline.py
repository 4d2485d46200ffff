"""The local conversion of one database: producer processes -> pipes -> one writer process.

The coordinator (the calling process) hands the producers chunks of files in write order,
never more than a fixed window ahead of the writer (so memory stays bounded whatever the
dataset size), relays progress, and watches every child. Each producer has its own task pipe
and chunk pipe (one chunk in flight: a bounded queue per producer), so a producer that dies
breaks nothing shared: its chunks go to the others and the file it was preparing is blamed.
A writer that dies, or the last producer, fails the run within a second instead of hanging it.
"""

import dataclasses
import hashlib
import logging
import multiprocessing
import os
import queue
import signal
import traceback
import zlib

import numpy as np

from fastlmdb.converter import children, prepare
from fastlmdb.converter.writer import Job, storage_message, writer_main
from fastlmdb.sources import archive, refs, stream
from fastlmdb.sources.refs import Ref
from fastlmdb.core import format as fmt
from fastlmdb.core.errors import ConversionError, ImageError

log = logging.getLogger(__name__)

CHUNK = 16  # files per task: small enough to balance, large enough to amortise messages
POLL_SECONDS = 0.25


def run(options, inputs, partial, plan, settings, on_progress=None, positions=None):
    """Convert `inputs` (in write order; `positions`: the files' positions in the split's listing)
    into the database at `partial`; returns (info, files done before)."""
    pipeline = _Pipeline(options, inputs, partial, plan, settings, on_progress, positions)
    return pipeline.run(), pipeline.resumed_at


def plan_of(options, inputs):
    """What a resumed run must agree on: everything that changes the stored records."""
    digest = hashlib.sha256()
    for path, label in zip(inputs.paths, inputs.labels.tolist()):
        if isinstance(path, Ref):  # its name and place in its container
            digest.update(path.identity())
        else:
            digest.update(os.path.relpath(path, inputs.root).encode("utf-8", "surrogateescape"))
        digest.update(b"\0%d\0" % label)
    o = options
    source = inputs.root if "://" in inputs.root else os.path.abspath(inputs.root)
    return fmt.make_plan(source, len(inputs), digest.hexdigest(),
                         split=o.split, save_as=o.save_as, max_pixels=o.max_pixels,
                         max_size=o.max_size, quality=o.quality, check_decode=o.check_decode,
                         order=o.order, order_seed=o.order_seed)


def in_write_order(inputs, options):
    """(the input files in the order they are written, their positions in `inputs`)."""
    if options.order == fmt.ARCHIVE_ORDER:  # a compressed tar's members, in stream order
        positions = stream.stream_order(inputs.paths)
    elif options.order == fmt.GROUPS_ORDER:  # parquet rows, a row group at a time
        numbers = {}
        positions = fmt.grouped_write_order(
            [numbers.setdefault(path.group(), len(numbers)) for path in inputs.paths],
            options.order_seed)
    else:
        positions = fmt.write_order(len(inputs), options.order, options.order_seed)
    if options.order == "source":
        return inputs, positions
    paths = [inputs.paths[i] for i in positions.tolist()]
    return dataclasses.replace(inputs, paths=paths, labels=inputs.labels[positions]), positions


def writer_job(options, inputs, partial, plan, positions=None):
    """What the writer needs to make the database at `partial` from `inputs` (in write order)."""
    return Job(partial, plan, inputs.labels, inputs.classes, options.on_error, options.batch_bytes,
               options.map_size, options.overwrite, positions, _names(inputs))


def _names(inputs):
    """The inputs's files relative to its folder (an archive's: the members' names), as
    fmt.join_paths joins them."""
    prefix = os.path.join(inputs.root, "")
    return fmt.join_paths(str(path) if isinstance(path, Ref)
                          else path[len(prefix):] if path.startswith(prefix)
                          else os.path.relpath(path, inputs.root) for path in inputs.paths)


class _Pipeline:
    def __init__(self, options, inputs, partial, plan, settings, on_progress, positions):
        self.options, self.inputs, self.on_progress = options, inputs, on_progress
        self.partial, self.plan = partial, plan
        self.window = 2 * options.procs + 2  # tasks handed out ahead of the writer
        self.bounds = task_bounds(inputs.paths)
        ctx = multiprocessing.get_context("spawn")
        self.status = ctx.Queue()
        # Two pipes per producer, tasks in and chunks out, nothing shared between producers:
        # one killed mid-message (or holding a shared queue's lock) would break the others.
        # A chunk pipe holds at most one chunk in flight, so memory stays bounded.
        self.pipes = [ctx.Pipe(duplex=False) for _ in range(options.procs)]
        self.task_pipes = [ctx.Pipe(duplex=False) for _ in range(options.procs)]
        # Per producer: the chunk it is working on and the file it is preparing (-1: none),
        # so that a death can be pinned on a file and its chunk given to another producer.
        self.slots = ctx.RawArray("q", [-1] * (2 * options.procs))
        job = writer_job(options, inputs, partial, plan, positions)
        self.writer = ctx.Process(
            target=writer_main, name="fastlmdb-writer",
            args=(job, [receive for receive, _ in self.pipes], self.status, os.getpid()))
        self.producers = [
            ctx.Process(target=producer_main, name=f"fastlmdb-producer-{i}",
                        args=(tasks, send, settings, os.getpid(), self.slots, i, inputs.setup))
            for i, ((_, send), (tasks, _)) in enumerate(zip(self.pipes, self.task_pipes))]
        self.live = list(self.producers)
        self.assigned = {producer: [] for producer in self.producers}  # (start, end) of tasks
        self.done = self.resumed_at = 0
        # A compressed tar is read here, in order; a chunk's bytes go with its task and are
        # kept until the writer has the chunk (a dead producer's chunk is sent again).
        self.archive_reader = (stream.InOrderShards() if archive.in_order_only(inputs.paths)
                               else None)
        self.chunk_bytes = {}

    def run(self):
        for process in [self.writer, *self.producers]:
            process.start()
        for receive, send in self.pipes:  # the children hold them now: EOF reaches the writer
            receive.close()
            send.close()
        for receive, _ in self.task_pipes:
            receive.close()
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
        self.done = dispatched = self.resumed_at
        total = len(self.inputs)
        while True:
            while dispatched < total and self._ahead() < self.window:
                dispatched = self._dispatch(dispatched)
            kind, *args = self._next_message()
            if kind == "advance" and self.on_progress:
                self.on_progress(args[0] - self.resumed_at, total - self.resumed_at, args[2])
            if kind == "advance":
                self.done = args[0]
            elif kind == "done":
                return args[0]
            else:
                self._fail(kind, args)

    def _next_message(self):
        while True:
            try:
                message = self.status.get(timeout=POLL_SECONDS)
            except queue.Empty:
                self._check_children([self.writer, *self.live])
            else:
                # Producers exit only when told to: a dead one is noticed at once, even while
                # the others keep the messages coming.
                self._check_children(self.live)
                return message

    def _check_children(self, processes):
        for process in list(processes):  # _replace() edits self.live
            if process.exitcode is None:
                continue
            if process is not self.writer:
                self._replace(process)
            elif self.status.empty():  # what it said just before exiting comes first
                raise ConversionError(
                    f"{process.name} (pid {process.pid}) died: {_exit_reason(process.exitcode)}. "
                    f"Committed work is kept in {self.partial}: run the same "
                    "command again to resume")

    def _ahead(self):
        """Tasks handed out that the writer has not taken whole yet."""
        for tasks in self.assigned.values():
            tasks[:] = [(s, e) for s, e in tasks if e > self.done]
        return sum(len(tasks) for tasks in self.assigned.values())

    def _dispatch(self, start, poison=None):
        """Give the task at `start` to the live producer with the fewest tasks not yet taken
        by the writer; returns where the task ends."""
        end = task_end(self.bounds, start, len(self.inputs))
        self._ahead()
        producer = min(self.live, key=lambda p: len(self.assigned[p]))
        self.assigned[producer].append((start, end))
        task = (start, self.inputs.paths[start:end], poison or {}, self._chunk_bytes(start, end))
        try:
            self.task_pipes[self.producers.index(producer)][1].send(task)
        except OSError:  # it died since the last look: its chunks, this one too, move on
            producer.join(timeout=POLL_SECONDS)
            self._replace(producer)
        return end

    def _chunk_bytes(self, start, end):
        """The bytes of the task [start, end) of a compressed tar (None: producers read it)."""
        if self.archive_reader is None:
            return None
        for taken in [s for s in self.chunk_bytes if s + CHUNK <= self.done]:
            del self.chunk_bytes[taken]
        if start not in self.chunk_bytes:
            self.chunk_bytes[start] = self.archive_reader.read(self.inputs.paths[start:end])
        return self.chunk_bytes[start]

    def _replace(self, producer):
        """A producer died (a decoder crash, the OOM killer): blame the file it was preparing
        and give every chunk the writer has not yet taken to the others."""
        self.live.remove(producer)
        reason = _exit_reason(producer.exitcode)
        i = self.producers.index(producer)
        chunk, current = self.slots[2 * i], self.slots[2 * i + 1]
        if not self.live:
            raise ConversionError(
                f"every producer process died (the last: {reason}"
                + (f", while preparing {self.inputs.paths[current]}" if current >= 0 else "")
                + f"). Committed work is kept in {self.partial}: run the same command again "
                "to resume")
        log.warning("%s died (%s); its work goes to the others", producer.name, reason)
        poison = {current: f"the converter's producer process died ({reason}) while preparing "
                           "this file"} if current >= 0 else {}
        for start, end in self.assigned.pop(producer):  # a duplicate delivery is ignored
            if end > self.done:
                self._dispatch(start, poison if start == chunk else None)

    def _fail(self, kind, args):
        raise failure(kind, args, self.plan, self.partial, self.inputs.paths)

    def _stop(self):
        if self.archive_reader is not None:
            self.archive_reader.close()
        for producer in self.live:
            try:
                self.task_pipes[self.producers.index(producer)][1].send(None)
            except OSError:  # it is dying too
                pass
        for process in [self.writer, *self.producers]:
            process.join(timeout=POLL_SECONDS)
            if process.is_alive():
                process.terminate()
                process.join()


def task_bounds(paths):
    """Where tasks start and end for refs read a group at a time (a parquet row group): at
    each change of group, so that one producer reads each group once; None: every CHUNK."""
    if not paths or not isinstance(paths[0], Ref) or paths[0].group() is None:
        return None
    groups = [path.group() for path in paths]
    changes = [k for k in range(1, len(groups)) if groups[k] != groups[k - 1]]
    return np.asarray([0, *changes, len(groups)], dtype=np.int64)


def task_end(bounds, start, total):
    """The end of the task starting at `start` (a resumed run may start inside a group)."""
    if bounds is None:
        return min(start + CHUNK, total)
    return int(bounds[np.searchsorted(bounds, start, side="right")])


def producer_main(tasks, results, settings, coordinator, slots, i, setup=None):
    """Process entry point: prepare tasks of files until the None sentinel, sent to the writer
    in chunks of at most CHUNK (a row group's task may be long). `setup`: what the listing
    needs run in each reading process first (a Python dataset to install), or None."""
    children.detach(coordinator)
    if setup is not None:
        setup()
    while (task := tasks.recv()) is not None:
        start, paths, poison, data = task
        slots[2 * i] = start
        for first in range(0, len(paths), CHUNK):
            entries = []
            for k in range(first, min(first + CHUNK, len(paths))):
                slots[2 * i + 1] = start + k
                entries.append({"path": paths[k], "error": poison[start + k]}
                               if start + k in poison
                               else entry(paths[k], settings, None if data is None else data[k]))
            results.send(("chunk", start + first, entries))
        slots[2 * i + 1] = -1
        slots[2 * i] = -1


def entry(path, settings, data=None):
    """What a producer sends the writer about one file (whose bytes are `data`, when the
    coordinator read them): the record, or why there is none."""
    label = None
    try:
        if data is None and isinstance(path, Ref):
            data, label = path.read_labelled()
        record = prepare.prepare(path, settings, data)
    except ImageError as exc:  # this file is bad: reported as data, skipped or fatal
        return {"path": path, "error": str(exc)}
    except Exception:  # noqa: BLE001 - not a bad file but a bug: it stops the run, named
        return {"path": path, "bug": traceback.format_exc()}
    # Unchanged source bytes are not sent: the writer reads the file again from the page cache
    # (measured 3x cheaper than pickling 110 KB through a pipe) and checks the checksum; not
    # where reading again means inflating again (a deflated zip member).
    unchanged = settings.imgtype == "jpeg" and not (record.transcoded or record.resized)
    ref = isinstance(path, Ref)
    reread = unchanged and (not ref or path.rereadable())
    # A zip member's CRC-32 was checked on reading: it is the checksum of unchanged bytes.
    crc = path.known_crc() if unchanged and ref else None
    found = {} if label is None else {"label": label}  # else the listing's
    return {**found, "path": path, "payload": None if reread else record.payload,
            "height": record.height, "width": record.width,
            "crc32": zlib.crc32(record.payload) if crc is None else crc,
            "source_bytes": record.source_bytes, "transcoded": record.transcoded,
            "resized": record.resized, "warning": record.warning}


def _exit_reason(code):
    if code is None:
        return "gone, exit status unknown"
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit status {code}"


def failure(kind, args, plan, partial, paths):
    """The ConversionError for the writer's last word `kind` (bad, mismatch, storage, fatal);
    `paths` are the database's source files."""
    if kind == "bad":
        path, reason = args
        path = refs.describe(path)
        return ConversionError(f"{path}: {reason}. Pass --on-error skip to leave such files "
                               "out; run the same command again to resume")
    if kind == "mismatch":
        return ConversionError(mismatch_message(args[0], plan, partial))
    if kind == "storage":
        return ConversionError(storage_message(args[0], paths))
    return ConversionError(args[0])


_FLAGS = {"source": "--from_dir/--from-archive", "split": "--split", "save_as": "--save-as",
          "max_pixels": "--max-pixels", "max_size": "--max-size", "quality": "--quality",
          "check_decode": "--check-decode", "order": "--order", "order_seed": "--order-seed",
          "shards": "--shards"}
_SWITCHES = {"check_decode"}  # flags without a value: absent from a plan when off
_ABSENT = {"order": "source"}  # what a plan without the entry was made with


def mismatch_message(old, new, partial):
    """Which flag differs between the plan a partial database was started with and this run's."""
    for name, flag in _FLAGS.items():
        then, now = old.get(name, _ABSENT.get(name)), new.get(name, _ABSENT.get(name))
        if name in _SWITCHES:
            then, now = ("on" if value else "off" for value in (then, now))
        if then != now:
            return (f"{partial} was started with {flag} {then}, this run asks for "
                    f"{now}: rerun with the same arguments to resume, or pass "
                    "--overwrite to start again")
    return (f"the source files changed since {partial} was started ({old.get('files')} files "
            f"then, {new.get('files')} now): pass --overwrite to start again")

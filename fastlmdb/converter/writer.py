"""The writer process: the one owner of the LMDB environment during a conversion.

It receives chunks of prepared records from the producers, puts them back in write order
(the physical order of keys: fmt.write_order, ImageFolder's order or a seeded shuffle of it),
commits them in transactions of about `batch_bytes`, records in the same transaction how far
it got (so a stopped run resumes exactly there), and writes the final metadata last.
Everything it has to say travels to the coordinator as messages on `status`.
"""

import dataclasses
import time
import traceback
import zlib
from multiprocessing import connection

import lmdb
import numpy as np

from fastlmdb.version import __version__
from fastlmdb.converter import children, prepare
from fastlmdb.core import store
from fastlmdb.sources.refs import source_size
from fastlmdb.core import format as fmt
from fastlmdb.core.errors import DatabaseError, ImageError


@dataclasses.dataclass
class Job:
    partial: str
    plan: dict
    labels: np.ndarray
    classes: list
    on_error: str
    batch_bytes: int
    map_size: int
    overwrite: bool = False  # a partial database made with other arguments is started again
    # Position in the whole split's listing of each file, in write order (None: first_source +
    # position, the source order); the files (`labels`) come in write order.
    positions: np.ndarray = None
    names: bytes = b""  # fmt.join_paths of the files relative to the split folder, write order


def writer_main(job, results, status, coordinator):
    """Process entry point. Never raises: failures are reported on `status`."""
    children.detach(coordinator)
    try:
        _Writer(job, status).run(results)
    except _PlanMismatch as exc:
        status.put(("mismatch", exc.old_plan))
    except _StorageError as exc:
        status.put(("storage", exc.report))
    except _Fatal as exc:
        status.put(("fatal", str(exc)))
    except DatabaseError as exc:  # the partial database is damaged (cut short by a move?)
        status.put(("fatal", f"{exc}; or delete {job.partial} to convert from the start"))
    except Exception:  # noqa: BLE001 - reported to the coordinator, which raises
        status.put(("fatal", f"the writer process failed:\n{traceback.format_exc()}"))


def write_inline(job, paths, chunk_entries, chunk):
    """Prepare and write in this process (a shard converted on a cluster worker): the same
    records and transactions as the pipeline. `chunk_entries(some_paths)` prepares one chunk.
    Returns (files done before this run, the last message: done, bad, mismatch or storage)."""
    status = _LastWord()
    try:
        writer = _Writer(job, status)
    except _PlanMismatch as exc:
        return 0, ("mismatch", exc.old_plan)
    resumed_at = writer.progress["next_source"]
    try:
        while not writer.complete:
            start = writer.progress["next_source"]
            if not writer.take_chunk(chunk_entries(paths[start:start + chunk])):
                break
        else:
            writer.finish()
    except _StorageError as exc:
        return resumed_at, ("storage", exc.report)
    except _Fatal as exc:
        return resumed_at, ("fatal", str(exc))
    finally:
        writer.close()
    return resumed_at, status.last


class _LastWord:
    """A status channel that keeps only the last message."""

    last = None

    def put(self, message):
        self.last = message


class _Writer:
    def __init__(self, job, status):
        self.job, self.status = job, status
        self.db = store.Writer(job.partial, map_size=job.map_size)
        try:
            self.progress = self._resume_progress()
        except _PlanMismatch:
            self.db.close()  # in-process callers may open this file again
            raise
        self.rows = [self.db.all_rows()]
        self.payloads, self.pending_rows, self.batch_bytes = [], [], 0
        self.first = self.progress["stored"]
        self.committed_source = self.progress["next_source"]  # source files safely written
        # A shard's records keep their positions in the whole split's listing.
        first_source = job.plan.get("shard", {}).get("first_source", 0)
        self.positions = (job.positions if job.positions is not None
                        else np.arange(first_source, first_source + len(job.labels)))

    def _resume_progress(self):
        plan = self.db.read_meta(fmt.PLAN_KEY)
        if plan is not None and plan != self.job.plan and self.job.overwrite:
            self.db.clear()
            plan = None
        self.plan_saved = plan is not None
        if plan is None:
            return fmt.new_progress(time.time())
        if plan != self.job.plan:
            raise _PlanMismatch(plan)
        return fmt.check_progress(self.db.read_meta(fmt.PROGRESS_KEY), self.job.partial)

    def run(self, results):
        p = self.progress
        self.status.put(("start", p["next_source"], p["stored"]))
        pending, inputs = {}, list(results)
        while not self.complete:
            for start, entries in _receive(inputs):
                if start >= p["next_source"]:  # a chunk sent again after a death comes twice
                    pending.setdefault(start, entries)
            while p["next_source"] in pending:
                if not self.take_chunk(pending.pop(p["next_source"])):
                    return
        self.finish()

    @property
    def complete(self):
        # next_source counts files in write order (the name predates the shuffled order).
        return self.progress["next_source"] >= len(self.job.labels)

    def take_chunk(self, entries):
        """Add the next chunk in write order; False if a bad file stopped the run."""
        p = self.progress
        if not self._take(entries):
            self._commit()
            # Only now: the coordinator stops this process soon after reading it.
            self.status.put(("bad", *self.bad))
            return False
        self.status.put(("advance", p["next_source"], p["stored"], p["bytes_in"]))
        if self.batch_bytes >= self.job.batch_bytes:
            self._commit()
        return True

    def _take(self, entries):
        """Add one chunk to the open batch; False if a bad file must stop the run."""
        p = self.progress
        for entry in entries:
            source = p["next_source"]
            if entry.get("bug"):
                raise _Fatal(f"preparing {entry['path']} failed with an unexpected error, a bug "
                             "in fastlmdb or a library it uses (please report it with this "
                             f"traceback); committed work is kept in {self.job.partial}:\n"
                             f"{entry['bug']}")
            if not entry.get("error") and entry["payload"] is None:
                entry["payload"], entry["error"] = _reread(entry)
            if entry.get("error"):
                if self.job.on_error == "raise":
                    self.bad = (entry["path"], entry["error"])
                    return False
                p["skipped"].append([entry["path"], entry["error"]])
                p.setdefault("skipped_at", []).append(int(self.positions[source]))
            else:
                self._add(source, entry)
            p["next_source"] = source + 1
        return True

    def _add(self, source, entry):
        p, payload = self.progress, entry["payload"]
        p["resized"] += entry["resized"]
        if entry["transcoded"]:
            p["transcoded"].append([p["stored"], entry["path"], entry["transcoded"]])
        if entry.get("warning"):
            p["warnings"].append([p["stored"], entry["path"], entry["warning"]])
        self.payloads.append(payload)
        label = entry.get("label", self.job.labels[source])  # a Python dataset's: its item's
        self.pending_rows.append((label, entry["height"], entry["width"],
                                  len(payload), entry["crc32"], self.positions[source],
                                  _changed(entry)))
        p["stored"] += 1
        p["bytes_in"] += entry["source_bytes"]
        self.batch_bytes += len(payload)

    def _commit(self):
        rows = np.array(self.pending_rows, dtype=fmt.ROW)
        meta = {fmt.PROGRESS_KEY: self.progress}
        if not self.plan_saved:
            meta[fmt.PLAN_KEY] = self.job.plan
            self.plan_saved = True
        self._write(self.payloads, rows, meta)
        self.rows.append(rows)
        self.first = self.progress["stored"]
        self.committed_source = self.progress["next_source"]
        self.payloads, self.pending_rows, self.batch_bytes = [], [], 0

    def _write(self, payloads, rows, meta):
        try:
            self.db.commit(self.first, payloads, rows, meta)
        except lmdb.Error as exc:
            raise _StorageError(self._storage_report(exc, rows)) from None

    def _storage_report(self, exc, pending_rows):
        """What storage_message needs, in the coordinator, which knows the source files."""
        records = np.concatenate([*self.rows, pending_rows])["nbytes"]
        source_bytes = self.progress["bytes_in"]  # of the same records, pending ones included
        return {"partial": self.job.partial, "error": str(exc), "committed": self.first,
                "written": self.db.committed_bytes,
                "next_file": self.committed_source,
                "file_bytes_per_source_byte": (_file_bytes(records, self.db.page_size)
                                               / source_bytes if source_bytes else 1.0)}

    def finish(self):
        """Commit the open batch, then the record table and `info`: the database is complete."""
        self._commit()
        table = logical_table(np.concatenate(self.rows))
        logical = fmt.logical_of_keys(table)
        p, job = self.progress, self.job
        info = fmt.make_info(job.plan, job.classes, p, logical,
                             _in_source_order(p["skipped"], p.get("skipped_at", [])),
                             made_by=f"fastlmdb {__version__}", finished=time.time())
        meta = {fmt.TABLE_KEY: fmt.dump_table(table), fmt.INFO_KEY: info,
                fmt.LOGICAL_KEY: fmt.dump_table(logical, "<u4")}
        if job.names:
            meta[fmt.PATHS_KEY] = self._logical_names(table)
        self._write([], np.empty(0, fmt.ROW), meta)
        self.db.close()
        self.status.put(("done", info))

    def _logical_names(self, table):
        """The stored files' names in logical order."""
        names = self.job.names.split(b"\0")
        by_source = np.argsort(self.positions)
        written = by_source[np.searchsorted(self.positions, table["source"], sorter=by_source)]
        return b"\0".join(names[k] for k in written.tolist())

    def close(self):
        self.db.close()


def _in_source_order(skipped, positions):
    """Skipped files listed in source order (`positions`: theirs, as far as recorded)."""
    if len(positions) != len(skipped):  # a partial database begun before they were recorded
        return skipped
    return [entry for _, entry in sorted(zip(positions, skipped), key=lambda pair: pair[0])]


def logical_table(rows):
    """The record table in logical order (by source position) with each record's key: rows
    come in key order."""
    by_source = np.argsort(rows["source"], kind="stable")
    table = np.empty(len(rows), dtype=fmt.TABLE)
    for name in fmt.ROW.names:
        table[name] = rows[name][by_source]
    table["key"] = by_source
    return table


def _receive(inputs):
    """(start, entries) of the chunks ready on the producers' pipes; a pipe whose producer
    died is dropped (the coordinator sends its work to the others)."""
    for pipe in connection.wait(inputs):
        try:
            _, start, entries = pipe.recv()
        except (EOFError, OSError):
            inputs.remove(pipe)
            continue
        yield start, entries


def _reread(entry):
    """(bytes, "") of a source file a producer checked, or (None, why) if it changed since."""
    try:
        data = prepare.read(entry["path"], check_crc=False)  # the crc32 below checks it
    except ImageError as exc:
        return None, str(exc)
    if zlib.crc32(data) != entry["crc32"]:
        return None, "the file changed while it was being converted"
    return data, ""


def storage_message(report, paths):
    """What to tell the user when writing failed (a full disk): what is safe, and about how
    much more space the rest needs: the source bytes still to write (`paths` are the source
    files of the database, in order), times the file bytes each source byte became so far."""
    remaining = paths[report["next_file"]:]
    source = sum(source_size(path) for path in remaining)
    more = source * report["file_bytes_per_source_byte"]
    return (f"writing {report['partial']} failed: {report['error']}. The {report['committed']} "
            f"records committed ({_megabytes(report['written'])}) are intact; about "
            f"{_megabytes(more)} more are needed for the remaining {len(remaining)} files "
            f"({_megabytes(source)} of source). Free space (or choose another --to_dir and "
            "move the .partial file there), then run the same command again to resume")


def _file_bytes(nbytes, page_size):
    """About the bytes of an LMDB file that records of `nbytes` take: a value larger than
    about half a page goes on whole overflow pages of its own (16-byte header), a smaller
    one shares a leaf page (8-byte node header and 8-byte key)."""
    nbytes = nbytes.astype(np.int64)
    pages = -(-(nbytes + 16) // page_size)
    return int(np.where(nbytes > page_size // 2, pages * page_size, nbytes + 16).sum())


def _megabytes(size):
    return f"{size / 1e6:,.1f} MB"


def _changed(entry):
    """The row's `transcoded` code: 0 source bytes, 1 converted to RGB JPEG, 2 resized."""
    return 2 if entry["resized"] else int(bool(entry["transcoded"]))


class _Fatal(Exception):
    """The run cannot go on; what is committed is intact."""


class _StorageError(_Fatal):
    """Writing failed (disk full, quota, I/O error)."""

    def __init__(self, report):
        super().__init__(report["error"])
        self.report = report


class _PlanMismatch(Exception):
    def __init__(self, old_plan):
        super().__init__(old_plan)
        self.old_plan = old_plan

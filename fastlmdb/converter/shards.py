"""Convert a split as K shards: K complete databases in one folder, one writer each, and an
index written last.

A shard is the unit of distributed work: it holds a contiguous range of the split's files in
write order (a contiguous range of keys), so
shard k is the same database whoever makes it. With the "local" backend the shards are made
one after another, each by the local multi-process pipeline. With a joblib backend each shard
is one task that prepares and writes in its worker process, shards side by side: "loky" (local
processes) or "dask" (a dask.distributed cluster whose workers see --to_dir and --from_dir at
the same paths, e.g. on a shared filesystem).
"""

import contextlib
import dataclasses
import logging
import os
import socket

import joblib
from joblib.externals.loky import get_reusable_executor

from fastlmdb.converter import pipeline, prepare, writer
from fastlmdb.core import catalog, files, store
from fastlmdb.core import format as fmt
from fastlmdb.core.errors import ConversionError

log = logging.getLogger(__name__)

BACKENDS = ("local", "loky", "dask")
PLAN_FILE = "plan.json"


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to make one shard, picklable."""
    options: object  # convert.Options
    settings: prepare.Settings
    inputs: object  # listing.Listing of the shard's files
    plan: dict
    partial: str
    final: str
    positions: object = None  # the shard's files' positions in the split's listing (numpy)


def convert_shards(options, inputs, positions, partial, plan, settings, on_progress=None):
    """Make every shard missing from the folder `partial`, then its index. `inputs` is in write
    order, `positions` the files' positions in the split's listing.
    Returns [(info, files done before this run)], one per shard in order."""
    _check_plan(partial, plan, options.overwrite)
    jobs = [_job(options, inputs, settings, partial, k, positions) for k in range(options.shards)]
    progress = _Progress(on_progress, len(inputs))
    if options.backend == "local":
        results = [_make_here(job, progress) for job in jobs]
    else:
        results = _make_as_tasks(jobs, options, progress)
    catalog.write_tables(partial, [job.final for job in jobs])
    write_index(partial, plan, [os.path.basename(job.final) for job in jobs],
                [info for info, _ in results])
    return results


def write_index(folder, plan, names, infos):
    """Write the index of a folder whose shards are all finished: the folder is complete."""
    files.write_json_atomically(os.path.join(folder, fmt.SHARD_INDEX),
                                fmt.make_shard_index(plan, names, infos))


def _check_plan(partial, plan, overwrite):
    """The folder's plan must be this run's; --overwrite starts a different one again."""
    path = os.path.join(partial, PLAN_FILE)
    if os.path.exists(path):
        with open(path, "rb") as file:
            old = fmt.load_json(file.read(), "plan", path)
        if old == plan:
            return
        if not overwrite:
            raise ConversionError(pipeline.mismatch_message(old, plan, partial))
        log.info("%s was started with other arguments: starting again", partial)
        for entry in os.scandir(partial):
            files.remove(entry.path)
    files.write_json_atomically(path, plan)


def _job(options, inputs, settings, partial, k, positions=None):
    start, stop = fmt.shard_bounds(len(inputs), options.shards, k)
    part = dataclasses.replace(inputs, paths=inputs.paths[start:stop],
                               labels=inputs.labels[start:stop])
    # first_source: the shard's first position in write order (in the source order: its
    # first source position, as before the order existed).
    shard = {"index": k, "count": options.shards, "first_source": start, "files": stop - start}
    name = fmt.shard_file(options.split, k, options.shards)
    return ShardJob(options, settings, part, {**pipeline.plan_of(options, part), "shard": shard},
                    os.path.join(partial, fmt.partial_path(name)), os.path.join(partial, name),
                    None if positions is None else positions[start:stop])


def _finished(job):
    """(info, files) of a shard made before, checked to be this job's."""
    if store.read_meta(job.final, fmt.PLAN_KEY) != job.plan:
        raise ConversionError(f"{job.final} was made with other arguments than this run's; "
                              "pass --overwrite to start again")
    return store.read_file_catalog(job.final)[0], len(job.inputs)


def _make_here(job, progress):
    """One shard with the local multi-process pipeline."""
    if os.path.exists(job.final):
        return progress.finished(*_finished(job))
    with files.exclusive(job.partial):
        info, resumed_at = pipeline.run(job.options, job.inputs, job.partial, job.plan,
                                        job.settings, progress.of_shard(len(job.inputs)),
                                        job.positions)
        os.replace(job.partial, job.final)
    return progress.finished(info, resumed_at)


def make_shard(job):
    """A task, in whatever process runs it: prepare and write one shard in this process.
    Returns (shard path, (info, files done before this run))."""
    local = [] if "://" in job.inputs.root else [job.inputs.root]  # not a Python dataset's
    for needed in (*local, os.path.dirname(job.partial)):
        if not os.path.exists(needed):  # a cluster worker without the shared filesystem
            raise ConversionError(f"{socket.gethostname()} cannot see {needed}: every worker "
                                  "must see --from_dir and --to_dir at the same paths (a "
                                  "shared filesystem)")
    if os.path.exists(job.final):
        return job.final, _finished(job)
    if job.inputs.setup is not None:
        job.inputs.setup()
    with files.exclusive(job.partial):
        resumed_at, (kind, *args) = writer.write_inline(
            pipeline.writer_job(job.options, job.inputs, job.partial, job.plan, job.positions),
            job.inputs.paths,
            lambda paths: [pipeline.entry(path, job.settings) for path in paths],
            pipeline.CHUNK)
        if kind != "done":
            raise pipeline.failure(kind, args, job.plan, job.partial, job.inputs.paths)
        os.replace(job.partial, job.final)
    return job.final, (args[0], resumed_at)


def _make_as_tasks(jobs, options, progress):
    made = {}
    with _backend(options) as n_jobs:
        tasks = joblib.Parallel(n_jobs=n_jobs, return_as="generator_unordered")(
            joblib.delayed(make_shard)(job) for job in jobs)
        for final, (info, resumed_at) in tasks:
            made[final] = progress.finished(info, resumed_at)
    return [made[job.final] for job in jobs]


@contextlib.contextmanager
def _backend(options):
    """The joblib backend to run shard tasks on; yields the n_jobs to ask for."""
    if options.backend == "loky":
        try:
            with joblib.parallel_config(backend="loky"):
                yield options.procs
        finally:  # no worker processes left waiting once the conversion is over
            get_reusable_executor().shutdown(wait=True)
        return
    try:
        from dask.distributed import Client
    except ImportError:
        raise ConversionError("--backend dask needs dask.distributed: "
                              "pip install 'dask[distributed]'") from None
    # No --scheduler: a local cluster of --procs single-threaded worker processes.
    client_args = ((options.scheduler,) if options.scheduler else ())
    client_kwargs = {} if options.scheduler else {
        "n_workers": options.procs, "threads_per_worker": 1, "dashboard_address": None}
    if not options.scheduler:  # our own throw-away cluster: its chatter is not the user's news
        logging.getLogger("distributed").setLevel(logging.ERROR)
    with Client(*client_args, **client_kwargs) as client:
        log.info("converting shards on %s", client)
        with joblib.parallel_config(backend="dask"):
            yield -1


class _Progress:
    """One progress report over all shards, from each shard's own (relative to its resume)."""

    def __init__(self, callback, total):
        self.callback, self.total = callback, total
        self.done = self.bytes_in = 0

    def of_shard(self, files_in_shard):
        def update(done, total, bytes_in):  # relative to where the shard resumed
            resumed = files_in_shard - total
            if self.callback:
                self.callback(self.done + done, self.total - resumed, self.bytes_in + bytes_in)
        return update

    def finished(self, info, resumed_at):
        """Count a finished shard; returns (info, resumed_at)."""
        self.total -= resumed_at
        self.done += info["count"] + len(info["skipped"]) - resumed_at
        self.bytes_in += info["bytes_in"]
        if self.callback:
            self.callback(self.done, self.total, self.bytes_in)
        return info, resumed_at

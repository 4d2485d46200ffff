"""Streaming from object storage vs the same database staged on local disk.

Question: does LMDBIterDataset reading s3:// through a cache limited to 25% of the database
keep up with reading a local copy, and how soon does its first batch come?

Setup: the sample JPEGs (x --replicate) converted as --shards shards, uploaded with
`fastlmdb upload` to moto's S3 server on 127.0.0.1 (its own process), and staged with
`fastlmdb stage` to local disk. Rates: one DataLoader per candidate (--workers persistent
workers, as a training run keeps them; decode-aware RandomResizedCrop(224) + flip, batch 64,
shuffle), epochs interleaved (local, stream, local, stream, ...), medians, over
  local:   the staged copy (page cache warm);
  stream:  the URL, cache_limit 25% of the database, the cache emptied before each epoch
           (every shard downloaded during the epoch).
Time to first batch: a new dataset and new workers each (the stream's cache empty), from
iter(loader) to the first batch, against the time one shard takes to download alone.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import harness
import torch.utils.data

import fastlmdb
from fastlmdb.core import remote
from fastlmdb.tools import stage, upload


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, help="first N sample images")
    p.add_argument("--replicate", type=int, default=2)
    p.add_argument("--shards", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="streaming")
    p.add_argument("--images-dir", default=harness.IMAGES_DIR)
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="fastlmdb-bench-stream-")
    server = None
    try:
        db = _database(args, work)
        server, endpoint = _moto()
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
        url = _publish(db)
        staged = os.path.dirname(stage.stage(f"{url}/train.lmdb", os.path.join(work, "staged")))
        size = sum(os.path.getsize(os.path.join(db, n)) for n in os.listdir(db)
                   if n.endswith(".lmdb"))
        limit = size // 4
        runs = {"local": [], "stream": []}
        roots = {"local": staged, "stream": url}
        # Time to first batch: a new dataset and new workers (the stream's cache empty).
        for label, root in roots.items():
            cache = os.path.join(work, "cache-first") if label == "stream" else None
            loader = _loader(root, args.workers, cache, limit, persistent=False)
            runs[label + " first"] = [_epoch(loader, server)[1]]
        # Rates: each candidate's loader kept (persistent workers, as a training run keeps
        # them); the stream's cache emptied before each epoch, so every shard is downloaded.
        loaders = {label: _loader(root, args.workers, os.path.join(work, "cache")
                                  if label == "stream" else None, limit, persistent=True)
                   for label, root in roots.items()}
        for repeat in range(args.repeats + 1):  # the first: warm-up
            for label, loader in loaders.items():
                if label == "stream":
                    loader.dataset._stream.cache.clear()
                result = _epoch(loader, server)
                if repeat:
                    runs[label].append(result)
                print(label, repeat, result, flush=True)
        one_shard = _one_shard_seconds(url, db)
        _report(args, runs, size, limit, one_shard)
    finally:
        if server is not None:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)


def _database(args, work):
    sources = harness.sample_files(args.images_dir, args.limit)
    harness.make_tree(os.path.join(work, "src"), sources, args.replicate)
    fastlmdb.convert(fastlmdb.Options(os.path.join(work, "src"), os.path.join(work, "dst"),
                                      "train", shards=args.shards, backend="loky", procs=2))
    return os.path.join(work, "dst", "train.lmdb")


def _moto():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()",
                               "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):  # wait for it to listen (a benchmark, not a test)
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    raise SystemExit("moto's server did not start")


def _publish(db):
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
    upload.upload(db, "s3://bench/db/train.lmdb")
    return "s3://bench/db"


def _loader(root, workers, cache, limit, persistent):
    crop = fastlmdb.RandomResizedCrop(224)
    transform = __import__("torchvision").transforms.Compose(
        [crop, __import__("torchvision").transforms.RandomHorizontalFlip()])
    options = dict(cache_dir=cache, cache_limit=limit) if cache else {}
    dataset = fastlmdb.LMDBIterDataset(root, "train", transform=transform, output="tensor",
                                       shuffle=True, batch_size=64, **options)
    return torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=workers,
                                       persistent_workers=persistent)


def _epoch(loader, server):
    """(images/s over the epoch, seconds to the first batch, images per CPU-second of this
    process tree without the server, the server's CPU seconds)."""
    import psutil

    server_process = psutil.Process(server.pid)
    server_cpu, tree_cpu = harness._process_cpu(server_process), harness.tree_cpu_seconds()
    started = time.perf_counter()
    images, first = 0, None
    for batch, _ in loader:
        first = first or time.perf_counter() - started
        images += len(batch)
    seconds = time.perf_counter() - started
    server_cpu = harness._process_cpu(server_process) - server_cpu
    client_cpu = harness.tree_cpu_seconds() - tree_cpu - server_cpu
    return images / seconds, first, images / client_cpu, server_cpu


def _one_shard_seconds(url, db):
    name = sorted(n for n in os.listdir(db) if n.endswith(".lmdb"))[0]
    folder = remote.RemoteFolder(f"{url}/train.lmdb")
    size = os.path.getsize(os.path.join(db, name))
    started = time.perf_counter()
    for start in range(0, size, 8 << 20):
        folder.read_range(name, start, min(start + (8 << 20), size), size)
    return time.perf_counter() - started


def _report(args, runs, size, limit, one_shard):
    def median(label, column):
        return statistics.median(run[column] for run in runs[label])

    local, stream = median("local", 0), median("stream", 0)
    first_local, first_stream = runs["local first"][0], runs["stream first"][0]
    cpu_local, cpu_stream = median("local", 2), median("stream", 2)
    with open("/proc/loadavg") as file:
        load = file.read().split()[:3]
    lines = [
        f"# {args.name}", "",
        f"`{' '.join(sys.argv)}`", "",
        f"Database: {size / 1e6:.0f} MB in {args.shards} shards; cache_limit {limit / 1e6:.0f} "
        f"MB (25%); {args.workers} DataLoader workers; batch 64; RandomResizedCrop(224) + flip "
        f"decoded in place; moto S3 server on 127.0.0.1 in its own process; "
        f"{args.repeats} timed runs each, interleaved, medians. Load average at the end: "
        f"{' '.join(load)} ({os.cpu_count()} CPUs).", "",
        "| | images/s | ratio | images per CPU-s (without the server) | ratio | "
        "first batch (s) | S3 server CPU-s per epoch |", "|---|---|---|---|---|---|---|",
        f"| staged locally | {local:.0f} | 1.00 | {cpu_local:.0f} | 1.00 | {first_local:.2f} "
        f"| {median('local', 3):.2f} |",
        f"| streamed, cold 25% cache | {stream:.0f} | {stream / local:.2f} | {cpu_stream:.0f} "
        f"| {cpu_stream / cpu_local:.2f} | {first_stream:.2f} | {median('stream', 3):.2f} |",
        "",
        "Median of the per-pair wall ratios (stream / the local epoch run just before it): "
        f"{statistics.median(s[0] / l[0] for l, s in zip(runs['local'], runs['stream'])):.2f}"
        "; the CPU ratio is the steadier measure on a loaded machine.", "",
        f"One shard ({size / args.shards / 1e6:.1f} MB) downloads alone in {one_shard:.2f} s: "
        f"the first-batch target is {2 + one_shard:.2f} s (2 s + one shard); the streamed "
        f"first batch came {first_stream - first_local:+.2f} s after the local one.", ""]
    text = "\n".join(lines)
    print(text)
    os.makedirs(harness.RESULTS_DIR, exist_ok=True)
    with open(os.path.join(harness.RESULTS_DIR, f"{args.name}.md"), "w") as file:
        file.write(text)


if __name__ == "__main__":
    main()

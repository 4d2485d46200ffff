"""Streaming from object storage vs the same database staged on local disk.

Question: does LMDBIterDataset reading s3:// through a cache limited to 25% of the database
keep up with reading a local copy, and how soon does its first batch come?

Setup: the sample JPEGs (x --replicate) converted as --shards shards, uploaded with
`fastlmdb upload` to moto's S3 server on 127.0.0.1 (its own process), and staged with
`fastlmdb stage` to local disk. Each run: one epoch of a DataLoader (--workers workers,
decode-aware RandomResizedCrop(224) + flip, batch 64, shuffle) over
  local:   the staged copy (page cache warm after the warm-up run);
  stream:  the URL, a new empty cache folder each run (every shard downloaded during the
           epoch), cache_limit 25% of the database.
Runs interleaved (local, stream, local, stream, ...); medians. Time to first batch: from
iter(loader) to the first batch (workers started, first shard(s) downloaded), against the
time one shard takes to download alone.
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
        for repeat in range(args.repeats + 1):  # the first: warm-up
            for label in runs:
                cache = os.path.join(work, f"cache-{repeat}")
                root = staged if label == "local" else url
                result = _epoch(root, args.workers, cache if label == "stream" else None, limit)
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


def _epoch(root, workers, cache, limit):
    """(images/s over the epoch, seconds to the first batch)."""
    crop = fastlmdb.RandomResizedCrop(224)
    transform = __import__("torchvision").transforms.Compose(
        [crop, __import__("torchvision").transforms.RandomHorizontalFlip()])
    options = dict(cache_dir=cache, cache_limit=limit) if cache else {}
    dataset = fastlmdb.LMDBIterDataset(root, "train", transform=transform, output="tensor",
                                       shuffle=True, batch_size=64, **options)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=workers)
    started = time.perf_counter()
    images, first = 0, None
    for batch, _ in loader:
        first = first or time.perf_counter() - started
        images += len(batch)
    return images / (time.perf_counter() - started), first


def _one_shard_seconds(url, db):
    name = sorted(n for n in os.listdir(db) if n.endswith(".lmdb"))[0]
    folder = remote.RemoteFolder(f"{url}/train.lmdb")
    size = os.path.getsize(os.path.join(db, name))
    started = time.perf_counter()
    for start in range(0, size, 8 << 20):
        folder.read_range(name, start, min(start + (8 << 20), size), size)
    return time.perf_counter() - started


def _report(args, runs, size, limit, one_shard):
    local = statistics.median(r for r, _ in runs["local"])
    stream = statistics.median(r for r, _ in runs["stream"])
    first_local = statistics.median(f for _, f in runs["local"])
    first_stream = statistics.median(f for _, f in runs["stream"])
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
        "| | images/s | ratio | first batch (s) |", "|---|---|---|---|",
        f"| staged locally | {local:.0f} | 1.00 | {first_local:.2f} |",
        f"| streamed, cold 25% cache | {stream:.0f} | {stream / local:.2f} | "
        f"{first_stream:.2f} |", "",
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

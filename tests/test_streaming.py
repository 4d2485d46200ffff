"""Streaming a sharded database from object storage (fastlmdb.loading.streaming): against
moto's S3 API server on 127.0.0.1, started by these tests (with fault injection: a body
damaged, an object answered 500, a request held, the server stopped and started again), and
fsspec's memory:// for the quick ones. Each sample once per epoch, the cache limit held,
bytes fetched counted by the server."""

import collections
import glob
import hashlib
import json
import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch.utils.data
from helpers import db, make_tree, read_db, run_convert

pytest.importorskip("s3fs", reason="pip install 'fastlmdb[remote]' to test object storage")
pytest.importorskip("moto", reason="pip install 'fastlmdb[test]'")
from moto import server as moto_server  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

from fastlmdb import LMDBDataset, LMDBIterDataset, cli  # noqa: E402
from fastlmdb.core import remote, sizes  # noqa: E402
from fastlmdb.core.errors import DatabaseError  # noqa: E402
from fastlmdb.loading import order, shardcache  # noqa: E402
from fastlmdb.tools import upload  # noqa: E402

SHARDS, PER_SHARD, CLASSES = 24, 16, 8  # tiny images; a shard > the DataLoader's lookahead
METHODS = ["fork", "spawn", "forkserver"]


class S3:
    """moto's S3 API on 127.0.0.1 (its WSGI app, as test_stage_remote serves it), stoppable
    and restartable on the same port, logging (method, path, body bytes) of every request;
    `damage` (paths whose next GET body gets a flipped byte), `fail` (paths answered 500),
    `hold` (path -> (arrived, release) events: the GET waits for release)."""

    def __init__(self):
        self.app = moto_server.DomainDispatcherApplication(moto_server.create_backend_app)
        self.log, self.damage, self.fail, self.hold = [], set(), set(), {}
        self.port, self._server = 0, None
        self.start()

    def _wsgi(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        if method == "GET" and path in self.fail:
            self.log.append((method, path, 0))
            start_response("500 Internal Server Error", [("Content-Length", "0")])
            return [b""]
        if method == "GET" and path in self.hold:
            arrived, release = self.hold[path]
            arrived.set()
            release.wait(60)
        body = b"".join(self.app(environ, start_response))
        if method == "GET" and path in self.damage and len(body) > 100:
            self.damage.discard(path)
            body = body[:len(body) // 2] + bytes([body[len(body) // 2] ^ 0xFF]) \
                + body[len(body) // 2 + 1:]
        self.log.append((method, path, len(body)))
        return [body]

    def start(self):
        self._server = make_server("127.0.0.1", self.port, self._wsgi, threaded=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def shard_bytes(self):
        return sum(n for method, path, n in self.log if method == "GET" and path.endswith(".lmdb"))


@pytest.fixture(scope="module")
def s3_server():
    server = S3()
    yield server
    server.stop()


_BUCKETS = iter(range(10**6))


@pytest.fixture
def s3(s3_server, monkeypatch):
    """(server, a new bucket's name); dummy credentials, the endpoint in the environment
    (which spawned ranks and workers inherit)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"),
                        ("AWS_SHARED_CREDENTIALS_FILE", os.devnull),
                        ("AWS_ENDPOINT_URL", s3_server.endpoint)):
        monkeypatch.setenv(name, value)
    import s3fs

    bucket = f"stream-{next(_BUCKETS)}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    s3_server.log.clear()
    return s3_server, bucket


@pytest.fixture(scope="module")
def local_db(tmp_path_factory):
    """A sharded database (SHARDS x PER_SHARD tiny JPEGs, CLASSES classes, shuffled write
    order) and the md5 of each record's pixels, as a local LMDBIterDataset decodes them."""
    base = tmp_path_factory.mktemp("streamdb")
    per_class = SHARDS * PER_SHARD // CLASSES
    make_tree(base / "src", {"train": {f"c{k}": per_class for k in range(CLASSES)}})
    run_convert(base / "src", base / "dst", shards=SHARDS, backend="loky", procs=2)
    local = LMDBIterDataset(base / "dst", "train", output="numpy")
    return db(base / "dst"), collections.Counter(_md5(image) for image, _ in local)


def _md5(image):
    return hashlib.md5(np.ascontiguousarray(image).tobytes()).hexdigest()


def _published(local_db, bucket):
    url = f"s3://{bucket}/data/train.lmdb"
    upload.upload(local_db[0], url)
    return f"s3://{bucket}/data"


def _shard_sizes(path):
    return [os.path.getsize(p) for p in sorted(glob.glob(os.path.join(path, "*.lmdb")))]


def _stats(cache_dir):
    [folder] = glob.glob(os.path.join(cache_dir, "train.lmdb-*"))
    with open(os.path.join(folder, shardcache.STATS)) as file:
        return folder, json.load(file)


# Quick: arguments, order, memory://.


def test_cache_limit_takes_bytes_or_a_size_string():
    assert sizes.parse_size(1000) == 1000
    assert sizes.parse_size("500MB") == 500 * 10**6
    assert sizes.parse_size("20GB") == 20 * 10**9
    assert sizes.parse_size("1.5GiB") == 3 * 2**29
    for bad in ("20 parsecs", "-1GB", 0, True, None, "GB"):
        with pytest.raises(ValueError, match="cache_limit must be a positive number of bytes"):
            sizes.parse_size(bad)


def test_shard_order_is_a_pure_function_mixing_within_windows():
    counts = [5, 7, 6, 4, 8]
    offsets = np.cumsum([0] + counts)
    first = order.shard_order(counts, shuffle=True, seed=3, epoch=1, window=2)
    assert np.array_equal(first, order.shard_order(counts, shuffle=True, seed=3, epoch=1,
                                                   window=2))
    assert sorted(first.tolist()) == list(range(sum(counts)))
    assert not np.array_equal(first, order.shard_order(counts, shuffle=True, seed=3, epoch=2,
                                                       window=2))
    shard_of = np.searchsorted(offsets, first, side="right") - 1
    # Consecutive windows of 2 shards: the records of each window come together.
    bounds = np.cumsum([0] + [counts[k] for k in dict.fromkeys(shard_of.tolist())])
    for start in range(0, len(bounds) - 1, 2):
        window = shard_of[bounds[start]:bounds[min(start + 2, len(bounds) - 1)]]
        assert len(set(window.tolist())) <= 2
    assert np.array_equal(order.shard_order(counts, shuffle=False), np.arange(sum(counts)))


def test_a_url_for_random_access_says_to_stage_it():
    with pytest.raises(DatabaseError, match=r"s3://b/db: LMDBDataset reads records at random.*"
                                            r"fastlmdb stage s3://b/db/train.lmdb LOCAL_DIR"):
        LMDBDataset("s3://b/db", "train")


def test_streaming_arguments_are_checked(local_db, tmp_path):
    with pytest.raises(ValueError, match="needs cache_dir="):
        LMDBIterDataset("s3://b/db", "train")
    with pytest.raises(ValueError, match="cache_dir: only for a database at a URL"):
        LMDBIterDataset(os.path.dirname(local_db[0]), "train", cache_dir=tmp_path)


def _memory_copy(local_db, name):
    url = f"memory://{name}/db"
    upload.upload(local_db[0], f"{url}/train.lmdb")
    return url


def test_a_limit_below_the_minimum_is_refused_naming_it(local_db, tmp_path):
    url = _memory_copy(local_db, "small-limit")
    largest = max(_shard_sizes(local_db[0]))
    with pytest.raises(ValueError, match=rf"cache_limit=1,000 bytes is below the minimum for "
                                         rf"{url}/train.lmdb: {4 * largest:,}"):
        LMDBIterDataset(url, "train", cache_dir=tmp_path, cache_limit=1000)


def test_streamed_samples_are_the_databases_once_each_within_the_limit(local_db, tmp_path):
    url = _memory_copy(local_db, "once")
    limit = 4 * max(_shard_sizes(local_db[0]))
    stream = LMDBIterDataset(url, "train", cache_dir=tmp_path, cache_limit=limit,
                             output="numpy", shuffle=True, seed=5)
    for _ in range(2):
        assert collections.Counter(_md5(image) for image, _ in stream) == local_db[1]
    folder, stats = _stats(tmp_path)
    assert 0 < stats["peak_bytes"] <= limit
    assert stats["evictions"] > 0
    assert not glob.glob(os.path.join(folder, "*.part"))


def test_unshuffled_streaming_reads_shard_by_shard_in_key_order(local_db, tmp_path):
    url = _memory_copy(local_db, "keyorder")
    stream = LMDBIterDataset(url, "train", cache_dir=tmp_path, cache_limit="10MB")
    keys = stream._keys(stream.indices())
    assert np.array_equal(keys, np.arange(SHARDS * PER_SHARD))


def test_batches_mix_classes_as_a_full_shuffle_does(local_db, tmp_path):
    """Window of 1 shard: a database converted in shuffled write order (the default) has
    shards that are random samples of the split, so batches hold as many classes as a
    global shuffle gives."""
    url = _memory_copy(local_db, "mixing")
    stream = LMDBIterDataset(url, "train", cache_dir=tmp_path, cache_limit="10MB",
                             shuffle=True, seed=1)
    labels = np.asarray(stream.targets)
    size = 16

    def distinct(indices):
        return np.mean([len(set(labels[indices[i:i + size]].tolist()))
                        for i in range(0, len(indices) - size + 1, size)])

    streamed = distinct(stream.indices())
    uniform = np.mean([distinct(np.random.default_rng(s).permutation(len(labels)))
                       for s in range(5)])
    assert streamed >= 0.85 * uniform, (streamed, uniform)


def test_resume_mid_epoch_fetches_only_the_rest(local_db, tmp_path):
    url = _memory_copy(local_db, "resume")
    options = dict(cache_limit="10MB", output="numpy", shuffle=True, seed=2, batch_size=8)
    first = LMDBIterDataset(url, "train", cache_dir=tmp_path / "a", **options)
    seen = []
    for image, _ in first:
        seen.append(_md5(image))
        if len(seen) == 200:
            break
    state = first.state_dict(samples_seen=200)
    again = LMDBIterDataset(url, "train", cache_dir=tmp_path / "b", **options)
    again.load_state_dict(state)
    rest_keys = again._keys(again.indices())
    rest = [_md5(image) for image, _ in again]
    assert collections.Counter(seen + rest) == local_db[1]
    needed = set((np.searchsorted(np.arange(0, SHARDS * PER_SHARD, PER_SHARD), rest_keys,
                                  side="right") - 1).tolist())
    assert _stats(tmp_path / "b")[1]["fetches"] == len(needed) < SHARDS


def test_cache_disk_full_or_read_only_is_a_clear_error(local_db, tmp_path, monkeypatch):
    url = _memory_copy(local_db, "disk")
    for code, says in ((28, "the disk is full; free space there or lower cache_limit"),
                       (30, "it is not writable; give a cache_dir on a writable local disk")):
        def refuse(fd, offset, length, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "posix_fallocate", refuse)
        stream = LMDBIterDataset(url, "train", cache_dir=tmp_path / str(code),
                                 cache_limit="10MB")
        with pytest.raises(DatabaseError, match=f"cache_dir .*: cannot write .* bytes for "
                                                f"train-00.*: {says}"):
            next(iter(stream))


# Against moto's S3 server.


def test_upload_writes_the_index_last_and_the_cli_names_the_url(local_db, s3, capsys):
    server, bucket = s3
    url = f"s3://{bucket}/cli/train.lmdb"
    assert cli.main(["upload", local_db[0], url]) == 0
    assert capsys.readouterr().out.strip() == url
    puts = [path for method, path, _ in server.log if method == "PUT"]
    assert puts[-1].endswith("/train.lmdb/index.json")
    assert len([p for p in puts if p.endswith(".lmdb")]) == SHARDS


def test_a_shard_damaged_in_transit_is_fetched_again(local_db, s3, tmp_path):
    server, bucket = s3
    url = _published(local_db, bucket)
    victim = f"/{bucket}/data/train.lmdb/train-00003-of-{SHARDS:05d}.lmdb"
    server.damage.add(victim)
    stream = LMDBIterDataset(url, "train", cache_dir=tmp_path, cache_limit="10MB",
                             output="numpy")
    assert collections.Counter(_md5(image) for image, _ in stream) == local_db[1]
    assert [p for m, p, _ in server.log if m == "GET" and p == victim] == [victim] * 2


def test_a_shard_damaged_in_the_bucket_is_reported_by_name(local_db, s3, tmp_path):
    server, bucket = s3
    url = _published(local_db, bucket)
    name = f"train-00002-of-{SHARDS:05d}.lmdb"
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    data = bytearray(fs.cat_file(f"{bucket}/data/train.lmdb/{name}"))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(f"{bucket}/data/train.lmdb/{name}", bytes(data))
    stream = LMDBIterDataset(url, "train", cache_dir=tmp_path, cache_limit="10MB")
    with pytest.raises(DatabaseError, match=f"{url}/train.lmdb/{name}: the downloaded bytes do "
                                            "not match the SHA-256 in manifest.json .fetched "
                                            "twice.; the object in the bucket is damaged"):
        list(stream)
    folder, _ = _stats(tmp_path)
    assert not glob.glob(os.path.join(folder, name + "*"))


def test_a_failing_server_is_retried_then_named(local_db, s3, tmp_path, monkeypatch):
    server, bucket = s3
    url = _published(local_db, bucket)
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    name = f"train-00000-of-{SHARDS:05d}.lmdb"
    server.fail.add(f"/{bucket}/data/train.lmdb/{name}")
    no_retries = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}
    stream = LMDBIterDataset(url, "train", cache_dir=tmp_path, cache_limit="10MB",
                             storage_options=no_retries)
    try:
        with pytest.raises(DatabaseError, match=f"{url}/train.lmdb/{name}: download failed"):
            list(stream)
    finally:
        server.fail.clear()
    gets = [p for m, p, _ in server.log if m == "GET" and p.endswith(name)]
    assert len(gets) == remote.RETRIES + 1


def test_a_database_changed_in_the_bucket_during_a_run_is_refused(local_db, s3, tmp_path):
    _, bucket = s3
    url = _published(local_db, bucket)
    stream = LMDBIterDataset(url, "train", cache_dir=tmp_path, cache_limit=4 * max(
        _shard_sizes(local_db[0])), prefetch_shards=0)
    samples = iter(stream)
    next(samples)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe_file(f"{bucket}/data/train.lmdb/index.json",
                 fs.cat_file(f"{bucket}/data/train.lmdb/index.json") + b" ")
    with pytest.raises(DatabaseError, match=f"{url}/train.lmdb changed in the bucket during "
                                            "this run"):
        list(samples)


@pytest.mark.slow
def test_the_server_stopped_and_started_again_mid_epoch(local_db, s3, tmp_path):
    server, bucket = s3
    url = _published(local_db, bucket)
    stream = LMDBIterDataset(url, "train", cache_dir=tmp_path, output="numpy",
                             cache_limit=4 * max(_shard_sizes(local_db[0])), prefetch_shards=1)
    seen = []
    for image, _ in stream:
        seen.append(_md5(image))
        if len(seen) == 3 * PER_SHARD:
            server.stop()  # refused connections from here; back 1 s later
            restart = threading.Timer(1.0, server.start)
            restart.start()
            down_at = len(server.log)
    restart.join()
    assert collections.Counter(seen) == local_db[1]
    assert any(m == "GET" and p.endswith(".lmdb") for m, p, _ in server.log[down_at:])


def _iterate_all(url, cache_dir, limit):
    stream = LMDBIterDataset(url, "train", cache_dir=cache_dir, cache_limit=limit)
    for _ in stream:
        pass


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_process_killed_mid_download_leaves_nothing_that_breaks_the_next(local_db, s3,
                                                                           tmp_path):
    server, bucket = s3
    url = _published(local_db, bucket)
    limit = 4 * max(_shard_sizes(local_db[0]))
    held = f"/{bucket}/data/train.lmdb/train-00000-of-{SHARDS:05d}.lmdb"
    arrived, release = threading.Event(), threading.Event()
    server.hold[held] = (arrived, release)
    process = multiprocessing.get_context("spawn").Process(
        target=_iterate_all, args=(url, os.fspath(tmp_path), limit))
    process.start()
    try:
        assert arrived.wait(90)  # the process is downloading shard 0 now
        folder, _ = _stats_folder(tmp_path)
        assert glob.glob(os.path.join(folder, "*.part"))
        os.kill(process.pid, signal.SIGKILL)
        process.join(30)
    finally:
        del server.hold[held]
        release.set()
    stream = LMDBIterDataset(url, "train", cache_dir=tmp_path, cache_limit=limit,
                             output="numpy")
    assert collections.Counter(_md5(image) for image, _ in stream) == local_db[1]
    assert not glob.glob(os.path.join(folder, "*.part"))


def _stats_folder(cache_dir):
    [folder] = glob.glob(os.path.join(cache_dir, "train.lmdb-*"))
    return folder, None


def _hashes(batch):
    return [(_md5(image), label) for image, label in batch]


def _rank(url, cache_dir, limit, rank, method, results, go, aws):
    # A forkserver started earlier in the session has the environment of then, not the test's
    # credentials and endpoint: set them here (this rank's own workers inherit them).
    os.environ.update(aws, LOCAL_WORLD_SIZE="2")  # as torchrun says
    stream = LMDBIterDataset(url, "train", cache_dir=cache_dir, cache_limit=limit,
                             rank=rank, world_size=2, shuffle=True, output="numpy",
                             batch_size=4, prefetch_shards=1)
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2,
                                         multiprocessing_context=method, prefetch_factor=1,
                                         persistent_workers=True,
                                         collate_fn=_hashes)
    for epoch in range(2):
        stream.set_epoch(epoch)
        results.put((rank, epoch, [md5 for batch in loader for md5, _ in batch]))
        if not go[epoch].wait(120):
            return


def _two_ranks(url, cache_dir, limit, method, server):
    """Run ranks 0 and 1 (2 workers each) for 2 epochs: (samples, shard bytes) per epoch."""
    ctx = multiprocessing.get_context(method)
    results, go = ctx.Queue(), [ctx.Event(), ctx.Event()]
    aws = {name: value for name, value in os.environ.items() if name.startswith("AWS_")}
    ranks = [ctx.Process(target=_rank, args=(url, os.fspath(cache_dir), limit, rank,
                                             method, results, go, aws)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    epochs, before = [], server.shard_bytes()
    try:
        for epoch in range(2):
            got = [results.get(timeout=150) for _ in ranks]
            assert sorted((rank, e) for rank, e, _ in got) == [(0, epoch), (1, epoch)]
            epochs.append((collections.Counter(m for _, _, seen in got for m in seen),
                           server.shard_bytes() - before))
            before = server.shard_bytes()
            go[epoch].set()
        for process in ranks:
            process.join(60)
            assert process.exitcode == 0
    finally:
        for process in ranks:
            if process.is_alive():
                process.kill()
    return epochs


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_of_two_workers_with_a_quarter_of_the_database(local_db, s3, tmp_path,
                                                                 method):
    server, bucket = s3
    url = _published(local_db, bucket)
    sizes = _shard_sizes(local_db[0])
    limit = 2 * 3 * max(sizes)  # 2 ranks x (window 1 + prefetch 1 + 1) shards
    assert limit <= 0.3 * sum(sizes)  # about a quarter of the database
    epochs = _two_ranks(url, tmp_path, limit, method, server)
    for epoch, (samples, fetched) in enumerate(epochs):
        assert samples == local_db[1]
        # The first epoch fetches every shard; the second may find a few still cached.
        assert (sum(sizes) if epoch == 0 else 1) <= fetched <= 1.1 * sum(sizes)
    folder, stats = _stats(tmp_path)
    assert stats["peak_bytes"] <= limit
    assert not glob.glob(os.path.join(folder, "*.part"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_fetch_nothing_in_the_second_epoch_when_the_limit_holds_it(local_db, s3,
                                                                             tmp_path):
    server, bucket = s3
    url = _published(local_db, bucket)
    sizes = _shard_sizes(local_db[0])
    (first, fetched), (second, again) = _two_ranks(url, tmp_path, 2 * sum(sizes), "fork",
                                                   server)
    assert first == second == local_db[1]
    assert fetched == sum(sizes) and again == 0


def test_the_pages_examples_run(local_db, tmp_path):
    page = open(os.path.join(os.path.dirname(__file__), "..", "docs", "streaming.md")).read()
    blocks = [block.split("```", 1)[0] for block in page.split("```python\n")[1:]]
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/streaming.md", "exec"),
             {"DB": local_db[0], "CACHE": os.fspath(tmp_path)})


def test_more_ranks_reading_than_the_limit_allows_are_refused(local_db, tmp_path):
    url = _memory_copy(local_db, "ranks")
    largest = max(_shard_sizes(local_db[0]))
    ranks = [LMDBIterDataset(url, "train", cache_dir=tmp_path, cache_limit=4 * largest,
                             rank=rank, world_size=2) for rank in (0, 1)]
    reading = iter(ranks[0])
    next(reading)
    with pytest.raises(DatabaseError, match=f"below the minimum for {url}/train.lmdb: "
                                            f"{8 * largest:,} .* = 2 rank.s. on this node"):
        next(iter(ranks[1]))
    reading.close()  # rank 0 done: rank 1 alone fits
    assert len(list(ranks[1])) == SHARDS * PER_SHARD // 2


def test_streaming_over_plain_http(local_db, tmp_path):
    """http(s):// is streamed too, from a server that ignores Range (Python's)."""
    import functools
    import http.server

    import fsspec

    upload.upload(local_db[0], "memory://http-copy/train.lmdb")
    site = tmp_path / "site"
    fsspec.filesystem("memory").get("/http-copy/train.lmdb", os.fspath(site / "train.lmdb"),
                                    recursive=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=os.fspath(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        stream = LMDBIterDataset(url, "train", cache_dir=tmp_path / "cache", cache_limit="10MB",
                                 output="numpy", shuffle=True)
        assert collections.Counter(_md5(image) for image, _ in stream) == local_db[1]
    finally:
        server.shutdown()
        thread.join(10)


def test_without_a_manifest_shards_are_checked_record_by_record(local_db, tmp_path):
    """A database copied to the bucket another way (no manifest.json): sizes from the server,
    each shard checked against the table's sizes and CRC-32s; a damaged record refused."""
    import fsspec

    url = _memory_copy(local_db, "no-manifest")
    memory = fsspec.filesystem("memory")
    memory.rm_file("/no-manifest/db/train.lmdb/manifest.json")
    stream = LMDBIterDataset(url, "train", cache_dir=tmp_path / "a", cache_limit="10MB",
                             output="numpy", shuffle=True)
    assert collections.Counter(_md5(image) for image, _ in stream) == local_db[1]
    name = f"train-00005-of-{SHARDS:05d}.lmdb"
    value = read_db(os.path.join(local_db[0], name))[2][0]
    data = bytearray(memory.cat_file(f"/no-manifest/db/train.lmdb/{name}"))
    record = data.find(value)
    assert record >= 0
    data[record + len(value) // 2] ^= 0xFF
    memory.pipe_file(f"/no-manifest/db/train.lmdb/{name}", bytes(data))
    stream = LMDBIterDataset(url, "train", cache_dir=tmp_path / "b", cache_limit="10MB")
    with pytest.raises(DatabaseError, match=f"{url}/train.lmdb/{name}: 1 record.s. do not match "
                                            "their size and CRC-32 in the table"):
        list(stream)

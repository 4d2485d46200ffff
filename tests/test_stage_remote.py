"""`fastlmdb stage URL`: object storage through fsspec, against real servers on 127.0.0.1 that
the tests start: moto's S3 API server and Python's http.server. The same promises as a local
stage: a checked copy equal to the source, made once per node, reused without a download,
made again when the remote changes, refused (and removed) when damaged or cut short."""

import functools
import http.server
import itertools
import multiprocessing
import os
import shutil
import threading

import pytest
from helpers import assert_same_database, db, make_tree, read_db, run_convert

pytest.importorskip("s3fs", reason="pip install 'fastlmdb[remote]' to test object storage")
pytest.importorskip("moto", reason="pip install 'fastlmdb[test]'")
from moto import server as moto_server  # noqa: E402 (a moto whose server cannot import fails)
from werkzeug.serving import make_server  # noqa: E402 (moto's server runs on werkzeug)

from fastlmdb import cli
from fastlmdb.core.errors import DatabaseError  # noqa: E402
from fastlmdb.tools import stage  # noqa: E402

pytestmark = pytest.mark.slow  # an S3 (moto) and an HTTP server


_BUCKETS = itertools.count()


class CountingMotoServer:
    """moto's S3 API (its WSGI app, as ThreadedMotoServer serves it) on 127.0.0.1 in a thread;
    `requests` holds (method, path) of every request. Built from the two names moto.server
    exports in every moto 5, not from ThreadedMotoServer's private methods, which change."""

    def __init__(self):
        self.requests = []
        app = moto_server.DomainDispatcherApplication(moto_server.create_backend_app)

        def counting(environ, start_response):
            self.requests.append((environ["REQUEST_METHOD"], environ["PATH_INFO"]))
            return app(environ, start_response)

        self._server = make_server("127.0.0.1", 0, counting, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._server.shutdown()
        self._thread.join()

    def get_host_and_port(self):
        host, port = self._server.server_address[:2]
        return host, port

    def data_gets(self):
        return [path for method, path in self.requests
                if method == "GET" and path.endswith(".lmdb")]


@pytest.fixture(scope="module")
def s3_server():
    server = CountingMotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """(endpoint, a new bucket's name, an s3fs filesystem on it); dummy credentials."""
    host, port = s3_server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # what a MinIO user sets too
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    bucket = f"bucket-{next(_BUCKETS)}"
    fs.mkdir(bucket)
    s3_server.requests.clear()
    return endpoint, bucket, fs


@pytest.fixture(params=[1, 3], ids=["one-file", "sharded"])
def made(request, tmp_path):
    make_tree(tmp_path / "src", {"train": {"a": 6, "b": 5}})
    run_convert(tmp_path / "src", tmp_path / "shared", shards=request.param)
    return tmp_path, db(tmp_path / "shared")


def _upload(fs, source, bucket):
    url = f"s3://{bucket}/train.lmdb"
    if fs.exists(url):
        fs.rm(url, recursive=True)
    fs.put(source, url, recursive=os.path.isdir(source))
    fs.invalidate_cache()
    return url


def _data_files(source):
    return [source] if not os.path.isdir(source) else \
        [os.path.join(source, n) for n in sorted(os.listdir(source)) if n.endswith(".lmdb")]


def test_s3_copy_equals_the_source_and_is_reused_without_a_download(made, s3, s3_server):
    base, source = made
    endpoint, bucket, fs = s3
    url = _upload(fs, source, bucket)
    s3_server.requests.clear()
    options = {"client_kwargs": {"endpoint_url": endpoint}}
    path = stage.stage(url, base / "local", storage_options=options)
    assert path == os.path.join(base / "local", "train.lmdb")
    assert_same_database(path, source)
    assert len(s3_server.data_gets()) >= len(_data_files(source))
    inode = os.stat(path).st_ino
    s3_server.requests.clear()
    assert stage.stage(url, base / "local", storage_options=options) == path
    assert os.stat(path).st_ino == inode
    assert s3_server.data_gets() == []  # only HEADs (and the small index.json)


def test_s3_a_changed_object_is_copied_again(made, s3):
    base, source = made
    _, bucket, fs = s3
    url = _upload(fs, source, bucket)
    stage.stage(url, base / "local")
    make_tree(base / "src", {"train": {"c": 2}}, seed=9)  # one more class
    run_convert(base / "src", base / "shared", overwrite=True,
                shards=3 if os.path.isdir(source) else 1)
    _upload(fs, source, bucket)
    path = stage.stage(url, base / "local")
    assert read_db(path)[0]["count"] == 13
    assert_same_database(path, source)


def _flip_a_byte_inside(source, value):
    for path in _data_files(source):
        with open(path, "r+b") as file:
            data = file.read()
            at = data.find(value)
            if at >= 0:
                file.seek(at + len(value) // 2)
                file.write(bytes([data[at + len(value) // 2] ^ 0xFF]))
                return
    raise AssertionError("the record's bytes are in no file")


def test_s3_a_damaged_object_is_refused_and_no_copy_keeps_the_name(made, s3):
    base, source = made
    _, bucket, fs = s3
    damaged = base / "damaged"
    (shutil.copytree if os.path.isdir(source) else shutil.copyfile)(source, damaged)
    _flip_a_byte_inside(damaged, read_db(source)[2][3])
    url = f"s3://{bucket}/train.lmdb"
    fs.put(os.fspath(damaged), url, recursive=os.path.isdir(damaged))
    with pytest.raises(DatabaseError, match=f"the copy of {url} .* does not match its checksums"):
        stage.stage(url, base / "local")
    assert sorted(os.listdir(base / "local")) == [".train.lmdb.stage-lock"]


def test_s3_a_truncated_object_is_refused(tmp_path, s3):
    make_tree(tmp_path / "src", {"train": {"a": 6}})
    run_convert(tmp_path / "src", tmp_path / "shared")
    _, bucket, fs = s3
    data = open(db(tmp_path / "shared"), "rb").read()
    url = f"s3://{bucket}/train.lmdb"
    fs.pipe(url, data[:len(data) // 2])
    with pytest.raises(DatabaseError, match=f"the copy of {url} .* is cut short: it has"):
        stage.stage(url, tmp_path / "local")
    assert not os.path.exists(tmp_path / "local" / "train.lmdb")
    assert not os.path.exists(tmp_path / "local" / "train.lmdb.partial")


def _stage_and_stat(args):
    url, local = args
    return os.stat(stage.stage(url, local)).st_ino


@pytest.mark.timeout(180)
def test_s3_ranks_of_a_node_staging_at_once_download_once(made, s3, s3_server):
    base, source = made
    _, bucket, fs = s3
    url = _upload(fs, source, bucket)
    s3_server.requests.clear()
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        inodes = pool.map_async(_stage_and_stat, [(url, os.fspath(base / "local"))] * 3) \
            .get(timeout=150)
    assert len(set(inodes)) == 1
    assert sorted(s3_server.data_gets()) == sorted(
        f"/{bucket}/" + os.path.relpath(p, os.path.dirname(source)) for p in _data_files(source))


def test_s3_missing_objects_and_buckets_are_named(tmp_path, s3):
    _, bucket, _ = s3
    for url in (f"s3://{bucket}/nothing.lmdb", "s3://no-such-bucket-here/train.lmdb"):
        with pytest.raises(DatabaseError, match=f"{url}: no such object; check the URL"):
            stage.stage(url, tmp_path / "local")


def test_a_missing_backend_says_what_to_install(tmp_path, monkeypatch):
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "nosuchfs",
                        {"class": "nosuchfs_module.NoSuchFS", "err": "Install nosuchfs"})
    with pytest.raises(DatabaseError, match=r"nosuchfs://b/train.lmdb: the fsspec backend for "
                                            r"nosuchfs:// is not installed .*pip install "
                                            r"'fastlmdb\[remote\]'"):
        stage.stage("nosuchfs://b/train.lmdb", tmp_path / "local")


def test_cli_stage_from_s3(made, s3, capsys, monkeypatch):
    base, source = made
    endpoint, bucket, fs = s3
    url = _upload(fs, source, bucket)
    assert cli.main(["stage", url, os.fspath(base / "local"), "--procs", "1"]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(base / "local", "train.lmdb")
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint given as an fsspec option instead
    options = f'{{"client_kwargs": {{"endpoint_url": "{endpoint}"}}}}'
    assert cli.main(["stage", url, os.fspath(base / "l3"), "--storage-options", options]) == 0
    assert_same_database(capsys.readouterr().out.strip(), source)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(SystemExit):
        cli.main(["stage", url, os.fspath(base / "l4"), "--storage-options", "[1]"])
    assert "--storage_options: must be a JSON object, got '[1]'" in capsys.readouterr().err
    missing = f"s3://{bucket}/other.lmdb"
    assert cli.main(["stage", missing, os.fspath(base / "l2")]) == 1
    assert f"{missing}: no such object" in capsys.readouterr().err


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; records GETs; `cut` cuts .lmdb bodies short, `deny` answers 403."""

    def do_GET(self):
        self.server.gets.append(self.path)
        if self.server.deny:
            return self.send_error(403)
        if self.server.cut and self.path.endswith(".lmdb"):
            data = open(self.translate_path(self.path), "rb").read()[:1000]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return self.wfile.write(data)
        return super().do_GET()

    def do_HEAD(self):
        if self.server.deny:
            return self.send_error(403)
        return super().do_HEAD()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """(base URL, server) serving tmp_path/shared on 127.0.0.1."""
    os.makedirs(tmp_path / "shared", exist_ok=True)
    handler = functools.partial(_Handler, directory=os.fspath(tmp_path / "shared"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.gets, server.cut, server.deny = [], False, False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    thread.join(timeout=10)


def test_http_copy_equals_the_source_and_is_reused(made, http_root):
    base, source = made
    root, server = http_root
    url = f"{root}/train.lmdb"
    path = stage.stage(url, base / "local")
    assert_same_database(path, source)
    assert any(p.endswith(".lmdb") for p in server.gets)
    server.gets.clear()
    assert stage.stage(url, base / "local") == path
    assert not any(p.endswith(".lmdb") for p in server.gets)


def test_http_a_cut_short_download_is_refused(made, http_root):
    base, source = made
    root, server = http_root
    server.cut = True
    with pytest.raises(DatabaseError, match=f"the download of {root}/train.lmdb.* was cut "
                                            "short: 1000 of [0-9]+ bytes; run again"):
        stage.stage(f"{root}/train.lmdb", base / "local")
    assert sorted(os.listdir(base / "local")) == [".train.lmdb.stage-lock"]


def test_http_access_denied_says_to_check_credentials(tmp_path, http_root):
    root, server = http_root
    server.deny = True
    with pytest.raises(DatabaseError, match=f"{root}/train.lmdb.*: access denied .*check the "
                                            "credentials"):
        stage.stage(f"{root}/train.lmdb", tmp_path / "local")

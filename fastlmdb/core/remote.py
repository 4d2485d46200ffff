"""A database at an fsspec URL (s3://, gs://, http(s)://, ...), for `stage`: the files it is
made of, what says they are unchanged, and a streamed download of each.

A URL is one database file, or the folder of a sharded one: `URL/index.json` names its shards,
and `plan.json` comes along when there is one. fsspec and its backends are imported here, when
a URL is staged; a missing one gets a message saying what to install.
"""

import inspect
import logging
import os
import time

from fastlmdb.core import format as fmt
from fastlmdb.core.errors import DatabaseError

log = logging.getLogger(__name__)

PLAN = "plan.json"
# What fsspec's info() may say about an object's version, by backend (S3, GCS, HTTP, others).
VERSION_KEYS = ("ETag", "VersionId", "LastModified", "generation", "md5Hash", "updated",
                "Last-Modified", "Content-MD5", "mtime", "modified", "last_modified")
INSTALL = "pip install 'fastlmdb[remote]' (s3:// and http(s)://; gcsfs for gs://)"


def is_url(db):
    """Whether `db` is a URL for fsspec rather than a local path (file:// is local)."""
    return isinstance(db, str) and "://" in db and not db.startswith("file://")


class RemoteDatabase:
    """The database at `url`, read through fsspec with `storage_options` (e.g. endpoint)."""

    def __init__(self, url, storage_options=None):
        self.url = url.rstrip("/")
        self.name = self.url.rsplit("/", 1)[-1]
        self.fs, self.path = _filesystem(self.url, storage_options or {})
        self._files = None

    def identity(self):
        """Every file's name, size and version (ETag, mtime...: whatever the backend says)."""
        self.fs.invalidate_cache()  # fresh answers, not a listing cached by an earlier call
        self._files = self._listing()
        if not any(_version(info) for _, info in self._files):
            log.warning("%s: the server gives no ETag or modification time; a change is "
                        "noticed only when a size changes", self.url)
        return {"source": self.url,
                "files": [[name, info.get("size"), _version(info)] for name, info in self._files]}

    def copy(self, partial):
        """Download the files listed by the last identity() to `partial` (a file or a folder,
        whose index comes last), each streamed to disk; a short download is refused."""
        started, total = time.monotonic(), 0
        if self._files[0][0] is None:
            total += self._download(self.path, self._files[0][1], partial)
        else:
            os.makedirs(partial)
            for name, info in self._files:
                total += self._download(f"{self.path}/{name}", info, os.path.join(partial, name))
        seconds = time.monotonic() - started
        log.info("downloaded %s: %.1f MB in %.1f s (%.0f MB/s)", self.url, total / 1e6, seconds,
                 total / 1e6 / max(seconds, 1e-9))

    def _listing(self):
        """[(None, info)] for one file; [(name, info), ..., ("index.json", info)] for shards."""
        index_path = f"{self.path}/{fmt.SHARD_INDEX}"
        index_info = self._info(index_path, missing_ok=True)
        if index_info is None:
            info = self._info(self.path)
            if info.get("type") == "directory":
                raise DatabaseError(f"{self.url} is a folder without {fmt.SHARD_INDEX}: not a "
                                    "finished sharded database; check the URL or upload the "
                                    "whole folder")
            return [(None, info)]
        index = self._read_index(index_path)
        names = [entry["file"] for entry in index["shards"]]
        listing = [(name, self._info(f"{self.path}/{name}")) for name in names]
        plan = self._info(f"{self.path}/{PLAN}", missing_ok=True)
        return listing + ([(PLAN, plan)] if plan else []) + [(fmt.SHARD_INDEX, index_info)]

    def _read_index(self, index_path):
        """The shard index, checked by the format as a local one is (plain file names only,
        so a damaged index cannot write outside the target folder)."""
        url = f"{self.url}/{fmt.SHARD_INDEX}"
        try:
            with self.fs.open(index_path, "rb") as file:
                raw = file.read()
        except Exception as exc:  # noqa: BLE001 - any backend's error, with the URL added
            raise _error(url, exc) from exc
        return fmt.check_shard_index(fmt.load_json(raw, "index", url), url)

    def _info(self, path, missing_ok=False):
        try:
            return self.fs.info(path)
        except FileNotFoundError as exc:
            if _denied(exc):
                raise _error(self._url_of(path), exc) from exc
            if missing_ok:
                return None
            raise DatabaseError(f"{self._url_of(path)}: no such object; check the URL (a "
                                "sharded database is the folder holding index.json)") from None
        except Exception as exc:  # noqa: BLE001
            raise _error(self._url_of(path), exc) from exc

    def _download(self, path, info, local):
        url = self._url_of(path)
        extra = _streamed(self.fs)
        try:
            self.fs.get_file(path, local, **extra)
        except Exception as exc:  # noqa: BLE001
            raise _error(url, exc, during="download") from exc
        got, expected = os.path.getsize(local), info.get("size")
        if expected is not None and got != expected:
            raise DatabaseError(f"the download of {url} was cut short: {got} of {expected} "
                                "bytes; run again (check the network or the server)")
        return got

    def _url_of(self, path):
        return self.url + path[len(self.path):] if path.startswith(self.path) else path


def _filesystem(url, storage_options):
    try:
        import fsspec
    except ImportError:
        raise DatabaseError(f"{url}: staging from a URL needs fsspec: {INSTALL}") from None
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as exc:
        raise DatabaseError(f"{url}: the fsspec backend for {url.split('://')[0]}:// is "
                            f"not installed ({exc}): {INSTALL}") from None
    except ValueError as exc:
        raise DatabaseError(f"{url}: fsspec cannot open this URL ({exc}); check the "
                            "protocol") from None
    return fs, path.rstrip("/")


def _streamed(fs):
    """get_file options for one streamed GET per file (constant memory): a recent s3fs (2026.9
    here) fetches a big object in 10 parts of 50 MiB held in memory at once unless told
    `max_concurrency=1`; older ones, and the other backends (http, gcsfs, the default),
    stream in chunks of a few MiB already. Against moto on 127.0.0.1 streaming was also the
    fastest (165-268 MB/s, 1 MB of Python memory, vs 80-107 MB/s and 321 MB for s3fs's parts)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    get_file = getattr(fs, "_get_file", None)
    if "s3" in protocols and get_file is not None \
            and "max_concurrency" in inspect.signature(get_file).parameters:
        return {"max_concurrency": 1}
    return {}


def _version(info):
    return {key: str(info[key]) for key in VERSION_KEYS if info.get(key) not in (None, "")}


def _denied(exc):
    """Whether a FileNotFoundError stands for a 401/403 (fsspec's http turns them into one)."""
    return any(getattr(e, "status", None) in (401, 403) for e in (exc.__cause__, exc.__context__))


def _error(url, exc, during="access"):
    """A DatabaseError naming `url` and saying what to do, for an error of any backend."""
    status = getattr(exc, "status", None)
    if isinstance(exc, PermissionError) or status in (401, 403) or _denied(exc):
        return DatabaseError(f"{url}: access denied ({exc}); check the credentials (S3: "
                             "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE; gs://: "
                             "GOOGLE_APPLICATION_CREDENTIALS) and that they may read it")
    if isinstance(exc, FileNotFoundError) or status == 404:
        return DatabaseError(f"{url}: no such object ({exc}); check the URL")
    return DatabaseError(f"{url}: {during} failed ({type(exc).__name__}: {exc}); check the "
                         "address, the endpoint (AWS_ENDPOINT_URL for S3 that is not AWS) and "
                         "the network, then run again")


# Streaming (fastlmdb.loading.streaming) and `upload`: the objects under one URL, read in
# ranges and written, each call retried with backoff when the failure may pass (a network
# error, a 5xx, a server restarting), then failing with the URL named.
RETRIES = 5
BACKOFF_S = 0.2  # doubles after each failed try: 0.2 + 0.4 + ... = 6 s before giving up


class RemoteFolder:
    """The objects under the prefix `url` (a sharded database's folder). Picklable: the fsspec
    filesystem is made again in each process (an s3fs client must not cross a fork)."""

    def __init__(self, url, storage_options=None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self._fs = self._pid = None

    def __getstate__(self):
        return {**self.__dict__, "_fs": None, "_pid": None}

    def _filesystem(self):
        if self._pid != os.getpid():
            options = {**self.storage_options, "skip_instance_cache": True}
            self._fs = _filesystem(self.url, options)
            self._pid = os.getpid()
        return self._fs

    def url_of(self, name):
        return f"{self.url}/{name}"

    def _path(self, name):
        return f"{self._filesystem()[1]}/{name}"

    def stat(self, name, missing_ok=False):
        """(size, version) of object `name` (version: what the backend says, e.g. ETag), or
        None when it is missing and `missing_ok`."""
        fs = self._filesystem()[0]

        def info():
            fs.invalidate_cache()
            return fs.info(self._path(name))

        try:
            found = retried(self.url_of(name), info)
        except DatabaseError as exc:
            if missing_ok and isinstance(exc.__cause__, FileNotFoundError) \
                    and not _denied(exc.__cause__):
                return None
            raise
        return found.get("size"), _version(found)

    def read(self, name):
        """The whole (small) object `name`."""
        fs = self._filesystem()[0]
        return retried(self.url_of(name), lambda: fs.cat_file(self._path(name)))

    def read_range(self, name, start, end, size):
        """Bytes start..end-1 of object `name`, whose size is `size`."""
        fs = self._filesystem()[0]

        def get():
            data = fs.cat_file(self._path(name), start=start, end=end)
            if len(data) == size != end - start:  # a server that ignores Range
                data = data[start:end]
            if len(data) != end - start:
                raise OSError(f"got {len(data)} bytes of range {start}-{end}")
            return data

        return retried(self.url_of(name), get, during="download")

    def put(self, local, name):
        fs = self._filesystem()[0]
        retried(self.url_of(name), lambda: fs.put_file(local, self._path(name)),
                during="upload")

    def remove(self, name):
        fs = self._filesystem()[0]
        try:
            fs.rm_file(self._path(name))
        except FileNotFoundError:
            pass


def retried(url, call, during="access"):
    """call(), tried again with backoff while its failure may pass; else a DatabaseError
    naming `url` (at once for a missing object or a denied access)."""
    for attempt in range(RETRIES + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - any backend's error
            permanent = isinstance(exc, (FileNotFoundError, PermissionError)) \
                or getattr(exc, "status", None) in (400, 401, 403, 404) or _denied(exc)
            if permanent or attempt == RETRIES:
                if attempt:
                    log.warning("%s: giving up after %d tries", url, attempt + 1)
                raise _error(url, exc, during) from exc
            log.warning("%s: %s failed (%s: %s); trying again in %.1f s", url, during,
                        type(exc).__name__, exc, BACKOFF_S * 2 ** attempt)
            time.sleep(BACKOFF_S * 2 ** attempt)
    raise AssertionError("unreachable")

"""A compressed tar (gzip, bzip2, xz), read in order by one reader: nothing is extracted.

A compressed stream cannot be read at random, and the classes and ImageFolder's order must be
known before the first record is written, so it is read twice: `members()` decompresses it
once and names every member (as for an uncompressed tar, a member ``<name>.tar`` that is a
tar is listed inside too), then an `InOrderReader` decompresses it again and hands over the bytes of
the members asked for, in the stream's order, one member in memory at a time. A Member's
place is its position in the stream (its ordinal); the records are written in that order.
Headers are read by sources/tarheaders.py (tarfile's parsing costs about half as much as
inflating, per JPEG), or by tarfile where that leaves something to it.
"""

import bz2
import functools
import io
import itertools
import logging
import lzma
import os
import tarfile
import zlib

import numpy as np

from fastlmdb.sources import archive, tarheaders
from fastlmdb.sources.archive import DECOMPRESS, STREAM, Member, clean_name, regular_files
from fastlmdb.core.errors import ConversionError

log = logging.getLogger(__name__)

_DRAIN = 1 << 20
_GZIP = 16 + zlib.MAX_WBITS  # zlib's wbits for a gzip member (it checks the CRC-32 too)
# Inflated 128 KB in, at most 256 KB out at a time: measured quickest (0.73 CPU-s for 322 MB,
# 0.8 by 8 KB; 1 MB pieces take longer: zlib grows and copies its output, and the input left).
_RAW_PIECE, _OUT_PIECE = 1 << 17, 1 << 18
_LOG_EVERY = 0.1  # of the compressed file: a progress line in the log


class _Gunzip(io.RawIOBase):
    """The bytes of a gzip file (members one after another; zero padding after them), inflated
    in large pieces: GzipFile inflates 8 KB at a time in Python, which costs as much again as
    inflating."""

    def __init__(self, raw):
        self.raw, self.inflate, self.tail = raw, zlib.decompressobj(_GZIP), b""

    def readable(self):
        return True

    def readinto(self, out):
        while True:
            if self.inflate.eof and not self._next_member():
                return 0
            if not self.tail:
                self.tail = self.raw.read(_RAW_PIECE)
                if not self.tail:
                    raise EOFError("compressed file ended before the end-of-stream marker was "
                                   "reached")
            data = self.inflate.decompress(self.tail, min(len(out), _OUT_PIECE))
            self.tail = self.inflate.unconsumed_tail
            if data:
                out[:len(data)] = data
                return len(data)

    def _next_member(self):
        """Start on the next gzip member; False at the end of the file."""
        rest = self.inflate.unused_data.lstrip(b"\0")
        while not rest:
            more = self.raw.read(_RAW_PIECE)
            if not more:
                return False
            rest = more.lstrip(b"\0")
        self.inflate, self.tail = zlib.decompressobj(_GZIP), rest
        return True


def _gunzip(raw):
    return io.BufferedReader(_Gunzip(raw), _OUT_PIECE)


OPENERS = {"gzip": _gunzip, "bzip2": bz2.open, "xz": lzma.open}


def members(path, kind, keep=None):
    """The Members of the `kind`-compressed tar at `path`, in stream order; those that are
    tars themselves carry their own Members as `inner` (None where it is not a tar). Those
    whose name `keep(name)` is true carry their bytes as `content` (WebDataset's labels)."""
    if kind not in OPENERS:
        raise ConversionError(f"{path} is a {kind}-compressed tar, which this Python cannot "
                              f"read: decompress it first ({DECOMPRESS[kind]} {path}) and pass "
                              "the .tar")
    log.info("%s is %s-compressed: listing its members (a first pass over the stream; a "
             "second one reads them)", path, kind)
    try:
        return _listing(path, kind, False, keep)
    except tarheaders.Unusual as exc:
        log.info("%s: %s; listing it again with tarfile", path, exc)
        found = _listing(path, kind, True, keep)
        for member in found:
            member.by_tarfile = True  # the Reader must walk it as the listing did
        return found


def _listing(path, kind, by_tarfile, keep):
    found, inner_of = [], None
    for ordinal, name, size, data, parent in _units(path, kind, by_tarfile):
        member = Member(name, path, ordinal, size, STREAM)
        if keep is not None and keep(name):
            member.content = data()
        if parent is None:
            found.append(member)
            member.inner = inner_of = None
        else:  # a member of the last outer one, a tar
            if inner_of is None:
                inner_of = found[-1].inner = []
            inner_of.append(member)
    return found


class InOrderReader:
    """The bytes of a compressed tar's members, by one sequential pass: members are asked
    for in stream order (increasing ordinals), whatever comes between is read through."""

    def __init__(self, path, kind):
        self.path, self.kind, self._units = path, kind, None

    def read(self, wanted):
        """[bytes] of the Members `wanted` (of members()), which follow those asked for
        before."""
        if self._units is None:
            log.info("reading the members of %s in order", self.path)
            by_tarfile = getattr(wanted[0], "by_tarfile", False)
            self._units = _units(self.path, self.kind, by_tarfile)
        return [self._one(member) for member in wanted]

    def _one(self, member):
        try:
            for ordinal, name, size, data, _ in self._units:
                if ordinal == member.where[1]:
                    if name != getattr(member, "inside", member) or size != member.where[2]:
                        break
                    return data()
                if ordinal > member.where[1]:
                    break
        except tarheaders.Unusual:  # the listing found nothing unusual: it changed since
            pass
        raise ConversionError(f"{member} is no longer where the first pass over {self.path} "
                              "found it: the archive changed during the conversion; run the "
                              "same command again")

    def close(self):
        if self._units is not None:
            self._units.close()


class InOrderShards:
    """InOrderReaders of one or more compressed tars (WebDataset shards), one open at a time:
    members are asked for by shard, then in stream order."""

    def __init__(self):
        self.reader = None

    def read(self, wanted):
        data = []
        for path, members in itertools.groupby(wanted, key=lambda member: member.archive):
            if self.reader is None or self.reader.path != path:
                self.close()
                self.reader = InOrderReader(path, archive.compression(path))
            data += self.reader.read(list(members))
        return data

    def close(self):
        if self.reader is not None:
            self.reader.close()


def stream_order(paths):
    """Positions of compressed tar members `paths` in the order they are read: by archive
    (in order of first appearance), then stream position."""
    ranks = {}
    keys = [(ranks.setdefault(path.archive, len(ranks)), path.where[1]) for path in paths]
    return np.asarray(sorted(range(len(paths)), key=keys.__getitem__), dtype=np.int64)


def _units(path, kind, by_tarfile):
    """(ordinal, name, size, data, parent name or None) of every regular file in stream
    order; a member that is a tar is followed by its own files (``name.tar/inner``). Each
    one's bytes (data()) can be read only until the next one is asked for."""
    size = os.path.getsize(path)
    progress = _Progress(path, size)
    try:
        with open(path, "rb") as raw, OPENERS[kind](raw) as stream:
            walk = _tarfile_walk(stream, path) if by_tarfile else _walk(_Forward(stream))
            for ordinal, unit in enumerate(walk):
                yield (ordinal, *unit)
                progress.at(raw.tell())
            while stream.read(_DRAIN):  # to the end: a cut-off stream says so only there
                pass
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        where = f" at {progress.done / 1e6:,.0f} of {size / 1e6:,.0f} MB" if progress.done else ""
        raise ConversionError(f"{path} is truncated or damaged{where} ({exc}): download it "
                              "again (gzip -t, bzip2 -t or xz -t checks the file)") from None


def _walk(source):
    """(name, size, data, parent) of the stream's files, headers read by sources/tarheaders.py
    (Unusual where tarfile must read them)."""
    for name, at, size in tarheaders.walk_stream(source.pread, 0):
        name = clean_name(name)
        yield name, size, functools.partial(source.pread, size, at), None
        if not name.lower().endswith(".tar") or \
                not tarheaders.is_header(source.pread(tarheaders.BLOCK, at)):
            continue
        for inner, inner_at, inner_size in tarheaders.walk_stream(source.pread, at, at + size):
            yield (f"{name}/{clean_name(inner)}", inner_size,
                   functools.partial(source.pread, inner_size, inner_at), name)


def _tarfile_walk(stream, path):
    """What _walk yields, read by tarfile (links and devices refused, named)."""
    tar = tarfile.open(fileobj=stream, mode="r|")
    for info in regular_files(tar, path, ""):
        name = clean_name(info.name)
        yield name, info.size, tar.extractfile(info).read, None
        if name.lower().endswith(".tar"):
            for inner, extract in _inner(tar, info, path, name):
                yield f"{name}/{clean_name(inner.name)}", inner.size, extract(inner).read, name


def _inner(tar, info, path, name):
    """(TarInfo, extract) of the regular files of the outer member `info`, if it is a tar
    (else none)."""
    try:
        inner = tarfile.open(fileobj=tar.extractfile(info), mode="r|")
    except tarfile.ReadError:  # not a tar: a plain member (the scan says what it is)
        return
    for found in regular_files(inner, path, f"{name}/"):
        yield found, inner.extractfile


class _Forward:
    """``pread`` on a decompressed stream, forward only: what lies before the last position
    asked for is gone (tar headers are followed in order)."""

    def __init__(self, stream):
        self.stream, self.start, self.buffer = stream, 0, b""  # buffer: bytes from start on
        self.scratch = bytearray(_DRAIN)

    def pread(self, size, at):
        self._skip_to(at)
        if not self.buffer:  # the usual case: a header, or a member's bytes after it
            self.buffer = self.stream.read(size)
        elif len(self.buffer) < size:
            self.buffer += self.stream.read(size - len(self.buffer))
        return self.buffer[:size]  # the buffer itself when it is that size

    def _skip_to(self, at):
        ahead = at - self.start
        if ahead < 0:
            raise tarheaders.Unusual("a header before the last one read")
        if ahead > len(self.buffer):
            left = ahead - len(self.buffer)
            while left:
                read = self.stream.readinto(memoryview(self.scratch)[:min(left, _DRAIN)])
                if not read:
                    break
                left -= read
            self.buffer = b""
        else:
            self.buffer = self.buffer[ahead:]
        self.start = at


class _Progress:
    """A log line each time another tenth of the compressed file has been read."""

    def __init__(self, path, size):
        self.path, self.size, self.done, self.next = path, size, 0, _LOG_EVERY * size

    def at(self, done):
        self.done = done
        if done >= self.next:
            log.info("%s: %s of %s MB read", self.path, f"{done / 1e6:,.1f}",
                     f"{self.size / 1e6:,.1f}")
            self.next = done + _LOG_EVERY * self.size

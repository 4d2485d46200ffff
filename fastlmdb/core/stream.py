"""A compressed tar (gzip, bzip2, xz), read in order by one reader: nothing is extracted.

A compressed stream cannot be read at random, and the classes and ImageFolder's order must be
known before the first record is written, so it is read twice: `members()` decompresses it
once and names every member (as for an uncompressed tar, a member ``<name>.tar`` that is a
tar is listed inside too), then a `Reader` decompresses it again and hands over the bytes of
the members asked for, in the stream's order, one member in memory at a time. A Member's
place is its position in the stream (its ordinal); the records are written in that order.
"""

import bz2
import gzip
import logging
import lzma
import os
import tarfile
import zlib

from fastlmdb.core.archive import DECOMPRESS, STREAM, Member, clean_name, regular_files
from fastlmdb.core.errors import ConversionError

log = logging.getLogger(__name__)

OPENERS = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}
_DRAIN = 1 << 20
_LOG_EVERY = 0.1  # of the compressed file: a progress line in the log


def members(path, kind):
    """The Members of the `kind`-compressed tar at `path`, in stream order; those that are
    tars themselves carry their own Members as `inner` (None where it is not a tar)."""
    if kind not in OPENERS:
        raise ConversionError(f"{path} is a {kind}-compressed tar, which this Python cannot "
                              f"read: decompress it first ({DECOMPRESS[kind]} {path}) and pass "
                              "the .tar")
    found, inner_of = [], None
    log.info("%s is %s-compressed: listing its members (a first pass over the stream; a "
             "second one reads them)", path, kind)
    for ordinal, name, info, _, parent in _units(path, kind):
        member = Member(name, path, ordinal, info.size, STREAM)
        if parent is None:
            found.append(member)
            member.inner = inner_of = None
        else:  # a member of the last outer one, a tar
            if inner_of is None:
                inner_of = found[-1].inner = []
            inner_of.append(member)
    return found


class Reader:
    """The bytes of a compressed tar's members, by one sequential pass: members are asked
    for in stream order (increasing ordinals), whatever comes between is read through."""

    def __init__(self, path, kind):
        self.path, self.kind, self._units = path, kind, None

    def read(self, wanted):
        """[bytes] of the Members `wanted`, which follow those asked for before."""
        if self._units is None:
            log.info("reading the members of %s in order", self.path)
            self._units = _units(self.path, self.kind)
        return [self._one(member) for member in wanted]

    def _one(self, member):
        for ordinal, name, info, extract, _ in self._units:
            if ordinal == member.where[1]:
                if name != member or info.size != member.where[2]:
                    break
                return extract(info).read()
            if ordinal > member.where[1]:
                break
        raise ConversionError(f"{member} is no longer where the first pass over {self.path} "
                              "found it: the archive changed during the conversion; run the "
                              "same command again")

    def close(self):
        if self._units is not None:
            self._units.close()


def _units(path, kind):
    """(ordinal, name, TarInfo, extract, parent name or None) of every regular file in stream
    order; a member that is a tar is followed by its own files (``name.tar/inner``). Each
    one's bytes are readable (extract(info)) only until the next is asked for."""
    size = os.path.getsize(path)
    progress = _Progress(path, size)
    try:
        with open(path, "rb") as raw, OPENERS[kind](raw) as stream:
            tar = tarfile.open(fileobj=stream, mode="r|")
            ordinal = 0
            for info in regular_files(tar, path, ""):
                name = clean_name(info.name)
                yield ordinal, name, info, tar.extractfile, None
                ordinal += 1
                if name.lower().endswith(".tar"):
                    for inner, extract in _inner(tar, info, path, name):
                        yield ordinal, f"{name}/{clean_name(inner.name)}", inner, extract, name
                        ordinal += 1
                progress.at(raw.tell())
            while stream.read(_DRAIN):  # to the end: a cut-off stream says so only there
                pass
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        where = f" at {progress.done / 1e6:,.0f} of {size / 1e6:,.0f} MB" if progress.done else ""
        raise ConversionError(f"{path} is truncated or damaged{where} ({exc}): download it "
                              "again (gzip -t, bzip2 -t or xz -t checks the file)") from None


def _inner(tar, info, path, name):
    """(TarInfo, extract) of the regular files of the outer member `info`, if it is a tar
    (else none)."""
    try:
        inner = tarfile.open(fileobj=tar.extractfile(info), mode="r|")
    except tarfile.ReadError:  # not a tar: a plain member (the scan says what it is)
        return
    for found in regular_files(inner, path, f"{name}/"):
        yield found, inner.extractfile


class _Progress:
    """A log line each time another tenth of the compressed file has been read."""

    def __init__(self, path, size):
        self.path, self.size, self.done, self.next = path, size, 0, _LOG_EVERY * size

    def at(self, done):
        self.done = done
        if done >= self.next:
            log.info("%s: %s of %s MB read", self.path, f"{done / 1e6:,.0f}",
                     f"{self.size / 1e6:,.0f}")
            self.next = done + _LOG_EVERY * self.size

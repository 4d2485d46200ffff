"""Members of a tar or zip archive, found once and then read by byte offset.

An uncompressed tar is scanned once over its headers (sources/tarheaders.py, one ``pread`` each;
a member that is itself a tar is scanned the same way, in place); a zip's central directory
lists every member, and its local headers say where each one's data starts. After that any
process reads any member with one ``pread`` (a deflated zip member is inflated by the
reader), so nothing is extracted and the archive is read once. A compressed tar can only be
read in order, from its start: sources/stream.py reads it.
"""

import logging
import os
import struct
import tarfile
import zipfile
import zlib

from fastlmdb.sources import tarheaders
from fastlmdb.sources.refs import Ref
from fastlmdb.core.errors import ConversionError, ImageError

log = logging.getLogger(__name__)

STORED, DEFLATED, TAR, STREAM = zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, -1, -2
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
               b"\x28\xb5\x2f\xfd": "zstd"}
DECOMPRESS = {"gzip": "gunzip -k", "bzip2": "bunzip2 -k", "xz": "unxz -k", "zstd": "unzstd"}
# Fields of a zip local file header (zipfile.structFileHeader): its name and extra lengths.
_NAME_LENGTH, _EXTRA_LENGTH = 10, 11


class Member(Ref):
    """A file inside an archive: the str is its name there (an inner tar's member is
    ``outer.tar/inner``); where its bytes are travels with it (and pickles with it)."""

    def __new__(cls, name, archive, offset, size, method=TAR, crc=0):
        member = super().__new__(cls, name)
        member.where = (archive, offset, size, method, crc)
        return member

    @property
    def archive(self):
        return self.where[0]

    container = archive

    def identity(self):
        """Bytes that tell this member from any other (name, place, size)."""
        return b"%s\0%d\0%d\0" % (self.encode("utf-8", "surrogateescape"), *self.where[1:3])

    def read(self, check_crc=True):
        return read(self, check_crc)

    def rereadable(self):
        return rereadable(self)

    def known_crc(self):
        return known_crc(self)

    def size(self):
        return self.where[2]

    def __reduce__(self):
        return Member, (str(self), *self.where)


def is_archive(path):
    """Whether `path` is a file to read as a tar or zip (a folder is not)."""
    return os.path.isfile(path)


def members(path):
    """Every regular file of the uncompressed tar or zip at `path`, as Members, in archive
    order (a compressed tar: sources/stream.py)."""
    path = os.path.abspath(path)
    if zipfile.is_zipfile(path):
        return list(_zip_members(path))
    return _tar_members(path, 0, os.path.getsize(path), "", path)


def inner_members(member):
    """The regular files of a member that is an uncompressed tar, as Members of the outer
    archive (names ``member/inner``)."""
    archive, offset, size, method, _ = member.where
    if method == STREAM:
        if member.inner is None:
            raise ConversionError(f"{member} in {archive} is not a tar")
        return member.inner
    if method != TAR:
        raise ConversionError(f"{member} in {archive} is a tar inside a zip: only tars inside "
                              "an uncompressed tar are read in place; extract the outer zip")
    magic = os.pread(_fd(archive), 6, offset)
    if any(magic.startswith(head) for head in _COMPRESSED):
        raise ConversionError(f"{member} in {archive} is compressed: inner tars must be "
                              "plain tars")
    found = _tar_members(archive, offset, offset + size, f"{member}/", f"{member} in {archive}")
    for inner in found:
        if inner.where[1] + inner.where[2] > offset + size:
            raise ConversionError(f"{inner} in {archive} ends past the end of {member}: the "
                                  "archive is damaged")
    return found


def read(member, check_crc=True):
    """The bytes of `member`; ImageError says what went wrong. `check_crc=False` leaves a zip
    member's CRC-32 to a caller that compares the bytes' own checksum anyway."""
    archive, offset, size, method, crc = member.where
    if method == STREAM:
        raise ImageError(f"{archive} is compressed: its members can only be read in order")
    try:
        data = os.pread(_fd(archive), size, offset)
        if method == DEFLATED:
            data = zlib.decompress(data, -15)
        if method != TAR and check_crc and zlib.crc32(data) != crc:
            raise OSError("CRC-32 mismatch: the member is damaged")
    except (OSError, zlib.error) as exc:
        raise ImageError(f"cannot read the member from {archive} ({exc})") from None
    if method == TAR and len(data) != size:
        raise ImageError(f"{archive} ends inside this member: the archive is truncated")
    if not data:
        raise ImageError("zero-byte file")
    return data


def rereadable(member):
    """Whether reading `member` again costs no more than a file's read (not inflated)."""
    return member.where[3] not in (DEFLATED, STREAM)


def known_crc(member):
    """The CRC-32 of a zip member's bytes, checked by read(); None for a tar member."""
    return None if member.where[3] in (TAR, STREAM) else member.where[4]


def in_order_only(paths):
    """Whether the files `paths` (a Listing's) are members of a compressed tar."""
    return bool(paths) and isinstance(paths[0], Member) and paths[0].where[3] == STREAM


def _tar_members(archive, start, end, prefix, where):
    """The Members of the tar at bytes [start, end) of `archive`; tarfile reads what
    tarheaders leaves to it (links, sparse files, ...)."""
    fd = _fd(archive)
    try:
        found = tarheaders.list_headers(fd, start, end)
    except tarheaders.Truncated as exc:
        raise ConversionError(f"{where} is not a readable tar or zip archive ({exc})") from None
    except tarheaders.Unusual as exc:
        log.debug("%s: %s; reading its headers with tarfile", where, exc)
        with open(archive, "rb") as file:
            file.seek(start)
            return list(_tarfile_members(archive, file, prefix, where))
    return [Member(prefix + clean_name(name), archive, offset, size)
            for name, offset, size in found]


def _tarfile_members(archive, file, prefix, where):
    try:
        tar = tarfile.open(fileobj=file, mode="r:")
        for info in regular_files(tar, archive, prefix):
            yield Member(prefix + clean_name(info.name), archive, info.offset_data, info.size)
    except tarfile.TarError as exc:
        raise ConversionError(f"{where} is not a readable tar or zip archive ({exc})") from None


def regular_files(tar, archive, prefix):
    """The TarInfos of the regular files of an open tarfile, in order, folders left out; a
    link, device or sparse file stops the scan, named (`prefix`: of an inner tar's names)."""
    while (info := tar.next()) is not None:
        tar.members.clear()  # one pass, bounded memory: nothing looks back
        if info.isdir():
            continue
        if not info.isreg() or info.issparse():
            raise ConversionError(f"{prefix}{info.name} in {archive} is not a regular file "
                                  "(a link, device or sparse file): archives of plain files "
                                  "only")
        yield info


def _zip_members(archive):
    fd = _fd(archive)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            if info.flag_bits & 0x1:
                raise ConversionError(f"{info.filename} in {archive} is encrypted")
            if info.compress_type not in (STORED, DEFLATED):
                raise ConversionError(
                    f"{info.filename} in {archive} uses zip compression method "
                    f"{info.compress_type}: only stored and deflated members are read")
            yield Member(clean_name(info.filename), archive, _zip_data_offset(fd, info, archive),
                         info.compress_size, info.compress_type, info.CRC)


def _zip_data_offset(fd, info, archive):
    """Where the member's data starts: after its local header, whose name and extra field
    may differ in length from the central directory's."""
    header = os.pread(fd, zipfile.sizeFileHeader, info.header_offset)
    if len(header) == zipfile.sizeFileHeader:
        fields = struct.unpack(zipfile.structFileHeader, header)
        if fields[0] == zipfile.stringFileHeader:
            return (info.header_offset + zipfile.sizeFileHeader + fields[_NAME_LENGTH]
                    + fields[_EXTRA_LENGTH])
    raise ConversionError(f"{info.filename} in {archive}: no zip member header at its "
                          "recorded offset: the archive is damaged")


def clean_name(name):
    """A member name as a relative path: no leading "./" or "/"."""
    while name.startswith(("./", "/")):
        name = name[2:] if name.startswith("./") else name[1:]
    return name


def compression(path):
    """"gzip", "bzip2", "xz" or "zstd" if the file at `path` is compressed so, else None."""
    with open(path, "rb") as file:
        magic = file.read(6)
    return next((kind for head, kind in _COMPRESSED.items() if magic.startswith(head)), None)


_fds = {}


def _fd(path):
    """A read-only descriptor of `path`, one per process (a fork's inherited ones are not
    reused: they share a file offset, which pread does not use, but stay the parent's)."""
    key = (os.getpid(), path)
    if key not in _fds:
        _fds[key] = os.open(path, os.O_RDONLY)
    return _fds[key]

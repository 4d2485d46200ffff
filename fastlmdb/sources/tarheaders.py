"""A fast reader of a tar's headers: regular files and folders, in order.

tarfile costs about 0.13 ms a member (a TarInfo, every field parsed); this reads each header
with one ``pread`` (scan: an uncompressed tar) or one read of a decompressed stream
(walk_stream) and parses only name, size and type: ustar and GNU headers, GNU long names
(``L``) and per-file pax headers (``x``, their ``path`` and ``size``). Checksums are checked
in one numpy pass per tar (a stream's: header by header). Anything else (links, devices,
sparse files, global pax headers, base-256 sizes, a bad checksum) raises Unusual, and the
caller reads that tar with tarfile, which knows every case: what is found here is what
tarfile finds.
"""

import os

import numpy as np

BLOCK = 512
_AHEAD = 3 * BLOCK  # a pax or long-name header, its data and the member's own header
_ZEROS = bytes(BLOCK)
_MAX_EXTRA = 1 << 20  # larger pax data or long names: damage, or tarfile's business
_REGULAR, _FOLDER, _PAX, _LONG_NAME = (b"0", b"\0", b"7"), b"5", b"x", b"L"
# A header's checksum is summed with its own field as 8 spaces.
_CHECKSUM, _SPACES = slice(148, 156), 8 * ord(" ")


class Unusual(Exception):
    """Something this reader leaves to tarfile."""


class Truncated(Exception):
    """The tar ends inside a member."""


def list_headers(fd, start, end):
    """[(name, data offset, size)] of the regular files of the tar at bytes [start, end) of
    `fd` (folders are left out); Unusual or Truncated where this reader cannot say."""
    headers = []
    walk = _walk(lambda size, at: os.pread(fd, size, at), start, end, headers.append, _AHEAD)
    found = []
    try:
        while True:
            found.append(next(walk))
    except StopIteration as stop:
        pos = stop.value
    _check_sums(headers)
    if pos > os.fstat(fd).st_size:
        raise Truncated("unexpected end of data")
    return found


def walk_stream(read, start, end=None):
    """(name, data offset, size) of each regular file of the tar at `start` (to `end`) of a
    stream read forward by `read(size, at)`: each header is checked before it is followed,
    so a member's bytes can be read (by `read`) before the next one is asked for."""
    return _walk(read, start, end, lambda head: _check_sums([head]), BLOCK)


def is_header(block):
    """Whether `block` (512 bytes) is a sound tar header."""
    try:
        _check_sums([block])
    except Unusual:
        return False
    return len(block) == BLOCK and block != _ZEROS


def _walk(read, start, end, seen, ahead):
    """Yields (name, data offset, size) of the regular files from `start` (folders left
    out), passing every header read to `seen`; returns where the headers ended. Each header
    is read with `ahead` bytes (a pread: the next ones too; a stream: its own only, so that
    the member's bytes are read once, by whoever wants them)."""
    pos, name, size, any_header = start, None, None, False
    while end is None or pos + BLOCK <= end:
        block = read(ahead, pos)
        head = block[:BLOCK]
        if len(head) < BLOCK or head == _ZEROS:  # the end of the archive (tarfile's too)
            break
        seen(head)
        any_header = True
        kind, own_size, data = head[156:157], _octal(head[124:136]), pos + BLOCK
        if kind in (_PAX, _LONG_NAME):
            name, size = _extended(kind, _extra(read, block, own_size, data), name, size)
            pos = data + _padded(own_size)
            continue
        if kind in _REGULAR:
            member = name if name is not None else _ustar_name(head)
            if not (kind == b"\0" and member.endswith("/")):  # a V7 folder
                yield member, data, own_size if size is None else size
        elif kind != _FOLDER:
            raise Unusual(f"member type {kind!r}")
        pos = data + _padded(own_size if size is None else size)
        name = size = None
    if not any_header:  # an empty file, or zeros only: tarfile says which
        raise Unusual("no header")
    if name is not None or size is not None:  # a pax or long-name header, then no member
        raise Unusual("header without its member")
    return pos


def _extra(read, block, size, at):
    """The data of a pax or long-name header (`block`: what was read from its header on)."""
    if size > _MAX_EXTRA:
        raise Unusual(f"a pax or long-name header of {size} bytes")
    extra = block[BLOCK:BLOCK + size] if len(block) >= BLOCK + size else read(size, at)
    if len(extra) < size:  # cut short, or a damaged size: tarfile says which
        raise Unusual("short pax or long-name data")
    return extra


def _extended(kind, extra, name, size):
    """(name, size) of the next member after a pax or GNU long-name header."""
    if kind == _PAX:
        return _pax(extra, name, size)
    return _text(extra.split(b"\0", 1)[0]), size


def _check_sums(headers):
    """Unusual unless each header's checksum field is the sum of its bytes (a damaged header's
    size means nothing: checked before the walk's result is used)."""
    if len(headers) == 1:  # one: plain Python is quicker than numpy
        head = headers[0]
        if _octal(head[_CHECKSUM]) != sum(head) - sum(head[_CHECKSUM]) + _SPACES:
            raise Unusual("bad checksum")
        return
    sums = np.asarray([_octal(head[_CHECKSUM]) for head in headers], np.int64)
    rows = np.frombuffer(b"".join(headers), np.uint8).reshape(-1, BLOCK).astype(np.int64)
    computed = rows.sum(1) - rows[:, _CHECKSUM].sum(1) + _SPACES
    if not np.array_equal(computed, sums):
        raise Unusual("bad checksum")  # tarfile also accepts signed sums, or stops there


def _ustar_name(head):
    name = _text(head[:100].split(b"\0", 1)[0])
    prefix = _text(head[345:500].split(b"\0", 1)[0])
    return f"{prefix}/{name}" if prefix else name


def _pax(data, name, size):
    """(name, size) after the records ``LENGTH KEY=VALUE\\n`` of a per-file pax header."""
    pos = 0
    try:
        while pos < len(data) and data[pos]:
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            if length < 1 or pos + length > len(data):
                raise ValueError("record length")
            key, _, value = data[space + 1:pos + length - 1].partition(b"=")
            if key.startswith(b"GNU.sparse") or key == b"hdrcharset" or not value:
                raise ValueError(key)
            if key == b"path":
                name = value.decode("utf-8")
            elif key == b"size":
                size = int(value)
            pos += length
    except ValueError as exc:  # UnicodeDecodeError too
        raise Unusual(f"pax header ({exc})") from None
    return name, size


def _octal(field):
    if field[:1] and field[0] & 0x80:
        raise Unusual("base-256 number")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise Unusual("bad number field") from None


def _text(raw):
    return raw.decode("utf-8", "surrogateescape")


def _padded(size):
    return -(-size // BLOCK) * BLOCK

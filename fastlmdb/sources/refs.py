"""The one interface between the converter and a source that is not a tree of files.

A Listing's `paths` are file paths (str) or Refs. A Ref is a str (its name: what the database
records as the image's source path and what messages name) that also knows how to get its
bytes. The converter, the writer and ``verify --source`` use only the methods below, so a new
kind of source is one module with one Ref subclass (archive.Member, parquet.Row,
dataset.Item) and a list function that listing.py dispatches to.
"""


import os
import typing

import numpy as np


class Pixels(typing.NamedTuple):
    """An image a source holds only decoded (a Python dataset's PIL image or array): RGB
    uint8 HxWx3, and why the stored record is not the source's bytes."""

    array: np.ndarray
    why: str


class Ref(str):
    """An image inside something else (an archive, a parquet file, a Python dataset)."""

    container = ""  # the file (or object) holding it, for messages: "<ref> in <container>"

    def read(self, check_crc=True):
        """The image's encoded bytes, or its Pixels where the source holds only those;
        ImageError if they cannot be had. `check_crc`: see archive.read."""
        raise NotImplementedError

    def read_labelled(self):
        """(read(), the label that came with it, or None where the listing has it)."""
        return self.read(), None

    def rereadable(self):
        """Whether the writer may read it again instead of receiving its bytes through a pipe
        (only where that costs no more than a file's read)."""
        return False

    def known_crc(self):
        """The CRC-32 of its bytes if the source records one (and read() checks it), else None."""
        return None

    def identity(self):
        """Bytes that tell it from any other ref of the same source (its plan digest)."""
        return self.encode("utf-8", "surrogateescape") + b"\0"

    def group(self):
        """A key shared by the refs best read by one process together (a parquet row group),
        or None: the pipeline gives a run of refs with one group to one producer."""
        return None

    def size(self):
        """Its size in bytes at the source, if known (for the disk-space estimate), else 0."""
        return 0


def describe(path):
    """`path` as messages name it: "<name> in <container>" for a ref, the path itself else."""
    return f"{path} in {path.container}" if isinstance(path, Ref) and path.container else path


def source_size(path):
    """The bytes of `path` (a file or a Ref) at its source; 0 if unknown or gone since it was
    listed (it is reported when its turn comes)."""
    if isinstance(path, Ref):
        return path.size()
    try:
        return os.stat(path).st_size
    except OSError:
        return 0

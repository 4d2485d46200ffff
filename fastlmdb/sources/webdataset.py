"""Tar shards laid out as WebDataset writes them (``timm/imagenet-1k-wds``): members grouped
by key, ``KEY.jpg`` (or .jpeg, .png, .webp, any ImageFolder extension) with ``KEY.cls``
holding the integer label as text, other members (``KEY.json``) ignored; members of a key in
any order. The key is the member's name up to the first dot of its last path component, as
webdataset splits it.

Source order: shards sorted by name, then images in the order they sit in the shard. An
uncompressed shard is read in place (archive.py: each image by offset, in any order); a
compressed one (.tar.gz) in one pass in that order (stream.py). The tiny .cls members are read
while listing. Class names: --classes-from, else ``_info.json``/``info.json`` beside the
shards when it names them, else the label values.
"""

import collections
import json
import logging
import os

import numpy as np

from fastlmdb.core.errors import ConversionError
from fastlmdb.sources import archive, folder, stream

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = tuple(ext[1:] for ext in folder.IMG_EXTENSIONS)
INFO_FILES = ("_info.json", "info.json")


class Sample(archive.Member):
    """A shard's image member named ``<shard file>/<member name>``, so that names are unique
    across shards; `inside` is its name in the tar."""

    def __new__(cls, name, inside, *where):
        sample = super().__new__(cls, name, *where)
        sample.inside = inside
        return sample

    def __reduce__(self):
        return Sample, (str(self), self.inside, *self.where)


def looks_like(members):
    """Whether a tar's member names are WebDataset's: some KEY.cls beside the images."""
    return any(member.lower().endswith(".cls") for member in members)


def members_of(path):
    """The Members of the tar at `path` (compressed or not), .cls contents kept."""
    kind = archive.compression(path)
    if kind:
        return stream.members(path, kind, keep=lambda name: name.lower().endswith(".cls"))
    return archive.members(path)


def list_shards(files, *, classes=None, on_error="raise", found=None):
    """The Listing of the WebDataset shards `files` (sorted); `found`: the members of a single
    shard, if already listed."""
    paths, labels, problems = [], [], []
    for path in files:
        members = found if found is not None else members_of(path)
        samples, shard_labels = _samples(path, members, problems)
        paths += samples
        labels += shard_labels
    _report(problems, on_error)
    if not paths:
        raise ConversionError(f"no images in {', '.join(files[:3])}")
    labels = np.asarray(labels, np.int32)
    if classes is None:
        classes = _info_classes(os.path.dirname(files[0])) or \
            [str(i) for i in range(int(labels.max()) + 1)]
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if len(bad):
        sample = paths[int(bad[0])]
        raise ConversionError(f"{sample.inside} in {sample.archive} has label "
                              f"{labels[bad[0]]}, outside the {len(classes)} classes: pass "
                              "--classes-from with the full class list")
    return folder.Listing(os.path.dirname(files[0]), list(classes),
                          {name: i for i, name in enumerate(classes)}, paths, labels)


def _samples(path, members, problems):
    """(image Samples in shard order, their labels) of one shard; problems appended."""
    keys = collections.defaultdict(dict)
    for member in members:
        directory, name = os.path.split(member)
        stem, dot, ext = name.partition(".")
        keys[os.path.join(directory, stem)][ext.lower() if dot else ""] = member
    base, found = os.path.basename(path), []
    for key, parts in keys.items():
        images = [parts[ext] for ext in parts if ext in IMAGE_EXTENSIONS]
        why = ("no image (" + ", ".join(IMAGE_EXTENSIONS[:4]) + ")" if not images
               else "several images" if len(images) > 1
               else "no label (a .cls member)" if "cls" not in parts else None)
        label = None if why else _label(parts["cls"])
        if why is None and label is None:
            why = f"its .cls holds {_content(parts['cls'])[:20]!r}, not a whole number"
        if why:
            problems.append(f"key {key} in {path}: {why}")
            continue
        image = images[0]
        sample = Sample(f"{base}/{image}", str(image), *image.where)
        if getattr(image, "by_tarfile", False):  # the in-order reader walks it so too
            sample.by_tarfile = True
        found.append((image.where[1], sample, label))
    found.sort(key=lambda item: item[0])  # the images' order in the shard
    return [sample for _, sample, _ in found], [label for _, _, label in found]


def _content(member):
    return member.content if hasattr(member, "content") else archive.read(member)


def _label(member):
    try:
        return int(_content(member).decode("ascii").strip())
    except ValueError:
        return None


def _report(problems, on_error):
    if not problems:
        return
    if on_error == "skip":
        for problem in problems:
            log.warning("left out: %s", problem)
        return
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise ConversionError("; ".join(problems[:3]) + more + ": every key needs one image and "
                          "a KEY.cls label. Pass --on-error skip to leave such keys out")


def _info_classes(directory):
    """Class names from a dataset info file beside the shards, if it has them."""
    for name in INFO_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as file:
                info = json.load(file)
        except (OSError, ValueError) as exc:
            raise ConversionError(f"{path} is not readable JSON ({exc})") from None
        names = info.get("classes") or info.get("label_names") or \
            ((info.get("features") or {}).get("label") or {}).get("names")
        if names:
            log.info("class names from %s", path)
            return [str(n) for n in names]
    return None

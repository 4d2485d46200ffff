"""Where a split's files come from, as the Listing the converter consumes: an ImageFolder tree, a
flat folder with a label file, or an archive (tar or zip) holding either, or a tar of per-class
tars (``ILSVRC2012_img_train.tar``), compressed or not.

Whatever the source, the Listing is the one of the tree it would extract to (for a flat split with
labels: ``<split>/<class>/<file>``): classes sorted, files in ImageFolder's order, the same
extension filter. Archive members stay in place (sources/archive.py reads them by offset).
"""

import collections
import logging
import os

import numpy as np

from fastlmdb.sources import labels as label_files
from fastlmdb.core import catalog
from fastlmdb.sources import archive, folder, stream
from fastlmdb.core import format as fmt
from fastlmdb.core.errors import ConversionError

log = logging.getLogger(__name__)


def list_split(split, *, from_dir=None, from_archive=None, labels=None, classes_from=None,
               on_error="raise"):
    """The Listing of `split` from an ImageFolder tree (`from_dir`/<split>) or an archive
    (`from_archive`); `labels`: a label file for a flat split; `classes_from`: a database or
    tree whose class list to use; `on_error`: "raise" or "skip" (files that are no images)."""
    classes = classes_of(classes_from) if classes_from else None
    labels = label_files.read(labels) if labels else None
    if from_archive:
        return list_archive(from_archive, split, labels=labels, classes=classes,
                            on_error=on_error)
    directory = os.path.join(from_dir, split)
    if labels is not None:
        return list_flat_folder(directory, labels, classes, on_error)
    found = folder.list_tree(directory)
    return found if classes is None else _with_classes(found, classes, directory)


def list_archive(path, split, *, labels=None, classes=None, on_error="raise"):
    """The Listing of one split packed in the archive at `path` (see the module's doc)."""
    path = os.path.abspath(path)
    kind = archive.compression(path)
    found = stream.members(path, kind) if kind else archive.members(path)
    prefix = _split_prefix(found, split, path)
    selected = [(member[len(prefix):], member) for member in found if member.startswith(prefix)]
    if not selected:
        raise ConversionError(f"{path} holds no files" + (f" under {prefix}" if prefix else ""))
    sort = _Sorter(path, on_error)
    if all("/" not in rel and rel.lower().endswith(".tar") for rel, _ in selected):
        for rel, member in selected:  # a tar of per-class tars
            for inner in archive.inner_members(member):
                sort.add(rel[:-len(".tar")], inner[len(member) + 1:], inner)
    elif all("/" not in rel for rel, _ in selected):
        if labels is None:
            raise ConversionError(
                f"{path} holds files but no class folders" + (f" under {prefix}" if prefix else "")
                + ": pass --labels FILE (LOC_val_solution.csv, a file of FILENAME CLASS lines, "
                "or ILSVRC2012_devkit_t12.tar.gz)")
        _add_labelled(sort, selected, labels)
    else:
        for rel, member in selected:
            klass, _, inside = rel.partition("/")
            if inside:
                sort.add(klass, inside, member)
            else:
                sort.problem(member, "a file outside any class folder")
    return sort.listing(path, classes)


def classes_of(path):
    """The sorted class list of a database (file or shard folder) or of an ImageFolder tree."""
    if os.path.isfile(path) or os.path.exists(os.path.join(path, fmt.SHARD_INDEX)):
        return catalog.read_catalog(path)[0]["classes"]
    return folder.find_classes(path)[0]


def _split_prefix(members, split, path):
    """"…/<split>/" of the shallowest folder named `split` in the archive, or "" if none."""
    depths = collections.defaultdict(set)
    for member in members:
        parts = member.split("/")[:-1]
        if split in parts:
            depth = parts.index(split)
            depths[depth].add("/".join(parts[:depth + 1]) + "/")
    if not depths:
        return ""
    candidates = sorted(depths[min(depths)])
    if len(candidates) > 1:
        raise ConversionError(f"{path} has several folders named {split}/ ({', '.join(candidates)}"
                              "): repack the one to convert")
    return candidates[0]


def _add_labelled(sort, files, labels):
    """Flat files into their labelled classes: by file name, else by name without extension."""
    used = set()
    for name, ref in files:
        key = name if name in labels else os.path.splitext(name)[0]
        if key not in labels:
            sort.problem(ref, "no label for it in --labels", image_only=True)
            continue
        used.add(key)
        sort.add(labels[key], name, ref)
    unused = sorted(set(labels) - used)
    for key in unused[:5]:
        sort.problem(key, "--labels names it, but there is no such file")
    if len(unused) > 5:
        sort.problem(f"{len(unused) - 5} more", "--labels names them, but they are missing")


def list_flat_folder(directory, labels, classes=None, on_error="raise"):
    if not os.path.isdir(directory):
        raise ConversionError(f"source folder {directory} does not exist or is not a folder")
    entries = sorted(e.name for e in os.scandir(directory) if e.is_file())
    sort = _Sorter(directory, on_error)
    _add_labelled(sort, [(name, os.path.join(directory, name)) for name in entries], labels)
    return sort.listing(directory, classes)


def _with_classes(found, classes, where):
    unknown = sorted(set(found.classes) - set(classes))
    if unknown:
        raise ConversionError(f"class(es) {', '.join(unknown[:5])} of {where} are not in "
                              "--classes-from's classes")
    index = np.asarray([classes.index(name) for name in found.classes], dtype=np.int32)
    return folder.Listing(found.root, list(classes), {c: i for i, c in enumerate(classes)},
                       found.paths, index[found.labels])


class _Sorter:
    """Files grouped by class and sorted as ImageFolder sorts the extracted tree; problems
    (non-images, unlabelled files, ...) stop the scan or, with --on-error skip, are logged."""

    def __init__(self, where, on_error):
        self.where, self.on_error = where, on_error
        self.classes = collections.defaultdict(list)
        self.names, self.problems = set(), []

    def add(self, klass, inside, ref):
        """`ref` is the file `inside` (a relative path) of class folder `klass`."""
        if ref in self.names:
            raise ConversionError(f"{ref} appears twice in {self.where}: extracting it would "
                                  "keep only the last copy; repack the archive without "
                                  "duplicates")
        self.names.add(ref)
        if not inside.lower().endswith(folder.IMG_EXTENSIONS):
            self.problem(ref, "not an image (extensions "
                              f"{', '.join(folder.IMG_EXTENSIONS)}, any case)")
            return
        directory, name = os.path.split(inside)
        # os.walk's order: a class folder's own files, then its subfolders by path.
        self.classes[klass].append(((f"/{directory}" if directory else "", name), ref))

    def problem(self, ref, why, image_only=False):
        if image_only and not ref.lower().endswith(folder.IMG_EXTENSIONS):
            return self.add("", ref, ref)  # reported as not an image instead
        self.problems.append(f"{ref} in {self.where}: {why}")

    def listing(self, root, classes=None):
        self._report()
        if classes is None:
            classes = sorted(self.classes)
        known = {name: i for i, name in enumerate(classes)}
        unknown = sorted(set(self.classes) - set(known))
        if unknown:
            raise ConversionError(f"{self.where}: class(es) {', '.join(unknown[:5])} are not "
                                  "in --classes-from's classes")
        if not self.classes:
            raise ConversionError(f"no images in {self.where}")
        paths, labels = [], []
        for name in sorted(self.classes, key=known.get):
            found = [ref for _, ref in sorted(self.classes[name], key=lambda pair: pair[0])]
            paths += found
            labels += [known[name]] * len(found)
        return folder.Listing(root, list(classes), known, paths, np.asarray(labels, np.int32))

    def _report(self):
        if not self.problems:
            return
        if self.on_error == "skip":
            for problem in self.problems:
                log.warning("left out: %s", problem)
            return
        more = f" (and {len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
        raise ConversionError("; ".join(self.problems[:3]) + more +
                              ". Pass --on-error skip to leave such files out")

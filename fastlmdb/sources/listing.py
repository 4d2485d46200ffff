"""Where a split's files come from, as the Listing the converter consumes: an ImageFolder tree, a
flat folder with a label file, or an archive (tar or zip) holding either, or a tar of per-class
tars (``ILSVRC2012_img_train.tar``), compressed or not; parquet shards (parquet.py) or
WebDataset tar shards (webdataset.py), named by a file, folder, glob or brace pattern.

Whatever the source, the Listing is the one of the tree it would extract to (for a flat split with
labels: ``<split>/<class>/<file>``): classes sorted, files in ImageFolder's order, the same
extension filter. Archive members stay in place (sources/archive.py reads them by offset).
"""

import collections
import logging
import os
import zipfile

import numpy as np

from fastlmdb.sources import labels as label_files
from fastlmdb.core import catalog
from fastlmdb.sources import archive, folder, parquet, patterns, stream, webdataset
from fastlmdb.core import format as fmt
from fastlmdb.core.errors import ConversionError

log = logging.getLogger(__name__)


def list_split(split, *, from_dir=None, from_archive=None, labels=None, classes_from=None,
               on_error="raise", columns=(None, None), unlabeled=False):
    """The Listing of `split` from an ImageFolder tree (`from_dir`/<split>) or `from_archive`
    (an archive, or parquet or WebDataset shards: a file, folder or pattern); `labels`: a
    label file for a flat split; `classes_from`: a database, tree or text file whose class
    list to use; `on_error`: "raise" or "skip" (files that are no images); `columns`:
    parquet's (image, label) column names, None to find them; `unlabeled`: keep parquet rows
    without a label (-1)."""
    classes = classes_of(classes_from) if classes_from else None
    labels = label_files.read(labels) if labels else None
    if from_archive:
        return list_shards(from_archive, split, labels=labels, classes=classes,
                           on_error=on_error, columns=columns, unlabeled=unlabeled)
    directory = os.path.join(from_dir, split)
    if labels is not None:
        return list_flat_folder(directory, labels, classes, on_error)
    found = folder.list_tree(directory)
    return found if classes is None else _with_classes(found, classes, directory)


def list_shards(pattern, split, *, labels=None, classes=None, on_error="raise",
                columns=(None, None), unlabeled=False):
    """The Listing of what `pattern` names: parquet files, WebDataset shards, or one archive
    holding the split (see list_split)."""
    files = patterns.expand(pattern)
    if parquet.is_parquet(files[0]):
        log.info("%s: %d parquet file(s), read a row group at a time", pattern, len(files))
        _all_alike(files, parquet.is_parquet, "parquet")
        return parquet.list_files(files, classes=classes, image_column=columns[0],
                                  label_column=columns[1], unlabeled=unlabeled)
    if unlabeled or any(columns):
        raise ValueError(f"--image-column, --label-column and --unlabeled are for parquet "
                         f"files; {files[0]} is not one")
    if len(files) > 1:
        log.info("%s: %d tar shards, read as WebDataset shards", pattern, len(files))
        _all_alike(files, lambda f: not parquet.is_parquet(f), "tar")
        return webdataset.list_shards(files, classes=classes, on_error=on_error)
    found = (webdataset.members_of(files[0]) if not zipfile.is_zipfile(files[0])
             else archive.members(files[0]))
    if webdataset.looks_like(found):
        log.info("%s holds KEY.cls members: read as a WebDataset shard", files[0])
        return webdataset.list_shards(files, classes=classes, on_error=on_error, found=found)
    return list_archive(files[0], split, labels=labels, classes=classes, on_error=on_error,
                        found=found)


def _all_alike(files, alike, kind):
    odd = [path for path in files if not alike(path)]
    if odd:
        raise ConversionError(f"{odd[0]} is not a {kind} file like {files[0]}: name one kind "
                              "of shard in --from-archive")


def list_archive(path, split, *, labels=None, classes=None, on_error="raise", found=None):
    """The Listing of one split packed in the archive at `path` (see the module's doc);
    `found`: its members, if listed already."""
    path = os.path.abspath(path)
    if found is None:
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
    """The class list of a database (file or shard folder), an ImageFolder tree (sorted) or a
    text file of one name per line (.txt)."""
    if os.path.isfile(path) and path.lower().endswith(".txt"):
        with open(path, encoding="utf-8") as file:
            names = [line.strip() for line in file if line.strip()]
        if not names:
            raise ConversionError(f"--classes-from {path} names no classes (one per line)")
        return names
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

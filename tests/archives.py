"""Pack a generated ImageFolder split the ways ImageNet is shipped (test_archive.py uses them):
a tar of per-class tars, a tar or zip of the tree, a flat tar or zip with a label file. Members
go in reversed order, so that the converter's own sort is what gives ImageFolder's order."""

import io
import os
import tarfile
import zipfile


def tree_files(split_dir):
    """[(class, relative path inside the class folder, absolute path)], sorted."""
    found = []
    for klass in sorted(os.listdir(split_dir)):
        for root, _, names in os.walk(os.path.join(split_dir, klass)):
            for name in names:
                path = os.path.join(root, name)
                found.append((klass, os.path.relpath(path, os.path.join(split_dir, klass)), path))
    return sorted(found)


def _add(archive, name, path):
    if isinstance(archive, zipfile.ZipFile):
        archive.write(path, name)
    else:
        archive.add(path, name)


def _open(out, compression=None):
    """A zip (`compression`: a zipfile method) or a tar (`compression`: "gz", "bz2", "xz")."""
    if out.endswith(".zip"):
        return zipfile.ZipFile(out, "w", compression or zipfile.ZIP_STORED)
    return tarfile.open(out, f"w:{compression}" if compression else "w")


def tar_of_tars(split_dir, out, compression=None):
    """ILSVRC2012_img_train.tar's layout: one `<class>.tar` per class, flat inside it."""
    files = tree_files(split_dir)
    with _open(out, compression) as outer:
        for klass in sorted({k for k, _, _ in files}, reverse=True):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as inner:
                for _, rel, path in reversed([f for f in files if f[0] == klass]):
                    inner.add(path, rel)
            info = tarfile.TarInfo(f"{klass}.tar")
            info.size = buffer.tell()
            buffer.seek(0)
            outer.addfile(info, buffer)
    return out


def tree(split_dir, out, prefix="", compression=None, extra=()):
    """The tree as `prefix<class>/<file>` members; `extra` adds (name, bytes) members."""
    with _open(out, compression) as archive:
        for klass, rel, path in reversed(tree_files(split_dir)):
            _add(archive, f"{prefix}{klass}/{rel}", path)
        _extra(archive, extra)
    return out


def flat(split_dir, out, prefix="", compression=None, extra=()):
    """Every file at `prefix<file>`, no class folders; returns {file: class}."""
    with _open(out, compression) as archive:
        for klass, rel, path in reversed(tree_files(split_dir)):
            _add(archive, prefix + rel, path)
        _extra(archive, extra)
    return {rel: klass for klass, rel, _ in tree_files(split_dir)}


def _extra(archive, members):
    for name, data in members:
        if isinstance(archive, zipfile.ZipFile):
            archive.writestr(name, data)
        else:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

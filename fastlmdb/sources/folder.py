"""An ImageFolder-compatible scan: same classes, same labels, same order, same extensions.

Mirrors ``torchvision.datasets.folder.find_classes``/``make_dataset`` without importing torch,
so the converter stays torch-free and sample i of a database is sample i of ImageFolder.
"""

import dataclasses
import os
import typing

import numpy as np

from fastlmdb.core.errors import ConversionError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True)
class Listing:
    root: str
    classes: list
    class_to_idx: dict
    paths: list
    labels: np.ndarray
    # What each process that reads these paths runs first (sources/dataset.py installs the
    # Python dataset its Items index), or None; picklable.
    setup: typing.Any = None

    def __len__(self):
        return len(self.paths)


def find_classes(directory):
    """Sorted class folder names and their indices, as ImageFolder finds them."""
    if not os.path.isdir(directory):
        raise ConversionError(f"source folder {directory} does not exist or is not a folder; "
                              "pass --from_dir SRC where SRC/<split>/<class>/<image> exists")
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    if not classes:
        raise ConversionError(f"no class folders in {directory}: expected "
                              f"{directory}/<class>/<image>, as for torchvision's ImageFolder")
    return classes, {name: i for i, name in enumerate(classes)}


def list_tree(directory):
    """Every image of an ImageFolder tree, in ImageFolder's order."""
    directory = os.fspath(directory)
    classes, class_to_idx = find_classes(directory)
    paths, labels, empty = [], [], []
    for name in classes:
        found = list(_images_under(os.path.join(directory, name)))
        if not found:
            empty.append(name)
        paths += found
        labels += [class_to_idx[name]] * len(found)
    if empty:
        raise ConversionError(
            f"no images in class folder(s) {', '.join(empty[:5])} of {directory} "
            f"(extensions {', '.join(IMG_EXTENSIONS)}, any case); ImageFolder refuses them too: "
            "remove the empty folders")
    return Listing(directory, classes, class_to_idx, paths, np.asarray(labels, dtype=np.int32))


def _images_under(class_dir):
    for root, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
        for fname in sorted(fnames):
            if fname.lower().endswith(IMG_EXTENSIONS):
                yield os.path.join(root, fname)

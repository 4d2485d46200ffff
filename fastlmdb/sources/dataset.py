"""Any map-style Python dataset (``len`` and ``[i]``) whose items are ``(image, label)`` (or
mappings with "image" and "label" keys, as a Hugging Face ``datasets.Dataset`` gives them).

An image may be encoded bytes, a file path, a ``{"bytes", "path"}`` mapping (``datasets``'
``Image(decode=False)``), a PIL image or a uint8 HxWx3 array. Bytes and files keep their bytes
(the tree's rules apply to them); a PIL image opened from a JPEG file keeps that file's bytes;
any other decoded image reaches the converter as pixels (refs.Pixels): encoded once (quality
95, 4:4:4, listed as changed) or stored as they are with save_as="numpy".

The dataset is pickled once to each process that reads it (Listing.setup installs it there);
an Item is only an index. Labels come with the items, so nothing is read while listing.
"""

import functools
import os

import numpy as np

from fastlmdb.core.errors import ConversionError, ImageError
from fastlmdb.sources import folder
from fastlmdb.sources.refs import Pixels, Ref

PIXELS_WHY = "{} image from the dataset encoded as JPEG (quality 95, 4:4:4)"
_installed = {}  # this process's dataset: {"dataset", "classes", "unlabeled"}


class Item(Ref):
    """Item `index` of the dataset installed in this process; named ``#<index>``."""

    container = "the dataset"

    def __new__(cls, index):
        item = super().__new__(cls, f"#{index}")
        item.index = index
        return item

    def __reduce__(self):
        return Item, (self.index,)

    def read(self, check_crc=True):
        return self.read_labelled()[0]

    def read_labelled(self):
        if not _installed:
            raise RuntimeError("no dataset installed in this process (Listing.setup)")
        try:
            item = _installed["dataset"][self.index]
        except Exception as exc:  # noqa: BLE001 - the dataset's own error: this item is bad
            raise ImageError(f"the dataset's __getitem__ failed ({type(exc).__name__}: "
                             f"{exc})") from None
        image, label = _split(item)
        return image_data(image), _check_label(label)


def list_dataset(dataset, *, classes=None, unlabeled=False):
    """The Listing of `dataset`'s items, in index order; classes from `classes`, else the
    dataset's own `classes` attribute or its ``features["label"].names`` (datasets)."""
    try:
        count = len(dataset)
        dataset.__getitem__
    except (TypeError, AttributeError):
        raise ValueError("dataset must be map-style (len(dataset) and dataset[i]), got "
                         f"{type(dataset).__name__}") from None
    if classes is None:
        classes = _classes_of(dataset)
    if classes is None:
        raise ValueError("classes: pass classes=[names...] (the dataset has no `classes` "
                         "attribute, nor datasets' features['label'].names)")
    classes = [str(name) for name in classes]
    if count == 0:
        raise ConversionError(f"the dataset ({type(dataset).__name__}) is empty")
    root = f"python-dataset://{type(dataset).__module__}.{type(dataset).__qualname__}"
    # Labels come with the items (entry "label"); -1 here only fills the listing's array.
    return folder.Listing(root, classes, {name: i for i, name in enumerate(classes)},
                          [Item(i) for i in range(count)], np.full(count, -1, np.int32),
                          setup=functools.partial(install, dataset, len(classes), unlabeled))


def install(dataset, classes, unlabeled):
    """Make `dataset` the one Items of this process index (run once per reading process)."""
    _installed.update(dataset=dataset, classes=classes, unlabeled=unlabeled)


def _classes_of(dataset):
    if getattr(dataset, "classes", None) is not None:
        return list(dataset.classes)
    features = getattr(dataset, "features", None)
    names = getattr(features.get("label"), "names", None) if hasattr(features, "get") else None
    return list(names) if names else None


def _split(item):
    if hasattr(item, "keys"):
        if "image" not in item or "label" not in item:
            raise ImageError(f"the item is a mapping without 'image' and 'label' keys (it has "
                             f"{', '.join(map(str, item.keys()))})")
        return item["image"], item["label"]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item
    raise ImageError(f"the item is a {type(item).__name__}, not (image, label)")


def _check_label(label):
    try:
        label = int(label)
    except (TypeError, ValueError):
        raise ImageError(f"its label {label!r} is not a class index") from None
    if label == -1 and _installed["unlabeled"]:
        return label
    if not 0 <= label < _installed["classes"]:
        raise ImageError(f"its label {label} is outside the {_installed['classes']} classes"
                         + ("" if label != -1 else " (-1: no label; pass unlabeled=True)"))
    return label


def image_data(image):
    """The encoded bytes of a dataset's image, or its Pixels where it holds only pixels."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return _file_bytes(image)
    if hasattr(image, "keys"):  # datasets' Image(decode=False): {"bytes", "path"}
        if image.get("bytes") is not None:
            return bytes(image["bytes"])
        if image.get("path"):
            return _file_bytes(image["path"])
        raise ImageError("the image mapping has neither bytes nor a path")
    if isinstance(image, np.ndarray):
        return Pixels(_rgb_array(image), PIXELS_WHY.format("uint8 array"))
    if hasattr(image, "getim") and hasattr(image, "convert"):  # a PIL image
        return _pil_data(image)
    raise ImageError(f"the image is a {type(image).__name__}: give encoded bytes, a path, a "
                     "PIL image or a uint8 HxWx3 array")


def _pil_data(image):
    filename = getattr(image, "filename", "")
    if image.format == "JPEG" and filename and os.path.isfile(filename):
        return _file_bytes(filename)  # the file it was opened from: no re-encoding
    return Pixels(np.asarray(image.convert("RGB")), PIXELS_WHY.format(f"PIL {image.mode}"))


def _rgb_array(array):
    if array.dtype != np.uint8:
        raise ImageError(f"the image array is {array.dtype}, not uint8 (HxWx3, RGB)")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(f"the image array has shape {array.shape}, not HxWx3 (RGB)")
    return np.ascontiguousarray(array)


def _file_bytes(path):
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ImageError(f"cannot read its file {path} ({exc.strerror or exc})") from None
    if not data:
        raise ImageError(f"its file {path} is empty")
    return data

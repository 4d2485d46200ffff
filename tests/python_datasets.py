"""Map-style datasets over an ImageFolder split, importable by the converter's spawned
producers (a test module's classes are not)."""

import numpy as np
from PIL import Image

from fastlmdb.sources import folder


class TreeItems:
    """Item i: file i of the split in ImageFolder's order as `kind` (path, bytes, pil, array),
    with its label; `broken`: an index whose __getitem__ raises."""

    def __init__(self, split_dir, kind, broken=None, label_shift=0):
        self.listing = folder.list_tree(split_dir)
        self.kind, self.broken, self.label_shift = kind, broken, label_shift
        self.classes = self.listing.classes

    def __len__(self):
        return len(self.listing)

    def __getitem__(self, i):
        if i == self.broken:
            raise KeyError(f"item {i} is broken")
        path, label = self.listing.paths[i], int(self.listing.labels[i]) + self.label_shift
        if self.kind == "path":
            return path, label
        if self.kind == "bytes":
            with open(path, "rb") as file:
                return file.read(), label
        if self.kind == "dict":
            return {"image": {"bytes": None, "path": path}, "label": label}
        image = Image.open(path)
        if self.kind == "pil":
            return image, label
        return np.asarray(image.convert("RGB")), label

"""The class of each file of a flat split, from the label files ImageNet's val split comes with.

`read(path)` gives {file name or stem: class name} from Kaggle's ``LOC_val_solution.csv``
(``ImageId,PredictionString``, the string starting with the WNID), a text file of
``FILENAME CLASS`` lines (space, tab or comma), or the ILSVRC2012 devkit
(``ILSVRC2012_devkit_t12.tar.gz``: one ILSVRC2012_ID per val file in file-number order, and
``data/meta.mat`` mapping ids to WNIDs, read as torchvision's ``parse_devkit_archive`` does).
"""

import io
import re
import tarfile

from fastlmdb.core.errors import ConversionError

KAGGLE_HEADER = "ImageId,PredictionString"
DEVKIT_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "data/meta.mat"
VAL_NAME = "ILSVRC2012_val_{:08d}"
_SEPARATOR = re.compile(r"[\s,]+")


def read(path):
    """{file name or stem: class} of the label file at `path`."""
    if tarfile.is_tarfile(path):
        return _devkit(path)
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConversionError(f"cannot read --labels {path} ({exc})") from None
    if lines and lines[0].strip() == KAGGLE_HEADER:
        return _pairs(path, lines[1:], 2, lambda row: row.split(",", 1))
    return _pairs(path, lines, 1, lambda row: _SEPARATOR.split(row.strip(), 1))


def _pairs(path, lines, first_line, split):
    labels = {}
    for number, line in enumerate(lines, first_line):
        if not line.strip():
            continue
        parts = split(line)
        klass = parts[1].split()[0] if len(parts) == 2 and parts[1].split() else ""
        if not parts[0].strip() or not klass:
            raise ConversionError(f"--labels {path} line {number}: expected FILENAME CLASS "
                                  f"(or Kaggle's {KAGGLE_HEADER} rows), got {line.strip()!r}")
        name = parts[0].strip()
        if labels.setdefault(name, klass) != klass:
            raise ConversionError(f"--labels {path} line {number}: {name} is labelled both "
                                  f"{labels[name]} and {klass}")
    if not labels:
        raise ConversionError(f"--labels {path} holds no labels")
    return labels


def _devkit(path):
    """{ILSVRC2012_val_NNNNNNNN: WNID} from the devkit archive."""
    with tarfile.open(path, "r:*") as tar:
        truth, meta = _devkit_file(tar, path, DEVKIT_TRUTH), _devkit_file(tar, path, DEVKIT_META)
    wnids = _devkit_wnids(meta, path)
    labels = {}
    for number, line in enumerate(truth.decode("ascii").split(), 1):
        if int(line) not in wnids:
            raise ConversionError(f"{path}: {DEVKIT_TRUTH} line {number} names ILSVRC2012_ID "
                                  f"{line}, which {DEVKIT_META} does not have")
        labels[VAL_NAME.format(number)] = wnids[int(line)]
    return labels


def _devkit_file(tar, path, suffix):
    for info in tar:
        if info.isreg() and info.name.endswith(suffix):
            return tar.extractfile(info).read()
    raise ConversionError(f"{path} has no {suffix}: is it ILSVRC2012_devkit_t12.tar.gz?")


def _devkit_wnids(meta, path):
    """{ILSVRC2012_ID: WNID} of the leaf synsets in meta.mat, as torchvision reads them."""
    try:
        from scipy import io as sio
    except ImportError:
        raise ConversionError(f"reading {path} needs scipy (for {DEVKIT_META}): "
                              "pip install 'fastlmdb[archives]' or pip install scipy") from None
    synsets = sio.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if s["num_children"] == 0}

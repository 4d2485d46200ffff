"""fastlmdb.convert_dataset: any map-style dataset of (image, label) into a database equal to
the tree of the same images; PIL images and arrays encoded once; resumable; bad items named."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastlmdb
import helpers
from python_datasets import TreeItems


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    """(SRC/train with awkward files, (info, rows, values) of its tree database)."""
    root = tmp_path_factory.mktemp("awkward")
    src = helpers.make_tree(root / "src", helpers.AWKWARD_LAYOUT)
    return os.path.join(src, "train"), helpers.read_db(helpers.run_convert(src, root / "r").path)


@pytest.mark.parametrize("kind", ["path", "bytes", "dict", "pil"])
def test_items_keep_the_tree_bytes(awkward, tmp_path, kind):
    split, (ref_info, ref_rows, ref_values) = awkward
    stats = fastlmdb.convert_dataset(TreeItems(split, kind), tmp_path, "train", procs=1)
    info, rows, values = helpers.read_db(stats.path)
    assert values == ref_values  # PIL images opened from JPEG files keep the file's bytes
    assert np.array_equal(rows["label"], ref_rows["label"])
    assert np.array_equal(rows["transcoded"], ref_rows["transcoded"])
    assert info["classes"] == ref_info["classes"]


def test_arrays_are_encoded_once_or_stored(awkward, tmp_path):
    split, (_, ref_rows, _) = awkward
    items = TreeItems(split, "array")
    stats = fastlmdb.convert_dataset(items, tmp_path / "j", "train", procs=1)
    info, rows, values = helpers.read_db(stats.path)
    assert len(info["transcoded"]) == len(items)  # every one listed as changed
    assert "quality 95, 4:4:4" in info["transcoded"][0][2]
    assert np.array_equal(rows["label"], ref_rows["label"])
    pixels = items[0][0]
    assert helpers.psnr(helpers.pil_rgb(values[0]), pixels) > 40
    stats = fastlmdb.convert_dataset(items, tmp_path / "n", "train", procs=1, save_as="numpy")
    _, rows, values = helpers.read_db(stats.path)
    assert values[0] == pixels.tobytes() and (rows["height"][0], rows["width"][0]) == \
        pixels.shape[:2]


def test_resumes_after_a_bad_item(awkward, tmp_path):
    split, (_, _, ref_values) = awkward
    with pytest.raises(fastlmdb.ConversionError, match=r"#5 in the dataset: the dataset's "
                                                       r"__getitem__ failed \(KeyError"):
        fastlmdb.convert_dataset(TreeItems(split, "bytes", broken=5), tmp_path, "train",
                                 procs=1, order="source", batch_bytes=1)
    stats = fastlmdb.convert_dataset(TreeItems(split, "bytes"), tmp_path, "train", procs=1,
                                     order="source", batch_bytes=1)
    assert stats.resumed_at == 5 and helpers.read_db(stats.path)[2] == ref_values


def test_bad_labels_and_arguments(awkward, tmp_path):
    split, _ = awkward
    with pytest.raises(fastlmdb.ConversionError, match=r"#\d+ in the dataset: its label 3 is "
                                                       r"outside the 3 classes"):
        fastlmdb.convert_dataset(TreeItems(split, "path", label_shift=1), tmp_path, "train",
                                 procs=1)
    with pytest.raises(ValueError, match="dataset must be map-style"):
        fastlmdb.convert_dataset(iter([]), tmp_path, "train")
    with pytest.raises(ValueError, match="classes: pass classes="):
        fastlmdb.convert_dataset([(b"x", 0)], tmp_path, "train")
    with pytest.raises(ValueError, match="from_dir is for convert"):
        fastlmdb.convert_dataset([(b"x", 0)], tmp_path, "train", classes=["a"], from_dir="x")


def test_hugging_face_dataset(awkward, tmp_path):
    datasets = pytest.importorskip("datasets")
    split, (ref_info, ref_rows, ref_values) = awkward
    items = TreeItems(split, "path")
    table = datasets.Dataset.from_dict(
        {"image": [path for path, _ in (items[i] for i in range(len(items)))],
         "label": [label for _, label in (items[i] for i in range(len(items)))]},
        features=datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=items.classes)}))
    undecoded = table.cast_column("image", datasets.Image(decode=False))
    stats = fastlmdb.convert_dataset(undecoded, tmp_path / "a", "train", procs=1)
    info, rows, values = helpers.read_db(stats.path)
    assert values == ref_values and info["classes"] == ref_info["classes"]
    assert np.array_equal(rows["label"], ref_rows["label"])
    stats = fastlmdb.convert_dataset(table, tmp_path / "b", "train", procs=1)
    info, rows, _ = helpers.read_db(stats.path)  # decoded PIL images: from their files
    assert np.array_equal(rows["label"], ref_rows["label"]) and stats.images == len(items)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_any_start_method_of_the_caller(awkward, tmp_path, method):
    """The producers get the dataset pickled, whatever start method the caller's program set
    (a dataset holding an open file handle could not be)."""
    split, (_, _, ref_values) = awkward
    script = ("import multiprocessing, sys, fastlmdb\n"
              "from python_datasets import TreeItems\n"
              "if __name__ == '__main__':\n"
              f"    multiprocessing.set_start_method({method!r})\n"
              f"    fastlmdb.convert_dataset(TreeItems({split!r}, 'bytes'), {str(tmp_path)!r}, "
              "'train', procs=2)\n")
    tests = os.path.dirname(__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", script], check=True, timeout=150, env=env)
    assert helpers.read_db(helpers.db(tmp_path))[2] == ref_values

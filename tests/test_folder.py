"""The scan is torchvision's ImageFolder: same classes, labels, order and extension rules."""

import os

import numpy as np
import pytest

from fastlmdb.sources import folder
from fastlmdb.core.errors import ConversionError
from helpers import imagefolder, make_tree, write_image


def assert_same_as_imagefolder(directory):
    scan = folder.list_tree(directory)
    reference = imagefolder(directory)
    assert scan.classes == reference.classes
    assert scan.class_to_idx == reference.class_to_idx
    assert list(zip(scan.paths, scan.labels.tolist())) == reference.samples
    assert scan.labels.dtype == np.int32
    assert len(scan) == len(reference)
    return scan


def test_plain_tree_matches_imagefolder(tree):
    for split in ("train", "val"):
        scan = assert_same_as_imagefolder(os.path.join(tree, split))
        assert scan.classes == ["n00000000", "n00000001", "n00000002"]
        assert scan.root == os.path.join(tree, split)
    assert len(folder.list_tree(os.path.join(tree, "train"))) == 12


def test_extensions_any_case_nested_folders_and_other_files(tmp_path):
    split = tmp_path / "train"
    # Class names whose byte order differs from case-insensitive order: "B" < "a" < "b".
    make_tree(tmp_path, {"train": {
        "a": ["x.JPEG", "y.jpg", "Z.JpEg", "w.png", "v.PNG", "sub/inner.jpeg",
              "sub/deeper/most.JPG", "sub2/s.jpg", "1.webp", "2.bmp"],
        "b": ["only.jpeg"],
        "B": ["upper.JPEG"],
    }})
    # Not images by extension: ignored, like ImageFolder does.
    for name in ("a/notes.txt", "a/x.JPEG.bak", "a/.DS_Store", "a/jpeg", "a/sub/readme.md",
                 "b/weights.npy"):
        (split / name).write_bytes(b"not an image")
    (split / "index.txt").write_text("a file at class level is not a class")
    scan = assert_same_as_imagefolder(split)
    assert scan.classes == ["B", "a", "b"]
    names = [os.path.relpath(p, split) for p in scan.paths]
    assert "a/sub/deeper/most.JPG" in names and "a/v.PNG" in names and "a/1.webp" in names
    assert not any(n.endswith((".txt", ".bak", ".md", ".npy", "Store")) for n in names)
    assert len(names) == 12


def test_symlinked_class_folder_is_followed(tmp_path):
    make_tree(tmp_path, {"train": {"real": 2}, "elsewhere": {"linked": 3}})
    os.symlink(tmp_path / "elsewhere" / "linked", tmp_path / "train" / "linked")
    scan = assert_same_as_imagefolder(tmp_path / "train")
    assert scan.classes == ["linked", "real"]
    assert scan.labels.tolist() == [0, 0, 0, 1, 1]


def test_missing_source_folder(tmp_path):
    with pytest.raises(ConversionError, match=r"nowhere/train does not exist.*--from_dir"):
        folder.list_tree(tmp_path / "nowhere" / "train")


def test_source_that_is_a_file(tmp_path):
    (tmp_path / "train").write_text("not a folder")
    with pytest.raises(ConversionError, match="does not exist or is not a folder"):
        folder.list_tree(tmp_path / "train")


def test_split_without_class_folders(tmp_path):
    write_image(os.fspath(tmp_path / "train" / "loose.JPEG"))
    with pytest.raises(ConversionError, match=r"no class folders in .*train"):
        folder.list_tree(tmp_path / "train")
    with pytest.raises(FileNotFoundError):  # ImageFolder refuses it too
        imagefolder(tmp_path / "train")


@pytest.mark.parametrize("contents", [[], ["notes.txt", "sub/readme.md"]],
                         ids=["empty", "no-image-extensions"])
def test_class_folder_without_images(tmp_path, contents):
    make_tree(tmp_path, {"train": {"full": 2, "hollow": 0}})
    for name in contents:
        path = tmp_path / "train" / "hollow" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    with pytest.raises(ConversionError, match=r"no images in class folder\(s\) hollow of .*train"):
        folder.list_tree(tmp_path / "train")
    with pytest.raises(FileNotFoundError):  # ImageFolder refuses it too
        imagefolder(tmp_path / "train")

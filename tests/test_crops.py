"""Decode-aware crops: boxes drawn like torchvision's, region decoding, dataset integration."""

import os

import numpy as np
import pytest
import simplejpeg
import torch
from torchvision.transforms import RandomResizedCrop as TorchvisionRRC
from torchvision.transforms import v2

import fastlmdb
from fastlmdb import converter
from fastlmdb.cli import sample_tree
from fastlmdb.loading import crops
from helpers import psnr


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    root = tmp_path_factory.mktemp("crops")
    src, dst = root / "src", root / "dst"
    sample_tree.make_tree(src, classes=2, per_class={"train": 3}, size=(300, 400), seed=3)
    for save_as, folder in (("jpeg", dst), ("numpy", root / "npy")):
        converter.convert(converter.Options(str(src), str(folder), "train", save_as=save_as,
                                        procs=1))
    return str(src), str(dst), str(root / "npy")


@pytest.fixture(scope="module")
def photo():
    pixels = sample_tree.synthetic_photo(np.random.default_rng(0), 333, 517)
    return simplejpeg.encode_jpeg(pixels, quality=90)


@pytest.mark.parametrize("height,width", [(375, 500), (500, 333), (100, 1000), (224, 224)])
def test_random_boxes_are_torchvisions_for_the_same_seed(height, width):
    ours = fastlmdb.RandomResizedCrop(224, scale=(0.2, 1.0))
    shape_only = torch.empty(1).expand(3, height, width)
    for seed in range(40):
        torch.manual_seed(seed)
        box = ours.box(height, width)
        torch.manual_seed(seed)
        assert box == tuple(TorchvisionRRC.get_params(shape_only, [0.2, 1.0], [3 / 4, 4 / 3]))


def test_center_box_is_the_resize_then_center_crop_region():
    top, left, h, w = fastlmdb.ResizeCenterCrop(256, 224).box(375, 500)
    assert (h, w) == (328, 328)  # 224 / (256 / 375)
    assert (top, left) == ((375 - 328) // 2, (500 - 328) // 2)


def test_scale_is_the_coarsest_that_covers_the_output():
    assert crops.scale_for(900, 900, (224, 224)) == 4
    assert crops.scale_for(448, 500, (224, 224)) == 2
    assert crops.scale_for(447, 500, (224, 224)) == 2  # ceil(447 / 2) = 224
    assert crops.scale_for(446, 500, (224, 224)) == 1
    assert crops.scale_for(100, 100, (224, 224)) == 1


def test_the_region_decoder_is_built_where_libjpeg_headers_exist():
    if os.path.exists("/usr/include/jpeglib.h"):
        assert crops._jpegcrop is not None
    else:
        assert crops._jpegcrop is None  # the pure-binding path is then the one tested below


@pytest.mark.parametrize("region_decoder", [True, False], ids=["region", "fallback"])
@pytest.mark.parametrize("box", [(0, 0, 333, 517), (40, 70, 150, 200), (200, 300, 133, 217)])
def test_box_pixels_match_decode_then_crop(photo, box, region_decoder, monkeypatch):
    if not region_decoder:
        monkeypatch.setattr(crops, "_jpegcrop", None)
    top, left, h, w = box
    ours = crops.decode_box(photo, box, (h, w), 333, 517, fastlmdb.core.jpeg.decode_simplejpeg)
    reference = simplejpeg.decode_jpeg(photo)[top:top + h, left:left + w]
    assert ours.shape == reference.shape
    assert psnr(ours, reference) > 40


def test_scaled_region_is_close_to_a_resized_full_decode(photo):
    box = (10, 20, 300, 480)
    ours = crops.resize(crops.decode_box(photo, box, (112, 112), 333, 517, None), (112, 112))
    full = simplejpeg.decode_jpeg(photo)[10:310, 20:500]
    reference = crops.resize(full, (112, 112))
    assert ours.shape == (112, 112, 3)
    assert psnr(ours, reference) > 28


def test_region_decoder_rejects_truncated_data_and_boxes_outside(photo):
    if crops._jpegcrop is None:
        pytest.fail("region decoder not built; see test_the_region_decoder_is_built...")
    with pytest.raises(ValueError, match="Premature end|JPEG decode failed"):
        crops._jpegcrop.decode_region(photo[:len(photo) // 2], 300, 0, 30, 30, 1)
    with pytest.raises(ValueError, match="outside"):
        crops._jpegcrop.decode_region(photo, 400, 0, 10, 10, 1)
    with pytest.raises(ValueError, match="denom"):
        crops._jpegcrop.decode_region(photo, 0, 0, 10, 10, 3)


@pytest.mark.parametrize("which", ["jpeg", "numpy"])
def test_dataset_runs_the_head_on_bytes_and_the_rest_as_usual(db, which):
    _, dst, npy = db
    pipeline = v2.Compose([fastlmdb.RandomResizedCrop(160), v2.RandomHorizontalFlip(),
                           v2.ToDtype(torch.float32, scale=True)])
    dataset = fastlmdb.LMDBDataset(dst if which == "jpeg" else npy, "train", pipeline,
                                   output="tensor")
    torch.manual_seed(0)
    first = dataset[2][0]
    torch.manual_seed(0)
    again = dataset[2][0]
    assert first.shape == (3, 160, 160) and first.dtype == torch.float32
    assert torch.equal(first, again)


def test_validation_crop_matches_torchvision_resize_center_crop(db):
    src, dst, _ = db
    ours = fastlmdb.LMDBDataset(dst, "train", fastlmdb.ResizeCenterCrop(256, 224),
                                output="numpy")
    reference = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])
    plain = fastlmdb.LMDBDataset(dst, "train", output="tensor")
    for i in range(len(ours)):
        expected = reference(plain[i][0]).permute(1, 2, 0).numpy()
        assert ours[i][0].shape == (224, 224, 3)
        assert psnr(ours[i][0], expected) > 25


@pytest.mark.timeout(120)
def test_decode_aware_pipeline_in_dataloader_workers(db):
    _, dst, _ = db
    dataset = fastlmdb.LMDBDataset(dst, "train", fastlmdb.RandomResizedCrop(96),
                                   output="tensor")
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2,
                                         multiprocessing_context="spawn")
    batches = list(loader)
    assert sum(len(labels) for _, labels in batches) == len(dataset)
    assert all(images.shape[1:] == (3, 96, 96) for images, _ in batches)


def test_reassigning_transform_takes_effect_as_with_imagefolder(db):
    _, dst, _ = db
    dataset = fastlmdb.LMDBDataset(dst, "train", output="numpy")
    row = dataset._rows[0]
    assert dataset[0][0].shape[:2] == (int(row["height"]), int(row["width"]))
    dataset.transform = fastlmdb.ResizeCenterCrop(128, 112)
    assert dataset[0][0].shape == (112, 112, 3)
    dataset.transform = None
    assert dataset[0][0].shape[0] != 112

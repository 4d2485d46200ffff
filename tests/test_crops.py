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
from fastlmdb.testing import sample_tree
from fastlmdb.loading import crops
import helpers
from helpers import psnr, with_bytes_before


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
    # torchvision: 375x500 -> 256x341, the crop at (16, 58) (round(58.5) = 58), which is
    # rows 23.44 .. 351.56 and columns 85.04 .. 413.49 of the source: the nearest pixels.
    assert (top, left, h, w) == (23, 85, 329, 328)


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


def test_region_decoder_reads_leniently_unless_strict(photo):
    if crops._jpegcrop is None:
        pytest.fail("region decoder not built; see test_the_region_decoder_is_built...")
    decode = crops._jpegcrop.decode_region
    clean, rows, cols, _ = decode(photo, 40, 64, 100, 120, 2)
    junk = with_bytes_before(photo, 0xDB)  # same coefficients, 4 extraneous bytes
    assert decode(junk, 40, 64, 100, 120, 2) == (clean, rows, cols, 0)  # lenient by default
    assert decode(junk, 40, 64, 100, 120, 2, strict=False)[0] == clean
    with pytest.raises(ValueError, match="4 extraneous bytes before marker 0xdb"):
        decode(junk, 40, 64, 100, 120, 2, strict=True)
    for strict in (False, True):  # running out of data is an error in both, as in PIL
        with pytest.raises(ValueError, match="Premature end of JPEG file"):
            decode(photo[:len(photo) // 2], 300, 0, 30, 30, 1, strict=strict)
    raw, rows, cols, offset = decode(photo, 0, 0, 1 << 30, 1 << 30, 1)  # clipped to the image
    assert (rows, cols, offset) == (333, 517, 0)
    whole = np.frombuffer(raw, np.uint8).reshape(rows, cols, 3)
    np.testing.assert_array_equal(whole, simplejpeg.decode_jpeg(photo))


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


@pytest.mark.slow
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


def test_torchvision_heads_are_recognised_only_when_asked_and_equivalent():
    from torchvision import transforms as v1

    assert crops.split_pipeline(v2.RandomResizedCrop(96))[0] is None  # not asked
    for module in (v1, v2):
        head, rest = crops.split_pipeline(
            module.Compose([module.RandomResizedCrop(96, scale=(0.2, 1.0)),
                            module.RandomHorizontalFlip()]), decode_aware=True)
        assert isinstance(head, fastlmdb.RandomResizedCrop)
        assert (head.size, head.scale) == ((96, 96), (0.2, 1.0))
        assert [type(step) for step in rest.transforms] == [module.RandomHorizontalFlip]
        head, rest = crops.split_pipeline(
            module.Compose([module.Resize(128), module.CenterCrop(112)]), decode_aware=True)
        assert isinstance(head, fastlmdb.ResizeCenterCrop) and rest is None
        assert (head.resize, head.size) == (128, (112, 112))
    not_equivalent = [
        v2.RandomResizedCrop(96, interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomResizedCrop(96, antialias=False),
        v2.Compose([v2.Resize((128, 160)), v2.CenterCrop(112)]),  # not a shorter side
        v2.Compose([v2.Resize(128, max_size=150), v2.CenterCrop(112)]),
        v2.RandomChoice([v2.RandomResizedCrop(96), v2.CenterCrop(96)]),
    ]
    for transform in not_equivalent:
        assert crops.split_pipeline(transform, decode_aware=True) == (None, transform)


@pytest.mark.parametrize("module_name", ["v1", "v2"])
def test_decode_aware_torchvision_crop_draws_as_torchvision(db, module_name):
    from torchvision import transforms as v1

    module = {"v1": v1, "v2": v2}[module_name]
    _, dst, _ = db
    ours = fastlmdb.LMDBDataset(dst, "train", module.RandomResizedCrop(112), output="tensor",
                                decode_aware=True)
    native = fastlmdb.LMDBDataset(dst, "train", fastlmdb.RandomResizedCrop(112),
                                  output="tensor")
    plain = fastlmdb.LMDBDataset(dst, "train", output="tensor")
    reference = v2.RandomResizedCrop(112, antialias=True)
    for i in range(len(ours)):
        torch.manual_seed(i)
        got = ours[i][0]
        torch.manual_seed(i)
        assert torch.equal(got, native[i][0])  # the same op, the same draws
        torch.manual_seed(i)
        expected = reference(plain[i][0])  # torchvision on the whole decoded image
        assert psnr(got.permute(1, 2, 0).numpy(), expected.permute(1, 2, 0).numpy()) > 25


@pytest.mark.timeout(120)
@pytest.mark.parametrize("context", helpers.START_METHODS)
def test_a_torchvision_pipeline_gets_in_place_batches_by_one_argument(db, context):
    from fastlmdb.loading import batch

    _, dst, _ = db
    pipeline = v2.Compose([v2.RandomResizedCrop(96), v2.RandomHorizontalFlip()])
    dataset = fastlmdb.LMDBDataset(dst, "train", pipeline, output="tensor", decode_aware=True)
    assert dataset._decodes_in_place()
    assert isinstance(dataset.__getitems__([0, 1])[0], batch.Sample)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2,
                                         multiprocessing_context=context)
    images = torch.cat([images for images, _ in loader])
    assert images.shape == (len(dataset), 3, 96, 96) and images.dtype == torch.uint8


def test_a_pil_pipeline_keeps_its_types_with_a_decode_aware_head(db):
    from torchvision import transforms as v1

    _, dst, _ = db
    pipeline = v1.Compose([v1.Resize(128), v1.CenterCrop(112), v1.ToTensor()])
    dataset = fastlmdb.LMDBDataset(dst, "train", pipeline, decode_aware=True)  # PIL output
    image = dataset[0][0]
    assert isinstance(dataset._crop, fastlmdb.ResizeCenterCrop)
    assert image.shape == (3, 112, 112) and image.dtype == torch.float32
    reference = torchvision_dataset_item(db, pipeline)
    assert psnr((image * 255).round().byte().permute(1, 2, 0).numpy(),
                (reference * 255).round().byte().permute(1, 2, 0).numpy()) > 25


def torchvision_dataset_item(db, pipeline):
    import torchvision

    src, _, _ = db
    return torchvision.datasets.ImageFolder(os.path.join(src, "train"), pipeline)[0][0]

"""The native batch decoder (_jpegcrop.decode_batch, _resize.c): its resize against torch's,
errors as data, threads, and the dataset's use of it (one call per batch, same pixels
whatever the thread count, the per-sample path where it is not built)."""

import os

import numpy as np
import pytest
import simplejpeg
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import fastlmdb
from fastlmdb import LMDBDataset, LMDBIterDataset, converter
from fastlmdb.testing import sample_tree
from fastlmdb.loading import batch, crops
import helpers
from helpers import psnr

_jpegcrop = crops._jpegcrop
# Where libjpeg's headers exist the extension must be built (test_crops checks that).
needs_native = pytest.mark.skipif(not batch.native_built(), reason="C extension not built")
RESIZE_PSNR = 45  # dB against torch's interpolate(antialias=True); measured 54-77 on photos


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(1)
    return [simplejpeg.encode_jpeg(sample_tree.synthetic_photo(rng, h, w), quality=90)
            for h, w in ((333, 517), (480, 360), (120, 90), (700, 700))]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    sample_tree.make_tree(root / "src", classes=3, per_class={"train": 8}, size=(150, 200),
                          seed=4)
    converter.convert(converter.Options(os.fspath(root / "src"), os.fspath(root / "dst"),
                                        "train", procs=1))
    return os.fspath(root / "dst")


def _torch_resize(pixels, size):
    chw = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0)
    return torch.nn.functional.interpolate(chw, size=size, mode="bilinear",
                                           antialias=True)[0].numpy()


@needs_native
@pytest.mark.parametrize("size", [(224, 224), (96, 160), (33, 17), (400, 600), (333, 517)])
def test_resize_is_within_the_stated_psnr_of_torch(photos, size):
    pixels = simplejpeg.decode_jpeg(photos[0])[10:320, 7:500]  # a column slice: strided rows
    out = np.empty((3, *size), np.uint8)
    _jpegcrop.resize_chw(pixels, out)
    reference = _torch_resize(pixels, size)
    assert psnr(out, reference) > RESIZE_PSNR
    assert np.abs(out.astype(int) - reference).max() <= 2


def _boxes(photos, size, seed=0):
    torch.manual_seed(seed)
    crop = fastlmdb.RandomResizedCrop(size)
    shapes = [simplejpeg.decode_jpeg_header(p)[:2] for p in photos]
    return np.array([crop.box(h, w) for h, w in shapes], np.int64)


@needs_native
@pytest.mark.parametrize("size", [(224, 224), (64, 48)])
def test_batch_slots_are_region_decode_resize_and_flip(photos, size):
    boxes = _boxes(photos, size)
    flips = np.array([0, 1, 2, 3], np.uint8)
    out = np.zeros((4, 3, *size), np.uint8)
    assert _jpegcrop.decode_batch(photos, boxes, flips, out, *size) == [None] * 4
    for k, (photo, box) in enumerate(zip(photos, boxes.tolist())):
        pixels = crops.decode_box(photo, box, size, 0, 0, None)
        expected = np.empty((3, *size), np.uint8)
        _jpegcrop.resize_chw(pixels, expected)
        vertical, horizontal = (-1 if flips[k] & 2 else 1), (-1 if flips[k] & 1 else 1)
        np.testing.assert_array_equal(out[k], expected[:, ::vertical, ::horizontal])
        reference = _torch_resize(pixels, size)[:, ::vertical, ::horizontal]
        assert psnr(out[k], reference) > RESIZE_PSNR


@needs_native
def test_bad_records_fail_their_slot_only(photos):
    values = [photos[0], photos[1][:len(photos[1]) // 2], b"\x00garbage" * 40, photos[3], b""]
    boxes = np.concatenate([_boxes(photos, (64, 64)), [[0, 0, 10, 10]]]).astype(np.int64)
    boxes[3] = (5000, 0, 10, 10)  # outside the image
    out = np.full((5, 3, 64, 64), 7, np.uint8)
    errors = _jpegcrop.decode_batch(values, boxes, np.zeros(5, np.uint8), out, 64, 64)
    assert errors[0] is None and (out[0] != 7).any()
    assert "Premature end of JPEG file" in errors[1]
    assert errors[2].startswith("JPEG decode failed") and "outside" in errors[3]
    assert errors[4].startswith("JPEG decode failed")
    assert (out[2:] == 7).all()  # failed slots are left as they were


@needs_native
def test_bad_arguments_raise():
    out = np.zeros((1, 3, 8, 8), np.uint8)
    boxes, flips = np.zeros((1, 4), np.int64), np.zeros(1, np.uint8)
    with pytest.raises(ValueError, match="out has 192 bytes, 384 expected"):
        _jpegcrop.decode_batch([b""], boxes, flips, out, 8, 16)
    with pytest.raises(ValueError, match="boxes has 32 bytes, 64 expected"):
        _jpegcrop.decode_batch([b"", b""], boxes, np.zeros(2, np.uint8), out, 4, 8)
    with pytest.raises(ValueError, match="threads 1 to 256"):
        _jpegcrop.decode_batch([b""], boxes, flips, out, 8, 8, threads=0)
    with pytest.raises(TypeError):
        _jpegcrop.decode_batch([object()], boxes, flips, out, 8, 8)
    with pytest.raises(ValueError, match="3 x h x w"):
        _jpegcrop.resize_chw(np.zeros((4, 4, 4), np.uint8), np.zeros((3, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="threads must be an int from 1 to 256, got 0"):
        LMDBDataset("unused", "train", threads=0)
    with pytest.raises(ValueError, match="threads must be an int from 1 to 256, got True"):
        LMDBIterDataset("unused", "train", threads=True)


@needs_native
def test_threads_give_the_same_pixels(photos):
    values = photos * 8
    boxes = _boxes(values, (128, 128), seed=3)
    flips = np.arange(len(values), dtype=np.uint8) % 4
    outs = []
    for threads in (1, 3):
        out = np.zeros((len(values), 3, 128, 128), np.uint8)
        assert _jpegcrop.decode_batch(values, boxes, flips, out, 128, 128, threads=threads) \
            == [None] * len(values)
        outs.append(out)
    np.testing.assert_array_equal(*outs)


def _has_avx2():
    try:
        with open("/proc/cpuinfo") as info:
            return " avx2" in info.read()
    except OSError:
        return False


@pytest.fixture
def portable_resize():
    """A function that runs its argument with the resize's x86 kernels off, then on again."""
    def run(work):
        before = _jpegcrop._use_simd(False)
        assert before or not _has_avx2()  # the fast kernels ran: there is something to compare
        try:
            return work()
        finally:
            _jpegcrop._use_simd(before)
    return run


@needs_native
@pytest.mark.parametrize("shape", [(375, 500, 224, 224), (300, 260, 224, 224),
                                   (200, 180, 224, 224), (224, 300, 224, 224),
                                   (300, 224, 224, 224), (449, 447, 224, 224),
                                   (1000, 1500, 224, 224), (230, 231, 113, 57),
                                   (37, 53, 17, 29), (5, 7, 3, 9), (2, 1, 1, 6)])
def test_resize_kernels_give_the_portable_bytes(portable_resize, shape):
    in_h, in_w, out_h, out_w = shape
    rng = np.random.default_rng(in_h * in_w)
    pixels = rng.integers(0, 256, (in_h, in_w + 5, 3), dtype=np.uint8)[:, 2:2 + in_w]
    fast, portable = (np.zeros((3, out_h, out_w), np.uint8) for _ in range(2))
    _jpegcrop.resize_chw(pixels, fast)
    portable_resize(lambda: _jpegcrop.resize_chw(pixels, portable))
    np.testing.assert_array_equal(fast, portable)


@needs_native
@pytest.mark.parametrize("size", [(224, 224), (61, 37)])
def test_batch_kernels_give_the_portable_bytes_with_every_flip(photos, portable_resize, size):
    values = photos * 4
    boxes = _boxes(values, size, seed=5)
    flips = np.arange(len(values), dtype=np.uint8) % 4
    outs = [np.zeros((len(values), 3, *size), np.uint8) for _ in range(2)]
    assert _jpegcrop.decode_batch(values, boxes, flips, outs[0], *size) == [None] * len(values)
    portable_resize(lambda: _jpegcrop.decode_batch(values, boxes, flips, outs[1], *size))
    np.testing.assert_array_equal(*outs)
    assert outs[0].any()


def _pipeline():
    return v2.Compose([fastlmdb.RandomResizedCrop(56, scale=(0.1, 1.0)),
                       v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(p=0.3)])


def _batch(db, threads, positions, seed=0):
    dataset = LMDBDataset(db, "train", _pipeline(), output="tensor", threads=threads)
    torch.manual_seed(seed)
    images, labels = fastlmdb.collate(dataset.__getitems__(positions))
    return images, labels, torch.get_rng_state()


@needs_native
def test_dataset_decodes_a_batch_in_one_native_call(db, monkeypatch):
    calls = []
    native = _jpegcrop.decode_batch
    monkeypatch.setattr(_jpegcrop, "decode_batch",
                        lambda *a, **k: calls.append(len(a[0])) or native(*a, **k))
    images, _, _ = _batch(db, 1, list(range(10)))
    assert calls == [10] and images.shape == (10, 3, 56, 56)


@needs_native
@pytest.mark.parametrize("threads", [1, 3])
def test_iterable_dataset_decodes_each_batch_in_one_native_call(db, monkeypatch, threads):
    calls = []
    native = _jpegcrop.decode_batch
    monkeypatch.setattr(_jpegcrop, "decode_batch",
                        lambda *a, **k: calls.append(len(a[0])) or native(*a, **k))
    stream = LMDBIterDataset(db, "train", _pipeline(), output="tensor", batch_size=10,
                             threads=threads)
    torch.manual_seed(0)
    fast = list(stream)
    assert calls == [10, 10, 4]
    monkeypatch.setattr(batch, "native_built", lambda: False)  # the per-slot path, same draws
    torch.manual_seed(0)
    slow = list(LMDBIterDataset(db, "train", _pipeline(), output="tensor", batch_size=10))
    assert len(fast) == len(slow) == 24
    for (image, label), (expected, expected_label) in zip(fast, slow):
        assert torch.equal(image, expected) and label == expected_label


@pytest.mark.parametrize("threads", [2, 4])
def test_dataset_threads_give_the_same_pixels_and_draws(db, threads):
    positions = [5, 0, 23, 7, 7, 11, 19, 2, 14, 9]
    one = _batch(db, 1, positions)
    many = _batch(db, threads, positions)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    assert torch.equal(one[2], many[2])  # torch's generator left in the same state


def test_without_the_extension_batches_come_from_torch_within_the_psnr(db, monkeypatch):
    positions = list(range(12))
    native = _batch(db, 1, positions)
    monkeypatch.setattr(crops, "_jpegcrop", None)  # as where the extension was not built
    assert not batch.native_built()
    fallback = _batch(db, 1, positions)
    assert torch.equal(native[1], fallback[1]) and torch.equal(native[2], fallback[2])
    assert psnr(native[0].numpy(), fallback[0].numpy()) > 30  # full decode, then crop


@needs_native
def test_without_the_native_call_the_per_sample_path_gives_the_same(db, monkeypatch):
    positions = list(range(12))
    native = _batch(db, 2, positions)
    monkeypatch.setattr(batch, "native_built", lambda: False)
    per_slot = _batch(db, 2, positions)
    for got, expected in zip(native, per_slot):
        assert torch.equal(got, expected)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("context", helpers.START_METHODS)
def test_threads_inside_workers(db, context):
    epochs = []
    for threads in (1, 2):
        dataset = LMDBDataset(db, "train", _pipeline(), output="tensor", threads=threads)
        torch.manual_seed(0)  # the workers' seeds come from it
        loader = DataLoader(dataset, batch_size=8, num_workers=2, timeout=60,
                            multiprocessing_context=context)
        epochs.append(list(loader))
    assert len(epochs[0]) == len(epochs[1]) == 3
    for (images, labels), (expected_images, expected_labels) in zip(*epochs):
        assert images.shape == (8, 3, 56, 56)
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)

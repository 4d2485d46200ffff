"""The recipe's tail fused into the native batch decoder (fastlmdb.loading.tail): a 3 x 256
table of what each uint8 value of each channel becomes (float32, float16, bfloat16), stored as
the slot is written. Bitwise the uint8 output through the table, with every kernel and flip;
bitwise torchvision's own ToTensor/ToDtype + Normalize on the same uint8 pixels; float batches
from DataLoader workers through reused memfd segments, never /dev/shm."""

import dataclasses
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import simplejpeg
import torch
from torch.utils.data import DataLoader, default_collate
from torchvision import transforms as v1
from torchvision.transforms import v2
from torchvision.transforms import functional as TF

import fastlmdb
from fastlmdb import LMDBDataset, LMDBIterDataset, converter
from fastlmdb.loading import batch, crops, handover, recipes, tail
from fastlmdb.testing import sample_tree

import probes

_jpegcrop = crops._jpegcrop
needs_native = pytest.mark.skipif(not batch.native_built(), reason="C extension not built")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
SIZE = 40


def _normalise_table(dtype=torch.float32):
    """The table of v1 ToTensor + Normalize (then a cast), from torchvision's own ops."""
    values = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # 1x256x3 HWC
    floats = v1.Normalize(MEAN, STD)(v1.ToTensor()(values))  # 3 x 1 x 256
    return floats[:, 0, :].to(dtype)


def _through(images, table):
    """uint8 [B, 3, H, W] through the table, by indexing: the reference."""
    return torch.stack([table[c][images[:, c].long()] for c in range(3)], dim=1)


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(7)
    return [simplejpeg.encode_jpeg(sample_tree.synthetic_photo(rng, h, w), quality=90)
            for h, w in ((333, 517), (480, 360), (120, 90), (61, 250))]


def _boxes(photos, size, seed=0):
    torch.manual_seed(seed)
    crop = fastlmdb.RandomResizedCrop(size)
    shapes = [simplejpeg.decode_jpeg_header(p)[:2] for p in photos]
    return np.array([crop.box(h, w) for h, w in shapes], np.int64)


@pytest.fixture(params=[True, False], ids=["simd", "portable"])
def kernels(request):
    """Each test twice: the resize's x86 kernels (where the CPU has them), then portable."""
    before = _jpegcrop._use_simd(request.param)
    yield request.param
    _jpegcrop._use_simd(before)


@needs_native
@pytest.mark.parametrize("size", [(224, 224), (61, 37), (17, 300)])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_fused_batch_is_the_uint8_batch_through_the_table(photos, kernels, size, dtype):
    values = photos * 2
    boxes, flips = _boxes(values, size), np.arange(len(values), dtype=np.uint8) % 4
    plain = torch.zeros((len(values), 3, *size), dtype=torch.uint8)
    assert _jpegcrop.decode_batch(values, boxes, flips, plain.numpy(), *size) == [None] * 8
    table = _normalise_table(dtype)
    fused = torch.full((len(values), 3, *size), -7.0, dtype=dtype)
    errors = _jpegcrop.decode_batch(values, boxes, flips, tail.raw(fused), *size, threads=2,
                                    table=tail.raw(table))
    assert errors == [None] * 8
    assert torch.equal(fused.view(tail._RAW[fused.element_size()]),
                       _through(plain, table).view(tail._RAW[fused.element_size()]))


@needs_native
@pytest.mark.parametrize("shape", [(375, 500, 224, 224), (230, 231, 113, 57), (40, 40, 40, 40),
                                   (40, 90, 40, 33), (5, 7, 3, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_resize_is_the_uint8_resize_through_the_table(kernels, shape, dtype):
    in_h, in_w, out_h, out_w = shape
    rng = np.random.default_rng(in_h + in_w)
    pixels = rng.integers(0, 256, (in_h, in_w + 4, 3), dtype=np.uint8)[:, 1:1 + in_w]
    plain = np.zeros((3, out_h, out_w), np.uint8)
    _jpegcrop.resize_chw(pixels, plain)
    table = _normalise_table(dtype)
    fused = torch.empty((3, out_h, out_w), dtype=dtype)
    _jpegcrop.resize_chw(pixels, tail.raw(fused), table=tail.raw(table))
    assert torch.equal(fused, batch.apply_table(torch.from_numpy(plain), table))
    assert torch.equal(crops.resize(pixels, (out_h, out_w), table=table), fused)


def test_resize_with_a_table_without_the_extension(monkeypatch):
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    monkeypatch.setattr(crops, "_jpegcrop", None)  # torch's interpolate, then the table
    plain = torch.from_numpy(np.ascontiguousarray(crops.resize(pixels, (20, 30)))).permute(2, 0, 1)
    table = _normalise_table(torch.float16)
    out = torch.empty((3, 20, 30), dtype=torch.float16)
    assert crops.resize(pixels, (20, 30), out, table) is None
    assert torch.equal(out, batch.apply_table(plain.contiguous(), table))


@needs_native
def test_uint8_table_and_numpy_table(photos):
    boxes, flips = _boxes(photos, (32, 32)), np.array([0, 1, 2, 3], np.uint8)
    plain = np.zeros((4, 3, 32, 32), np.uint8)
    _jpegcrop.decode_batch(photos, boxes, flips, plain, 32, 32)
    inverted = np.repeat(255 - np.arange(256, dtype=np.uint8)[None], 3, axis=0)
    out = np.zeros_like(plain)
    _jpegcrop.decode_batch(photos, boxes, flips, out, 32, 32, table=inverted)
    np.testing.assert_array_equal(out, 255 - plain)
    halves = _normalise_table(torch.float16).numpy()  # a numpy table, through batch.fill's check
    images = torch.empty((4, 3, 32, 32), dtype=torch.float16)
    out_view, raw_table = batch._native_args(images, halves)
    assert out_view.dtype == np.int16 and raw_table.dtype == np.int16


@pytest.mark.parametrize("recipe", ["v1", "v2"])
def test_table_of_torchvision_ops_gives_their_batch_bitwise(recipe):
    """The table built from torchvision's ops on each value, looked up, equals those ops on a
    whole uint8 batch: each op is elementwise and IEEE-exact (sub, div, mul), so a value's
    result does not depend on its neighbours or on SIMD. Measured: max abs difference 0."""
    rng = np.random.default_rng(3)
    images = torch.from_numpy(rng.integers(0, 256, (4, 3, 31, 29), dtype=np.uint8))
    if recipe == "v1":
        table = _normalise_table()
        expected = TF.normalize(images.float() / 255, MEAN, STD)
    else:
        tail_ops = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
        table = tail_ops(torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256)
                         .contiguous())[:, 0, :]
        expected = tail_ops(images)
    assert torch.equal(batch.apply_table(images, table), expected)


@needs_native
def test_bad_tables_and_outs_raise():
    boxes, flips = np.zeros((1, 4), np.int64), np.zeros(1, np.uint8)
    floats = np.zeros((1, 3, 8, 8), np.float32)
    table = np.zeros((3, 256), np.float32)
    with pytest.raises(TypeError, match="out has 4-byte items: uint8 out, or pass a table"):
        _jpegcrop.decode_batch([b""], boxes, flips, floats, 8, 8)
    with pytest.raises(TypeError, match="table has 2-byte items, out 4"):
        _jpegcrop.decode_batch([b""], boxes, flips, floats, 8, 8, table=table.astype(np.float16))
    with pytest.raises(ValueError, match="table has 765 items, 768"):
        _jpegcrop.decode_batch([b""], boxes, flips, floats, 8, 8, table=table[:, :255].copy())
    with pytest.raises(ValueError, match="table must be a C-contiguous buffer"):
        _jpegcrop.decode_batch([b""], boxes, flips, floats, 8, 8, table=table[:, :255])
    with pytest.raises(ValueError, match="out must be a C-contiguous writable buffer"):
        _jpegcrop.decode_batch([b""], boxes, flips, floats.transpose(0, 1, 3, 2), 8, 8,
                               table=table)
    with pytest.raises(TypeError, match="out has 8-byte items: 1 .uint8., 2"):
        _jpegcrop.decode_batch([b""], boxes, flips, floats.astype(np.float64), 8, 8,
                               table=table.astype(np.float64))
    with pytest.raises(ValueError, match=r"out must be \[1, 3, 8, 8\]"):
        _jpegcrop.decode_batch([b""], boxes, flips, np.zeros((1, 8, 8, 3), np.float32), 8, 8,
                               table=table)
    with pytest.raises(ValueError, match="out has 768 bytes, 1536 expected"):
        _jpegcrop.decode_batch([b""], boxes, flips, floats, 8, 16, table=table)
    with pytest.raises(TypeError, match="table has 2-byte items, out 4"):
        _jpegcrop.resize_chw(np.zeros((4, 4, 3), np.uint8), np.zeros((3, 2, 2), np.float32),
                             table=table.astype(np.float16))
    with pytest.raises(TypeError, match="out has 4-byte items"):
        _jpegcrop.resize_chw(np.zeros((4, 4, 3), np.uint8), np.zeros((3, 2, 2), np.float32))


def test_bad_tables_raise_in_python():
    images = torch.empty((2, 3, 8, 8), dtype=torch.float32)
    with pytest.raises(ValueError, match="images are torch.float32: pass the table"):
        batch._native_args(images, None)
    with pytest.raises(ValueError, match="table is torch.float16 but the images are "
                                         "torch.float32"):
        batch._native_args(images, _normalise_table(torch.float16))
    with pytest.raises(ValueError, match=r"table must have shape \(3, 256\), got \(256,\)"):
        tail.as_table(torch.zeros(256))
    with pytest.raises(ValueError, match="1-, 2- or 4-byte items"):
        tail.as_table(torch.zeros((3, 256), dtype=torch.float64))
    with pytest.raises(TypeError, match="numpy array or a torch tensor, got list"):
        tail.as_table([[0.0] * 256] * 3)
    with pytest.raises(ValueError, match="apply_table needs uint8"):
        batch.apply_table(images, _normalise_table())


# --------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    root = tmp_path_factory.mktemp("tail")
    sample_tree.make_tree(root / "src", classes=3, per_class={"train": 7}, size=(100, 130),
                          seed=5)
    converter.convert(converter.Options(os.fspath(root / "src"), os.fspath(root / "dst"),
                                        "train", procs=1))
    return os.fspath(root / "dst")


def _pipeline():
    return v2.Compose([fastlmdb.RandomResizedCrop(SIZE, scale=(0.1, 1.0)),
                       v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(p=0.3)])


def _fused(dataset, dtype=torch.float32):
    """`dataset` making in-place batches of `dtype` through the normalising table."""
    dataset._recipe = dataclasses.replace(dataset._recipe, table=_normalise_table(dtype),
                                          dtype=dtype, prefix=recipes.FLOAT)
    return dataset


def _batch(dataset, positions, seed=0):
    torch.manual_seed(seed)
    return fastlmdb.collate(dataset.__getitems__(positions))


@pytest.mark.parametrize("native", [True, False], ids=["native", "per-slot"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_dataset_float_batches_are_the_uint8_batches_through_the_table(db, monkeypatch, native,
                                                                      dtype):
    positions = [3, 0, 20, 7, 7, 11]
    images, labels = _batch(LMDBDataset(db, "train", _pipeline(), output="tensor"), positions)
    if not native:  # the per-slot path: crops.resize with the table, flips on the float slot
        monkeypatch.setattr(batch, "native_built", lambda: False)
    fused = _fused(LMDBDataset(db, "train", _pipeline(), output="tensor"), dtype)
    floats, same_labels = _batch(fused, positions)
    assert floats.dtype == dtype and floats.shape == (6, 3, SIZE, SIZE)
    assert torch.equal(floats, batch.apply_table(images, fused._recipe.table))
    assert torch.equal(labels, same_labels)


def test_iterable_float_batches(db):
    def stream(table):
        dataset = LMDBIterDataset(db, "train", _pipeline(), output="tensor", batch_size=8)
        if table:
            _fused(dataset)
        torch.manual_seed(1)
        return [image for image, _ in dataset]

    plain, floats = stream(False), stream(True)
    assert len(plain) == len(floats) == 21 and floats[0].dtype == torch.float32
    table = _normalise_table()
    assert all(torch.equal(f, batch.apply_table(p, table)) for p, f in zip(plain, floats))


def test_empty_gives_each_dtype():
    for dtype in (torch.uint8, *FLOATS):
        images, labels = batch.empty(5, (7, 9), dtype)
        assert images.dtype == dtype and images.shape == (5, 3, 7, 9) and images.is_contiguous()
        assert labels.dtype == torch.int64 and labels.shape == (5,)


def test_float_batches_travel_in_reused_segments(db, as_worker):
    from multiprocessing.reduction import ForkingPickler

    dataset = _fused(LMDBDataset(db, "train", _pipeline(), output="tensor"), torch.bfloat16)
    built = dataset.__getitems__(list(range(8)))
    expected = built[0].batch[0].clone()
    received = pickle.loads(ForkingPickler.dumps(default_collate(built)))
    assert received[0].dtype == torch.bfloat16 and torch.equal(received[0], expected)
    assert not received[0].is_shared() and _mapped_from(received[0]).startswith("/memfd:")
    (segment,) = handover._segments()
    assert segment.nbytes == 8 * 3 * SIZE * SIZE * 2
    del built, received
    again = dataset.__getitems__(list(range(8)))  # the segment, reused
    assert len(handover._segments()) == 1
    assert again[0].batch[0].data_ptr() == segment.address


def test_float_batches_beyond_the_segments_go_in_torch_shared_memory(as_worker):
    held = [batch.empty(2, (5, 7), torch.float32)[0] for _ in range(handover.MAX_SEGMENTS)]
    assert all(_mapped_from(images).startswith("/memfd:") for images in held)
    images, _ = batch.empty(2, (5, 7), torch.float32)
    assert images.is_shared() and images.dtype == torch.float32 and images.shape == (2, 3, 5, 7)
    assert len(handover._segments()) == handover.MAX_SEGMENTS


def _mapped_from(tensor):
    """The path of the mapping that holds `tensor`'s memory (/proc/self/maps)."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, *rest = line.split()
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= address < end:
                return rest[4] if len(rest) > 4 else ""
    return ""


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
def test_workers_deliver_float_batches_through_memfd(db, context):
    def epoch(dataset, context):
        loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2, timeout=200,
                            generator=torch.Generator().manual_seed(3),
                            multiprocessing_context=context)
        return list(loader)

    # The workers' seeds come from the generator, whatever starts them: fork's are the same.
    plain = epoch(LMDBDataset(db, "train", _pipeline(), output="tensor"), "fork")
    floats = epoch(_fused(LMDBDataset(db, "train", _pipeline(), output="tensor")), context)
    assert len(plain) == len(floats) == 6
    table = _normalise_table()
    for (images, labels), (expected, expected_labels) in zip(floats, plain):
        assert images.dtype == torch.float32 and torch.equal(labels, expected_labels)
        assert torch.equal(images, batch.apply_table(expected, table))
    if hasattr(os, "memfd_create"):  # from the workers' segments, not torch's /dev/shm
        assert all(not images.is_shared() for images, _ in floats[:4])
        assert _mapped_from(floats[0][0]).startswith("/memfd:fastlmdb-batch")


def _under_small_shm(db, mode, context, batch_size=128):
    """probes/shm_probe.py run with a 64 MB /dev/shm of its own (a mount namespace: root only)."""
    run = " ".join(probes.command("shm_probe", db, mode, batch_size, 224, context))
    command = f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {run}"
    return subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True,
                          text=True, timeout=360, env=probes.env())


def _can_shrink_dev_shm():
    if shutil.which("unshare") is None or not hasattr(os, "memfd_create"):
        return False
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64m tmpfs "
                               "/dev/shm"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
def test_float_batches_run_under_a_64mb_dev_shm(db, context):
    """Docker's default /dev/shm: a float32 batch of 128 at 224 (77 MB) from workers runs
    through the fused tail; the same through torch's collate dies (the control, once)."""
    if not _can_shrink_dev_shm():
        pytest.skip("needs root and unshare(1) to give the probe a 64 MB /dev/shm")
    fused = _under_small_shm(db, "fused", context)
    assert fused.returncode == 0, fused.stderr[-2000:]
    assert "batches 4 {(torch.float32, (128, 3, 224, 224))}" in fused.stdout
    if context == "fork":
        plain = _under_small_shm(db, "torch", context)
        assert plain.returncode != 0 and "No space left on device" in plain.stderr


def test_the_docs_examples_run():
    """docs/speed-tail.md: its python blocks run as written."""
    page = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "speed-tail.md")
    with open(page, encoding="utf-8") as file:
        blocks = file.read().split("```python\n")[1:]
    assert blocks
    for block in blocks:
        exec(compile(block.split("```")[0], page, "exec"), {})

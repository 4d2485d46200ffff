"""The JPEG backends: same pixels as PIL (ImageFolder's loader), reduced-size decoding, and a
missing backend named with the command that installs it."""

import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from fastlmdb.core import jpeg
from fastlmdb.testing.sample_tree import synthetic_photo


def _turbojpeg_error():
    """None when the turbojpeg backend is usable here, else the ImportError it raises."""
    try:
        jpeg.decoder("turbojpeg")
    except ImportError as exc:
        return exc
    return None


TURBO_ERROR = _turbojpeg_error()
USABLE = [b for b in jpeg.DECODERS if b != "turbojpeg" or TURBO_ERROR is None]


def _pixels(height=48, width=80, seed=0):
    return synthetic_photo(np.random.default_rng(seed), height, width)


def _pil_jpeg(image, **save):
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **save)
    return buf.getvalue()


SAMPLES = {
    "rgb420": lambda: simplejpeg.encode_jpeg(_pixels(), quality=90, colorsubsampling="420"),
    "rgb444": lambda: simplejpeg.encode_jpeg(_pixels(37, 61, 1), quality=85,
                                             colorsubsampling="444"),
    "gray": lambda: _pil_jpeg(Image.fromarray(_pixels(45, 70, 2)).convert("L"), quality=90),
    "progressive": lambda: _pil_jpeg(Image.fromarray(_pixels(50, 33, 3)), quality=90,
                                     progressive=True),
}


def _pil_reference(data):
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("backend", USABLE)
@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_backends_match_pil_exactly(backend, kind):
    data = SAMPLES[kind]()
    expected = _pil_reference(data)
    for buffer in (data, memoryview(data)):  # LMDB hands out buffers, not bytes
        got = jpeg.decoder(backend)(buffer)
        assert got.dtype == np.uint8 and got.shape == expected.shape
        assert got.shape[2] == 3
        assert got.flags.writeable  # torch.from_numpy warns on read-only arrays
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("backend", USABLE)
@pytest.mark.parametrize("min_size, expected", [
    ((32, 96), (32, 96)),   # full size needed
    ((32, 12), (32, 96)),   # height decides: no reduction possible
    ((4, 48), (16, 48)),    # width decides: 1/2
    ((4, 4), (4, 12)),      # 1/8
])
def test_reduced_size_covers_request(backend, min_size, expected):
    """A 32x96 (h x w) image, so swapped height/width would show."""
    data = simplejpeg.encode_jpeg(_pixels(32, 96), quality=90)
    got = jpeg.decoder(backend)(data, min_height=min_size[0], min_width=min_size[1])
    assert got.shape[0] >= min_size[0] and got.shape[1] >= min_size[1]
    assert got.shape[:2] == expected
    assert got.dtype == np.uint8 and got.shape[2] == 3


@pytest.mark.parametrize("backend", USABLE)
def test_reduced_size_is_smaller_and_similar(backend):
    pixels = _pixels(64, 96)
    data = simplejpeg.encode_jpeg(pixels, quality=95)
    got = jpeg.decoder(backend)(data, min_height=16, min_width=20)
    assert (16, 20) <= got.shape[:2] < (64, 96)
    assert got.shape[0] < 64 and got.shape[1] < 96
    # Still the same picture: compare with a box-downscaled original.
    fy, fx = 64 // got.shape[0], 96 // got.shape[1]
    small = pixels.reshape(64 // fy, fy, 96 // fx, fx, 3).mean(axis=(1, 3))
    assert np.abs(small - got.astype(np.float64)).mean() < 20


@pytest.mark.parametrize("backend", USABLE)
def test_only_one_side_given(backend):
    data = simplejpeg.encode_jpeg(_pixels(64, 96), quality=90)
    tall = jpeg.decoder(backend)(data, min_height=30)
    wide = jpeg.decoder(backend)(data, min_width=30)
    assert tall.shape[0] >= 30 and tall.shape[0] < 64
    assert wide.shape[1] >= 30 and wide.shape[1] < 96


def test_turbojpeg_usable_or_named_with_install_command():
    if TURBO_ERROR is None:
        data = SAMPLES["rgb420"]()
        np.testing.assert_array_equal(jpeg.decoder("turbojpeg")(data), _pil_reference(data))
    else:
        assert "libturbojpeg0" in str(TURBO_ERROR)
        assert "PyTurboJPEG" in str(TURBO_ERROR)


def test_missing_backend_names_install_command(monkeypatch):
    """Whatever this machine has: a backend whose library cannot load says how to install it."""
    def missing():
        raise OSError("Unable to locate turbojpeg library automatically")

    monkeypatch.setattr(jpeg, "_turbojpeg", missing)
    with pytest.raises(ImportError, match="libturbojpeg0") as info:
        jpeg.decoder("turbojpeg")
    assert "pip install 'PyTurboJPEG<2'" in str(info.value)
    assert "Unable to locate" in str(info.value)


def test_missing_python_module_names_install_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_simplejpeg(name, *args, **kwargs):
        if name == "simplejpeg":
            raise ImportError("No module named 'simplejpeg'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_simplejpeg)
    with pytest.raises(ImportError, match="pip install simplejpeg"):
        jpeg.decoder("simplejpeg")


def test_unknown_backend():
    with pytest.raises(ValueError, match="decoder must be one of .*'nvjpeg'"):
        jpeg.decoder("nvjpeg")


@pytest.mark.parametrize("backend", USABLE)
def test_garbage_raises(backend):
    with pytest.raises(Exception):  # noqa: B017 - each library has its own error type
        jpeg.decoder(backend)(b"\xff\xd8\xff" + b"garbage" * 20)


def test_header_reads_size_without_decoding():
    data = simplejpeg.encode_jpeg(_pixels(37, 61), quality=90)
    assert jpeg.header(data)[:2] == (37, 61)
    with pytest.raises(jpeg.ImageError, match="unreadable JPEG header"):
        jpeg.header(b"not a jpeg")

"""JPEG decoders as pure functions of a buffer (bytes, memoryview or an LMDB buffer).

Every backend returns an HxWx3 uint8 RGB array with libjpeg-turbo's accurate defaults (islow
DCT, fancy upsampling), so all three agree with PIL pixel for pixel. Optional backends are
imported where used; a missing one is named with the command that installs it.

``min_height``/``min_width`` ask for reduced-size decoding: the smallest libjpeg-turbo scale
(1/8 .. 1) whose output still covers both.
"""

import functools
import io
import os

import numpy as np

from fastlmdb.core.errors import ImageError

BACKENDS = ("simplejpeg", "turbojpeg", "pil")
_INSTALL = {
    "simplejpeg": "pip install simplejpeg",
    "turbojpeg": "apt-get install libturbojpeg0 && pip install 'PyTurboJPEG<2'  "
                 "(PyTurboJPEG 2.x needs libjpeg-turbo >= 3.0)",
    "pil": "pip install Pillow",
}


def decoder(backend):
    """The decode function of `backend`, checked to be usable in this process."""
    if backend not in BACKENDS:
        raise ValueError(f"decoder must be one of {', '.join(BACKENDS)}, got {backend!r}")
    try:
        if backend == "turbojpeg":
            _turbojpeg()
        else:
            __import__("simplejpeg" if backend == "simplejpeg" else "PIL.Image")
    except (ImportError, OSError, RuntimeError) as exc:
        raise ImportError(f"the {backend} decoder is not usable here ({exc}); "
                          f"install it with: {_INSTALL[backend]}") from None
    return {"simplejpeg": decode_simplejpeg, "turbojpeg": decode_turbojpeg,
            "pil": decode_pil}[backend]


def decode_simplejpeg(data, *, min_height=None, min_width=None):
    import simplejpeg

    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_height or 0,
                                  min_width=min_width or 0)


def decode_turbojpeg(data, *, min_height=None, min_width=None):
    import turbojpeg

    jpeg = _turbojpeg()
    factor = None
    if min_height or min_width:
        width, height, _, _ = jpeg.decode_header(data)  # PyTurboJPEG: (width, height, ...)
        factor = _scale_factor(height, width, min_height, min_width,
                               jpeg.scaling_factors)
    return jpeg.decode(data, pixel_format=turbojpeg.TJPF_RGB, scaling_factor=factor)


def decode_pil(data, *, min_height=None, min_width=None):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if min_height or min_width:
            # draft() picks the smallest scale with both sides >= the request.
            image.draft("RGB", (min_width or 1, min_height or 1))
        return np.array(image.convert("RGB"))  # writable, as the other backends' arrays


@functools.lru_cache(maxsize=None)
def _turbojpeg_for(pid):
    import turbojpeg

    return turbojpeg.TurboJPEG()


def _turbojpeg():
    # A TurboJPEG() object holds a C handle and cannot be pickled: one per process.
    return _turbojpeg_for(os.getpid())


def _scale_factor(height, width, min_height, min_width, factors):
    """The smallest (num, denom) scale whose output covers min_height x min_width."""
    usable = [f for f in factors
              if -(-height * f[0] // f[1]) >= (min_height or 0)
              and -(-width * f[0] // f[1]) >= (min_width or 0)]
    return min(usable, key=lambda f: f[0] / f[1]) if usable else (1, 1)


def header(data):
    """(height, width, colorspace) of JPEG bytes from the header alone; ImageError if none."""
    import simplejpeg

    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as exc:
        raise ImageError(f"unreadable JPEG header ({exc})") from None
    return height, width, colorspace

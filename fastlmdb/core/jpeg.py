"""JPEG decoders as pure functions of a buffer (bytes, memoryview or an LMDB buffer).

Every backend returns an HxWx3 uint8 RGB array with libjpeg-turbo's accurate defaults (islow
DCT, fancy upsampling), so all three agree with PIL pixel for pixel. Optional backends are
imported where used; a missing one is named with the command that installs it.

``min_height``/``min_width`` ask for reduced-size decoding: the smallest libjpeg-turbo scale
(1/8 .. 1) whose output still covers both.

The fast backends (simplejpeg, PyTurboJPEG) go through TurboJPEG's API, which refuses legal
JPEGs whose sampling factors it has no name for (e.g. ``cjpeg -sample 2x2,2x1,1x2``), and
simplejpeg refuses files that decode only with libjpeg warnings (extraneous bytes before a
marker, a bad Huffman code); PIL reads both, so ImageFolder trains on them. Such a record falls
back, by itself, to ``decode_libjpeg``: libjpeg's own API, lenient as PIL is (the region
decoder, else PIL). ``decode_strict`` is the strict check that ``--check-decode`` and
``fastlmdb verify`` report as a warning.
"""

import functools
import io
import logging
import os

import numpy as np

from fastlmdb.core.errors import ImageError

try:
    from fastlmdb.core import _jpegcrop
except ImportError:  # no compiler or libjpeg headers at install time: PIL serves the fallback
    _jpegcrop = None

log = logging.getLogger(__name__)

WHOLE = 1 << 30  # a crop box this large is clipped to the image: the region decoder decodes all
_REGION_SCALES = ((1, 1), (1, 2), (1, 4), (1, 8))  # the region decoder's scales

DECODERS = ("simplejpeg", "turbojpeg", "pil")
_INSTALL = {
    "simplejpeg": "pip install simplejpeg",
    "turbojpeg": "apt-get install libturbojpeg0 && pip install 'PyTurboJPEG<2'  "
                 "(PyTurboJPEG 2.x needs libjpeg-turbo >= 3.0)",
    "pil": "pip install Pillow",
}


def decoder(backend):
    """The decode function of `backend`, checked to be usable in this process."""
    if backend not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {backend!r}")
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

    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_height or 0,
                                      min_width=min_width or 0)
    except Exception as exc:  # noqa: BLE001 - whatever simplejpeg refuses, libjpeg may read
        return _fall_back("simplejpeg", exc, data, min_height, min_width)


def decode_turbojpeg(data, *, min_height=None, min_width=None):
    import turbojpeg

    jpeg = _turbojpeg()  # raises on libjpeg's warnings too (see _turbojpeg_for)
    try:
        factor = None
        if min_height or min_width:
            width, height, _, _ = jpeg.decode_header(data)  # PyTurboJPEG: (width, height, ...)
            factor = _scale_factor(height, width, min_height, min_width, jpeg.scaling_factors)
        return jpeg.decode(data, pixel_format=turbojpeg.TJPF_RGB, scaling_factor=factor)
    except Exception as exc:  # noqa: BLE001 - whatever TurboJPEG refuses, libjpeg may read
        return _fall_back("PyTurboJPEG", exc, data, min_height, min_width)


def decode_libjpeg(data, *, min_height=None, min_width=None):
    """Decode with libjpeg's own API, as leniently as PIL (warnings are not errors, running out
    of data is): the region decoder over the whole image where it is built, else PIL.
    ValueError if neither reads `data`."""
    if _jpegcrop is None:
        try:
            return decode_pil(data, min_height=min_height, min_width=min_width)
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ...
            raise ValueError(f"PIL cannot decode it either ({exc})") from None
    denom = 1
    if min_height or min_width:
        height, width = _pil_size(data)
        denom = _scale_factor(height, width, min_height, min_width, _REGION_SCALES)[1]
    return _decode_whole(data, denom, strict=False)


def decode_strict(data):
    """HxWx3 RGB pixels of a JPEG that decodes without a single libjpeg warning, else
    ValueError saying what is wrong: simplejpeg (strict), or libjpeg's own API in strict mode
    (the region decoder, where built) for the JPEGs that simplejpeg cannot read."""
    try:
        return simplejpeg_strict(data)
    except ValueError:
        if _jpegcrop is None or _simplejpeg_reads_header(data):
            raise  # a warning (or error) of libjpeg's: what strict checking reports
    return _decode_whole(data, 1, strict=True)


def _simplejpeg_reads_header(data):
    import simplejpeg

    try:
        simplejpeg.decode_jpeg_header(data, strict=False)
    except (ValueError, KeyError):  # KeyError: simplejpeg 1.9 on some odd headers
        return False
    return True


def region_decoder_built():
    """Whether the C region decoder (libjpeg's own API, strict or lenient) is here."""
    return _jpegcrop is not None


def simplejpeg_strict(data):
    """simplejpeg's strict decode, nothing else: ValueError on any libjpeg warning, and on
    JPEGs whose sampling TurboJPEG cannot name. Its pixels equal PIL's."""
    import simplejpeg

    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except KeyError as exc:  # simplejpeg 1.9 on some odd headers; ValueError otherwise
        raise ValueError(f"simplejpeg cannot read it (KeyError {exc})") from None



def _decode_whole(data, denom, *, strict):
    try:
        raw, rows, cols, _ = _jpegcrop.decode_region(data, 0, 0, WHOLE, WHOLE, denom,
                                                     strict=strict)
    except TypeError as exc:  # not bytes-like
        raise ValueError(str(exc)) from None
    return np.frombuffer(raw, np.uint8).reshape(rows, cols, 3)  # writable: a bytearray


def _fall_back(backend, exc, data, min_height, min_width):
    """The pixels of a record `backend` refused (`exc`), from libjpeg's own API; raises
    ValueError naming both reasons if that cannot read it either."""
    try:
        pixels = decode_libjpeg(data, min_height=min_height, min_width=min_width)
    except ValueError as fallback:
        raise ValueError(f"{backend}: {exc}; libjpeg: {fallback}") from None
    _log_lenient_once(f"{backend} could not decode a record cleanly ({exc}); libjpeg's own "
                      "API decoded it")
    return pixels


_lenient_logged = set()  # process ids that logged it (a forked worker has its own)


def _log_lenient_once(what):
    if os.getpid() in _lenient_logged:
        return
    _lenient_logged.add(os.getpid())
    log.warning("%s. Records like it are decoded leniently, as PIL reads them; `fastlmdb "
                "verify` lists them all. Not logged again in this process.", what)


def _pil_size(data):
    """(height, width) from PIL's header parser (no decode)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.height, image.width
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ...
        raise ValueError(f"unreadable header ({exc})") from None


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

    jpeg = turbojpeg.TurboJPEG()
    # PyTurboJPEG hands every non-zero TurboJPEG status to its private __report_error, which
    # for a warning calls warnings.warn (once per distinct text and process: log spam) and
    # returns the image, even when a fatal error followed the warning (libjpeg-turbo 2.x then
    # says "warning" too) and the image is half filled. This object's raises instead, so such
    # a record goes to the lenient fallback. Only this instance: the class and other users of
    # PyTurboJPEG are untouched; normal files never reach it (status 0).
    if hasattr(jpeg, "_TurboJPEG__report_error"):
        jpeg._TurboJPEG__report_error = functools.partial(_turbojpeg_raise, jpeg)
    return jpeg


def _turbojpeg_raise(jpeg, handle):
    raise OSError(jpeg._TurboJPEG__get_error_string(handle))


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
    """(height, width, colorspace, warning) of JPEG bytes from the header alone, as simplejpeg
    reads it: `warning` is libjpeg's warning about the header ("" if none; the header is then
    read leniently). ImageError if simplejpeg cannot read it even so."""
    import simplejpeg

    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        return height, width, colorspace, ""
    except ValueError as exc:
        strict = exc
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data, strict=False)
    except (ValueError, KeyError):  # KeyError: simplejpeg 1.9 on some odd headers
        raise ImageError(f"unreadable JPEG header ({strict})") from None
    return height, width, colorspace, str(strict)

"""A producer's work on one source file: read it, check it, and make the record to store.

A file is bad only if ImageFolder's loader cannot read it (PIL open + ``convert("RGB")``; PIL
refuses truncated files). JPEG mode keeps the source bytes whenever libjpeg decodes them to
RGB, also when it warns (extraneous bytes before a marker, a bad Huffman code) or when the
fast decoders cannot read the file's sampling factors: such records load through the loaders'
lenient libjpeg fallback, and the Record's `warning` says so. CMYK/YCCK JPEGs and non-JPEG
files (PNG bytes named .JPEG, ...) are converted to RGB exactly as ImageFolder's loader would
(PIL ``convert("RGB")``) and stored as a high-quality JPEG. Numpy mode stores the pixels
ImageFolder's loader would produce. JPEGs with other than 8-bit samples (12-bit
medical/scientific files) are refused: no decoder here reads them, PIL included.
"""

import dataclasses
import io
import os
import stat
import typing

import numpy as np

from fastlmdb.core import jpeg
from fastlmdb.sources.refs import Pixels, Ref
from fastlmdb.core.errors import ImageError

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
# Start-of-frame markers (every coding process); the frame header holds the sample precision.
JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                      0xCF})
JPEG_LOSSLESS_SOF = frozenset({0xC3, 0xC7, 0xCB, 0xCF})
JPEG_SOS = 0xDA
TRANSCODE_QUALITY = 95
# libjpeg-turbo 2.x (the system libturbojpeg of Debian 12/13, our region decoder) reads only
# DCT JPEGs; simplejpeg and PIL read lossless ones: store what every decoder reads.
LOSSLESS_WHY = "lossless JPEG (SOF3) re-encoded: libjpeg-turbo 2.x decoders cannot read it"
DEFAULT_MAX_PIXELS = 1 << 27  # 134 M pixels, ~400 MB decoded: far above any real photo
# Warnings: files kept although a strict decoder or the fast ones refuse them (PIL reads them).
LENIENT_WHY = ("strict decoding fails ({}); kept as it is: the loaders decode it leniently, "
               "as PIL does")
NUMPY_LENIENT_WHY = "strict decoding fails ({}); stored as PIL decodes it"
FALLBACK_WHY = ("simplejpeg and PyTurboJPEG cannot read it ({}); kept as it is: the loaders "
                "decode it with libjpeg's own API, slower")


@dataclasses.dataclass(frozen=True)
class Settings:
    imgtype: str = "jpeg"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_size: int = 0  # longer side limit; 0 keeps every image at its size
    quality: int = 90  # JPEG quality of images re-encoded because of max_size
    check_decode: bool = False  # jpeg mode: decode every JPEG, not only headers and end marker


@dataclasses.dataclass(frozen=True)
class Record:
    payload: bytes
    height: int
    width: int
    source_bytes: int
    transcoded: str = ""  # why the stored bytes differ from the source, if they do
    resized: bool = False  # made smaller because of max_size
    warning: str = ""  # why the record loads only leniently or through the fallback, if so


class _Jpeg(typing.NamedTuple):  # a NamedTuple: 1 us less per file than a frozen dataclass
    """What a JPEG's header says; PIL's pixels where simplejpeg could not read the header."""

    height: int
    width: int
    colorspace: str
    lossless: bool
    header_warned: bool = False  # libjpeg warned while reading the header
    fallback: str = ""  # why the fast decoders cannot read it (FALLBACK_WHY), if they cannot
    pixels: np.ndarray = None


class _TooManyPixels(ImageError):
    """A decompression bomb: refused whichever decoder read the header."""


def prepare(path, settings=Settings(), data=None):
    """The Record to store for the file at `path` (its bytes `data`, if read already);
    ImageError names what is wrong."""
    data = read(path) if data is None else data
    if isinstance(data, Pixels):
        return _from_pixels(data, settings)
    if not data:
        raise ImageError("zero-byte file")
    if settings.imgtype == "jpeg":
        record = _as_jpeg(data, settings)
        if not _too_large(record.height, record.width, settings.max_size):
            return record
        pixels, _ = _loader_pixels(record.payload, settings.max_pixels)
        pixels = _shrink(pixels, settings.max_size)
        # Re-encoded by us: it decodes strictly, whatever the source did.
        return Record(_encode(pixels, settings.quality, "420"), *pixels.shape[:2], len(data),
                      record.transcoded, resized=True)
    pixels, _, problem = _pixels(data, settings.max_pixels)
    resized = _too_large(*pixels.shape[:2], settings.max_size)
    if resized:
        pixels = _shrink(pixels, settings.max_size)
    return Record(pixels.tobytes(), *pixels.shape[:2], len(data), resized=resized,
                  warning=NUMPY_LENIENT_WHY.format(problem) if problem else "")


def _from_pixels(pixels, settings):
    """The Record of an image its source holds only as pixels: encoded once (quality 95,
    4:4:4, listed as changed), or stored as they are in numpy mode."""
    array, why = pixels
    _check_pixels(*array.shape[:2], settings.max_pixels)
    resized = _too_large(*array.shape[:2], settings.max_size)
    if resized:
        array = _shrink(array, settings.max_size)
    if settings.imgtype == "numpy":
        return Record(array.tobytes(), *array.shape[:2], array.nbytes, resized=resized)
    quality, sampling = (settings.quality, "420") if resized else (TRANSCODE_QUALITY, "444")
    return Record(_encode(array, quality, sampling), *array.shape[:2], array.nbytes, why,
                  resized=resized)


def _too_large(height, width, max_size):
    return bool(max_size) and max(height, width) > max_size


def _shrink(pixels, max_size):
    """Pixels resized (Lanczos) so that the longer side is max_size."""
    from PIL import Image

    height, width = pixels.shape[:2]
    scale = max_size / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))


def read(path, check_crc=True):
    """The bytes of a file or a Ref (`check_crc`: see archive.read)."""
    if isinstance(path, Ref):  # inside a tar, zip, parquet file, dataset: it knows how
        return path.read(check_crc)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block open() forever
            raise ImageError("not a regular file")
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ImageError(f"cannot read the file ({exc.strerror or exc})") from None
    if not data:
        raise ImageError("zero-byte file")
    return data


def _as_jpeg(data, settings):
    if not data.startswith(JPEG_MAGIC):
        pixels, why = _pil_rgb(data, settings.max_pixels)
        return _transcoded(pixels, len(data), why)
    head = _jpeg_header(data, settings.max_pixels)
    if head.lossless or _cmyk(head):
        pixels, why, _ = _pixels(data, settings.max_pixels, head)
        return _transcoded(pixels, len(data), LOSSLESS_WHY if head.lossless else why)
    warning = head.fallback
    # Decoded when asked, when the file may be truncated (no end marker), or when its header
    # is not plain: PIL decides whether it is bad, strict decoding what to warn about. Damaged
    # scan data is found only by decoding (--check-decode).
    if (settings.check_decode or head.header_warned or head.fallback
            or not data.rstrip(b"\0\r\n ").endswith(JPEG_EOI)):
        _, problem = _loader_pixels(data, settings.max_pixels, head)
        warning = "; ".join(w for w in (warning, problem and LENIENT_WHY.format(problem)) if w)
    return Record(data, head.height, head.width, len(data), warning=warning)


def _cmyk(head):
    return head.colorspace in ("CMYK", "YCCK")


def _transcoded(pixels, source_bytes, why):
    payload = _encode(pixels, TRANSCODE_QUALITY, "444")
    return Record(payload, pixels.shape[0], pixels.shape[1], source_bytes, why)


def _pixels(data, max_pixels, head=None):
    """(RGB pixels as ImageFolder's loader sees them, why PIL had to convert them or "",
    what keeps them from decoding strictly or "")."""
    if data.startswith(JPEG_MAGIC):
        head = head or _jpeg_header(data, max_pixels)
        if not _cmyk(head):
            pixels, problem = _loader_pixels(data, max_pixels, head)
            return pixels, "", problem
    pixels, why = _pil_rgb(data, max_pixels)
    return pixels, why, ""


def _loader_pixels(data, max_pixels, head=None):
    """(pixels, problem) of a JPEG that is not CMYK: exactly ImageFolder's pixels (simplejpeg's
    strict decode where it succeeds, equal to PIL's; else PIL's own), and what keeps it from
    decoding strictly ("" if nothing). ImageError if PIL cannot read it either."""
    pixels = head.pixels if head is not None else None
    if pixels is None:
        try:
            return jpeg.simplejpeg_strict(data), ""
        except ValueError:  # a libjpeg warning, or sampling TurboJPEG cannot name: PIL decides
            pixels, _ = _pil_rgb(data, max_pixels, unreadable="truncated or corrupt JPEG")
    if head is not None and head.fallback and not jpeg.region_decoder_built():
        return pixels, ""  # the one strict decoder here, simplejpeg, cannot read it at all
    try:
        jpeg.decode_strict(data)
    except ValueError as exc:
        return pixels, str(exc)
    return pixels, ""


def _jpeg_header(data, max_pixels):
    """The _Jpeg of JPEG bytes whose header ImageFolder's loader can read (the sample
    precision, then simplejpeg's header, else PIL's decode); else ImageError."""
    marker, bits = _frame(data) or (None, None)
    if bits is not None and bits != 8:
        # Checked here: libjpeg-turbo 3 (simplejpeg) reads such a header and only refuses to
        # decode it, so jpeg mode would store a file that no loader decodes.
        raise ImageError(f"{bits}-bit JPEG: libjpeg-turbo decodes 8-bit samples only; "
                         "convert it to 8-bit first")
    lossless = marker in JPEG_LOSSLESS_SOF
    try:
        height, width, colorspace, warning = jpeg.header(data)
    except ImageError as refused:
        return _pil_decoded_jpeg(data, max_pixels, lossless, refused)
    _check_pixels(height, width, max_pixels)
    return _Jpeg(height, width, colorspace, lossless, header_warned=bool(warning))


def _pil_decoded_jpeg(data, max_pixels, lossless, refused):
    """The _Jpeg of a JPEG whose header simplejpeg refused (`refused`, its ImageError): PIL,
    which reads every sampling factor, decodes it; if it cannot either, `refused` is raised."""
    try:
        pixels, _, mode = _pil_open_rgb(data, max_pixels, "not a readable image")
    except _TooManyPixels:
        raise
    except ImageError:
        raise refused from None
    reason = str(refused).removeprefix("unreadable JPEG header (").removesuffix(")")
    return _Jpeg(*pixels.shape[:2], mode, lossless, fallback=FALLBACK_WHY.format(reason),
                 pixels=pixels)


def _frame(data):
    """(marker, bits per sample) of a JPEG's frame header, or None where there is no sound one
    (the decoder's header check then says what is wrong)."""
    pos = 2
    while pos + 4 < len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker in JPEG_SOF:
            bits = _frame_precision(data, pos)
            return None if bits is None else (marker, bits)
        elif marker in (JPEG_SOS, 0xD9):  # scan data or the end, and no frame header before
            return None
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # no length field
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def _frame_precision(data, pos):
    """The precision of the frame header at `pos` if the standard allows it (8 or 12; 2 to 16
    lossless) and the header's length fits its component count, else None (garbage)."""
    header = data[pos:pos + 10]
    if len(header) < 10:
        return None
    bits, components = header[4], header[9]
    allowed = range(2, 17) if header[1] in JPEG_LOSSLESS_SOF else (8, 12)
    length_ok = int.from_bytes(header[2:4], "big") == 8 + 3 * components
    return bits if bits in allowed and components and length_ok else None


def _pil_rgb(data, max_pixels, unreadable="not a readable image"):
    """(pixels, why) from ImageFolder's loader, PIL open + convert("RGB"); ImageError
    "`unreadable` (PIL's reason)" if it cannot."""
    pixels, image_format, mode = _pil_open_rgb(data, max_pixels, unreadable)
    return pixels, f"{image_format} {mode} image converted to RGB JPEG"


def _pil_open_rgb(data, max_pixels, unreadable):
    """(RGB pixels, format, mode) of the file from PIL; ImageError if it cannot read it."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_pixels(image.height, image.width, max_pixels)
            return np.asarray(image.convert("RGB")), image.format, image.mode
    except Image.UnidentifiedImageError:
        # Not PIL's message: it names a memory address, and metadata must be reproducible.
        raise ImageError(f"{unreadable} (no image format recognised)") from None
    except Image.DecompressionBombError as exc:
        raise _TooManyPixels(f"{unreadable} ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{unreadable} ({exc})") from None


def _check_pixels(height, width, max_pixels):
    if height * width > max_pixels:
        raise _TooManyPixels(f"{width}x{height} pixels exceeds the limit of {max_pixels} "
                             "(raise it with --max-pixels if the image is genuine)")


def _encode(pixels, quality, subsampling):
    import simplejpeg

    return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality,
                                  colorspace="RGB", colorsubsampling=subsampling)

"""A producer's work on one source file: read it, check it, and make the record to store.

JPEG mode keeps the source bytes whenever libjpeg-turbo can decode them to RGB; CMYK/YCCK
JPEGs and non-JPEG files (PNG bytes named .JPEG, ...) are converted to RGB exactly as
ImageFolder's loader would (PIL ``convert("RGB")``) and stored as a high-quality JPEG.
Numpy mode stores the pixels ImageFolder's loader would produce. JPEGs with other than 8-bit
samples (12-bit medical/scientific files) are refused: no decoder here reads them.
"""

import dataclasses
import io
import os
import stat

import numpy as np

from fastlmdb.core import archive, jpeg
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


def prepare(path, settings=Settings()):
    """The Record to store for the file at `path`; ImageError names what is wrong."""
    data = read(path)
    if settings.imgtype == "jpeg":
        record = _as_jpeg(data, settings)
        if not _too_large(record.height, record.width, settings.max_size):
            return record
        pixels = _shrink(_strict_decode(record.payload), settings.max_size)
        return Record(_encode(pixels, settings.quality, "420"), *pixels.shape[:2], len(data),
                      record.transcoded, resized=True)
    pixels, _ = _pixels(data, settings.max_pixels)
    resized = _too_large(*pixels.shape[:2], settings.max_size)
    if resized:
        pixels = _shrink(pixels, settings.max_size)
    return Record(pixels.tobytes(), *pixels.shape[:2], len(data), resized=resized)


def _too_large(height, width, max_size):
    return bool(max_size) and max(height, width) > max_size


def _shrink(pixels, max_size):
    """Pixels resized (Lanczos) so that the longer side is max_size."""
    from PIL import Image

    height, width = pixels.shape[:2]
    scale = max_size / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))


def read(path):
    if isinstance(path, archive.Member):  # a file inside a tar or zip, read in place
        return archive.read(path)
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
    if data.startswith(JPEG_MAGIC):
        height, width, colorspace, lossless = _jpeg_header(data, settings.max_pixels)
        if lossless:
            return _transcoded(_strict_decode(data), len(data), LOSSLESS_WHY)
        if colorspace not in ("CMYK", "YCCK"):
            # Without an end marker the file may be truncated; damaged scan data is found only
            # by decoding, which --check-decode asks for.
            if settings.check_decode or not data.rstrip(b"\0\r\n ").endswith(JPEG_EOI):
                _strict_decode(data)
            return Record(data, height, width, len(data))
    pixels, why = _pixels(data, settings.max_pixels)
    return _transcoded(pixels, len(data), why)


def _transcoded(pixels, source_bytes, why):
    payload = _encode(pixels, TRANSCODE_QUALITY, "444")
    return Record(payload, pixels.shape[0], pixels.shape[1], source_bytes, why)


def _pixels(data, max_pixels):
    """RGB pixels as ImageFolder's loader sees them, and why PIL had to be used (or "")."""
    if data.startswith(JPEG_MAGIC):
        _, _, colorspace, _ = _jpeg_header(data, max_pixels)
        if colorspace not in ("CMYK", "YCCK"):
            return _strict_decode(data), ""
    return _pil_rgb(data, max_pixels)


def _jpeg_header(data, max_pixels):
    """(height, width, colorspace, lossless) of JPEG bytes that the decoders can read; else
    ImageError."""
    marker, bits = _frame(data) or (None, None)
    if bits is not None and bits != 8:
        # Checked here: libjpeg-turbo 3 (simplejpeg) reads such a header and only refuses to
        # decode it, so jpeg mode would store a file that no loader decodes.
        raise ImageError(f"{bits}-bit JPEG: libjpeg-turbo decodes 8-bit samples only; "
                         "convert it to 8-bit first")
    height, width, colorspace = jpeg.header(data)
    _check_pixels(height, width, max_pixels)
    return height, width, colorspace, marker in JPEG_LOSSLESS_SOF


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


def _strict_decode(data):
    try:
        return jpeg.decode_simplejpeg(data)
    except ValueError as exc:
        raise ImageError(f"truncated or corrupt JPEG ({exc})") from None


def _pil_rgb(data, max_pixels):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_pixels(image.height, image.width, max_pixels)
            why = f"{image.format} {image.mode} image converted to RGB JPEG"
            return np.asarray(image.convert("RGB")), why
    except Image.UnidentifiedImageError:
        # Not PIL's message: it names a memory address, and metadata must be reproducible.
        raise ImageError("not a readable image (no image format recognised)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"not a readable image ({exc})") from None


def _check_pixels(height, width, max_pixels):
    if height * width > max_pixels:
        raise ImageError(f"{width}x{height} pixels exceeds the limit of {max_pixels} "
                         "(raise it with --max-pixels if the image is genuine)")


def _encode(pixels, quality, subsampling):
    import simplejpeg

    return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality,
                                  colorspace="RGB", colorsubsampling=subsampling)

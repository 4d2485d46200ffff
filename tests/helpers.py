"""Generic test helpers: synthetic ImageFolder trees (with the awkward files ImageNet really
has), reading a database back, and image comparison. Import with ``from helpers import ...``
(pytest puts tests/ on sys.path); conftest.py wraps the common trees as fixtures.
"""

import io
import os
import shutil
import subprocess
import zlib

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from fastlmdb import converter as _convert
from fastlmdb.core import format as fmt
from fastlmdb.core import catalog
from fastlmdb.testing.sample_tree import synthetic_photo

# JPEGs PIL reads that libjpeg decodes only with warnings (strict decoders refuse them): real
# encoders' output (cjpeg, simplejpeg) with bytes inserted before a marker, a scan cut short and
# closed with an end marker, bytes of 1s in the scan (a bad Huffman code), a JFIF version 2.
LIBJPEG_WARNS = ("junk-before-dqt", "junk-before-dht", "junk-before-sof", "junk-before-sos",
                 "junk-before-rst", "junk-before-eoi", "cut-scan-eoi", "damaged-scan",
                 "jfif-revision", "sampling-junk")
# Of those, the ones whose warning comes while reading the header (found without decoding).
HEADER_WARNS = ("junk-before-dqt", "junk-before-dht", "junk-before-sof", "junk-before-sos",
                "jfif-revision")
# Legal JPEGs whose sampling factors TurboJPEG's API (simplejpeg, PyTurboJPEG) cannot name;
# libjpeg's own API (PIL, the region decoder) reads them. cjpeg -sample, as in the wild.
ODD_SAMPLING = ("sampling-mixed", "sampling-fine-chroma", "sampling-rgb", "sampling-junk")
# Odd bytes that no decoder here warns about: RGB-coded components, bytes after the end marker.
HARMLESS = ("rgb", "junk-after-eoi")
# Files ImageFolder's loader reads fine but that are not plain baseline RGB JPEGs.
GOOD_AWKWARD = ("cmyk", "gray", "progressive", "png", "exif",
                *dict.fromkeys(LIBJPEG_WARNS + ODD_SAMPLING + HARMLESS))
# Of those, the ones jpeg mode cannot store as they are (it transcodes them to an RGB JPEG).
TRANSCODED = ("cmyk", "png")
# Files no loader can read: conversions must refuse them (on_error="raise") or skip them.
BAD = ("truncated", "header-only", "zero", "text")
# Rarer JPEGs: arithmetic-coded ones decode (made with jpegtran), the others do not.
ARITHMETIC = ("arithmetic", "arithmetic-progressive", "arithmetic-gray", "arithmetic-cmyk")
UNDECODABLE = ("12-bit",)
KINDS = ("plain", *GOOD_AWKWARD, *BAD, *ARITHMETIC, *UNDECODABLE)


# Good awkward files mixed with plain ones, in every class and in different sort positions.
AWKWARD_LAYOUT = {
    "train": {
        "n00000000": ["a_plain.JPEG", ("b_cmyk.JPEG", "cmyk"), ("c_gray.JPEG", "gray"),
                      "d_plain.jpg", ("e_sampling-mixed.JPEG", "sampling-mixed")],
        "n00000001": [("a_progressive.JPEG", "progressive"), ("b_png.JPEG", "png"),
                      "c_plain.JPEG"],
        "n00000002": ["a_plain.JPEG", ("b_exif.JPEG", "exif"), ("c_cmyk.jpeg", "cmyk"),
                      ("d_gray.JPEG", "gray"), ("e_junk-before-dqt.JPEG", "junk-before-dqt")],
    },
    "val": {"n00000000": 1, "n00000001": 1, "n00000002": [("a_png.JPEG", "png")]},
}


# Every JPEG that libjpeg warns about or that the fast decoders cannot read, and the harmless
# odd ones, with plain JPEGs, in two classes: names "<letter>_<kind>.JPEG".
LENIENT_LAYOUT = {"train": {
    f"n{c:08d}": [(f"{chr(97 + k)}_{kind}.JPEG", kind) for k, kind in enumerate(
        ("plain", *dict.fromkeys(LIBJPEG_WARNS + ODD_SAMPLING + HARMLESS)))]
    for c in range(2)}}


def photo(rng, height=None, width=None):
    """A small photo-like HxWx3 uint8 array, 40-120 px a side unless given."""
    height = height or int(rng.integers(40, 121))
    width = width or int(rng.integers(40, 121))
    return synthetic_photo(rng, height, width)


def _pil_bytes(image, **save):
    buf = io.BytesIO()
    image.save(buf, **save)
    return buf.getvalue()


def jpegtran(data, *args):
    """JPEG bytes through `jpegtran ARGS`: lossless, the DCT coefficients stay the same."""
    return _run_tool("jpegtran", args, data)


def cjpeg(pixels, *args):
    """HxWx3 uint8 `pixels` encoded by libjpeg's own encoder, `cjpeg ARGS` (quality 90)."""
    height, width = pixels.shape[:2]
    ppm = b"P6\n%d %d\n255\n" % (width, height) + np.ascontiguousarray(pixels).tobytes()
    return _run_tool("cjpeg", ("-quality", "90", *args), ppm)


def _run_tool(name, args, data):
    """stdout of libjpeg-turbo's command-line tool `name` fed `data`; never a skip."""
    if shutil.which(name) is None:
        pytest.fail(f"{name} is missing: install libjpeg-turbo-progs "
                    "(apt-get install libjpeg-turbo-progs; scripts/test.sh does)")
    return subprocess.run([name, *args], input=data, capture_output=True, check=True).stdout


def marker_offset(data, marker):
    """Offset of the first `marker` (0xDB for DQT, ...) in JPEG `data`: the header is walked
    segment by segment; RSTn and EOI are found in the scan data, where a 0xFF data byte is
    always followed by 0x00."""
    pos = 2
    while data[pos + 1] != 0xDA:  # the segments before the first scan
        if data[pos + 1] == marker:
            return pos
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    if marker == 0xDA:
        return pos
    return data.index(bytes([0xFF, marker]), pos + 2)


def with_bytes_before(data, marker, junk=b"\0\0\0\0"):
    """JPEG `data` with `junk` just before its first `marker`: libjpeg skips such bytes with
    the warning "Corrupt JPEG data: 4 extraneous bytes before marker 0x.."."""
    at = marker_offset(data, marker)
    return data[:at] + junk + data[at:]


def cut_scan_closed(data):
    """JPEG `data` cut in the middle of its scan and closed with an end marker, as a broken
    download someone "repaired": libjpeg warns (premature end of data segment) and fills the
    rest with gray; PIL reads it, where it refuses the same cut without an end marker."""
    start = marker_offset(data, 0xDA)
    return data[:start + (len(data) - start) // 2] + b"\xff\xd9"


def twelve_bit(data):
    """A genuine 12-bit JPEG from a baseline 8-bit one: the frame header turned into extended
    sequential (SOF1) with 12-bit samples. Coded 8-bit coefficients are valid 12-bit ones, so a
    12-bit decoder reads it (checked with libjpeg-turbo 3's: samples near 2048 of 4095)."""
    sof = data.index(b"\xff\xc0")
    patched = bytearray(data)
    patched[sof + 1], patched[sof + 4] = 0xC1, 12
    return bytes(patched)


def damage_scan(data):
    """JPEG bytes with 16 bytes of 1 bits (stuffed 0xFF) in the middle of the scan data: longer
    than any Huffman code, so decoding fails, while headers and end marker stay intact."""
    middle = data.index(b"\xff\xda") + (len(data) - data.index(b"\xff\xda")) // 2
    return data[:middle] + b"\xff\x00" * 16 + data[middle + 32:]


def image_bytes(kind, rng):
    """The bytes of one file of `kind` (see KINDS)."""
    if kind.startswith("arithmetic"):  # "arithmetic-gray": a gray JPEG, arithmetic-coded
        huffman = kind.partition("-")[2] or "plain"
        progressive = ["-progressive"] if huffman == "progressive" else []
        return jpegtran(image_bytes(huffman, rng), "-arithmetic", *progressive)
    if kind == "12-bit":
        return twelve_bit(image_bytes("plain", rng))
    if kind == "damaged-scan":
        return damage_scan(image_bytes("plain", rng))
    if kind in _CJPEG_KINDS:
        return _CJPEG_KINDS[kind](rng)
    if kind == "zero":
        return b""
    if kind == "text":
        return b"this is not an image, whatever its name says\n"
    pixels = photo(rng)
    if kind == "plain":
        return simplejpeg.encode_jpeg(pixels, quality=90, colorsubsampling="420")
    image = Image.fromarray(pixels)
    if kind == "cmyk":
        return _pil_bytes(image.convert("CMYK"), format="JPEG", quality=90)
    if kind == "gray":
        return _pil_bytes(image.convert("L"), format="JPEG", quality=90)
    if kind == "progressive":
        return _pil_bytes(image, format="JPEG", quality=90, progressive=True)
    if kind == "png":
        return _pil_bytes(image, format="PNG")
    if kind == "lossless":  # SOF3, 8-bit RGB; Pillow cannot write one, imagecodecs can
        import imagecodecs

        return imagecodecs.jpeg8_encode(pixels, lossless=True)
    if kind == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 CW to display; ImageFolder ignores it
        return _pil_bytes(image, format="JPEG", quality=90, exif=exif.tobytes())
    if kind == "truncated":
        data = simplejpeg.encode_jpeg(pixels, quality=90)
        start_of_scan = data.index(b"\xff\xda")
        # Cut in the middle of the entropy-coded data: the header is intact.
        cut = start_of_scan + (len(data) - start_of_scan) // 2
        assert cut > start_of_scan + 100
        return data[:cut]
    if kind == "header-only":
        data = simplejpeg.encode_jpeg(pixels, quality=90)
        return data[:data.index(b"\xff\xda")]  # every header, no scan data, no end marker
    raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")


_SAMPLING = {"sampling-mixed": ("-sample", "2x2,2x1,1x2"),
             "sampling-fine-chroma": ("-sample", "1x1,2x2,2x2"),
             "sampling-rgb": ("-rgb", "-sample", "2x2,2x2,1x1")}
_JUNK_BEFORE = {"dqt": 0xDB, "dht": 0xC4, "sof": 0xC0, "sos": 0xDA}
# After scan data libjpeg's bit reader may already have taken up to 4 of the bytes (they then
# count as data, no warning): 16 always leave some extraneous.
_SCAN_JUNK = b"\0" * 16


def _jfif_2(data):
    """JPEG `data` whose JFIF header says version 2.01: libjpeg warns, PIL reads it."""
    at = data.index(b"JFIF\0") + 5
    return data[:at] + b"\x02" + data[at + 1:]


_CJPEG_KINDS = {
    **{kind: (lambda rng, args=args: cjpeg(photo(rng), *args)) for kind, args in _SAMPLING.items()},
    "sampling-junk": lambda rng: with_bytes_before(cjpeg(photo(rng), *_SAMPLING["sampling-mixed"]),
                                                   0xDB),
    "rgb": lambda rng: cjpeg(photo(rng), "-rgb"),
    **{f"junk-before-{name}": (lambda rng, marker=marker: with_bytes_before(cjpeg(photo(rng)),
                                                                           marker))
       for name, marker in _JUNK_BEFORE.items()},
    # a restart marker every MCU row: the bytes land between two entropy-coded segments
    "junk-before-rst": lambda rng: with_bytes_before(cjpeg(photo(rng), "-restart", "1"), 0xD0,
                                                     _SCAN_JUNK),
    "junk-before-eoi": lambda rng: with_bytes_before(cjpeg(photo(rng)), 0xD9, _SCAN_JUNK),
    "junk-after-eoi": lambda rng: cjpeg(photo(rng)) + b"<html>not found</html>\n",
    "cut-scan-eoi": lambda rng: cut_scan_closed(cjpeg(photo(rng))),
    "jfif-revision": lambda rng: _jfif_2(cjpeg(photo(rng))),
}


def write_image(path, kind="plain", rng=None):
    """Write one file of `kind` at `path` (folders made as needed); returns the path."""
    if rng is None:
        rng = np.random.default_rng(zlib.crc32(os.fspath(path).encode()))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as file:
        file.write(image_bytes(kind, rng))
    return os.fspath(path)


def make_tree(root, layout, seed=0):
    """Write an ImageFolder tree; returns root as a str.

    layout = {split: {class: files}}: files is a count of plain JPEGs (named
    ``<class>_<i>.JPEG``) or a list of file names (plain JPEGs) and ``(name, kind)`` pairs.
    Names may contain "/" for nested folders.
    """
    rng = np.random.default_rng(seed)
    root = os.fspath(root)
    for split, classes in layout.items():
        for cls, files in classes.items():
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            if isinstance(files, int):
                files = [f"{cls}_{i:03d}.JPEG" for i in range(files)]
            for spec in files:
                name, kind = (spec, "plain") if isinstance(spec, str) else spec
                write_image(os.path.join(folder, name), kind, rng)
    return root


def plain_layout(classes=3, train=4, val=2):
    return {split: {f"n{c:08d}": count for c in range(classes)}
            for split, count in (("train", train), ("val", val)) if count}


def add_bad_files(class_dir, kinds=BAD, prefix="bad", seed=1):
    """Write one file of each bad kind into `class_dir`; returns their paths, sorted."""
    rng = np.random.default_rng(seed)
    return sorted(write_image(os.path.join(class_dir, f"{prefix}_{kind}.JPEG"), kind, rng)
                  for kind in kinds)


def run_convert(src, dst, split="train", **options):
    """convert.convert with test-friendly defaults (one producer)."""
    options.setdefault("procs", 1)
    return _convert.convert(_convert.Options(os.fspath(src), os.fspath(dst), split, **options))


def read_db(path):
    """(info, rows, values) of a finished database; values[i] is record i (logical order,
    stored under key rows["key"][i]) as bytes."""
    info, rows = catalog.read_catalog(path)
    reader = catalog.reader(path)
    try:
        values = [bytes(reader.get(int(key))) for key in rows["key"]]
    finally:
        reader.close()
    return info, rows, values


def key_of(txn, meta, index):
    """The key of record `index` (keys are the write order), read in an open transaction."""
    table = np.load(io.BytesIO(txn.get(fmt.TABLE_KEY, db=meta)), allow_pickle=False)
    return int(table["key"][index])


def db(dst, split="train"):
    return fmt.db_path(dst, split)


def usable_decoders():
    """The decoder backends that work on this machine (turbojpeg needs libturbojpeg)."""
    from fastlmdb.core import jpeg

    usable = []
    for backend in jpeg.DECODERS:
        try:
            jpeg.decoder(backend)
        except ImportError:
            continue
        usable.append(backend)
    return usable


def pil_rgb(path_or_bytes):
    """What torchvision's ImageFolder loader returns, as an array."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


def pixels_of(value, row):
    return np.frombuffer(value, dtype=np.uint8).reshape(int(row["height"]), int(row["width"]), 3)


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def imagefolder(directory):
    from torchvision.datasets import ImageFolder

    return ImageFolder(os.fspath(directory))


def assert_same_database(path, reference):
    """Records, record table and metadata (apart from timestamps) are identical."""
    info, rows, values = read_db(path)
    ref_info, ref_rows, ref_values = read_db(reference)
    assert values == ref_values
    assert np.array_equal(rows, ref_rows)
    assert without_times(info) == without_times(ref_info)
    return len(values)


def without_times(info):
    return {k: v for k, v in info.items() if k not in ("started", "finished")}


# DataLoader worker start methods: fork in the quick loop (`pytest -m "not slow"`), spawn and
# forkserver (a fresh interpreter importing torch per worker, seconds each) in the full run.
START_METHODS = ["fork", pytest.param("spawn", marks=pytest.mark.slow),
                 pytest.param("forkserver", marks=pytest.mark.slow)]

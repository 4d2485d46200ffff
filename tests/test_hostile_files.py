"""Rarer hostile files, in both modes: arithmetic-coded and 12-bit JPEGs, damaged scan data
(--check-decode), and fuzzed files. The common kinds are in test_convert.py."""

import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import pytest

import fastlmdb
from fastlmdb import LMDBDataset
from fastlmdb.converter import prepare
from fastlmdb.core import folder, jpeg
from fastlmdb.core import format as fmt
from fastlmdb.cli.commands import main
from fastlmdb.core.errors import ConversionError, ImageError
from helpers import (db, image_bytes, imagefolder, jpegtran, make_tree, pil_rgb, pixels_of,
                     psnr, read_db, run_convert, usable_decoders, write_image)

# Every test here starts spawn-context producer and writer processes: none may hang.
pytestmark = pytest.mark.timeout(60)

PROBE = os.path.join(os.path.dirname(__file__), "load_probe.py")
TWELVE_BIT = ("12-bit JPEG: libjpeg-turbo decodes 8-bit samples only; "
              "convert it to 8-bit first")


DECODERS = usable_decoders()


def kind_of(path):
    return os.path.splitext(os.path.basename(path))[0].split("_", 1)[1]


def is_arithmetic(data):
    """Whether the frame header (before the first scan) says arithmetic coding (SOF9/SOF10)."""
    header = data[:data.index(b"\xff\xda")]
    return b"\xff\xc9" in header or b"\xff\xca" in header


@pytest.fixture
def arithmetic_tree(tmp_path):
    """SRC/train, 2 classes of 6: a photo as a baseline Huffman JPEG and the same coefficients
    arithmetic-coded, sequential and progressive (jpegtran is lossless), then an arithmetic
    progressive, gray and CMYK JPEG."""
    rng = np.random.default_rng(5)
    for c in range(2):
        class_dir = tmp_path / "src" / "train" / f"n{c:08d}"
        class_dir.mkdir(parents=True)
        huffman = image_bytes("plain", rng)
        (class_dir / "a_huffman.JPEG").write_bytes(huffman)
        (class_dir / "b_arithmetic.JPEG").write_bytes(jpegtran(huffman, "-arithmetic"))
        (class_dir / "c_arithmetic-progressive.JPEG").write_bytes(
            jpegtran(huffman, "-arithmetic", "-progressive"))
        for kind in ("arithmetic-progressive", "arithmetic-gray", "arithmetic-cmyk"):
            write_image(class_dir / f"d_{kind}.JPEG", kind, rng)
    return os.fspath(tmp_path / "src")


def test_arithmetic_jpegs_are_kept_and_load_as_pil_decodes_them(arithmetic_tree, dst):
    stats = run_convert(arithmetic_tree, dst)
    info, rows, values = read_db(db(dst))
    paths = [p for p, _ in imagefolder(os.path.join(arithmetic_tree, "train")).samples]
    assert len(values) == len(paths) == 12 and stats.skipped == []
    for path, value, row in zip(paths, values, rows):
        with open(path, "rb") as file:
            source = file.read()
        assert is_arithmetic(source) == (kind_of(path) != "huffman"), path
        if kind_of(path) == "arithmetic-cmyk":  # transcoded as every CMYK JPEG is
            assert value != source and row["transcoded"] == 1
        else:
            assert value == source, f"{path} was not stored byte for byte"
    assert [t[1] for t in info["transcoded"]] == [p for p in paths if "cmyk" in p]

    for decoder in DECODERS:
        dataset = LMDBDataset(dst, "train", output="numpy", decoder=decoder)
        for i, path in enumerate(paths):
            pixels, expected = dataset[i][0], pil_rgb(path)
            if kind_of(path) == "arithmetic-cmyk":
                assert psnr(pixels, expected) > 30, (decoder, path)
            else:
                np.testing.assert_array_equal(pixels, expected, err_msg=f"{decoder} {path}")


def test_arithmetic_jpegs_crop_as_their_huffman_twins(arithmetic_tree, dst):
    # The region decoder (or its fallback) gives the same pixels for the same coefficients.
    run_convert(arithmetic_tree, dst)
    paths = [p for p, _ in imagefolder(os.path.join(arithmetic_tree, "train")).samples]
    crop = LMDBDataset(dst, "train", fastlmdb.ResizeCenterCrop(40, 32), output="numpy")
    for c in range(2):
        twins = [crop[paths.index(os.path.join(arithmetic_tree, "train", f"n{c:08d}",
                                                f"{name}.JPEG"))][0]
                 for name in ("a_huffman", "b_arithmetic", "c_arithmetic-progressive")]
        assert twins[0].shape == (32, 32, 3)
        np.testing.assert_array_equal(twins[1], twins[0])
        np.testing.assert_array_equal(twins[2], twins[0])


def test_arithmetic_jpegs_in_numpy_mode_store_imagefolder_pixels(arithmetic_tree, dst):
    run_convert(arithmetic_tree, dst, save_as="numpy")
    _, rows, values = read_db(db(dst))
    reference = imagefolder(os.path.join(arithmetic_tree, "train"))
    dataset = LMDBDataset(dst, "train", output="numpy")
    assert len(values) == len(reference) == len(dataset) == 12
    for i, ((path, label), value, row) in enumerate(zip(reference.samples, values, rows)):
        expected = np.asarray(reference[i][0])
        np.testing.assert_array_equal(pixels_of(value, row), expected, err_msg=path)
        np.testing.assert_array_equal(dataset[i][0], expected, err_msg=path)
        assert dataset[i][1] == label


@pytest.mark.parametrize("save_as", ["jpeg", "numpy"])
def test_a_12_bit_jpeg_is_reported_with_what_to_do(tree, dst, save_as):
    path = write_image(os.path.join(tree, "train", "n00000001", "scan_12bit.JPEG"), "12-bit")
    with open(path, "rb") as file:
        data = file.read()
    sof = data.index(b"\xff\xc1")
    assert data[sof + 4] == 12  # extended sequential, 12-bit samples
    with pytest.raises(ConversionError,
                       match=re.escape(f"{path}: {TWELVE_BIT}.") + " Pass --on-error skip"):
        run_convert(tree, dst, save_as=save_as)
    # What the message says to do resumes past it.
    stats = run_convert(tree, dst, save_as=save_as, on_error="skip")
    assert stats.skipped == [[path, TWELVE_BIT]]
    assert stats.images == 12
    scan = folder.scan(os.path.join(tree, "train"))  # it stopped where the file is written
    written = fmt.write_order(len(scan), "shuffled", 0).tolist()
    assert stats.resumed_at == written.index(scan.paths.index(path))


@pytest.fixture
def damaged(tree):
    """A JPEG with damaged scan data (headers and end marker intact) in `tree`'s train split."""
    path = write_image(os.path.join(tree, "train", "n00000001", "damaged.JPEG"), "damaged-scan")
    with open(path, "rb") as file:
        data = file.read()
    with pytest.raises(ValueError):
        jpeg.decode_simplejpeg(data)  # really undecodable
    return path


def test_damaged_scan_data_is_stored_unless_check_decode(tree, damaged, dst, tmp_path):
    stats = run_convert(tree, tmp_path / "unchecked")
    assert stats.images == 13 and stats.skipped == []  # JPEG mode reads headers only

    reason = r"truncated or corrupt JPEG \(.+\)"
    with pytest.raises(ConversionError, match=re.escape(damaged) + ": " + reason):
        run_convert(tree, dst, check_decode=True)
    with pytest.raises(ConversionError,
                       match=r"started with --check-decode on, this run asks for off.*"
                             r"--overwrite"):
        run_convert(tree, dst, on_error="skip")
    stats = run_convert(tree, dst, check_decode=True, on_error="skip")
    assert [path for path, _ in stats.skipped] == [damaged]
    assert re.fullmatch(reason, stats.skipped[0][1])
    assert stats.images == 12 and stats.resumed_at > 0


def test_check_decode_on_the_command_line(tree, damaged, dst, capsys):
    args = ["convert", "--from-dir", tree, "--to-dir", dst, "--split", "train", "--procs", "1",
            "--check-decode", "--on-error", "skip"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"  skipped  {damaged}: truncated or corrupt JPEG (" in out
    assert "  0 changed, 1 skipped" in out


# Fuzzing: real JPEGs with bytes overwritten in the headers or the scan data, cut anywhere, or
# replaced by garbage after a JPEG magic. Seeded, so a failure reproduces.
FUZZ_SOURCES = ("plain", "progressive", "gray", "exif", "arithmetic")
MUTATIONS = ("header", "scan", "truncate", "garbage")
FUZZ_FILES = 60  # every source kind with every mutation, 3 times


def fuzzed(kind, mutation, rng):
    data = bytearray(image_bytes(kind, rng))
    scan = data.index(b"\xff\xda")
    if mutation == "header":
        for pos in rng.integers(2, scan, size=rng.integers(1, 5)):
            data[pos] = rng.integers(256)
    elif mutation == "scan":  # the end marker stays: only decoding finds the damage
        for pos in rng.integers(scan, len(data) - 2, size=rng.integers(1, 17)):
            data[pos] = rng.integers(256)
    elif mutation == "truncate":
        del data[rng.integers(3, len(data)):]
    else:
        data = bytearray(b"\xff\xd8\xff" + rng.bytes(int(rng.integers(0, 2000))))
    return bytes(data)


@pytest.fixture
def fuzz_tree(tmp_path):
    rng = np.random.default_rng(20240611)
    make_tree(tmp_path / "src", {"train": {f"n{c:08d}": 0 for c in range(3)}})
    for i in range(FUZZ_FILES):
        kind, mutation = FUZZ_SOURCES[i % 5], MUTATIONS[i % 4]
        path = tmp_path / "src" / "train" / f"n{i % 3:08d}" / f"{i:02d}_{kind}_{mutation}.JPEG"
        path.write_bytes(fuzzed(kind, mutation, rng))
    return os.fspath(tmp_path / "src")


def load_in_a_child(root):
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(fastlmdb.__file__))  # this fastlmdb
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(PROBE), package_root, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, PROBE, root, "train"], capture_output=True,
                          text=True, env=env, timeout=90)
    assert done.returncode == 0, f"loading crashed ({done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("save_as, check_decode",
                         [("jpeg", False), ("jpeg", True), ("numpy", False)])
def test_fuzzed_files_are_stored_or_reported_and_stored_ones_load(fuzz_tree, dst, save_as,
                                                                  check_decode):
    stats = run_convert(fuzz_tree, dst, save_as=save_as, check_decode=check_decode,
                        on_error="skip")
    _, rows, values = read_db(db(dst))
    paths = folder.scan(os.path.join(fuzz_tree, "train")).paths
    stored = [paths[source] for source in rows["source"].tolist()]
    skipped = [path for path, _ in stats.skipped]
    assert len(paths) == FUZZ_FILES
    assert sorted(stored + skipped) == sorted(paths)  # each file once: stored or listed
    assert stats.images == len(values) == FUZZ_FILES - len(skipped)
    assert 0 < len(skipped) < FUZZ_FILES
    assert all(isinstance(why, str) and why.strip() for _, why in stats.skipped)

    loaded = load_in_a_child(os.path.dirname(db(dst)))
    for way, (ok, failed) in loaded["ways"].items():
        assert ok + failed == len(values), way
    strict_failures = loaded["ways"]["simplejpeg"][1]
    assert len(loaded["verify"]) == strict_failures  # verify decodes as strictly
    if save_as == "numpy" or check_decode:
        assert strict_failures == 0  # what was checked at conversion loads
    else:
        assert strict_failures > 0  # damaged scan data, found only at load without the flag


def _claiming(data, marker, height, width):
    """JPEG `data` whose frame header (after `marker`) claims height x width pixels."""
    at = data.index(marker)
    return data[:at + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[at + 9:]


def _png_claiming(data, height, width):
    """PNG `data` whose IHDR claims width x height pixels, with a valid chunk CRC."""
    body = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + data[24:29]
    return data[:12] + body + zlib.crc32(body).to_bytes(4, "big") + data[33:]


@pytest.mark.parametrize("save_as", ["jpeg", "numpy"])
def test_decompression_bombs_are_refused_before_decoding(tree, dst, save_as):
    """Headers that claim 4 G and 2.5 G pixels in a file of a few KB: refused from the header
    alone (decoding would need gigabytes), named, and skipped on request."""
    rng = np.random.default_rng(3)
    class_dir = os.path.join(tree, "train", "n00000002")
    bombs = sorted([os.path.join(class_dir, "bomb_jpeg.JPEG"),
                    os.path.join(class_dir, "bomb_png.JPEG")])
    with open(bombs[0], "wb") as file:
        file.write(_claiming(image_bytes("plain", rng), b"\xff\xc0", 65000, 65000))
    with open(bombs[1], "wb") as file:
        file.write(_png_claiming(image_bytes("png", rng), 50000, 50000))
    with pytest.raises(ConversionError, match=re.escape(bombs[0]) + ".*exceeds the limit"):
        run_convert(tree, dst, save_as=save_as)
    stats = run_convert(tree, dst, save_as=save_as, on_error="skip")
    assert [path for path, _ in stats.skipped] == bombs
    for _, why in stats.skipped:
        assert "exceeds the limit of 134217728" in why or "decompression bomb" in why, why
    assert stats.images == 12


def _prepare_as(uid, path, answers):
    if uid is not None:
        os.setgid(uid)
        os.setuid(uid)
    try:
        prepare.prepare(path)
        answers.put("read")
    except ImageError as exc:
        answers.put(str(exc))


@pytest.mark.timeout(30)
def test_a_file_we_may_not_read_is_reported():
    """A real EACCES from the kernel on open(): as root, the producer's work runs in a child
    that gives up root first (root may read anything); the folder is open to all."""
    with tempfile.TemporaryDirectory() as folder_:  # in /tmp: every user may enter it
        os.chmod(folder_, 0o755)
        path = write_image(os.path.join(folder_, "secret.JPEG"))
        os.chmod(path, 0)
        context = multiprocessing.get_context("fork")
        answers = context.Queue()
        child = context.Process(target=_prepare_as,
                                args=(65534 if os.geteuid() == 0 else None, path, answers))
        child.start()
        child.join()
        assert answers.get(timeout=5) == "cannot read the file (Permission denied)"


@pytest.mark.parametrize("save_as", ["jpeg", "numpy"])
def test_lossless_jpegs_become_what_every_decoder_reads(tree, dst, save_as):
    path = write_image(os.path.join(tree, "train", "n00000001", "lossless.JPEG"), "lossless")
    with open(path, "rb") as file:
        assert b"\xff\xc3" in file.read(200)  # SOF3: lossless
    stats = run_convert(tree, dst, save_as=save_as)
    index = folder.scan(os.path.join(tree, "train")).paths.index(path)
    _, rows, values = read_db(db(dst))
    if save_as == "numpy":  # lossless: PIL and simplejpeg give the same exact pixels
        np.testing.assert_array_equal(pixels_of(values[index], rows[index]), pil_rgb(path))
        return
    assert stats.transcoded == [[index, path, prepare.LOSSLESS_WHY]]
    for decoder in DECODERS:
        dataset = LMDBDataset(dst, "train", output="numpy", decoder=decoder)
        assert psnr(dataset[index][0], pil_rgb(path)) > 30, decoder  # q95 4:4:4, as CMYK
    crop = LMDBDataset(dst, "train", fastlmdb.RandomResizedCrop(32), output="numpy")
    assert crop[index][0].shape == (32, 32, 3)

"""Rarer hostile files, in both modes: arithmetic-coded and 12-bit JPEGs, JPEGs that libjpeg
decodes only with warnings or whose sampling the fast decoders cannot read (kept, listed as
warnings, loaded by every decoder), damaged scan data (--check-decode), and fuzzed files. The
common kinds are in test_convert.py. A file is bad iff PIL (ImageFolder's loader) cannot read
it."""

import json
import logging
import multiprocessing
import os
import re
import subprocess
import tempfile
import zlib

import numpy as np
import probes
import pytest

import fastlmdb
from fastlmdb import LMDBDataset
from fastlmdb.cli import main
from fastlmdb.converter import prepare
from fastlmdb.core import jpeg
from fastlmdb.sources import folder
from fastlmdb.core import format as fmt
from fastlmdb.core.errors import ConversionError, ImageError
from fastlmdb.tools import verify
from helpers import (HEADER_WARNS, LENIENT_LAYOUT, LIBJPEG_WARNS, ODD_SAMPLING, db, image_bytes,
                     imagefolder, jpegtran, make_tree, pil_rgb, pixels_of, psnr, read_db,
                     run_convert, usable_decoders, write_image)

# Every test here starts spawn-context producer and writer processes: none may hang.
pytestmark = pytest.mark.timeout(60)

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
    scan = folder.list_tree(os.path.join(tree, "train"))  # it stopped where the file is written
    written = fmt.write_order(len(scan), "shuffled", 0).tolist()
    assert stats.resumed_at == written.index(scan.paths.index(path))


@pytest.fixture
def damaged(tree):
    """A JPEG with damaged scan data (a bad Huffman code; headers and end marker intact) in
    `tree`'s train split: strict decoders refuse it, PIL reads it."""
    path = write_image(os.path.join(tree, "train", "n00000001", "damaged.JPEG"), "damaged-scan")
    with open(path, "rb") as file:
        data = file.read()
    with pytest.raises(ValueError, match="bad Huffman code"):
        jpeg.simplejpeg_strict(data)
    assert pil_rgb(path).shape[2] == 3  # ImageFolder trains on it
    return path


DAMAGED_WHY = ("strict decoding fails (Corrupt JPEG data: bad Huffman code); kept as it is: "
               "the loaders decode it leniently, as PIL does")


def test_damaged_scan_data_is_kept_and_check_decode_warns(tree, damaged, dst, tmp_path):
    stats = run_convert(tree, tmp_path / "unchecked")
    assert stats.images == 13 and stats.skipped == []
    assert stats.warnings == []  # JPEG mode reads headers only

    stats = run_convert(tree, dst, check_decode=True)  # a warning, not a refusal
    index = folder.list_tree(os.path.join(tree, "train")).paths.index(damaged)
    assert stats.images == 13 and stats.skipped == []
    assert stats.warnings == [[index, damaged, DAMAGED_WHY]]
    _, _, values = read_db(db(dst))
    with open(damaged, "rb") as file:
        assert values[index] == file.read()
    for decoder in DECODERS:
        pixels = LMDBDataset(dst, "train", output="numpy", decoder=decoder)[index][0]
        np.testing.assert_array_equal(pixels, pil_rgb(damaged), err_msg=decoder)


@pytest.mark.slow
def test_a_run_started_with_check_decode_resumes_only_with_it(tree, dst, bad_files):
    (bad,) = bad_files(os.path.join(tree, "train", "n00000001"), kinds=["truncated"])
    with pytest.raises(ConversionError, match=re.escape(bad) + ": truncated or corrupt JPEG"):
        run_convert(tree, dst, check_decode=True)
    with pytest.raises(ConversionError,
                       match=r"started with --check-decode on, this run asks for off.*"
                             r"--overwrite"):
        run_convert(tree, dst, on_error="skip")
    stats = run_convert(tree, dst, check_decode=True, on_error="skip")
    assert [path for path, _ in stats.skipped] == [bad]
    assert stats.images == 12 and stats.resumed_at > 0


def test_check_decode_on_the_command_line(tree, damaged, dst, capsys):
    args = ["convert", "--from-dir", tree, "--to-dir", dst, "--split", "train", "--procs", "1",
            "--check-decode", "--on-error", "skip"]
    assert main(args) == 0
    out = capsys.readouterr().out
    index = folder.list_tree(os.path.join(tree, "train")).paths.index(damaged)
    assert f"  warning  #{index} {damaged}: {DAMAGED_WHY}\n" in out
    assert "  0 changed, 0 skipped, 1 kept with warnings" in out


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
    done = subprocess.run(probes.command("load_probe", root, "train"), capture_output=True,
                          text=True, env=probes.env(), timeout=90)
    assert done.returncode == 0, f"loading crashed ({done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("save_as, check_decode",
                         [("jpeg", False), ("jpeg", True), ("numpy", False)])
def test_fuzzed_files_are_stored_or_reported_and_stored_ones_load(fuzz_tree, dst, save_as,
                                                                  check_decode):
    stats = run_convert(fuzz_tree, dst, save_as=save_as, check_decode=check_decode,
                        on_error="skip")
    _, rows, values = read_db(db(dst))
    paths = folder.list_tree(os.path.join(fuzz_tree, "train")).paths
    stored = [paths[source] for source in rows["source"].tolist()]
    skipped = [path for path, _ in stats.skipped]
    assert len(paths) == FUZZ_FILES
    assert sorted(stored + skipped) == sorted(paths)  # each file once: stored or listed
    assert stats.images == len(values) == FUZZ_FILES - len(skipped)
    assert 0 < len(skipped) < FUZZ_FILES
    assert all(isinstance(why, str) and why.strip() for _, why in stats.skipped)

    # A file is bad iff ImageFolder's loader (PIL) cannot read it.
    readable = [path for path in paths if pil_reads(path)]
    unreadable = [path for path in stored if not pil_reads(path)]
    assert 0 < len(readable) < FUZZ_FILES
    if save_as == "numpy" or check_decode:
        assert sorted(stored) == sorted(readable)  # decoded at conversion: PIL decides
    else:  # headers and end markers only: damaged scan data is found at load
        assert set(readable) < set(stored) and unreadable
    lenient = {path for path in readable if not strictly_decodable(path)}
    warned = {path for _, path, _ in stats.warnings}
    if save_as == "numpy" or check_decode:
        assert warned == lenient  # every file kept that a strict decoder refuses is listed
    else:
        assert warned <= lenient  # those whose header says so

    loaded = load_in_a_child(os.path.dirname(db(dst)))
    for way, (ok, failed) in loaded["ways"].items():
        assert ok + failed == len(values), way
        # Every decoder falls back to lenient libjpeg as PIL reads, so all fail on exactly the
        # records PIL cannot read; a crop that stops above the damage may still load.
        if way == "crop":
            assert failed <= len(unreadable)
        else:
            assert failed == len(unreadable), way
    assert len(loaded["verify"]) == len(unreadable)
    strict_failures = [p for p in stored if p not in unreadable and not strictly_decodable(p)]
    assert len(loaded["verify_warnings"]) == (0 if save_as == "numpy" else len(strict_failures))


def pil_reads(path):
    try:
        pil_rgb(path)
    except (OSError, SyntaxError, ValueError):
        return False
    return True


def strictly_decodable(path):
    with open(path, "rb") as file:
        data = file.read()
    try:
        jpeg.decode_strict(data)
    except ValueError:
        return False
    return True


def _claiming(data, marker, height, width):
    """JPEG `data` whose frame header (after `marker`) claims height x width pixels."""
    at = data.index(marker)
    return data[:at + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[at + 9:]


def _png_claiming(data, height, width):
    """PNG `data` whose IHDR claims width x height pixels, with a valid chunk CRC."""
    body = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + data[24:29]
    return data[:12] + body + zlib.crc32(body).to_bytes(4, "big") + data[33:]


@pytest.mark.slow
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
    index = folder.list_tree(os.path.join(tree, "train")).paths.index(path)
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


# Files ImageFolder's loader reads although libjpeg warns about them, or although TurboJPEG's
# API (simplejpeg, PyTurboJPEG) cannot read their sampling: kept (byte for byte in JPEG mode),
# listed as warnings, and loaded by every decoder, the crop path and the in-place batches.
WAYS = {"jpeg": {}, "checked": {"check_decode": True}, "numpy": {"save_as": "numpy"}}


@pytest.fixture(scope="module")
def lenient(tmp_path_factory):
    """(SRC/train, its file paths, {way: (DST, Stats)}) for helpers.LENIENT_LAYOUT converted
    with default flags in JPEG mode ("jpeg"), with --check-decode ("checked"), and in numpy
    mode ("numpy")."""
    base = tmp_path_factory.mktemp("lenient")
    src = make_tree(base / "src", LENIENT_LAYOUT)
    made = {way: (os.fspath(base / way), run_convert(src, base / way, **options))
            for way, options in WAYS.items()}
    split = os.path.join(src, "train")
    return split, [path for path, _ in imagefolder(split).samples], made


def expected_warned(way):
    """The kinds whose records a conversion (or verify) lists as warnings."""
    region = jpeg.region_decoder_built()  # libjpeg's strict mode for what simplejpeg cannot read
    return {"jpeg": set(HEADER_WARNS) | set(ODD_SAMPLING),  # what the header tells
            "checked": set(LIBJPEG_WARNS) | set(ODD_SAMPLING),
            "numpy": set(LIBJPEG_WARNS) - (set() if region else {"sampling-junk"}),
            "verify": set(LIBJPEG_WARNS) | (set() if region else set(ODD_SAMPLING))}[way]


def test_the_lenient_kinds_are_what_they_claim(lenient):
    _, paths, _ = lenient
    for path in paths:
        with open(path, "rb") as file:
            data = file.read()
        kind = kind_of(path)
        assert pil_rgb(path).ndim == 3, path  # ImageFolder reads every one
        strict = strictly_decodable(path)
        assert strict == (kind not in LIBJPEG_WARNS and (kind not in ODD_SAMPLING or
                                                         jpeg.region_decoder_built())), path
        if kind in ODD_SAMPLING:
            with pytest.raises(ValueError, match="Could not determine subsampling"):
                jpeg.simplejpeg_strict(data)
        if kind.startswith("junk-before"):
            with pytest.raises(ValueError, match="extraneous bytes before marker"):
                jpeg.simplejpeg_strict(data)


@pytest.mark.parametrize("way", WAYS)
def test_files_pil_reads_are_kept_and_listed_as_warnings(lenient, way):
    _, paths, made = lenient
    dst, stats = made[way]
    info, rows, values = read_db(db(dst))
    assert stats.skipped == [] and stats.transcoded == [] and len(values) == len(paths)
    for path, value, row in zip(paths, values, rows):
        if way == "numpy":  # exactly ImageFolder's pixels, also where simplejpeg cannot decode
            np.testing.assert_array_equal(pixels_of(value, row), pil_rgb(path), err_msg=path)
        else:
            with open(path, "rb") as file:
                assert value == file.read(), f"{path} was not stored byte for byte"
    assert stats.warnings == info["warnings"]
    assert {kind_of(path) for _, path, _ in stats.warnings} == expected_warned(way)
    for index, path, why in stats.warnings:
        assert paths[index] == path
        kind = kind_of(path)
        if kind in ODD_SAMPLING and way != "numpy":
            assert why.startswith("simplejpeg and PyTurboJPEG cannot read it (tjDecompress"), why
        if kind in LIBJPEG_WARNS and kind in expected_warned(way) - set(ODD_SAMPLING):
            assert re.search(r"strict decoding fails \(.*(extraneous bytes|premature end of "
                             r"data segment|bad Huffman code|JFIF revision)", why), why


@pytest.mark.parametrize("region_decoder", [True, False], ids=["region", "pil-fallback"])
@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_loads_them_as_pil_does(lenient, decoder, region_decoder, monkeypatch):
    if not region_decoder:  # the fallback is then PIL itself
        monkeypatch.setattr(jpeg, "_jpegcrop", None)
    _, paths, made = lenient
    dataset = LMDBDataset(made["jpeg"][0], "train", output="numpy", decoder=decoder)
    small = LMDBDataset(made["jpeg"][0], "train", output="numpy", decoder=decoder,
                        min_size=(20, 20))
    for i, path in enumerate(paths):
        expected = pil_rgb(path)
        np.testing.assert_array_equal(dataset[i][0], expected, err_msg=f"{decoder} {path}")
        reduced = small[i][0]  # every image is at least 40 px a side
        assert min(reduced.shape[:2]) >= 20 and reduced.shape[2] == 3, path
        if decoder != "pil":  # PIL's draft() may keep the full size
            assert reduced.shape[0] <= -(-expected.shape[0] // 2), path


def test_the_pil_output_is_imagefolders(lenient):
    split, _, made = lenient
    reference = imagefolder(split)
    dataset = LMDBDataset(made["jpeg"][0], "train")
    assert dataset.classes == reference.classes and len(dataset) == len(reference)
    for i in range(len(reference)):
        (image, label), (expected, expected_label) = dataset[i], reference[i]
        assert label == expected_label and image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))


@pytest.mark.parametrize("region_decoder", [True, False], ids=["region", "fallback"])
def test_crops_and_in_place_batches_take_them(lenient, region_decoder, monkeypatch):
    import torch

    from fastlmdb import LMDBIterDataset
    from fastlmdb.loading import batch, crops

    if not region_decoder:
        monkeypatch.setattr(crops, "_jpegcrop", None)
        monkeypatch.setattr(jpeg, "_jpegcrop", None)
    _, paths, made = lenient
    _, _, values = read_db(db(made["jpeg"][0]))
    for path, value in zip(paths, values):
        expected = pil_rgb(path)
        h, w = expected.shape[:2]
        whole = crops.decode_box(value, (0, 0, h, w), (h, w), h, w, jpeg.decode_simplejpeg)
        np.testing.assert_array_equal(whole, expected, err_msg=path)
        box = (h // 4, w // 3, h // 2, w // 2)
        part = crops.decode_box(value, box, box[2:], h, w, jpeg.decode_simplejpeg)
        inside = expected[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
        assert part.shape == inside.shape and psnr(part, inside) > 40, path

    crop = fastlmdb.RandomResizedCrop(24)
    dataset = LMDBDataset(made["jpeg"][0], "train", crop, output="tensor")
    positions = list(range(len(paths)))
    torch.manual_seed(0)
    built = dataset.__getitems__(positions)  # decoded in place into one batch tensor
    torch.manual_seed(0)
    reference = [dataset[i] for i in positions]  # the per-sample path, same draws
    assert all(isinstance(sample, batch.Sample) for sample in built)
    for (image, label), (expected, expected_label) in zip(built, reference):
        assert torch.equal(image, expected) and label == expected_label
    stream = LMDBIterDataset(made["jpeg"][0], "train", crop, output="tensor", batch_size=8)
    assert sum(1 for _ in stream) == len(paths) and stream.errors == 0


def test_verify_passes_them_with_warnings(lenient, capsys):
    split, paths, made = lenient
    report = verify.verify(db(made["jpeg"][0]), source=split)
    assert report.ok and report.problems == [] and report.records == len(paths)
    warned = [paths[int(re.match(r"record (\d+): ", w).group(1))] for w in report.warnings]
    assert {kind_of(path) for path in warned} == expected_warned("verify")
    assert all("the loaders decode it leniently, as PIL does" in w for w in report.warnings)
    assert verify.verify(db(made["numpy"][0])).warnings == []  # pixels: nothing to decode

    assert main(["verify", db(made["jpeg"][0]), "--procs", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("  warning: record ") == len(report.warnings)
    assert f"OK, {len(report.warnings)} warning(s)" in out


@pytest.mark.parametrize("decoder", [d for d in DECODERS if d != "pil"])
def test_lenient_decoding_is_logged_once_per_process(lenient, decoder, caplog, monkeypatch):
    import warnings

    _, paths, made = lenient
    _, _, values = read_db(db(made["jpeg"][0]))
    odd = [v for path, v in zip(paths, values) if kind_of(path) in LIBJPEG_WARNS + ODD_SAMPLING]
    monkeypatch.setattr(jpeg, "_lenient_logged", set())
    decode = jpeg.decoder(decoder)
    with warnings.catch_warnings(record=True) as escaped, \
            caplog.at_level(logging.WARNING, logger="fastlmdb.core.jpeg"):
        warnings.simplefilter("always")  # PyTurboJPEG's UserWarnings would show here
        for value in odd:
            decode(value)
    assert escaped == []
    logged = [r for r in caplog.records if r.name == "fastlmdb.core.jpeg"]
    assert len(logged) == 1 and "Not logged again in this process" in logged[0].getMessage()
    if decoder == "turbojpeg":  # only fastlmdb's own PyTurboJPEG object raises on warnings
        import turbojpeg

        junk = next(v for path, v in zip(paths, values) if kind_of(path) == "junk-before-dqt")
        with pytest.warns(UserWarning, match="extraneous bytes"):
            turbojpeg.TurboJPEG().decode(junk)


@pytest.mark.parametrize("decoder", [d for d in DECODERS if d != "pil"])
def test_plain_records_never_reach_the_fallback(tree, dst, decoder, monkeypatch):
    run_convert(tree, dst)

    def refuse(*args, **kwargs):
        raise AssertionError("a plain JPEG went to the fallback decoder")

    monkeypatch.setattr(jpeg, "decode_libjpeg", refuse)
    dataset = LMDBDataset(dst, "train", output="numpy", decoder=decoder)
    assert all(dataset[i][0].ndim == 3 for i in range(len(dataset)))


def test_a_missing_encoder_fails_with_the_install_line(monkeypatch):
    import shutil

    import helpers

    monkeypatch.setattr(shutil, "which", lambda name: None)
    for make in (lambda: helpers.cjpeg(np.zeros((8, 8, 3), np.uint8)),
                 lambda: helpers.jpegtran(b"")):
        with pytest.raises(pytest.fail.Exception,
                           match="missing: install libjpeg-turbo-progs"):
            make()


def test_a_conversion_logs_its_warnings_in_one_line(tmp_path, caplog):
    """Web-scraped sets have thousands of such files: one line, the list is in Stats/info."""
    kinds = ["plain", "junk-before-dqt", "sampling-mixed", "junk-before-sos"]
    src = make_tree(tmp_path / "src", {"train": {"a": [(f"{k}.JPEG", k) for k in kinds]}})
    with caplog.at_level(logging.WARNING, logger="fastlmdb.converter.conversion"):
        stats = run_convert(src, tmp_path / "dst")
    logged = [r.getMessage() for r in caplog.records
              if r.name == "fastlmdb.converter.conversion"]
    assert len(stats.warnings) == 3
    assert len(logged) == 1 and logged[0].startswith("3 records kept with warnings")

"""Converting straight from the archives ImageNet ships in gives the database of the tree they
extract to: same samples, classes, labels and bytes, whatever the members' order."""

import io
import os
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
from archives import flat, tar_of_tars, tree
from helpers import AWKWARD_LAYOUT, db, make_tree, read_db

from fastlmdb import converter
from fastlmdb.cli import main
from fastlmdb.sources import labels as label_files
from fastlmdb.core import catalog
from fastlmdb.sources import archive, stream, tarheaders
from fastlmdb.core.errors import ConversionError
from fastlmdb.tools import verify

KAGGLE = "ILSVRC/Data/CLS-LOC/"
# ImageNet's awkward files (CMYK, PNG named .JPEG, gray, progressive) and nested folders whose
# order differs from a plain sort of the names (os.walk: a folder's files, then subfolders).
LAYOUT = {"train": {**AWKWARD_LAYOUT["train"],
                    "n00000003": ["a.JPEG", "sub/x.JPEG", "sub-b.JPEG", "sub/deeper/y.jpg"]},
          "val": {"n00000000": 2, "n00000001": [("b_png.JPEG", "png"), ("a_cmyk.JPEG", "cmyk")],
                  "n00000003": 1}}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("archive") / "src", LAYOUT)


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    """The tree conversion of each split: what every archive must give."""
    dst = tmp_path_factory.mktemp("reference")
    for split in ("train", "val"):
        _convert(dst, split, from_dir=src)
    return {split: read_db(db(dst, split)) for split in ("train", "val")}


def _convert(dst, split="train", **options):
    options.setdefault("procs", 2)
    options.setdefault("from_dir", None)
    return converter.convert(converter.Options(to_dir=os.fspath(dst), split=split, **options))


def _assert_same_samples(path, reference, names, stream_order=None):
    """Records, record table, classes and metadata equal the tree's; where the tree's
    records name a path, the archive's name the member `names(path)` maps it to. A compressed
    tar's records are stored in its members' order (`stream_order`, the member names): the
    keys and the recorded order differ, nothing else."""
    info, rows, values = read_db(path)
    ref_info, ref_rows, ref_values = reference
    assert values == ref_values
    columns = [c for c in rows.dtype.names if c != "key" or stream_order is None]
    assert np.array_equal(rows[columns], ref_rows[columns])
    skip = ("started", "finished", "source", "transcoded", "warnings")
    if stream_order is not None:
        logical = catalog.read_paths(path)  # the member names, in logical order
        in_stream = [m for m in stream_order if m in set(logical)]
        assert rows["key"].tolist() == [in_stream.index(m) for m in logical]
        assert info["order"] == "archive"
        skip += ("order", "order_seed")
    for listed in ("transcoded", "warnings"):
        assert [[i, names(p), why] for i, p, why in ref_info[listed]] == info[listed]
    assert len(info["transcoded"]) == 2 + (info["split"] == "train")  # CMYK and PNG, kept apart
    assert {k: v for k, v in info.items() if k not in skip} == \
        {k: v for k, v in ref_info.items() if k not in skip}


def _member_of(src, split, template):
    def name(path):
        klass, rel = os.path.relpath(path, os.path.join(src, split)).split(os.sep, 1)
        return template.format(klass=klass, rel=rel, name=os.path.basename(rel))
    return name


@pytest.mark.timeout(120)
def test_tar_of_per_class_tars_is_the_tree(src, reference, tmp_path):
    packed = tar_of_tars(os.path.join(src, "train"), str(tmp_path / "ILSVRC2012_img_train.tar"))
    _convert(tmp_path / "dst", from_archive=packed)
    _assert_same_samples(db(tmp_path / "dst"), reference["train"],
                         _member_of(src, "train", "{klass}.tar/{rel}"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind, prefix", [("tar", ""), ("tar", "imagenet/train/"),
                                          ("zip", KAGGLE + "train/")])
def test_archive_of_a_tree_is_the_tree(src, reference, tmp_path, kind, prefix):
    packed = str(tmp_path / f"tree.{kind}")
    # A sibling split (and, in a zip, deflated members) that --split leaves alone.
    tree(os.path.join(src, "train"), packed, prefix=prefix,
         compression=zipfile.ZIP_DEFLATED if kind == "zip" else None,
         extra=[(prefix.replace("train/", "val/") + "n1/x.JPEG", b"other split")] if prefix
         else [])
    if kind == "zip":
        with zipfile.ZipFile(packed) as zf:
            assert {info.compress_type for info in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    _convert(tmp_path / "dst", from_archive=packed)
    _assert_same_samples(db(tmp_path / "dst"), reference["train"],
                         _member_of(src, "train", prefix + "{klass}/{rel}"))


def _text_labels(path, mapping, separator=" "):
    with open(path, "w", encoding="utf-8") as file:
        file.writelines(f"{name}{separator}{klass}\n" for name, klass in mapping.items())
    return str(path)


def _kaggle_labels(path, mapping):
    with open(path, "w", encoding="utf-8") as file:
        file.write("ImageId,PredictionString\n")
        file.writelines(f"{os.path.splitext(name)[0]},{klass} 1 2 30 40 {klass} 5 6 7 8\n"
                        for name, klass in mapping.items())
    return str(path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["tar-text", "zip-kaggle", "folder-tabs"])
def test_flat_split_with_labels_is_the_valprep_tree(src, reference, tmp_path, kind):
    val = os.path.join(src, "val")
    if kind == "folder-tabs":  # a flat folder given to --from_dir
        flat_dir = tmp_path / "flat" / "val"
        os.makedirs(flat_dir)
        for klass in os.listdir(val):
            for name in os.listdir(os.path.join(val, klass)):
                shutil.copy(os.path.join(val, klass, name), flat_dir / name)
        mapping = {name: klass for klass in os.listdir(val)
                   for name in os.listdir(os.path.join(val, klass))}
        labels = _text_labels(tmp_path / "labels.txt", mapping, "\t")
        _convert(tmp_path / "dst", "val", from_dir=str(tmp_path / "flat"), labels=labels)
        template = str(flat_dir / "{name}")
    elif kind == "tar-text":
        mapping = flat(val, str(tmp_path / "val.tar"))
        labels = _text_labels(tmp_path / "labels.txt", mapping, ",")
        _convert(tmp_path / "dst", "val", from_archive=str(tmp_path / "val.tar"), labels=labels)
        template = "{name}"
    else:
        prefix = KAGGLE + "val/"
        mapping = flat(val, str(tmp_path / "kaggle.zip"), prefix=prefix,
                       compression=zipfile.ZIP_DEFLATED)
        labels = _kaggle_labels(tmp_path / "LOC_val_solution.csv", mapping)
        _convert(tmp_path / "dst", "val", from_archive=str(tmp_path / "kaggle.zip"),
                 labels=labels)
        template = prefix + "{name}"
    _assert_same_samples(db(tmp_path / "dst", "val"), reference["val"],
                         _member_of(src, "val", template))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_classes_from_train_keeps_train_indices_where_val_lacks_a_class(src, reference,
                                                                        tmp_path):
    train_db = db(tmp_path / "train")
    _convert(tmp_path / "train", from_archive=tar_of_tars(os.path.join(src, "train"),
                                                            str(tmp_path / "train.tar")))
    labels = _text_labels(tmp_path / "labels.txt", flat(os.path.join(src, "val"),
                                                        str(tmp_path / "val.tar")))
    _convert(tmp_path / "dst", "val", from_archive=str(tmp_path / "val.tar"), labels=labels,
             classes_from=train_db)
    info, rows, _ = read_db(db(tmp_path / "dst", "val"))
    train_classes = read_db(train_db)[0]["classes"]
    assert info["classes"] == train_classes and "n00000002" not in LAYOUT["val"]
    ref_info, ref_rows, _ = reference["val"]
    ref_names = [ref_info["classes"][label] for label in ref_rows["label"]]
    assert [train_classes[label] for label in rows["label"]] == ref_names
    assert rows["label"].max() == train_classes.index("n00000003") == 3


@pytest.fixture
def val_tar(src, tmp_path):
    """(a flat tar of val plus `extra` members, {file: class}) maker."""
    def make(extra=()):
        path = str(tmp_path / "val.tar")
        return path, flat(os.path.join(src, "val"), path, extra=extra)
    return make


def test_a_member_that_is_not_an_image_is_named_or_left_out(src, reference, tmp_path):
    packed = tree(os.path.join(src, "val"), str(tmp_path / "val.tar"),
                  extra=[("n00000000/notes.txt", b"hello")])
    with pytest.raises(ConversionError, match=r"n00000000/notes\.txt in .*val\.tar: not an "
                                              r"image .*--on-error skip"):
        _convert(tmp_path / "dst", "val", from_archive=packed)
    _convert(tmp_path / "dst", "val", from_archive=packed, on_error="skip")
    assert read_db(db(tmp_path / "dst", "val"))[2] == reference["val"][2]


@pytest.mark.parametrize("change, match", [
    (lambda m: {**m, "a_cmyk.JPEG": "n99999999"}, r"class\(es\) n99999999 are not in "
                                                  "--classes-from"),
    (lambda m: {k: v for k, v in m.items() if k != "b_png.JPEG"},
     r"b_png\.JPEG in .*val\.tar: no label for it in --labels"),
    (lambda m: {**m, "missing.JPEG": "n00000000"},
     r"missing\.JPEG in .*val\.tar: --labels names it, but there is no such file"),
])
def test_labels_that_do_not_fit_the_files_are_named(val_tar, src, tmp_path, change, match):
    packed, mapping = val_tar()
    labels = _text_labels(tmp_path / "labels.txt", change(mapping))
    with pytest.raises(ConversionError, match=match):
        _convert(tmp_path / "dst", "val", from_archive=packed, labels=labels,
                 classes_from=os.path.join(src, "train"))


def test_a_file_without_a_label_is_left_out_with_skip(val_tar, reference, tmp_path):
    packed, mapping = val_tar()
    del mapping["b_png.JPEG"]
    labels = _text_labels(tmp_path / "labels.txt", mapping)
    stats = _convert(tmp_path / "dst", "val", from_archive=packed, labels=labels,
                     on_error="skip")
    assert stats.images == len(reference["val"][2]) - 1


def test_a_duplicate_member_is_refused(val_tar, src, tmp_path):
    again = os.path.join(src, "val", "n00000000", "n00000000_000.JPEG")
    with open(again, "rb") as file:
        packed, mapping = val_tar(extra=[("n00000000_000.JPEG", file.read())])
    labels = _text_labels(tmp_path / "labels.txt", mapping)
    with pytest.raises(ConversionError, match=r"n00000000_000\.JPEG appears twice in .*val\.tar"):
        _convert(tmp_path / "dst", "val", from_archive=packed, labels=labels)


def test_a_flat_archive_without_labels_says_to_pass_them(val_tar, tmp_path):
    packed, _ = val_tar()
    with pytest.raises(ConversionError, match="holds files but no class folders: pass --labels"):
        _convert(tmp_path / "dst", "val", from_archive=packed)


def test_from_dir_and_from_archive_are_one_or_the_other(tmp_path):
    with pytest.raises(ValueError, match="give --from_dir SRC or --from-archive FILE"):
        _convert(tmp_path / "dst", from_dir=str(tmp_path), from_archive=str(tmp_path))
    with pytest.raises(ValueError, match="--from-archive .*missing.tar does not exist"):
        _convert(tmp_path / "dst", from_archive=str(tmp_path / "missing.tar"))


class _Stop(Exception):
    pass


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_interrupted_archive_conversion_resumes_identical(src, reference, tmp_path):
    packed = tar_of_tars(os.path.join(src, "train"), str(tmp_path / "train.tar"))

    def stop(done, total, _bytes):
        if done >= 1:
            raise _Stop
    with pytest.raises(_Stop):  # the coordinator stops, as on Ctrl-C; commits every chunk
        converter.convert(converter.Options(None, str(tmp_path / "dst"), "train", procs=1,
                                            batch_bytes=1, from_archive=packed),
                          on_progress=stop)
    other = tree(os.path.join(src, "train"), str(tmp_path / "other.tar"))
    with pytest.raises(ConversionError, match="was started with --from_dir/--from-archive "
                                              ".*train.tar, this run asks for .*other.tar"):
        _convert(tmp_path / "dst", from_archive=other)
    stats = _convert(tmp_path / "dst", from_archive=packed)
    assert stats.resumed_at >= 1
    _assert_same_samples(db(tmp_path / "dst"), reference["train"],
                         _member_of(src, "train", "{klass}.tar/{rel}"))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_shards_and_verify_from_an_archive(src, reference, tmp_path):
    packed = tree(os.path.join(src, "train"), str(tmp_path / "train.zip"),
                  compression=zipfile.ZIP_DEFLATED)
    assert main(["convert", "--from-archive", packed, "--to-dir", str(tmp_path / "dst"),
                 "--split", "train", "--shards", "2", "--procs", "1"]) == 0
    path = db(tmp_path / "dst")
    assert os.path.isdir(path) and read_db(path)[2] == reference["train"][2]
    assert verify.verify(path, source=packed).problems == []
    # The same names, other bytes in one member: verify names it.
    changed = str(tmp_path / "changed.zip")
    with zipfile.ZipFile(packed) as old, zipfile.ZipFile(changed, "w") as new:
        for info in old.infolist():
            data = old.read(info)
            if "a_plain" in info.filename:  # one bit of the scan data
                data = data[:-100] + bytes([data[-100] ^ 1]) + data[-99:]
            new.writestr(info, data)
    problems = verify.verify(path, source=changed).problems
    assert problems and all("bytes differ from n0000000" in p and "a_plain" in p
                            for p in problems)


def test_a_deflated_member_that_is_damaged_is_reported(src, tmp_path):
    packed = tree(os.path.join(src, "val"), str(tmp_path / "val.zip"),
                  compression=zipfile.ZIP_DEFLATED)
    member = next(m for m in archive.members(packed) if m.endswith("n00000000_000.JPEG"))
    _, offset, size, _, _ = member.where
    with open(packed, "r+b") as file:  # flip bytes in the middle of its deflated data
        file.seek(offset + size // 2)
        file.write(b"\x00\xff\x00\xff")
    with pytest.raises(ConversionError, match=r"n00000000/n00000000_000\.JPEG in .*val\.zip: "
                                              "cannot read the member"):
        _convert(tmp_path / "dst", "val", from_archive=packed)


def test_label_files(tmp_path):
    text = tmp_path / "labels.txt"
    text.write_text("a.JPEG n1\nb.JPEG\tn2\n\nc.JPEG,n1\n")
    assert label_files.read(str(text)) == {"a.JPEG": "n1", "b.JPEG": "n2", "c.JPEG": "n1"}
    kaggle = _kaggle_labels(tmp_path / "LOC_val_solution.csv", {"v_1.JPEG": "n7"})
    assert label_files.read(kaggle) == {"v_1": "n7"}
    text.write_text("a.JPEG n1\nlonely\n")
    with pytest.raises(ConversionError, match=r"labels\.txt line 2: expected FILENAME CLASS"):
        label_files.read(str(text))
    text.write_text("a.JPEG n1\na.JPEG n2\n")
    with pytest.raises(ConversionError, match="a.JPEG is labelled both n1 and n2"):
        label_files.read(str(text))


def test_members_are_found_in_nested_tars_at_their_offsets(src, tmp_path):
    packed = tar_of_tars(os.path.join(src, "train"), str(tmp_path / "train.tar"))
    [inner] = [m for m in archive.members(packed) if m == "n00000003.tar"]
    found = archive.inner_members(inner)
    assert sorted(found) == ["n00000003.tar/a.JPEG", "n00000003.tar/sub-b.JPEG",
                             "n00000003.tar/sub/deeper/y.jpg", "n00000003.tar/sub/x.JPEG"]
    with open(os.path.join(src, "train", "n00000003", "sub", "x.JPEG"), "rb") as file:
        assert archive.read(next(m for m in found if m.endswith("/x.JPEG"))) == file.read()
    with tarfile.open(packed) as tar:
        assert [info.name for info in tar] == ["n00000003.tar", "n00000002.tar",
                                               "n00000001.tar", "n00000000.tar"]


def _devkit(path, truth_ids, wnids):
    """An ILSVRC2012_devkit_t12.tar.gz: meta.mat's synsets (a non-leaf one first, as in the
    real file) and one ILSVRC2012_ID per val file."""
    scipy_io = pytest.importorskip("scipy.io")
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images"]
    synsets = np.zeros(len(wnids) + 1, dtype=[(name, object) for name in fields])
    for k, wnid in enumerate(["n99999999", *wnids]):
        synsets[k] = (len(wnids) + 1 if k == 0 else k, wnid, "w", "g",
                      len(wnids) if k == 0 else 0, np.zeros(0), 0, 1)
    meta = io.BytesIO()
    scipy_io.savemat(meta, {"synsets": synsets})
    truth = "".join(f"{i}\n" for i in truth_ids).encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("data/meta.mat", meta.getvalue()),
                           ("data/ILSVRC2012_validation_ground_truth.txt", truth)):
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_val_tar_with_the_devkit_is_the_valprep_tree(src, reference, tmp_path):
    """ILSVRC2012_img_val.tar's flat ILSVRC2012_val_NNNNNNNN.JPEG files, labelled by the
    devkit, give the tree that valprep.sh makes."""
    val = os.path.join(src, "val")
    files = sorted((name, klass) for klass in os.listdir(val)
                   for name in os.listdir(os.path.join(val, klass)))
    flat_tree = tmp_path / "tree"
    wnids = sorted({klass for _, klass in files})
    with tarfile.open(tmp_path / "ILSVRC2012_img_val.tar", "w") as tar:
        for number, (name, klass) in reversed(list(enumerate(files, 1))):
            new = f"ILSVRC2012_val_{number:08d}.JPEG"
            tar.add(os.path.join(val, klass, name), new)
            os.makedirs(flat_tree / "val" / klass, exist_ok=True)
            shutil.copy(os.path.join(val, klass, name), flat_tree / "val" / klass / new)
    devkit = _devkit(tmp_path / "ILSVRC2012_devkit_t12.tar.gz",
                     [wnids.index(klass) + 1 for _, klass in files], wnids)
    assert label_files.read(devkit)["ILSVRC2012_val_00000001"] == files[0][1]
    _convert(tmp_path / "tree-db", "val", from_dir=str(flat_tree))
    _convert(tmp_path / "dst", "val", from_archive=str(tmp_path / "ILSVRC2012_img_val.tar"),
             labels=devkit)
    _assert_same_samples(db(tmp_path / "dst", "val"), read_db(db(tmp_path / "tree-db", "val")),
                         lambda path: os.path.basename(path))


def _odd_names_tar(path, tar_format):
    """A tar with what headers hold in several ways: long names (ustar prefix, GNU 'L', pax
    path), non-ASCII names, a folder, an empty file, members of several blocks."""
    long_name = "d" * 60 + "/" + "e" * 80 + ".JPEG"
    with tarfile.open(path, "w", format=tar_format) as tar:
        for name, data in (("a.JPEG", b"a" * 700), (long_name, b"long"),
                           ("ünï/çödé.JPEG", b"\xff" * 1500), ("empty.JPEG", b""),
                           ("g" * 90 + "/" + "h" * 90 + ".JPEG", b"x" * 512)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    return path


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT,
                                        tarfile.PAX_FORMAT])
def test_tar_headers_are_read_as_tarfile_reads_them(tmp_path, tar_format):
    packed = _odd_names_tar(str(tmp_path / "odd.tar"), tar_format)
    with tarfile.open(packed) as tar:
        expected = [(info.name, info.offset_data, info.size) for info in tar if info.isreg()]
    fd = os.open(packed, os.O_RDONLY)
    try:
        assert tarheaders.list_headers(fd, 0, os.path.getsize(packed)) == expected  # no fallback
    finally:
        os.close(fd)
    assert [(m, *m.where[1:3]) for m in archive.members(packed)] == expected
    assert len(expected) == 5 and any(name.startswith("ünï/") for name, _, _ in expected)


def test_a_link_in_a_tar_is_refused(tmp_path):
    packed = str(tmp_path / "links.tar")
    with tarfile.open(packed, "w") as tar:
        link = tarfile.TarInfo("n1/link.JPEG")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(ConversionError, match=r"n1/link\.JPEG in .*links\.tar is not a regular "
                                              "file"):
        archive.members(packed)


def test_a_truncated_or_damaged_tar_is_named(src, tmp_path):
    packed = tree(os.path.join(src, "val"), str(tmp_path / "val.tar"))
    size = os.path.getsize(packed)
    os.truncate(packed, size // 2)
    with pytest.raises(ConversionError, match=r"val\.tar is not a readable tar or zip archive "
                                              r"\(unexpected end of data\)"):
        _convert(tmp_path / "dst", "val", from_archive=packed)
    with open(packed, "r+b") as file:  # the first header's checksum no longer fits
        file.write(b"garbage")
    with pytest.raises(ConversionError, match=r"val\.tar is not a readable tar or zip archive"):
        archive.members(packed)


def _stream_order(path):
    with tarfile.open(path, "r|*") as tar:
        outer = [info.name for info in tar if info.isreg()]
    if not all(name.endswith(".tar") for name in outer):
        return outer
    return [member for member in archive.members(path.replace(".tar.gz", ".tar"))
            for member in archive.inner_members(member)]


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("compression, prefix", [("gz", "imagenet/train/"), ("xz", "")])
def test_a_compressed_tar_of_a_tree_is_the_tree(src, reference, tmp_path, compression, prefix):
    packed = tree(os.path.join(src, "train"), str(tmp_path / f"train.tar.{compression}"),
                  prefix=prefix, compression=compression,
                  extra=[("imagenet/val/n1/x.JPEG", b"other split")] if prefix else [])
    _convert(tmp_path / "dst", from_archive=packed)
    _assert_same_samples(db(tmp_path / "dst"), reference["train"],
                         _member_of(src, "train", prefix + "{klass}/{rel}"),
                         stream_order=_stream_order(packed))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_compressed_flat_tar_with_labels_is_the_valprep_tree(src, reference, tmp_path):
    packed = str(tmp_path / "val.tar.gz")
    labels = _text_labels(tmp_path / "labels.txt", flat(os.path.join(src, "val"), packed,
                                                        compression="gz"))
    _convert(tmp_path / "dst", "val", from_archive=packed, labels=labels)
    _assert_same_samples(db(tmp_path / "dst", "val"), reference["val"],
                         _member_of(src, "val", "{name}"), stream_order=_stream_order(packed))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_interrupted_compressed_tar_of_tars_conversion_resumes_identical(src, reference,
                                                                           tmp_path):
    """Inner tars are read as streams too; a resumed run reads the stream again from its
    start but writes only what is not committed."""
    tar_of_tars(os.path.join(src, "train"), str(tmp_path / "train.tar"))  # the member order
    packed = tar_of_tars(os.path.join(src, "train"), str(tmp_path / "train.tar.gz"), "gz")

    def stop(done, total, _bytes):
        if done >= 1:
            raise _Stop
    with pytest.raises(_Stop):
        converter.convert(converter.Options(None, str(tmp_path / "dst"), "train", procs=1,
                                            batch_bytes=1, from_archive=packed),
                          on_progress=stop)
    stats = _convert(tmp_path / "dst", from_archive=packed)
    assert stats.resumed_at >= 1
    _assert_same_samples(db(tmp_path / "dst"), reference["train"],
                         _member_of(src, "train", "{klass}.tar/{rel}"),
                         stream_order=_stream_order(packed))


def test_a_truncated_compressed_tar_is_named(src, tmp_path):
    packed = tree(os.path.join(src, "val"), str(tmp_path / "val.tar.gz"), compression="gz")
    os.truncate(packed, os.path.getsize(packed) * 2 // 3)
    with pytest.raises(ConversionError, match=r"val\.tar\.gz is truncated or damaged .*"
                                              "download it again"):
        _convert(tmp_path / "dst", "val", from_archive=packed)


@pytest.mark.slow
def test_a_compressed_tar_is_not_sharded_nor_verified_against(src, tmp_path):
    """...and its database, in the tar's order, says so to a shuffling sequential reader."""
    from fastlmdb import LMDBIterDataset

    packed = tree(os.path.join(src, "val"), str(tmp_path / "val.tar.gz"), compression="gz")
    with pytest.raises(ConversionError, match=r"val\.tar\.gz is compressed, so it is read in "
                                              "one pass .* without --shards"):
        _convert(tmp_path / "dst", "val", from_archive=packed, shards=2)
    _convert(tmp_path / "dst", "val", from_archive=packed)
    with pytest.raises(ConversionError, match=r"--source .*val\.tar\.gz is a compressed tar"):
        verify.verify(db(tmp_path / "dst", "val"), source=packed)
    assert verify.verify(db(tmp_path / "dst", "val")).problems == []
    with pytest.warns(UserWarning, match=r"in the order of the compressed tar .* Convert it "
                                         r"again from the decompressed \.tar"):
        LMDBIterDataset(tmp_path / "dst", "val", shuffle=True)


def test_a_compressed_tar_is_read_one_member_at_a_time(tmp_path):
    import tracemalloc

    packed = str(tmp_path / "big.tar.gz")
    blobs = [os.urandom(1 << 20) for _ in range(8)]
    with tarfile.open(packed, "w:gz") as tar:
        for k, blob in enumerate(blobs):
            info = tarfile.TarInfo(f"c/{k}.JPEG")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    found = stream.members(packed, "gzip")
    assert not any(getattr(member, "by_tarfile", False) for member in found)  # tarheaders'
    reader = stream.InOrderReader(packed, "gzip")
    tracemalloc.start()
    try:
        for k in (1, 2, 5, 7):  # 0, 3, 4 and 6 are read through
            assert reader.read([found[k]]) == [blobs[k]]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        reader.close()
    assert peak < 3 * (1 << 20)  # one member and the decompressor's buffers, not 8 MB


@pytest.mark.parametrize("odd", ["global pax header", "symlink"])
def test_a_compressed_tar_that_only_tarfile_reads(tmp_path, odd):
    """What sources/tarheaders.py leaves to tarfile is listed and read by tarfile."""
    packed = str(tmp_path / "odd.tar.gz")
    blobs = {f"c/{k}.JPEG": os.urandom(3000 + k) for k in range(3)}
    with tarfile.open(packed, "w:gz", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "made here"}) as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        if odd == "symlink":
            link = tarfile.TarInfo("c/link.JPEG")
            link.type, link.linkname = tarfile.SYMTYPE, "0.JPEG"
            tar.addfile(link)
    if odd == "symlink":
        with pytest.raises(ConversionError, match=r"c/link\.JPEG in .*odd\.tar\.gz is not a "
                                                  "regular file"):
            stream.members(packed, "gzip")
        return
    found = stream.members(packed, "gzip")
    assert all(member.by_tarfile for member in found)
    reader = stream.InOrderReader(packed, "gzip")
    try:
        assert reader.read(found) == list(blobs.values()) and found == list(blobs)
    finally:
        reader.close()


def test_a_gzip_of_several_members_and_padding_is_read_whole(tmp_path):
    """`cat a.gz b.gz` is one gzip file, and zero bytes may follow its last member."""
    import gzip

    blobs = {f"c/{k}.JPEG": os.urandom(5000 + k) for k in range(4)}
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    data = plain.getvalue()
    packed = tmp_path / "joined.tar.gz"
    packed.write_bytes(gzip.compress(data[:7000]) + gzip.compress(data[7000:]) + bytes(100))
    found = stream.members(str(packed), "gzip")
    reader = stream.InOrderReader(str(packed), "gzip")
    try:
        assert found == list(blobs) and reader.read(found) == list(blobs.values())
    finally:
        reader.close()

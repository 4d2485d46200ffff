"""Crafted databases: tampered metadata, tables and records give clear errors, never a crash,
an unbounded allocation or code execution. The parsers are fuzzed with hypothesis."""

import json
import pickle
import shutil

import lmdb
import numpy as np
import pytest
from helpers import db, key_of, run_convert
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlmdb
from fastlmdb.core import format as fmt
from fastlmdb.core import store
from fastlmdb import DecodeError
from fastlmdb.core.errors import DatabaseError

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("crafted")
    from helpers import make_tree

    make_tree(root / "src", {"train": {"a": 3, "b": 2}})
    for save_as in ("jpeg", "numpy"):
        run_convert(root / "src", root / save_as, save_as=save_as)
    return root


def _tampered(made, tmp_path, save_as, edit):
    """A copy of a made database with `edit(txn, meta_db, images_db)` applied."""
    target = tmp_path / save_as
    target.mkdir()
    shutil.copy(db(made / save_as), db(target))
    env = lmdb.open(db(target), subdir=False, max_dbs=3, lock=False)
    meta, images = env.open_db(fmt.META_DB), env.open_db(fmt.IMAGES_DB)
    with env.begin(write=True) as txn:
        edit(txn, meta, images)
    env.close()
    return target


def _set_info(**changes):
    def edit(txn, meta, _images):
        info = json.loads(txn.get(fmt.INFO_KEY, db=meta))
        info.update(changes)
        txn.put(fmt.INFO_KEY, json.dumps(info).encode(), db=meta)
    return edit


@pytest.mark.parametrize("changes, message", [
    ({"count": 10 ** 12}, "record table has"),
    ({"count": -1}, "negative record count|record table"),
    ({"count": "5"}, "'count' is missing or of the wrong type"),
    ({"classes": None}, "'classes'"),
    ({"classes": ["cat", 7]}, "'classes' has an entry of the wrong type"),
    ({"made_by": None}, "'made_by' is missing"),
    ({"finished": "yesterday"}, "'finished'"),
    ({"transcoded": [[0, "a.JPEG"]]}, "'transcoded' has an entry"),
    ({"skipped": [["a.JPEG", 3]]}, "'skipped' has an entry"),
    ({"shard": {"index": "0", "count": 1, "first_source": 0, "files": 5}}, "'shard.index'"),
    ({"imgtype": "exe"}, "unknown image type"),
    ({"version": "1"}, "not an integer"),
    ({"version": 2 ** 40}, "upgrade"),
    ({"format": "other"}, "not a fastlmdb database"),
])
def test_tampered_info_is_refused_clearly(made, tmp_path, changes, message):
    target = _tampered(made, tmp_path, "jpeg", _set_info(**changes))
    with pytest.raises(DatabaseError, match=message):
        fastlmdb.LMDBDataset(target, "train")


def test_a_pickle_in_the_table_is_never_loaded(made, tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("executed!",))

    evil = np.array([Boom()], dtype=object)
    import io
    buf = io.BytesIO()
    np.save(buf, evil, allow_pickle=True)
    target = _tampered(made, tmp_path, "jpeg",
                       lambda txn, meta, _: txn.put(fmt.TABLE_KEY, buf.getvalue(), db=meta))
    with pytest.raises(DatabaseError, match="record table is unreadable"):
        fastlmdb.LMDBDataset(target, "train")
    assert pickle.dumps(0)  # (pickle itself is fine; the format just never uses it)


@pytest.mark.parametrize("save_as", ["jpeg", "numpy"])
def test_truncated_or_garbage_records_raise_decode_errors(made, tmp_path, save_as):
    def edit(txn, meta, images):
        txn.put(fmt.key(key_of(txn, meta, 1)), b"\xff\xd8\xff" + b"\0" * 50, db=images)
        txn.put(fmt.key(key_of(txn, meta, 2)), b"", db=images)
    dataset = fastlmdb.LMDBDataset(_tampered(made, tmp_path, save_as, edit), "train")
    for index in (1, 2):
        with pytest.raises(DecodeError, match=f"train record {index}"):
            dataset[index]
    assert dataset[0][1] == 0  # the untouched records still load


def test_absurd_shapes_allocate_nothing(made, tmp_path):
    def edit(txn, meta, _images):
        rows = fmt.load_table(txn.get(fmt.TABLE_KEY, db=meta), 5, "x").copy()
        rows["height"][0], rows["width"][0] = 2 ** 31, 2 ** 31
        txn.put(fmt.TABLE_KEY, fmt.dump_table(rows), db=meta)
    dataset = fastlmdb.LMDBDataset(_tampered(made, tmp_path, "numpy", edit), "train")
    with pytest.raises(DecodeError, match="bytes stored"):
        dataset[0]


def test_another_programs_lmdb_is_not_a_fastlmdb_database(tmp_path):
    env = lmdb.open(str(tmp_path / "train.lmdb"), subdir=False, max_dbs=3)
    env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    with pytest.raises(DatabaseError, match="not a fastlmdb database|no final metadata"):
        fastlmdb.LMDBDataset(tmp_path, "train")


@FUZZ
@given(st.binary(max_size=400))
def test_fuzzed_json_records(raw):
    try:
        info = fmt.check_info(fmt.load_json(raw, "info", "p"), "p")
    except DatabaseError:
        return
    assert isinstance(info["count"], int)


@FUZZ
@given(st.dictionaries(st.sampled_from(["format", "version", "count", "classes",
                                        "class_to_idx", "imgtype"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=5),
                                 st.lists(st.integers(), max_size=3),
                                 st.dictionaries(st.text(max_size=3), st.integers(),
                                                 max_size=2))))
@pytest.mark.slow
def test_fuzzed_info_fields(info):
    try:
        checked = fmt.check_info(info, "p")
    except DatabaseError:
        return
    assert checked["format"] == fmt.FORMAT_NAME and checked["count"] >= 0


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 10))
def test_fuzzed_tables(raw, count):
    try:
        rows = fmt.load_table(raw, count, "p")
    except DatabaseError:
        return
    assert rows.dtype == fmt.ROW and len(rows) == count


@FUZZ
@given(st.integers(0, 3), st.binary(min_size=1, max_size=300))
def test_fuzzed_header_bytes_of_a_real_table(made, position, junk):
    info, rows = store.read_file_catalog(db(made / "jpeg"))
    raw = bytearray(fmt.dump_table(rows))
    raw[position * 20:position * 20 + len(junk)] = junk
    try:
        loaded = fmt.load_table(bytes(raw), info["count"], "p")
    except DatabaseError:
        return
    assert loaded.dtype == fmt.TABLE  # version 1 tables come back with their keys

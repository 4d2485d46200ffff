"""Reusable trees for the converter and dataset tests (helpers live in tests/helpers.py).

SRC/<split>/<class>/<image>, in pytest's tmp_path, images 40-120 px so conversions are quick.
"""

import os

import pytest

import helpers


@pytest.fixture
def tree(tmp_path):
    """SRC with plain JPEGs: train 3 classes x 4, val 3 classes x 2. Returns SRC as a str."""
    return helpers.make_tree(tmp_path / "src", helpers.plain_layout(classes=3, train=4, val=2))


@pytest.fixture
def awkward_tree(tmp_path):
    """SRC whose splits mix plain JPEGs with every good awkward kind. Returns SRC as a str."""
    return helpers.make_tree(tmp_path / "src", helpers.AWKWARD_LAYOUT)


@pytest.fixture
def bad_files():
    """add(class_dir, kinds=helpers.BAD, prefix="bad") -> sorted paths of the bad files written."""
    return helpers.add_bad_files


@pytest.fixture
def dst(tmp_path):
    """Where databases go: DST (not yet created)."""
    return os.fspath(tmp_path / "dst")


@pytest.fixture(scope="module")
def uneven_db(tmp_path_factory):
    """DST whose train split has 37 plain JPEGs in 2 classes: divisible by no batch or rank
    count the resume tests use."""
    base = tmp_path_factory.mktemp("uneven")
    helpers.make_tree(base / "src", {"train": {"a": 19, "b": 18}})
    helpers.run_convert(base / "src", base / "dst")
    return base / "dst"


@pytest.fixture
def as_worker(monkeypatch):
    """This process acting as a DataLoader worker: batches go in reused segments."""
    import torch.utils.data  # here: the tests without torch import this file too

    from fastlmdb.loading import handover

    if not hasattr(os, "memfd_create"):
        pytest.skip("no memfd_create: batches go in torch's shared memory")
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    monkeypatch.setattr(handover, "_SEGMENTS", {"pid": None, "list": []})

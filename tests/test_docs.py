"""The examples of the README and of docs/*.md run, so that they cannot rot: each page's
```python blocks run in order, in one namespace, against a small generated tree and its
databases, the paths the pages use (/data/imagenet, /data/lmdb, /local/scratch) pointing there.

A block that cannot run here is preceded by the line ``<!-- docs-test: skip (reason) -->``;
only those are skipped (today: none), and the test says which.
"""

import glob
import os
import re

import pytest

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
BLOCK = re.compile(r"(<!-- docs-test: skip \((?P<why>[^)]*)\) -->\n)?```python\n(?P<code>.*?)```",
                   re.S)
# Pages whose examples start client libraries' workers (Lightning, timm) or convert 4 shards.
SLOW = {"clients.md", "api.md"}
# Pages whose examples need a setting of their own (an S3 store, parquet shards, a database of
# real photos): the test file that runs them, with that setting.
OWN_RUNNER = {"streaming.md": "test_streaming.py", "speed-tail.md": "test_fused_tail.py",
              "convert-sources.md": "test_docs_sources.py", "recipes.md": "test_recipes.py"}


def blocks(path):
    """[(line, code, why skipped or None)] of the page at `path`."""
    text = open(path, encoding="utf-8").read()
    return [(text.count("\n", 0, m.start("code")) + 1, m["code"], m["why"])
            for m in BLOCK.finditer(text)]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """{path used in the docs: where it is here}: a tree with train and val, and both splits
    converted."""
    base = tmp_path_factory.mktemp("docs")
    source = base / "data" / "imagenet"
    helpers.make_tree(source, helpers.plain_layout(classes=3, train=6, val=2))
    for split in ("train", "val"):
        helpers.run_convert(source, base / "data" / "lmdb", split=split)
    return {"/data/": f"{base}/data/", "/local/scratch": f"{base}/scratch"}


def _run(path, places):
    skipped = []
    namespace = {"__name__": f"docs.{os.path.basename(path)}"}
    for line, code, why in blocks(path):
        if why is not None:
            skipped.append(f"line {line}: {why}")
            continue
        for used, here in places.items():
            code = code.replace(used, here)
        exec(compile(code, f"{path}:{line}", "exec"), namespace)  # noqa: S102 - our own docs
    return skipped


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", [
    pytest.param(p, id=os.path.basename(p),
                 marks=[pytest.mark.slow] if os.path.basename(p) in SLOW else [])
    for p in PAGES])
def test_the_examples_run(path, places):
    name = os.path.basename(path)
    if name in OWN_RUNNER:  # that test file runs them: check that it does
        runner = open(os.path.join(ROOT, "tests", OWN_RUNNER[name]), encoding="utf-8").read()
        assert f'"{name}"' in runner and blocks(path), f"{OWN_RUNNER[name]} does not run {name}"
        return
    skipped = _run(path, places)
    assert not skipped, f"skipped blocks (marked in the page): {skipped}"


def test_every_page_links_back_and_is_listed():
    index = open(os.path.join(ROOT, "docs", "index.md"), encoding="utf-8").read()
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for path in PAGES[1:]:
        name = os.path.basename(path)
        if name != "index.md":
            assert f"]({name})" in index, f"docs/index.md does not list {name}"
            assert f"](docs/{name})" in readme, f"README.md does not link docs/{name}"
            assert "(index.md)" in open(path, encoding="utf-8").read(), f"{name}: no way back"


def test_the_readme_stays_short():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert len(f.readlines()) < 200

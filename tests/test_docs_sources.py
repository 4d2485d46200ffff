"""docs/convert-sources.md's Python examples run as written (each in a fresh folder, as a
script, since the converter spawns processes)."""

import os
import re
import subprocess
import sys

import pytest

PAGE = os.path.join(os.path.dirname(__file__), "..", "docs", "convert-sources.md")


def blocks():
    with open(PAGE, encoding="utf-8") as file:
        return re.findall(r"```python\n(.*?)```", file.read(), flags=re.S)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("code", blocks(), ids=lambda code: code.split("\n")[0][:30])
def test_example_runs(tmp_path, code):
    if "import datasets" in code:
        pytest.importorskip("datasets")
    script = tmp_path / "example.py"
    script.write_text(code)
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True, timeout=280)

"""Notebook conventions: committed without outputs, one parameters cell, a smoke reference each."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_conventions(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert not any(c.get("outputs") for c in code), "commit notebooks without outputs"
    assert not any(c.get("execution_count") for c in code), "commit notebooks without execution counts"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert 'profile = "quick"' in "".join(tagged[0]["source"])
    ref = ROOT / "tests" / "notebooks" / path.name
    assert ref.exists(), "run `make test-refs` to record the smoke run nbval compares against"
    checked = [
        c
        for c in json.loads(ref.read_text())["cells"]
        if c["cell_type"] == "code" and "NBVAL_CHECK_OUTPUT" in "".join(c["source"])
    ]
    assert checked and all(c.get("outputs") for c in checked), "the reference marks result cells to check"

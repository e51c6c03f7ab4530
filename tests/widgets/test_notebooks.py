"""The notebooks are committed clean and follow the house rules for notebooks, listed below.

Running them is nbval's job (``pytest --nbval-lax ... notebooks/``); this file checks, without a kernel, what a run
cannot: no outputs or execution counts are committed, the first code cell holds only commented UPPER_CASE
parameters (and the imports they need: ``os``, deltakit) and is tagged ``parameters``, imports come from deltakit
only, nothing is defined, and every call cell is followed by its interpretation.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
EXPECTED = ["00_quickstart", "01_delta_statistics", "02_dare_sweep", "03_darex_rescaling", "04_merging",
            "05_llm_deltas"]


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def _code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _is_import_cell(tree: ast.Module) -> bool:
    return bool(tree.body) and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body)


def test_all_notebooks_are_present():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = _load(path)
    dirty = [i for i, c in enumerate(nb["cells"])
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them before committing"
    assert "widgets" not in nb["metadata"], f"{path.name}: saved widget state in the metadata; clear it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_title_and_promise_first(path):
    first = _load(path)["cells"][0]
    text = _source(first).strip()
    assert first["cell_type"] == "markdown" and text.startswith("# "), f"{path.name}: start with a '# Title' cell"
    promise = text.split("\n", 1)[1].strip() if "\n" in text else ""
    assert "minute" in promise, f"{path.name}: the first cell must say what it shows and what it costs (minutes)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell(path):
    first = _code_cells(_load(path))[0]
    assert "parameters" in first["metadata"].get("tags", []), f"{path.name}: tag the first code cell 'parameters'"
    lines = _source(first).splitlines()
    tree = ast.parse(_source(first))
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import) and [a.name for a in node.names] == ["os"]:
            continue  # to read DELTAKIT_NOTEBOOK_FAMILY
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "deltakit":
            continue  # a parameter may depend on the registry (e.g. whether FAMILY has a member)
        assert isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name), (
            f"{path.name}: the parameters cell holds only `NAME = value  # comment` lines, got line {node.lineno}")
        name = node.targets[0].id
        assert name.isupper(), f"{path.name}: parameter {name!r} must be UPPER_CASE"
        assert "  # " in lines[node.end_lineno - 1], f"{path.name}: parameter {name} needs a comment on its line"
        names.append(name)
    # The family comes from the environment, so that CI runs the notebook on a tiny family (conftest.py).
    assert "FAMILY" in names and ('os.environ.get("DELTAKIT_NOTEBOOK_FAMILY"' in _source(first)
                                  or 'os.environ.get("DELTAKIT_NOTEBOOK_LLM_FAMILY"' in _source(first))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_thin_cells(path):
    cells = _load(path)["cells"]
    first_code = next(i for i, c in enumerate(cells) if c["cell_type"] == "code")
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code" or i == first_code:
            continue
        tree = ast.parse(_source(cell))
        for node in ast.walk(tree):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)), (
                f"{path.name} cell {i}: no definitions in notebooks; helpers belong in the library")
            if isinstance(node, ast.Import):
                pytest.fail(f"{path.name} cell {i}: `import {node.names[0].name}`; import from deltakit only")
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] == "deltakit", (
                    f"{path.name} cell {i}: `from {node.module} import ...`; import from deltakit only")
        if not _is_import_cell(tree):
            after = cells[i + 1]["cell_type"] if i + 1 < len(cells) else None
            assert after == "markdown", f"{path.name} cell {i}: follow each call with a markdown interpretation"

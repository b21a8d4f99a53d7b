"""Every table and chart a notebook makes reaches the page.

A notebook shows a cell's value only when it is the cell's last statement: a ``figures.table(...)`` or
a chart made earlier in the cell, or inside an ``if`` or a loop, is computed and thrown away. This reads
every chapter and exercise notebook and asks that each call of a chart module's function that returns
something to show (anything but ``-> None``) is displayed: wrapped in ``display(...)``, assigned, or the
last top-level statement of its cell."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted([*ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("exercises/*.ipynb")])


def _chart_modules(tree: ast.Module) -> dict[str, object]:
    """Alias → chart module, from the notebook's ``from arithlens.charts import …`` statements."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "arithlens.charts":
            for alias in node.names:
                out[alias.asname or alias.name] = importlib.import_module(f"arithlens.charts.{alias.name}")
    return out


def _shows_something(module, name: str) -> bool:
    fn = getattr(module, name, None)
    return callable(fn) and inspect.signature(fn).return_annotation not in (None, "None")


def _lost(source_cells: list[str]) -> list[str]:
    trees = [ast.parse(src) for src in source_cells]
    modules = {}
    for tree in trees:
        modules.update(_chart_modules(tree))
    lost = []
    for i, tree in enumerate(trees):
        last = tree.body[-1] if tree.body else None
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and node is not last):
                continue
            func = node.value.func
            if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in modules
                    and _shows_something(modules[func.value.id], func.attr)):
                lost.append(f"code cell {i}, line {node.lineno}: {ast.unparse(func)}(…) is never shown")
    return lost


def _code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_table_and_chart_a_notebook_makes_is_shown(path):
    assert _lost(_code_cells(path)) == []


def test_the_check_finds_a_table_made_mid_cell_or_inside_a_block():
    cells = ["from arithlens.charts import figures\nfigures.use_offline_renderer()\nx = 1",
             "figures.table(a)\ny = 2",
             "if y:\n    figures.table(b)\ndisplay(figures.table(c))",
             "t = figures.table(d)\nfigures.table(e)"]
    assert _lost(cells) == ["code cell 1, line 1: figures.table(…) is never shown",
                            "code cell 2, line 2: figures.table(…) is never shown"]

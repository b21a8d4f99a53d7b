"""Instructor notebook → student notebook, clean instructor copy, and the book's copy.

Publishing wing. A solution cell (tag ``solution``) holds exactly one function definition whose body
carries at least one ``# hint:`` comment. For students the body becomes::

    def build_pair(tokenizer, template, operator, a, b):
        \"\"\"(the docstring is kept)\"\"\"
        # hint: (the hint comments are kept)
        # your code here, in place of the line below
        raise NotImplementedError("build_pair: (the first hint)")

Everything else (task text, demo cells, check cells, cell ids) is copied unchanged, and outputs and
execution counts are cleared, so a build is a pure function of the instructor notebooks: rebuilding
gives byte-identical files. The book's copy shows the student's stub and, right after it, the
solution folded behind a "Show solution" toggle (MyST-NB's ``hide-input`` tag).

nbformat reads and writes; ``ast`` finds the function, its docstring and its hints.
"""

from __future__ import annotations

import ast
import copy
import io
import tokenize
from pathlib import Path

import nbformat

from arithlens.classroom import CHECK_TAG, SOLUTION_TAG, ClassroomError, exercise_notebooks


def _tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _hints(source: str) -> list[str]:
    """The text of every ``# hint:`` comment in ``source`` (tokenize, so strings never match)."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.string[1:].strip().lower().startswith("hint:"):
            out.append(tok.string[1:].strip()[len("hint:"):].strip())
    return out


def stub_source(source: str, where: str = "solution cell") -> str:
    """The student's stub for a solution cell's source (one function; see the module docstring)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ClassroomError(f"{where} does not parse: {exc.msg} (line {exc.lineno})") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        raise ClassroomError(f"{where} must hold exactly one function definition and nothing else")
    fn = tree.body[0]
    hints = _hints(source)
    if not hints:
        raise ClassroomError(f"{where}: function {fn.name} has no '# hint:' comment for the student stub")
    lines = source.splitlines()
    first = fn.body[0]
    has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    head_end = first.end_lineno if has_doc else first.lineno - 1  # last line kept: the docstring, else the signature
    indent = " " * (first.col_offset)
    kept = lines[:head_end]
    kept += [f"{indent}# hint: {h}" for h in hints]
    message = f"{fn.name}: {hints[0]}" + (" (more hints in its cell)" if len(hints) > 1 else "")
    kept += [f"{indent}# your code here, in place of the line below", f"{indent}raise NotImplementedError({message!r})"]
    return "\n".join(kept)


def _clear(cell) -> None:
    if cell.cell_type == "code":
        cell.outputs = []
        cell.execution_count = None
    cell.metadata.pop("execution", None)
    cell.metadata.pop("papermill", None)


def read_instructor(path: Path) -> nbformat.NotebookNode:
    """Read an instructor notebook and check its shape (one-line :class:`ClassroomError` otherwise)."""
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:  # nbformat raises JSON and validation errors of several types
        raise ClassroomError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    meta = nb.metadata.get("arithlens", {})
    if meta.get("exercise") != path.stem:
        raise ClassroomError(f"{path.name}: metadata.arithlens.exercise must be {path.stem!r}")
    solutions = [c for c in nb.cells if SOLUTION_TAG in _tags(c)]
    if not solutions or not any(CHECK_TAG in _tags(c) for c in nb.cells):
        raise ClassroomError(f"{path.name} needs at least one '{SOLUTION_TAG}' cell and one '{CHECK_TAG}' cell")
    return nb


def instructor_copy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The instructor notebook with outputs cleared (what the teacher keeps)."""
    out = copy.deepcopy(nb)
    for cell in out.cells:
        _clear(cell)
    out.metadata["arithlens"] = {**out.metadata.get("arithlens", {}), "version": "instructor"}
    return out


def student_copy(nb: nbformat.NotebookNode, name: str = "") -> nbformat.NotebookNode:
    """The student notebook: every solution cell replaced by its stub, outputs cleared."""
    out = instructor_copy(nb)
    for i, cell in enumerate(out.cells):
        if SOLUTION_TAG in _tags(cell):
            cell.source = stub_source(cell.source, f"{name} cell {i} ({cell.get('id', '')})".strip())
    out.metadata["arithlens"]["version"] = "student"
    return out


def book_copy(nb: nbformat.NotebookNode, name: str = "") -> nbformat.NotebookNode:
    """The book's page: each stub as students see it, then the solution behind a toggle."""
    out = instructor_copy(nb)
    cells = []
    for i, cell in enumerate(out.cells):
        if SOLUTION_TAG in _tags(cell):
            stub = copy.deepcopy(cell)
            stub.source = stub_source(cell.source, f"{name} cell {i}")
            stub.id = f"{cell.id}-stub"[:64]
            stub.metadata["tags"] = sorted(_tags(cell) - {SOLUTION_TAG} | {"student-stub"})
            cell.metadata["tags"] = sorted(_tags(cell) | {"hide-input"})
            cell.metadata["mystnb"] = {"code_prompt_show": "Show solution", "code_prompt_hide": "Hide solution"}
            cells += [stub, cell]
        else:
            cells.append(cell)
    out.cells = cells
    out.metadata["arithlens"]["version"] = "book"
    return out


def write(nb: nbformat.NotebookNode, path: Path) -> Path:
    """Write deterministically (nbformat sorts keys; we fix the trailing newline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = nbformat.writes(nb)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return path


def build(out_dir: Path, source: Path | None = None) -> dict[str, list[Path]]:
    """Write ``out_dir/student/*.ipynb`` and ``out_dir/instructor/*.ipynb``; return what was written.

    Stale notebooks from an earlier build (an exercise since removed) are deleted.
    """
    notebooks = {name: read_instructor(path) for name, path in exercise_notebooks(source).items()}
    written: dict[str, list[Path]] = {"student": [], "instructor": []}
    for kind, make in (("student", student_copy), ("instructor", lambda nb, name: instructor_copy(nb))):
        folder = Path(out_dir) / kind
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.ipynb"):
            if old.stem not in notebooks:
                old.unlink()
        for name, nb in notebooks.items():
            written[kind].append(write(make(nb, name), folder / f"{name}.ipynb"))
    return written

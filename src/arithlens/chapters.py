"""What a chapter is: its notebook, its parameters and declared inputs, and the code it runs.

Publishing wing, ground floor (paper: none). A chapter is a notebook ``notebooks/NN_name.ipynb``; its
``parameters`` cell holds literals only (papermill reads them as the defaults), including the literal
``upstream = {"01_heads": ""}`` that declares which chapters' runs it consumes. Its *code* is the
notebook's cell sources plus every ``arithlens`` module its cells import, followed through those
modules' own imports (a subpackage counts whole): :func:`code_hash` is what a run key uses, so editing
a module a chapter never reaches leaves its runs valid. Written by hand: the import walk (``ast``).
"""

from __future__ import annotations

import ast
import hashlib
import threading
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import arithlens


class RunError(RuntimeError):
    """A run that could not start or did not finish; the message is one line."""


_PARSE_LOCK = threading.Lock()


def project_root() -> Path:
    """The checkout holding ``notebooks/`` (arithlens is installed editable from it)."""
    root = Path(os.environ.get("ARITHLENS_ROOT", Path(__file__).resolve().parents[2]))
    if not (root / "notebooks").is_dir():
        raise RunError(f"no notebooks/ under {root}; install arithlens editable from its checkout or set ARITHLENS_ROOT")
    return root


def runs_root() -> Path:
    """Where runs are stored (``$ARITHLENS_RUNS``, default ``<checkout>/runs``)."""
    return Path(os.environ.get("ARITHLENS_RUNS", project_root() / "runs")).expanduser().resolve()


def list_chapters() -> dict[str, Path]:
    """Chapter id (notebook stem, e.g. ``00_task``) → notebook path, in book order."""
    return {p.stem: p for p in sorted((project_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))}


def find_chapter(name: str) -> str:
    """Accept ``00_task``, ``00``, ``0`` or ``task``; return the chapter id."""
    chapters = list_chapters()
    for cid in chapters:
        number, _, title = cid.partition("_")
        if name in (cid, number, title) or (name.isdigit() and int(name) == int(number)):
            return cid
    raise RunError(f"unknown chapter {name!r}: choose from {', '.join(chapters) or '(none found)'}")


def notebook_parameters(chapter: str) -> dict[str, Any]:
    """The chapter's parameters and their defaults, read from its ``parameters`` cell."""
    path = list_chapters()[chapter]
    return dict(_parameters_of(str(path), path.stat().st_mtime_ns))


@lru_cache(maxsize=64)
def _parameters_of(path: str, mtime: int) -> tuple:
    import papermill

    info = papermill.inspect_notebook(path)
    return tuple((name, ast.literal_eval(p["default"])) for name, p in info.items())


def chapter_inputs(chapter: str) -> tuple[str, ...]:
    """The chapters whose runs ``chapter`` consumes: the keys of its ``upstream`` parameter literal."""
    declared = notebook_parameters(chapter).get("upstream") or {}
    for name in declared:
        if name not in list_chapters():
            raise RunError(f"chapter {chapter} declares an input {name!r} that is no chapter")
    return tuple(declared)


def is_across(chapter: str) -> bool:
    """A chapter that compares models: its ``parameters`` cell has a ``models`` list, and its declared
    inputs are resolved once per listed model (``arithlens.runs.plan_run``)."""
    return isinstance(notebook_parameters(chapter).get("models"), list)


def _arithlens_imports(source: str) -> set[str]:
    """Names of ``arithlens`` modules imported by ``source`` (``from arithlens import x``,
    ``from arithlens.x import …``, ``import arithlens.x``, ``from .x import …``)."""
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    found: set[str] = set()
    with _PARSE_LOCK:  # CPython 3.11's compile() is not thread-safe ("AST constructor recursion depth
        tree = ast.parse(code)  # mismatch" when two threads parse at once; `book --jobs` plans in threads)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 or mod == "arithlens":
                names = [mod] if node.level == 1 and mod else [a.name for a in node.names]
                found.update(n.split(".")[0] for n in names)
            elif mod.startswith("arithlens."):
                found.add(mod.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("arithlens."))
    return found


def chapter_modules(chapter: str) -> list[Path]:
    """The library files a chapter notebook can run: ``__init__.py`` plus every ``arithlens`` module
    its code cells import, followed transitively through the modules' own imports. A subpackage
    counts with every module in it."""
    package = Path(arithlens.__file__).parent
    nb = json.loads(list_chapters()[chapter].read_text())
    todo: set[str] = set()
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            todo |= _arithlens_imports("".join(cell["source"]))
    seen: dict[str, list[Path]] = {"__init__": [package / "__init__.py"]}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if (package / f"{name}.py").is_file():
            files = [package / f"{name}.py"]
        elif (package / name / "__init__.py").is_file():
            files = sorted((package / name).rglob("*.py"))
        else:  # a name defined in __init__, not a module
            continue
        seen[name] = files
        for path in files:
            todo |= _arithlens_imports(path.read_text())
    return sorted(p for files in seen.values() for p in files)


def code_hash(chapter: str) -> str:
    """Hash of the library modules the chapter uses (:func:`chapter_modules`) and the notebook's cell
    sources (outputs ignored). Editing a module no chapter notebook reaches (e.g. ``finetune`` for
    chapter 1, or ``book``/``cli``/``runs``) leaves that chapter's finished runs valid.
    """
    package = Path(arithlens.__file__).parent
    h = hashlib.sha256()
    for path in chapter_modules(chapter):
        h.update(str(path.relative_to(package)).encode() + path.read_bytes())
    nb = json.loads(list_chapters()[chapter].read_text())
    for cell in nb["cells"]:
        h.update("".join(cell["source"]).encode())
    return h.hexdigest()[:16]

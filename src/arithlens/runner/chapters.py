"""What a chapter is: its notebook, its parameters and declared inputs, and the code it runs.

Publishing wing, ground floor (paper: none). A chapter is a notebook ``notebooks/NN_name.ipynb``; its
``parameters`` cell holds literals only (papermill reads them as the defaults), including the literal
``upstream = {"01_heads": ""}`` that declares which chapters' runs it consumes. Its *code* is the
notebook's cell sources plus every ``arithlens`` module its cells import, followed through those
modules' own imports (each import resolved to the one module it names), and the package data files
those modules read: :func:`code_hash` is what a run key uses, so editing a module or data file a
chapter never reaches leaves its runs valid. Written by hand: the import walk (``ast``).
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
from arithlens.paths import DATA_DIR, project_root


class RunError(RuntimeError):
    """A run that could not start or did not finish; the message is one line."""


_PARSE_LOCK = threading.Lock()


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
    inputs are resolved once per listed model (``arithlens.runner.runs.plan_run``)."""
    return isinstance(notebook_parameters(chapter).get("models"), list)


def _parse(source: str) -> ast.Module:
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    with _PARSE_LOCK:  # CPython 3.11's compile() is not thread-safe ("AST constructor recursion depth
        return ast.parse(code)  # mismatch" when two threads parse at once; `book --jobs` plans in threads)


def _arithlens_imports(source: str, package: str = "") -> set[str]:
    """Full dotted names (below ``arithlens``) of what ``source`` imports from arithlens:
    ``from arithlens.core import models`` gives ``core.models``, ``from arithlens.core.models import
    load_model`` gives ``core.models.load_model`` (resolved to a module by :func:`_module_files`),
    ``import arithlens.core.models`` gives ``core.models``. ``package`` is the dotted package of the
    file holding ``source`` (for relative imports such as ``from .hooks import x``)."""
    found: set[str] = set()
    for node in ast.walk(_parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            elif node.module == "arithlens" or (node.module or "").startswith("arithlens."):
                base = node.module[len("arithlens."):] if node.module != "arithlens" else ""
            else:
                continue
            found.update(f"{base}.{a.name}".strip(".") for a in node.names if a.name != "*")
            if base:
                found.add(base)
        elif isinstance(node, ast.Import):
            found.update(a.name[len("arithlens."):] for a in node.names if a.name.startswith("arithlens."))
    return found


def _data_files(source: str) -> set[str]:
    """The package data files ``source`` reads: the literal names in its ``data_file("…")`` calls."""
    names: set[str] = set()
    for node in ast.walk(_parse(source)):
        if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "data_file"):
            names.add(node.args[0].value)
    return names


def _module_files(dotted: str) -> tuple[str, list[Path]] | None:
    """The module a dotted name (below ``arithlens``) lives in, and the files importing it runs: the
    module's own file plus every enclosing package's ``__init__.py``. A name that is not a module
    (a function, ``core.models.load_model``) resolves to the module defining it."""
    package = Path(arithlens.__file__).parent
    parts = dotted.split(".") if dotted else []
    while True:
        folder = package.joinpath(*parts)
        if parts and folder.with_suffix(".py").is_file():
            own = folder.with_suffix(".py")
            break
        if (folder / "__init__.py").is_file():
            own = folder / "__init__.py"
            break
        if not parts:
            return None
        parts = parts[:-1]
    inits = [package.joinpath(*parts[:i], "__init__.py") for i in range(len(parts))]
    return ".".join(parts), sorted({own, *inits})


def chapter_modules(chapter: str) -> list[Path]:
    """The files a chapter notebook can run or read: every ``arithlens`` module its code cells import,
    followed transitively through the modules' own imports (each resolved to the module it names,
    never a whole subpackage), the ``__init__.py`` of every package on the way, and the package data
    files (:func:`arithlens.paths.data_file`) those modules read."""
    root = Path(arithlens.__file__).parent
    nb = json.loads(list_chapters()[chapter].read_text())
    todo: set[str] = {""}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            todo |= _arithlens_imports("".join(cell["source"]))
    seen: set[str] = set()
    files: set[Path] = set()
    while todo:
        resolved = _module_files(todo.pop())
        if resolved is None or resolved[0] in seen:
            continue
        module, paths = resolved
        seen.add(module)
        files.update(paths)
        for path in paths:
            source = path.read_text()
            todo |= _arithlens_imports(source, ".".join(path.parent.relative_to(root).parts))
            files.update(DATA_DIR / name for name in _data_files(source))
    return sorted(files)


def code_hash(chapter: str) -> str:
    """Hash of the library modules the chapter uses (:func:`chapter_modules`) and the notebook's cell
    sources (outputs ignored). Editing a module no chapter notebook reaches (e.g. ``finetune`` for
    chapter 1, or ``book``/``cli``/``runs``) leaves that chapter's finished runs valid.
    """
    package = Path(arithlens.__file__).parent
    h = hashlib.sha256()
    for path in chapter_modules(chapter):  # the path names the file, so a moved module re-keys too
        h.update(str(path.relative_to(package)).encode() + path.read_bytes())
    nb = json.loads(list_chapters()[chapter].read_text())
    for cell in nb["cells"]:
        h.update("".join(cell["source"]).encode())
    return h.hexdigest()[:16]

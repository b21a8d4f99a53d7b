"""What a chapter is: its notebook, its parameters and declared inputs, and the code it runs.

Publishing wing, ground floor (paper: none). A chapter is a notebook ``notebooks/NN_name.ipynb``; its
``parameters`` cell holds literals only (papermill reads them as the defaults), including the literal
``upstream = {"01_heads": ""}`` that declares which chapters' runs it consumes. Its *code* is the
notebook's cells plus every ``arithlens`` module its cells import, followed through those modules' own
imports (each import resolved to the one module it names, with the ``__init__.py`` of each package on
the way — never a whole subpackage), and the package data files those modules read through
:func:`arithlens.paths.data_file` (named by a literal, which :func:`scan` reads; a ``data_file`` call
with a computed name is an error). :func:`code_hash` is what a run key uses, so editing a module or
data file a chapter never reaches leaves its runs valid. Each file is parsed once per version, so a
book of many runs plans in well under a second. Written by hand: the import walk (``ast``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import arithlens
from arithlens.paths import project_root


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


@dataclass(frozen=True)
class Reads:
    """What one source (a module, or a notebook's code cells) reaches: the dotted names below
    ``arithlens`` it imports (:func:`arithlens_imports`), the package data files its
    ``data_file("…")`` calls name, and the lines of any ``data_file`` call whose name is not a literal
    (the run key cannot see which file those read)."""

    imports: frozenset[str]
    data: frozenset[str]
    unreadable: tuple[int, ...] = ()


def scan(source: str, package: str = "") -> Reads:
    """The imports and package data reads of ``source``, in one pass over its syntax tree.

    Imports give full dotted names: ``from arithlens.core import models`` gives ``core`` and
    ``core.models``; ``from arithlens.core.models import load_model`` gives ``core.models`` and
    ``core.models.load_model`` (resolved to its module by :func:`module_files`); ``import
    arithlens.core.models`` gives ``core.models``. ``package`` is the dotted package of the file holding
    ``source``, for relative imports (``from .hooks import x`` in ``core/`` gives ``core.hooks``).
    Imports inside functions count too: a lazy import still runs."""
    imports: set[str] = set()
    data: set[str] = set()
    unreadable: list[int] = []
    for node in ast.walk(_parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            elif node.module == "arithlens" or (node.module or "").startswith("arithlens."):
                base = node.module[len("arithlens."):] if node.module != "arithlens" else ""
            else:
                continue
            imports.update(f"{base}.{a.name}".strip(".") for a in node.names if a.name != "*")
            if base:
                imports.add(base)
        elif isinstance(node, ast.Import):
            imports.update(a.name[len("arithlens."):] for a in node.names if a.name.startswith("arithlens."))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "data_file":
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                data.add(first.value)
            else:
                unreadable.append(node.lineno)
    return Reads(frozenset(imports), frozenset(data), tuple(unreadable))


def arithlens_imports(source: str, package: str = "") -> set[str]:
    """The dotted names below ``arithlens`` that ``source`` imports (see :func:`scan`)."""
    return set(scan(source, package).imports)


@lru_cache(maxsize=1024)
def _scan_file(path: Path, package: str, stamp: tuple[int, int]) -> Reads:
    """:func:`scan` of one file, parsed once per file version (``stamp``: mtime and size): a book plans
    dozens of runs and each asks for its chapter's code hash."""
    return scan(path.read_text(), package)


def module_files(dotted: str, root: Path | None = None) -> tuple[str, list[Path]] | None:
    """The module a dotted name (below ``arithlens``) lives in, and the files importing it runs: the
    module's own file plus every enclosing package's ``__init__.py``. A name that is not a module
    (a function, ``core.models.load_model``) resolves to the module defining it."""
    root = root or Path(arithlens.__file__).parent
    parts = dotted.split(".") if dotted else []
    while True:
        folder = root.joinpath(*parts)
        if parts and folder.with_suffix(".py").is_file():
            own = folder.with_suffix(".py")
            break
        if (folder / "__init__.py").is_file():
            own = folder / "__init__.py"
            break
        if not parts:
            return None
        parts = parts[:-1]
    inits = [root.joinpath(*parts[:i], "__init__.py") for i in range(len(parts))]
    return ".".join(parts), sorted({own, *inits})


def _cells(chapter: str) -> tuple[tuple[tuple[str, str], ...], Reads]:
    """(cell type, source) of every cell of the chapter's notebook, in order (outputs left out), and
    what its code cells import and read."""
    path = list_chapters()[chapter]
    info = path.stat()
    return _read_notebook(path, (info.st_mtime_ns, info.st_size))


@lru_cache(maxsize=64)
def _read_notebook(path: Path, stamp: tuple[int, int]) -> tuple[tuple[tuple[str, str], ...], Reads]:
    cells = tuple((cell["cell_type"], "".join(cell["source"])) for cell in json.loads(path.read_text())["cells"])
    reads = [scan(source) for kind, source in cells if kind == "code"]
    return cells, Reads(frozenset().union(*(r.imports for r in reads)), frozenset().union(*(r.data for r in reads)),
                        tuple(line for r in reads for line in r.unreadable))


def chapter_modules(chapter: str) -> list[Path]:
    """The files a chapter notebook can run or read: every ``arithlens`` module its code cells import,
    followed transitively through the modules' own imports (each resolved to the module it names,
    never a whole subpackage), the ``__init__.py`` of every package on the way, and the package data
    files (:func:`arithlens.paths.data_file`) those modules and cells read. A ``data_file`` call whose
    name is not a literal is an error: the run key could not see what it reads."""
    root = Path(arithlens.__file__).parent
    reads = _cells(chapter)[1]
    if reads.unreadable:
        raise RunError(f"chapter {chapter} calls data_file with a name that is not a literal, so no run key can see "
                       f"the file it reads; write data_file(\"NAME\")")
    todo, data = {"", *reads.imports}, set(reads.data)
    seen: set[str] = set()
    files: set[Path] = set()
    while todo:
        resolved = module_files(todo.pop(), root)
        if resolved is None or resolved[0] in seen:
            continue
        module, paths = resolved
        seen.add(module)
        files.update(paths)
        for path in paths:
            info = path.stat()
            reads = _scan_file(path, ".".join(path.parent.relative_to(root).parts), (info.st_mtime_ns, info.st_size))
            if reads.unreadable:
                raise RunError(f"{path.relative_to(root)}:{reads.unreadable[0]} calls data_file with a name that is not "
                               f"a literal, so no run key can see the file it reads; write data_file(\"NAME\")")
            todo |= reads.imports
            data |= reads.data
    for name in data:  # the package's own data folder: a copy of the package keys its own data
        path = root / "data" / name
        if not path.is_file():
            raise RunError(f"chapter {chapter} reads data_file({name!r}), which is not in {root / 'data'}")
        files.add(path)
    return sorted(files)


def code_hash(chapter: str) -> str:
    """Hash of the files the chapter reaches (:func:`chapter_modules`: library modules and package
    data) and of the notebook's cells (type and source; outputs ignored). Editing a module or data
    file no chapter notebook reaches (e.g. ``analyses/sft/trainer.py`` for chapter 1, or the runner
    and ``cli``) leaves that chapter's finished runs valid.
    """
    package = Path(arithlens.__file__).parent
    h = hashlib.sha256()

    def put(part: bytes) -> None:  # length-prefixed: no two different file lists hash the same
        h.update(len(part).to_bytes(8, "little") + part)

    for path in chapter_modules(chapter):  # the path names the file, so a moved module re-keys too
        put(str(path.relative_to(package)).encode())
        put(path.read_bytes())
    for kind, source in _cells(chapter)[0]:  # a code cell turned into markdown stops running: re-key
        put(kind.encode())
        put(source.encode())
    return h.hexdigest()[:16]

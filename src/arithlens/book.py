"""Build the Jupyter Book (v1, offline) from finished runs — never re-executing a notebook.

Publishing wing. :func:`stage_chapters` copies each run's executed notebook into ``book/chapters/``,
hiding the ``parameters`` and papermill ``injected-parameters`` cells (the chapter's own config cell
shows the run configuration as a table instead); :func:`write_vega_bundle` writes one copy of the
vega / vega-lite / vega-embed JavaScript (from vl-convert) into ``book/_static`` so charts render with
the network off; :func:`stage_exercises` adds the classroom's exercises (student stubs, solutions
behind a toggle); :func:`build_html` calls ``jupyter-book build`` with ``execute_notebooks: off``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import yaml

from arithlens.record import RunResult
from arithlens.runs import RunError, project_root

HIDDEN_TAGS = {"parameters", "injected-parameters"}


def book_dir() -> Path:
    """The book's source folder (``$ARITHLENS_BOOK_DIR``, default ``<checkout>/book``)."""
    return Path(os.environ.get("ARITHLENS_BOOK_DIR", project_root() / "book")).resolve()


def toc_chapters() -> list[str]:
    """Chapter ids the table of contents lists (``chapters/<id>`` entries of ``book/_toc.yml``)."""
    toc = yaml.safe_load((book_dir() / "_toc.yml").read_text())
    out = []
    for part in toc.get("parts", [{"chapters": toc.get("chapters", [])}]):
        for entry in part.get("chapters", []):
            if entry.get("file", "").startswith("chapters/"):
                out.append(entry["file"].removeprefix("chapters/"))
    return out


def stage_chapters(runs: list[RunResult]) -> list[Path]:
    """Copy executed notebooks into ``book/chapters`` with the parameter cells hidden."""
    target = book_dir() / "chapters"
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*.ipynb"):
        old.unlink()
    written = []
    for run in runs:
        nb = nbformat.read(run.notebook, as_version=4)
        for cell in nb.cells:
            tags = set(cell.metadata.get("tags", []))
            if tags & HIDDEN_TAGS:
                cell.metadata["tags"] = sorted(tags | {"remove-cell"})
        nb.metadata["arithlens"] = {"run": str(run.path), "run_key": run.manifest["run_key"],
                                    "model": run.manifest["model"]}
        path = target / f"{run.manifest['chapter']}.ipynb"
        nbformat.write(nb, path)
        written.append(path)
    return written


def stage_exercises() -> list[Path]:
    """Copy the exercises into ``book/exercises``: each student stub followed by its solution folded
    behind a "Show solution" toggle (:func:`arithlens.classroom.build.book_copy`), and the exercises'
    README as the part's first page. Built from the instructor notebooks, never executed."""
    from arithlens.classroom import exercise_notebooks, exercises_dir
    from arithlens.classroom.build import book_copy, read_instructor, write

    target = book_dir() / "exercises"
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*.ipynb"):
        old.unlink()
    written = [write(book_copy(read_instructor(path), name), target / f"{name}.ipynb")
               for name, path in exercise_notebooks().items()]
    readme = exercises_dir() / "README.md"
    if readme.is_file():
        (target / "index.md").write_text(readme.read_text())
        written.append(target / "index.md")
    return written


def write_vega_bundle() -> Path:
    """One offline copy of the chart JavaScript, shared by every page (~0.9 MB, written once)."""
    import altair as alt
    import vl_convert

    static = book_dir() / "_static"
    static.mkdir(exist_ok=True)
    path = static / "vega-bundle.js"
    stamp = static / "vega-bundle.version"
    version = f"vl-convert {vl_convert.__version__} vega-lite {alt.VEGALITE_VERSION} scoped"
    if not path.is_file() or not stamp.is_file() or stamp.read_text() != version:
        bundle = vl_convert.javascript_bundle(vl_version=alt.VEGALITE_VERSION.rsplit(".", 1)[0])
        # The bundle declares top-level consts (`const n=...`); in a classic script they would clash
        # with the theme's scripts' globals, so scope them. It publishes window.vegaEmbed itself.
        path.write_text("(function(){\n" + bundle + "\n})();\n")
        stamp.write_text(version)
    return path


def partial_toc(chapters: list[str]) -> Path:
    """A copy of the table of contents listing only ``chapters`` (for a build of some chapters)."""
    toc = yaml.safe_load((book_dir() / "_toc.yml").read_text())
    for part in toc.get("parts", []):
        part["chapters"] = [e for e in part.get("chapters", [])
                            if not e.get("file", "").startswith("chapters/") or e["file"].removeprefix("chapters/") in chapters]
    toc["parts"] = [p for p in toc.get("parts", []) if p["chapters"]]
    path = book_dir() / "_build" / "_toc.partial.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(toc, sort_keys=False))
    return path


def build_html(toc: Path | None = None) -> Path:
    """Run ``jupyter-book build`` (offline, no execution); return the built index page."""
    root = project_root()
    cmd = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())", "build",
           str(book_dir()), "--config", str(root / "_config.yml"), "--toc", str(toc or book_dir() / "_toc.yml"),
           "--path-output", str(book_dir())]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    log = book_dir() / "_build" / "build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RunError(f"jupyter-book build failed (exit {proc.returncode}); see {log}")
    index = book_dir() / "_build" / "html" / "index.html"
    if not index.is_file():
        raise RunError(f"jupyter-book build wrote no {index}; see {log}")
    return index


def check_consistent(runs: list[RunResult]) -> None:
    """Refuse a book whose pages disagree: every input a run was keyed on must be the very run the
    book shows for that chapter (one run per chapter)."""
    shown: dict[str, str] = {}
    for run in runs:
        if shown.setdefault(run.manifest["chapter"], run.manifest["run_key"]) != run.manifest["run_key"]:
            raise RunError(f"two runs of {run.manifest['chapter']} for one book: {shown[run.manifest['chapter']]} and {run.manifest['run_key']}")
    for run in runs:
        for chapter, ref in run.manifest.get("inputs", {}).items():
            if chapter in shown and shown[chapter] != ref["run_key"]:
                raise RunError(f"{run.manifest['chapter']} was computed from {chapter} run {ref['run_key']}, "
                               f"but the book shows {chapter} run {shown[chapter]}")


def used_runs() -> set[Path]:
    """The run directories the last built book shows (never removed by ``arithlens runs clean``)."""
    listing = book_dir() / "_build" / "runs.json"
    if not listing.is_file():
        return set()
    return {Path(p).resolve() for p in json.loads(listing.read_text())}


def build_book(runs: list[RunResult], partial: bool = False) -> Path:
    """Stage ``runs``, bundle the chart JS and build.

    A full build needs a run for every chapter in ``book/_toc.yml``; ``partial`` builds only the
    chapters given (the table of contents is filtered to them).
    """
    have = {r.manifest["chapter"] for r in runs}
    missing = [c for c in toc_chapters() if c not in have]
    if missing and not partial:
        raise RunError(f"no finished run for chapter(s) {', '.join(missing)} listed in book/_toc.yml")
    models = {r.manifest["model"] for r in runs}
    if len(models) > 1:
        raise RunError(f"runs mix models {sorted(models)}; a book is built for one model")
    check_consistent(runs)
    stage_chapters(runs)
    stage_exercises()
    write_vega_bundle()
    (book_dir() / "_build").mkdir(exist_ok=True)
    (book_dir() / "_build" / "runs.json").write_text(json.dumps([str(r.path) for r in runs], indent=2))
    return build_html(partial_toc(sorted(have)) if partial and missing else None)

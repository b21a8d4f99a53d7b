"""Build the Jupyter Book (v1, offline) from finished runs — never re-executing a notebook.

Publishing wing. :func:`stage_chapters` copies each run's executed notebook into ``book/chapters/``,
hiding the ``parameters`` and papermill ``injected-parameters`` cells (the chapter's own config cell
shows the run configuration as a table instead). A book of several models shows the first model's
chapters there and each further model's under ``book/models/<model>/``, in a table-of-contents part of
its own (generated, :func:`book_toc`), every page opening with a note naming its model and linking the
same chapter on the others; the first page's verdict table is rendered from the "Across models"
chapter's saved ``verdicts`` table (:func:`write_verdicts`), the computation that chapter shows.
:func:`write_vega_bundle` writes one copy of the
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
from arithlens.paths import project_root
from arithlens.runner.chapters import RunError, is_across
from arithlens.runner.runs import model_dirname

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


def page(model: str, chapter: str, primary: str) -> str:
    """A chapter page's path in the book, from the book's root: ``chapters/01_heads`` for the first
    model, ``models/<model>/01_heads`` for the others."""
    return f"chapters/{chapter}" if model == primary else f"models/{model_dirname(model)}/{chapter}"


def _relative(target: str, start: str) -> str:
    return os.path.relpath(target, os.path.dirname(start) or ".")


def stage_chapters(runs: list[RunResult], primary: str | None = None, models: list[str] = ()) -> list[Path]:
    """Copy executed notebooks into ``book/chapters`` (``primary``'s runs) and ``book/models/<model>``
    (the others), with the parameter cells hidden. With several ``models`` each page opens with a
    note naming its model and linking the same chapter on the others."""
    primary = primary or (runs[0].manifest["model"] if runs else "")
    for folder in [book_dir() / "chapters", *(book_dir() / "models").glob("*")]:
        for old in folder.glob("*.ipynb") if folder.is_dir() else ():
            old.unlink()
    have = {(r.manifest["model"], r.manifest["chapter"]) for r in runs}
    written = []
    for run in runs:
        model, chapter = run.manifest["model"], run.manifest["chapter"]
        nb = nbformat.read(run.notebook, as_version=4)
        for cell in nb.cells:
            tags = set(cell.metadata.get("tags", []))
            if tags & HIDDEN_TAGS:
                cell.metadata["tags"] = sorted(tags | {"remove-cell"})
        here = page(model, chapter, primary)
        others = [m for m in models if m != model and (m, chapter) in have]
        if others:
            links = " · ".join(f"[{m}]({_relative(page(m, chapter, primary), here)}.ipynb)" for m in others)
            _note_under_title(nb, f":::{{note}}\nThis page shows **{model}**. The same chapter on {links}.\n:::")
        nb.metadata["arithlens"] = {"run": str(run.path), "run_key": run.manifest["run_key"], "model": model}
        path = book_dir() / f"{here}.ipynb"
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, path)
        written.append(path)
    return written


def _note_under_title(nb, note: str) -> None:
    """Put ``note`` right under the notebook's ``# title`` (or first, when it has none)."""
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith("# "):
            title, _, rest = cell.source.lstrip().partition("\n")
            cell.source = f"{title}\n\n{note}\n{rest}"
            return
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(note))


def book_toc(runs: list[RunResult], primary: str) -> Path:
    """``book/_toc.yml`` plus one part per further model listing its chapters (written to
    ``book/_build/_toc.generated.yml``); parts of ``_toc.yml`` keep only chapters that have a run."""
    toc = yaml.safe_load((book_dir() / "_toc.yml").read_text())
    have = {(r.manifest["model"], r.manifest["chapter"]) for r in runs}
    for part in toc.get("parts", []):
        part["chapters"] = [e for e in part.get("chapters", []) if not e.get("file", "").startswith("chapters/")
                            or (primary, e["file"].removeprefix("chapters/")) in have]
    toc["parts"] = [p for p in toc.get("parts", []) if p["chapters"]]
    extra = [m for m in dict.fromkeys(r.manifest["model"] for r in runs) if m != primary]
    # after the last part of chapters (the paper's and "Beyond the paper"), before the exercises
    after = 1 + max((i for i, p in enumerate(toc["parts"]) if any(e.get("file", "").startswith("chapters/")
                                                                  for e in p["chapters"])), default=-1)
    for i, model in enumerate(extra):
        chapters = [c for c in toc_chapters() if (model, c) in have]
        toc["parts"].insert(after + i, {"caption": f"Chapters on {model}",
                                    "chapters": [{"file": page(model, c, primary)} for c in chapters]})
    path = book_dir() / "_build" / "_toc.generated.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(toc, sort_keys=False, allow_unicode=True))
    return path


def write_verdicts(runs: list[RunResult], primary: str) -> Path:
    """The first page's verdict table (``book/_generated/verdicts.md``, included by ``intro.md``):
    claims × models from the "Across models" run's saved ``verdicts`` table, each cell linking to the
    page of the chapter that measured it; a line saying why when the book has no such run."""
    from arithlens.claims.rules import CLAIMS, PAPER_CLAIMS, rules_markdown

    across = [r for r in runs if is_across(r.manifest["chapter"]) and r.manifest["model"] == primary]
    path = book_dir() / "_generated" / "verdicts.md"
    path.parent.mkdir(exist_ok=True)
    if not across:
        path.write_text("*No run of the “Across models” chapter is in this book, so no verdicts are shown.*\n")
        return path
    table = across[0].table("verdicts")
    models = list(dict.fromkeys(table["model"]))
    chapter = across[0].manifest["chapter"]
    lines = [f"| claim | {' | '.join(models)} |", "|---|" + "---|" * len(models)]
    for claim, rows in table.groupby("claim", sort=False):
        cells = {r.model: f"[**{r.verdict}**]({page(r.model, r.chapter, primary)}.ipynb) — {r.numbers}"
                 for r in rows.itertuples()}
        statement = rows["statement"].iloc[0]
        lines.append(f"| **{claim}** {statement} | " + " | ".join(cells.get(m, "—") for m in models) + " |")
    rules = rules_markdown(table["claim"])
    robust = [c for c in dict.fromkeys(table["claim"]) if c not in PAPER_CLAIMS]
    by_chapter: dict[str, list[str]] = {}
    for c in robust:
        by_chapter.setdefault(CLAIMS[c][1], []).append(c)
    harder = (f" Rows {', '.join(robust)} are not the paper's: they are harder tests of its claims, from "
              + " and ".join(f"[chapter {int(ch[:2])}]({page(primary, ch, primary)}.ipynb) ({', '.join(cs)})"
                             for ch, cs in by_chapter.items()) + "." if robust else "")
    checks = c5_check_line(across[0].table("transfer"), models)
    path.write_text("\n".join(lines) + f"\n\nComputed by the [Across models](chapters/{chapter}.ipynb) chapter "
                    f"(run `{across[0].key}`) from the runs it names. Each cell: the verdict (linking to the chapter "
                    "that measured it) and the numbers that decided it." + harder + checks + "\n\n"
                    f":::{{dropdown}} The rules\n{rules}\n:::\n")
    return path


def c5_check_line(transfer, models: list[str]) -> str:
    """A sentence for the first page: C5's selectivity under chapter 3's check (resample ablation) beside
    the rule's (each suite's own mean), per model that ran both; ``""`` when none did. ``transfer`` is
    the "Across models" run's ``transfer`` table (:func:`arithlens.claims.across.transfer_summary`)."""
    from arithlens.claims.across import ABLATIONS
    from arithlens.claims.intervals import OWN_MEAN

    if transfer is None or not len(transfer) or "ablation" not in transfer:
        return ""
    rows = transfer[transfer["quantity"] == "selectivity"].set_index(["model", "ablation"])
    rule, check = (ABLATIONS[OWN_MEAN], next(v for k, v in ABLATIONS.items() if k != OWN_MEAN))
    fmt = lambda r: f"{r['value']:+.0%} [{r['low']:+.0%}, {r['high']:+.0%}]"
    parts = [f"{m}: {fmt(rows.loc[(m, check)])} (own mean {fmt(rows.loc[(m, rule)])})"
             for m in models if (m, check) in rows.index and (m, rule) in rows.index]
    return (" **A check beside C5's rule:** with resample ablation instead of each suite's own mean, the "
            "selectivity reads " + "; ".join(parts) + " — where the two disagree, whether the key heads look "
            "math-specific depends on the ablation (see the Across models chapter).") if parts else ""


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
    """Refuse a book whose pages disagree: one run per chapter and model, and every input a run was
    keyed on (``CHAPTER``, or ``MODEL/CHAPTER`` for an across-models chapter) is the very run the book
    shows for that page, where the book shows it."""
    shown: dict[tuple[str, str], str] = {}
    for run in runs:
        page_id = (run.manifest["model"], run.manifest["chapter"])
        if shown.setdefault(page_id, run.manifest["run_key"]) != run.manifest["run_key"]:
            raise RunError(f"two runs of {page_id[1]} on {page_id[0]} for one book: {shown[page_id]} and "
                           f"{run.manifest['run_key']}")
    for run in runs:
        for name, ref in run.manifest.get("inputs", {}).items():
            model, _, chapter = name.rpartition("/")
            page_id = (model or run.manifest["model"], chapter)
            if page_id in shown and shown[page_id] != ref["run_key"]:
                raise RunError(f"{run.manifest['chapter']} was computed from {name} run {ref['run_key']}, "
                               f"but the book shows {chapter} run {shown[page_id]}")


def used_runs() -> set[Path]:
    """The run directories the last built book shows (never removed by ``arithlens runs clean``)."""
    listing = book_dir() / "_build" / "runs.json"
    if not listing.is_file():
        return set()
    return {Path(p).resolve() for p in json.loads(listing.read_text())}


def build_book(runs: list[RunResult], partial: bool = False, primary: str | None = None) -> Path:
    """Stage ``runs``, bundle the chart JS and build.

    ``primary`` (default: the first run's model) is the model whose chapters form the main part; runs
    of other models get a part each. A full build needs a run of ``primary`` for every chapter in
    ``book/_toc.yml``; ``partial`` builds only the chapters given.
    """
    primary = primary or (runs[0].manifest["model"] if runs else "")
    have = {r.manifest["chapter"] for r in runs if r.manifest["model"] == primary}
    missing = [c for c in toc_chapters() if c not in have]
    if missing and not partial:
        raise RunError(f"no finished run for chapter(s) {', '.join(missing)} listed in book/_toc.yml")
    check_consistent(runs)
    models = list(dict.fromkeys([primary, *(r.manifest["model"] for r in runs)]))
    stage_chapters(runs, primary, models)
    stage_exercises()
    write_vega_bundle()
    write_verdicts(runs, primary)
    (book_dir() / "_build").mkdir(exist_ok=True)
    (book_dir() / "_build" / "runs.json").write_text(json.dumps([str(r.path) for r in runs], indent=2))
    return build_html(book_toc(runs, primary))

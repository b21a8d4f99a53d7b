"""The class's gradebook: one CSV row per student and exercise, a column per check.

Publishing wing. ``arithlens classroom grade`` writes ``gradebook.csv`` beside the per-notebook JSON
reports (rewritten after each notebook, so an interrupted run keeps what it graded). Columns:
``student``, ``exercise``, ``status``, ``score``, ``max_score``, ``message``, ``notebook``, then for each
check of the exercises graded (in the exercises' order, then the checks' order)
``<exercise>/<check>`` (its points) and ``<exercise>/<check> reason``; a row leaves the other
exercises' columns empty. Rows are sorted by student, then exercise. The csv module writes it.

Who the student is: the submission's folder when the file is named after the exercise (one folder
per student: ``alice/02_direct_effect.ipynb``), else the file's own name (``alice_02.ipynb``) — see
:func:`student_name`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from arithlens.classroom import EXERCISE_IDS, ClassroomError

GRADEBOOK = "gradebook.csv"
FIXED = ("student", "exercise", "status", "score", "max_score", "message", "notebook")


def student_name(path: Path) -> str:
    """Who handed ``path`` in: its folder's name when the file is named after the exercise
    (``alice/02_direct_effect.ipynb``), else the file's stem (``alice_02.ipynb``, ``alice.ipynb``)."""
    named_after_exercise = any(path.stem.startswith(e) for e in EXERCISE_IDS)
    return path.resolve().parent.name if named_after_exercise else path.stem


def report_names(paths: Sequence[Path]) -> list[str]:
    """The file name each submission's report gets: its stem, prefixed with its folder where two
    submissions share a stem. A one-line :class:`ClassroomError` where that is still ambiguous (the same
    notebook given twice, or two folders of one name)."""
    resolved = [p.resolve() for p in paths]
    twice = next((p for i, p in enumerate(resolved) if p in resolved[:i]), None)
    if twice is not None:
        raise ClassroomError(f"{twice} is given twice")
    stems = [p.stem for p in paths]
    names = [p.stem if stems.count(p.stem) == 1 else f"{r.parent.name}-{p.stem}" for p, r in zip(paths, resolved)]
    clash = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if clash is not None:
        first, second = [paths[i] for i, n in enumerate(names) if n == clash][:2]
        raise ClassroomError(f"{first} and {second} would share the report {clash}.json: rename a folder")
    return names


def _columns(reports: Sequence) -> list[str]:
    present = {r.exercise for r in reports}
    cols = list(FIXED)
    for exercise in (e for e in EXERCISE_IDS if e in present):
        names = next(([c["name"] for c in r.checks] for r in reports if r.exercise == exercise), [])
        for name in names:
            cols += [f"{exercise}/{name}", f"{exercise}/{name} reason"]
    return cols


def gradebook_rows(reports: Sequence) -> tuple[list[str], list[dict]]:
    """The CSV's header and rows for grade reports (:class:`arithlens.classroom.grade.GradeReport`)."""
    order = {e: i for i, e in enumerate(EXERCISE_IDS)}
    rows = []
    for r in sorted(reports, key=lambda r: (r.student or "", order.get(r.exercise, len(order)), r.notebook)):
        row = {"student": r.student or "", "exercise": r.exercise or "", "status": r.status, "score": r.score,
               "max_score": r.max_score, "message": r.message, "notebook": r.notebook}
        for c in r.checks:
            row[f"{r.exercise}/{c['name']}"] = c["points"]
            row[f"{r.exercise}/{c['name']} reason"] = c["reason"]
        rows.append(row)
    return _columns(reports), rows


def write_gradebook(reports: Sequence, out_dir: Path) -> Path:
    """Write ``<out_dir>/gradebook.csv`` for ``reports``; return its path."""
    header, rows = gradebook_rows(reports)
    path = Path(out_dir) / GRADEBOOK
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)  # a gradebook open in another program is never half-written
    return path

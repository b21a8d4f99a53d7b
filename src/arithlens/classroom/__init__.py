"""The classroom: exercises with autograded checks, built from the same library as the book.

Publishing wing. Instructor notebooks live in ``exercises/`` (task text, solution cells tagged
``solution``, check cells tagged ``check``). :mod:`~arithlens.classroom.build` turns them into student
notebooks (each solution replaced by a stub that raises ``NotImplementedError`` with a hint) and into
the book's copies (solutions behind a toggle); :mod:`~arithlens.classroom.grade` executes a submitted
notebook on a copy with papermill and runs the checks; :mod:`~arithlens.classroom.checks` holds the
checks themselves. :mod:`~arithlens.classroom.guard` keeps each exercise's reference out of the
student's functions' reach while they run, :mod:`~arithlens.classroom.static` looks for it in the
submitted code, and :mod:`~arithlens.classroom.gradebook` writes the class's CSV. Only the checks
(and the guard, for them) import the science wing — they *are* the library implementation the
student's functions are compared against — and they run inside the graded notebook's kernel.
"""

from __future__ import annotations

import os
from pathlib import Path

from arithlens.paths import project_root

#: Cell tags: a solution cell becomes a stub for students; a check cell is the student's own feedback
#: (the grader drops it and runs its own copy of the checks).
SOLUTION_TAG = "solution"
CHECK_TAG = "check"
#: The exercises the checks know (``checks/ex<id>.py``), in order.
EXERCISE_IDS = ("01_prompts", "02_direct_effect", "03_knockout", "04_logit_lens", "05_one_head_sft",
                "06_attribution_patching")


class ClassroomError(RuntimeError):
    """Bad classroom input (a missing notebook, a malformed exercise); the message is one line."""


def exercises_dir() -> Path:
    """The instructor notebooks (``$ARITHLENS_EXERCISES``, default ``<checkout>/exercises``)."""

    return Path(os.environ.get("ARITHLENS_EXERCISES", project_root() / "exercises")).resolve()


def exercise_notebooks(folder: Path | None = None) -> dict[str, Path]:
    """Exercise id (notebook stem, e.g. ``01_prompts``) → instructor notebook, in order."""
    folder = folder or exercises_dir()
    found = {p.stem: p for p in sorted(folder.glob("[0-9][0-9]_*.ipynb"))}
    if not found:
        raise ClassroomError(f"no exercise notebooks (NN_name.ipynb) in {folder}")
    return found

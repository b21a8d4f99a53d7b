"""Grade a submitted exercise notebook: execute a copy with papermill, run the checks, report.

Publishing wing. The submitted file is read once and never written: grading works on a copy in a
temporary folder, from which the notebook's own check cells (tag ``check``, which a student could
have edited) are dropped and one grading cell is appended. That cell imports
:mod:`arithlens.classroom.checks` inside the kernel and runs every check of the exercise against the
functions the notebook defined, writing the results as JSON. Student cells that raise do not stop
the run (papermill's ``allow_errors``), so each check is scored on its own; a notebook that runs past
its time limit or whose kernel dies gets a report that says so, with every check at zero.

While the checks run, the exercise's references are out of the student's functions' reach
(:mod:`arithlens.classroom.guard`); and before the report is written, the grader looks at the
submitted code itself (:mod:`arithlens.classroom.static`): a check whose functions' code reaches a
reference gets no point, and every check lists what was found (``static``).

The kernel runs on the CPU (``CUDA_VISIBLE_DEVICES`` is emptied for it), with one thread unless
asked otherwise (see :func:`_cpu_only`). papermill and nbclient execute;
written by hand: the copy, the grading cell and the report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

from arithlens.classroom import CHECK_TAG, EXERCISE_IDS as KNOWN, ClassroomError
from arithlens.classroom.static import apply_static, exercise_facts, static_findings

GRADER_TAG = "arithlens-grader"
DEFAULT_TIMEOUT = 300  # seconds for the student's cells; the exercises take well under 2 minutes
CHECKS_TIMEOUT = 300  # seconds for the grading cell (each check has its own limit inside)


@dataclass
class GradeReport:
    """What ``arithlens classroom grade`` prints and writes as JSON for one notebook."""

    notebook: str
    sha256: str
    exercise: str | None
    status: str  # graded | timeout | crashed | not-an-exercise | unreadable
    student: str | None = None
    message: str = ""
    score: int = 0
    max_score: int = 0
    checks: list[dict] = field(default_factory=list)
    cell_errors: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    timeout_s: int = DEFAULT_TIMEOUT
    executed_notebook: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _one_line(text: object, limit: int = 200) -> str:
    """``text`` (a string or an exception) on one line of at most ``limit`` characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text))  # ANSI colours from IPython tracebacks
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def exercise_of(nb, path: Path) -> str | None:
    """The exercise a notebook is for: its metadata, else a file name starting with a known id."""
    meta = nb.metadata.get("arithlens", {}).get("exercise")
    if meta in KNOWN:
        return meta
    return next((k for k in KNOWN if path.stem.startswith(k)), None)


def grading_copy(nb, exercise: str, results: Path) -> nbformat.NotebookNode:
    """The notebook to execute: check cells dropped, outputs cleared, the grading cell appended."""
    work = nbformat.from_dict(json.loads(json.dumps(nb)))
    for number, cell in enumerate(work.cells, 1):  # reports count cells as the student sees them
        cell.metadata["arithlens_cell"] = number
    work.cells = [c for c in work.cells if CHECK_TAG not in c.get("metadata", {}).get("tags", [])]
    for cell in work.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    source = ("# Appended by `arithlens classroom grade`: the notebook's own check cells were removed.\n"
              "import arithlens.classroom.checks as _arithlens_checks\n"
              f"_arithlens_checks.grade({exercise!r}, globals(), {str(results)!r})")
    cell = nbformat.v4.new_code_cell(source, id="arithlens-grader")
    cell.metadata["tags"] = [GRADER_TAG]
    work.cells.append(cell)
    work.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    return work


@contextlib.contextmanager
def _cpu_only(threads: int):
    """The kernel inherits this process's environment: no GPU, no progress bars, ``threads`` CPU threads.

    One thread by default: on a machine that is busy with anything else (another grading, a chapter
    run), torch's two-thread OpenMP kernels on two cores spin against each other and a SmolLM2 forward
    pass measured 20× slower than with one thread; on an idle machine one thread costs well under 2×.
    """
    env = {"CUDA_VISIBLE_DEVICES": "", "ARITHLENS_QUIET": "1", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cell_errors(executed: Path) -> tuple[list[dict], dict | None]:
    """Student cells that raised (number in the submitted notebook, first line of code, error), and
    the last cell that started (the one running when a run was cut short)."""
    if not executed.is_file():
        return [], None
    nb = nbformat.read(executed, as_version=4)
    errors, last = [], None
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        grader = GRADER_TAG in cell.metadata.get("tags", [])
        first = next((ln for ln in cell.source.splitlines() if ln.strip() and not ln.startswith("#")), "")
        number = cell.metadata.get("arithlens_cell", i + 1)
        if cell.metadata.get("papermill", {}).get("start_time"):
            last = {"cell": number, "code": "the grading cell" if grader else _one_line(first, 80), "grader": grader}
        for out in [] if grader else cell.get("outputs", []):
            if out.get("output_type") == "error":
                errors.append({"cell": number, "code": _one_line(first, 80),
                               "error": _one_line(f"{out.get('ename')}: {out.get('evalue')}", 120)})
    return errors, last


@contextlib.contextmanager
def _stderr_to(log: Path):
    """Send this process's stderr (file descriptor 2, which the kernel inherits) to ``log``: the
    kernel's start-up warnings and whatever the student's code prints there stay out of the report."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with log.open("wb") as fh:
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def submitted_code(nb) -> list[tuple[int, str]]:
    """(cell number as the student sees it, source) of every code cell but the check cells."""
    return [(number, cell.source) for number, cell in enumerate(nb.cells, 1)
            if cell.cell_type == "code" and CHECK_TAG not in cell.get("metadata", {}).get("tags", [])]


def grade_notebook(path: str | Path, out_dir: str | Path, timeout: int = DEFAULT_TIMEOUT,
                   checks_timeout: int = CHECKS_TIMEOUT, name: str | None = None, threads: int = 1,
                   student: str | None = None) -> GradeReport:
    """Grade one notebook; return the report and write it to ``<out_dir>/<name>.json``, with the
    executed copy (``<name>.executed.ipynb``) and the kernel's stderr (``<name>.kernel.log``) beside it.
    ``name`` defaults to the notebook's file stem; ``student`` is recorded in the report (the gradebook's
    first column).

    Raises :class:`ClassroomError` only when ``path`` is not a file; everything wrong *inside* a
    notebook (unreadable, not an exercise, a crash, a timeout) is a report.
    """
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    path = Path(path)
    if not path.is_file():
        raise ClassroomError(f"no such notebook: {path}")
    data = path.read_bytes()  # the only access to the submission; it is never written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or path.stem
    report = GradeReport(str(path), hashlib.sha256(data).hexdigest(), None, "graded", student=student, timeout_s=timeout)
    try:
        nb = nbformat.reads(data.decode("utf-8"), as_version=4)
    except Exception as exc:
        report.status, report.message = "unreadable", f"not a readable notebook: {_one_line(exc, 120)}"
        return _finish(report, out_dir, name)
    report.exercise = exercise_of(nb, path)
    if report.exercise is None:
        report.status = "not-an-exercise"
        report.message = f"not an arithlens exercise (no metadata.arithlens.exercise and the name matches none of {', '.join(KNOWN)})"
        return _finish(report, out_dir, name)

    executed = out_dir / f"{name}.executed.ipynb"
    executed.unlink(missing_ok=True)  # never read an earlier grading's copy as this one's
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="arithlens-grade-") as tmp:
        results = Path(tmp) / "results.json"
        submission = Path(tmp) / path.name
        nbformat.write(grading_copy(nb, report.exercise, results), submission)
        deadline = time.monotonic() + timeout

        def cell_timeout(cell) -> int:
            if GRADER_TAG in cell.get("metadata", {}).get("tags", []):
                return checks_timeout
            return max(1, int(deadline - time.monotonic()))

        failure = None
        with _cpu_only(threads), _stderr_to(out_dir / f"{name}.kernel.log"):
            try:
                papermill.execute_notebook(str(submission), str(executed), kernel_name="python3", progress_bar=False,
                                           cwd=tmp, allow_errors=True, timeout_func=cell_timeout, start_timeout=120)
            except PapermillExecutionError:
                pass  # student cells raised (allowed); they are listed below and the checks still ran
            except CellTimeoutError:
                failure = "timeout"
            except DeadKernelError:
                failure = "crashed"
            except Exception as exc:  # the kernel could not start, or papermill failed otherwise
                failure = f"crashed: {type(exc).__name__}: {_one_line(exc, 160)}"
        report.seconds = round(time.monotonic() - started, 1)
        report.cell_errors, running = _cell_errors(executed)
        where = f" while running cell {running['cell']} ({running['code']})" if running else ""
        if failure == "timeout":
            report.status = "timeout"
            report.message = (f"the checks ran past {checks_timeout} s; nothing was graded" if running and running["grader"]
                              else f"the notebook ran past its {timeout} s limit{where}; nothing was graded")
        elif failure is not None:
            report.status = "crashed"
            report.message = (f"the notebook's kernel died{where}; nothing was graded" if failure == "crashed"
                              else f"the notebook could not be executed ({failure.removeprefix('crashed: ')})")
        elif not results.is_file():
            report.status = "crashed"
            report.message = "the grading cell wrote no results (the kernel state may be broken); nothing was graded"
        else:
            report.checks = json.loads(results.read_text())
        if not report.checks:
            report.checks = [{"name": check, "passed": False, "points": 0, "max_points": 1, "reason": "not graded (see above)"}
                             for check in check_names(report.exercise)]
        report.checks = apply_static(report.exercise, report.checks, static_findings(report.exercise, submitted_code(nb)))
    report.executed_notebook = str(executed) if executed.is_file() else None
    return _finish(report, out_dir, name)


def _finish(report: GradeReport, out_dir: Path, name: str) -> GradeReport:
    report.score = sum(c["points"] for c in report.checks)
    report.max_score = sum(c["max_points"] for c in report.checks)
    (out_dir / f"{name}.json").write_text(report.to_json() + "\n")
    return report


def check_names(exercise: str) -> list[str]:
    """The exercise's check names, read from its module's ``CHECKS = [...]`` with ``ast`` (no import:
    the checks load the science wing, which the grader itself never needs)."""
    return list(exercise_facts(exercise).checks)


def format_report(report: GradeReport, report_path: Path | None = None) -> str:
    """The per-check lines ``arithlens classroom grade`` prints."""
    name = Path(report.notebook).name
    who = f"{report.student}: " if report.student and report.student != Path(name).stem else ""
    head = f"{who}{name} — exercise {report.exercise or '?'}: {report.score}/{report.max_score}"
    lines = [head + (f"  ({report.seconds} s)" if report.seconds else "")]
    if report.status != "graded":
        lines.append(f"  {report.status.upper()}: {report.message}")
    for c in report.checks:
        mark = "PASS" if c["passed"] else "FAIL"
        lines.append(f"  [{mark} {c['points']}/{c['max_points']}] {c['name']}: {c['reason']}")
    static = sorted({f for c in report.checks for f in c.get("static", [])})
    for finding in static[:3]:
        lines.append(f"  static look: {finding}")
    for e in report.cell_errors[:5]:
        lines.append(f"  note: cell {e['cell']} ({e['code']}) raised {e['error']}")
    if len(report.cell_errors) > 5:
        lines.append(f"  note: {len(report.cell_errors) - 5} more cells raised errors")
    if report_path is not None:
        lines.append(f"  report: {report_path}")
    return "\n".join(lines)

"""The checks: each one takes the student's function(s) as arguments (the ARENA pattern).

A check is a plain function in ``ex<exercise>.py`` whose parameters are named after the student
functions it needs, e.g. ``def direct_effect_matches_library(direct_effect): ...``. It calls them on
fresh inputs (seeds and cases the notebook never shows), compares with the library's own
implementation computed at the same moment, and returns a short reason on success or fails with an
``AssertionError`` whose message is the reason. So no expected number is stored anywhere, and a
student cannot pass by printing one.

This module runs inside the exercise notebook's kernel: :func:`check` prints feedback in a check
cell; :func:`grade` is what the grader appends, and writes the results as JSON. Each check has its
own time limit; whatever a student function raises is reported in one line, never as a traceback.
While the checks run, the exercise's ``REFERENCES`` (the library functions it asks the student to
write) are out of reach of the student's functions (:mod:`arithlens.classroom.guard`): a check whose
student function called one fails, whatever the function did with the error.
"""

from __future__ import annotations

import importlib
import inspect
import json
import signal
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from arithlens.classroom import EXERCISE_IDS
from arithlens.classroom.guard import ReferenceBlocked, blocked_count, blocked_since, guarded_references, student_running

CHECK_SECONDS = 90  # per check; every check takes a few seconds with a correct solution


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: one point or none, and why."""

    exercise: str
    name: str
    what: str
    passed: bool
    points: int
    max_points: int
    reason: str
    seconds: float


class NotImplementedYet(Exception):
    def __init__(self, name: str, message: str):
        super().__init__(name, message)
        self.name, self.message = name, message


class StudentError(Exception):
    def __init__(self, name: str, error: BaseException):
        super().__init__(name, error)
        self.name, self.error = name, error


class CheckTimeout(BaseException):  # BaseException: a student's `except Exception` cannot swallow it
    pass


def _one_line(text, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def exercise_module(exercise: str):
    """The module holding an exercise's ``CHECKS`` list."""
    if exercise not in EXERCISE_IDS:
        raise ValueError(f"unknown exercise {exercise!r}: choose from {', '.join(EXERCISE_IDS)}")
    return importlib.import_module(f"arithlens.classroom.checks.ex{exercise}")


def needs(check_fn) -> tuple[str, ...]:
    """The student functions a check takes: its parameter names."""
    return tuple(inspect.signature(check_fn).parameters)


def _as_student(name: str, fn):
    """Call ``fn`` with the references guarded, turning what it raises into an error that names the
    student's function (a blocked reference, a BaseException, passes through)."""
    def call(*args, **kwargs):
        try:
            with student_running(name):
                return fn(*args, **kwargs)
        except NotImplementedError as exc:
            raise NotImplementedYet(name, str(exc)) from None
        except Exception as exc:
            raise StudentError(name, exc) from None
    call.__name__ = name
    return call


@contextmanager
def _time_limit(seconds: float):
    """Raise :class:`CheckTimeout` after ``seconds`` (SIGALRM; the kernel runs cells in its main thread)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise CheckTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_check(exercise: str, check_fn, namespace: dict, seconds: float = CHECK_SECONDS) -> CheckResult:
    """Run one check with the student's functions looked up by name in ``namespace``."""
    what = (inspect.getdoc(check_fn) or check_fn.__name__).splitlines()[0]
    started = time.perf_counter()
    missing = [n for n in needs(check_fn) if not callable(namespace.get(n))]
    passed = False
    if missing:
        reason = f"`{missing[0]}` is not defined: run its cell, and keep the name the task gives"
    else:
        args = {n: _as_student(n, namespace[n]) for n in needs(check_fn)}
        blocked = blocked_count()
        try:
            with _time_limit(seconds), torch.random.fork_rng(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # library warnings about hooks are noise in a check's feedback
                reason = check_fn(**args)  # fork_rng: a student's global seeding stays theirs
            passed = True
        except AssertionError as exc:
            reason = _one_line(exc) or "wrong result"
        except NotImplementedYet as exc:
            reason = f"`{exc.name}` is not implemented yet (it still raises NotImplementedError)"
        except StudentError as exc:
            reason = f"`{exc.name}` raised {type(exc.error).__name__}: {_one_line(exc.error, 140)}"
        except ReferenceBlocked as exc:
            reason = str(exc)
        except CheckTimeout:
            reason = f"gave no result within {seconds:.0f} s"
        except Exception as exc:  # the result had a shape or type the comparison could not use
            reason = f"could not compare the result ({type(exc).__name__}: {_one_line(exc, 120)})"
        attempts = blocked_since(blocked)
        if attempts:  # also when the student's code caught the error and went on
            passed, reason = False, attempts[0]
    return CheckResult(exercise, check_fn.__name__, what, passed, int(passed), 1, str(reason),
                       round(time.perf_counter() - started, 2))


def run_checks(exercise: str, namespace: dict, only: set[str] | None = None, guard: bool = True,
               namespaces: tuple[dict, ...] = ()) -> list[CheckResult]:
    """Every check of ``exercise`` (or those needing only the functions in ``only``), with the
    exercise's references out of the student's reach (``guard=False``: within reach, for tests that
    show what a submission calling them would score unguarded). ``namespaces``: further namespaces of
    the student's, besides ``namespace``, whose names bound to a reference are guarded too."""
    module = exercise_module(exercise)
    checks = module.CHECKS
    if only is not None:
        checks = [c for c in checks if set(needs(c)) <= only]
    within = guarded_references(exercise, module.REFERENCES, (namespace, *namespaces)) if guard else nullcontext()
    with within:
        return [run_check(exercise, c, namespace) for c in checks]


def _print(results: list[CheckResult]) -> None:
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL'}  {r.name}: {r.reason}")
    print(f"{sum(r.points for r in results)}/{sum(r.max_points for r in results)} checks passed")


def check(*functions) -> None:
    """Feedback in a check cell: run the checks that need only ``functions`` (your functions).

    ``check(build_pair)`` runs every check of the exercise that ``build_pair`` belongs to and that
    needs nothing else.
    """
    names = {f.__name__ for f in functions}
    for exercise in EXERCISE_IDS:
        module = exercise_module(exercise)
        if names <= set(module.FUNCTIONS):
            student = tuple({id(f.__globals__): f.__globals__ for f in functions if hasattr(f, "__globals__")}.values())
            _print(run_checks(exercise, {f.__name__: f for f in functions}, only=names, namespaces=student))
            return
    raise ValueError(f"no exercise has the function(s) {sorted(names)}")


def grade(exercise: str, namespace: dict, results_path: str) -> None:
    """All checks of ``exercise`` against the functions in ``namespace``; results to ``results_path``."""
    results = run_checks(exercise, namespace)
    Path(results_path).write_text(json.dumps([asdict(r) for r in results], indent=2))
    _print(results)


# --- helpers the exercise checks share ---------------------------------------------------------

def tensor(value, shape: tuple, what: str) -> torch.Tensor:
    """``value`` as a float tensor of ``shape``, or an AssertionError saying what came back instead."""
    assert isinstance(value, torch.Tensor), f"{what} should be a torch.Tensor, got {type(value).__name__}"
    assert tuple(value.shape) == tuple(shape), f"{what} should have shape {tuple(shape)}, got {tuple(value.shape)}"
    return value.detach().float().cpu()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max()) if a.numel() else 0.0

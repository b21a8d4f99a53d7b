"""The reference is out of reach while the student's code runs (the checks' first line of defence).

Every exercise is checked against the library's own implementation, and the library is installed in
the student's kernel, so a student function that only calls that implementation would pass. Each
check module therefore declares ``REFERENCES``: the dotted names of the library functions the
exercise asks the student to write, or that would do the work for them. While the checks run,
:func:`guarded_references` puts a guard in place of each of them — in every loaded module that binds
it (``prompts.make_item``, and ``make_item`` in any module that imported it by name), in the
student's namespace (``from arithlens.tasks.prompts import make_item`` in the notebook binds the
name directly), and in the defaults and closures of the student's functions. A guard calls the
original, except while one of the student's functions is running (:func:`student_running`, which
:func:`arithlens.classroom.checks.run_check` wraps around every call it makes to the student): then it
raises :class:`ReferenceBlocked` with a message that says which function and why, and records the
attempt, so a check whose student function swallowed the error still fails. The checks' own calls to
the reference happen outside the student's calls and reach the original. On leaving, every name is
restored; a module that imported a guard in the meantime keeps one, which only delegates.

This is not a sandbox (see the README's classroom section): the student's code runs in the same
process and could undo any of this. It stops a submission from passing by calling the reference,
however the reference was imported; the grader's static look at the notebook
(:mod:`arithlens.classroom.static`) is the second line.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

#: The student's functions now running (innermost last), and the attempts blocked so far.
_RUNNING: list[str] = []
_BLOCKED: list[str] = []


class ReferenceBlocked(BaseException):
    """A student function called a reference. A BaseException, so ``except Exception`` (or the
    ``except ValueError`` of a wrapper around ``prompts.make_item``) in the student's code cannot
    turn it into a ``None`` that a check would accept."""


def exercise_label(exercise: str) -> str:
    """``01_prompts`` → ``exercise 1``."""
    return f"exercise {int(exercise[:2])}" if exercise[:2].isdigit() else f"exercise {exercise}"


def short_name(dotted: str) -> str:
    """``arithlens.tasks.prompts.make_item`` → ``prompts.make_item`` (how the notebooks call it)."""
    return ".".join(dotted.split(".")[-2:])


def resolve(dotted: str):
    """The function a dotted reference names (its module imported if need be); ValueError if none."""
    module_name, _, attr = dotted.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reference {dotted!r} does not resolve: {exc}") from None
    if not isinstance(obj, types.FunctionType):
        raise ValueError(f"reference {dotted!r} is a {type(obj).__name__}, not a function: guard the functions it calls")
    return obj


@contextmanager
def student_running(name: str) -> Iterator[None]:
    """Mark the student's function ``name`` as running: guards raise until it returns."""
    _RUNNING.append(name)
    try:
        yield
    finally:
        _RUNNING.pop()


def blocked_count() -> int:
    """How many calls to a reference have been blocked so far (compare before and after a check)."""
    return len(_BLOCKED)


def blocked_since(count: int) -> list[str]:
    """The messages of the calls blocked after :func:`blocked_count` returned ``count``."""
    return _BLOCKED[count:]


def _guard(original, label: str, shown: str):
    def guarded(*args, **kwargs):
        if _RUNNING:
            message = f"{label} asks you to build this yourself: {shown} is unavailable while your {_RUNNING[-1]} runs"
            _BLOCKED.append(message)
            raise ReferenceBlocked(message)
        return original(*args, **kwargs)

    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):  # not __wrapped__: no way back to the original
        setattr(guarded, attr, getattr(original, attr, None))
    guarded.__arithlens_reference__ = shown
    return guarded


def _dicts(namespaces: Iterable[dict]) -> list[dict]:
    """Every loaded module's namespace, the given namespaces and the globals of the functions in them."""
    seen, out = set(), []

    def add(d) -> None:
        if isinstance(d, dict) and id(d) not in seen:
            seen.add(id(d))
            out.append(d)

    for module in list(sys.modules.values()):
        if isinstance(module, types.ModuleType):
            add(getattr(module, "__dict__", None))
    for ns in namespaces:
        add(ns)
        for value in list(ns.values()):
            if isinstance(value, types.FunctionType):
                add(value.__globals__)
    return out


def _functions(namespaces: Iterable[dict], skip: set[int]) -> list[types.FunctionType]:
    """The plain functions in the namespaces (the student's), by identity, except those in ``skip``
    (the references themselves) and guards."""
    seen, out = set(skip), []
    for ns in namespaces:
        for value in list(ns.values()):
            if (isinstance(value, types.FunctionType) and id(value) not in seen
                    and not hasattr(value, "__arithlens_reference__")):
                seen.add(id(value))
                out.append(value)
    return out


@contextmanager
def guarded_references(exercise: str, references: Iterable[str], namespaces: Iterable[dict] = ()) -> Iterator[None]:
    """Within the block, each of ``references`` is a guard wherever it is bound (see the module
    docstring); ``namespaces`` are the student's (the notebook's globals)."""
    namespaces = list(namespaces)
    label = exercise_label(exercise)
    guards = {}
    for dotted in references:
        original = resolve(dotted)
        guards[id(original)] = (original, _guard(original, label, short_name(dotted)))
    undo = []  # (restore function) in the order applied
    functions = _functions(namespaces, set(guards))  # before any name is rebound to a guard
    try:
        for d in _dicts(namespaces):
            hits = [(k, v) for k, v in list(d.items()) if id(v) in guards and guards[id(v)][0] is v]
            for key, original in hits:
                d[key] = guards[id(original)][1]
                undo.append(lambda d=d, key=key, original=original: d.__setitem__(key, original))
        for fn in functions:
            defaults = fn.__defaults__ or ()
            if any(id(v) in guards for v in defaults):
                fn.__defaults__ = tuple(guards[id(v)][1] if id(v) in guards else v for v in defaults)
                undo.append(lambda fn=fn, saved=defaults: setattr(fn, "__defaults__", saved))
            kwdefaults = fn.__kwdefaults__ or {}
            for key, value in list(kwdefaults.items()):
                if id(value) in guards:
                    kwdefaults[key] = guards[id(value)][1]
                    undo.append(lambda d=kwdefaults, key=key, value=value: d.__setitem__(key, value))
            for cell in fn.__closure__ or ():
                try:
                    value = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if id(value) in guards:
                    cell.cell_contents = guards[id(value)][1]
                    undo.append(lambda cell=cell, value=value: setattr(cell, "cell_contents", value))
        yield
    finally:
        for restore in reversed(undo):
            restore()

"""A static look at a submission: does the code of the student's functions reach a reference?

Publishing wing; the second line of defence after :mod:`arithlens.classroom.guard`, and it runs in
the grader, on the notebook as submitted (nothing the student's code does at run time can change it).
For each function the exercise asks for, it reads the function's last definition in the notebook's
code cells (check cells excluded) and everything that code reaches: the notebook's other functions
and classes it uses, and the top-level statements that assign or fill the notebook variables it reads
(a lookup table filled by ``prompts.make_item`` before grading is found this way). In that code it
looks for the exercise's ``REFERENCES``: a name or attribute that resolves to one through the
notebook's imports (``prompts.make_item``, ``from arithlens.tasks.prompts import make_item as mk``, a
``*`` import), an attribute or a string constant that is a reference's own name (``getattr(prompts,
"make_item")``), and an import of one. Demo cells that call the library themselves are not reached
unless a student function reads what they compute.

The exercise's facts (``FUNCTIONS``, ``REFERENCES``, each check's parameters) are read from its check
module with ``ast``, without importing it: the checks load the science wing, the grader never does.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from arithlens.classroom.guard import exercise_label, short_name

CHECKS_DIR = Path(__file__).parent / "checks"


@dataclass(frozen=True)
class ExerciseFacts:
    functions: tuple[str, ...]
    references: tuple[str, ...]
    checks: dict[str, tuple[str, ...]]  # check name → the student functions it takes, in CHECKS order


def exercise_facts(exercise: str) -> ExerciseFacts:
    """``FUNCTIONS``, ``REFERENCES`` and the checks' parameters of ``checks/ex<exercise>.py``, read with ``ast``."""
    module = CHECKS_DIR / f"ex{exercise}.py"
    tree = ast.parse(module.read_text()) if module.is_file() else ast.Module(body=[], type_ignores=[])
    values, defs = {}, {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    values[target.id] = node.value
        elif isinstance(node, ast.FunctionDef):
            defs[node.name] = tuple(a.arg for a in node.args.args)
    literal = lambda name: tuple(ast.literal_eval(values[name])) if name in values else ()
    names = [e.id for e in getattr(values.get("CHECKS"), "elts", []) if isinstance(e, ast.Name)]
    return ExerciseFacts(literal("FUNCTIONS"), literal("REFERENCES"), {n: defs.get(n, ()) for n in names})


def _parse(source: str) -> ast.Module | None:
    """A cell's code, IPython's own syntax made plain Python with its line numbers kept: a cell magic's
    first line (``%%time``) dropped, line magics and shell escapes (``%pip …``, ``files = !ls``) made
    ``pass`` or ``None``. None if it still does not parse (then the kernel could not run it either)."""
    if source.lstrip().startswith("%%"):
        head, _, body = source.lstrip().partition("\n")
        source = "\n" * (source.count("\n") - body.count("\n") - 1) + "\n" + body
    try:
        return ast.parse(source)
    except SyntaxError:
        pass
    source = re.sub(r"(?m)^(\s*)[%!].*$", r"\1pass", source)
    source = re.sub(r"(?m)^(\s*[\w.]+\s*=\s*)[%!].*$", r"\1None", source)
    try:
        return ast.parse(source)
    except SyntaxError:
        return None


def _top_level(body: list[ast.stmt]):
    """The statements the notebook runs at top level, compound statements' bodies included (not
    function or class bodies)."""
    for stmt in body:
        yield stmt
        if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for field in ("body", "orelse", "finalbody"):
                yield from _top_level(getattr(stmt, field, None) or [])
            for handler in getattr(stmt, "handlers", None) or []:
                yield from _top_level(handler.body)


def _root(node: ast.AST) -> str | None:
    """The variable an expression such as ``table[k].rows`` starts from."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call, ast.Starred)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _writes(stmt: ast.stmt) -> set[str]:
    """Top-level variables a simple statement assigns or fills (``x = …``, ``x[k] = …``, ``x.update(…)``)."""
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, (ast.AugAssign, ast.AnnAssign)):
        targets = [stmt.target]
    elif isinstance(stmt, (ast.For, ast.AsyncFor)):
        targets = [stmt.target]
    elif isinstance(stmt, (ast.With, ast.AsyncWith)):
        targets = [item.optional_vars for item in stmt.items if item.optional_vars is not None]
    elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        targets = [stmt.value.func]
    else:
        return set()
    out = set()
    for target in targets:
        for node in ast.walk(target):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                out.add(node.id)
        if (root := _root(target)) is not None:
            out.add(root)
    return out


def _header(stmt: ast.stmt) -> ast.AST:
    """What a statement evaluates itself: a compound statement's header, not its body (walked on its own)."""
    if isinstance(stmt, (ast.For, ast.AsyncFor)):
        return ast.Tuple(elts=[stmt.target, stmt.iter], ctx=ast.Load())
    if isinstance(stmt, (ast.With, ast.AsyncWith)):
        return ast.Tuple(elts=[i.context_expr for i in stmt.items], ctx=ast.Load())
    return stmt


def _free_names(node: ast.AST) -> set[str]:
    """Names ``node`` reads that it does not bind itself (for a function: minus its parameters and locals)."""
    loads, stores, globals_ = set(), set(), set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            (loads if isinstance(sub.ctx, ast.Load) else stores).add(sub.id)
        elif isinstance(sub, ast.arg):
            stores.add(sub.arg)
        elif isinstance(sub, ast.Global):
            globals_.update(sub.names)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
        return (loads - stores) | globals_
    return loads | globals_


class _Notebook:
    """The code cells of a notebook: definitions, the statements that write each variable, imports."""

    def __init__(self, cells: list[tuple[int, str]], modules_with: dict[str, list[str]]):
        self.defs: dict[str, tuple[int, ast.AST]] = {}  # last definition wins, as when the notebook runs
        self.writers: dict[str, list[tuple[int, ast.AST]]] = {}
        self.aliases: dict[str, str] = {}  # local name → dotted name it was imported as
        for number, source in cells:
            tree = _parse(source)
            if tree is None:
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    for a in node.names:
                        self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    for a in node.names:
                        if a.name == "*":
                            self.aliases.update({n: f"{node.module}.{n}" for n in modules_with.get(node.module, [])})
                        else:
                            self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            for stmt in _top_level(tree.body):
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    self.defs[stmt.name] = (number, stmt)
                    for sub in ast.walk(stmt):  # a function that sets a global fills it
                        if isinstance(sub, ast.Global):
                            for name in sub.names:
                                self.writers.setdefault(name, []).append((number, stmt))
                else:
                    for name in _writes(stmt):
                        self.writers.setdefault(name, []).append((number, _header(stmt)))

    def dotted(self, node: ast.AST) -> str | None:
        """``P.make_item`` → ``arithlens.tasks.prompts.make_item`` when ``P`` was imported."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name) or node.id not in self.aliases:
            return None
        return ".".join([self.aliases[node.id], *reversed(parts)])


def _hits(nb: _Notebook, node: ast.AST, refs: set[str], by_attr: dict[str, str]) -> list[tuple[str, int]]:
    """(reference, line) for every way ``node`` names one of ``refs``."""
    out = []
    for sub in ast.walk(node):
        found = None
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
            found = nb.dotted(sub) if nb.dotted(sub) in refs else None
        elif isinstance(sub, ast.Attribute):
            dotted = nb.dotted(sub)
            found = dotted if dotted in refs else by_attr.get(sub.attr)
        elif isinstance(sub, ast.ImportFrom) and sub.module:
            found = next((f"{sub.module}.{a.name}" for a in sub.names if f"{sub.module}.{a.name}" in refs), None)
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            found = by_attr.get(sub.value)
        if found is not None:
            out.append((found, getattr(sub, "lineno", 0)))
    return out


def static_findings(exercise: str, cells: list[tuple[int, str]]) -> dict[str, list[str]]:
    """For each of the exercise's functions defined in ``cells`` ((cell number, source), check cells
    left out): the references its code reaches, as ``prompts.make_item (cell 4, line 6)``, first seen
    first. An empty list: none."""
    facts = exercise_facts(exercise)
    refs = set(facts.references)
    by_attr = {r.rpartition(".")[2]: r for r in facts.references}
    modules_with: dict[str, list[str]] = {}
    for r in facts.references:
        modules_with.setdefault(r.rpartition(".")[0], []).append(r.rpartition(".")[2])
    nb = _Notebook(cells, modules_with)
    out = {}
    for function in facts.functions:
        todo = ([nb.defs[function]] if function in nb.defs else []) + nb.writers.get(function, [])
        if not todo:
            continue
        seen, found = set(), {}
        while todo:
            number, node = todo.pop(0)
            if id(node) in seen:
                continue
            seen.add(id(node))
            for ref, line in _hits(nb, node, refs, by_attr):
                found.setdefault(ref, f"{short_name(ref)} (cell {number}, line {line})")
            for name in sorted(_free_names(node) - set(nb.aliases)):
                todo += [nb.defs[name]] if name in nb.defs else []
                todo += nb.writers.get(name, [])
        out[function] = list(found.values())
    return out


def static_reason(exercise: str, function: str, findings: list[str]) -> str:
    """The reason a check gives when the static look found a reference in ``function``'s code."""
    more = f" and {len(findings) - 1} more" if len(findings) > 1 else ""
    return (f"static look: your {function} reaches {findings[0]}{more}, which {exercise_label(exercise)} "
            "asks you to build yourself")


def apply_static(exercise: str, checks: list[dict], findings: dict[str, list[str]]) -> list[dict]:
    """Each check with its ``static`` findings (those of the functions it takes); a check that passed
    although its functions reach a reference gets no point, with :func:`static_reason` as its reason."""
    takes = exercise_facts(exercise).checks
    out = []
    for check in checks:
        check = dict(check)
        hits = [(fn, f) for fn in takes.get(check["name"], ()) for f in findings.get(fn, [])]
        check["static"] = [f"{fn}: {f}" for fn, f in hits]
        if hits and check.get("passed"):
            fn = hits[0][0]
            check.update(passed=False, points=0, reason=static_reason(exercise, fn, findings[fn]))
        out.append(check)
    return out

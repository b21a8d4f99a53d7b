"""The house: the package listing is the architecture, and imports only run downward.

Role packages, lowest first: the ground modules ``paths``, ``record`` and ``paper`` (they import
nothing of arithlens), ``core``, ``tasks``, ``analyses``, ``claims``, ``charts``, ``classroom``,
``runner``, and ``cli`` on top. A module may import its own package and any package below it; an
import that runs upward fails here, naming the file, the line and the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import arithlens

PACKAGE = Path(arithlens.__file__).parent
#: lowest first; the ground floor's modules import nothing of arithlens
FLOORS = ["paths", "record", "paper", "core", "tasks", "analyses", "claims", "charts", "classroom", "runner", "cli"]
GROUND = {"paths", "record", "paper"}


def _room(module: str) -> str:
    """The package (or ground module) a dotted module below ``arithlens`` belongs to."""
    return module.split(".")[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module below arithlens) for every arithlens import in ``path``, lazy ones included."""
    package = ".".join(path.parent.relative_to(PACKAGE).parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            elif node.module == "arithlens":
                base = ""
            elif (node.module or "").startswith("arithlens."):
                base = node.module[len("arithlens."):]
            else:
                continue
            found += [(node.lineno, f"{base}.{a.name}".strip(".")) for a in node.names] if not base else [(node.lineno, base)]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name[len("arithlens."):]) for a in node.names if a.name.startswith("arithlens.")]
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_module_lives_in_a_role_package_or_on_the_ground_floor():
    rooms = {_room(".".join(p.relative_to(PACKAGE).with_suffix("").parts)) for p in _modules()}
    assert rooms <= set(FLOORS), f"modules outside the house's rooms: {sorted(rooms - set(FLOORS))}"


def test_imports_only_run_downward():
    upward = []
    for path in _modules():
        here = _room(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for line, target in _imports(path):
            there = _room(target)
            if there not in FLOORS:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports arithlens.{target}, which is in no room")
            elif here in GROUND and there != here:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports arithlens.{target}: ground-floor modules import nothing of arithlens")
            elif FLOORS.index(there) > FLOORS.index(here) and there not in GROUND:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports arithlens.{target}: {here} may not import {there} (above it)")
    assert not upward, "\n".join(upward)


def test_the_import_walk_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule test can fail: a core module importing a claim is reported."""
    fake = tmp_path / "arithlens"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "bad.py").write_text("def f():\n    from arithlens.claims import verdicts\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert _imports(fake / "core" / "bad.py") == [(2, "claims")]
    try:
        test_imports_only_run_downward()
    except AssertionError as exc:
        assert "core/bad.py:2 imports arithlens.claims: core may not import claims" in str(exc)
    else:
        raise AssertionError("an upward import passed the rule")


def test_no_module_outgrows_one_sitting():
    """~400 lines a module (a little slack for a docstring's growth); split along a line a reader sees."""
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"modules over 420 lines: {long}"

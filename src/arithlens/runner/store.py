"""What is in the run store, and cleaning it: ``arithlens runs`` and ``arithlens runs clean``.

Publishing wing (paper: none). Every directory under ``runs/<chapter>/<model>/`` is one of:

* **complete** — ``<key>/`` with a manifest, whose code hash matches the chapter's code today and
  whose input runs are all present and complete themselves;
* **stale** — complete once, but the chapter's notebook or a library module it imports has changed
  since, or an input run it was keyed on is gone or stale (a rebuild would make a new run);
* **failed** — ``<key>.failed/`` with ``error.txt`` (the notebook is kept for reading);
* **interrupted** — ``<key>.partial-<pid>/`` whose process is gone (killed mid-way);
* **running** — ``<key>.partial-<pid>/`` whose process is alive (never touched);
* **resumable** — ``<key>.checkpoints/``: the finished units of work of a run that did not complete
  (:func:`arithlens.record.resumed`); the next run with this key starts from them. Stale once the
  chapter's code has changed (no run will have this key again).

:func:`clean` removes failed, interrupted and stale runs and stale checkpoints, and never a run the
built book shows.
Written by hand: a directory walk (nothing in papermill or the standard library keeps such a store).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from arithlens.paths import runs_root
from arithlens.runner.chapters import RunError, chapter_inputs, code_hash, list_chapters


@dataclass(frozen=True)
class StoredRun:
    """One directory of the run store and what state it is in."""

    chapter: str
    model: str
    key: str
    status: str  # complete | stale | failed | interrupted | running | resumable
    why: str
    path: Path
    size_bytes: int
    age_s: float


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def running_elsewhere(final: Path) -> int | None:
    """The pid of a live process (not this one) executing the run that will land at ``final``, if any."""
    for work in final.parent.glob(f"{final.name}.partial-*"):
        pid = work.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            return int(pid)
    return None


def _staleness(manifest: dict, codes: dict[str, str], memo: dict[Path, str]) -> str:
    """Why a complete run is stale, or "" if it is current."""
    chapter = manifest.get("chapter")
    if chapter not in codes:
        return "its chapter no longer exists"
    if manifest.get("code_hash") != codes[chapter]:
        return "its notebook or library code changed"
    inputs = manifest.get("inputs")
    if inputs is None and chapter_inputs(chapter):
        return "made before its inputs were keyed"
    for name, ref in (inputs or {}).items():
        path = Path(ref["path"])
        if path not in memo:
            memo[path] = "__pending__"  # guards against a (corrupt) cycle
            mf = path / "manifest.json"
            memo[path] = _staleness(json.loads(mf.read_text()), codes, memo) if mf.is_file() else "missing"
        if memo[path] == "missing":
            return f"its input {name} run {ref['run_key']} is gone"
        if memo[path]:
            return f"its input {name} run {ref['run_key']} is stale"
    return ""


def scan(root: Path | None = None) -> list[StoredRun]:
    """Every run directory in the store, with its status, sorted by chapter, model and age."""
    root = root or runs_root()
    if not root.is_dir():
        return []
    codes = {c: code_hash(c) for c in list_chapters()}
    memo: dict[Path, str] = {}
    now = time.time()
    found = []
    for path in sorted(root.glob("*/*/*")):
        if not path.is_dir():
            continue
        chapter, model, name = path.parent.parent.name, path.parent.name, path.name
        key, _, tail = name.partition(".")
        age = now - path.stat().st_mtime
        if tail == "checkpoints":
            about = path / "about.json"
            code = json.loads(about.read_text()).get("code_hash") if about.is_file() else None
            units = len(list(path.glob("*.pkl")))
            status, why = (("resumable", f"{units} finished units; the next run with this key resumes from them")
                           if code == codes.get(chapter) else ("stale", "checkpoints of code that has changed since"))
        elif tail == "failed":
            error = (path / "error.txt").read_text().strip().splitlines() if (path / "error.txt").is_file() else []
            status, why = "failed", (error[0] if error else "no error recorded")
        elif tail.startswith("partial-"):
            pid = tail.removeprefix("partial-")
            live = pid.isdigit() and _alive(int(pid))
            status, why = ("running", f"process {pid} is executing it") if live else \
                ("interrupted", f"process {pid} stopped before it finished")
        elif (path / "manifest.json").is_file():
            manifest = json.loads((path / "manifest.json").read_text())
            why = _staleness(manifest, codes, memo)
            memo[path] = why
            status = "stale" if why else "complete"
        else:
            status, why = "interrupted", "no manifest"
        found.append(StoredRun(chapter, model, key, status, why, path, _size(path), age))
    return found


def _human(n: float, units=("B", "kB", "MB", "GB")) -> str:
    for unit in units:
        if n < 1000 or unit == units[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f}"


def _age(seconds: float) -> str:
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def format_table(rows: list[StoredRun], in_book: set[Path]) -> str:
    """The listing ``arithlens runs`` prints: one line per run, grouped by chapter and model."""
    if not rows:
        return f"no runs in {runs_root()}"
    lines = [f"{'chapter':16s} {'model':16s} {'run':12s} {'status':12s} {'size':>9s} {'age':>7s}  note"]
    for r in rows:
        note = "; ".join(filter(None, ["in the built book" if r.path.resolve() in in_book else "", r.why]))
        lines.append(f"{r.chapter:16s} {r.model:16s} {r.key:12s} {r.status:12s} {_human(r.size_bytes):>9s} "
                     f"{_age(r.age_s):>7s}  {note}".rstrip())
    counts = {s: sum(r.status == s for r in rows) for s in ("complete", "stale", "failed", "interrupted", "running",
                                                            "resumable")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f"; {_human(sum(r.size_bytes for r in rows))} in {runs_root()}")
    return "\n".join(lines)


def clean(rows: list[StoredRun], in_book: set[Path], dry_run: bool = False) -> list[StoredRun]:
    """Remove failed, interrupted and stale runs — never a complete or running one, never one the
    built book shows. Returns what was (or, with ``dry_run``, would be) removed."""
    removable = [r for r in rows if r.status in ("failed", "interrupted", "stale") and r.path.resolve() not in in_book]
    if not dry_run:
        for r in removable:
            if runs_root() not in r.path.resolve().parents:
                raise RunError(f"refusing to remove {r.path}: it is outside the run store {runs_root()}")
            shutil.rmtree(r.path)
    return removable


def compare_tables(first: Path, second: Path) -> list[dict]:
    """Table by table, are two runs of the same plan identical? One row per parquet file of either run:
    ``equal`` (exactly, values and dtypes) and, where not, the largest absolute numeric difference."""
    import numpy as np
    import pandas as pd

    rows = []
    names = sorted({p.name for p in (first / "tables").glob("*.parquet")} | {p.name for p in (second / "tables").glob("*.parquet")})
    for name in names:
        a, b = first / "tables" / name, second / "tables" / name
        if not (a.is_file() and b.is_file()):
            rows.append({"table": name, "equal": False, "note": "missing in one run"})
            continue
        x, y = pd.read_parquet(a), pd.read_parquet(b)
        try:
            pd.testing.assert_frame_equal(x, y, check_exact=True)
            rows.append({"table": name, "equal": True, "note": f"{len(x)} rows"})
        except AssertionError as exc:
            numeric = [c for c in x.columns if c in y.columns and pd.api.types.is_numeric_dtype(x[c]) and x.shape == y.shape]
            diff = max((float(np.nanmax(np.abs(x[c].to_numpy(float) - y[c].to_numpy(float)))) for c in numeric), default=float("nan"))
            rows.append({"table": name, "equal": False, "note": f"max |diff| {diff:.3g}; {str(exc).splitlines()[0]}"})
    return rows

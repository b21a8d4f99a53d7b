"""Books of several models: plan every run they need, run independent ones side by side, and find the
runs a comparison reads.

Publishing wing. :func:`plan_models` plans a book of ``chapters`` for each model through the run
graph (the first model's across-models chapter takes every model's runs as inputs). :func:`model_chains`
cuts the plan into one chain per model — runs that depend on nothing outside their chain — and
:func:`execute_plans` runs the chains side by side: ``jobs`` threads on this machine (each run is its
own kernel process), or one submitit job per chain (``executor="slurm"`` on a cluster, ``"local"``
to try it here). The run store is the only hand-off: a job writes its runs, the across-models chapter
reads them after every chain has finished. Written by hand: only the grouping into chains.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from arithlens.record import RunResult, open_run
from arithlens.runs import Overrides, RunError, RunPlan, execute, is_across, plan_book, plan_run, runs_root

Log = Callable[[str], None]


def plan_models(chapters: Sequence[str], models: Sequence[str], given: Overrides | None = None) -> list[RunPlan]:
    """Every run a book of ``chapters`` on ``models`` needs, inputs first, each once. An across-models
    chapter is planned on the first model with ``models`` as its models (unless given otherwise)."""
    given = {c: dict(p) for c, p in (given or {}).items()}
    for chapter in chapters:
        if is_across(chapter) and len(models) > 1:
            given.setdefault(chapter, {})["models"] = list(models)
    order: list[RunPlan] = []
    for chapter in chapters:  # the comparison first: it says which chapters a model skips
        if is_across(chapter):
            order += [p for p in plan_run(chapter, models[0], given).walk() if p not in order]
    skipped = {m: set(cs) for p in order if is_across(p.chapter) for m, cs in p.params.get("skip_chapters", {}).items()}
    for model in models:
        wanted = [c for c in chapters if not is_across(c) and c not in skipped.get(model, ())]
        order += [p for p in plan_book(wanted, model, given) if p not in order]
    return sorted(order, key=lambda p: (is_across(p.chapter), models.index(p.model) if p.model in models else 0))


def model_chains(plans: Sequence[RunPlan]) -> tuple[list[list[RunPlan]], list[RunPlan]]:
    """(one chain per model, in plan order; the across-models runs, which need every chain first)."""
    chains: dict[str, list[RunPlan]] = {}
    last = []
    for plan in plans:
        if is_across(plan.chapter):
            last.append(plan)
        else:
            chains.setdefault(plan.model, []).append(plan)
    return list(chains.values()), last


def _run_chain(chain: Sequence[RunPlan], force: bool, log: Log) -> list[Path]:
    return [execute(plan, force=force, log=log).path for plan in chain]


def _run_chain_in_job(chain: Sequence[RunPlan], force: bool) -> list[str]:
    """What one submitit job runs: its chain, logging to the job's own stdout."""
    return [str(p) for p in _run_chain(chain, force, log=print)]


def execute_plans(plans: Sequence[RunPlan], jobs: int = 1, executor: str | None = None, force: bool = False,
                  log: Log = print, folder: Path | None = None) -> dict[tuple[str, str], RunResult]:
    """Run (or reuse) ``plans``: model chains side by side (``jobs`` threads, or submitit jobs), then the
    across-models runs. Returns ``{(model, chapter): run}``."""
    chains, last = model_chains(plans)
    pending = [c for c in chains if not all(p.complete for p in c) or force]
    if executor:
        _submit(pending, executor, force, log, folder or runs_root() / "_jobs")
    elif jobs > 1 and len(pending) > 1:
        log(f"running {len(pending)} model chains on {min(jobs, len(pending))} workers")
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(_run_chain, chain, force, _prefixed(log, chain[0].model)) for chain in pending]
            for future in futures:
                future.result()
    else:
        for chain in pending:
            _run_chain(chain, force, log)
    results = {}
    for plan in plans:
        results[(plan.model, plan.chapter)] = (execute(plan, force=force and plan in last, log=log)
                                               if plan in last or not plan.complete else open_run(plan.path))
    return results


def _prefixed(log: Log, model: str) -> Log:
    return lambda msg: log(f"[{model}] {msg}")


def _submit(chains: Sequence[Sequence[RunPlan]], executor: str, force: bool, log: Log, folder: Path) -> None:
    """One submitit job per chain; waits for all and raises the first failure as one line."""
    import submitit

    if executor not in ("slurm", "local"):
        raise RunError(f"unknown executor {executor!r}: use slurm (a cluster) or local (this machine)")
    pool = submitit.AutoExecutor(folder=str(folder), cluster=None if executor == "slurm" else "local")
    pool.update_parameters(timeout_min=24 * 60, name="arithlens")
    jobs = [pool.submit(_run_chain_in_job, list(chain), force) for chain in chains]
    log(f"submitted {len(jobs)} {executor} job(s): " + ", ".join(f"{c[0].model} → {j.job_id}" for c, j in zip(chains, jobs)))
    for chain, job in zip(chains, jobs):
        try:
            job.result()
        except Exception as exc:  # submitit re-raises the job's error with its traceback as text
            lines = [l for l in str(exc).splitlines() if l.strip()]
            raise RunError(f"job {job.job_id} ({chain[0].model}) failed: {lines[-1] if lines else exc}") from None
        log(f"job {job.job_id} ({chain[0].model}) finished")


def compared_runs(models: Sequence[str], chapters: Sequence[str], given: Overrides | None = None
                  ) -> tuple[dict[str, dict[str, RunResult | None]], list[str]]:
    """For each model, the finished run of each chapter with the given (default) parameters — the run
    a book of these models would show — or None, and a note per missing run naming its command."""
    found: dict[str, dict[str, RunResult | None]] = {}
    notes = []
    for model in models:
        found[model] = {}
        for chapter in chapters:
            plan = plan_run(chapter, model, given)
            found[model][chapter] = open_run(plan.path) if plan.complete else None
            if not plan.complete:
                notes.append(f"{model}: no finished run of {chapter} with these parameters (key {plan.key}); "
                             f"make it with `{plan.command()}`")
    return found, notes


def stored_models() -> list[str]:
    """Models with at least one finished run in the store, as their runs' manifests name them."""
    import json

    names = []
    for manifest in sorted(runs_root().glob("*/*/*/manifest.json")):
        model = json.loads(manifest.read_text()).get("model")
        if model and model not in names:
            names.append(model)
    return names

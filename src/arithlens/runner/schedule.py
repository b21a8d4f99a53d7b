"""Books of several models: plan every run they need, run independent ones side by side, and find the
runs a comparison reads.

Publishing wing. :func:`plan_models` plans a book of ``chapters`` for each model through the run
graph (the first model's across-models chapter takes every model's runs as inputs).
:func:`execute_plans` runs the plans on this machine — one after another, or with ``jobs > 1`` up
to ``jobs`` at once, each as soon as its inputs have finished, the ready run with the longest chain
of runs after it first (:func:`run_graph`, :func:`chain_minutes`: on one model, chapters 0 and 1
start together, chapters 2 and 3 once chapter 1 is done), each kernel given
its share of the cores as runs start and end (:mod:`arithlens.core.threads`) — or cuts them into one
chain per model (:func:`model_chains`) and submits one submitit job per chain (``executor="slurm"`` on a cluster, ``"local"`` to try it here).
The run store is the only hand-off: a run reads its inputs' stored tables, never another process's
memory. :func:`estimate` times a plan before it runs, from the store's earlier runs of the same
chapter, model and parameters (``arithlens book --dry-run``). Written by hand: the ready-queue over the
run graph and its order, the grouping into chains and the estimate.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from arithlens.core import threads
from arithlens.record import RunResult, open_run
from arithlens.paths import runs_root
from arithlens.runner.chapters import RunError, is_across
from arithlens.runner.runs import Overrides, RunPlan, execute, model_dirname, plan_book, plan_run

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


def past_runs(plan: RunPlan) -> pd.DataFrame:
    """Every finished run of ``plan``'s chapter on its model with exactly its parameters — made by any
    code, current or stale — as :func:`arithlens.claims.across.cost_summary` rows (minutes, threads, run)."""
    from arithlens.claims.across import cost_summary

    wanted = json.dumps(plan.params, sort_keys=True, default=str)
    found = [open_run(m.parent) for m in (runs_root() / plan.chapter / model_dirname(plan.model)).glob("*/manifest.json")
             if json.dumps(json.loads(m.read_text()).get("parameters"), sort_keys=True, default=str) == wanted]
    rows = [cost_summary({plan.model: {plan.chapter: run}}) for run in found]
    return pd.concat(rows, ignore_index=True).dropna(subset=["minutes"]) if rows else cost_summary({})


def estimate(plans: Sequence[RunPlan], jobs: int = 1) -> tuple[list[str], str]:
    """One line per plan — reused, or to run with the median time its earlier runs with the same
    parameters took (in this store, under whatever load there was then) — and a summary: the minutes
    to run in all, and with ``jobs > 1`` the longest chain of inputs (no schedule can beat it). Runs
    with no earlier run are counted, not guessed."""
    lines, minutes, unknown = [], {}, 0
    for plan in plans:
        name = f"{plan.chapter} on {plan.model}"
        if plan.complete:
            lines.append(f"{name}: finished run {plan.key} (reused)")
            minutes[plan.key] = 0.0
            continue
        past = past_runs(plan)
        if past.empty:
            unknown += 1
            lines.append(f"{name}: to run (key {plan.key}); no earlier run with these parameters to time it by")
            continue
        minutes[plan.key] = float(past["minutes"].median())
        threads = sorted(past["threads"].dropna().astype(str).unique())
        lines.append(f"{name}: to run (key {plan.key}), ≈ {minutes[plan.key]:.0f} min — "
                     + (f"run {past['run'].iloc[0]} with these parameters took that" if len(past) == 1 else
                        f"the median of {len(past)} earlier runs with these parameters "
                        f"({past['minutes'].min():.0f}–{past['minutes'].max():.0f} min)")
                     + (f", torch threads {'/'.join(threads)}" if threads else ""))
    chain: dict[str, float] = {}
    for plan in plans:  # inputs come first in a plan list
        chain[plan.key] = minutes.get(plan.key, 0.0) + max((chain.get(i.key, 0.0) for i in plan.inputs), default=0.0)
    total = sum(minutes.values())
    timed = total > 0 or not unknown
    summary = (f"{sum(not p.complete for p in plans)} of {len(plans)} runs to execute"
               + (f": ≈ {total:.0f} min of chapter time" if timed else "")
               + (f", at least {max(chain.values(), default=0):.0f} min with --jobs {jobs} (the longest chain of inputs)"
                  if jobs > 1 and timed else "")
               + (f"; {unknown} run(s) not timed (never run with these parameters here)" if unknown else ""))
    return lines, summary


def chain_minutes(plans: Sequence[RunPlan]) -> dict[str, float]:
    """Per run key, the minutes of the longest chain of runs from it to the end of ``plans`` (itself
    included): how soon :func:`run_graph` should start it. A run to execute is timed by the median of
    this store's earlier runs of its chapter on its model with its parameters (:func:`past_runs`), else
    of its chapter on any model with any parameters, else one minute; a finished run counts nothing."""
    def minutes(plan: RunPlan) -> float:
        if plan.complete:
            return 0.0
        past = past_runs(plan)
        if past.empty:
            found = [(json.loads(m.read_text()).get("timings") or {}).get("seconds")
                     for m in (runs_root() / plan.chapter).glob("*/*/manifest.json")]
            found = [f / 60 for f in found if f]
            return float(pd.Series(found).median()) if found else 1.0
        return float(past["minutes"].median())

    own = {p.key: minutes(p) for p in plans}
    after: dict[str, list[str]] = {}
    for plan in plans:
        for i in plan.inputs:
            after.setdefault(i.key, []).append(plan.key)
    chain: dict[str, float] = {}
    for plan in reversed(list(plans)):  # inputs come first in a plan list: every run after them is known
        chain[plan.key] = own[plan.key] + max((chain.get(k, 0.0) for k in after.get(plan.key, ())), default=0.0)
    return chain


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
    """Run (or reuse) ``plans``: on this machine through :func:`run_graph` (``jobs`` at once), or with an
    ``executor`` as one submitit job per model chain, then the across-models runs. Returns
    ``{(model, chapter): run}``."""
    if not executor:
        done = run_graph(plans, jobs=jobs, force=force, log=log)
        return {(plan.model, plan.chapter): done[plan.key] for plan in plans}
    chains, last = model_chains(plans)
    _submit([c for c in chains if not all(p.complete for p in c) or force], executor, force, log,
            folder or runs_root() / "_jobs")
    return {(plan.model, plan.chapter): (execute(plan, force=force, log=log) if plan in last else open_run(plan.path))
            for plan in plans}


def run_graph(plans: Sequence[RunPlan], jobs: int = 1, force: bool = False, log: Log = print) -> dict[str, RunResult]:
    """Run (or reuse) every plan once all its inputs have finished, up to ``jobs`` at once — of the
    runs ready, the one with the longest chain after it first (:func:`chain_minutes`) —; returns
    ``{run key: run}``. ``plans`` must hold every input of every plan (as :func:`plan_models` and
    :func:`~arithlens.runner.runs.plan_book` give them). With ``jobs > 1`` each kernel starts with ``cores ÷ jobs``
    torch threads and follows the thread share, ``cores ÷ (runs going)``, as runs start and end
    (:mod:`arithlens.core.threads`), unless ``OMP_NUM_THREADS`` is already set: two kernels at torch's
    default of one thread per core would fight for the cores, and one kernel left alone at
    ``cores ÷ jobs`` would leave cores idle. The first failure stops new runs from starting; the
    runs already going finish (their results stay in the store), then the failure is raised."""
    waiting = {p.key: p for p in plans}  # one node per key: a plan reached by two paths runs once
    done: dict[str, RunResult] = {}
    if jobs <= 1:
        for plan in waiting.values():
            done[plan.key] = execute(plan, force=force, log=log)
        return done
    _dequantize_once({p.model for p in waiting.values() if force or not p.complete}, log)
    chain = chain_minutes(list(waiting.values()))
    waiting = dict(sorted(waiting.items(), key=lambda kv: -chain[kv[0]]))  # the longest chain first; stable
    with _kernel_threads(jobs, log) as publish, ThreadPoolExecutor(max_workers=jobs) as pool:
        running: dict[Future, RunPlan] = {}
        failure: BaseException | None = None
        while waiting or running:
            ready = [p for p in waiting.values() if all(i.key in done for i in p.inputs)] if failure is None else []
            for plan in ready[:jobs - len(running)]:
                del waiting[plan.key]
                running[pool.submit(execute, plan, force=force, upstream=False, log=log)] = plan
            publish(len(running))  # runs started or ended since the last look: re-divide the cores
            if not running:
                if failure is None and waiting:  # an input outside ``plans``: a planning error, not a run's
                    missing = next(i for p in waiting.values() for i in p.inputs if i.key not in done and i.key not in waiting)
                    raise RunError(f"{missing.chapter} on {missing.model} (key {missing.key}) is an input but not in the plan")
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                plan = running.pop(future)
                if future.exception() is None:
                    done[plan.key] = future.result()
                elif failure is None:
                    failure = future.exception()
                    if running:
                        log(f"{plan.chapter} on {plan.model} failed; waiting for the {len(running)} run(s) under way")
        if failure is not None:
            raise failure
    return done


def _dequantize_once(models: set[str], log: Log) -> None:
    """Fill the weight cache of every GGUF model before kernels start side by side: on a fresh install
    two kernels of one model would otherwise both dequantize it (safe — the first to finish publishes
    the cache, see :func:`arithlens.core.models.dequantize_gguf` — but the work is done twice, on cores the
    other runs need). A cached model costs a stat."""
    from arithlens.core.models import dequantize_gguf
    from arithlens.core.specs import resolve_spec

    for model in sorted(models):
        spec = resolve_spec(model)
        if spec.kind == "gguf":
            directory, cached = dequantize_gguf(Path(spec.source), spec.sha256)
            if not cached:
                log(f"dequantized {model} once into {directory}, before its runs start side by side")


@contextmanager
def _kernel_threads(jobs: int, log: Log) -> Iterator[Callable[[int], None]]:
    """Kernels started inside get ``cores ÷ jobs`` torch threads to start with (``OMP_NUM_THREADS``) and
    follow the thread share (:mod:`arithlens.core.threads`); yields the function that publishes the share
    for a number of running kernels. A value of ``OMP_NUM_THREADS`` the user set is kept, unshared."""
    if os.environ.get("OMP_NUM_THREADS"):
        log(f"running chapters side by side; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} as set")
        yield lambda running: None
        return
    start = threads.share_for(jobs)
    log(f"running chapters side by side, {start} torch thread(s) each, more while fewer run "
        f"(OMP_NUM_THREADS={start}, {threads.ENV})")
    with tempfile.TemporaryDirectory(prefix="arithlens-threads-") as folder:
        share = Path(folder) / "share"
        threads.write_share(share, start)
        os.environ.update({"OMP_NUM_THREADS": str(start), threads.ENV: str(share)})
        try:
            yield lambda running: threads.write_share(share, threads.share_for(running))
        finally:
            del os.environ["OMP_NUM_THREADS"], os.environ[threads.ENV]


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

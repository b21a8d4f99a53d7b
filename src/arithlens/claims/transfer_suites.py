"""Chapter 3's suites, rebuilt from its run for chapter 7.

Science wing (paper § 5, transfer). Chapter 7 runs a layer-matched null on every suite chapter 3
judged usable: it needs the very items chapter 3 scored (:func:`transfer_suites`, checked against
chapter 3's stored item counts), and ablates each with its own mean as chapter 3's verdict does. Kept apart from :mod:`arithlens.claims.findings` because building
suites reads the task generators and their shipped data (``controls.json``): only the chapter that
rebuilds the suites reaches them, so editing that data re-keys the chapters that score it and no other.
"""

from __future__ import annotations

from arithlens.claims.findings import Run, transfer_items
from arithlens.record import UpstreamError
from arithlens.tasks.benchmarks.reader import load_benchmarks
from arithlens.tasks.benchmarks.shipped import load_shipped
from arithlens.tasks.suites import Suite, make_suite


def transfer_suites(transfer_run: Run, tokenizer) -> dict[str, Suite]:
    """The suites of :func:`transfer_items`, rebuilt from chapter 3's parameters (generation is
    deterministic given the tokenizer; shipped benchmarks and benchmark files are read again), in the order chapter 3 scored
    them. Each is checked against chapter 3's item count for it."""
    p = transfer_run.parameters
    wanted = set(transfer_items(transfer_run)["suite"])
    made = {n: make_suite(n, tokenizer, n=int(p["n_items"]), seed=int(p["seed"])) for n in p["suite_names"] if n in wanted}
    made.update({n: load_shipped(n, tokenizer, n=int(p["n_benchmark"]), seed=int(p["seed"]))
                 for n in p.get("benchmarks", []) if n in wanted})
    if wanted - set(made):
        made.update(load_benchmarks(p.get("benchmark_files", []), tokenizer, n=int(p["n_items"]), shots=int(p["shots"]),
                                    seed=int(p["seed"])))
    scores = transfer_run.table("transfer_scores")
    counts = scores[scores["condition"] == "none"].groupby("suite")["item"].nunique()
    order = [n for n in dict.fromkeys(transfer_run.table("usability")["suite"]) if n in wanted]
    for name in order:
        if name not in made or len(made[name]) != counts[name]:
            raise UpstreamError(f"chapter 3's run {transfer_run.key} scored other items of {name} than its parameters "
                                "build with this tokenizer: re-run 03_transfer with this model")
    return {name: made[name] for name in order}

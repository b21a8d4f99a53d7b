"""Results one chapter hands to another: read from the upstream run's tables, in one place.

Science wing (paper § 3.2 key heads, § 4 MLPs, § 5 transfer and Precise SFT). Chapter 2 consumes
chapter 1's scored prompts and key heads; chapter 3 the key heads; chapter 4 chapter 1's whole head
ranking and chapter 2's MLP ranking; chapter 6 the deltas chapter 4 kept; chapters 5 and 7 chapter 3's
per-item results (chapter 7 also its suites: :mod:`arithlens.claims.transfer_suites`). Each of those is one function here, taking the upstream *run* (anything
with ``table(name)``, ``parameters`` and ``key``, e.g. ``record.RunResult``), so no notebook re-derives
or recomputes another chapter's result, and the run graph (``arithlens.runner.runs``) guarantees which
run it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import pandas as pd

from arithlens.analyses.sft.naming import DELTA_FOLDERS, KEPT_FOLDERS
from arithlens.core.deltas import Delta, load_delta
from arithlens.core.hooks import Head, heads_from_frame
from arithlens.core.metrics import select_key_heads
from arithlens.record import RunResult, UpstreamError
from arithlens.tasks.prompts import Facts, PromptConfig, PromptSet, filter_correct, make_prompts


@runtime_checkable
class Run(Protocol):
    """What these functions need of a finished run."""

    key: str
    parameters: dict

    def table(self, name: str) -> pd.DataFrame: ...


def scored_prompts(heads_run: Run, tokenizer, facts: Facts = "localization") -> tuple[PromptSet, pd.DataFrame, PromptSet]:
    """Chapter 1's prompts of one half of the facts (:func:`arithlens.tasks.facts.fact_half`) as it
    scored them: ``(generated, scores, kept)``, with no forward pass.

    The prompt set is rebuilt from the run's parameters (generation is deterministic given the
    tokenizer) and checked item by item against the run's ``prompt_scores`` rows of that half; ``kept``
    is what chapter 1 kept (the correctly answered prompts when its ``filter_correct`` was on).
    """
    p = heads_run.parameters
    config = PromptConfig(operators=tuple(p["operators"]), templates=tuple(p["templates"]), n_per_cell=int(p["n_per_cell"]),
                          shots=int(p["shots"]), seed=int(p["seed"]), facts=facts)
    scores = heads_run.table("prompt_scores")
    if "facts" not in scores:
        raise UpstreamError(f"chapter 1's run {heads_run.key} predates the split of the facts: re-run 01_heads")
    generated, scores = make_prompts(tokenizer, config), scores[scores["facts"] == facts].reset_index(drop=True)
    if (len(scores) != len(generated) or scores["clean"].tolist() != [it.clean for it in generated.items]
            or scores["answer_token"].tolist() != [it.answer_token for it in generated.items]):
        raise UpstreamError(f"chapter 1's run {heads_run.key} scored other prompts than this tokenizer builds from its "
                            "parameters: re-run 01_heads with this model")
    kept = filter_correct(generated, scores, min_items=int(p["min_correct"])) if p["filter_correct"] else generated
    return generated, scores, kept


def key_heads(heads_run: Run) -> list[Head]:
    """Chapter 1's key heads, in its ranking order (its ``key_heads`` table)."""
    return heads_from_frame(heads_run.table("key_heads"))


def lead_effects(heads_run: Run) -> pd.DataFrame:
    """Chapter 1's pooled per-head effects under the metric and patching mode it ranks heads by."""
    p = heads_run.parameters
    lead = heads_run.table("effects_summary")
    return lead[(lead["mode"] == p.get("lead_mode", "path")) & (lead["metric"] == p["lead_metric"])]


def head_ranking(heads_run: Run, k: int) -> list[Head]:
    """The top ``k`` heads of chapter 1's ranking (its lead mode and metric), strongest first."""
    return heads_from_frame(select_key_heads(lead_effects(heads_run), "top_k", k=k))


def describe_heads(heads_run: Run) -> str:
    """How chapter 1 chose them, for the page: "chapter 1's run `KEY` (top_k on path / d_prob)"."""
    p = heads_run.parameters
    return (f"chapter 1's run `{heads_run.key}` ({p.get('selection')} on {p.get('lead_mode')} / "
            f"{p.get('lead_metric')})")


def mlp_ranking(mlp_run: Run, from_layer: int = 0, metric: str = "d_prob") -> list[int]:
    """MLP layers ``≥ from_layer`` ordered by the size of chapter 2's direct effect (|mean ``metric``|)."""
    effects = mlp_run.table("mlp_effects")
    effects = effects[(effects["metric"] == metric) & (effects["layer"] >= from_layer)]
    return effects.assign(size=effects["mean"].abs()).sort_values("size", ascending=False)["layer"].astype(int).tolist()


# --- chapter 3: the per-item results of the knockout transfer -----------------------------------------

#: The scoring that stands for a suite of each kind in every statistic read from chapter 3: the whole
#: answer, for math suites and non-math controls alike (one scoring for both, so a difference between
#: the kinds is not a difference between scorings).
TRANSFER_METRIC = {"math": "correct", "control": "correct"}


def transfer_items(transfer_run: Run) -> pd.DataFrame:
    """Chapter 3's per-item results on the suites it judged usable and knocked the key heads out on.

    One row per (suite, item), math suites first, suites in name order within a kind: ``suite``,
    ``kind``, ``metric`` (:data:`TRANSFER_METRIC` of the kind), ``item``, and one column per condition
    chapter 3 ran — ``none``, ``key``, ``random``, and with its ``own_means`` ``key (own mean)`` and
    ``random (own mean)`` — holding the item's correctness under ``metric``, averaged over seeds
    (``random``: the share of random draws under which it was right; the others are 0 or 1). A suite
    enters when chapter 3's usability rule passed it under its kind's metric.
    """
    scores, usable = transfer_run.table("transfer_scores"), transfer_run.table("usability")
    frames = []
    for kind, metric in TRANSFER_METRIC.items():
        ok = set(usable[(usable["kind"] == kind) & (usable["metric"] == metric) & usable["usable"]]["suite"])
        part = scores[(scores["kind"] == kind) & scores["suite"].isin(ok)]
        part = part[part["suite"].isin(part[part["condition"] == "key"]["suite"].unique())]
        if len(part):
            wide = part.pivot_table(index=["suite", "item"], columns="condition", values=metric, aggfunc="mean")
            frames.append(wide.reset_index().assign(kind=kind, metric=metric))
    if not frames:
        return pd.DataFrame(columns=["suite", "kind", "metric", "item", "none", "key", "random"])
    out = pd.concat(frames, ignore_index=True)
    conditions = [c for c in out.columns if c not in ("suite", "kind", "metric", "item")]
    return out[["suite", "kind", "metric", "item", *conditions]].rename_axis(columns=None)


# --- chapter 4: the deltas it kept ---------------------------------------------------------------------

def tuned_deltas(sft_run: RunResult, with_full: bool = False) -> dict[str, Delta]:
    """The deltas chapter 4 kept, by the name of the row that trained them, loaded exactly, in
    :data:`arithlens.analyses.sft.naming.DELTA_FOLDERS` order (Precise SFT first, then the first
    random-head draw and the first LoRA row where the run kept them): the three chapter 6 compares.
    ``with_full``: full SFT's first seed first (:data:`~arithlens.analyses.sft.naming.KEPT_FOLDERS`), the
    rows chapter 8 asks the public benchmarks."""
    out = {}
    for folder in (KEPT_FOLDERS if with_full else DELTA_FOLDERS).values():
        path = Path(sft_run.path) / folder
        if (path / "manifest.json").exists():
            delta = load_delta(path)
            out[delta.meta["method_name"]] = delta
    return out

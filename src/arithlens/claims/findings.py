"""Results one chapter hands to another: read from the upstream run's tables, in one place.

Science wing (paper § 3.2 key heads, § 4 MLPs). Chapter 2 consumes chapter 1's scored prompts and
key heads; chapter 3 the key heads; chapter 4 chapter 1's whole head ranking and chapter 2's MLP
ranking. Each of those is one function here, taking the upstream *run* (anything with
``table(name)``, ``parameters`` and ``key``, e.g. ``record.RunResult``), so no notebook re-derives or
recomputes another chapter's result, and the run graph (``arithlens.runner.runs``) guarantees which run it is.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pandas as pd

from arithlens.core.hooks import Head, heads_from_frame
from arithlens.core.metrics import select_key_heads
from arithlens.tasks.prompts import PromptConfig, PromptSet, filter_correct, make_prompts
from arithlens.record import UpstreamError


@runtime_checkable
class Run(Protocol):
    """What these functions need of a finished run."""

    key: str
    parameters: dict

    def table(self, name: str) -> pd.DataFrame: ...


def scored_prompts(heads_run: Run, tokenizer) -> tuple[PromptSet, pd.DataFrame, PromptSet]:
    """Chapter 1's prompts as it scored them: ``(generated, scores, kept)``, with no forward pass.

    The prompt set is rebuilt from the run's parameters (generation is deterministic given the
    tokenizer) and checked item by item against the run's ``prompt_scores`` table; ``kept`` is what
    chapter 1 kept (the correctly answered prompts when its ``filter_correct`` was on).
    """
    p = heads_run.parameters
    config = PromptConfig(operators=tuple(p["operators"]), templates=tuple(p["templates"]), n_per_cell=int(p["n_per_cell"]),
                          shots=int(p["shots"]), seed=int(p["seed"]))
    generated, scores = make_prompts(tokenizer, config), heads_run.table("prompt_scores")
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
    return lead[(lead["mode"] == p.get("lead_mode", "path")) & (lead["metric"] == p.get("lead_metric", "d_prob"))]


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

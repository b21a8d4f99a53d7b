"""Results one chapter hands to another: read from the upstream run's tables, in one place.

Science wing (paper § 3.2 key heads, § 4 MLPs). Chapter 2 consumes chapter 1's key heads; chapter 3
the same; chapter 4 chapter 1's whole head ranking and chapter 2's MLP ranking. Each of those is one
function here, taking the upstream *run* (anything with ``table(name)``, ``parameters`` and ``key``,
e.g. ``record.RunResult``), so no notebook re-derives or recomputes another chapter's result, and
the run graph (``arithlens.runs``) guarantees which run it is.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pandas as pd

from arithlens.metrics import select_key_heads
from arithlens.hooks import Head, heads_from_frame


@runtime_checkable
class Run(Protocol):
    """What these functions need of a finished run."""

    key: str
    parameters: dict

    def table(self, name: str) -> pd.DataFrame: ...


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

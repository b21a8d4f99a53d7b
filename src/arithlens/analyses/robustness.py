"""Robustness of the key-head findings: a layer-matched null, selectivity, rule and ablation sensitivity.

Science wing, after knockout (paper § "Knockout" compares the key heads with random heads drawn
from all layers; § "Transfer" contrasts math suites with non-math controls). This stage goes beyond
the paper in four ways:

* **A layer-matched null** (:func:`arithlens.core.hooks.layer_matched_random_sets`, :func:`null_test`,
  :func:`knockout_null`): random head sets with the key heads' number of heads *in every layer*,
  never a key head, so "the key heads matter more than random heads" is not just "late layers
  matter more than early ones". :func:`suite_null` draws the same null on chapter 3's suites, the
  non-math controls included. Sets are drawn independently (with replacement across sets: the
  null is a distribution, not a list of distinct sets). The key set's drop is placed in the null by
  its percentile (percent of null drops strictly below it) and a one-sided empirical p-value for
  "the key drop is larger": p = (1 + #{null drop ≥ key drop}) / (1 + n_sets) — ties count against
  the key heads, which matters for accuracy drops on few prompts.
* **Selectivity** (:func:`selectivity`, :func:`suite_selectivity` on chapter 3's suites): per control
  suite, (drop on the target suite) − (drop on the control), each drop = accuracy without ablation −
  accuracy with it on the same items; a percentile bootstrap CI resamples items within each suite
  independently.
* **Rule sensitivity** (:func:`threshold_sensitivity`): the key-head set under the paper's −5 %
  relative-logit threshold and looser / other rules (−1 %, Δp(answer), Δlogit-difference), with the
  Jaccard overlap of each set with a reference rule's.
* **Ablation sensitivity** (:class:`AblationEvaluator`, :func:`ablation_values`): knockout with the
  head's END ``hook_z`` replaced by the counterfactual mean (the paper's), by zero, or by another
  prompt's counterfactual value (resample ablation; a seeded derangement, so never the prompt's own).

Written by hand: numpy draws and bootstraps; accuracies come from END-only reruns
(:func:`arithlens.core.hooks.end_only_logits`) on the clean prefix's KV cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from arithlens.core.conditions import correct_at_end
from arithlens.analyses.agreement import jaccard
from arithlens.core.hooks import Head, layer_matched_random_sets
from arithlens.core.items import ItemSet, answer_batches
from arithlens.analyses.knockout import KnockoutEvaluator, item_ablation_hooks, mean_z, resample_z
from arithlens.core.metrics import select_key_heads
from arithlens.core.models import LoadedModel

if TYPE_CHECKING:
    from arithlens.tasks.suites import Suite

AblationKind = Literal["mean", "zero", "resample"]
#: (metric, threshold) rules: the paper's −5 % relative logit first, then looser and other scores.
RULES: tuple[tuple[str, float], ...] = (("rel_logit", -0.05), ("rel_logit", -0.01), ("d_prob", -0.05),
                                        ("d_prob", -0.01), ("d_logit_diff", -0.5), ("d_logit_diff", -0.1))


# --- the layer-matched null ------------------------------------------------------------------------

@dataclass(frozen=True)
class NullTest:
    """Where the key heads' drop falls among the random sets' drops (one-sided: larger drop)."""

    key: float
    null_mean: float
    null_sd: float
    percentile: float  # percent of null drops strictly below the key drop
    p_value: float     # (1 + #{null ≥ key}) / (1 + n_sets)
    n_sets: int
    side: str = "greater"


def null_test(key_drop: float, null_drops: Float[np.ndarray, "n_sets"]) -> NullTest:
    """Place ``key_drop`` in the null distribution ``null_drops`` (see :class:`NullTest`)."""
    null = np.asarray(null_drops, dtype=np.float64)
    n = len(null)
    if n == 0:
        raise ValueError("the null distribution is empty")
    return NullTest(float(key_drop), float(null.mean()), float(null.std(ddof=1)) if n > 1 else 0.0,
                    float(100.0 * np.mean(null < key_drop)), float((1 + np.sum(null >= key_drop)) / (1 + n)), n)


def knockout_null(evaluator: KnockoutEvaluator, key_heads: Sequence[Head], n_sets: int = 100, seed: int = 0,
                  progress=None) -> tuple[pd.DataFrame, NullTest]:
    """Accuracy drop under knockout of the key heads and of ``n_sets`` layer-matched random sets.

    Returns one row per set (``set`` = ``key`` or ``random``, ``index``, ``heads``, ``accuracy``,
    ``drop`` = unablated − ablated accuracy) and the :class:`NullTest` of the key drop.
    """
    model = evaluator.model
    sets = layer_matched_random_sets(key_heads, model.n_layers, model.n_heads, n_sets, seed)
    jobs = [("key", -1, sorted(key_heads))] + [("random", i, s) for i, s in enumerate(sets)]
    accuracy = evaluator.correct_many([[]] + [heads for _, _, heads in jobs], progress).mean(1)
    base = float(accuracy[0])
    rows = [{"set": kind, "index": i, "heads": " ".join(map(str, heads)), "accuracy": float(acc), "drop": base - float(acc)}
            for (kind, i, heads), acc in zip(jobs, accuracy[1:])]
    frame = pd.DataFrame(rows).assign(base_accuracy=base, n_prompts=len(evaluator.prompts))
    null = frame[frame["set"] == "random"]["drop"].to_numpy(dtype=np.float64)
    return frame, null_test(float(frame["drop"].iloc[0]), null)


def suite_null(model: LoadedModel, suites: Mapping[str, "Suite"], key_heads: Sequence[Head],
               means: Mapping[str, Float[Tensor, "layer head d_head"]], n_sets: int = 200, seed: int = 0,
               progress=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The layer-matched null on other tasks: every suite scored as chapter 3 scores it
    (:class:`arithlens.tasks.suites.SuiteScorer`: the prompt's KV cache made once, the heads' ``hook_z``
    replaced by ``means[suite]`` — that suite's own mean — at every predicting position; the sets
    stacked along the batch, :meth:`~arithlens.tasks.suites.SuiteScorer.score_many`), unablated,
    with the key heads knocked out and with each of ``n_sets`` layer-matched random sets
    (:func:`arithlens.core.hooks.layer_matched_random_sets`, the same sets for every suite). Accuracy is
    the whole answer's, for math suites and controls alike.

    Returns one row per (suite, set) — ``suite``, ``kind``, ``set``, ``index``, ``accuracy``, ``drop`` —
    and one :class:`NullTest` row per suite (with ``suite``, ``kind``, ``n_items``, ``base_accuracy``).
    """
    from arithlens.analyses.knockout import ablation_hooks
    from arithlens.tasks.suites import SuiteScorer

    sets = layer_matched_random_sets(key_heads, model.n_layers, model.n_heads, n_sets, seed)
    jobs = [("key", -1, sorted(key_heads))] + [("random", i, s) for i, s in enumerate(sets)]
    rows, tests = [], []
    names = list(suites)
    for name in (progress(names, desc="layer-matched null (suites)") if progress else names):
        suite = suites[name]
        scorer = SuiteScorer(model, suite)
        frames = scorer.score_many([[]] + [ablation_hooks(heads, means[name], "all") for _, _, heads in jobs])
        base = float(frames[0]["correct"].mean())
        part = []
        for (kind, i, _), frame in zip(jobs, frames[1:]):
            acc = float(frame["correct"].mean())
            part.append({"suite": name, "kind": suite.kind, "set": kind, "index": i, "accuracy": acc,
                         "drop": base - acc})
        rows += part
        null = np.array([r["drop"] for r in part[1:]], dtype=np.float64)
        tests.append({"suite": name, "kind": suite.kind, "n_items": len(suite), "base_accuracy": base,
                      **null_test(part[0]["drop"], null).__dict__})
    return pd.DataFrame(rows), pd.DataFrame(tests)


# --- selectivity -------------------------------------------------------------------------------------

def selectivity(correct: Mapping[str, tuple[np.ndarray, np.ndarray]], target: str, n_boot: int = 1000,
                seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Selectivity of an ablation for ``target`` over each other suite.

    ``correct[suite] = (unablated, ablated)``: per-item correctness (bool) on the same items. One row
    per control suite: ``target_drop``, ``control_drop``, ``selectivity`` = target drop − control drop,
    and a percentile bootstrap CI (items resampled within each suite, independently).
    """
    if target not in correct:
        raise ValueError(f"no suite {target!r} among {list(correct)}")
    diffs = {}
    for name, (base, ablated) in correct.items():
        base, ablated = np.asarray(base, dtype=bool), np.asarray(ablated, dtype=bool)
        if base.shape != ablated.shape or base.ndim != 1 or len(base) == 0:
            raise ValueError(f"suite {name!r}: unablated and ablated correctness must be equal-length, non-empty 1-d arrays")
        diffs[name] = base.astype(np.float64) - ablated.astype(np.float64)  # per-item drop
    rng = np.random.default_rng(seed)
    boot = lambda d: rng.multinomial(len(d), np.full(len(d), 1.0 / len(d)), size=n_boot) @ d / len(d)
    t_boot = boot(diffs[target])
    rows = []
    for name, d in diffs.items():
        if name == target:
            continue
        s_boot = t_boot - boot(d)
        lo, hi = np.quantile(s_boot, [alpha / 2, 1 - alpha / 2])
        rows.append({"target": target, "control": name, "target_drop": diffs[target].mean(), "control_drop": d.mean(),
                     "selectivity": diffs[target].mean() - d.mean(), "ci_low": lo, "ci_high": hi,
                     "n_target": len(diffs[target]), "n_control": len(d)})
    return pd.DataFrame(rows)


# --- rule sensitivity ----------------------------------------------------------------------------------

def key_heads_by_rule(summary: pd.DataFrame, rules: Sequence[tuple[str, float]] = RULES) -> pd.DataFrame:
    """Key heads (mean ≤ threshold) under each rule, from a summary laid out like
    :func:`arithlens.core.metrics.summarize_effects` (``mode``, ``layer``, ``head``, ``metric``, ``mean``, …).
    One row per (mode, metric, threshold, head chosen)."""
    rows = []
    for mode, part in summary.groupby("mode", sort=False):
        for metric, threshold in rules:
            chosen = select_key_heads(part[part["metric"] == metric], "threshold", threshold)
            rows += [{"mode": mode, "metric": metric, "threshold": threshold, "layer": int(r.layer),
                      "head": int(r.head), "mean": float(r.mean)} for r in chosen.itertuples()]
    return pd.DataFrame(rows, columns=["mode", "metric", "threshold", "layer", "head", "mean"])


def threshold_sensitivity(summary: pd.DataFrame, rules: Sequence[tuple[str, float]] = RULES) -> pd.DataFrame:
    """One row per (mode, rule): how many key heads, which, and the Jaccard overlap with the first
    rule's set (the reference, by default the paper's relative logit ≤ −5 %)."""
    chosen = key_heads_by_rule(summary, rules)
    rows = []
    for mode in summary["mode"].unique():
        here = chosen[chosen["mode"] == mode]
        sets = {(m, t): [Head(int(r.layer), int(r.head))
                         for r in here[(here["metric"] == m) & (here["threshold"] == t)].itertuples()] for m, t in rules}
        ref = sets[rules[0]]
        rows += [{"mode": mode, "metric": m, "threshold": t, "n_heads": len(s), "heads": " ".join(map(str, sorted(s))),
                  "jaccard_vs_reference": jaccard(s, ref)} for (m, t), s in sets.items()]
    return pd.DataFrame(rows)


# --- ablation sensitivity --------------------------------------------------------------------------------

def ablation_values(model: LoadedModel, prompts: ItemSet, kind: AblationKind, seed: int = 0,
                    batch_size: int = 32) -> Float[Tensor, "item layer head d_head"]:
    """What each item's ablated heads take at END: the counterfactual mean (:func:`arithlens.analyses.knockout.mean_z`),
    zero, or the END value of another item's counterfactual (``resample``: item i gets item π(i)'s,
    π a derangement, :func:`arithlens.analyses.knockout.resample_z`)."""
    n = len(prompts.items)
    if kind == "mean":
        return mean_z(model, prompts, "end", batch_size)[None].expand(n, -1, -1, -1).contiguous()
    if kind == "zero":
        return torch.zeros(n, model.n_layers, model.n_heads, model.cfg.d_head, device=model.device)
    if kind == "resample":
        return resample_z(model, prompts, "counterfactual", seed, batch_size)
    raise ValueError(f"unknown ablation {kind!r}: choose mean, zero or resample")


class AblationEvaluator:
    """Greedy correctness with heads' END ``hook_z`` replaced by per-item values, many conditions at
    once (:meth:`correct_many`): each batch's clean prefix KV cache serves every condition."""

    def __init__(self, model: LoadedModel, prompts: ItemSet, batch_size: int = 64):
        self.model, self.prompts = model, prompts
        self.batches = answer_batches(prompts.items, batch_size, model.device)

    def correct_many(self, conditions: Sequence[tuple[Sequence[Head], Float[Tensor, "item layer head d_head"]]],
                     progress=None) -> np.ndarray:
        """Per-item correctness under each (heads, values) condition, ``heads`` set to ``values`` at
        END (the item's own row): a ``conditions × items`` bool array."""
        return correct_at_end(self.model, self.batches, len(self.prompts.items),
                                    [item_ablation_hooks(h, v) for h, v in conditions], progress=progress,
                                    desc="ablations")

    def correct(self, heads: Sequence[Head], values: Float[Tensor, "item layer head d_head"]) -> np.ndarray:
        """Per-item correctness with ``heads`` set to ``values`` at END (the item's own row)."""
        return self.correct_many([(heads, values)])[0]


def ablation_sensitivity(evaluator: AblationEvaluator, key_heads: Sequence[Head],
                         kinds: Sequence[AblationKind] = ("mean", "zero", "resample"), n_random: int = 10,
                         seed: int = 0) -> pd.DataFrame:
    """Accuracy with the key heads and with ``n_random`` layer-matched random sets ablated, under each
    ablation. One row per (ablation, set, index) with ``accuracy`` and ``drop`` from the unablated."""
    model = evaluator.model
    sets = layer_matched_random_sets(key_heads, model.n_layers, model.n_heads, n_random, seed)
    jobs = [(kind, name, i, heads) for kind in kinds
            for name, i, heads in [("key", -1, list(key_heads))] + [("random", i, s) for i, s in enumerate(sets)]]
    values = {kind: ablation_values(model, evaluator.prompts, kind, seed) for kind in kinds}
    # no head is ablated, so these values are never read; they have every condition's shape, as the
    # signature says (a smaller placeholder failed the shape check whenever beartype sampled it)
    none = torch.zeros_like(values[kinds[0]])
    accuracy = evaluator.correct_many([([], none)] + [(heads, values[kind]) for kind, _, _, heads in jobs]).mean(1)
    base = float(accuracy[0])
    rows = [{"ablation": kind, "set": name, "index": i, "accuracy": float(acc), "drop": base - float(acc)}
            for (kind, name, i, _), acc in zip(jobs, accuracy[1:])]
    return pd.DataFrame(rows).assign(base_accuracy=base)


def suite_selectivity(items: pd.DataFrame, n_boot: int = 1000, seed: int = 0, key: str = "key (own mean)") -> pd.DataFrame:
    """:func:`selectivity` of chapter 3's key-head knockout for every math suite over every non-math
    control: one row per (math suite, control). Drops are absolute (accuracy points), per item.

    ``items``: one row per (suite, item) with ``suite``, ``kind`` (``math`` or ``control``) and the
    item's correctness with no ablation (``none``) and with the key heads knocked out (column ``key``:
    by default each suite's own mean, as chapter 3's verdict reads it) — chapter 3's usable suites as
    :func:`arithlens.claims.findings.transfer_items` reads them from its run (the whole answer). Suites
    in name order within each kind."""
    correct: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {"math": {}, "control": {}}
    for (kind, suite), part in items.groupby(["kind", "suite"], sort=True):
        correct[kind][suite] = (part["none"].to_numpy() > 0.5, part[key].to_numpy() > 0.5)
    frames = [selectivity({target: pair, **correct["control"]}, target, n_boot, seed)
              for target, pair in correct["math"].items()] if correct["control"] else []
    return (pd.concat(frames, ignore_index=True).rename(columns={"ci_low": "low", "ci_high": "high"})
            if frames else pd.DataFrame())

"""Transfer: do chapter 1's key heads serve other arithmetic tasks — and leave non-math alone?

Science wing, analysis floor (paper § "Transfer"). Two analyses on the suites of
:mod:`arithlens.tasks.suites`, both reusing chapter 1's code rather than re-implementing it:

- **Knockout transfer** (:func:`knockout_transfer`): each suite scored with no ablation, with the key
  heads mean-ablated, and with the same number of random heads (several seeds); optionally also with
  each suite's own mean, and resample-ablated as a check on it. Ablation values are
  :func:`arithlens.analyses.knockout.mean_z` over the arithmetic counterfactual prompts; the hooks are
  :mod:`arithlens.analyses.knockout`'s, applied at END and at every answer position of the teacher-forced
  answer (:class:`arithlens.tasks.suites.SuiteScorer`). :func:`summarize_transfer` gives the relative drop
  with a paired bootstrap CI over items, per scoring (whole answer / first answer token).
- **Independent localization** (:func:`localize_suite`): chapter 1's *path* patching
  (:func:`arithlens.analyses.patching.patch_heads`) run on a suite's own counterfactual, top-k by Δp(answer);
  :func:`overlap_matrix` compares the top-k sets of every pair (|A∩B| / k and Jaccard).

Written by hand: the tabulation (bootstrap via :func:`arithlens.core.metrics.bootstrap_means`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float
from torch import Tensor

from arithlens.analyses import end_cache, knockout, patching
from arithlens.core import metrics
from arithlens.core.hooks import Head, control_heads, heads_from_frame
from arithlens.core.models import LoadedModel
from arithlens.tasks.suites import Suite, SuiteScorer

SCORINGS = {"correct": "whole answer", "first_correct": "first answer token"}
#: The suffix of the resample-ablation conditions (:func:`knockout_transfer`).
RESAMPLE = " (resample)"


def _majority_share(answers) -> float:
    """The accuracy of always giving the suite's most common answer."""
    counts = Counter(answers)
    return max(counts.values()) / sum(counts.values()) if counts else 0.0


def chance_levels(suite: Suite) -> dict[str, float]:
    """Chance per scoring (:data:`SCORINGS` column → level). The whole answer: the better of guessing
    uniformly (:attr:`Suite.chance`) and always giving the suite's most common answer — a suite whose
    answers are the digits 0–9, or a year that repeats, is not free text. The first answer token of an
    exact-answer suite: the better of 10 % (a digit or word guessed among ten) and always giving the
    suite's most common first token. On a digit-by-digit tokenizer the first token is the first digit,
    and about 30 % of real-world answers start with 1 (Benford's law), so a model that always writes
    ``1…`` is at chance there, not above it."""
    if suite.scoring != "exact":
        return {col: suite.chance for col in SCORINGS}
    return {"correct": max(suite.chance, _majority_share(tuple(it.answer_tokens) for it in suite.items)),
            "first_correct": max(0.1, _majority_share(it.answer_tokens[0] for it in suite.items))}


def usability(suite: Suite, base: pd.DataFrame, margin: float = 0.15, min_correct: int = 8) -> pd.DataFrame:
    """The stated rule for keeping a suite in the drop statistics, per scoring (whole answer, first
    token): accuracy at least ``margin`` above chance (:func:`chance_levels`) and at least ``min_correct``
    items right.
    """
    rows = []
    levels = chance_levels(suite)
    for col, label in SCORINGS.items():
        acc, k = float(base[col].mean()), int(base[col].sum())
        chance = levels[col]
        if acc < chance + margin:
            ok, why = False, f"{acc:.0%} is within {margin:.0%} of chance ({chance:.0%})"
        elif k < min_correct:
            ok, why = False, f"only {k} right (< {min_correct})"
        else:
            ok, why = True, f"{acc:.0%} (chance {chance:.0%})"
        rows.append({"suite": suite.name, "kind": suite.kind, "scoring": label, "metric": col, "n": len(base),
                     "accuracy": acc, "chance": chance, "usable": ok, "reason": why})
    return pd.DataFrame(rows)


def knockout_transfer(model: LoadedModel, suites: dict[str, Suite], heads: Sequence[Head],
                      means: Float[Tensor, "layer head d_head"], n_seeds: int = 5,
                      seed: int = 0, margin: float | None = 0.15, min_correct: int = 8, own_means: bool = False,
                      resample: bool = False, progress=None, scorer=SuiteScorer) -> pd.DataFrame:
    """Per-item scores for each suite × condition (``none``, ``key``, ``random``; random over ``n_seeds``).

    ``means`` are the ablation values (chapter 1: the arithmetic counterfactual mean). With
    ``own_means`` each suite is also ablated with its *own* clean-prompt mean at END (conditions
    ``key (own mean)`` and ``random (own mean)``, same random heads): a mean taken on arithmetic
    prompts is off-distribution for a capital-city prompt, and this separates "the heads matter"
    from "an arithmetic-flavoured value was pasted in". With ``resample`` (a check on the own mean) each
    item's ablated heads also take another item's END value from the same suite's prompts
    (:func:`arithlens.analyses.knockout.resample_z`; conditions ``key (resample)`` and ``random (resample)``):
    no value the suite's own prompts would not produce (suites of two items or more); the scorer must take
    ``item_hooks``.

    A suite gets the ablations only if :func:`usability` (``margin``, ``min_correct``) passes for at
    least one scoring on its unablated run — the model must be able to do it; ``margin=None`` ablates
    every suite. Random heads are drawn like chapter 1's (:func:`arithlens.core.hooks.control_heads`).

    ``scorer(model, suite)`` builds what scores a suite under each condition (``.score(fwd_hooks)``
    returning :class:`SuiteScorer`'s columns): teacher-forced by default; for a benchmark file read by
    :mod:`arithlens.tasks.benchmarks.reader`, e.g. ``lambda m, s: BenchmarkScorer(m, s, "generate")``.
    """
    k = len(heads)
    frames = []
    names = list(suites)
    for name in (progress(names, desc="knockout transfer (suites)") if progress else names):
        run = scorer(model, suites[name])
        base = run.score().assign(condition="none", seed=-1, k=0)
        frames.append(base)
        if not k or (margin is not None and not usability(suites[name], base, margin, min_correct)["usable"].any()):
            continue
        conditions = [("key", -1, heads)] + [
            ("random", seed + s, control_heads(model.n_layers, model.n_heads, k, seed + s))
            for s in range(n_seeds)]
        variants = [("", means)]
        if own_means:
            variants.append((" (own mean)", knockout.mean_z(model, suites[name], "end", which="clean")))
        jobs = [(cond + suffix, s, knockout.ablation_hooks(hs, values, "all"))
                for suffix, values in variants for cond, s, hs in conditions]
        if resample and len(suites[name]) > 1:  # one item has no other to take a value from
            donors = knockout.resample_z(model, suites[name], "clean", seed)
            jobs += [(cond + RESAMPLE, s, knockout.item_ablation_hooks(hs, donors)) for cond, s, hs in conditions]
        many = getattr(run, "score_many", None)
        scored = (many([fwd for _, _, fwd in jobs]) if many else
                  [run.score(item_hooks=fwd) if callable(fwd) else run.score(fwd) for _, _, fwd in jobs])
        frames += [frame.assign(condition=cond, seed=s, k=k) for (cond, s, _), frame in zip(jobs, scored)]
    return pd.concat(frames, ignore_index=True)


def summarize_transfer(scores: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Accuracy per suite × condition × scoring and the relative drop vs no ablation, with a paired
    bootstrap CI over items (random heads: each item's mean over seeds first)."""
    rows = []
    for (suite, kind), part in scores.groupby(["suite", "kind"], sort=False):
        for col, label in SCORINGS.items():
            per_item = part.pivot_table(index="item", columns="condition", values=col, aggfunc="mean")
            base = per_item["none"].to_numpy(float)
            for cond in ["none"] + [c for c in dict.fromkeys(part["condition"]) if c != "none"]:
                vals = per_item[cond].to_numpy(float)
                mean, lo, hi, _ = metrics.bootstrap_means(np.stack([vals, base], 1), n_boot, seed)
                boot = _paired_relative(vals, base, n_boot, seed)
                rows.append({"suite": suite, "kind": kind, "scoring": label, "metric": col, "condition": cond,
                             "accuracy": mean[0], "acc_ci_low": lo[0], "acc_ci_high": hi[0],
                             "base_accuracy": mean[1], "relative_drop": boot[0], "drop_ci_low": boot[1],
                             "drop_ci_high": boot[2], "n": len(vals)})
    return pd.DataFrame(rows)


def _paired_relative(vals: np.ndarray, base: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """(mean(vals) − mean(base)) / mean(base) with a percentile bootstrap over items (resampled in pairs)."""
    if base.mean() == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), size=(n_boot, len(base)))
    b = base[idx].mean(1)
    rel = np.where(b > 0, (vals[idx].mean(1) - b) / np.where(b > 0, b, 1), np.nan)
    point = (vals.mean() - base.mean()) / base.mean()
    return float(point), float(np.nanpercentile(rel, 2.5)), float(np.nanpercentile(rel, 97.5))


def localize_suite(model: LoadedModel, suite: Suite, n_boot: int = 1000, seed: int = 0, progress=None) -> pd.DataFrame:
    """Chapter 1's path patching on ``suite`` (its counterfactual; the first answer token is scored).

    Returns the per-head summary (``metrics.summarize_effects``) of Δp(answer) and relative logit,
    with the suite name; rank it with :func:`arithlens.core.metrics.select_key_heads`.
    """
    if not suite.has_counterfactual:
        raise ValueError(f"suite {suite.name!r} has no counterfactual to localize with")
    caches = end_cache.cache_prompt_set(model, suite, progress=progress)
    effects = patching.patch_heads(model, suite, caches, modes=("path",))
    return metrics.summarize_effects(effects, metrics=("d_prob", "rel_logit"), by=("mode", "layer", "head"),
                                     n_boot=n_boot, seed=seed).assign(suite=suite.name)


def top_heads(summary: pd.DataFrame, k: int, metric: str = "d_prob") -> list[Head]:
    """The ``k`` heads with the most negative mean ``metric`` (chapter 1's ``top_k`` rule)."""
    return heads_from_frame(metrics.select_key_heads(summary[summary["metric"] == metric], "top_k", k=k))


def overlap_matrix(sets: dict[str, list[Head]]) -> pd.DataFrame:
    """Every ordered pair of top-k sets: ``shared`` = |A∩B|, ``shared_frac`` = |A∩B| / k, ``jaccard``."""
    rows = []
    for a, ha in sets.items():
        for b, hb in sets.items():
            sa, sb = set(map(str, ha)), set(map(str, hb))
            k = max(len(sa), len(sb), 1)
            rows.append({"a": a, "b": b, "shared": len(sa & sb), "shared_frac": len(sa & sb) / k,
                         "jaccard": len(sa & sb) / len(sa | sb) if sa | sb else float("nan")})
    return pd.DataFrame(rows)


def attention_of(model: LoadedModel, suite: Suite, heads: Sequence[Head], reference: Sequence[Head] = ()) -> pd.DataFrame:
    """END attention of ``heads`` onto the query's number tokens, its operation token, and other text
    (via :func:`arithlens.analyses.knockout.end_attention_groups`), mean per head; ``in_reference`` marks the
    heads that are also in ``reference`` (e.g. the arithmetic key heads)."""
    table = knockout.end_attention_groups(model, suite, heads, lambda it: {
        "numbers": list(it.number_pos), "operation": [it.op_pos] if it.op_pos is not None else []})
    out = table.groupby(["layer", "head"])[["numbers", "operation", "other"]].mean().reset_index()
    ref = {(h.layer, h.head) for h in reference}
    return out.assign(suite=suite.name, in_reference=[(l, h) in ref for l, h in zip(out["layer"], out["head"])])


def change_text(summary: pd.DataFrame, suite: str, metric: str = "correct") -> str:
    """"−37 % (random heads −3 %)" for one suite and scoring of :func:`summarize_transfer`'s table."""
    rows = summary[(summary["suite"] == suite) & (summary["metric"] == metric)].set_index("condition")["relative_drop"]
    if "key" not in rows:
        return "not ablated (the model cannot do it)"
    return f"{rows['key']:+.0%} (random heads {rows['random']:+.0%})" if "random" in rows else f"{rows['key']:+.0%}"


def drop_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per suite × scoring that was ablated: base accuracy and the relative change under each
    ablation condition, as "−37 % [−58 %, −18 %]" (text; a dash when the base accuracy is 0)."""
    cell = lambda r: (f"{r.relative_drop:+.0%} [{r.drop_ci_low:+.0%}, {r.drop_ci_high:+.0%}]"
                      if pd.notna(r.relative_drop) else "— (base accuracy 0)")
    rows = []
    for (suite, kind, scoring), part in summary.groupby(["suite", "kind", "scoring"], sort=False):
        by = {r.condition: r for r in part.itertuples()}
        if "key" not in by:
            continue
        rows.append({"suite": suite, "kind": kind, "scoring": scoring, "base": by["none"].accuracy,
                     **{cond: cell(r) for cond, r in by.items() if cond != "none"}})
    return pd.DataFrame(rows)

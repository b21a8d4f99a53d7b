"""The statistics behind the verdicts: each interval says what it resampled.

Science wing, claims floor: used by :mod:`arithlens.claims.verdicts` (and nothing else decides a claim).
- :func:`wilson` — a 95 % Wilson score interval of a proportion (statsmodels), for a single accuracy;
  :func:`knockout_intervals` — chapter 1's knockout curve at its largest k, each accuracy with its own.
- :func:`knockout_gap` — chapter 1's knockout, top-k against many layer-matched random sets, *paired by
  prompt*: a two-way bootstrap that resamples prompts and random draws together, so the variance between
  head sets (the main source of variance) is in the interval and no prompt counts twice.
- :func:`transfer_contrast` — chapter 3's pooled relative change per kind of suite, a paired bootstrap
  over items within each suite.
- :func:`recovered` — chapter 1's fraction of the logit difference the top 5 % of heads recover alone,
  bootstrapped over prompts.
- :func:`routed_share` — chapter 2's share of the key heads' joint effect that passes through given MLPs,
  a ratio of means bootstrapped over prompts.
- :func:`holm` — Holm's step-down adjustment of several p-values (statsmodels ``multipletests``).

Written by hand: the two bootstraps (their statistics pool several conditions, which scipy's
``bootstrap`` does not resample jointly); statsmodels gives Wilson and Holm.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from arithlens.claims.findings import TRANSFER_METRIC, Run, transfer_items


def wilson(successes: float, trials: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (statsmodels)."""
    low, high = proportion_confint(round(successes), trials, alpha=0.05, method="wilson")
    return float(low), float(high)


def knockout_intervals(heads_run: Run) -> dict | None:
    """Chapter 1's END knockout at its largest k on the evaluation half of the facts: accuracy and Wilson CI
    with no ablation, with the top-k and with k random heads (every seed's prompts pooled: a picture of the
    curve, not a test — :func:`knockout_gap` is that), or None when no knockout ran."""
    curve = heads_run.table("knockout")
    curve = curve[(curve["positions"] == "end") & (curve["facts"] == "evaluation")]
    if not len(curve) or curve["k"].max() == 0:
        return None
    k = int(curve["k"].max())
    top = curve[(curve["condition"] == "top") & (curve["k"] == k)]
    rnd = curve[(curve["condition"] == "random") & (curve["k"] == k)]
    n = int(top["n_prompts"].iloc[0])
    out = {"k": k, "n_prompts": n, "seeds": len(rnd)}
    for name, part in (("none", curve[curve["condition"] == "none"]), ("top", top), ("random", rnd)):
        trials = int(part["n_prompts"].sum())
        acc = float((part["accuracy"] * part["n_prompts"]).sum() / trials)
        out[name], (out[f"{name}_low"], out[f"{name}_high"]) = acc, wilson(acc * trials, trials)
    return out


def routed_share(routed: pd.DataFrame, joint: pd.DataFrame, layers, metric: str = "d_digit_logprob",
                 n_boot: int = 2000, seed: int = 0) -> dict:
    """The share of the key heads' joint path effect that passes through the MLPs ``layers``: mean over
    prompts of the effect routed through them (chapter 2's per-prompt heads → MLP rows, summed over
    ``layers``) over the mean joint path effect (its ``heads_joint`` rows), a ratio of means with a 95 %
    percentile interval from a bootstrap over prompts (both terms resampled together, paired). Also the
    share of the joint effect that is direct (every MLP frozen)."""
    part = routed[routed["layer"].isin(list(layers))].groupby("prompt")[metric].sum()
    path = joint[joint["mode"] == "path"].set_index("prompt")[metric]
    direct = joint[joint["mode"] == "direct"].set_index("prompt")[metric]
    prompts = path.index.intersection(part.index)
    r, t = part.loc[prompts].to_numpy(float), path.loc[prompts].to_numpy(float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(t), (n_boot, len(t)))
    boots = r[idx].mean(1) / t[idx].mean(1)
    return {"share": float(r.mean() / t.mean()), "low": float(np.percentile(boots, 2.5)),
            "high": float(np.percentile(boots, 97.5)), "joint": float(t.mean()),
            "direct_share": float(direct.loc[prompts].mean() / t.mean()), "n_prompts": len(t)}


def recovered(items: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per ranking, the fraction of the logit difference the top-n heads recover alone, F(n) = (kept −
    ablated) / (clean − ablated) as a ratio of means over prompts (chapter 1's ``few_heads_items``:
    :func:`arithlens.analyses.agreement.kept_items`), with a 95 % percentile interval from a bootstrap over
    prompts (the three conditions resampled together)."""
    rows = []
    rng = np.random.default_rng(seed)
    for ranking, part in items.groupby("ranking", sort=False):
        wide = part.pivot(index="prompt", columns="condition", values="logit_diff")
        c, a, k = (wide[x].to_numpy(float) for x in ("clean", "ablated", "kept"))
        idx = rng.integers(0, len(c), (n_boot, len(c)))
        boots = (k[idx].mean(1) - a[idx].mean(1)) / (c[idx].mean(1) - a[idx].mean(1))
        rows.append({"ranking": ranking, "n": int(part["n"].iloc[0]), "recovered": (k.mean() - a.mean()) / (c.mean() - a.mean()),
                     "low": float(np.percentile(boots, 2.5)), "high": float(np.percentile(boots, 97.5)), "n_prompts": len(c)})
    return pd.DataFrame(rows)


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values (family-wise error over the values given), in their order."""
    p = np.asarray(p_values, dtype=float)
    return multipletests(p, method="holm")[1] if len(p) else p


def knockout_gap(items: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> dict:
    """Accuracy with layer-matched random sets minus accuracy with the top-k heads, per prompt and
    draw (:func:`arithlens.analyses.knockout.matched_knockout`'s rows): the point value and a 95 %
    percentile interval from a two-way bootstrap — prompts and draws each resampled with replacement,
    the same prompts for both arms (paired). Also the one-sided rank p of the top set among the draws,
    (1 + #{draw accuracy ≤ top accuracy}) / (1 + draws), which no more draws than given can make smaller."""
    top = items[items["condition"] == "top"].sort_values("prompt")["correct"].to_numpy(float)
    none = items[items["condition"] == "none"].sort_values("prompt")["correct"].to_numpy(float)
    grid = (items[items["condition"] == "layer_matched"].pivot(index="draw", columns="prompt", values="correct")
            .sort_index(axis=1).to_numpy(float))  # [draw, prompt]
    n_draws, n = grid.shape
    rng = np.random.default_rng(seed)
    p_idx = rng.integers(0, n, (n_boot, n))
    d_idx = rng.integers(0, n_draws, (n_boot, n_draws))
    # mean over resampled draws and prompts of the random arm, less the top arm on the same prompts
    draw_means = np.stack([grid[d_idx[b]][:, p_idx[b]].mean() for b in range(n_boot)])
    boots = draw_means - top[p_idx].mean(1)
    per_draw = grid.mean(1)
    return {"k": int(items["k"].iloc[0]), "n_prompts": n, "draws": n_draws, "none": float(none.mean()),
            "top": float(top.mean()), "random": float(grid.mean()), "gap": float(grid.mean() - top.mean()),
            "low": float(np.percentile(boots, 2.5)), "high": float(np.percentile(boots, 97.5)),
            "rank_p": float((1 + np.sum(per_draw <= top.mean())) / (1 + n_draws))}


def _pooled_change(frames: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator | None) -> float:
    """Mean over suites of (mean(ablated) − mean(base)) / mean(base); ``rng`` resamples each suite's items."""
    out = []
    for vals, base in frames:
        idx = rng.integers(0, len(base), len(base)) if rng is not None else slice(None)
        b = base[idx].mean()
        if b > 0:  # a resample that drew only wrong items has no relative change; it is left out
            out.append((vals[idx].mean() - b) / b)
    return float(np.mean(out)) if out else float("nan")


#: The conditions chapter 3's contrast reads: each suite's heads ablated with that suite's own mean.
OWN_MEAN = " (own mean)"
#: Its check: each item's heads given another item's output (:data:`arithlens.analyses.transfer.RESAMPLE`,
#: named here too so that a comparison reading chapter 3's tables reaches no analysis code).
RESAMPLE = " (resample)"


def transfer_contrast(transfer_run: Run, n_boot: int = 1000, seed: int = 0, suffix: str = OWN_MEAN) -> pd.DataFrame | None:
    """Chapter 3's pooled relative change per kind (whole answer, :data:`arithlens.claims.findings.TRANSFER_METRIC`)
    under key and random heads ablated with each suite's own mean (conditions ending in ``suffix``; ``""``
    reads the arithmetic mean's), key − random on math and the selectivity (control change − math change
    under the key heads), each with a paired bootstrap 95 % CI over items (suites resampled within
    themselves). Only suites chapter 3 judged usable and ablated (:func:`arithlens.claims.findings.transfer_items`).
    None when a kind has none, or chapter 3 did not run the conditions."""
    items = transfer_items(transfer_run)
    data: dict[str, dict[str, list]] = {}
    for kind in TRANSFER_METRIC:
        part = items[items["kind"] == kind]
        if not len(part):
            return None
        data[kind] = {"key": [], "random": []}
        for _, suite in part.groupby("suite", sort=True):
            if suite["none"].mean() == 0:  # a relative change from zero is undefined: the suite cannot count
                continue
            for cond in data[kind]:
                if cond + suffix not in suite:
                    return None
                data[kind][cond].append((suite[cond + suffix].to_numpy(float), suite["none"].to_numpy(float)))
        if not data[kind]["key"]:
            return None

    def stats(rng):
        s = {f"{kind} {cond}": _pooled_change(data[kind][cond], rng) for kind in data for cond in data[kind]}
        s["math key − random"] = s["math key"] - s["math random"]
        s["selectivity"] = s["control key"] - s["math key"]
        return s

    point = stats(None)
    rng = np.random.default_rng(seed)
    boots = pd.DataFrame([stats(rng) for _ in range(n_boot)])
    return pd.DataFrame([{"quantity": q, "value": v, "low": float(np.nanpercentile(boots[q], 2.5)),
                          "high": float(np.nanpercentile(boots[q], 97.5)),
                          "suites": len(data[q.split()[0]]["key"]) if q.split()[0] in data else None}
                         for q, v in point.items()])



"""Summaries over prompts: means with bootstrap confidence intervals, and key-head selection rules.

Ground floor (paper § "Path patching": scores are averaged over prompts; key heads are those past a
threshold). The bootstrap resamples prompts with multinomial weights, so all heads share the same
resamples and the cost is one matrix product. Written by hand: numpy does the arithmetic.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Literal

import numpy as np
import pandas as pd

Rule = Literal["threshold", "top_k", "significant"]

#: The per-prompt effect metrics a patching sweep reports (:func:`arithlens.analyses.end_cache.effects_table`),
#: with the title a page gives each. The last two are shift-invariant (a constant added to every logit
#: changes neither); the paper's relative logit change is not.
METRIC_TITLES = {
    "rel_logit": "relative change of the answer logit (paper's score)",
    "d_prob": "change in p(answer)",
    "d_logit_diff": "change in logit(answer) − best other digit",
    "d_digit_logprob": "change in log p(answer) among the digits",
}
#: Short names for panel titles.
METRIC_SHORT = {"rel_logit": "relative logit change", "d_prob": "Δ p(answer)", "d_logit_diff": "Δ logit difference",
                "d_digit_logprob": "Δ log p(answer | digits)"}


def bootstrap_means(values: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05):
    """Mean over axis 0 with a percentile bootstrap CI and bootstrap standard error.

    ``values``: [n_prompts, n_things]. Returns (mean, ci_low, ci_high, se), each [n_things].
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n  # [n_boot, n_prompts]
    boots = weights @ values  # [n_boot, n_things]
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2], axis=0)
    return values.mean(0), lo, hi, boots.std(0, ddof=1)


def summarize_effects(effects: pd.DataFrame, metrics=tuple(METRIC_TITLES),
                      by=("mode", "layer", "head"), n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Tidy summary: one row per (``by`` group, metric) with mean, CI, standard error and n prompts.

    ``effects`` is per prompt (see :func:`arithlens.analyses.patching.patch_heads`); ``by`` must contain the
    columns that, with ``prompt``, identify a row. The bootstrap resamples prompts.
    """
    by = list(by)
    outer = [c for c in by if c not in ("layer", "head")]
    inner = [c for c in by if c in ("layer", "head")]
    rows = []
    groups = effects.groupby(outer, sort=False) if outer else [((), effects)]
    for key, frame in groups:
        key = key if isinstance(key, tuple) else (key,)
        for metric in metrics:
            if metric not in frame:
                continue
            wide = frame.pivot_table(index="prompt", columns=inner, values=metric, aggfunc="first")
            mean, lo, hi, se = bootstrap_means(wide.to_numpy(), n_boot, seed)
            cols = pd.DataFrame(list(wide.columns), columns=inner) if inner else pd.DataFrame(index=[0])
            block = cols.assign(**dict(zip(outer, key)), metric=metric, mean=mean, ci_low=lo, ci_high=hi, se=se,
                                n=len(wide))
            rows.append(block)
    out = pd.concat(rows, ignore_index=True)
    return out[outer + inner + ["metric", "mean", "ci_low", "ci_high", "se", "n"]]


def select_key_heads(summary: pd.DataFrame, rule: Rule = "threshold", threshold: float = -0.05, k: int = 10,
                     alpha: float = 0.05, min_effect: float = 0.0) -> pd.DataFrame:
    """Key heads from one mode's and one metric's summary (rows: layer, head, mean, se, ...).

    * ``threshold`` — mean effect ≤ ``threshold`` (the paper: relative logit ≤ −5 %);
    * ``top_k`` — the ``k`` most negative mean effects;
    * ``significant`` — one-sided z-test of mean < 0 with the bootstrap standard error, Bonferroni-
      corrected over all heads: mean / se < −z(1 − alpha / n_heads), and mean ≤ −``min_effect``
      (with hundreds of prompts, many heads have tiny but consistent effects).
    Returned sorted from most negative; may be empty (a finding, not an error).
    """
    ranked = summary.sort_values("mean").reset_index(drop=True)
    if rule == "threshold":
        chosen = ranked[ranked["mean"] <= threshold]
    elif rule == "top_k":
        if k > len(ranked):
            raise ValueError(f"k={k} is larger than the number of heads ({len(ranked)})")
        chosen = ranked.head(k)
    elif rule == "significant":
        z = NormalDist().inv_cdf(1 - alpha / len(ranked))
        chosen = ranked[(ranked["mean"] / ranked["se"].clip(lower=1e-12) < -z) & (ranked["mean"] <= -min_effect)]
    else:
        raise ValueError(f"unknown rule {rule!r}: choose threshold, top_k or significant")
    return chosen.reset_index(drop=True)

"""Agreement between head rankings: rank correlation, top-k overlap and faithfulness curves.

Science wing, after :mod:`arithlens.analyses.patching` and :mod:`arithlens.analyses.attribution` (paper § "Path
patching (head localization)" ranks heads by exact patching; here we go beyond it and ask whether a
cheaper ranking — attribution patching, EAP-IG, or chance — picks the same heads, and whether the
heads it picks carry the behaviour). Three measures, all over the per-head *mean* effect across
prompts of one mode and one metric (a table laid out like :func:`arithlens.analyses.patching.patch_heads`,
with a ``method`` column, e.g. :func:`arithlens.analyses.attribution.compare_with_exact`):

* :func:`rank_agreement` — Spearman's ρ over all heads (``scipy.stats.spearmanr``), the Jaccard
  overlap of the top-k heads, k = 5, 10, 20 capped at the number of heads, and the *screen size*
  (:func:`screen_size`): how many of a cheap ranking's top heads one must measure exactly to be sure
  of the exact top-k — what a screen-then-measure localization (rank every head cheaply, patch
  only the top N exactly) needs for N;
* :func:`faithfulness_curve` — keep the top-n heads of a ranking, mean-ablate every other head at
  END (:func:`arithlens.analyses.knockout.mean_z`, :func:`arithlens.analyses.knockout.ablation_hooks`), and measure
  the mean logit difference m = answer logit − best other digit's logit at END over the prompts.
  The **fraction recovered** is

      F(n) = (m(keep top-n) − m(all heads ablated)) / (m(clean) − m(all heads ablated)),

  so F(0) = 0 and F(n_heads) = 1 by construction, and a ranking whose curve rises faster has put
  the heads that carry the clean behaviour first (the CPR / faithfulness curve of circuit papers);
  m is the ratio of means over prompts, not a mean of per-prompt ratios (those explode where a
  prompt's denominator is near zero).

"Top" means most negative mean effect (``order="negative"``; patching in the counterfactual lowers
the answer's score at the heads the paper keeps, and :func:`arithlens.core.metrics.select_key_heads` sorts
the same way) or largest |mean| (``order="abs"``). Written by hand; scipy computes ρ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from arithlens.core.conditions import end_only_many
from arithlens.core.hooks import Head, digit_tokens, scores_from_logits
from arithlens.core.items import ItemSet, answer_batches
from arithlens.analyses.knockout import ablation_hooks
from arithlens.core.models import LoadedModel

Order = Literal["negative", "abs"]
KS: tuple[int, ...] = (5, 10, 20)


def mean_effects(table: pd.DataFrame, metric: str = "rel_logit") -> pd.DataFrame:
    """One row per (method, mode, layer, head): the mean of ``metric`` over prompts."""
    by = [c for c in ("method", "mode") if c in table] + ["layer", "head"]
    return table.groupby(by, sort=True)[metric].mean().rename("mean").reset_index()


def rank_heads(means: pd.DataFrame, order: Order = "negative") -> list[Head]:
    """Heads of one (method, mode) from first to last: most negative mean first, or largest |mean|;
    ties broken by (layer, head) so a ranking is reproducible."""
    key = means["mean"] if order == "negative" else -means["mean"].abs()
    ranked = means.assign(_key=key.to_numpy()).sort_values(["_key", "layer", "head"], kind="stable")
    return [Head(int(l), int(h)) for l, h in zip(ranked["layer"], ranked["head"])]


def rankings_from_table(table: pd.DataFrame, mode: str, metric: str = "rel_logit",
                        order: Order = "negative") -> dict[str, list[Head]]:
    """Each method's ranking of the heads in one mode (``table`` as for :func:`mean_effects`)."""
    means = mean_effects(table[table["mode"] == mode], metric)
    return {str(m): rank_heads(part, order) for m, part in means.groupby("method", sort=False)}


def random_ranking(n_layers: int, n_heads: int, seed: int) -> list[Head]:
    """Every head once, in an order drawn with ``np.random.default_rng(seed)``: the chance baseline."""
    heads = [Head(l, h) for l in range(n_layers) for h in range(n_heads)]
    return [heads[i] for i in np.random.default_rng(seed).permutation(len(heads))]


def jaccard(a: Sequence[Head], b: Sequence[Head]) -> float:
    """|A ∩ B| / |A ∪ B| of two head sets (1.0 for two empty sets)."""
    sa, sb = set(a), set(b)
    return 1.0 if not sa | sb else len(sa & sb) / len(sa | sb)


def screen_size(reference: Sequence[Head], estimate: Sequence[Head], k: int) -> int:
    """The smallest N such that ``reference``'s top ``k`` heads all lie in ``estimate``'s top N."""
    where = {h: i for i, h in enumerate(estimate)}
    return max(where[h] for h in reference[:k]) + 1 if k else 0


def rank_agreement(table: pd.DataFrame, metric: str = "rel_logit", reference: str = "exact",
                   ks: Sequence[int] = KS, order: Order = "negative") -> pd.DataFrame:
    """How each method's head ranking agrees with ``reference``'s, per mode. Tidy: one row per
    (mode, method, measure, k) with ``measure`` ``spearman`` (k = number of heads; ``p_value`` the
    test of ρ = 0), ``jaccard`` (top-k overlap, k capped at the number of heads) or ``screen`` (the
    method's top N that holds the reference's top k, :func:`screen_size`)."""
    from scipy.stats import spearmanr

    means = mean_effects(table, metric)
    rows = []
    for mode, part in means.groupby("mode", sort=False):
        ref = part[part["method"] == reference].set_index(["layer", "head"])["mean"]
        if ref.empty:
            raise ValueError(f"no {reference!r} rows for mode {mode!r}")
        ref_rank = rank_heads(ref.reset_index(), order)
        for method, other in part[part["method"] != reference].groupby("method", sort=False):
            est = other.set_index(["layer", "head"])["mean"].reindex(ref.index)
            if est.isna().any():
                raise ValueError(f"{method!r} does not score every head that {reference!r} scores in mode {mode!r}")
            a, b = (ref.to_numpy(), est.to_numpy()) if order == "negative" else (ref.abs().to_numpy(), est.abs().to_numpy())
            rho, p = spearmanr(a, b)
            rows.append({"mode": mode, "method": method, "measure": "spearman", "k": len(ref), "value": float(rho),
                         "p_value": float(p)})
            est_rank = rank_heads(est.reset_index(), order)
            for k in sorted({min(k, len(ref)) for k in ks}):
                rows.append({"mode": mode, "method": method, "measure": "jaccard", "k": k,
                             "value": jaccard(ref_rank[:k], est_rank[:k]), "p_value": np.nan})
                rows.append({"mode": mode, "method": method, "measure": "screen", "k": k,
                             "value": float(screen_size(ref_rank, est_rank, k)), "p_value": np.nan})
    return pd.DataFrame(rows, columns=["mode", "method", "measure", "k", "value", "p_value"])


class LogitDiffEvaluator:
    """Mean logit difference at END with heads mean-ablated at END, many head sets at once
    (:meth:`logit_diffs`): batch-major, so each batch's clean prefix KV cache is made once for every
    set and dropped before the next batch, the sets stacked along the batch
    (:func:`arithlens.core.conditions.end_only_many`, as :func:`arithlens.core.conditions.correct_at_end`)."""

    def __init__(self, model: LoadedModel, prompts: ItemSet, means: Float[Tensor, "layer head d_head"],
                 batch_size: int = 64):
        self.model, self.prompts, self.means = model, prompts, means
        self.digits = digit_tokens(model.tokenizer).to(model.device)
        self.batches = answer_batches(prompts.items, batch_size, model.device)

    @torch.no_grad()
    def per_prompt(self, ablated_sets: Sequence[Sequence[Head]], progress=None) -> np.ndarray:
        """For each head set, answer − best other digit at END of every prompt with those heads
        mean-ablated at END: ``sets × prompts`` (prompts in the set's order). ``progress`` (tqdm-like)
        counts batches."""
        fwds = [ablation_hooks(list(heads), self.means, "end") for heads in ablated_sets]
        out = np.zeros((len(fwds), len(self.prompts)))
        todo = progress(self.batches, desc=f"logit difference ({len(fwds)} head sets per batch)") if progress else self.batches
        for b, tokens, answers in todo:
            diffs = end_only_many(self.model, tokens, fwds,
                                  read=lambda logits: scores_from_logits(logits, answers, self.digits, False).logit_diff)
            for c, diff in enumerate(diffs):
                out[c, b] = diff.double().cpu().numpy()
        return out

    def logit_diffs(self, ablated_sets: Sequence[Sequence[Head]], progress=None) -> list[float]:
        """For each head set, the mean over prompts of :meth:`per_prompt`."""
        return [float(m) for m in self.per_prompt(ablated_sets, progress).mean(1)]

    def logit_diff(self, ablated: Sequence[Head]) -> float:
        """Mean over prompts of answer − best other digit at END with ``ablated`` mean-ablated at END."""
        return self.logit_diffs([ablated])[0]


def faithfulness_curve(evaluator: LogitDiffEvaluator, rankings: Mapping[str, Sequence[Head]],
                       n_values: Sequence[int] | None = None, progress=None) -> pd.DataFrame:
    """Fraction recovered F(n) (module docstring) when only each ranking's top-n heads are kept.

    Tidy: one row per (ranking, n) with ``n_heads`` (all heads), ``logit_diff`` m(keep top-n),
    ``m_clean``, ``m_ablated`` and ``fraction_recovered``. Every ranking must order the same,
    complete set of heads; ``n_values`` defaults to 0 … n_heads. Every head set is evaluated in one
    batch-major pass (:meth:`LogitDiffEvaluator.logit_diffs`; ``progress`` counts its batches).
    """
    model = evaluator.model
    everything = [Head(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
    for name, ranking in rankings.items():
        if sorted(ranking) != everything:
            raise ValueError(f"ranking {name!r} does not order every head exactly once")
    n_values = list(range(len(everything) + 1)) if n_values is None else sorted(set(n_values))
    if n_values and (n_values[0] < 0 or n_values[-1] > len(everything)):
        raise ValueError(f"n must lie in 0..{len(everything)}")
    jobs = [(name, n) for name in rankings for n in n_values]
    ablated = [[], everything] + [list(rankings[name][n:]) for name, n in jobs if 0 < n < len(everything)]
    m_clean, m_ablated, *rest = evaluator.logit_diffs(ablated, progress)
    kept = iter(rest)
    rows = []
    for name, n in jobs:
        m = m_ablated if n == 0 else m_clean if n == len(everything) else next(kept)
        rows.append({"ranking": name, "n": n, "n_heads": len(everything), "logit_diff": m, "m_clean": m_clean,
                     "m_ablated": m_ablated,
                     "fraction_recovered": (m - m_ablated) / (m_clean - m_ablated)})
    return pd.DataFrame(rows)


def kept_items(evaluator: LogitDiffEvaluator, rankings: Mapping[str, Sequence[Head]], n: int,
               progress=None) -> pd.DataFrame:
    """Per prompt, the logit difference with nothing ablated (``clean``), with every head ablated
    (``ablated``) and with only each ranking's top-``n`` heads kept (``kept``): the rows an interval on
    the fraction recovered F(n) needs (long form: ``ranking``, ``condition``, ``prompt``, ``logit_diff``)."""
    model = evaluator.model
    everything = [Head(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
    names = list(rankings)
    values = evaluator.per_prompt([[], everything] + [list(rankings[r][n:]) for r in names], progress)
    rows = []
    for i, name in enumerate(names):
        for cond, row in (("clean", values[0]), ("ablated", values[1]), ("kept", values[2 + i])):
            rows += [{"ranking": name, "condition": cond, "prompt": p, "logit_diff": float(v), "n": n}
                     for p, v in enumerate(row)]
    return pd.DataFrame(rows)


def curve_area(curve: pd.DataFrame) -> pd.DataFrame:
    """Area under each ranking's F(n) curve over the n measured, n / n_heads ∈ [0, 1] (trapezoids):
    near 1 when the first heads recover everything; a chance ranking of additive heads gives about 0.5."""
    rows = []
    for name, part in curve.sort_values("n").groupby("ranking", sort=False):
        x = part["n"].to_numpy() / part["n_heads"].to_numpy()
        y = part["fraction_recovered"].to_numpy()
        rows.append({"ranking": name, "area": float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))})
    return pd.DataFrame(rows)


def agreement_table(table: pd.DataFrame, metrics: Sequence[str], reference: str = "exact",
                    ks: Sequence[int] = KS, order: Order = "negative") -> pd.DataFrame:
    """:func:`rank_agreement` for each of ``metrics``, stacked with a ``metric`` column."""
    return pd.concat([rank_agreement(table, m, reference, ks, order).assign(metric=m) for m in metrics],
                     ignore_index=True)

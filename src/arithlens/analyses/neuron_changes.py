"""How fine-tuning moves MLP neurons: per-neuron activation changes and whether two deltas agree.

Science wing (joins the paper's § "Precise SFT" to § "MLP tracing" at the level of neurons): a
fine-tuning delta — chapter 4's Precise SFT, or its baselines, LoRA and random heads — is applied to
the model, and the neurons of the answer-writing MLPs (:mod:`arithlens.analyses.neurons`) are read at
END before and after.

* :func:`activation_change` — two models (a base and its fine-tuned copy), one MLP layer: each
  neuron's mean activation before and after, per operator;
* :func:`tuning_change` — one delta (:class:`arithlens.core.deltas.Delta`) applied and taken back:
  each neuron's mean change, grouped into the top neurons of a ranking and the rest;
  :func:`change_summary` — do the top neurons move more (Mann–Whitney U);
* :func:`tuning_comparison` — do two deltas move the same neurons (Spearman's ρ, IoU of the most moved).

Written by hand; scipy does the tests.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from arithlens.analyses.neurons import Neuron, end_activations
from arithlens.core.deltas import applied
from arithlens.core.items import Item
from arithlens.core.models import LoadedModel


def activation_change(before: LoadedModel, after: LoadedModel, items: Sequence[Item], layer: int,
                      neurons: Sequence[int] | None = None) -> pd.DataFrame:
    """How ``neurons`` of MLP ``layer`` (all if None) change at END from ``before`` to ``after`` (e.g. a
    base model and its fine-tuned copy). One row per (operator, neuron): mean activation before and
    after, mean change and mean |change| over that operator's items."""
    h0 = end_activations(before, items, [layer])[:, 0]
    h1 = end_activations(after, items, [layer])[:, 0]
    idx = list(range(h0.shape[1])) if neurons is None else list(neurons)
    h0, h1 = h0[:, idx], h1[:, idx]
    ops = np.array([it.operator for it in items])
    frames = []
    for op in dict.fromkeys(ops):
        sel = torch.from_numpy(ops == op)
        d = h1[sel] - h0[sel]
        frames.append(pd.DataFrame({"operator": op, "layer": layer, "neuron": idx, "before": h0[sel].mean(0).numpy(),
                                    "after": h1[sel].mean(0).numpy(), "change": d.mean(0).numpy(),
                                    "abs_change": d.abs().mean(0).numpy(), "n": int(sel.sum())}))
    return pd.concat(frames, ignore_index=True)


def tuning_change(model: LoadedModel, items: Sequence[Item], layers: Sequence[int], delta,
                  ranking: Sequence[Neuron], top_n: int) -> pd.DataFrame:
    """How a fine-tuning delta (:class:`arithlens.core.deltas.Delta`, e.g. chapter 4's saved Precise
    SFT) moves the neurons of ``layers`` at END on ``items``: one row per neuron with its mean change,
    mean |change| and ``group`` — ``top`` for the first ``top_n`` of ``ranking``, else ``rest``. The
    model's weights are restored afterwards (:func:`arithlens.core.deltas.applied`)."""
    before = end_activations(model, items, layers)
    with applied(model, delta):
        after = end_activations(model, items, layers)
    change = (after - before).float()
    top = {(n.layer, n.neuron) for n in list(ranking)[:top_n]}
    rows = [{"layer": layer, "neuron": j, "change": float(change[:, i, j].mean()),
             "abs_change": float(change[:, i, j].abs().mean()),
             "group": "top" if (layer, j) in top else "rest"}
            for i, layer in enumerate(layers) for j in range(change.shape[-1])]
    return pd.DataFrame(rows)


def change_summary(change: pd.DataFrame) -> pd.DataFrame:
    """:func:`tuning_change` per group: neurons, mean |change|, and for ``top`` the ratio to ``rest`` with a
    one-sided Mann–Whitney U p-value (scipy) that the top neurons move more."""
    from scipy.stats import mannwhitneyu

    top, rest = change[change["group"] == "top"]["abs_change"], change[change["group"] == "rest"]["abs_change"]
    p = float(mannwhitneyu(top, rest, alternative="greater").pvalue) if len(top) and len(rest) else float("nan")
    return pd.DataFrame([{"group": g, "neurons": len(v), "mean |change|": float(v.mean()) if len(v) else float("nan"),
                          "÷ rest": _ratio(float(v.mean()), float(rest.mean())) if len(v) and len(rest) else float("nan"),
                          "p (top moves more)": p if g == "top" else float("nan")}
                         for g, v in (("top", top), ("rest", rest))])


def tuning_comparison(changes: Mapping[str, pd.DataFrame], top_n: int) -> pd.DataFrame:
    """Do several fine-tuning deltas move the *same* neurons? ``changes``: method name → its
    :func:`tuning_change` frame over the same neurons. One row per pair of methods: Spearman's ρ
    (scipy) of the neurons' mean |change| and of their signed mean change, and the IoU of the two
    methods' ``top_n`` most-moved neurons (by mean |change|)."""
    from scipy.stats import spearmanr

    indexed = {name: frame.set_index(["layer", "neuron"]).sort_index() for name, frame in changes.items()}
    moved = {name: set(frame["abs_change"].nlargest(top_n).index) for name, frame in indexed.items()}
    rows = []
    for a, b in itertools.combinations(indexed, 2):
        x, y = indexed[a].align(indexed[b], join="inner")
        if len(x) != len(indexed[a]) or len(y) != len(indexed[b]):
            raise ValueError(f"{a!r} and {b!r} were measured on different neurons")
        union = moved[a] | moved[b]
        rows.append({"method": a, "other": b, "neurons": len(x),
                     "ρ |change|": float(spearmanr(x["abs_change"], y["abs_change"]).statistic),
                     "ρ change": float(spearmanr(x["change"], y["change"]).statistic),
                     f"IoU of top-{top_n} moved": len(moved[a] & moved[b]) / len(union) if union else float("nan")})
    return pd.DataFrame(rows)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (float("inf") if a > 0 else float("nan"))

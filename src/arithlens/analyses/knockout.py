"""Knockout: mean-ablate (or resample-ablate) heads and measure accuracy; END-token attention roles of heads.

Science wing (paper § "Knockout" and "Attention analysis"). A knocked-out head's ``hook_z`` is
replaced by its mean over the counterfactual prompts — at END only (``positions="end"``: the clean
prefix's keys and values are reused and only the last position recomputed, see
:func:`arithlens.core.hooks.end_only_logits`) or at every position (``"all"``, with the mean taken over
all counterfactual positions, since templates differ in length). Nothing below a set's lowest ablated
layer changes at every position either, so each batch's clean residual stream is computed once and
each set runs only from its lowest ablated layer up (:func:`every_position_logits`, on the plain HF
twin's layer loop, :mod:`arithlens.core.twin`), where that loop is checked for the architecture;
elsewhere each set is one full hooked pass. Top-ranked heads
are compared with the same number of random heads drawn uniformly from all heads, over several seeds
(:func:`arithlens.core.hooks.control_heads`), and, per prompt, with many layer-matched random sets
(:func:`matched_knockout`). Resample ablation — each item's heads take another item's END value
(:func:`resample_z`, :func:`item_ablation_hooks`) — is the check on the mean: it keeps the heads'
output on the data's own distribution.

Written by hand on TransformerLens hooks (and, for the every-position runs, on the model's own layers
with a pre-hook on each ``o_proj``); nothing else does mean ablation over END-only reruns or from the
lowest ablated layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from arithlens.core import hooks, layout
from arithlens.core.conditions import correct_at_end
from arithlens.core.hooks import Head, Hook, control_heads, layer_matched_random_sets
from arithlens.core.items import Item, ItemSet, answer_batches, length_batches, to_tokens
from arithlens.core.models import LoadedModel, last_position_only
from arithlens.core.twin import LAYER_LOOP_CHECKED, TailFromLayer, twin_of
from arithlens.tasks.prompts import PromptSet

Positions = Literal["end", "all"]


class _LastLayerRead(Exception):
    """Raised by :func:`mean_z`'s hook on the last layer's ``hook_z``: nothing after it is needed."""


@torch.no_grad()
def mean_z(model: LoadedModel, prompts: ItemSet, positions: Positions = "end", batch_size: int = 32,
           which: Literal["clean", "counterfactual"] = "counterfactual") -> Float[Tensor, "layer head d_head"]:
    """Mean of every head's ``hook_z`` over the counterfactual prompts (at END, or over all positions);
    ``which="clean"`` averages the clean prompts instead (for sets without a counterfactual, such as
    a transfer suite).

    Each layer's hook adds its batch sum as the pass goes, and the last layer's stops the pass: the
    last MLP, the final norm and the full-vocabulary logits at every position (for a batch of 32
    three-shot prompts on SmolLM2, ~0.4 GB) are never computed.
    """
    n = model.n_layers
    total = torch.zeros(n, model.n_heads, model.cfg.d_head, device=model.device)

    def add(z, hook=None, layer=0):
        total[layer] += (z[:, -1:] if positions == "end" else z).float().sum((0, 1))
        if layer == n - 1:
            raise _LastLayerRead
        return z
    fwd = [(hooks.hook_z(l), functools.partial(add, layer=l)) for l in range(n)]
    count = 0
    for batch in length_batches(prompts.items, batch_size):
        tokens = to_tokens([prompts.items[i] for i in batch], which).to(model.device)
        try:
            model.bridge.run_with_hooks(tokens, fwd_hooks=fwd)
        except _LastLayerRead:
            pass
        count += tokens.shape[0] * (1 if positions == "end" else tokens.shape[1])
    return total / count


@torch.no_grad()
def end_z(model: LoadedModel, prompts: ItemSet, which: Literal["clean", "counterfactual"] = "counterfactual",
          batch_size: int = 32) -> Float[Tensor, "item layer head d_head"]:
    """Every head's ``hook_z`` at END for each item's clean or counterfactual prompt (fp32)."""
    names = [hooks.hook_z(l) for l in range(model.n_layers)]
    out = None
    for b in length_batches(prompts.items, batch_size):
        tokens = to_tokens([prompts.items[i] for i in b], which).to(model.device)
        _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n in names, **last_position_only(model))
        z = torch.stack([cache[n][:, -1] for n in names], 1).float()
        if out is None:
            out = z.new_zeros(len(prompts.items), *z.shape[1:])
        out[torch.as_tensor(b, device=z.device)] = z
    return out


def resample_donors(n: int, seed: int = 0) -> np.ndarray:
    """For each of ``n`` items the item it takes its ablation value from: a derangement (never itself)
    drawn with ``np.random.default_rng(seed)`` — a random cyclic shift of a random order."""
    if n < 2:
        raise ValueError("resample ablation needs at least two items")
    rng = np.random.default_rng(seed)
    shift = rng.integers(1, n)
    order = rng.permutation(n)
    donor = np.empty(n, dtype=np.int64)
    donor[order] = order[(np.arange(n) + shift) % n]
    return donor


def resample_z(model: LoadedModel, prompts: ItemSet, which: Literal["clean", "counterfactual"] = "counterfactual",
               seed: int = 0, batch_size: int = 32) -> Float[Tensor, "item layer head d_head"]:
    """Resample ablation values: item i gets item π(i)'s END ``hook_z`` (:func:`resample_donors`)."""
    z = end_z(model, prompts, which, batch_size)
    return z[torch.as_tensor(resample_donors(len(prompts.items), seed), device=z.device)]


def _by_layer(heads: Sequence[Head]) -> dict[int, list[int]]:
    """The heads of each layer: ``{layer: [head, …]}``."""
    by_layer: dict[int, list[int]] = {}
    for h in heads:
        by_layer.setdefault(h.layer, []).append(h.head)
    return by_layer


def item_ablation_hooks(heads: Sequence[Head], values: Float[Tensor, "item layer head d_head"]
                        ) -> Callable[[np.ndarray], list[Hook]]:
    """For a batch of item indices, hooks that set ``heads``' ``hook_z`` to each item's own row of
    ``values`` at every position run (END, and the answer positions a teacher-forced scorer reruns)."""
    by_layer = _by_layer(heads)

    def hooks_for(b: np.ndarray) -> list[Hook]:
        rows = values[torch.as_tensor(np.asarray(b), device=values.device)]
        fwd = []
        for layer, hs in by_layer.items():
            def hook(z, hook=None, layer=layer, hs=hs):  # bound per layer: hook.name is the internal name
                z = z.clone()
                z[:, :, hs] = rows[:, None, layer, hs].to(z.dtype)
                return z
            fwd.append((hooks.hook_z(layer), hook))
        return fwd
    return hooks_for


def ablation_hooks(heads: Sequence[Head], means: Float[Tensor, "layer head d_head"],
                   positions: Positions) -> list[Hook]:
    """Hooks that mean-ablate ``heads`` (replace their ``hook_z`` by ``means``) at END or at every position."""
    by_layer = _by_layer(heads)
    fwd = []
    for layer, hs in by_layer.items():
        def hook(z, hook=None, layer=layer, hs=hs):  # bind per layer: hook.name is the internal name
            z = z.clone()
            value = means[layer, hs].to(z.dtype)
            if positions == "end":
                z[:, -1, hs] = value
            else:
                z[:, :, hs] = value
            return z
        fwd.append((hooks.hook_z(layer), hook))
    return fwd

@torch.no_grad()
def every_position_logits(twin: torch.nn.Module, tokens: Tensor, head_sets: Sequence[Sequence[Head]],
                          means: Float[Tensor, "layer head d_head"]) -> list[Float[Tensor, "batch d_vocab"]]:
    """Logits at END with each of ``head_sets`` mean-ablated at every position, from its lowest layer.

    One clean pass through the twin's layers keeps the residual stream entering each set's lowest
    ablated layer (:class:`arithlens.core.twin.TailFromLayer`, no prefix cache); each set then runs from
    there up under :func:`ablation_hooks` at every position, and only END is unembedded. The empty set
    reads the clean pass's logits. Agrees with one full hooked pass per set to float rounding."""
    n_layers = len(twin.model.layers)
    starts = [min((h.layer for h in heads), default=n_layers) for heads in head_sets]
    route = TailFromLayer(twin, tokens, None, upto=max(starts), keep=set(starts))
    return [route.logits(ablation_hooks(heads, means, "all"), last_only=True)[:, -1] for heads in head_sets]


class KnockoutEvaluator:
    """Accuracy under ablation of head sets, many sets at once (:meth:`correct_many`): at END, each
    batch's clean prefix KV cache is made once for every set and dropped before the next batch."""

    def __init__(self, model: LoadedModel, prompts: ItemSet, means: Float[Tensor, "layer head d_head"],
                 positions: Positions = "end", batch_size: int = 64):
        if positions not in ("end", "all"):
            raise ValueError(f"positions must be 'end' or 'all', got {positions!r}")
        self.model, self.prompts, self.means, self.positions = model, prompts, means, positions
        self.batches = answer_batches(prompts.items, batch_size, model.device)
        #: every-position sets run from their lowest ablated layer on the twin where its layer loop is checked
        self.from_lowest = positions == "all" and layout.architecture(model) in LAYER_LOOP_CHECKED

    def correct_many(self, head_sets: Sequence[Sequence[Head]], progress=None) -> np.ndarray:
        """Per-item greedy correctness with each of ``head_sets`` mean-ablated: ``sets × items`` bools."""
        if self.from_lowest:
            out = np.zeros((len(head_sets), len(self.prompts)), dtype=bool)
            todo = progress(self.batches, desc=f"knockout (all, {len(head_sets)} sets per batch)") if progress else self.batches
            for b, tokens, answers in todo:
                for j, logits in enumerate(every_position_logits(twin_of(self.model), tokens, head_sets, self.means)):
                    out[j, b] = (logits.argmax(-1) == answers).cpu().numpy()
            return out
        fwds = [ablation_hooks(heads, self.means, self.positions) for heads in head_sets]
        return correct_at_end(self.model, self.batches, len(self.prompts), [lambda b, f=f: f for f in fwds],
                              end_only=self.positions == "end", progress=progress, desc=f"knockout ({self.positions})")

    def correct(self, heads: Sequence[Head]) -> np.ndarray:
        """Per-item greedy correctness with ``heads`` mean-ablated."""
        return self.correct_many([heads])[0]

    def accuracy(self, heads: Sequence[Head]) -> float:
        return float(self.correct(heads).mean())


def knockout_curve(evaluator: KnockoutEvaluator, ranking: Sequence[Head], k_values, n_seeds: int = 5,
                   seed: int = 0, progress=None) -> pd.DataFrame:
    """Accuracy with the top-k ranked heads vs k random heads (``n_seeds`` draws) ablated, per k.

    One row per (condition, k, seed); condition ``none`` (k = 0) is the unablated accuracy. Every
    condition runs in one batch-major pass (:meth:`KnockoutEvaluator.correct_many`).
    """
    model = evaluator.model
    k_values = list(k_values)
    if k_values and max(k_values) > len(ranking):
        raise ValueError(f"k={max(k_values)} exceeds the {len(ranking)} ranked heads")
    jobs = ([("none", 0, -1)] + [("top", k, -1) for k in k_values]
            + [("random", k, seed + s) for k in k_values for s in range(n_seeds)])
    head_sets = [[] if cond == "none" else ranking[:k] if cond == "top"
                 else control_heads(model.n_layers, model.n_heads, k, s) for cond, k, s in jobs]
    accuracy = evaluator.correct_many(head_sets, progress).mean(1)
    rows = [{"condition": cond, "k": k, "seed": s, "accuracy": float(a)} for (cond, k, s), a in zip(jobs, accuracy)]
    return pd.DataFrame(rows).assign(positions=evaluator.positions, n_prompts=len(evaluator.prompts))


def matched_knockout(evaluator: KnockoutEvaluator, top_heads: Sequence[Head], n_draws: int = 20, seed: int = 0,
                     progress=None) -> pd.DataFrame:
    """Per-prompt correctness with nothing ablated, with ``top_heads`` and with ``n_draws`` layer-matched
    random sets (:func:`arithlens.core.hooks.layer_matched_random_sets`: as many heads in each layer,
    never a top head), all in one batch-major pass. Long form: ``condition`` (``none``, ``top``,
    ``layer_matched``), ``draw`` (−1 for the first two), ``prompt``, ``correct``, ``k``: the rows a paired
    interval over prompts and draws needs."""
    model = evaluator.model
    draws = layer_matched_random_sets(top_heads, model.n_layers, model.n_heads, n_draws, seed)
    jobs = [("none", -1, [])] + [("top", -1, list(top_heads))] + [("layer_matched", d, s) for d, s in enumerate(draws)]
    correct = evaluator.correct_many([heads for _, _, heads in jobs], progress)
    n = correct.shape[1]
    return pd.DataFrame({"condition": np.repeat([c for c, _, _ in jobs], n), "draw": np.repeat([d for _, d, _ in jobs], n),
                         "prompt": np.tile(np.arange(n), len(jobs)), "correct": correct.ravel().astype(bool)}
                        ).assign(k=len(top_heads), positions=evaluator.positions)


def summarize_curve(curve: pd.DataFrame) -> pd.DataFrame:
    """One row per ablation site at its largest k: accuracy without ablation, with the top-k heads,
    and with k random heads (mean, min and max over seeds)."""
    rows = []
    for pos, part in curve.groupby("positions", sort=False):
        kmax = int(part["k"].max())
        rnd = part[(part["condition"] == "random") & (part["k"] == kmax)]["accuracy"]
        rows.append({"ablated at": pos, "k": kmax,
                     "no ablation": part[part["condition"] == "none"]["accuracy"].mean(),
                     "top-k": part[(part["condition"] == "top") & (part["k"] == kmax)]["accuracy"].mean(),
                     "random-k (mean)": rnd.mean(), "random-k (min)": rnd.min(), "random-k (max)": rnd.max()})
    return pd.DataFrame(rows)


@torch.no_grad()
def end_attention_groups(model: LoadedModel, prompts: ItemSet, heads: Sequence[Head],
                         groups: Callable[[Item], dict[str, list[int]]], batch_size: int = 32) -> pd.DataFrame:
    """END-token attention of each head onto named groups of positions, the rest as ``other``.

    ``groups(item) -> {name: [positions]}`` (same names for every item); ``prompts`` is anything with
    ``.items`` of equal-length-batchable items (a :class:`PromptSet` or a transfer suite). One row per
    (prompt, layer, head) with one column per group and ``other`` (summing to 1).
    """
    layers = sorted({h.layer for h in heads})
    names = [hooks.hook_pattern(l) for l in layers]
    rows = []
    for b in length_batches(prompts.items, batch_size):
        items = [prompts.items[i] for i in b]
        _, cache = model.bridge.run_with_cache(to_tokens(items).to(model.device), names_filter=lambda n: n in names,
                                               **last_position_only(model))
        for h in heads:
            pat = cache[hooks.hook_pattern(h.layer)][:, h.head, -1].float().cpu()  # [batch, key]
            for j, it in enumerate(items):
                shares = {g: float(pat[j, list(pos)].sum()) if len(pos) else 0.0 for g, pos in groups(it).items()}
                rows.append({"prompt": b[j], "operator": it.operator, "layer": h.layer, "head": h.head,
                             **shares, "other": 1.0 - sum(shares.values())})
    return pd.DataFrame(rows)


def end_attention(model: LoadedModel, prompts: PromptSet, heads: Sequence[Head], batch_size: int = 32) -> pd.DataFrame:
    """END-token attention of each head onto operand A, operand B, the operator and everything else.

    One row per (prompt, layer, head) with columns ``A``, ``B``, ``operator_token``, ``other`` (summing to 1).
    """
    return end_attention_groups(model, prompts, heads, lambda it: {"A": [it.a_pos], "B": [it.b_pos],
                                                                  "operator_token": [it.op_pos]}, batch_size)


def label_heads(attention: pd.DataFrame, min_share: float = 0.2) -> pd.DataFrame:
    """Label each head by its mean END attention (the stated rule).

    ``operand``: attention to A + B ≥ ``min_share`` and more than to the operator;
    ``operator``: attention to the operator ≥ ``min_share`` and more than to A + B; else ``other``.
    """
    mean = attention.groupby(["layer", "head"])[["A", "B", "operator_token", "other"]].mean().reset_index()
    operands = mean["A"] + mean["B"]
    mean["role"] = np.where((operands >= min_share) & (operands > mean["operator_token"]), "operand",
                            np.where((mean["operator_token"] >= min_share) & (mean["operator_token"] > operands),
                                     "operator", "other"))
    return mean

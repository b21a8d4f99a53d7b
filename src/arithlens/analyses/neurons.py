"""Neurons of the answer-writing MLPs: which ones write the answer, and whether they suffice.

Science wing (extends the paper's § "MLP tracing" from whole MLP layers to their neurons).
Reproduces, on our models, the neuron-level analyses of Nikankin et al. (ICLR 2025, "Arithmetic
without algorithms: language models solve math with a bag of heuristics"):

* :func:`direct_attributions` / :func:`neuron_attribution` — each neuron's *direct* contribution
  to the answer's logit at END: its activation times (its down-projection column · the unembedding
  direction of the answer), divided by the final norm's scale, which is frozen at its clean value —
  exact for the direct path (bias-free down projection, RMS final norm, no unembedding bias);
  :func:`top_neurons` ranks them;
* :func:`keep_top_k_accuracy` — every neuron of the given MLP layers mean-ablated at END except the
  top k % by attribution, against k % random neurons (seeded);
* :func:`neuron_overlap` — IoU of the top-neuron sets of different operators.

What the top neurons respond to is :mod:`arithlens.analyses.heuristics`; how fine-tuning moves them,
:mod:`arithlens.analyses.neuron_changes`. A neuron's activation is the input of the MLP's down
projection (``blocks.{l}.mlp.hook_post``; for the gated MLPs of Llama and Qwen2, act(gate) · up).
Written by hand (no library does neuron attribution on TransformerBridge); hooks are
TransformerLens's, the activations read and the KV-cache reruns :mod:`arithlens.core.hooks`'s.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from arithlens.core import hooks, layout
from arithlens.core.conditions import correct_at_end
from arithlens.core.hooks import Hook, digit_tokens
from arithlens.core.items import Item, answer_batches
from arithlens.core.models import LoadedModel

Target = Literal["answer", "answer_vs_digits"]


@dataclass(frozen=True, order=True)
class Neuron:
    """One MLP neuron: a column of ``layer``'s down projection."""

    layer: int
    neuron: int

    def __str__(self) -> str:
        return f"L{self.layer}N{self.neuron}"


def mlp_post(layer: int) -> str:
    """The MLP's hidden activation, the down projection's input, ``[batch, pos, d_mlp]``."""
    return f"blocks.{layer}.mlp.hook_post"


def end_activations(model: LoadedModel, items: Sequence[Item], layers: Sequence[int]) -> Float[Tensor, "batch layer d_mlp"]:
    """Every neuron's activation at END of each item, for the MLPs of ``layers``."""
    cache = hooks.activations_at(model, [it.clean_tokens for it in items], [mlp_post(l) for l in layers], batch_size=64)
    return torch.stack([cache[mlp_post(l)] for l in layers], 1)


@torch.no_grad()
def direct_attributions(model: LoadedModel, items: Sequence[Item], layers: Sequence[int],
                        target: Target = "answer") -> Float[Tensor, "batch layer d_mlp"]:
    """Each neuron's direct contribution at END to the answer's logit (final-norm scale frozen).

    attribution = h · (W_out[:, i] · (w_norm ⊙ u)) / s, with h the neuron's activation, W_out the down
    projection, w_norm and s the final RMS norm's weight and (clean) scale, and u = W_U[answer]
    (``target="answer"``) or W_U[answer] − the mean of the other nine digits' rows
    (``"answer_vs_digits"``: only what separates the answer from other digits). Summed over a
    layer's neurons it is that MLP's direct effect on the logit.

    Exact only where the MLP output reaches the residual unnormalized and the logits are linear in the
    final residual: a layout (:mod:`arithlens.core.layout`) with a post-MLP norm (Gemma 2 and 3, OLMo 2),
    soft-capping or an unembedding bias, a down projection with a bias, or a layout that cannot be
    described, raises ``NotImplementedError``.
    """
    lay = layout.describe(model)
    if (lay is None or lay.post_mlp_norm or lay.unembed_bias or lay.final_softcap
            or any(layout.nonzero_bias(model.bridge.blocks[l].mlp.out.original_component) for l in layers)):
        raise NotImplementedError(f"neuron direct attributions are not linear on {layout.architecture(model)}'s "
                                  f"layout ({lay}): they need no post-MLP norm, soft-capping, unembedding or "
                                  "down-projection bias")
    cache = hooks.activations_at(model, [it.clean_tokens for it in items], [mlp_post(l) for l in layers] + [hooks.FINAL_SCALE],
                                 batch_size=64)
    W_U = model.bridge.unembed.original_component.weight.float().cpu()  # [d_vocab, d_model]
    norm_w = layout.final_norm_weight(model, lay).cpu()
    answers = torch.tensor([it.answer_token for it in items])
    u = W_U[answers]
    if target == "answer_vs_digits":
        digits = digit_tokens(model.tokenizer)
        others = (digits[None] != answers[:, None]).float()  # [batch, 10]
        u = u - (others @ W_U[digits]) / others.sum(1, keepdim=True)
    u = u * norm_w / cache[hooks.FINAL_SCALE].reshape(-1, 1)
    out = []
    for l in layers:
        W_out = model.bridge.blocks[l].mlp.out.original_component.weight.float().cpu()  # [d_model, d_mlp]
        out.append(cache[mlp_post(l)] * (u @ W_out))
    return torch.stack(out, 1)


def neuron_attribution(model: LoadedModel, items: Sequence[Item], layers: Sequence[int],
                       target: Target = "answer") -> pd.DataFrame:
    """:func:`direct_attributions` averaged per operator: one row per (operator, layer, neuron) with
    ``attribution`` (mean), ``abs_attribution`` (mean of |·|), ``activation`` (mean) and ``n``."""
    attr = direct_attributions(model, items, layers, target)
    acts = end_activations(model, items, layers)
    ops = np.array([it.operator for it in items])
    width = attr.shape[2]
    frames = []
    for op in dict.fromkeys(ops):
        sel = torch.from_numpy(ops == op)
        frames.append(pd.DataFrame({
            "operator": op, "layer": np.repeat(list(layers), width), "neuron": np.tile(np.arange(width), len(layers)),
            "attribution": attr[sel].mean(0).flatten().numpy(), "abs_attribution": attr[sel].abs().mean(0).flatten().numpy(),
            "activation": acts[sel].mean(0).flatten().numpy(), "n": int(sel.sum())}))
    return pd.concat(frames, ignore_index=True)


def top_neurons(table: pd.DataFrame, percent: float, operator: str | None = None,
                by: Literal["attribution", "abs_attribution"] = "attribution") -> list[Neuron]:
    """The top ``percent`` % of the table's neurons by ``by`` (largest first; ties by layer, neuron).

    With ``operator`` None, scores are averaged over the table's operators first.
    """
    part = table if operator is None else table[table["operator"] == operator]
    scores = part.groupby(["layer", "neuron"], as_index=False)[by].mean()
    ranked = scores.sort_values([by, "layer", "neuron"], ascending=[False, True, True], kind="stable")
    k = round(percent / 100 * len(ranked))
    return [Neuron(int(l), int(n)) for l, n in zip(ranked["layer"][:k], ranked["neuron"][:k])]


def neuron_overlap(top_sets: Mapping[str, Collection[Neuron]]) -> pd.DataFrame:
    """Intersection over union of the top-neuron sets of each pair of labels (e.g. operators)."""
    rows = []
    for x, y in itertools.combinations(top_sets, 2):
        sx, sy = set(top_sets[x]), set(top_sets[y])
        union = len(sx | sy)
        rows.append({"first": x, "second": y, "n_first": len(sx), "n_second": len(sy),
                     "intersection": len(sx & sy), "union": union, "iou": len(sx & sy) / union if union else float("nan")})
    return pd.DataFrame(rows)


# --- keep the top k % -----------------------------------------------------------------------------------

def mean_activations(model: LoadedModel, items: Sequence[Item], layers: Sequence[int]) -> Float[Tensor, "layer d_mlp"]:
    """Every neuron's mean activation at END over ``items``: the mean-ablation value."""
    return end_activations(model, items, layers).mean(0)


class NeuronAblation:
    """Accuracy with every neuron of ``layers`` mean-ablated at END except those kept, many kept sets
    at once (:meth:`correct_many`): each batch's clean prefix KV cache serves every set (only END is rerun)."""

    def __init__(self, model: LoadedModel, items: Sequence[Item], layers: Sequence[int],
                 means: Float[Tensor, "layer d_mlp"], batch_size: int = 64):
        self.model, self.items, self.layers, self.means = model, list(items), list(layers), means
        self.batches = answer_batches(self.items, batch_size, model.device)

    def hooks(self, kept: Collection[Neuron]) -> list[Hook]:
        """Hooks that set every neuron of ``layers`` not in ``kept`` to its mean at END."""
        fwd = []
        for j, layer in enumerate(self.layers):
            ablate = torch.ones(self.means.shape[1], dtype=torch.bool)
            ablate[[n.neuron for n in kept if n.layer == layer]] = False

            def hook(act, hook=None, j=j, ablate=ablate):  # bound per layer: hook.name is the internal name
                act = act.clone()
                mask = ablate.to(act.device)
                act[:, -1, mask] = self.means[j].to(act.device, act.dtype)[mask]
                return act
            fwd.append((mlp_post(layer), hook))
        return fwd

    def correct_many(self, kept_sets: Sequence[Collection[Neuron] | None]) -> np.ndarray:
        """Per-item greedy correctness keeping each of ``kept_sets`` (None: the clean model): ``sets × items``."""
        fwds = [[] if kept is None else self.hooks(kept) for kept in kept_sets]
        return correct_at_end(self.model, self.batches, len(self.items), [lambda b, f=f: f for f in fwds])

    def correct(self, kept: Collection[Neuron] | None) -> np.ndarray:
        """Per-item greedy correctness keeping ``kept`` (None: nothing ablated, the clean model)."""
        return self.correct_many([kept])[0]

    def accuracy(self, kept: Collection[Neuron] | None) -> float:
        return float(self.correct(kept).mean())


def keep_top_k_accuracy(model: LoadedModel, items: Sequence[Item], ranking: Sequence[Neuron], layers: Sequence[int],
                        percents: Sequence[float] = (1, 2, 5, 10), n_seeds: int = 3, seed: int = 0,
                        means: Float[Tensor, "layer d_mlp"] | None = None) -> pd.DataFrame:
    """Accuracy keeping the top ``percent`` % of ``ranking`` vs as many random neurons, the rest of the
    MLP neurons of ``layers`` mean-ablated at END (means over ``items`` unless given).

    One row per (condition, percent, seed): ``clean`` (nothing ablated), ``top``, ``random`` (for s =
    ``seed`` … ``seed + n_seeds − 1``, ``random.Random(f"{s}|{n_kept}")`` samples the layers'
    neurons, listed layer-major), with ``n_kept`` =
    round(percent / 100 × all neurons of ``layers``); ``ranking`` entries outside ``layers`` are skipped.
    """
    layers = list(layers)
    means = mean_activations(model, items, layers) if means is None else means
    ev = NeuronAblation(model, items, layers, means)
    pool = [Neuron(l, i) for l in layers for i in range(means.shape[1])]
    ranked = [n for n in ranking if n.layer in layers]
    jobs: list[tuple[str, float, int, int, Collection[Neuron] | None]] = [("clean", 100.0, len(pool), -1, None)]
    for p in percents:
        k = round(p / 100 * len(pool))
        if k > len(ranked):
            raise ValueError(f"{p} % of {len(pool)} neurons is {k}, more than the {len(ranked)} ranked in these layers")
        jobs.append(("top", float(p), k, -1, ranked[:k]))
        jobs += [("random", float(p), k, s, random.Random(f"{s}|{k}").sample(pool, k)) for s in range(seed, seed + n_seeds)]
    accuracy = ev.correct_many([kept for *_, kept in jobs]).mean(1)
    rows = [{"condition": c, "percent": p, "n_kept": k, "seed": s, "accuracy": float(a)}
            for (c, p, k, s, _), a in zip(jobs, accuracy)]
    return pd.DataFrame(rows).assign(n_items=len(ev.items))

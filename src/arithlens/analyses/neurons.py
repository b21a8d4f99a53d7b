"""Neurons of the answer-writing MLPs: attribution, operand-grid patterns, heuristic types, keep-top-k.

Science wing, issue #17 (extends the paper's § "MLP tracing" from whole MLP layers to their
neurons). Reproduces, on our models, the neuron-level analyses of Nikankin et al. (ICLR 2025,
"Arithmetic without algorithms: language models solve math with a bag of heuristics"):

* :func:`direct_attributions` / :func:`neuron_attribution` — each neuron's *direct* contribution
  to the answer's logit at END: its activation times (its down-projection column · the unembedding
  direction of the answer), divided by the final norm's scale, which is frozen at its clean value —
  exact for the direct path (bias-free down projection, RMS final norm, no unembedding bias);
* :func:`operand_grid_activations` — chosen neurons' activations at END over the operand grid;
  :func:`classify_heuristic` names each pattern by written rules (operand range or modulo, result
  range or modulo, identical operands, or other);
* :func:`keep_top_k_accuracy` — every neuron of the given MLP layers mean-ablated at END except the
  top k % by attribution, against k % random neurons (seeded);
* :func:`neuron_overlap` — IoU of the top-neuron sets of different operators;
* :func:`activation_change` / :func:`tuning_change` — how a fine-tuned model (Precise SFT, LoRA, random
  heads) moves them; :func:`tuning_comparison` — whether two such deltas move the same neurons.

A neuron's activation is the input of the MLP's down projection (``blocks.{l}.mlp.hook_post``; for the
gated MLPs of Llama and Qwen2, act(gate) · up). Written by hand (no library does neuron attribution
or heuristic matching on TransformerBridge); hooks are TransformerLens's, the KV-cache reruns
:mod:`arithlens.core.hooks`'s.
"""

from __future__ import annotations

import dataclasses
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
from arithlens.core.hooks import Hook, digit_tokens
from arithlens.core.items import Item, answer_batches, encode
from arithlens.core.models import LoadedModel, last_position_only
from arithlens.tasks.prompts import OPERATORS, TEMPLATES

Target = Literal["answer", "answer_vs_digits"]
Kind = Literal["operand range", "operand modulo", "result range", "result modulo", "identical operands", "other"]


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


def d_mlp(model: LoadedModel) -> int:
    return int(model.cfg.d_mlp)


@torch.no_grad()
def _at_end(model: LoadedModel, seqs: Sequence[tuple[int, ...]], names: list[str], batch_size: int = 64
            ) -> dict[str, Tensor]:
    """Activations at the last position of each token sequence, ``{name: [n, ...]}`` (fp32, CPU), in order."""
    out: dict[str, Tensor] = {}
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(len(s), []).append(i)
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            part = idx[start: start + batch_size]
            tokens = torch.tensor([seqs[i] for i in part], device=model.device)
            _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n in names, **last_position_only(model))
            for name in names:
                end = cache[name][:, -1].float().cpu()
                if name not in out:
                    out[name] = torch.zeros(len(seqs), *end.shape[1:])
                out[name][part] = end
    return out


def end_activations(model: LoadedModel, items: Sequence[Item], layers: Sequence[int]) -> Float[Tensor, "batch layer d_mlp"]:
    """Every neuron's activation at END of each item, for the MLPs of ``layers``."""
    cache = _at_end(model, [it.clean_tokens for it in items], [mlp_post(l) for l in layers])
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
    final residual: a layout (:mod:`arithlens.core.layout`) with a post-MLP norm (Gemma 2, OLMo 2),
    soft-capping or an unembedding bias, a down projection with a bias, or a layout that cannot be
    described, raises ``NotImplementedError``.
    """
    lay = layout.describe(model)
    if (lay is None or lay.post_mlp_norm or lay.unembed_bias or lay.final_softcap
            or any(layout.nonzero_bias(model.bridge.blocks[l].mlp.out.original_component) for l in layers)):
        raise NotImplementedError(f"neuron direct attributions are not linear on {layout.architecture(model)}'s "
                                  f"layout ({lay}): they need no post-MLP norm, soft-capping, unembedding or "
                                  "down-projection bias")
    cache = _at_end(model, [it.clean_tokens for it in items], [mlp_post(l) for l in layers] + [hooks.FINAL_SCALE])
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


# --- operand grids and heuristic types ----------------------------------------------------------------

def operand_grid_activations(model: LoadedModel, layer: int, neurons: Sequence[int], operator: str,
                             template: str = "eq_spaced", operands: Sequence[int] = tuple(range(10)),
                             prefix: str = "") -> pd.DataFrame:
    """Neurons' activations at END for every (a, b) in ``operands`` × ``operands``.

    Prompts are ``prefix`` + the named template (:data:`arithlens.tasks.prompts.TEMPLATES`) with the
    operator written in the template's form, END its last token — every cell, whether or not the
    answer is a natural number (``result`` is then NaN). Long form: one row per (neuron, a, b).
    """
    tpl, op = TEMPLATES[template], OPERATORS[operator]
    cells = list(itertools.product(operands, repeat=2))
    seqs = [tuple(encode(model.tokenizer, prefix + tpl.render(a, op.render(tpl.form), b))[0]) for a, b in cells]
    acts = _at_end(model, seqs, [mlp_post(layer)])[mlp_post(layer)][:, list(neurons)]  # [cell, neuron]
    results = [op.apply(a, b) for a, b in cells]
    a, b = np.array(cells).T
    return pd.DataFrame({
        "layer": layer, "neuron": np.repeat(list(neurons), len(cells)), "operator": operator, "template": template,
        "a": np.tile(a, len(neurons)), "b": np.tile(b, len(neurons)),
        "result": np.tile([np.nan if r is None else float(r) for r in results], len(neurons)),
        "activation": acts.T.flatten().numpy()})


@dataclass(frozen=True)
class Heuristic:
    """A neuron's best-matching pattern (the parameters always describe it) and its type (``kind``:
    the pattern's family when ``score`` ≥ the threshold, else ``other``)."""

    kind: Kind
    on: str | None  # "a", "b", "result"; None for identical operands
    low: int | None  # ranges: the interval [low, high]
    high: int | None
    modulus: int | None  # modulo: on ≡ residue (mod modulus)
    residue: int | None
    score: float  # Pearson correlation of activation with the pattern's indicator
    pattern: str


def _edges(values: np.ndarray, max_edges: int) -> list[int]:
    v = np.unique(values)
    if len(v) > max_edges:
        v = np.unique(v[np.linspace(0, len(v) - 1, max_edges).round().astype(int)])
    return [int(x) for x in v]


def heuristic_patterns(a: np.ndarray, b: np.ndarray, result: np.ndarray, max_edges: int = 40,
                       moduli: Sequence[int] = tuple(range(2, 11))) -> tuple[list[tuple], np.ndarray]:
    """Candidate binary patterns over grid cells, in the tie-break order of the families
    (identical operands, operand range, operand modulo, result range, result modulo): a list of
    (kind, on, low, high, modulus, residue, text) and the indicator masks ``[pattern, cell]``.

    Intervals run between observed values (at most ``max_edges`` of them, spread by rank); cells
    without a natural-number result are outside every result pattern. Patterns true on every cell or
    on none, and repeats of an earlier mask, are left out.
    """
    specs, masks = [("identical operands", None, None, None, None, None, "a = b")], [a == b]
    defined = ~np.isnan(result)
    res = np.where(defined, result, -1).astype(np.int64)
    everywhere = np.ones(len(a), dtype=bool)
    families = [("operand range", "a", a, everywhere), ("operand range", "b", b, everywhere),
                ("operand modulo", "a", a, everywhere), ("operand modulo", "b", b, everywhere),
                ("result range", "result", res, defined), ("result modulo", "result", res, defined)]
    for kind, name, x, valid in families:
        if kind.endswith("range"):
            for lo, hi in itertools.combinations_with_replacement(_edges(x[valid], max_edges), 2):
                specs.append((kind, name, lo, hi, None, None, f"{name} in [{lo}, {hi}]"))
                masks.append(valid & (x >= lo) & (x <= hi))
        else:
            for m in moduli:
                for r in range(m):
                    specs.append((kind, name, None, None, m, r, f"{name} ≡ {r} (mod {m})"))
                    masks.append(valid & (x % m == r))
    stacked = np.stack(masks)
    varied = stacked.any(1) & ~stacked.all(1)
    _, first = np.unique(stacked, axis=0, return_index=True)
    keep = [i for i in sorted(first) if varied[i]]
    return [specs[i] for i in keep], stacked[keep]


def classify_heuristic(grid: pd.DataFrame, threshold: float = 0.6, max_edges: int = 40) -> Heuristic:
    """Type of one neuron's grid (columns ``a``, ``b``, ``result``, ``activation``) by the stated rule.

    Every candidate pattern of :func:`heuristic_patterns` is scored by the Pearson correlation
    between the activation and the pattern's 0/1 indicator over the cells (high inside the pattern);
    the best score wins (ties: the earlier family, then the earlier pattern). Its family is the type
    if the score is at least ``threshold`` (0.6: the pattern explains ≥ 36 % of the activation's
    variance; on 10 × 10 Gaussian noise the best of the 235 (÷) to 913 (×) patterns scores 0.25–0.28
    in the median and stayed below 0.5 in 200 draws per operator), else ``other``.
    A constant activation is ``other`` with score 0.
    """
    specs, masks = heuristic_patterns(grid["a"].to_numpy(), grid["b"].to_numpy(), grid["result"].to_numpy(), max_edges)
    x = grid["activation"].to_numpy(dtype=np.float64)
    xc = x - x.mean()
    if not np.linalg.norm(xc) > 0:
        return Heuristic("other", None, None, None, None, None, 0.0, "constant")
    m = masks.astype(np.float64)
    mc = m - m.mean(1, keepdims=True)
    r = mc @ xc / (np.linalg.norm(mc, axis=1) * np.linalg.norm(xc))
    best = int(np.argmax(r))
    kind, on, lo, hi, mod, res, text = specs[best]
    return Heuristic(kind if r[best] >= threshold else "other", on, lo, hi, mod, res, float(r[best]), text)


def classify_neurons(grids: pd.DataFrame, threshold: float = 0.6) -> pd.DataFrame:
    """:func:`classify_heuristic` for every neuron of an :func:`operand_grid_activations` table: one row
    per (operator, template, layer, neuron)."""
    keys = ["operator", "template", "layer", "neuron"]
    rows = [{**dict(zip(keys, key)), **dataclasses.asdict(classify_heuristic(part, threshold))}
            for key, part in grids.groupby(keys, sort=False)]
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
        return hooks.correct_at_end(self.model, self.batches, len(self.items), [lambda b, f=f: f for f in fwds])

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


def neuron_overlap(top_sets: Mapping[str, Collection[Neuron]]) -> pd.DataFrame:
    """Intersection over union of the top-neuron sets of each pair of labels (e.g. operators)."""
    rows = []
    for x, y in itertools.combinations(top_sets, 2):
        sx, sy = set(top_sets[x]), set(top_sets[y])
        union = len(sx | sy)
        rows.append({"first": x, "second": y, "n_first": len(sx), "n_second": len(sy),
                     "intersection": len(sx & sy), "union": union, "iou": len(sx & sy) / union if union else float("nan")})
    return pd.DataFrame(rows)


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
    from arithlens.core.deltas import applied

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

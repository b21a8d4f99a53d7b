"""Number representations: residual-stream vectors of numbers, their Fourier power, a helix fit, a causal check.

Science wing (extends the paper's § "MLP tracing": *what* do the operand positions carry into the
MLPs that write the answer?). Reproduces, on our models, the representation analyses of
Zhou et al. (2024, "Pre-trained LLMs use Fourier features to compute addition": periods 2, 5, 10)
and Kantamneni & Tegmark (2025, "Language models use trigonometry to do addition": the *generalized
helix* n ↦ [n, cos(2πn/T), sin(2πn/T) for each T], fitted linearly and checked by patching).

* :func:`number_activations` — the residual stream at each number's last token, for numbers in a
  short prompt (a template with one ``{n}`` slot, after the tokenizer's BOS when it has one);
  :func:`operand_activations` — the same at an arithmetic item's operand position. Both return a
  :class:`NumberActs` that says which numbers were single tokens.
* :func:`fourier_power` — the share of the numbers' variance on the period-T cosine/sine pair,
  beside the share a random basis function of the same size gets by chance.
* :func:`fit_helix` — least squares acts ≈ mean + (B(n) − mean B) · C, its variance share beside the
  PCA ceiling of the same dimension; the :class:`Helix` reconstructs a number's vector from n.
* :func:`helix_patch_share` — the operand's vector replaced by its helix reconstruction (and, as a
  control, by its projection on the top PCs of the same dimension): share of the answer's logit
  difference kept, between mean-ablation (0) and clean (1).

Written by hand (no library fits helices or Fourier shares to residual streams): numpy does the
linear algebra, TransformerLens the hooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from arithlens.core import hooks
from arithlens.core.hooks import digit_tokens, scores_from_logits
from arithlens.core.items import Item, encode, length_groups, tokens_over
from arithlens.core.models import LoadedModel, logits_at_end

Site = Literal["resid_pre", "resid_post"]
Operand = Literal["a", "b"]


def site_name(site: Site, layer: int) -> str:
    """Hook name of the residual stream before (``resid_pre``; layer 0's is the embedding) or after a layer."""
    return f"blocks.{layer}.hook_resid_pre" if site == "resid_pre" else hooks.resid_post(layer)


@dataclass(frozen=True)
class NumberActs:
    """``acts[j, i]``: the residual vector of number ``numbers[i]`` at ``site`` of layer ``layers[j]``.

    ``single_token[i]``: the number was one token (else ``acts`` holds its last token). ``numbers``
    may repeat (operand activations over many prompts; :meth:`averaged` collapses them).
    """

    numbers: tuple[int, ...]
    layers: tuple[int, ...]
    site: str
    acts: Float[Tensor, "layer number d_model"]
    single_token: tuple[bool, ...]
    prompt: str  # the template, or "items" for operand activations

    def at(self, layer: int) -> Float[Tensor, "number d_model"]:
        """The vectors at one layer (a layer number, not an index)."""
        return self.acts[self.layers.index(layer)]

    def select(self, keep: Sequence[bool]) -> NumberActs:
        """The numbers for which ``keep`` is true (e.g. ``single_token``)."""
        idx = [i for i, k in enumerate(keep) if k]
        return NumberActs(tuple(self.numbers[i] for i in idx), self.layers, self.site, self.acts[:, idx],
                          tuple(self.single_token[i] for i in idx), self.prompt)

    def averaged(self) -> NumberActs:
        """One vector per distinct number (the mean over its repeats), numbers ascending."""
        distinct = sorted(set(self.numbers))
        groups = [[i for i, n in enumerate(self.numbers) if n == d] for d in distinct]
        acts = torch.stack([self.acts[:, g].mean(1) for g in groups], 1)
        return NumberActs(tuple(distinct), self.layers, self.site, acts,
                          tuple(self.single_token[g[0]] for g in groups), self.prompt)

    def tokens_frame(self) -> pd.DataFrame:
        """One row per distinct number: whether it is a single token."""
        seen = dict(zip(self.numbers, self.single_token))
        return pd.DataFrame({"number": list(seen), "single_token": list(seen.values())})


def _gather(model: LoadedModel, seqs: Sequence[tuple[int, ...]], positions: Sequence[int], names: list[str]
            ) -> Float[Tensor, "layer number d_model"]:
    """Activations at ``names`` of each sequence at its position, in input order (no padding)."""
    acts = hooks.activations_at(model, seqs, names, positions)
    return torch.stack([acts[name] for name in names]).double()


def number_activations(model: LoadedModel, numbers: Sequence[int], layers: Sequence[int], template: str = "{n}",
                       site: Site = "resid_post", bos: bool = True) -> NumberActs:
    """Residual vectors of ``numbers`` at the last token of each, in the prompt ``template`` (one ``{n}``).

    The prompt is the template with the number written in decimal, after the tokenizer's BOS token
    when ``bos`` and the tokenizer has one (Qwen2.5's has none: give such a model some text before
    ``{n}``). Only the text before the number matters (causal attention). The number's position is the
    last token overlapping its characters (from the tokenizer's offsets); it must not run on past the
    number. ``single_token`` says whether one token covers the number.
    """
    if template.count("{n}") != 1:
        raise ValueError(f"template must contain '{{n}}' exactly once, got {template!r}")
    before, after = template.split("{n}")
    tok = model.tokenizer
    prefix = [tok.bos_token_id] if bos and tok.bos_token_id is not None else []
    seqs, positions, single = [], [], []
    for n in numbers:
        ids, offsets = encode(tok, before + str(n) + after)
        start, end = len(before), len(before) + len(str(n))
        covering = tokens_over(offsets, start, end)
        if not covering or offsets[covering[-1]][1] != end:
            raise ValueError(f"the last token of {n} runs past the number in {before + str(n) + after!r}")
        if prefix and ids[:1] == prefix:  # a tokenizer that adds BOS itself
            prefix_here = []
        else:
            prefix_here = prefix
        seqs.append(tuple(prefix_here + ids))
        positions.append(len(prefix_here) + covering[-1])
        single.append(len(covering) == 1)
    names = [site_name(site, l) for l in layers]
    acts = _gather(model, seqs, positions, names)
    return NumberActs(tuple(int(n) for n in numbers), tuple(layers), site, acts, tuple(single), template)


def operand_activations(model: LoadedModel, items: Sequence[Item], layers: Sequence[int], operand: Operand = "a",
                        site: Site = "resid_post") -> NumberActs:
    """Residual vectors at each item's operand position (``a_pos``/``b_pos``, the operand's last token).

    ``items`` are arithmetic prompt items (:class:`arithlens.tasks.prompts.PromptItem`); numbers repeat
    across items — :meth:`NumberActs.averaged` gives one vector per operand value.
    """
    seqs = [it.clean_tokens for it in items]
    positions = [getattr(it, f"{operand}_pos") for it in items]
    numbers = [int(getattr(it, operand)) for it in items]
    single = [model.tokenizer.decode([s[p]]).strip() == str(n) for s, p, n in zip(seqs, positions, numbers)]
    acts = _gather(model, seqs, positions, [site_name(site, l) for l in layers])
    return NumberActs(tuple(numbers), tuple(layers), site, acts, tuple(single), "items")


# --- Fourier power and the helix ----------------------------------------------------------------------

def helix_basis(numbers: Sequence[int], periods: Sequence[float], linear: bool = True) -> tuple[np.ndarray, list[str]]:
    """B(n): columns ``n`` (when ``linear``), then ``cos T``, ``sin T`` = cos/sin(2πn/T) per period T."""
    n = np.asarray(numbers, dtype=np.float64)
    cols, names = ([n], ["n"]) if linear else ([], [])
    for T in periods:
        cols += [np.cos(2 * np.pi * n / T), np.sin(2 * np.pi * n / T)]
        names += [f"cos {T:g}", f"sin {T:g}"]
    return (np.stack(cols, 1) if cols else np.zeros((len(n), 0))), names


def _centred(acts: Tensor) -> np.ndarray:
    x = acts.double().cpu().numpy()
    return x - x.mean(0)


def _span(basis: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the centred columns' span (columns that vanish, e.g. sin(πn), drop out)."""
    b = basis - basis.mean(0)
    if b.shape[1] == 0:
        return b
    u, s, _ = np.linalg.svd(b, full_matrices=False)
    return u[:, s > 1e-9 * max(1.0, s.max())]


def fourier_power(acts: Float[Tensor, "number d_model"], numbers: Sequence[int],
                  periods: Sequence[float] = (2, 5, 10, 100)) -> pd.DataFrame:
    """Share of the numbers' variance at each period T, beside its chance level. One row per period.

    X = the activations centred over the numbers (rows), total variance V = ‖X‖²_F. For period T the
    basis functions cos(2πn/T), sin(2πn/T), centred over the same rows, span an r-dimensional space
    (r = 2, or 1 where sin vanishes at every n, as for T = 2) with orthonormal basis Q. ``share`` =
    ‖QᵀX‖²_F / V: the R² of regressing every dimension on [1, cos, sin], pooled over dimensions
    (explained sum of squares over total). ``chance`` = r / (N − 1): the expected share of r random
    centred basis functions (a uniformly random r-dimensional subspace of the (N − 1)-dimensional
    centred space captures that share of any X). ``ratio`` = share / chance. Shares of different
    periods add up only where their pairs are orthogonal over the numbers (n = 0..N−1 with N/T whole,
    e.g. T = 2, 5, 10, 100 for N = 100); otherwise they overlap. Rows should be distinct numbers
    (:meth:`NumberActs.averaged`): the chance level assumes it.
    """
    if len(numbers) < 3:
        raise ValueError("need at least three numbers")
    x = _centred(acts)
    total = float((x ** 2).sum())
    rows = []
    for T in periods:
        q = _span(helix_basis(numbers, [T], linear=False)[0])
        share = float(((q.T @ x) ** 2).sum()) / total if total > 0 else 0.0
        chance = q.shape[1] / (len(numbers) - 1)
        rows.append({"period": float(T), "n_basis": int(q.shape[1]), "share": share, "chance": chance,
                     "ratio": share / chance if chance else math.nan})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Helix:
    """A fitted generalized helix: vector(n) ≈ ``mean`` + (B(n) − ``basis_mean``) · ``coef``.

    ``share``: variance share of the fitted numbers it explains; ``pca_share``: the share of the top
    ``rank`` principal components (``pcs``) of the same activations, the ceiling of any ``rank``-
    dimensional linear fit.
    """

    periods: tuple[float, ...]
    columns: tuple[str, ...]  # the basis columns kept (see :func:`helix_basis`)
    mean: Float[Tensor, "d_model"]
    basis_mean: Float[Tensor, "basis"]
    coef: Float[Tensor, "basis d_model"]
    pcs: Float[Tensor, "rank d_model"]
    share: float
    pca_share: float
    n_numbers: int

    @property
    def rank(self) -> int:
        return len(self.columns)

    def basis(self, numbers: Sequence[int]) -> Float[Tensor, "number basis"]:
        full, names = helix_basis(numbers, self.periods)
        return torch.from_numpy(full[:, [names.index(c) for c in self.columns]])

    def reconstruct(self, numbers: Sequence[int]) -> Float[Tensor, "number d_model"]:
        """Each number's vector from its helix coordinates B(n)."""
        return self.mean + (self.basis(numbers) - self.basis_mean) @ self.coef

    def project_pcs(self, acts: Float[Tensor, "number d_model"]) -> Float[Tensor, "number d_model"]:
        """``acts`` projected onto the top-``rank`` PCs (about ``mean``): the PCA control."""
        p = self.pcs.to(acts.device, acts.dtype)
        centred = acts - self.mean.to(acts.device, acts.dtype)
        return self.mean.to(acts.device, acts.dtype) + (centred @ p.T) @ p


def fit_helix(acts: Float[Tensor, "number d_model"], numbers: Sequence[int], periods: Sequence[float]) -> Helix:
    """Least-squares helix fit with B(n) = [n, cos(2πn/T), sin(2πn/T) for T in ``periods``].

    Activations and basis are centred over the numbers (an intercept); columns that vanish or repeat
    others are dropped so the coefficients are unique; ``rank`` = the basis columns kept. ``share`` =
    1 − ‖X − B C‖²/‖X‖² for the centred X; ``pca_share`` = the top-``rank`` singular values' share of
    ‖X‖² (no ``rank``-dimensional linear map of anything does better on these rows).
    """
    x = _centred(acts)
    full, names = helix_basis(numbers, periods)
    keep: list[int] = []
    for j in range(full.shape[1]):  # greedily keep columns that add to the centred span
        if _span(full[:, keep + [j]]).shape[1] == len(keep) + 1:
            keep.append(j)
    b = full[:, keep]
    bc = b - b.mean(0)
    coef = np.linalg.lstsq(bc, x, rcond=None)[0]
    total = float((x ** 2).sum())
    resid = float(((x - bc @ coef) ** 2).sum())
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = len(keep)
    return Helix(tuple(float(T) for T in periods), tuple(names[j] for j in keep),
                 torch.from_numpy(acts.double().cpu().numpy().mean(0)), torch.from_numpy(b.mean(0)),
                 torch.from_numpy(coef), torch.from_numpy(vt[:k].copy()),
                 1 - resid / total if total > 0 else 0.0,
                 float((s[:k] ** 2).sum()) / total if total > 0 else 0.0, len(numbers))


def fourier_table(number_acts: NumberActs, periods: Sequence[float] = (2, 5, 10, 100)) -> pd.DataFrame:
    """:func:`fourier_power` at every layer of ``number_acts``: one row per (layer, period)."""
    frames = [fourier_power(number_acts.at(l), number_acts.numbers, periods).assign(layer=l)
              for l in number_acts.layers]
    return pd.concat(frames, ignore_index=True)[["layer", "period", "n_basis", "share", "chance", "ratio"]]


def helix_table(number_acts: NumberActs, periods: Sequence[float]) -> pd.DataFrame:
    """:func:`fit_helix` at every layer: one row per layer with ``rank``, ``share``, ``pca_share`` and
    ``of_ceiling`` = share / pca_share."""
    rows = []
    for l in number_acts.layers:
        h = fit_helix(number_acts.at(l), number_acts.numbers, periods)
        rows.append({"layer": l, "periods": " ".join(f"{T:g}" for T in h.periods), "rank": h.rank,
                     "share": h.share, "pca_share": h.pca_share,
                     "of_ceiling": h.share / h.pca_share if h.pca_share else math.nan})
    return pd.DataFrame(rows)


# --- the causal check ---------------------------------------------------------------------------------

Replace = Callable[[Tensor, Sequence[Item]], Tensor]  # (clean vectors [batch, d_model], items) -> new vectors


@torch.no_grad()
def operand_patch_logit_diffs(model: LoadedModel, items: Sequence[Item], layer: int, operand: Operand,
                              replace: Replace | None, site: Site = "resid_post") -> Float[Tensor, "batch"]:
    """Logit difference (answer − best other digit) at END when the residual at the operand's position
    (``site`` of ``layer``) is replaced by ``replace(clean vectors, items)``; None: the clean run.

    A full forward pass (every position after the operand sees the change), batched by length.
    """
    digits = digit_tokens(model.tokenizer).to(model.device)
    out = torch.zeros(len(items), dtype=torch.float64)
    for idx in length_groups(items).values():
        batch = [items[i] for i in idx]
        tokens = torch.tensor([it.clean_tokens for it in batch], device=model.device)
        pos = torch.tensor([getattr(it, f"{operand}_pos") for it in batch], device=model.device)
        rows = torch.arange(len(batch), device=model.device)

        def hook(act, hook=None, batch=batch, pos=pos, rows=rows):
            act = act.clone()
            act[rows, pos] = replace(act[rows, pos], batch).to(act.device, act.dtype)
            return act

        fwd = [] if replace is None else [(site_name(site, layer), hook)]
        logits = logits_at_end(model, tokens, fwd)
        answers = torch.tensor([it.answer_token for it in batch], device=model.device)
        out[idx] = scores_from_logits(logits, answers, digits, False).logit_diff.double().cpu()
    return out


def helix_patch_share(model: LoadedModel, items: Sequence[Item], layer: int, helix: Helix, operand: Operand = "a",
                      site: Site = "resid_post") -> pd.DataFrame:
    """Share of the logit difference kept when the operand's vector is its helix reconstruction. One row.

    Conditions, each the mean logit difference m over ``items``: ``clean``; ``helix`` (vector :=
    ``helix.reconstruct(operand)``); ``pca`` (vector projected on the helix's top-``rank`` PCs — the
    best linear summary of the same dimension); ``ablated`` (vector := ``helix.mean``, the mean over
    the numbers it was fitted on). ``helix_share`` = (m(helix) − m(ablated)) / (m(clean) − m(ablated)),
    ``pca_share`` likewise. Fit the helix on the same site, layer and context (e.g.
    :func:`operand_activations` of these items) so that the ablated vector is a fair baseline.
    """
    number = lambda batch: [int(getattr(it, operand)) for it in batch]
    conditions: dict[str, Replace | None] = {
        "clean": None,
        "helix": lambda act, batch: helix.reconstruct(number(batch)),
        "pca": lambda act, batch: helix.project_pcs(act.double()),
        "ablated": lambda act, batch: helix.mean.expand(len(batch), -1),
    }
    m = {k: float(operand_patch_logit_diffs(model, items, layer, operand, f, site).mean()) for k, f in conditions.items()}
    gap = m["clean"] - m["ablated"]
    return pd.DataFrame([{"layer": layer, "site": site, "operand": operand, "n": len(items), "rank": helix.rank,
                          **m, "helix_share": (m["helix"] - m["ablated"]) / gap if gap else math.nan,
                          "pca_share": (m["pca"] - m["ablated"]) / gap if gap else math.nan}])


def helix_coordinates(helix: Helix, acts: Float[Tensor, "number d_model"], period: float) -> np.ndarray:
    """Each vector's coordinates along the helix directions of ``period``'s cos and sin columns
    (least squares over all the helix's directions, so the other periods do not leak in): [number, 2]."""
    names = [f"cos {period:g}", f"sin {period:g}"]
    if not all(n in helix.columns for n in names):
        raise ValueError(f"the helix has no cos/sin pair for period {period:g} (columns {', '.join(helix.columns)})")
    centred = (acts.double() - helix.mean.double()).numpy()
    coords, *_ = np.linalg.lstsq(helix.coef.double().numpy().T, centred.T, rcond=None)  # [basis, number]
    return coords[[helix.columns.index(n) for n in names]].T

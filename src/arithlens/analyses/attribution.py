"""Attribution patching of every head at END: gradient estimates of the patching effects.

Science wing, beside :mod:`arithlens.analyses.patching` (paper § "Path patching (head localization)"). The
paper patches each head exactly; this stage goes beyond it and asks whether the cheap first-order
estimates used in later circuit work (attribution patching, Nanda 2023 / Syed et al. 2023; EAP-IG,
Hanna et al. 2024) find the same heads. Each estimate answers the question exact patching answers —
how much does a score at END change when head (layer, head)'s ``hook_z`` at END takes its
counterfactual value Δz = z_cf − z_clean away — in the same three modes (``direct``, ``path``,
``total``: what else is frozen, see :mod:`arithlens.analyses.patching`) and for the same scores (answer logit,
logit difference answer − best other digit, p(answer); columns ``rel_logit``, ``d_logit_diff``,
``d_prob`` as in :func:`arithlens.analyses.end_cache.effects_table`).

* **Attribution** (``steps=1``): est = Σ_d_head ∂score/∂z[END, head] · Δz at the clean run.
* **EAP-IG** (``interpolate="all_heads"``): the gradient averaged over ``steps`` points of the straight
  line from clean to counterfactual z, *all heads of all layers at END on the line at once*, times
  Δz. We interpolate activations at END rather than input embeddings: only END is patched in
  :mod:`arithlens.analyses.patching`, and the clean/counterfactual prompts differ at the operator token, so an
  input path would move every position after it and estimate a different intervention. The points
  are α = k / steps, k = 0 … steps − 1 (left Riemann sum from the clean end), so ``steps=1`` *is*
  plain attribution. In ``total`` mode every head's END value is pinned to its point on the line and
  the gradient still flows through the later heads' recomputation (value z + (x − z).detach());
  in ``path``/``direct`` the other heads are frozen anyway, so their END values are simply replaced.
* **IG per head** (``interpolate="one_head"``): each head on its own line, everything else as in the
  exact patching mode. By the fundamental theorem of calculus this converges to exact patching as
  ``steps`` grows; it costs ``steps × n_layers`` passes with the batch repeated once per head (as
  :func:`arithlens.analyses.patching.sweep_total` does) and exists to show where the joint path's error comes
  from.

Gradients of hook activations on the TransformerBridge: inside a hook, ``hook.name`` is the
internal alias (``blocks.0.attn.o.hook_in`` for ``blocks.0.attn.hook_z``), so every hook binds its
layer in a closure. On the tiny models (TransformerLens 4.3) ``retain_grad()`` on the hooked tensor
did fill ``.grad`` after ``backward()``, matching the method below to 1e-7 — but only because the
parameters require grad (the hooked tensor is a node of their graph), and ``backward()`` also
accumulates into every parameter's ``.grad``. We instead put our own leaf tensor x at END through
the hook and take ``torch.autograd.grad(score, x)``: no parameter's ``.grad`` is touched, the value
at END can be any point on the line, and the result matches central differences of exact patching
(tests/test_attribution.py). Only END is re-run, on the clean prefix's KV cache
(:func:`arithlens.core.hooks.prefix_kv`): an intervention at END changes no earlier position.

Written by hand: no library does attribution patching on a TransformerBridge over END-only reruns;
autograd is PyTorch's.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from arithlens.core import hooks
from arithlens.analyses import patching
from arithlens.core.hooks import digit_tokens, kept, prefix_kv, scores_from_logits
from arithlens.core.items import ItemSet, length_batches, to_tokens
from arithlens.core.models import LoadedModel
from arithlens.analyses.end_cache import EndCache, clean_scores
from arithlens.analyses.patching import Mode

Interpolate = Literal["all_heads", "one_head"]
#: The estimated scores, in the order :class:`AttributionScores` holds them.
SCORES = ("logit", "logit_diff", "prob")


@dataclass(frozen=True)
class AttributionScores:
    """Estimated change of each score at END when each head is patched, ``[batch, layer, head]``."""

    d_logit: Float[Tensor, "batch layer head"]
    d_logit_diff: Float[Tensor, "batch layer head"]
    d_prob: Float[Tensor, "batch layer head"]


@dataclass(frozen=True)
class Method:
    """One estimator: a name for the tables, the number of points on the line and which heads move."""

    name: str
    steps: int = 1
    interpolate: Interpolate = "all_heads"


ATTRIBUTION = Method("attribution")


def eap_ig(steps: int = 16) -> Method:
    """EAP-IG: all heads at END interpolated together, ``steps`` points."""
    return Method("eap_ig", steps, "all_heads")


def ig_per_head(steps: int = 16) -> Method:
    """Integrated gradients along each head's own line (converges to exact patching)."""
    return Method("ig_per_head", steps, "one_head")


def _score_values(logits: Float[Tensor, "batch d_vocab"], answers: Int[Tensor, "batch"],
                  digits: Int[Tensor, "10"]) -> dict[str, Tensor]:
    s = scores_from_logits(logits, answers, digits, with_prob=True)
    return {"logit": s.logit, "logit_diff": s.logit_diff, "prob": s.logprob.exp()}


def _place(leaf: Tensor, mode: Mode, mask: Tensor | None):
    """A ``hook_z`` hook putting ``leaf`` ([batch, head, d_head]) at END.

    ``total``: value = leaf where ``mask`` (everywhere when None), the recomputed value elsewhere;
    the gradient flows through the recomputation (z + (leaf − z).detach()). Other modes: replaced.
    """
    def hook(z, hook=None):
        end = z[:, -1]
        x = leaf.to(z.dtype)
        if mode == "total":
            step = x - end.detach()
            new = end + (step if mask is None else mask * step)
        else:
            new = x
        return torch.cat([z[:, :-1], new[:, None]], 1)
    return hook


def _gradients(model: LoadedModel, cache: EndCache, kv, digits: Int[Tensor, "10"], mode: Mode,
               targets: dict[int, Tensor], mask: Tensor | None, repeat: int) -> dict[str, dict[int, Tensor]]:
    """One END-only forward (the batch repeated ``repeat`` times, row-major per prompt) with
    ``targets[l]`` ([batch·repeat, head, d_head]) placed at END of layer l; the other layers' heads
    recomputed (``total``) or frozen at their clean END values. Returns d score / d target."""
    rep = lambda t: t.repeat_interleave(repeat, 0)
    leaves = {l: t.detach().clone().requires_grad_(True) for l, t in targets.items()}
    fwd = []
    for l in range(model.n_layers):
        if l in leaves:
            fwd.append((hooks.hook_z(l), _place(leaves[l], mode, mask)))
        elif mode != "total":
            fwd.append((hooks.hook_z(l), hooks.set_at_end(rep(cache.z_clean[:, l]))))
    if mode == "direct":  # MLPs and the final norm's scale at END keep their clean values
        fwd += [(hooks.mlp_out(l), hooks.set_at_end(rep(cache.mlp_out[:, l]))) for l in range(model.n_layers)]
        fwd.append((hooks.FINAL_SCALE, hooks.set_at_end(rep(cache.final_scale))))
    tail = rep(cache.tokens)[:, -1:] if kv is not None else rep(cache.tokens)
    kw = {"past_key_values": kv} if kv is not None else {}
    with torch.enable_grad(), kept(kv):
        logits = model.bridge.run_with_hooks(tail, fwd_hooks=fwd, **kw)[:, -1].float()
        values = _score_values(logits, rep(cache.answers), digits.to(logits.device))
        order = list(leaves)
        out = {}
        for i, name in enumerate(SCORES):
            grads = torch.autograd.grad(values[name].sum(), [leaves[l] for l in order],
                                        retain_graph=i < len(SCORES) - 1, allow_unused=True)
            out[name] = {l: (torch.zeros_like(leaves[l]) if g is None else g).float() for l, g in zip(order, grads)}
    return out


def _repeated_kv(kv, times: int):
    if kv is None or times == 1:
        return kv
    kv = copy.deepcopy(kv)
    kv.batch_repeat_interleave(times)
    return kv


def attribution_scores(model: LoadedModel, cache: EndCache, digits: Int[Tensor, "10"], mode: str = "total",
                       method: Method = ATTRIBUTION) -> AttributionScores:
    """Estimated effect of patching each head at END (``method``: attribution, EAP-IG or IG per head).

    est[b, layer, head] = Σ_d_head mean_α ∂score/∂z[END, layer, head] (at point α) · Δz[b, layer, head].
    """
    if mode not in patching.MODES:
        raise ValueError(f"unknown patching mode {mode!r}: choose from {patching.MODES}")
    if method.steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {method.steps}")
    B, L, H = cache.z_clean.shape[:3]
    dz = cache.z_cf - cache.z_clean
    kv = prefix_kv(model, cache.tokens[:, :-1]) if cache.tokens.shape[1] > 1 else None
    total = {name: torch.zeros_like(dz) for name in SCORES}
    alphas = [k / method.steps for k in range(method.steps)]
    if method.interpolate == "all_heads":
        for a in alphas:
            point = cache.z_clean + a * dz
            grads = _gradients(model, cache, kv, digits, mode, {l: point[:, l] for l in range(L)}, None, 1)
            for name in SCORES:
                total[name] += torch.stack([grads[name][l] for l in range(L)], 1)
    elif method.interpolate == "one_head":
        kv_rep = _repeated_kv(kv, H)
        idx = torch.arange(H, device=dz.device)
        mask = torch.eye(H, device=dz.device).repeat(B, 1)[:, :, None]  # row (b, copy c) moves head c
        for layer in range(L):
            for a in alphas:
                grid = cache.z_clean[:, layer, None].repeat(1, H, 1, 1)  # [prompt, copy, head, d_head]
                grid[:, idx, idx] += a * dz[:, layer]
                grads = _gradients(model, cache, kv_rep, digits, mode, {layer: grid.view(B * H, H, -1)}, mask, H)
                for name in SCORES:
                    total[name][:, layer] += grads[name][layer].view(B, H, H, -1)[:, idx, idx]
    else:
        raise ValueError(f"unknown interpolation {method.interpolate!r}: choose all_heads or one_head")
    est = {name: (total[name] / method.steps * dz).sum(-1) for name in SCORES}
    return AttributionScores(est["logit"], est["logit_diff"], est["prob"])


def estimates_table(cache: EndCache, scores: AttributionScores, clean_logit: Float[Tensor, "batch"],
                    **labels) -> pd.DataFrame:
    """Per-prompt estimates as :func:`arithlens.analyses.end_cache.effects_table` lays out exact effects: one row
    per (prompt, layer, head), columns ``rel_logit`` (estimated Δlogit / clean logit), ``d_logit_diff``,
    ``d_prob``; ``labels`` become constant columns."""
    B, L, H = scores.d_logit.shape
    cols = {"rel_logit": scores.d_logit / clean_logit[:, None, None], "d_logit_diff": scores.d_logit_diff,
            "d_prob": scores.d_prob}
    return pd.DataFrame({**labels, "prompt": np.repeat(cache.index, L * H),
                         "layer": np.tile(np.repeat(np.arange(L), H), B), "head": np.tile(np.arange(H), B * L),
                         **{k: v.detach().cpu().numpy().ravel() for k, v in cols.items()}})


def attribute_heads(model: LoadedModel, prompts: ItemSet, caches: list[EndCache], modes: Sequence[Mode] = ("total",),
                    methods: Sequence[Method] = (ATTRIBUTION, eap_ig()), progress=None) -> pd.DataFrame:
    """Estimates of every method and mode: one row per (method, mode, prompt, layer, head), with the
    columns of :func:`arithlens.analyses.patching.patch_heads` (``operator`` included)."""
    digits = digit_tokens(model.tokenizer)
    jobs = [(m, mode) for m in methods for mode in modes]
    frames = []
    for method, mode in (progress(jobs, desc="attribution (method, mode)") if progress else jobs):
        for cache in caches:
            clean = clean_scores(model, cache, digits)
            est = attribution_scores(model, cache, digits, mode, method)
            frames.append(estimates_table(cache, est, clean.logit, method=method.name, mode=mode))
    out = pd.concat(frames, ignore_index=True)
    ops = np.array([it.operator for it in prompts.items])
    out.insert(3, "operator", ops[out["prompt"].to_numpy()])
    return out


def compare_with_exact(model: LoadedModel, prompts: ItemSet, caches: list[EndCache], modes: Sequence[Mode] = ("total",),
                       methods: Sequence[Method] = (ATTRIBUTION, eap_ig()), progress=None) -> pd.DataFrame:
    """Exact patching (:func:`arithlens.analyses.patching.patch_heads`, ``method="exact"``) and the estimates in
    one long table: one row per (method, mode, prompt, layer, head), with the metrics both report (the
    estimators do not estimate the digit-only log-probability)."""
    exact = patching.patch_heads(model, prompts, caches, modes=tuple(modes), progress=progress)
    exact.insert(0, "method", "exact")
    est = attribute_heads(model, prompts, caches, modes, methods, progress)
    shared = [c for c in exact.columns if c in est.columns]
    return pd.concat([exact[shared], est[shared]], ignore_index=True)


@torch.no_grad()
def two_forward_seconds(model: LoadedModel, prompts: ItemSet, batch_size: int = 16) -> float:
    """Wall time of two plain forward passes over ``prompts`` (clean, then counterfactual), after a
    warm-up on one batch: the unit in which the sweeps' cost is stated."""
    import time

    batches = length_batches(prompts.items, batch_size)

    def forwards(which: str, batches=batches) -> None:
        for b in batches:
            model.bridge(to_tokens([prompts.items[i] for i in b], which).to(model.device))

    forwards("clean", batches[:1])
    start = time.perf_counter()
    forwards("clean")
    forwards("counterfactual")
    return time.perf_counter() - start

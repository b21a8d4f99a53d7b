"""MLP tracing at END: per-layer MLP direct effects, unembedding cosines, and the logit lens.

Science wing (paper § "MLP tracing"). Builds on :mod:`arithlens.analyses.patching`'s cached runs and
:mod:`arithlens.core.hooks`'s hook names and scores:

* :func:`mlp_direct_effects` — each layer's MLP output at END takes its counterfactual value while
  every head and every other MLP keeps its clean value and the final norm's scale is frozen (the
  paper's "all else frozen" metric, as for heads). Linear algebra on the caches; checked against
  :func:`reference_mlp_effect`, one hooked forward pass per layer.
* :func:`unembed_cosines` — cos(MLP input, W_U[A]), cos(MLP input, W_U[B]) and cos(MLP update,
  W_U[C]) at END across layers (MLP input = ``resid_mid``, update = ``mlp_out``).
* :func:`heads_to_mlp_effects` and :func:`joint_effects` — how much of the key heads' joint effect passes
  through each MLP (the heads' change routed into that MLP's input only), against the joint effect itself.
* :func:`logit_lens` — the residual stream after each layer through the final norm, unembedding and any
  final soft-capping:
  rank and logit of chosen tokens per layer.

Written by hand on TransformerLens caches; the norm and unembedding are the model's own modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from arithlens.core import hooks, layout
from arithlens.core.hooks import (EndScores, Head, digit_tokens, head_deltas, scores_from_columns, scores_from_logits,
                             set_at_end, stack_scores)
from arithlens.core.items import Item, to_tokens
from arithlens.core.models import LoadedModel, last_position_only, logits_at_end
from arithlens.analyses.end_cache import EndCache, clean_scores, effects_table, unembed_scores
from arithlens.analyses.patching import run_references


def _frozen_scale_scores(model: LoadedModel, cache: EndCache, change: Float[Tensor, "batch n d_model"],
                         digits: Int[Tensor, "10"], with_prob: bool) -> EndScores:
    """Scores when ``change`` [batch, n, d_model] is added to the final residual, final-norm scale frozen.

    Linear in ``change`` on a layout without unembedding bias or soft-capping (:mod:`arithlens.core.layout`);
    otherwise the frozen-scale final residual goes through the unembedding and the cap.
    """
    lay = layout.describe(model)
    norm_w = layout.final_norm_weight(model, lay)
    if lay.unembed_bias or lay.final_softcap:
        final = (cache.resid_final[:, None] + change) / cache.final_scale[:, :, None] * norm_w
        return unembed_scores(model, final, cache.answers, digits.to(final.device), with_prob, cache.clean_logits)
    W_U = model.bridge.unembed.original_component.weight.float()  # [d_vocab, d_model]
    delta = change / cache.final_scale[:, :, None] * norm_w
    digits = digits.to(delta.device)
    cols = torch.cat([cache.answers[:, None], digits[None].expand(len(cache.answers), -1)], 1)
    picked = cache.clean_logits.gather(1, cols)[:, None] + torch.einsum("bld,bkd->blk", delta, W_U[cols])
    mask = (digits[None] == cache.answers[:, None])[:, None].expand(-1, delta.shape[1], -1)
    lse = torch.logsumexp(cache.clean_logits[:, None] + delta @ W_U.T, -1) if with_prob else None
    return scores_from_columns(picked[..., 0], picked[..., 1:], mask, lse)


@torch.no_grad()
def mlp_direct_effects(model: LoadedModel, cache: EndCache, digits: Int[Tensor, "10"], with_prob: bool = True) -> EndScores:
    """Direct effect of each layer's MLP at END: scores [batch, layer] (final-norm scale frozen).

    ``hook_mlp_out`` is what the MLP branch adds to the residual (after any post-MLP norm), so only
    the final norm, unembedding and cap depend on the layout; where :mod:`arithlens.core.layout` cannot
    describe it, :func:`reference_mlp_effect` runs once per layer (announced).
    """
    if layout.describe(model) is None:
        calls = [lambda l=l: reference_mlp_effect(model, cache, l, digits, with_prob) for l in range(model.n_layers)]
        return stack_scores(run_references(model, calls, f"MLP direct effects of {model.n_layers} layers"))
    return _frozen_scale_scores(model, cache, cache.mlp_out_cf - cache.mlp_out, digits, with_prob)


@torch.no_grad()
def reference_mlp_effect(model: LoadedModel, cache: EndCache, layer: int, digits: Int[Tensor, "10"],
                         with_prob: bool = True) -> EndScores:
    """One hooked forward pass: MLP ``layer`` patched at END, later heads/MLPs and the final scale frozen."""
    n = model.n_layers
    fwd = [(hooks.mlp_out(layer), set_at_end(cache.mlp_out_cf[:, layer]))]
    fwd += [(hooks.hook_z(l), set_at_end(cache.z_clean[:, l])) for l in range(layer + 1, n)]
    fwd += [(hooks.mlp_out(l), set_at_end(cache.mlp_out[:, l])) for l in range(layer + 1, n)]
    fwd += [(hooks.FINAL_SCALE, set_at_end(cache.final_scale))]
    logits = logits_at_end(model, cache.tokens, fwd)
    return scores_from_logits(logits, cache.answers, digits.to(logits.device), with_prob)


def patch_mlps(model: LoadedModel, caches: list[EndCache], senders: Sequence[Head] | None = None) -> pd.DataFrame:
    """Per-prompt, per-layer effects (:func:`arithlens.analyses.end_cache.effects_table`): each MLP's direct
    effect, or with ``senders`` (heads) their effect routed through each MLP."""
    digits = digit_tokens(model.tokenizer)
    units = {"layer": np.arange(model.n_layers)}
    frames = []
    for cache in caches:
        patched = (mlp_direct_effects(model, cache, digits) if senders is None
                   else heads_to_mlp_effects(model, cache, senders, digits))
        frames.append(effects_table(cache, patched, clean_scores(model, cache, digits), units,
                                    mode="direct" if senders is None else "heads→mlp"))
    return pd.concat(frames, ignore_index=True)


def _cos(x: Tensor, y: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(x, y, dim=-1)


@torch.no_grad()
def unembed_cosines(model: LoadedModel, cache: EndCache, items: Sequence[Item]) -> pd.DataFrame:
    """Per prompt and layer: cos(resid_mid, W_U[A]), cos(resid_mid, W_U[B]), cos(mlp_out, W_U[C]).

    A, B and C are the tokens of the operands' and the answer's last digit as they follow a space-free
    prefix (the answer token is the one the model must produce).
    """
    W_U = model.bridge.unembed.original_component.weight.float()
    tok = lambda it, pos: it.clean_tokens[pos]
    a = W_U[torch.tensor([tok(it, it.a_pos) for it in items])][:, None]  # [batch, 1, d_model]
    b = W_U[torch.tensor([tok(it, it.b_pos) for it in items])][:, None]
    c = W_U[cache.answers][:, None]
    rows = {"cos_input_A": _cos(cache.resid_mid, a), "cos_input_B": _cos(cache.resid_mid, b),
            "cos_update_C": _cos(cache.mlp_out, c)}
    B, L = cache.resid_mid.shape[:2]
    return pd.DataFrame({"prompt": cache.index.repeat(L), "layer": list(range(L)) * B,
                         **{k: v.cpu().numpy().ravel() for k, v in rows.items()}})


@torch.no_grad()
def logit_lens(model: LoadedModel, items: Sequence[Item], tokens: dict[str, list[int]]) -> pd.DataFrame:
    """Rank (0 = top) and logit of named tokens at END after every layer, through the final norm.

    ``items`` must tokenize to one length; ``tokens`` maps a label (e.g. ``"answer"``) to one token
    id per item. One row per (item, layer, label); layer ``n_layers - 1`` equals the model's output.
    """
    names = [hooks.resid_post(l) for l in range(model.n_layers)]
    batch = to_tokens(items).to(model.device)
    _, cache = model.bridge.run_with_cache(batch, names_filter=lambda n: n in names, **last_position_only(model))
    rows = []
    for layer, name in enumerate(names):
        logits = layout.final_logits(model, cache[name][:, -1])  # [batch, d_vocab], soft-capped if the model caps
        for label, ids in tokens.items():
            ids_t = torch.tensor(ids, device=logits.device)
            chosen = logits.gather(1, ids_t[:, None])[:, 0]
            ranks = (logits > chosen[:, None]).sum(-1)
            for i in range(len(items)):
                rows.append({"item": i, "layer": layer, "label": label, "token": int(ids[i]),
                             "rank": int(ranks[i]), "logit": float(chosen[i])})
    return pd.DataFrame(rows)


@torch.no_grad()
def heads_to_mlp_effects(model: LoadedModel, cache: EndCache, senders: Sequence[Head], digits: Int[Tensor, "10"],
                         with_prob: bool = True) -> EndScores:
    """Sender heads' effect routed through each MLP layer: scores [batch, layer].

    For receiver layer l, MLP l's input at END becomes the clean ``resid_mid`` plus the senders'
    counterfactual changes from layers ≤ l; MLP l is recomputed and only its output change reaches the
    logits (every other head and MLP at END frozen, final-norm scale frozen). Cached activations only:
    one MLP evaluation per layer, with the layout's norms (:mod:`arithlens.core.layout`: a layer's senders
    pass its post-attention norm together); where the layout cannot be described,
    :func:`reference_heads_to_mlp` runs for each layer (announced).
    """
    lay = layout.describe(model)
    if lay is None:
        calls = [lambda l=l: reference_heads_to_mlp(model, cache, senders, l, digits, with_prob)
                 for l in range(model.n_layers)]
        return stack_scores(run_references(model, calls, f"heads → MLP effects of {model.n_layers} layers (2 passes each)"))
    deltas = head_deltas(model, cache.z_cf - cache.z_clean)  # [batch, layer, head, d_model]
    mask = torch.zeros(model.n_layers, model.n_heads, device=deltas.device)
    for h in senders:
        mask[h.layer, h.head] = 1.0
    summed = (deltas * mask[None, :, :, None]).sum(2)  # [batch, layer, d_model]: senders' change to each attention output
    if lay.post_attn_norm:
        summed = torch.stack([layout.attn_update(model, lay, l, cache.attn_pre[:, l], summed[:, l])
                              for l in range(model.n_layers)], 1)
    per_layer = summed.cumsum(1)  # senders' change entering each resid_mid
    changes = []
    for layer in range(model.n_layers):
        new = layout.mlp_update(model, lay, layer, cache.resid_mid[:, layer] + per_layer[:, layer])
        changes.append(new - cache.mlp_out[:, layer])
    return _frozen_scale_scores(model, cache, torch.stack(changes, 1), digits, with_prob)


@torch.no_grad()
def reference_heads_to_mlp(model: LoadedModel, cache: EndCache, senders: Sequence[Head], layer: int,
                           digits: Int[Tensor, "10"], with_prob: bool = True) -> EndScores:
    """Plain reference for one receiver: two hooked forward passes.

    Pass 1 patches the senders at END and freezes every other head and every MLP at END, and records
    the input of MLP ``layer``. Pass 2 is clean, feeds that input to MLP ``layer`` only (``hook_resid_mid``:
    ``ln2.hook_in`` on a pre-norm block, the MLP's own input where there is no pre-MLP norm),
    and freezes later heads, other MLPs and the final-norm scale at END.
    """
    n = model.n_layers
    sender_layers = {}
    for h in senders:
        sender_layers.setdefault(h.layer, []).append(h.head)

    def z_end(l):  # every head at END clean, except the senders, which take their counterfactual value
        value = cache.z_clean[:, l].clone()
        heads = sender_layers.get(l, [])
        value[:, heads] = cache.z_cf[:, l, heads]
        return value

    recorded = {}

    def record(act, hook=None):
        recorded["x"] = act[:, -1].clone()
        return act

    fwd = [(hooks.hook_z(l), set_at_end(z_end(l))) for l in range(n)]
    fwd += [(hooks.mlp_out(l), set_at_end(cache.mlp_out[:, l])) for l in range(n)]
    fwd += [(hooks.resid_mid(layer), record)]
    model.bridge.run_with_hooks(cache.tokens, fwd_hooks=fwd, **last_position_only(model))
    fwd = [(hooks.resid_mid(layer), set_at_end(recorded["x"]))]
    fwd += [(hooks.hook_z(l), set_at_end(cache.z_clean[:, l])) for l in range(layer + 1, n)]
    fwd += [(hooks.mlp_out(l), set_at_end(cache.mlp_out[:, l])) for l in range(n) if l != layer]
    fwd += [(hooks.FINAL_SCALE, set_at_end(cache.final_scale))]
    logits = logits_at_end(model, cache.tokens, fwd)
    return scores_from_logits(logits, cache.answers, digits.to(logits.device), with_prob)


@torch.no_grad()
def joint_head_effect(model: LoadedModel, cache: EndCache, heads: Sequence[Head], mode: str, digits: Int[Tensor, "10"]) -> EndScores:
    """Every head of ``heads`` at END patched with its counterfactual value at once, in one hooked forward
    pass: ``path`` freezes every other head after the first of them at END (MLPs recomputed), ``direct``
    also freezes every MLP from that layer on and the final-norm scale. Scores [batch] — what the heads do
    together, against which :func:`heads_to_mlp_effects` measures the part that passes through each MLP."""
    if mode not in ("direct", "path"):
        raise ValueError(f"mode must be 'direct' or 'path', got {mode!r}")
    by_layer: dict[int, list[int]] = {}
    for h in heads:
        by_layer.setdefault(h.layer, []).append(h.head)
    first = min(by_layer)

    def z_end(l):  # the set's heads take their counterfactual value; every other head its clean one
        value = cache.z_clean[:, l].clone()
        value[:, by_layer.get(l, [])] = cache.z_cf[:, l, by_layer.get(l, [])]
        return value
    fwd = [(hooks.hook_z(l), set_at_end(z_end(l))) for l in range(first, model.n_layers)]
    if mode == "direct":
        fwd += [(hooks.mlp_out(l), set_at_end(cache.mlp_out[:, l])) for l in range(first, model.n_layers)]
        fwd += [(hooks.FINAL_SCALE, set_at_end(cache.final_scale))]
    logits = logits_at_end(model, cache.tokens, fwd)
    return scores_from_logits(logits, cache.answers, digits.to(logits.device), False)


def joint_effects(model: LoadedModel, caches: list[EndCache], heads: Sequence[Head]) -> pd.DataFrame:
    """:func:`joint_head_effect` in the direct and path conventions, per prompt: ``mode``, ``prompt`` and
    the columns of :func:`arithlens.analyses.end_cache.effects_table` (no p(answer))."""
    digits = digit_tokens(model.tokenizer)
    frames = []
    for mode in ("direct", "path"):
        for cache in caches:
            patched = joint_head_effect(model, cache, heads, mode, digits).map(lambda t: t[:, None])
            frames.append(effects_table(cache, patched, clean_scores(model, cache, digits), {}, mode=mode))
    return pd.concat(frames, ignore_index=True)


def detect_layers(profile: pd.DataFrame, rise: float = 0.2) -> dict[str, int]:
    """Start / inflection / end layers from mean cosine profiles (the stated rule).

    ``profile``: one row per layer with ``operands`` (mean of cos(input, W_U[A]) and cos(input, W_U[B]))
    and ``answer`` (cos(update, W_U[C])). *inflection* = the layer where the operand cosine peaks; *start*
    = the first layer at or before it whose operand cosine has risen ``rise`` of the way from its
    minimum before the peak to the peak, counted from that minimum (an early bump, e.g. the embedding
    itself at layer 0, is not a start); *end* = the layer where the answer cosine peaks.
    """
    ops = profile["operands"].to_numpy()
    peak = int(ops.argmax())
    trough = int(ops[: peak + 1].argmin())
    low = ops[trough]
    start = int(next(i for i in range(trough, peak + 1) if ops[i] >= low + rise * (ops[peak] - low)))
    return {"start": start, "inflection": peak, "end": int(profile["answer"].to_numpy().argmax())}

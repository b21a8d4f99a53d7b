"""Path patching of attention heads at the END position — the paper's head localization.

Science wing (paper § "Path patching (head localization)"). For every head (layer, head), the head's
output at END (``hook_z``) takes its value on the counterfactual prompt and we read the answer at END.
What else is frozen is ambiguous in the paper, so there are three modes:

* ``direct`` — every other head and every MLP keeps its clean value, and the final norm's scale is
  frozen at its clean value: the head → logits direct path. Linear algebra on two cached runs.
* ``path`` — every other head keeps its clean value; MLPs (and the final norm) are recomputed: the
  head's effect on the logits directly and through the MLPs (the IOI path-patching convention).
  Only the MLP stack is re-run, at END, batched over all heads at once.
* ``total`` — nothing frozen (activation patching). Only the END position is recomputed: an
  intervention confined to END leaves every earlier position unchanged, so the clean run's keys and
  values (HF ``past_key_values``) are reused.

The fast ``direct`` and ``path`` sweeps (:func:`sweep_heads`) redo every operation between a head's
``hook_z`` and the logits, so they are driven by the model's block layout (:mod:`arithlens.core.layout`:
which norms sit before or after attention and the MLP, (1 + w) norms, unembedding bias, final-logit
soft-capping). They run only where :func:`arithlens.core.layout.describe` knows the layout — Llama,
Qwen2, Qwen3, Mistral and Phi-3 (plain pre-norm), Gemma 2 and Gemma 3 (norms before and after
attention and MLP; Gemma 2's logits soft-capped) and OLMo 2 (norms only after attention and MLP), each
checked against the plain references (:func:`reference_effect`, one hooked forward pass per head) on a
tiny model for every head. Elsewhere
they fall back to the references and say so first: one line ``no checked fast path for ARCH: N hooked
passes, ≈ M min`` (timed on the first passes; in the notebook and on the terminal where the user waits),
then a progress bar per pass (:func:`run_references`).
``total`` needs no layout.

What every sweep reads — one cached clean/counterfactual run per batch — and how patched scores are
read off the unembedding and laid out as a table are :mod:`arithlens.analyses.end_cache`'s; heads, hook
names, the prefix KV cache, END-only reruns and the score records are :mod:`arithlens.core.hooks`'s.

Written by hand (no library does exact END-only path patching over all heads at once); hooks and
weights come from TransformerLens, the MLP / norm modules are the model's own (applied where
:mod:`arithlens.core.layout` says they act).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from arithlens.analyses.end_cache import EndCache, clean_scores, effects_table, slice_cache, tiled_lse, unembed_scores
from arithlens.core import hooks, layout
from arithlens.core.hooks import (EndScores, Head, cat_scores, digit_tokens, end_only_logits, head_deltas, prefix_kv,
                                  scores_from_columns, scores_from_logits, set_at_end, stack_scores)
from arithlens.core.items import ItemSet
from arithlens.core.layout import BlockLayout
from arithlens.core.models import LoadedModel, logits_at_end
from arithlens.core.progress import notice, progress as progress_bar

Mode = Literal["direct", "path", "total"]
MODES: tuple[Mode, ...] = ("direct", "path", "total")
#: Architectures with a fast path: those whose block layout :mod:`arithlens.core.layout` describes
#: (checked fast == reference on each family's tiny model). Informational: the sweeps ask
#: :func:`arithlens.core.layout.describe`, which also checks the loaded model's norms against the table.
FAST_ARCHITECTURES = frozenset(layout.CHECKED)


# --- fast sweeps -------------------------------------------------------------------------------

@torch.no_grad()
def sweep_direct(model: LoadedModel, caches: list[EndCache], digits: Int[Tensor, "10"],
                 with_prob: bool = True) -> list[EndScores]:
    """Direct effect of every head for each cache: scores of shape [batch, layer*head] per cache.

    With the final norm's scale frozen, a head's change to the logits is linear in its ``hook_z``
    change: Δlogits = Δz · (W_O[l, h] · diag(w) · W_Uᵀ) / scale. Where there are more prompts than
    about d_head, that d_head × d_vocab matrix is built once per layer (one vocabulary tile at a time)
    for all prompts of all caches, so the full-vocabulary logsumexp costs d_head, not d_model,
    multiply-adds per vocabulary entry and prompt; with fewer, building it would cost more than it
    saves, and each head's change to the normalized residual is unembedded instead.

    That shortcut is the plain layout's (:mod:`arithlens.core.layout`). With a post-attention norm the
    change is no longer linear in Δz, and with soft-capping or an unembedding bias the logits are
    not either: there each head's change to the residual goes through the norm at END and the
    frozen-scale final residual through the unembedding (:func:`_direct_general`).
    """
    lay = _layout_or_raise(model, "direct")
    if lay.post_attn_norm or lay.unembed_bias or lay.final_softcap:
        return [_direct_general(model, lay, c, digits, with_prob) for c in caches]
    norm_w = layout.final_norm_weight(model, lay)
    W_U = model.bridge.unembed.original_component.weight.float()  # [d_vocab, d_model]
    W_O = model.bridge.W_O.float()  # [layer, head, d_head, d_model]
    digits = digits.to(W_U.device)
    H = model.n_heads
    answers = torch.cat([c.answers for c in caches])
    clean = torch.cat([c.clean_logits for c in caches])  # [n, d_vocab]
    dz = torch.cat([(c.z_cf - c.z_clean) / c.final_scale[:, :, None, None] for c in caches])  # [n, layer, head, d_head]
    cols = torch.cat([answers[:, None], digits[None].expand(len(answers), -1)], 1)  # [n, 11]
    base, W_cols = clean.gather(1, cols), W_U[cols]  # [n, 11], [n, 11, d_model]
    mask = (digits[None] == answers[:, None])[:, None].expand(-1, H, -1)
    shift = clean.amax(-1, keepdim=True)  # [n, 1]
    shifted = clean - shift  # [n, d_vocab]
    n, d_head, d_model = len(answers), W_O.shape[-2], W_O.shape[-1]
    build = builds_head_unembedding(n, d_head, d_model)
    W_T = W_U.T  # [d_model, d_vocab]
    parts = []
    for layer in range(model.n_layers):
        G = W_O[layer] * norm_w  # [head, d_head, d_model]
        u = torch.einsum("nhe,hed->nhd", dz[:, layer], G)  # each head's change to the normalized residual
        picked = base[:, None] + torch.einsum("nhd,nkd->nhk", u, W_cols)  # [n, head, 11]
        lse = None
        if with_prob and build:
            dzl = dz[:, layer].transpose(0, 1).contiguous()  # [head, n, d_head]
            lse = tiled_lse(lambda sl, G=G, dzl=dzl: torch.bmm(dzl, G @ W_T[:, sl]).add_(shifted[None, :, sl]),
                            W_T.shape[1], shift[None, :, 0]).T  # [n, head]
        elif with_prob:
            lse = tiled_lse(lambda sl, u=u: (u @ W_T[:, sl]).add_(shifted[:, None, sl]), W_T.shape[1], shift)
        parts.append(scores_from_columns(picked[..., 0], picked[..., 1:], mask, lse))
    scores = cat_scores(parts, 1)
    out, start = [], 0
    for c in caches:
        sl = slice(start, start + len(c.answers))
        out.append(scores.map(lambda t, sl=sl: t[sl]))
        start = sl.stop
    return out


def builds_head_unembedding(n_prompts: int, d_head: int, d_model: int) -> bool:
    """Whether :func:`sweep_direct` builds each head's d_head × d_vocab matrix W_O·diag(w)·W_Uᵀ first.

    Built, Δz costs d_head·(d_model + n) multiply-adds per head and vocabulary entry; unembedding
    each prompt's change to the residual costs n·d_model. Built only where that is cheaper: more
    than d_head·d_model / (d_model − d_head) prompts (~72 on SmolLM2 and Qwen 0.5B)."""
    return d_head * (d_model + n_prompts) < n_prompts * d_model


def _layout_or_raise(model: LoadedModel, mode: str) -> BlockLayout:
    lay = layout.describe(model)
    if lay is None:
        raise NotImplementedError(f"no checked fast {mode} patching for {layout.architecture(model)} "
                                  "(arithlens.core.layout cannot describe its block layout)")
    return lay


def _direct_general(model: LoadedModel, lay: BlockLayout, cache: EndCache, digits: Int[Tensor, "10"],
                    with_prob: bool, chunk: int = 16) -> EndScores:
    """:func:`sweep_direct` for any described layout: scores [batch, layer*head]."""
    w = layout.final_norm_weight(model, lay)
    parts = []
    for s in range(0, cache.tokens.shape[0], chunk):
        sl = slice(s, s + chunk)
        part = slice_cache(cache, sl)
        change = _head_updates(model, lay, part)  # [b, layer, head, d]
        final = (part.resid_final[:, None] + change.flatten(1, 2)) / part.final_scale[:, :, None] * w
        parts.append(unembed_scores(model, final, part.answers, digits.to(final.device), with_prob, part.clean_logits))
    return cat_scores(parts, 0)


def _head_updates(model: LoadedModel, lay: BlockLayout, cache: EndCache) -> Float[Tensor, "batch layer head d_model"]:
    """Each head's change, when patched alone, to its layer's update of the residual stream at END."""
    delta = head_deltas(model, cache.z_cf - cache.z_clean)  # through W_O: [b, layer, head, d]
    if not lay.post_attn_norm:
        return delta
    return torch.stack([layout.attn_update(model, lay, l, cache.attn_pre[:, l], delta[:, l])
                        for l in range(model.n_layers)], 1)


@torch.no_grad()
def sweep_path(model: LoadedModel, cache: EndCache, digits: Int[Tensor, "10"], with_prob: bool = True,
               chunk: int = 16) -> EndScores:
    """Head → (MLPs) → logits for every head; other heads frozen at END, MLPs re-run at END.

    The MLP branch is re-run with the layout's norms (:func:`arithlens.core.layout.mlp_update`); a head's
    change enters the residual through the post-attention norm where there is one.
    """
    lay = _layout_or_raise(model, "path")
    parts = []
    for s in range(0, cache.tokens.shape[0], chunk):
        sl = slice(s, s + chunk)
        part = slice_cache(cache, sl)
        delta = _head_updates(model, lay, part)  # [b, layer, head, d]
        D = delta.new_zeros(delta.shape[0], 0, delta.shape[-1])
        for layer in range(model.n_layers):
            D = torch.cat([D, delta[:, layer]], 1)  # heads of this layer join the active set
            new = layout.mlp_update(model, lay, layer, cache.resid_mid[sl, layer, None] + D)
            D = D + new - cache.mlp_out[sl, layer, None]
        final = model.bridge.ln_final.original_component(cache.resid_final[sl, None] + D).float()
        parts.append(unembed_scores(model, final, cache.answers[sl], digits.to(final.device), with_prob,
                                     cache.clean_logits[sl]))
    return cat_scores(parts, 0)


@torch.no_grad()
def sweep_total(model: LoadedModel, cache: EndCache, digits: Int[Tensor, "10"], with_prob: bool = True) -> EndScores:
    """Activation patching of every head at END, nothing frozen; scores [batch, layer*head].

    One END-only forward pass per layer: the batch is repeated once per head of that layer and row
    (prompt b, copy h) patches head h, on the clean prefix's KV cache repeated the same way.
    """
    B, H = cache.tokens.shape[0], model.n_heads
    kv = prefix_kv(model, cache.tokens[:, :-1])
    kv_rep = copy.deepcopy(kv)
    kv_rep.batch_repeat_interleave(H)
    tokens = cache.tokens.repeat_interleave(H, 0)
    answers = cache.answers.repeat_interleave(H, 0)
    idx = torch.arange(H, device=cache.tokens.device)
    parts = []
    for layer in range(model.n_layers):
        def hook(z, hook=None, layer=layer):
            z = z.clone()
            grid = z[:, -1].view(B, H, H, -1)  # [prompt, copy, head, d_head]
            grid[:, idx, idx] = cache.z_cf[:, layer].to(z.dtype)  # copy h patches head h
            z[:, -1] = grid.view(B * H, H, -1)
            return z
        logits = end_only_logits(model, tokens, [(hooks.hook_z(layer), hook)], kv_rep)
        s = scores_from_logits(logits, answers, digits.to(logits.device), with_prob)
        parts.append(s.map(lambda t: t.view(B, H)))
    return cat_scores(parts, 1)


# --- plain references: one hooked forward pass per head ------------------------------------------

@torch.no_grad()
def reference_effect(model: LoadedModel, cache: EndCache, head: Head, mode: Mode, digits: Int[Tensor, "10"],
                     with_prob: bool = True) -> EndScores:
    """One full hooked forward pass with the mode's components frozen at END; scores [batch]."""
    L, n = head.layer, model.n_layers
    fwd = [(hooks.hook_z(L), set_at_end(cache.z_cf[:, L, head.head], head.head))]
    if mode in ("direct", "path"):
        fwd += [(hooks.hook_z(l), set_at_end(cache.z_clean[:, l])) for l in range(L + 1, n)]
    if mode == "direct":
        fwd += [(hooks.mlp_out(l), set_at_end(cache.mlp_out[:, l])) for l in range(L, n)]
        fwd += [(hooks.FINAL_SCALE, set_at_end(cache.final_scale))]
    logits = logits_at_end(model, cache.tokens, fwd)
    return scores_from_logits(logits, cache.answers, digits.to(logits.device), with_prob)


def fast_path_supported(model: LoadedModel) -> bool:
    """Whether the fast direct and path sweeps apply: :func:`arithlens.core.layout.describe` knows the layout."""
    return layout.describe(model) is not None


def run_references(model: LoadedModel, calls: Sequence[Callable[[], EndScores]], what: str) -> list[EndScores]:
    """Run ``calls`` (one hooked forward pass each) where no fast path is checked: one line up front —
    ``no checked fast path for ARCH: N hooked passes, ≈ M min``, M timed on the first two passes, in the
    notebook and on the terminal (:func:`arithlens.core.progress.notice`) — then a progress bar per pass."""
    out, start = [], time.perf_counter()
    n = len(calls)
    for k, call in enumerate(progress_bar(calls, desc=f"{what}: one hooked pass each", total=n)):
        out.append(call())
        if k + 1 == min(2, n):
            minutes = (time.perf_counter() - start) / (k + 1) * n / 60
            notice(f"no checked fast path for {layout.architecture(model)}: {n} hooked passes, ≈ {minutes:.1f} min "
                   f"({what})")
    return out


def _reference_sweep(model: LoadedModel, caches: Sequence[EndCache], mode: Mode, digits: Int[Tensor, "10"],
                     with_prob: bool) -> list[EndScores]:
    heads = [Head(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
    calls = [lambda c=c, hd=hd: reference_effect(model, c, hd, mode, digits, with_prob) for c in caches for hd in heads]
    done = run_references(model, calls, f"{mode} patching of {len(heads)} heads × {len(caches)} batch(es)")
    return [stack_scores(done[i * len(heads): (i + 1) * len(heads)]) for i in range(len(caches))]


def sweep_many(model: LoadedModel, caches: list[EndCache], mode: Mode, digits: Int[Tensor, "10"],
               with_prob: bool = True) -> list[EndScores]:
    """:func:`sweep_heads` for several batches (the direct sweep shares its per-layer work across them);
    where the layout cannot be described, one announced reference sweep over all of them."""
    if mode in ("direct", "path") and not fast_path_supported(model):
        return _reference_sweep(model, caches, mode, digits, with_prob)
    if mode == "direct":
        return sweep_direct(model, caches, digits, with_prob)
    return [sweep_heads(model, c, mode, digits, with_prob) for c in caches]


def sweep_heads(model: LoadedModel, cache: EndCache, mode: str, digits: Int[Tensor, "10"], with_prob: bool = True,
                allow_reference: bool = True) -> EndScores:
    """All heads' patched scores [batch, layer*head] (heads in layer-major order) for one batch."""
    if mode not in MODES:
        raise ValueError(f"unknown patching mode {mode!r}: choose from {MODES}")
    if mode == "total":
        return sweep_total(model, cache, digits, with_prob)  # only the KV cache reuse: valid for any decoder
    if fast_path_supported(model):
        if mode == "direct":
            return sweep_direct(model, [cache], digits, with_prob)[0]
        return sweep_path(model, cache, digits, with_prob)
    if not allow_reference:
        _layout_or_raise(model, mode)
    return _reference_sweep(model, [cache], mode, digits, with_prob)[0]


# --- the sweep as a tidy table -----------------------------------------------------------------

def patch_heads(model: LoadedModel, prompts: ItemSet, caches: list[EndCache], modes=("direct", "path"),
                with_prob: bool = True, progress=None) -> pd.DataFrame:
    """Per-prompt, per-head effects for each mode: one row per (mode, prompt, layer, head).

    Columns: ``rel_logit`` = (patched − clean) / clean answer logit (the paper's score),
    ``d_prob`` = change in p(answer), ``d_logit_diff`` = change in answer − best other digit.
    """
    digits = digit_tokens(model.tokenizer)
    units = {"layer": np.repeat(np.arange(model.n_layers), model.n_heads), "head": np.tile(np.arange(model.n_heads), model.n_layers)}
    frames = []
    for mode in (progress(list(modes), desc="patching heads (modes)") if progress else modes):
        for cache, patched in zip(caches, sweep_many(model, caches, mode, digits, with_prob)):
            frames.append(effects_table(cache, patched, clean_scores(model, cache, digits), units, mode=mode))
    out = pd.concat(frames, ignore_index=True)
    ops = np.array([it.operator for it in prompts.items])
    out.insert(2, "operator", ops[out["prompt"].to_numpy()])
    return out

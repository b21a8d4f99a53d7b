"""What path patching reads at END: one cached clean/counterfactual run per batch, and answer scores
from the unembedding.

Science wing, under :mod:`arithlens.analyses.patching` (paper § "Path patching (head localization)"),
:mod:`arithlens.analyses.mlp` (§ "MLP tracing") and :mod:`arithlens.analyses.attribution`. Every sweep
starts from the same two runs of a batch of equal-length prompts, clean and counterfactual, and ends
by reading the answer off the unembedding:

* :class:`EndCache` and :func:`cache_end` / :func:`cache_prompt_set` — what the sweeps need at END
  (each head's ``hook_z``, each layer's ``resid_mid`` and ``mlp_out``, the final residual, the final
  norm's scale, the clean logits). The clean and counterfactual prompts share every token before the
  operator (:func:`arithlens.core.items.shared_prefix_length`), so that prefix runs once and only the
  suffix runs twice;
* :func:`unembed_scores` — scores (:class:`arithlens.core.hooks.EndScores`) from normalized final
  residuals, with the layout's unembedding bias and soft-capping; the full-vocabulary logsumexp that
  p(answer) needs runs one vocabulary tile at a time (:func:`tiled_lse`: exact, never the whole
  ``[..., d_vocab]`` logits at once); :func:`clean_scores` — the clean run's;
* :func:`effects_table` — patched scores against clean ones as a tidy table, one row per (prompt, unit),
  for heads, MLP layers or any other unit.

Written by hand on TransformerLens hook names and Hugging Face ``past_key_values``; the layout's
norms and caps are :mod:`arithlens.core.layout`'s.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from arithlens.core import hooks, layout
from arithlens.core.hooks import EndScores, kept, prefix_kv, scores_from_columns, scores_from_logits
from arithlens.core.items import Item, ItemSet, length_batches, shared_prefix_length, to_tokens
from arithlens.core.models import LoadedModel, last_position_only


@dataclass(frozen=True)
class EndCache:
    """Clean and counterfactual activations at END for one batch of equal-length prompts."""

    index: np.ndarray  # positions of these items in the prompt set
    tokens: Int[Tensor, "batch pos"]
    answers: Int[Tensor, "batch"]
    z_clean: Float[Tensor, "batch layer head d_head"]
    z_cf: Float[Tensor, "batch layer head d_head"]
    resid_mid: Float[Tensor, "batch layer d_model"]
    mlp_out: Float[Tensor, "batch layer d_model"]
    mlp_out_cf: Float[Tensor, "batch layer d_model"]
    resid_final: Float[Tensor, "batch d_model"]
    final_scale: Float[Tensor, "batch 1"]
    clean_logits: Float[Tensor, "batch d_vocab"]
    #: each layer's attention output at END before its post-attention norm (clean run); only for
    #: layouts with that norm (Gemma 2 and 3, OLMo 2), else None
    attn_pre: Float[Tensor, "batch layer d_model"] | None = None


#: Vocabulary entries per tile of :func:`tiled_lse`: a tile of ~500–1,000 rows stays in the CPU's
#: cache through its product, shift, exp and sum (measured on SmolLM2's and Qwen's unembedding:
#: 16–25 % faster than one product over the whole vocabulary followed by those passes over it).
VOCAB_TILE = 1024


def tiled_lse(block: Callable[[slice], Tensor], n_vocab: int, shift: Tensor, tile: int = VOCAB_TILE) -> Tensor:
    """log Σ_v exp(block(v)) + ``shift``, one vocabulary tile at a time.

    ``block(sl)`` returns a fresh tensor ``[..., len(sl)]``: the logits of vocabulary slice ``sl``
    less ``shift`` (the clean logits' max, so that patched logits near the clean ones exp safely);
    it is exponentiated in place. The full ``[..., d_vocab]`` logits never exist at once. Where the
    sum is not finite — a patched logit more than ~88 above ``shift`` overflowed exp, or every one
    underflowed — those rows are recomputed with :func:`torch.logsumexp` over all tiles (the stable
    two-pass form), so the result is exact either way.
    """
    total = None
    for start in range(0, n_vocab, tile):
        part = block(slice(start, start + tile)).exp_().sum(-1)
        total = part if total is None else total.add_(part)
    out = total.log_() + shift
    if not torch.isfinite(out).all():
        full = torch.cat([block(slice(start, start + tile)) for start in range(0, n_vocab, tile)], -1)
        out = torch.where(torch.isfinite(out), out, torch.logsumexp(full, -1) + shift)
    return out


def _names(n_layers: int, post_attn_norm: bool = False) -> list[str]:
    return ([hooks.hook_z(l) for l in range(n_layers)] + [hooks.resid_mid(l) for l in range(n_layers)]
            + [hooks.mlp_out(l) for l in range(n_layers)] + [hooks.resid_post(n_layers - 1), hooks.FINAL_SCALE]
            + ([hooks.attn_pre_norm(l) for l in range(n_layers)] if post_attn_norm else []))


def counterfactual_prefix_length(items: Sequence[Item]) -> int:
    """How many leading tokens every item's clean prompt shares with its own counterfactual (END always
    left out): the prefix :func:`cache_end` runs once for both
    (:func:`arithlens.core.items.shared_prefix_length` of each pair, the least over the batch)."""
    return min(shared_prefix_length((it.clean_tokens, it.cf_tokens)) for it in items)


@torch.no_grad()
def cache_end(model: LoadedModel, items: Sequence[Item], index=None) -> EndCache:
    """Run clean and counterfactual prompts once and keep what the sweeps need at END.

    The clean and counterfactual prompts share every token before the operator, so that prefix runs
    once (HF ``past_key_values``) and only the suffix runs twice.
    """
    bridge, n_layers = model.bridge, model.n_layers
    tokens = to_tokens(items).to(model.device)
    cf = to_tokens(items, "counterfactual").to(model.device)
    keep = counterfactual_prefix_length(items)
    kv = prefix_kv(model, tokens[:, :keep]) if keep else None
    lay = layout.describe(model)
    post_attn_norm = lay is not None and lay.post_attn_norm
    names = _names(n_layers, post_attn_norm)
    with kept(kv):  # the counterfactual suffix runs on the same prefix
        logits, clean = bridge.run_with_cache(tokens[:, keep:], past_key_values=kv, names_filter=lambda n: n in names,
                                              **last_position_only(model))
    cf_names = [hooks.hook_z(l) for l in range(n_layers)] + [hooks.mlp_out(l) for l in range(n_layers)]
    _, counter = bridge.run_with_cache(cf[:, keep:], past_key_values=kv, names_filter=lambda n: n in cf_names,
                                       **last_position_only(model))
    end = lambda cache, name: torch.stack([cache[name(l)][:, -1] for l in range(n_layers)], 1).float()
    return EndCache(
        index=np.asarray(index if index is not None else range(len(items))),
        tokens=tokens,
        answers=torch.tensor([it.answer_token for it in items], device=model.device),
        z_clean=end(clean, hooks.hook_z),
        z_cf=end(counter, hooks.hook_z),
        resid_mid=end(clean, hooks.resid_mid),
        mlp_out=end(clean, hooks.mlp_out),
        mlp_out_cf=end(counter, hooks.mlp_out),
        resid_final=clean[hooks.resid_post(n_layers - 1)][:, -1].float(),
        final_scale=clean[hooks.FINAL_SCALE][:, -1].float(),
        clean_logits=logits[:, -1].float(),
        attn_pre=end(clean, hooks.attn_pre_norm) if post_attn_norm else None,
    )


def cache_prompt_set(model: LoadedModel, prompts: ItemSet, batch_size: int = 16, progress=None) -> list[EndCache]:
    """:func:`cache_end` over a whole prompt set (or transfer suite), in equal-length batches."""
    batches = length_batches(prompts.items, batch_size)
    it = progress(batches, desc="caching clean/counterfactual runs") if progress else batches
    return [cache_end(model, [prompts.items[i] for i in b], b) for b in it]


# --- scores at END ---------------------------------------------------------------------------

def unembed_scores(model: LoadedModel, final_normed: Float[Tensor, "batch n d_model"], answers: Tensor, digits: Tensor,
                    with_prob: bool, clean_logits: Tensor, chunk: int = 768) -> EndScores:
    """Scores from normalized final residuals; full-vocab logsumexp only when ``with_prob``.

    The clean logits' max stabilizes the logsumexp (patched logits stay near the clean ones), taken
    over vocabulary tiles of about ``chunk`` rows (whole prompts) at a time (:func:`tiled_lse`). The
    layout's unembedding bias and final soft-capping are applied (the plain layout has neither).
    """
    lay = layout.describe(model)
    bias = layout.unembed_bias(model, lay)
    W_U = model.bridge.unembed.original_component.weight  # [d_vocab, d_model]
    cols = torch.cat([answers[:, None], digits[None].expand(len(answers), -1)], 1)  # [batch, 11]
    picked = torch.einsum("bnd,bkd->bnk", final_normed, W_U[cols].float())
    if bias is not None:
        picked = picked + bias[cols][:, None]
    picked = layout.softcap(lay, picked)
    mask = (digits[None] == answers[:, None])[:, None].expand(-1, final_normed.shape[1], -1)
    lse = None
    if with_prob:
        W_T = W_U.T.float()  # [d_model, d_vocab], a view where the weights are fp32
        shift = clean_logits.amax(-1, keepdim=True)  # [batch, 1]
        n = final_normed.shape[1]

        def block(sl, rows, sh):  # the vocabulary slice's logits, less the clean max: [rows, len(sl)]
            out = rows @ W_T[:, sl]
            if bias is not None:
                out += bias[sl]
            return layout.softcap(lay, out).sub_(sh)
        step = max(1, chunk // n)  # prompts per product: ~``chunk`` rows
        lse = torch.cat([tiled_lse(functools.partial(block, rows=final_normed[i: i + step].flatten(0, 1),
                                                     sh=shift[i: i + step].repeat_interleave(n, 0)),
                                   W_T.shape[1], shift[i: i + step].repeat_interleave(n, 0)[:, 0]).view(-1, n)
                         for i in range(0, len(final_normed), step)])
    return scores_from_columns(picked[..., 0], picked[..., 1:], mask, lse)


def clean_scores(model: LoadedModel, cache: EndCache, digits: Int[Tensor, "10"]) -> EndScores:
    """The clean run's scores at END, shape [batch]."""
    return scores_from_logits(cache.clean_logits, cache.answers, digits.to(cache.clean_logits.device), True)


def slice_cache(cache: EndCache, sl: slice) -> EndCache:
    """The prompts ``sl`` of a cached batch."""
    return EndCache(**{k: (v[sl] if isinstance(v, (Tensor, np.ndarray)) else v) for k, v in cache.__dict__.items()})



def effects_table(cache: EndCache, patched: EndScores, clean: EndScores, units: dict[str, np.ndarray],
                  **labels) -> pd.DataFrame:
    """Per-prompt effects of patched units (heads, MLP layers, …): one row per (prompt, unit).

    ``patched`` has scores [batch, n_units]; ``units`` names each unit (e.g. ``{"layer": …, "head": …}``,
    arrays of length n_units). Columns ``rel_logit``, ``d_logit_diff``, ``d_digit_logprob`` (change in log
    p(answer) among the digits) and, when p(answer) was
    computed, ``d_prob``; ``labels`` become constant columns (e.g. ``mode``).
    """
    B, U = patched.logit.shape
    cols = {"rel_logit": (patched.logit - clean.logit[:, None]) / clean.logit[:, None],
            "d_logit_diff": patched.logit_diff - clean.logit_diff[:, None],
            "d_digit_logprob": patched.digit_logprob - clean.digit_logprob[:, None]}
    if patched.logprob is not None:
        cols["d_prob"] = patched.logprob.exp() - clean.logprob.exp()[:, None]
    return pd.DataFrame({**labels, "prompt": np.repeat(cache.index, U),
                         **{k: np.tile(np.asarray(v), B) for k, v in units.items()},
                         **{k: v.cpu().numpy().ravel() for k, v in cols.items()}})

"""Hooks at END: heads, hook points, prefix-cached reruns and answer scores, shared by every analysis.

Ground floor of the science wing, under every analysis that intervenes on the model: path patching
(paper § "Path patching"), knockout (§ "Knockout"), MLP tracing (§ "MLP tracing"), transfer
(§ "Transfer") and the random-head controls of Precise SFT (§ "Precise SFT"). The name is the field's:
in TransformerLens an analysis *hooks* a named activation (``blocks.3.attn.hook_z``) and reads or
replaces it. What those analyses share is here, under public names, and nowhere else:

* :class:`Head` — one attention head, the unit that is patched, ablated and fine-tuned — and
  :func:`random_heads`, the seeded draw every random-head control uses (:func:`control_heads`: the
  knockout controls' seed for each k);
* hook-point names, built in one place (:func:`hook_z`, :func:`hook_pattern`, :func:`resid_mid`,
  :func:`mlp_out`, :func:`attn_pre_norm`, …), and :func:`set_at_end`, a hook that overwrites an activation at END;
* :func:`head_deltas` — what a change of heads' ``hook_z`` writes into the residual stream;
* :func:`activations_at` — named activations of token sequences at one position each, batched by length;
* the prefix KV cache (:func:`prefix_kv`) and reruns of only the last position(s) on top of it
  (:func:`run_after_prefix`, :func:`end_only_logits`; a full hooked pass read at END is
  :func:`arithlens.core.models.logits_at_end`). An intervention confined to the positions
  rerun leaves every earlier position unchanged, so the prefix runs once for every condition; the
  cache is given back as it was found even when a hook raises (:func:`kept`) — many conditions on
  one prefix are :mod:`arithlens.core.conditions`';
* answer scores at END (:class:`EndScores`) over the digit tokens (:func:`digit_tokens`).

What the analyses feed the model — items, their tokens, batches of one length — is the other half
of the ground floor, :mod:`arithlens.core.items`. Every ``model`` here and above is an :class:`arithlens.core.models.LoadedModel` (the bridge, its tokenizer
and device), the one thing of arithlens this module imports. Written by hand on TransformerLens hook
names and Hugging Face ``past_key_values``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from arithlens.core.items import length_batches
from arithlens.core.models import LoadedModel, last_position_only

#: A TransformerLens forward hook: (hook-point name, fn(activation, hook) -> activation or None).
Hook = tuple[str, Callable[..., Any]]


# --- heads -----------------------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class Head:
    """One attention head."""

    layer: int
    head: int

    def __str__(self) -> str:
        return f"{self.layer}.{self.head}"


def heads_from_frame(frame: pd.DataFrame) -> list[Head]:
    """The heads named by a table's ``layer`` and ``head`` columns, in row order."""
    return [Head(int(l), int(h)) for l, h in zip(frame["layer"], frame["head"])]


def random_heads(n_layers: int, n_heads: int, k: int, seed: int, min_layer: int = 0,
                 exclude: Iterable[Head] = ()) -> tuple[Head, ...]:
    """``k`` distinct heads drawn uniformly (a local ``random.Random(seed)``) from layers ≥
    ``min_layer``, never one of ``exclude``; sorted by (layer, head). The pool is layer-major, so a
    given seed always draws the same heads."""
    excluded = set(exclude)
    pool = [Head(l, h) for l in range(min_layer, n_layers) for h in range(n_heads) if Head(l, h) not in excluded]
    if k > len(pool):
        raise ValueError(f"k={k} is larger than the number of heads to draw from ({len(pool)})")
    return tuple(sorted(random.Random(seed).sample(pool, k)))


def control_heads(n_layers: int, n_heads: int, k: int, seed: int) -> tuple[Head, ...]:
    """The ``k`` random heads of a random-head control's draw ``seed``: :func:`random_heads` from
    every layer under the seed ``seed · 1000 + k``, so each k gets its own draw and chapter 1's
    knockout curve and chapter 3's transfer control ablate the same heads for the same (seed, k)."""
    return random_heads(n_layers, n_heads, k, seed * 1000 + k)


def layer_matched_random_sets(key_heads: Sequence[Head], n_layers: int, n_heads: int, n_sets: int = 100,
                              seed: int = 0) -> list[list[Head]]:
    """``n_sets`` random head sets, each with as many heads in every layer as ``key_heads`` has there,
    drawn uniformly without replacement from that layer's non-key heads (``np.random.default_rng(seed)``).
    Each set is sorted by (layer, head)."""
    key = set(key_heads)
    per_layer: dict[int, int] = {}
    for h in key:
        if not (0 <= h.layer < n_layers and 0 <= h.head < n_heads):
            raise ValueError(f"head {h} is outside a {n_layers} × {n_heads} model")
        per_layer[h.layer] = per_layer.get(h.layer, 0) + 1
    pools = {l: [Head(l, h) for h in range(n_heads) if Head(l, h) not in key] for l in per_layer}
    for l, c in per_layer.items():
        if c > len(pools[l]):
            raise ValueError(f"layer {l} has {c} key heads but only {len(pools[l])} other heads to match them")
    rng = np.random.default_rng(seed)
    draw = lambda l: [pools[l][i] for i in rng.choice(len(pools[l]), per_layer[l], replace=False)]
    return [sorted(h for l in sorted(per_layer) for h in draw(l)) for _ in range(n_sets)]


# --- hook points -------------------------------------------------------------------------------------

def hook_z(layer: int) -> str:
    """Every head's output before W_O, ``[batch, pos, head, d_head]``."""
    return f"blocks.{layer}.attn.hook_z"


def hook_pattern(layer: int) -> str:
    """Attention pattern after the softmax, ``[batch, head, query_pos, key_pos]``."""
    return f"blocks.{layer}.attn.hook_pattern"


def hook_attn_out(layer: int) -> str:
    """The attention block's update to the residual stream (all heads through W_O, then any
    post-attention norm), ``[batch, pos, d_model]``."""
    return f"blocks.{layer}.hook_attn_out"


def attn_pre_norm(layer: int) -> str:
    """The attention block's output before any post-attention norm (Gemma 2 and 3, OLMo 2; on a pre-norm
    model the same tensor as :func:`hook_attn_out`), ``[batch, pos, d_model]``."""
    return f"blocks.{layer}.attn.hook_out"


def resid_mid(layer: int) -> str:
    """The residual stream between attention and MLP: the MLP's input, ``[batch, pos, d_model]``."""
    return f"blocks.{layer}.hook_resid_mid"


def resid_post(layer: int) -> str:
    """The residual stream after the layer, ``[batch, pos, d_model]``."""
    return f"blocks.{layer}.hook_resid_post"


def mlp_out(layer: int) -> str:
    """The MLP's output (its update to the residual stream), ``[batch, pos, d_model]``."""
    return f"blocks.{layer}.hook_mlp_out"


def ln2_in(layer: int) -> str:
    """What the MLP's normalization receives (``resid_mid`` on a pre-norm model), ``[batch, pos, d_model]``.
    A model without a pre-MLP norm (OLMo 2) has no such hook; :func:`resid_mid` names the MLP
    branch's input on every layout."""
    return f"blocks.{layer}.ln2.hook_in"


#: The final normalization's scale (RMS), ``[batch, pos, 1]``.
FINAL_SCALE = "ln_final.hook_scale"


def set_at_end(value: Tensor, heads=None) -> Callable[..., Tensor]:
    """A hook that replaces an activation at END (for ``hook_z``, optionally only ``heads``) by ``value``."""
    def hook(act, hook=None):
        act = act.clone()
        if heads is None:
            act[:, -1] = value.to(act.dtype)
        else:
            act[:, -1, heads] = value.to(act.dtype)
        return act
    return hook


def head_deltas(model: LoadedModel,
                dz: Float[Tensor, "batch layer head d_head"]) -> Float[Tensor, "batch layer head d_model"]:
    """Each head's change to the attention output when its ``hook_z`` changes by ``dz`` (through W_O):
    the change to the residual stream on a layout without a post-attention norm (see
    :func:`arithlens.core.layout.attn_update` for the others)."""
    W_O = model.bridge.W_O.float()  # [layer, head, d_head, d_model]; o_proj has no bias on checked archs
    return torch.einsum("blhe,lhed->blhd", dz, W_O)


def digit_tokens(tokenizer) -> Int[Tensor, "10"]:
    """Token ids of the digits 0..9 (each must be one token)."""
    ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError("this tokenizer has no single token for every digit")
    return torch.tensor(ids)


# --- activations read at one position ------------------------------------------------------------

@torch.no_grad()
def activations_at(model: LoadedModel, seqs: Sequence[Sequence[int]], names: Sequence[str],
                   positions: Sequence[int] | None = None, batch_size: int | None = None) -> dict[str, Tensor]:
    """The activations ``names`` of each token sequence at one position — ``positions[i]``, or the last
    (END) — as ``{name: [n, ...]}`` (fp32, CPU), rows in input order.

    Sequences run in batches of one length (:func:`arithlens.core.items.length_batches`: no padding,
    so every position is exact) of at most ``batch_size`` (None: a whole length group at once).
    """
    out: dict[str, Tensor] = {}
    for part in length_batches(seqs, batch_size or max(1, len(seqs)), key=len):
        tokens = torch.tensor([list(seqs[i]) for i in part], device=model.device)
        _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n in names, **last_position_only(model))
        rows = torch.arange(len(part), device=model.device)
        pos = torch.full_like(rows, tokens.shape[1] - 1) if positions is None else torch.tensor(
            [positions[i] for i in part], device=model.device)
        for name in names:
            at = cache[name][rows, pos].float().cpu()
            if name not in out:
                out[name] = torch.zeros(len(seqs), *at.shape[1:])
            out[name][part] = at
    return out


# --- the prefix KV cache and reruns on top of it ---------------------------------------------------

@torch.no_grad()
def prefix_kv(model: LoadedModel, tokens: Int[Tensor, "batch pos"]):
    """The KV cache of ``tokens`` (HF ``past_key_values``); logits only for the last position.

    Every layer keeps every position, sliding-window layers too (a ``DynamicCache`` built without the
    model's config): HF's own cache for a sliding-window layer (Mistral, Gemma 2 and 3, Phi-3) drops
    what falls out of the window as a run appends, and then cannot be cropped back (:func:`kept`) once
    prompt and run outgrow the window. The window itself is still the model's: HF masks the
    attention by position, from the config, whatever the cache holds."""
    from transformers import DynamicCache

    return model.bridge.original_model(tokens, past_key_values=DynamicCache(), use_cache=True,
                                       logits_to_keep=1).past_key_values


@contextmanager
def kept(kv) -> Iterator[Any]:
    """Within the block, runs may append to the cache ``kv``; afterwards it is cropped back to the
    length it had on entry — also when the block raises — so the next condition finds the prefix."""
    if kv is None:
        yield kv
        return
    length = kv.get_seq_length()
    try:
        yield kv
    finally:
        grown = kv.get_seq_length() - length
        if grown:
            kv.crop(-grown)


@torch.no_grad()
def run_after_prefix(model: LoadedModel, tail: Int[Tensor, "batch tail"], fwd_hooks: Iterable[Hook] = (),
                     kv=None) -> Float[Tensor, "batch tail d_vocab"]:
    """Logits of ``tail`` run after the prefix whose KV cache is ``kv`` (None: no prefix), with
    ``fwd_hooks`` acting on the tail's positions only; the cache is given back unchanged."""
    kw = {"past_key_values": kv} if kv is not None else {}
    with kept(kv):
        return model.bridge.run_with_hooks(tail, fwd_hooks=list(fwd_hooks), **kw)


@torch.no_grad()
def end_only_logits(model: LoadedModel, tokens: Int[Tensor, "batch pos"], hooks: list[Hook],
                    kv=None) -> Float[Tensor, "batch d_vocab"]:
    """Logits at END when only END changes: re-run the last position on the clean prefix's KV cache."""
    if kv is None:
        kv = prefix_kv(model, tokens[:, :-1])
    return run_after_prefix(model, tokens[:, -1:], hooks, kv)[:, -1].float()


# --- scores at END -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EndScores:
    """Answer logit, log p(answer), logit difference answer − best other digit and log p(answer) among
    the digits (the answer's log-softmax over itself and the ten digit tokens), any leading shape. The
    last two are shift-invariant: a constant added to every logit changes neither, and neither needs the
    full-vocabulary logsumexp."""

    logit: Tensor
    logprob: Tensor | None
    logit_diff: Tensor
    digit_logprob: Tensor

    def map(self, fn: Callable[[Tensor], Tensor]) -> "EndScores":
        """The same scores with ``fn`` applied to each tensor (a slice, a reshape)."""
        return EndScores(*(None if t is None else fn(t) for t in (self.logit, self.logprob, self.logit_diff,
                                                                  self.digit_logprob)))


def scores_from_columns(answer_logit: Float[Tensor, "*shape"], digit_logits: Float[Tensor, "*shape 10"],
                        answers_digit_mask: Bool[Tensor, "*shape 10"],
                        lse: Float[Tensor, "*shape"] | None) -> EndScores:
    """Scores from the answer's logit, the ten digits' logits (the mask marks the answer among them)
    and, when p(answer) is wanted, the logsumexp over the vocabulary."""
    others = digit_logits.masked_fill(answers_digit_mask, float("-inf"))
    digit_lse = torch.logsumexp(torch.cat([answer_logit[..., None], others], -1), -1)
    return EndScores(answer_logit, None if lse is None else answer_logit - lse, answer_logit - others.amax(-1),
                     answer_logit - digit_lse)


def scores_from_logits(logits: Float[Tensor, "batch d_vocab"], answers: Int[Tensor, "batch"], digits: Int[Tensor, "10"],
                       with_prob: bool) -> EndScores:
    """Scores [batch] from full logits at END."""
    ans = logits.gather(1, answers[:, None])[:, 0]
    mask = digits[None] == answers[:, None]
    return scores_from_columns(ans, logits[:, digits], mask, torch.logsumexp(logits, -1) if with_prob else None)


def stack_scores(parts: list[EndScores]) -> EndScores:
    """Per-unit scores ``[batch]`` (one head, one layer) stacked into ``[batch, unit]``."""
    return _join(parts, lambda xs: torch.stack(xs, 1))


def cat_scores(parts: list[EndScores], dim: int) -> EndScores:
    """Scores of several batches (``dim=0``) or unit groups (``dim=1``) joined."""
    return _join(parts, lambda xs: torch.cat(xs, dim))


def _join(parts: list[EndScores], join: Callable[[list[Tensor]], Tensor]) -> EndScores:
    fields = ("logit", "logprob", "logit_diff", "digit_logprob")
    values = {f: [getattr(p, f) for p in parts] for f in fields}
    return EndScores(**{f: None if xs[0] is None else join(xs) for f, xs in values.items()})

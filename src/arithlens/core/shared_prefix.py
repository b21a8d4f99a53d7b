"""Decoding a batch of prompts that share a long prefix, with the prefix's keys and values held once.

Ground floor, beside :mod:`arithlens.core.twin` (its decoder layers, its weights). A benchmark's few-shot
demonstrations are one long prefix every item shares (chain-of-thought GSM8K: about 660 tokens before a
~60-token question, then up to 256 generated tokens). HF's cache keeps one copy of the prefix per row
and grows by concatenation, so each decoding step copies the whole cache, prefix included, for every
row. Here the prefix's keys and values stay a single copy per layer, and each row's own keys and values
(the rest of its prompt, then what it generates) go into a buffer allocated once for the whole run.

**Attention** (:func:`shared_prefix_attention`, registered with HF's ``AttentionInterface`` under
:data:`ATTENTION`): a query's scores against the shared prefix ([kv-head, rows·group·t, P], one batched
product with no copy of the prefix) and against its own row's keys are concatenated, soft-maxed
together, and weigh the two value sets — the softmax over [prefix; own keys] that plain attention
computes over the concatenated cache, without building it. Grouped-query heads read their key head
without repeating it. The mask is HF's: causal over cache slots, left padding hidden, and, for a layer
whose attention is sliding-window, ``kv_index > q_index - window`` over cache slots (the prefix's slots
first), as ``transformers.masking_utils`` builds it.

It reproduces the plain forward pass of the architectures in
:data:`arithlens.core.twin.LAYER_LOOP_CHECKED` (tests/test_shared_prefix.py compares logits and greedy
tokens against HF's own cached decoding on each family's tiny model, sliding windows and padding
included); callers check :func:`fits`.

Written by hand: HF offers cascade (shared-prefix) attention only in its paged, continuous-batching
server, not for a plain model's forward pass.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from arithlens.core.models import LoadedModel
from arithlens.core.deltas import hf_model
from arithlens.core.twin import LAYER_LOOP_CHECKED, embed, make_twin, twin_of

#: The name the attention function is registered under (the twin's ``config._attn_implementation``).
ATTENTION = "arithlens_shared_prefix"


def fits(model: LoadedModel) -> bool:
    """Whether :class:`PrefixDecoder` reproduces ``model``'s forward pass (its architecture is checked)."""
    from arithlens.core import layout

    return layout.architecture(model) in LAYER_LOOP_CHECKED


@dataclass
class StepContext:
    """What every layer's attention needs besides its own inputs, for one forward step.

    ``prefix``: per layer, the shared (keys, values) ``[1, kv_heads, P, d_head]``; ``valid``: the row
    buffers' filled, non-padding slots ``[rows, slots]`` (the step's own tokens included); ``q_slot``:
    the step's queries' slots in the row buffer ``[t]`` (the same for every row)."""

    prefix: list[tuple[Tensor, Tensor]]
    valid: Tensor
    q_slot: Tensor
    masks: dict = field(default_factory=dict)

    def allowed(self, window: int | None) -> Tensor:
        """``[rows, 1, t, P + slots]``: which keys each query may attend to (computed once per window)."""
        if window not in self.masks:
            n_prefix, slots = self.prefix[0][0].shape[2], self.valid.shape[1]
            q = self.q_slot + n_prefix                                              # cache index of each query
            k = torch.arange(n_prefix + slots, device=q.device)                     # cache index of each key
            ok = k[None, :] <= q[:, None]
            if window is not None:
                ok = ok & (k[None, :] > q[:, None] - window)
            filled = torch.cat([torch.ones(self.valid.shape[0], n_prefix, dtype=torch.bool, device=q.device),
                                self.valid], 1)
            self.masks[window] = (ok[None] & filled[:, None, :])[:, None]
        return self.masks[window]


def shared_prefix_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, shared: StepContext | None = None, sliding_window=None,
                            softcap=None, **kwargs) -> tuple[Tensor, None]:
    """HF's attention-function signature: ``query`` [rows, heads, t, d]; ``key``/``value`` the rows' own
    [rows, kv_heads, slots, d] (what :class:`RowCache` returns); the prefix comes from ``shared``.
    Returns ([rows, t, heads, d], None) as HF's attention functions do."""
    if shared is None:
        raise ValueError("shared-prefix attention runs only inside PrefixDecoder (no StepContext given)")
    if softcap is not None or kwargs.get("s_aux") is not None:
        raise ValueError("shared-prefix attention has no logit soft-capping or attention sinks")
    rows, heads, t, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scaling = d ** -0.5 if scaling is None else scaling
    pk, pv = shared.prefix[module.layer_idx]
    n_prefix = pk.shape[2]
    q = query.reshape(rows, kv_heads, group * t, d)                                   # head h reads key head h // group
    qp = q.transpose(0, 1).reshape(kv_heads, rows * group * t, d)
    s_prefix = torch.bmm(qp, pk[0].transpose(1, 2)).view(kv_heads, rows, group * t, n_prefix).transpose(0, 1)
    s_own = torch.matmul(q, key.transpose(2, 3))
    scores = torch.cat([s_prefix, s_own], -1).mul_(scaling).view(rows, kv_heads, group, t, -1)
    scores = scores.masked_fill_(~shared.allowed(sliding_window)[:, :, None], float("-inf"))
    probs = scores.softmax(-1).view(rows, kv_heads, group * t, -1)
    p_prefix = probs[..., :n_prefix].transpose(0, 1).reshape(kv_heads, rows * group * t, n_prefix)
    out = torch.bmm(p_prefix, pv[0]).view(kv_heads, rows, group * t, d).transpose(0, 1)
    out = out + torch.matmul(probs[..., n_prefix:], value)
    return out.reshape(rows, heads, t, d).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, shared_prefix_attention)


_TWINS: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def decoding_twin(model: LoadedModel) -> torch.nn.Module:
    """The loaded model's twin with shared-prefix attention, made once (it shares the weights)."""
    hf = hf_model(model)
    if hf not in _TWINS:
        _register()
        _TWINS[hf] = make_twin(model, attn_implementation=ATTENTION)
    return _TWINS[hf]


class RowCache:
    """Each row's own keys and values, in buffers of ``slots`` positions allocated once (duck-typed as
    HF's cache: the attention modules call :meth:`update`). ``valid`` marks filled, non-padding slots."""

    def __init__(self, n_layers: int, rows: int, kv_heads: int, d_head: int, slots: int, like: Tensor, zeroed: int = 0):
        """``zeroed``: the first slots are zeros, for prompts written in chunks (:meth:`rows`) that leave
        some slots of some rows unwritten — masked, but a zero weight times uninitialised memory may be NaN."""
        shape = (rows, kv_heads, slots, d_head)
        self.keys = [like.new_empty(shape) for _ in range(n_layers)]
        self.values = [like.new_empty(shape) for _ in range(n_layers)]
        for buffer in (*self.keys, *self.values):
            buffer[:, :, :zeroed] = 0
        self.valid = torch.zeros(rows, slots, dtype=torch.bool, device=like.device)
        self.length = 0        # slots filled (the same for every row: padding counts)
        self._pending = 0      # the current step's token count, written by every layer

    def rows(self, r0: int, r1: int, start: int) -> "RowCache":
        """Rows ``r0:r1`` as a cache of their own that writes into these buffers, its next slot ``start``:
        a chunk of prompts shorter than the batch's longest fills only the slots before the batch's end."""
        view = object.__new__(RowCache)
        view.keys, view.values = [k[r0:r1] for k in self.keys], [v[r0:r1] for v in self.values]
        view.valid, view.length, view._pending = self.valid[r0:r1], start, 0
        return view

    @property
    def slots(self) -> int:
        return self.valid.shape[1]

    def begin(self, mask: Tensor) -> Tensor:
        """Open a step of ``mask.shape[1]`` tokens (1 = real token); returns their slots."""
        t = mask.shape[1]
        if self.length + t > self.slots:
            raise ValueError(f"the row cache holds {self.slots} slots; {self.length + t} are needed")
        self.valid[:, self.length: self.length + t] = mask.bool()
        self._pending = t
        return torch.arange(self.length, self.length + t, device=mask.device)

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        end = self.length + self._pending
        self.keys[layer_idx][:, :, self.length: end] = key
        self.values[layer_idx][:, :, self.length: end] = value
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def commit(self) -> None:
        self.length += self._pending
        self._pending = 0

    def batch_select_indices(self, rows: Tensor) -> None:
        """Keep only ``rows`` (a generation that stopped leaves the batch), as HF's caches name it."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.valid = self.valid[rows]


class PrefixDecoder:
    """The twin of ``model`` with shared-prefix attention, and the prefix ``tokens``' keys and values.

    Weights are the model's tensors (a delta applied to the model applies here); the prefix's keys and
    values are computed at construction, so build a decoder after applying a delta, not before."""

    def __init__(self, model: LoadedModel, prefix: Int[Tensor, "1 prefix"]):
        from transformers import DynamicCache

        from arithlens.core import layout

        if not fits(model):
            raise ValueError(f"shared-prefix decoding is not checked for {layout.architecture(model)}")
        self.twin = decoding_twin(model)
        with torch.no_grad():
            kv = twin_of(model)(input_ids=prefix, past_key_values=DynamicCache(), use_cache=True,
                                logits_to_keep=1).past_key_values
        self.prefix = [(layer.keys, layer.values) for layer in kv.layers]
        self.kv_heads, self.d_head = self.prefix[0][0].shape[1], self.prefix[0][0].shape[3]
        self.n_layers = len(self.twin.model.layers)

    def cache(self, rows: int, slots: int, zeroed: int = 0) -> RowCache:
        """An empty :class:`RowCache` of ``rows`` × ``slots`` (the first ``zeroed`` slots zeros)."""
        return RowCache(self.n_layers, rows, self.kv_heads, self.d_head, slots, like=self.prefix[0][0], zeroed=zeroed)

    @torch.no_grad()
    def forward(self, tokens: Int[Tensor, "rows t"], mask: Int[Tensor, "rows t"], positions: Int[Tensor, "rows t"],
                cache: RowCache, last_only: bool = True) -> Float[Tensor, "rows t_out d_vocab"]:
        """Run ``tokens`` (1 in ``mask`` = real; position ids ``positions``, counting the prefix) after
        what ``cache`` holds; append their keys and values to it. Logits of the last position only
        (``last_only``) or of every position, fp32."""
        q_slot = cache.begin(mask)
        ctx = StepContext(self.prefix, cache.valid[:, : cache.length + tokens.shape[1]], q_slot)
        hidden = embed(self.twin, tokens)
        rope = self.twin.model.rotary_emb(hidden, positions)
        for layer in self.twin.model.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, past_key_values=cache,
                           use_cache=True, position_embeddings=rope, shared=ctx)
        cache.commit()
        hidden = hidden[:, -1:] if last_only else hidden
        return self.twin.lm_head(self.twin.model.norm(hidden)).float()



"""A plain Hugging Face model that shares the loaded model's weight tensors, and a loop over its decoder
layers that can start at any layer: the fast path for passes that need no TransformerLens hooks.

Ground floor, beside :mod:`arithlens.core.deltas`. The TransformerLens bridge runs eager attention with a
hook point at every site; a pass that hooks nothing (training in chapter 4, generating an answer with no
knockout) pays for that. The twin is the same HF class built from the same config, its parameters
*assigned* the bridge model's tensors — so a delta written into the model
(:func:`arithlens.core.deltas.applied`) is in the twin too — with PyTorch's fused attention (``sdpa``).

The layer loop (:func:`run_layers`, :func:`end_logits`) runs the model's own decoder layers one by one,
with weights optionally overridden (``torch.func.functional_call``): fine-tuning (chapter 4) trains from
the lowest tuned layer on a cached residual stream, and the every-position knockout (chapter 1) runs
each condition from its lowest ablated layer. It reproduces the forward pass only of the
architectures in :data:`LAYER_LOOP_CHECKED`; callers check.

Written by hand: nothing in transformers builds a second model over existing tensors, or runs a
decoder from a given layer.
"""

from __future__ import annotations

import copy
import re
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from arithlens.core.deltas import hf_model, named_weights
from arithlens.core.models import LoadedModel


def make_twin(model: LoadedModel, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A plain HF model of the same class whose parameters *are* the bridge model's tensors.

    It uses PyTorch's fused attention (``sdpa``) by default: on CPU its backward pass is several
    times faster than the eager attention the bridge runs; logits agree to float rounding.
    """
    hf = hf_model(model)
    config = copy.deepcopy(hf.config)  # never touch the bridge's own config
    config._attn_implementation = attn_implementation
    twin = type(hf)(config).to(device=next(hf.parameters()).device, dtype=next(hf.parameters()).dtype)
    missing, unexpected = twin.load_state_dict(named_weights(model), strict=False, assign=True)
    tied = hf.lm_head.weight is hf.model.embed_tokens.weight
    assert not unexpected and missing == (["lm_head.weight"] if tied else []), (missing, unexpected)
    if tied:
        twin.lm_head.weight = twin.model.embed_tokens.weight
    return twin.eval().requires_grad_(False)


#: Architectures whose forward pass :func:`run_layers` and :func:`end_logits` reproduce (checked on each
#: family's tiny model in tests/test_finetune.py and tests/test_knockout.py): token embeddings as
#: stored, one rotary embedding for every layer, a causal mask (sliding-window where a layer's attention
#: is), the final norm and the unembedding. Not Gemma 2 or 3: their embedding module scales by
#: √d_model, Gemma 2 soft-caps its logits, Gemma 3 has a rotary embedding per layer type.
LAYER_LOOP_CHECKED = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                                "Phi3ForCausalLM", "Olmo2ForCausalLM"})


def layer_context(twin: torch.nn.Module, hidden: Tensor, pos: Tensor | None = None, kv=None) -> list[dict]:
    """Each decoder layer's keyword arguments, as the HF model's forward builds them: positions (``pos``,
    default the whole sequence from 0), rotary embeddings, and the causal mask over the prefix cache
    ``kv`` (if any) and ``hidden`` — sliding-window for a layer whose config says so (``layer_types``,
    or where there is none, Mistral's and Phi-3's ``sliding_window``)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = twin.config
    pos = torch.arange(hidden.shape[1], device=hidden.device)[None] if pos is None else pos
    types = getattr(config, "layer_types", None) or (
        ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * len(twin.model.layers))
    kw = dict(config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=kv, position_ids=pos)
    masks = {t: (create_sliding_window_causal_mask if t == "sliding_attention" else create_causal_mask)(**kw)
             for t in set(types)}
    rope = twin.model.rotary_emb(hidden, pos)
    return [{"attention_mask": masks[t], "position_ids": pos, "position_embeddings": rope} for t in types]


def _local(eff: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {n[len(prefix):]: t for n, t in eff.items() if n.startswith(prefix)}


def run_layers(twin: torch.nn.Module, hidden: Float[Tensor, "batch pos d_model"], start: int, stop: int,
               eff: dict[str, Tensor] | None = None) -> Float[Tensor, "batch pos d_model"]:
    """Residual stream entering layer ``start`` → entering layer ``stop``, weights overridden by ``eff``."""
    eff, ctx = eff or {}, layer_context(twin, hidden)
    for i in range(max(start, 0), stop):
        layer = twin.model.layers[i]
        hidden = torch.func.functional_call(layer, _local(eff, f"model.layers.{i}."), (hidden,), ctx[i])
    return hidden


def embed(twin: torch.nn.Module, tokens: Int[Tensor, "batch pos"], eff: dict[str, Tensor] | None = None) -> Tensor:
    """Token embeddings as stored (no scaling: see :data:`LAYER_LOOP_CHECKED`), weights overridden by ``eff``."""
    w = (eff or {}).get("model.embed_tokens.weight", twin.model.embed_tokens.weight)
    return F.embedding(tokens, w)


def end_logits(twin: torch.nn.Module, hidden: Float[Tensor, "batch pos d_model"], start: int,
               eff: dict[str, Tensor] | None = None) -> Float[Tensor, "batch d_vocab"]:
    """Run layers ``start…`` on ``hidden``, then the final norm and unembedding at the last position only."""
    eff = eff or {}
    hidden = run_layers(twin, hidden, start, len(twin.model.layers), eff)
    normed = torch.func.functional_call(twin.model.norm, _local(eff, "model.norm."), (hidden[:, -1],))
    tied = twin.lm_head.weight is twin.model.embed_tokens.weight
    w_u = eff.get("lm_head.weight", eff.get("model.embed_tokens.weight") if tied else None)
    return F.linear(normed, twin.lm_head.weight if w_u is None else w_u)



# --- runs after a cached prefix, from the lowest hooked layer -------------------------------------------

_HOOK_Z = re.compile(r"blocks\.(\d+)\.attn\.hook_z")
_TWINS: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def twin_of(model: LoadedModel) -> torch.nn.Module:
    """The loaded model's twin, made once (it shares the weights, so a delta written in shows in it)."""
    hf = hf_model(model)
    if hf not in _TWINS:
        _TWINS[hf] = make_twin(model)
    return _TWINS[hf]


def hooked_layer(name: str) -> int | None:
    """The layer of a head-output hook (``blocks.L.attn.hook_z``); None for any other hook point."""
    found = _HOOK_Z.fullmatch(name)
    return int(found[1]) if found else None


class TailFromLayer:
    """A tail run after a cached prefix, from any layer up, with hooks on heads' outputs only.

    Made once per (tail, prefix cache): one clean pass of the tail through the twin's layers keeps the
    residual stream entering each layer (up to ``upto``); the prefix cache is given back as it was.
    :meth:`logits` then runs ``c`` stacked copies of the tail from the lowest layer a set of
    ``hook_z`` hooks acts at — nothing below it differs from the clean pass — on a copy of the cache
    repeated ``c`` times, each hook applied to the ``o_proj`` input viewed as ``[batch, pos, head,
    d_head]`` (what TransformerLens's ``hook_z`` shows). Agrees with the bridge's hooked run to
    float rounding, for the architectures in :data:`LAYER_LOOP_CHECKED`."""

    def __init__(self, twin: torch.nn.Module, tail: Int[Tensor, "batch tail"], kv, upto: int,
                 keep: set[int] | None = None):
        """``keep``: the layers whose entering residual stream :meth:`logits` may start from (default every
        layer up to ``upto``); the others are not kept."""
        self.twin, self.kv, self.batch = twin, kv, tail.shape[0]
        self.prefix = kv.get_seq_length() if kv is not None else 0
        upto = min(upto, len(twin.model.layers))
        kept = lambda i: keep is None or i in keep
        hidden = embed(twin, tail)
        ctx, self.inputs, ran = self._context(hidden, kv), ({0: hidden} if kept(0) else {}), 0
        try:
            for i in range(upto):
                hidden = twin.model.layers[i](hidden, past_key_values=kv, use_cache=kv is not None, **ctx[i])
                ran = i + 1
                if kept(i + 1):
                    self.inputs[i + 1] = hidden
        finally:  # only the layers run grew: crop each of those back (Cache.crop would cut every layer)
            for layer in (kv.layers[:ran] if kv is not None else ()):
                layer.crop(self.prefix - layer.keys.shape[-2])

    def _context(self, hidden: Tensor, kv) -> list[dict]:
        pos = torch.arange(self.prefix, self.prefix + hidden.shape[1], device=hidden.device)[None]
        return layer_context(self.twin, hidden, pos, kv)

    @torch.no_grad()
    def logits(self, hooks: list[tuple[str, Callable]], c: int = 1, last_only: bool = False) -> Float[Tensor, "rows tail d_vocab"]:
        """Logits of the tail stacked ``c`` times (row ``i · c + j``: item ``i``, copy ``j``) under
        ``hooks`` — ``(hook_z name, fn(z, hook=None))`` pairs acting on all ``c · batch`` rows; with
        ``last_only``, of the last position only (``[rows, 1, d_vocab]``: the rest are not unembedded)."""
        layers = self.twin.model.layers
        start = min((hooked_layer(name) for name, _ in hooks), default=len(layers))
        hidden = self.inputs[start].repeat_interleave(c, 0)
        rep = None
        if self.kv is not None:
            rep = copy.deepcopy(self.kv)
            rep.batch_repeat_interleave(c)
        ctx = self._context(hidden, rep)
        handles = []
        for name, fn in hooks:
            attn = layers[hooked_layer(name)].self_attn

            def pre(module, args, fn=fn, d_head=attn.head_dim):
                z = args[0].view(*args[0].shape[:-1], -1, d_head)
                out = fn(z.clone(), hook=None)
                return ((z if out is None else out).reshape(args[0].shape), *args[1:])
            handles.append(attn.o_proj.register_forward_pre_hook(pre))
        try:
            for i in range(start, len(layers)):
                hidden = layers[i](hidden, past_key_values=rep, use_cache=rep is not None, **ctx[i])
        finally:
            for handle in handles:
                handle.remove()
        return self.twin.lm_head(self.twin.model.norm(hidden[:, -1:] if last_only else hidden)).float()


def tail_route(model: LoadedModel, tail: Int[Tensor, "batch tail"], condition_hooks, kv) -> TailFromLayer | None:
    """A :class:`TailFromLayer` for ``condition_hooks`` when the twin's layer loop is checked for the model
    and every hook acts on a head's output; None otherwise (the caller runs the bridge)."""
    from arithlens.core import layout

    layers = [[hooked_layer(name) for name, _ in fwd] for fwd in condition_hooks]
    if not any(layers) or any(None in ls for ls in layers) or layout.architecture(model) not in LAYER_LOOP_CHECKED:
        return None
    return TailFromLayer(twin_of(model), tail, kv, upto=max(min(ls, default=model.n_layers) for ls in layers))

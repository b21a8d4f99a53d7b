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


def layer_context(twin: torch.nn.Module, hidden: Tensor) -> list[dict]:
    """Each decoder layer's keyword arguments over a whole sequence, as the HF model's forward builds
    them: positions, rotary embeddings, and the causal mask — sliding-window for a layer whose config
    says so (``layer_types``, or where there is none, Mistral's and Phi-3's ``sliding_window``)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = twin.config
    pos = torch.arange(hidden.shape[1], device=hidden.device)[None]
    types = getattr(config, "layer_types", None) or (
        ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * len(twin.model.layers))
    kw = dict(config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=None, position_ids=pos)
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


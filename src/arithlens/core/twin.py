"""A plain Hugging Face model that shares the loaded model's weight tensors: the fast path for passes
that need no hooks.

Ground floor, beside :mod:`arithlens.core.deltas`. The TransformerLens bridge runs eager attention with a
hook point at every site; a pass that hooks nothing (training in chapter 4, generating an answer with no
knockout) pays for that. The twin is the same HF class built from the same config, its parameters
*assigned* the bridge model's tensors — so a delta written into the model
(:func:`arithlens.core.deltas.applied`) is in the twin too — with PyTorch's fused attention (``sdpa``).

Written by hand: nothing in transformers builds a second model over existing tensors.
"""

from __future__ import annotations

import copy

import torch

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

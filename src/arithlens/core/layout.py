"""Block layouts: where a decoder block's norms sit, read once, so the fast END sweeps know what to recompute.

Science wing, under :mod:`arithlens.analyses.patching` and :mod:`arithlens.analyses.mlp` (paper § "Path patching",
§ "MLP tracing"). The fast sweeps replace one hooked forward pass per head by linear algebra on two
cached runs plus a re-run of the MLP stack at END. That is exact only if they redo every operation
between a head's ``hook_z`` and the logits, and those differ by family:

* **plain** (Llama, Qwen2, Qwen3, Mistral, Phi-3): resid_mid = resid_pre + attn(ln1(resid_pre));
  resid_post = resid_mid + mlp(ln2(resid_mid)); logits = W_U · ln_final(resid). What differs among
  them acts before ``hook_z`` or inside the MLP, which the fast paths read from the cache or re-run
  as the model's own module: Qwen2's q/k/v biases, Qwen3's RMS norms on each head's queries and keys,
  Mistral's sliding-window attention, Phi-3's fused ``qkv_proj`` (TransformerLens splits it into
  per-head ``hook_z`` and ``W_O`` like the others) and fused ``gate_up_proj``;
* **sandwich** (Gemma 2, Gemma 3): a norm also on the attention output and on the MLP output before
  each residual add (HF ``post_attention_layernorm``, ``post_feedforward_layernorm``), RMS norms that
  scale by (1 + w); Gemma 2 adds final-logit soft-capping logits = c · tanh(logits / c) (Gemma 3 has
  none unless its config sets one), Gemma 3 adds q/k norms and alternates sliding-window with global
  attention layers (both before ``hook_z``);
* **post-norm only** (OLMo 2): *no* norm before attention or before the MLP; the norms sit after
  attention (HF ``post_attention_layernorm`` — the same HF name as Llama's pre-MLP norm, placed
  elsewhere) and after the MLP.

A head's change to the residual therefore goes through the post-attention norm when there is one
(per position, so only the clean pre-norm attention output at END is needed), the MLP re-run uses the
pre- and post-MLP norms the block has, and the final scores apply the unembedding bias and
soft-capping when present. :class:`BlockLayout` names those pieces and :func:`describe` reads them for
a loaded model: the norm slots from the bridge's block (TransformerLens names them ``ln1``,
``ln1_post``, ``ln2``, ``ln2_post``), the (1 + w) convention from the bridge config, the cap from the
HF config and the bias from the unembedding module.

:func:`describe` answers only for architectures in :data:`CHECKED`, and only when what it reads
matches the layout the tests prove there (``tests/test_layout.py``: fast == reference for every head
on a tiny random-init model of each family). The submodule list cannot show everything: a Granite
block has Llama's two norms, but scales every residual update and the logits by constants the fast
paths do not know about; a multimodal Gemma 3 (``Gemma3ForConditionalGeneration``) is another
class. Any other model gets None, and the sweeps fall back — visibly — to one hooked pass per head.
To add a family: a row in :data:`CHECKED`, a tiny model in
:func:`arithlens.core.models.build_tiny_hf_model`, and its id in the tests' ``tiny_layout`` fixture.

A sliding window (Mistral, Gemma 3's local layers; Gemma 2 and Phi-3 configs have one too) needs no
field here: the fast paths never recompute attention, and where END is re-run on the prefix's KV
cache (``total`` patching, the counterfactual suffix of :func:`arithlens.analyses.end_cache.cache_end`)
that cache keeps every position (:func:`arithlens.core.hooks.prefix_kv`) and HF masks by position. The
tiny Mistral and Gemma 3 have a window shorter than the test prompts, so the tests cover it.

Written by hand: TransformerLens names the norm modules but keeps no description of where they act
that code can branch on, and no library does exact END-only patching; the norms, MLPs and
unembedding applied here are the model's own HF modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from arithlens.core.models import LoadedModel

#: Block norm slots, as TransformerLens's ``BlockBridge`` names its submodules.
NORM_SLOTS = ("ln1", "ln1_post", "ln2", "ln2_post")


@dataclass(frozen=True)
class BlockLayout:
    """Where a decoder block's norms act, and what stands between the final residual and the logits."""

    architecture: str  # the HF class it was read from, e.g. "Gemma2ForCausalLM"
    pre_attn_norm: bool  # ln1: on the residual, before attention (all but OLMo 2)
    post_attn_norm: bool  # ln1_post: on the attention output, before the residual add (Gemma 2 and 3, OLMo 2)
    pre_mlp_norm: bool  # ln2: on resid_mid, before the MLP (all but OLMo 2)
    post_mlp_norm: bool  # ln2_post: on the MLP output, before the residual add (Gemma 2 and 3, OLMo 2)
    norm_weight_offset: bool  # RMS norms scale by (1 + w) (Gemma), not w
    unembed_bias: bool  # the unembedding adds a bias
    final_softcap: float | None  # logits = c · tanh(logits / c) (Gemma 2's final_logit_softcapping)

    @property
    def norms(self) -> tuple[str, ...]:
        """The block's norm slots, in :data:`NORM_SLOTS` order."""
        flags = (self.pre_attn_norm, self.post_attn_norm, self.pre_mlp_norm, self.post_mlp_norm)
        return tuple(slot for slot, on in zip(NORM_SLOTS, flags) if on)

    @property
    def plain(self) -> bool:
        """Llama's layout: pre-norms only, weight w, no unembedding bias, no soft-capping."""
        return self.norms == ("ln1", "ln2") and not (self.norm_weight_offset or self.unembed_bias
                                                     or self.final_softcap)


#: Architectures whose layout the tests check fast == reference on: their block norm slots and
#: whether RMS norms scale by (1 + w). Llama, Qwen2, Qwen3, Mistral and Phi-3 share the plain layout
#: (what sets them apart acts before ``hook_z`` or inside the MLP; none has an o_proj bias); Gemma 2 and
#: Gemma 3 the sandwich.
CHECKED: dict[str, tuple[tuple[str, ...], bool]] = {
    "LlamaForCausalLM": (("ln1", "ln2"), False),
    "Qwen2ForCausalLM": (("ln1", "ln2"), False),
    "Qwen3ForCausalLM": (("ln1", "ln2"), False),
    "MistralForCausalLM": (("ln1", "ln2"), False),
    "Phi3ForCausalLM": (("ln1", "ln2"), False),
    "Gemma2ForCausalLM": (("ln1", "ln1_post", "ln2", "ln2_post"), True),
    "Gemma3ForCausalLM": (("ln1", "ln1_post", "ln2", "ln2_post"), True),
    "Olmo2ForCausalLM": (("ln1_post", "ln2_post"), False),
}


def architecture(model: LoadedModel) -> str:
    """The model's HF architecture name (``config.architectures[0]``, else its class name)."""
    archs = getattr(model.bridge.original_model.config, "architectures", None) or []
    return archs[0] if archs else type(model.bridge.original_model).__name__


def describe(model: LoadedModel) -> BlockLayout | None:
    """The model's block layout, or None when it cannot be described (not a :data:`CHECKED`
    architecture, or the bridge shows other norm slots than the checked ones)."""
    from transformer_lens.model_bridge.generalized_components import BlockBridge, RMSNormalizationBridge

    bridge = model.bridge
    arch = architecture(model)
    if arch not in CHECKED or not hasattr(bridge, "ln_final") or not hasattr(bridge, "unembed"):
        return None
    norms, offset = CHECKED[arch]
    for block in bridge.blocks:
        if type(block) is not BlockBridge:  # parallel or scaled-residual blocks
            return None
        present = tuple(slot for slot in NORM_SLOTS if slot in block._modules)
        if present != norms or not all(isinstance(getattr(block, s), RMSNormalizationBridge) for s in present):
            return None
    if not isinstance(bridge.ln_final, RMSNormalizationBridge):
        return None
    if bool(getattr(bridge.cfg, "rmsnorm_uses_offset", False)) != offset:
        return None
    cap = getattr(bridge.original_model.config, "final_logit_softcapping", None)
    return BlockLayout(
        architecture=arch, pre_attn_norm="ln1" in norms, post_attn_norm="ln1_post" in norms,
        pre_mlp_norm="ln2" in norms, post_mlp_norm="ln2_post" in norms, norm_weight_offset=offset,
        unembed_bias=nonzero_bias(bridge.unembed.original_component), final_softcap=float(cap) if cap else None)


def nonzero_bias(module: torch.nn.Module) -> bool:
    """Whether ``module`` adds a bias that is not all zeros (the bridge gives every ``lm_head`` a bias
    parameter, zeros where the model has none: only a nonzero one counts)."""
    bias = getattr(module, "bias", None)
    return bias is not None and bool(bias.detach().ne(0).any())


# --- the operations the fast paths redo, as the layout says -------------------------------------------

def _norm(model: LoadedModel, layer: int, slot: str):
    return getattr(model.bridge.blocks[layer], slot).original_component


def attn_update(model: LoadedModel, layout: BlockLayout, layer: int, attn_pre: Float[Tensor, "batch d_model"],
                delta: Float[Tensor, "batch *units d_model"]) -> Float[Tensor, "batch *units d_model"]:
    """The change of layer ``layer``'s update to the residual when its attention output (before any
    post-attention norm; ``attn_pre`` at END) changes by ``delta`` (e.g. one head's, per unit)."""
    if not layout.post_attn_norm:
        return delta
    norm = _norm(model, layer, "ln1_post")
    a = attn_pre.reshape(attn_pre.shape[0], *([1] * (delta.dim() - 2)), attn_pre.shape[-1])
    return norm(a + delta).float() - norm(a).float()


def mlp_update(model: LoadedModel, layout: BlockLayout, layer: int,
               resid_mid: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
    """What layer ``layer``'s MLP branch adds to the residual stream, given ``resid_mid`` (fp32 out).

    The MLP's input is cast to its weights' dtype (a no-op in fp32; a bf16 model's MLP refuses the
    fp32 input that its norm hands on)."""
    block = model.bridge.blocks[layer]
    x = block.ln2.original_component(resid_mid) if layout.pre_mlp_norm else resid_mid
    mlp = block.mlp.original_component
    out = mlp(x.to(next(mlp.parameters()).dtype))
    if layout.post_mlp_norm:
        out = block.ln2_post.original_component(out)
    return out.float()


def final_norm_weight(model: LoadedModel, layout: BlockLayout) -> Float[Tensor, "d_model"]:
    """The final RMS norm's effective weight (w, or 1 + w), fp32: normed = x / scale · weight."""
    w = model.bridge.ln_final.original_component.weight.float()
    return 1.0 + w if layout.norm_weight_offset else w


def unembed_bias(model: LoadedModel, layout: BlockLayout) -> Float[Tensor, "d_vocab"] | None:
    """The unembedding's bias (fp32), or None."""
    return model.bridge.unembed.original_component.bias.float() if layout.unembed_bias else None


def softcap(layout: BlockLayout, logits: Tensor) -> Tensor:
    """Final-logit soft-capping c · tanh(logits / c) when the layout has it; else ``logits`` as they are."""
    return _capped(logits, layout.final_softcap)


def _capped(logits: Tensor, cap: float | None) -> Tensor:
    return torch.tanh(logits / cap) * cap if cap else logits


def final_logits(model: LoadedModel, resid: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_vocab"]:
    """Logits from a residual through the model's own final norm and unembedding, soft-capped as the
    HF config says (any architecture; fp32)."""
    logits = model.bridge.unembed.original_component(model.bridge.ln_final.original_component(resid)).float()
    return _capped(logits, getattr(model.bridge.original_model.config, "final_logit_softcapping", None))

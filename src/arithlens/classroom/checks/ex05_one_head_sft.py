"""Checks for exercise 5 — train one head's W_Q/W_K/W_V/W_O slices and prove nothing else moved.

The paper's Precise SFT (§ "Precise SFT") at its smallest: one head, plain SGD. The reference is
written here, plainly (:func:`reference_masks`, :func:`reference_train`): it does not depend on the
library's fine-tuning module. Every check trains a fresh copy of a tiny random-init Llama (a seed
the notebook never uses, grouped-query attention like SmolLM2) on freshly generated prompts.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import torch

from arithlens.core import models
from arithlens.core.items import to_tokens
from arithlens.tasks import prompts
from arithlens.classroom.checks import max_diff

FUNCTIONS = ("head_masks", "train_head")
#: Out of the student's reach while the checks run (:mod:`arithlens.classroom.guard`): what the
#: exercise asks for, and what would do the work instead.
REFERENCES = ("arithlens.classroom.checks.ex05_one_head_sft.reference_masks",
              "arithlens.classroom.checks.ex05_one_head_sft.reference_train",
              "arithlens.analyses.sft.trainer.head_slices")
SEED, STEPS, LR = 21, 3, 0.5
TARGETS = ((1, 3), (0, 1))  # (layer, head): heads 1 and 3 sit in different key-value groups


def reference_masks(hf_model: torch.nn.Module, layer: int, head: int) -> dict[str, torch.Tensor]:
    """True on head ``head``'s rows of q_proj, its key-value group's rows of k_proj and v_proj, its
    columns of o_proj (HF Llama layout: ``q_proj.weight`` is [n_heads·d_head, d_model])."""
    cfg = hf_model.config
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = head // (cfg.num_attention_heads // cfg.num_key_value_heads)
    params = dict(hf_model.named_parameters())
    prefix = f"model.layers.{layer}.self_attn."
    masks = {}
    for proj, index in (("q_proj", head), ("k_proj", group), ("v_proj", group), ("o_proj", head)):
        mask = torch.zeros_like(params[prefix + proj + ".weight"], dtype=torch.bool)
        rows = slice(index * d_head, (index + 1) * d_head)
        if proj == "o_proj":
            mask[:, rows] = True
        else:
            mask[rows] = True
        masks[prefix + proj + ".weight"] = mask
    return masks


def reference_train(hf_model: torch.nn.Module, masks, tokens, answers, steps: int, lr: float) -> list[float]:
    """Plain SGD on the answer's cross-entropy at END; gradients outside ``masks`` zeroed."""
    params = dict(hf_model.named_parameters())
    losses = []
    for _ in range(steps):
        with torch.enable_grad():
            loss = torch.nn.functional.cross_entropy(hf_model(tokens).logits[:, -1], answers)
            grads = torch.autograd.grad(loss, [params[n] for n in masks])
        with torch.no_grad():
            for (name, mask), grad in zip(masks.items(), grads):
                params[name].sub_(lr * grad * mask)
        losses.append(float(loss.detach()))
    return losses


@lru_cache(maxsize=None)
def _data():
    tok = models.build_tiny_tokenizer()
    config = prompts.PromptConfig(operators=("+", "-"), templates=("eq_spaced",), n_per_cell=8, seed=41)
    items = prompts.make_prompts(tok, config).items
    base = models.build_tiny_hf_model(SEED, vocab_size=len(tok))
    tokens = to_tokens(items)
    answers = torch.tensor([it.answer_token for it in items])
    return base, tokens, answers


def _fresh():
    base, tokens, answers = _data()
    return copy.deepcopy(base), tokens.clone(), answers.clone()


def _masks_ok(masks, model: torch.nn.Module, layer: int, head: int) -> None:
    assert isinstance(masks, dict), f"head_masks should return a dict, got {type(masks).__name__}"
    want = reference_masks(model, layer, head)
    assert set(masks) == set(want), f"mask names {sorted(masks)}; expected {sorted(want)}"
    for name, mask in want.items():
        got = masks[name]
        assert isinstance(got, torch.Tensor) and got.shape == mask.shape, f"mask for {name} should be a tensor of shape {tuple(mask.shape)}"
        assert torch.equal(got.bool(), mask), (f"layer {layer} head {head}: wrong entries in the mask for {name.split('.')[-2]} "
                                               "(rows of its own head in q_proj, of its key-value group in k/v_proj, columns in o_proj)")


def _moved_only_inside(before, after: dict, masks) -> None:
    for name, old in before.items():
        new = after[name]
        if name in masks:
            assert torch.equal(new[~masks[name]], old[~masks[name]]), f"{name}: entries outside the head's slice moved"
            assert not torch.equal(new[masks[name]], old[masks[name]]), f"{name}: the head's slice did not move"
        else:
            assert torch.equal(new, old), f"{name} moved, but it should be frozen (bit-identical)"


def masks_match_reference(head_masks) -> str:
    """The masks select exactly one head's slices (its key-value group's for K and V)."""
    model, _, _ = _fresh()
    for layer, head in TARGETS:
        _masks_ok(head_masks(model, layer, head), model, layer, head)
    return f"right slices for heads {', '.join(f'{l}.{h}' for l, h in TARGETS)} (grouped-query attention)"


def only_the_slices_move(train_head) -> str:
    """After training with the reference masks, every other parameter is bit-identical and each slice moved."""
    model, tokens, answers = _fresh()
    masks = reference_masks(model, *TARGETS[0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_head(model, {k: v.clone() for k, v in masks.items()}, tokens, answers, STEPS, LR)
    _moved_only_inside(before, {n: p.detach() for n, p in model.named_parameters()}, masks)
    return f"{len(before)} parameter tensors checked: only the 4 slices of head {TARGETS[0][0]}.{TARGETS[0][1]} moved"


def sgd_matches_reference(train_head) -> str:
    """Losses and trained weights equal plain SGD's (no momentum, no weight decay) step for step."""
    model, tokens, answers = _fresh()
    ref_model = copy.deepcopy(model)
    masks = reference_masks(model, *TARGETS[0])
    losses = train_head(model, {k: v.clone() for k, v in masks.items()}, tokens, answers, STEPS, LR)
    want = reference_train(ref_model, masks, tokens, answers, STEPS, LR)
    assert isinstance(losses, (list, tuple)) and len(losses) == STEPS, f"train_head should return a list of {STEPS} losses"
    got = [float(x) for x in losses]
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4, (
        f"losses {[round(x, 4) for x in got]} differ from plain SGD's {[round(x, 4) for x in want]}")
    ref = dict(ref_model.named_parameters())
    worst = max(max_diff(p.detach(), ref[n].detach()) for n, p in model.named_parameters())
    assert worst <= 1e-5, f"trained weights off by up to {worst:.3g} from plain SGD (sign of the step? learning rate?)"
    return f"{STEPS} steps: losses {' → '.join(f'{x:.3f}' for x in got)} as the reference, weights within {worst:.1e}"


def one_head_end_to_end(head_masks, train_head) -> str:
    """Your masks with your training touch exactly the chosen head and reproduce the reference."""
    model, tokens, answers = _fresh()
    ref_model = copy.deepcopy(model)
    layer, head = TARGETS[1]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_head(model, head_masks(model, layer, head), tokens, answers, STEPS, LR)
    masks = reference_masks(ref_model, layer, head)
    _moved_only_inside(before, {n: p.detach() for n, p in model.named_parameters()}, masks)
    reference_train(ref_model, masks, tokens, answers, STEPS, LR)
    ref = dict(ref_model.named_parameters())
    worst = max(max_diff(p.detach(), ref[n].detach()) for n, p in model.named_parameters())
    assert worst <= 1e-5, f"head {layer}.{head}: trained weights off by up to {worst:.3g} from the reference"
    return f"head {layer}.{head} trained alone, weights within {worst:.1e} of the reference"


CHECKS = [masks_match_reference, only_the_slices_move, sgd_matches_reference, one_head_end_to_end]

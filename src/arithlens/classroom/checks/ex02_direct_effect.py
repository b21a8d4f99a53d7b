"""Checks for exercise 2 — one head's direct effect on the answer logit, from two cached runs.

The references are the library's: a hooked forward pass that patches the head's ``hook_z`` at END
(what the head really adds to ``hook_attn_out``), :func:`arithlens.analyses.patching.reference_effect` in
``direct`` mode (one hooked pass per head, everything else frozen), and the fast
:func:`arithlens.analyses.patching.sweep_many` over all heads. Inputs: a tiny random-init model with a seed
the notebook never uses, and prompts generated with a fresh seed.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from arithlens.analyses import end_cache, patching
from arithlens.core import hooks, models
from arithlens.core.items import to_tokens
from arithlens.tasks import prompts
from arithlens.classroom.checks import max_diff, tensor

FUNCTIONS = ("head_output_change", "direct_effect")
#: Out of the student's reach while the checks run (:mod:`arithlens.classroom.guard`): what the
#: exercise asks for, and what would do the work instead.
REFERENCES = ("arithlens.analyses.patching.reference_effect",
              "arithlens.analyses.patching.sweep_many",
              "arithlens.analyses.patching.sweep_heads",
              "arithlens.analyses.patching.sweep_direct",
              "arithlens.analyses.patching.patch_heads",
              "arithlens.core.hooks.head_deltas",
              "arithlens.classroom.checks.ex02_direct_effect._true_change")
SPEC = "tiny:3"
HEADS = (hooks.Head(0, 3), hooks.Head(1, 0), hooks.Head(1, 2))


@lru_cache(maxsize=None)
def _setup():
    """Model, prompts (one token length), the library's END cache and both full activation caches."""
    model = models.load_model(SPEC)
    config = prompts.PromptConfig(operators=("+", "*"), templates=("eq_compute",), n_per_cell=5, seed=11)
    items = list(prompts.make_prompts(model.tokenizer, config).items)
    end = end_cache.cache_end(model, items)
    with torch.no_grad():
        _, clean = model.bridge.run_with_cache(end.tokens)
        _, cf = model.bridge.run_with_cache(to_tokens(items, "counterfactual").to(model.device))
    return model, end, clean, cf


@torch.no_grad()
def _true_change(model: models.LoadedModel, end: end_cache.EndCache, head: hooks.Head) -> torch.Tensor:
    """What the head adds to the residual stream at END when its ``hook_z`` there is patched (hooked run)."""
    seen = {}

    def record(act, hook=None):
        seen["out"] = act[:, -1].clone()
        return act

    name = hooks.hook_attn_out(head.layer)
    model.bridge.run_with_hooks(end.tokens, fwd_hooks=[(name, record)])
    clean = seen["out"]
    patch = hooks.set_at_end(end.z_cf[:, head.layer, head.head], head.head)
    model.bridge.run_with_hooks(end.tokens, fwd_hooks=[(hooks.hook_z(head.layer), patch), (name, record)])
    return (seen["out"] - clean).float()


def head_output_change_matches_library(head_output_change) -> str:
    """The head's change to the residual stream at END equals the patched model's, for several heads."""
    model, end, clean, cf = _setup()
    worst = 0.0
    for head in HEADS:
        got = tensor(head_output_change(model, clean, cf, head.layer, head.head), (len(end.answers), model.cfg.d_model),
                     f"head_output_change(..., {head.layer}, {head.head})")
        want = _true_change(model, end, head).cpu()
        diff = max_diff(got, want)
        assert diff <= 1e-4 * (1 + float(want.abs().max())), (
            f"head {head}: off by up to {diff:.3g} from what patching the head's hook_z at END adds to hook_attn_out "
            "(check the head index, the END position and the sign: counterfactual − clean)")
        worst = max(worst, diff)
    return f"{len(HEADS)} heads × {len(end.answers)} fresh prompts, max |error| {worst:.1e}"


def direct_effect_matches_library(direct_effect) -> str:
    """Given the true change, the answer-logit change equals the library's hooked direct-effect run."""
    model, end, clean, cf = _setup()
    digits = hooks.digit_tokens(model.tokenizer)
    clean_logit = end.clean_logits.gather(1, end.answers[:, None])[:, 0]
    worst = 0.0
    for head in HEADS:
        change = _true_change(model, end, head)
        got = tensor(direct_effect(model, clean, change.clone(), end.answers.clone()), (len(end.answers),),
                     "direct_effect(...)")
        want = (patching.reference_effect(model, end, head, "direct", digits, with_prob=False).logit - clean_logit).cpu()
        diff = max_diff(got, want)
        assert diff <= 1e-4 * (1 + float(want.abs().max())), (
            f"head {head}: answer-logit change off by up to {diff:.3g} from patching.reference_effect (direct); "
            "is the final norm's scale frozen at its clean value, the norm weight applied, and the sign right?")
        worst = max(worst, diff)
    return f"{len(HEADS)} heads, max |error| {worst:.1e} against the hooked reference"


def clean_into_clean_is_zero(head_output_change, direct_effect) -> str:
    """Patching a head with its own clean value changes nothing."""
    model, end, clean, cf = _setup()
    head = HEADS[1]
    effect = tensor(direct_effect(model, clean, head_output_change(model, clean, clean, head.layer, head.head), end.answers.clone()),
                    (len(end.answers),), "direct_effect(head_output_change(clean, clean))")
    assert float(effect.abs().max()) < 1e-6, f"clean patched into clean moved the answer logit by {float(effect.abs().max()):.3g}"
    return "zero effect when the 'counterfactual' cache is the clean one"


def every_head_matches_library(head_output_change, direct_effect) -> str:
    """Composed, the two functions reproduce the library's direct-effect sweep for every head."""
    model, end, clean, cf = _setup()
    H = model.n_heads
    got = {(layer, head): tensor(direct_effect(model, clean, head_output_change(model, clean, cf, layer, head),
                                               end.answers.clone()), (len(end.answers),), "direct_effect(head_output_change(...))")
           for layer in range(model.n_layers) for head in range(H)}
    # the expected values are computed only after the student's code has run: nothing to read off this frame
    digits = hooks.digit_tokens(model.tokenizer)
    clean_logit = end.clean_logits.gather(1, end.answers[:, None])[:, 0]
    want = (patching.sweep_many(model, [end], "direct", digits, with_prob=False)[0].logit - clean_logit[:, None]).cpu()
    for layer in range(model.n_layers):
        for head in range(H):
            diff = max_diff(got[(layer, head)], want[:, layer * H + head])
            assert diff <= 1e-4 * (1 + float(want.abs().max())), f"head {layer}.{head}: off by {diff:.3g} from patching.sweep_many"
    return f"all {model.n_layers * H} heads match the library's sweep"


CHECKS = [head_output_change_matches_library, direct_effect_matches_library, clean_into_clean_is_zero,
          every_head_matches_library]

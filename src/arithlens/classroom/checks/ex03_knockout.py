"""Checks for exercise 3 — mean-ablate heads at END and read the logits (the knockout experiment).

References: :func:`arithlens.analyses.knockout.mean_z` for the means and the library's own ablation hooks
(the ones :class:`arithlens.analyses.knockout.KnockoutEvaluator` uses) for the ablated logits. These are
mechanics, so a tiny random-init model with an unseen seed is enough; the notebook's demo runs the
top-k vs random-k comparison on SmolLM2, where it means something.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from arithlens.analyses import knockout
from arithlens.core import models
from arithlens.core.hooks import Head
from arithlens.core.items import length_groups, to_tokens
from arithlens.tasks import prompts
from arithlens.classroom.checks import max_diff, tensor

FUNCTIONS = ("mean_head_outputs", "knockout_logits")
#: Out of the student's reach while the checks run (:mod:`arithlens.classroom.guard`): what the
#: exercise asks for, and what would do the work instead.
REFERENCES = ("arithlens.analyses.knockout.mean_z",
              "arithlens.analyses.knockout.ablation_hooks",
              "arithlens.classroom.checks.ex03_knockout._library_logits")
SPEC = "tiny:5"
H = Head
HEAD_SETS = ((H(1, 2),), (H(0, 1), H(0, 3)), (H(0, 0), H(1, 1), H(1, 3)))


@lru_cache(maxsize=None)
def _setup():
    model = models.load_model(SPEC)
    config = prompts.PromptConfig(operators=("+", "-"), templates=("eq_calculate",), n_per_cell=6, seed=23)
    prompt_set = prompts.make_prompts(model.tokenizer, config)
    groups = length_groups(prompt_set.items)
    keep = max(groups.values(), key=len)
    prompt_set = prompt_set.subset([i in keep for i in range(len(prompt_set))])
    return model, prompt_set, to_tokens(prompt_set.items).to(model.device)


def mean_matches_library(mean_head_outputs) -> str:
    """Every head's mean hook_z at END over the counterfactual prompts equals knockout.mean_z."""
    model, prompt_set, _ = _setup()
    cf = to_tokens(prompt_set.items, "counterfactual").to(model.device)
    shape = (model.n_layers, model.n_heads, model.cfg.d_head)
    got = tensor(mean_head_outputs(model, cf.clone()), shape, "mean_head_outputs(...)")
    want = knockout.mean_z(model, prompt_set, "end").cpu()
    diff = max_diff(got, want)
    assert diff <= 1e-5 * (1 + float(want.abs().max())), (
        f"off by up to {diff:.3g} from knockout.mean_z (mean over the counterfactual prompts, at END only)")
    return f"{len(prompt_set)} fresh counterfactual prompts, max |error| {diff:.1e}"


@torch.no_grad()
def _library_logits(model: models.LoadedModel, tokens, heads, means) -> torch.Tensor:
    hooks = knockout.ablation_hooks(list(heads), means, "end")
    return model.bridge.run_with_hooks(tokens, fwd_hooks=hooks)[:, -1].float().cpu()


def no_heads_changes_nothing(knockout_logits) -> str:
    """Knocking out no head gives the model's own logits at END."""
    model, prompt_set, tokens = _setup()
    means = knockout.mean_z(model, prompt_set, "end")
    got = tensor(knockout_logits(model, tokens.clone(), [], means.clone()), (len(tokens), model.cfg.d_vocab), "knockout_logits(..., [])")
    want = _library_logits(model, tokens, [], means)
    diff = max_diff(got, want)
    assert diff <= 1e-4, f"with no heads knocked out the logits moved by up to {diff:.3g}"
    return "an empty knockout is the clean run"


def ablation_matches_library(knockout_logits) -> str:
    """With heads mean-ablated at END (one, two in a layer, across layers) the logits equal the library's."""
    model, prompt_set, tokens = _setup()
    means = knockout.mean_z(model, prompt_set, "end")
    worst = 0.0
    for heads in HEAD_SETS:
        got = tensor(knockout_logits(model, tokens.clone(), list(heads), means.clone()), (len(tokens), model.cfg.d_vocab),
                     "knockout_logits(...)")
        want = _library_logits(model, tokens, heads, means)
        diff = max_diff(got, want)
        shown = ", ".join(str(h) for h in heads)
        assert diff <= 1e-4 * (1 + float(want.abs().max())), (
            f"heads [{shown}]: logits off by up to {diff:.3g} from the library's ablation "
            "(each knocked-out head's hook_z at END set to its own mean, every other head untouched)")
        worst = max(worst, diff)
    return f"{len(HEAD_SETS)} head sets × {len(tokens)} prompts, max |error| {worst:.1e}"


CHECKS = [mean_matches_library, no_heads_changes_nothing, ablation_matches_library]

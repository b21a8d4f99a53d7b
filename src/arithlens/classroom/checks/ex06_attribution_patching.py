"""Checks for exercise 6 — attribution patching of one head at END, against the library's.

The quantity: est = ∂(answer logit at END)/∂z · (z_cf − z_clean), where z is the head's ``hook_z``
at END in the clean run and nothing else is frozen — :mod:`arithlens.analyses.attribution`'s ``ATTRIBUTION``
in ``total`` mode, column ``d_logit``. References, all the library's:

* the gradient itself, read off :func:`arithlens.analyses.attribution.attribution_scores` (``total``,
  ``ATTRIBUTION``): with each prompt repeated ``d_head`` times and copy k given the counterfactual
  z_clean + e_k, the estimate of copy k *is* the gradient's k-th component, for every head at once;
* the exact effect, :func:`arithlens.analyses.patching.reference_effect` (``total``, one hooked pass): the
  gradient · Δz must be the slope of exact patching at the clean run (central difference, ε = 0.1);
* the estimate for every head, :func:`arithlens.analyses.attribution.attribute_heads` (its ``rel_logit`` ×
  the clean answer logit).

Tolerances. The student's functions run the whole prompt with gradients; the library reruns END
only on the clean prefix's KV cache. Both are the same number up to float32 rounding (measured on
1 and 2 threads: 2e-7 of the largest reference value), so "same quantity" checks allow 1e-4 of the
largest reference value (``SAME``): ~500× the rounding, whatever a thread count's summation order,
and far below what a wrong head, a flipped sign, a mean over prompts or a log-probability costs
(measured: 8 % to over 200 % of it). The slope check compares with a central difference of exact patching,
whose O(ε²) truncation and rounding measured 2.3e-4 of the largest effect; it allows 1e-2 (``SLOPE``).
Inputs: a tiny random-init model with a seed no notebook uses and prompts drawn with a fresh seed.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import torch

from arithlens.analyses import attribution, end_cache, patching
from arithlens.core import hooks, models
from arithlens.core.items import length_groups, to_tokens
from arithlens.tasks import prompts
from arithlens.classroom.checks import max_diff, tensor

FUNCTIONS = ("z_and_grad", "attribution_patch")
#: Out of the student's reach while the checks run (:mod:`arithlens.classroom.guard`): what the
#: exercise asks for, and what would do the work instead.
REFERENCES = ("arithlens.analyses.attribution.attribute_heads",
              "arithlens.analyses.attribution.attribution_scores",
              "arithlens.analyses.attribution.compare_with_exact",
              "arithlens.analyses.attribution._gradients",
              "arithlens.analyses.patching.reference_effect",
              "arithlens.classroom.checks.ex06_attribution_patching._library_gradient",
              "arithlens.classroom.checks.ex06_attribution_patching._library_estimates")
SPEC = "tiny:6"
HEADS = (hooks.Head(0, 1), hooks.Head(1, 0), hooks.Head(1, 3))
SAME = 1e-4  # two code paths, one quantity: relative to the largest reference value
EPS = 0.1  # central difference step, as a fraction of the real Δz
SLOPE = 1e-2  # central difference vs gradient · Δz: O(ε²) truncation plus rounding, relative


@lru_cache(maxsize=None)
def _setup():
    """Model, prompts of one token length (an ItemSet), the library's END cache and its gradients."""
    model = models.load_model(SPEC)
    config = prompts.PromptConfig(operators=("+", "-"), templates=("eq_spaced",), n_per_cell=6, seed=53)
    generated = prompts.make_prompts(model.tokenizer, config)
    keep = max(length_groups(generated.items).values(), key=len)
    prompt_set = generated.subset([i in keep for i in range(len(generated))])
    cache = end_cache.cache_end(model, list(prompt_set.items))
    return model, prompt_set, cache, _library_gradient(model, cache)


def _library_gradient(model: models.LoadedModel, cache: end_cache.EndCache) -> torch.Tensor:
    """∂(answer logit at END)/∂z[END] for every prompt and head, [batch, layer, head, d_head], from the
    library's attribution: prompt b's copy k gets the counterfactual z_clean + e_k at every head."""
    d = cache.z_clean.shape[-1]
    rep = {f.name: getattr(cache, f.name).repeat_interleave(d, 0) for f in dataclasses.fields(cache)
           if isinstance(getattr(cache, f.name), torch.Tensor)}
    unit = torch.eye(d, device=cache.z_clean.device).repeat(len(cache.answers), 1)[:, None, None]  # [b·d, 1, 1, d]
    probe = dataclasses.replace(cache, **{**rep, "z_cf": rep["z_clean"] + unit})
    digits = hooks.digit_tokens(model.tokenizer)
    est = attribution.attribution_scores(model, probe, digits, "total", attribution.ATTRIBUTION).d_logit  # [b·d, L, H]
    B, L, H = cache.z_clean.shape[:3]
    return est.view(B, d, L, H).permute(0, 2, 3, 1).float().cpu()


def _call(z_and_grad, model, cache, head) -> tuple[torch.Tensor, torch.Tensor]:
    out = z_and_grad(model, cache.tokens.clone(), cache.answers.clone(), head.layer, head.head)
    assert isinstance(out, tuple) and len(out) == 2, (
        f"z_and_grad should return a tuple (z, grad), got {type(out).__name__}")
    shape = (len(cache.answers), cache.z_clean.shape[-1])
    return (tensor(out[0], shape, f"z from z_and_grad(..., {head.layer}, {head.head})"),
            tensor(out[1], shape, f"grad from z_and_grad(..., {head.layer}, {head.head})"))


def _gradient_mistake(got: torch.Tensor, head: hooks.Head, grads: torch.Tensor, tol: float) -> str:
    """What a wrong gradient is instead, when it is something recognizable (reported first: messages are cut at 160 characters)."""
    want = grads[:, head.layer, head.head]
    if max_diff(got, -want) <= tol:
        return "the gradient's sign is flipped"
    if max_diff(got * len(want), want) <= tol:
        return "the gradient is averaged over prompts: differentiate the sum of the answer logits"
    for layer in range(grads.shape[1]):
        for other in range(grads.shape[2]):
            if max_diff(got, grads[:, layer, other]) <= tol:
                return f"this is the gradient for head {layer}.{other}"
    return "not the gradient of the answer logit (summed over prompts) w.r.t. this head's hook_z at END"


def z_and_grad_match_library(z_and_grad) -> str:
    """z at END and the answer logit's gradient with respect to it equal the library's, for several heads."""
    model, _, cache, grads = _setup()
    worst = 0.0
    for head in HEADS:
        z, grad = _call(z_and_grad, model, cache, head)
        want_z = cache.z_clean[:, head.layer, head.head].float().cpu()
        diff = max_diff(z, want_z)
        assert diff <= SAME * (1 + float(want_z.abs().max())), (
            f"head {head}: z off by up to {diff:.3g} from the clean run's blocks.{head.layer}.attn.hook_z "
            f"at END (position -1), head {head.head}")
        want = grads[:, head.layer, head.head]
        tol = SAME * float(want.abs().max())
        diff = max_diff(grad, want)
        assert diff <= tol, f"head {head}: {_gradient_mistake(grad, head, grads, tol)} (off by up to {diff:.3g} from the library's)"
        worst = max(worst, diff / float(want.abs().max()))
    return f"{len(HEADS)} heads × {len(cache.answers)} fresh prompts, max error {worst:.1e} of the largest gradient entry"


def slope_of_exact_patching(z_and_grad) -> str:
    """grad · Δz is the slope of the library's exact patching at the clean run (central difference)."""
    model, _, cache, _ = _setup()
    digits = hooks.digit_tokens(model.tokenizer)
    worst = 0.0
    for head in HEADS:
        _, grad = _call(z_and_grad, model, cache, head)
        dz = (cache.z_cf - cache.z_clean)[:, head.layer, head.head].float().cpu()
        logits = []
        for sign in (1, -1):
            z_cf = cache.z_clean.clone()
            z_cf[:, head.layer, head.head] += sign * EPS * (cache.z_cf - cache.z_clean)[:, head.layer, head.head]
            patched = patching.reference_effect(model, dataclasses.replace(cache, z_cf=z_cf), head, "total", digits, with_prob=False)
            logits.append(patched.logit.float().cpu())
        slope = (logits[0] - logits[1]) / (2 * EPS)
        mine = (grad * dz).sum(-1)
        scale = float(slope.abs().max())
        diff = max_diff(mine, slope)
        assert diff <= SLOPE * scale, (
            f"head {head}: grad · Δz is not the slope of exact patching at the clean run: off by up to {diff:.3g} "
            f"(effects up to {scale:.3g}); is it the gradient of the answer logit?")
        worst = max(worst, diff / scale)
    return f"{len(HEADS)} heads: grad · Δz = the central difference of exact patching within {worst:.1e} of the largest effect"


def _library_estimates(model, prompt_set, cache) -> torch.Tensor:
    """attribute_heads' estimated Δ answer logit (rel_logit × clean logit), [batch, layer, head]."""
    table = attribution.attribute_heads(model, prompt_set, [cache], modes=("total",), methods=(attribution.ATTRIBUTION,))
    rel = torch.tensor(table.sort_values(["prompt", "layer", "head"])["rel_logit"].to_numpy()).view(*cache.z_clean.shape[:3])
    clean = cache.clean_logits.gather(1, cache.answers[:, None]).float().cpu()
    return rel.float() * clean[:, :, None]


def estimate_matches_library(attribution_patch) -> str:
    """The estimate for every head equals attribution.attribute_heads (ATTRIBUTION, total mode)."""
    model, prompt_set, cache, _ = _setup()
    want = _library_estimates(model, prompt_set, cache)
    cf = to_tokens(prompt_set.items, "counterfactual").to(model.device)
    tol = SAME * float(want.abs().max())
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            got = tensor(attribution_patch(model, cache.tokens.clone(), cf.clone(), cache.answers.clone(), layer, head),
                         (len(cache.answers),), f"attribution_patch(..., {layer}, {head})")
            w = want[:, layer, head]
            diff = max_diff(got, w)
            if diff > tol and max_diff(got, -w) <= tol:
                raise AssertionError(f"head {layer}.{head}: the sign is flipped; Δz = z_cf − z_clean, counterfactual "
                                     f"minus clean (off by up to {diff:.3g} from attribution.attribute_heads)")
            assert diff <= tol, (f"head {layer}.{head}: off by up to {diff:.3g} from attribution.attribute_heads (estimates "
                                 f"up to {float(w.abs().max()):.3g}); want Σ_d_head grad · (z_cf − z_clean) per prompt")
    return f"all {model.n_layers * model.n_heads} heads × {len(cache.answers)} fresh prompts match attribution.attribute_heads"


def clean_into_clean_is_zero(attribution_patch) -> str:
    """With the clean prompt as its own counterfactual the estimate is zero."""
    model, prompt_set, cache, _ = _setup()
    head = HEADS[1]
    got = tensor(attribution_patch(model, cache.tokens.clone(), cache.tokens.clone(), cache.answers.clone(), head.layer, head.head),
                 (len(cache.answers),), "attribution_patch(model, tokens, tokens, ...)")
    scale = float(_library_estimates(model, prompt_set, cache).abs().max())
    assert float(got.abs().max()) <= SAME * scale, (
        f"clean patched into clean gave estimates up to {float(got.abs().max()):.3g}; Δz = z_cf − z_clean should vanish")
    return "zero estimate when the counterfactual is the clean prompt"


CHECKS = [z_and_grad_match_library, slope_of_exact_patching, estimate_matches_library, clean_into_clean_is_zero]

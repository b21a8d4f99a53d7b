"""Attribution patching and EAP-IG against exact END patching on the tiny models.

What each test shows:

* ``test_gradient_matches_central_differences`` — the gradient the hooks deliver is the model's: for
  a small Δz (ε = 0.05 times the real one, both signs) the attribution estimate equals the
  central difference of exact patching (error O(ε³)), per prompt and head, in every mode.
* ``test_direct_mode_is_linear_so_attribution_is_exact`` — with other heads, MLPs and the final
  norm's scale frozen at END (``direct``), the answer logit is linear in a head's ``hook_z``, so
  attribution, EAP-IG and IG per head all equal exact patching for every head and prompt.
* ``test_one_step_is_plain_attribution`` — α = 0 is the clean run, so ``steps=1`` of either
  interpolation is plain attribution (this also checks the per-head batching and masks).
* ``test_ig_per_head_converges_to_exact`` — each head on its own line: the left Riemann sum
  converges to exact patching at rate 1/steps on the full nonlinear model (``total`` and ``path``).
* ``test_eap_ig_is_complete_on_the_joint_path`` — in ``path`` mode the joint line is a path of one
  function of all heads' END values, so EAP-IG's estimates summed over heads converge to patching
  all heads at once.
* ``test_eap_ig_beats_attribution_on_the_nonlinear_model`` — on the full model (``total``) EAP-IG's
  mean absolute error against exact patching is below plain attribution's, for the real Δz and a
  4× stretched one. This is a measured property of these models, not a theorem: the joint path
  does not converge to per-head patching (measured errors are in the test).
"""

import dataclasses

import numpy as np
import pytest
import torch

from arithlens.analyses import attribution as A
from arithlens.analyses import end_cache as EC
from arithlens.analyses import patching as P
from arithlens.core import hooks
from arithlens.core.metrics import summarize_effects
from arithlens.tasks.prompts import PromptConfig, make_prompts


@pytest.fixture(scope="module")
def setup(tiny_arch):
    model = tiny_arch
    ps = make_prompts(model.tokenizer, PromptConfig(operators=("+", "*"), templates=("eq_spaced",), n_per_cell=3, shots=1))
    return model, ps, EC.cache_end(model, list(ps.items)), hooks.digit_tokens(model.tokenizer)


def _exact(model, cache, mode, digits):
    """Exact changes of logit, logit difference and p(answer), [batch, layer, head]."""
    out, clean = P.sweep_heads(model, cache, mode, digits), EC.clean_scores(model, cache, digits)
    shape = cache.z_clean.shape[:3]
    return {"logit": (out.logit - clean.logit[:, None]).view(shape),
            "logit_diff": (out.logit_diff - clean.logit_diff[:, None]).view(shape),
            "prob": (out.logprob.exp() - clean.logprob.exp()[:, None]).view(shape)}


def _est(scores):
    return {"logit": scores.d_logit, "logit_diff": scores.d_logit_diff, "prob": scores.d_prob}


def _rel_err(est, exact):
    return float((est - exact).abs().mean() / exact.abs().mean())


@pytest.mark.parametrize("mode", P.MODES)
def test_gradient_matches_central_differences(setup, mode):
    model, _, cache, digits = setup
    eps = 0.05
    dz = cache.z_cf - cache.z_clean
    plus = _exact(model, dataclasses.replace(cache, z_cf=cache.z_clean + eps * dz), mode, digits)
    minus = _exact(model, dataclasses.replace(cache, z_cf=cache.z_clean - eps * dz), mode, digits)
    est = _est(A.attribution_scores(model, dataclasses.replace(cache, z_cf=cache.z_clean + eps * dz), digits, mode))
    # float32 rounding of the exact changes themselves: a logit to eps·|logit|; p = exp(log p) to
    # eps·|log p|·p — at a change of a few 1e-6 in p (the direct mode's) that alone is a few 1e-9
    clean = EC.clean_scores(model, cache, digits)
    rounding = {"logit": float(clean.logit.abs().max()),
                "prob": float((clean.logprob.exp() * clean.logprob.abs()).max())}
    for name in ("logit", "prob"):
        central = (plus[name] - minus[name]) / 2
        scale = float(central.abs().max())
        assert scale > 0
        floor = 4 * torch.finfo(torch.float32).eps * rounding[name]
        assert floor < 0.05 * scale  # the rounding allowance leaves the comparison its teeth
        torch.testing.assert_close(est[name], central, rtol=0, atol=2e-3 * scale + floor)


def test_direct_mode_is_linear_so_attribution_is_exact(setup):
    model, _, cache, digits = setup
    exact = _exact(model, cache, "direct", digits)["logit"]
    scale = float(exact.abs().max())
    for method in (A.ATTRIBUTION, A.eap_ig(3), A.ig_per_head(2)):
        est = A.attribution_scores(model, cache, digits, "direct", method).d_logit
        torch.testing.assert_close(est, exact, rtol=0, atol=1e-4 * scale)
    # the same holds in the tables: rel_logit estimates equal patch_heads' exact rel_logit
    clean = EC.clean_scores(model, cache, digits)
    table = A.estimates_table(cache, A.attribution_scores(model, cache, digits, "direct"), clean.logit)
    exact_table = EC.effects_table(cache, P.sweep_heads(model, cache, "direct", digits), clean,
                                  {"layer": np.repeat(np.arange(model.n_layers), model.n_heads),
                                   "head": np.tile(np.arange(model.n_heads), model.n_layers)})
    assert (table[["prompt", "layer", "head"]].to_numpy() == exact_table[["prompt", "layer", "head"]].to_numpy()).all()
    scale = float(exact_table["rel_logit"].abs().max())
    np.testing.assert_allclose(table["rel_logit"], exact_table["rel_logit"], atol=1e-4 * scale)


@pytest.mark.parametrize("mode", ["total", "path"])
def test_one_step_is_plain_attribution(setup, mode):
    model, _, cache, digits = setup
    plain = _est(A.attribution_scores(model, cache, digits, mode))
    for method in (A.eap_ig(1), A.ig_per_head(1)):
        other = _est(A.attribution_scores(model, cache, digits, mode, method))
        for name in plain:
            torch.testing.assert_close(other[name], plain[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["total", "path"])
def test_ig_per_head_converges_to_exact(setup, mode):
    model, _, cache, digits = setup
    exact = _exact(model, cache, mode, digits)
    errs = {steps: _rel_err(A.attribution_scores(model, cache, digits, mode, A.ig_per_head(steps)).d_logit, exact["logit"])
            for steps in (1, 4, 16)}
    # first-order convergence: a quarter of the error for four times the steps (measured, both modes:
    # llama 1.7e-2, 4.3e-3, 1.1e-3; qwen2 5.5e-3, 1.4e-3, 3.7e-4)
    assert errs[4] < 0.4 * errs[1] and errs[16] < 0.4 * errs[4], errs
    assert errs[16] < 5e-3, errs


def test_eap_ig_is_complete_on_the_joint_path(setup):
    model, _, cache, digits = setup
    fwd = [(hooks.hook_z(l), hooks.set_at_end(cache.z_cf[:, l])) for l in range(model.n_layers)]
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(cache.tokens, fwd_hooks=fwd)[:, -1].float()
    patched = hooks.scores_from_logits(logits, cache.answers, digits, False).logit
    target = patched - cache.clean_logits.gather(1, cache.answers[:, None])[:, 0]  # all heads patched at once
    errs = {}
    for steps in (2, 32):
        total = A.attribution_scores(model, cache, digits, "path", A.eap_ig(steps)).d_logit.sum((1, 2))
        errs[steps] = float((total - target).abs().mean() / target.abs().mean())
    # measured: llama 2.1e-2 → 1.3e-3, qwen2 5.1e-3 → 3.2e-4 (rate 1/steps)
    assert errs[32] < 0.15 * errs[2] and errs[32] < 5e-3, errs


def test_eap_ig_beats_attribution_on_the_nonlinear_model(setup):
    model, _, cache, digits = setup
    # measured mean |error| / mean |exact|, attribution → EAP-IG(8), answer logit: llama 0.017 → 0.009
    # (4×: 0.070 → 0.031), qwen2 0.0055 → 0.0026 (4×: 0.022 → 0.011); p(answer) alike
    for stretch in (1.0, 4.0):
        stretched = dataclasses.replace(cache, z_cf=cache.z_clean + stretch * (cache.z_cf - cache.z_clean))
        exact = _exact(model, stretched, "total", digits)
        plain = _est(A.attribution_scores(model, stretched, digits, "total"))
        ig = _est(A.attribution_scores(model, stretched, digits, "total", A.eap_ig(8)))
        for name in ("logit", "prob"):
            e_plain, e_ig = _rel_err(plain[name], exact[name]), _rel_err(ig[name], exact[name])
            assert e_ig < 0.8 * e_plain, (stretch, name, e_plain, e_ig)


def test_clean_into_clean_is_zero_and_tables_are_tidy(setup):
    model, ps, cache, digits = setup
    same = dataclasses.replace(cache, z_cf=cache.z_clean.clone())
    for method in (A.ATTRIBUTION, A.eap_ig(2)):
        s = A.attribution_scores(model, same, digits, "total", method)
        assert float(s.d_logit.abs().max()) == 0.0 and float(s.d_prob.abs().max()) == 0.0
    table = A.compare_with_exact(model, ps, [cache], modes=("total", "direct"), methods=(A.ATTRIBUTION, A.eap_ig(2)))
    n_units = model.n_layers * model.n_heads
    assert len(table) == 3 * 2 * len(ps) * n_units
    assert set(table["method"]) == {"exact", "attribution", "eap_ig"}
    assert not table.duplicated(["method", "mode", "prompt", "layer", "head"]).any()
    assert set(table.columns) >= {"operator", "rel_logit", "d_logit_diff", "d_prob"}
    # the per-head summary with bootstrap CIs is metrics.summarize_effects with the method as a group
    summary = summarize_effects(table, by=("method", "mode", "layer", "head"), n_boot=200)
    assert len(summary) == 3 * 2 * n_units * 3 and (summary["ci_low"] <= summary["mean"]).all()
    with pytest.raises(ValueError, match="unknown patching mode"):
        A.attribution_scores(model, cache, digits, "sideways")
    with pytest.raises(ValueError, match="steps"):
        A.attribution_scores(model, cache, digits, "total", A.Method("x", 0))

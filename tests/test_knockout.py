import numpy as np
import pytest
import torch

from arithlens import knockout as K
from arithlens.patching import Head
from arithlens.prompts import PromptConfig, make_prompts


@pytest.fixture(scope="module")
def prompt_set(tiny):
    return make_prompts(tiny.tokenizer, PromptConfig(operators=("+", "*"), templates=("eq_spaced", "st_is"), n_per_cell=4))


def test_end_only_knockout_equals_full_forward(tiny, prompt_set):
    means = K.mean_z(tiny, prompt_set, "end")
    heads = [Head(0, 1), Head(1, 3)]
    end = K.KnockoutEvaluator(tiny, prompt_set, means, "end")
    hooks = K.ablation_hooks(heads, means, "end")
    for b, tokens, answers, kv in end.batches:
        fast = K.end_only_logits(tiny, tokens, hooks, kv)
        full = tiny.bridge.run_with_hooks(tokens, fwd_hooks=hooks)[:, -1].float()
        torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    # ablating nothing reproduces the model's own predictions
    assert end.correct([]).dtype == bool


def test_mean_z_is_the_counterfactual_mean(tiny, prompt_set):
    means = K.mean_z(tiny, prompt_set, "end")
    assert means.shape == (tiny.n_layers, tiny.n_heads, tiny.cfg.d_head)
    item = prompt_set.items[0]
    _, cache = tiny.bridge.run_with_cache(torch.tensor([item.cf_tokens]))
    assert not torch.allclose(means[0], cache["blocks.0.attn.hook_z"][0, -1])  # a mean, not one prompt


def test_knockout_curve_shape_and_errors(tiny, prompt_set):
    ev = K.KnockoutEvaluator(tiny, prompt_set, K.mean_z(tiny, prompt_set, "all"), "all")
    ranking = [Head(l, h) for l in range(2) for h in range(4)]
    curve = K.knockout_curve(ev, ranking, [1, 2], n_seeds=3)
    assert len(curve) == 1 + 2 + 2 * 3 and set(curve["condition"]) == {"none", "top", "random"}
    with pytest.raises(ValueError, match="exceeds"):
        K.knockout_curve(ev, ranking, [9])
    with pytest.raises(ValueError, match="larger than the number of heads"):
        K.random_heads(2, 4, 9, 0)
    assert K.random_heads(2, 4, 3, 5) == K.random_heads(2, 4, 3, 5)


def test_attention_labels(tiny, prompt_set):
    att = K.end_attention(tiny, prompt_set, [Head(0, 0), Head(1, 2)])
    assert np.allclose(att[["A", "B", "operator_token", "other"]].sum(axis=1), 1.0)
    roles = K.label_heads(att, min_share=0.0)
    assert set(roles["role"]) <= {"operand", "operator", "other"}
    fake = att.assign(A=0.5, B=0.3, operator_token=0.1, other=0.1)
    assert set(K.label_heads(fake)["role"]) == {"operand"}
    fake = att.assign(A=0.05, B=0.05, operator_token=0.6, other=0.3)
    assert set(K.label_heads(fake)["role"]) == {"operator"}

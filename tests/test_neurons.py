"""Neurons: on the tiny model the neuron hook is the down projection's input, attributions are exact
direct effects, and keep-top-k runs from the clean model (100 % kept) to the all-ablated one (0 % kept)."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from arithlens.core import hooks
from arithlens.analyses import neurons as Nn
from arithlens.tasks.prompts import PromptConfig, make_prompts


def test_overlap():
    N = Nn.Neuron
    table = Nn.neuron_overlap({"+": [N(0, 1), N(0, 2)], "-": [N(0, 2), N(1, 3)], "*": []}).set_index(["first", "second"])
    assert table.loc[("+", "-"), "iou"] == pytest.approx(1 / 3) and table.loc[("+", "*"), "iou"] == 0.0
    assert len(table) == 3


@pytest.fixture(scope="module")
def items(tiny):
    return list(make_prompts(tiny.tokenizer, PromptConfig(operators=("+", "*"), templates=("eq_spaced",), n_per_cell=12)).items)


def test_hook_post_is_down_projection_input(tiny_arch, items):
    tiny = tiny_arch
    acts = Nn.end_activations(tiny, items, [0, 1])
    tokens = torch.tensor([it.clean_tokens for it in items[:4]])
    _, cache = tiny.bridge.run_with_cache(tokens)
    for l in (0, 1):
        W_out = tiny.bridge.blocks[l].mlp.out.original_component.weight
        torch.testing.assert_close(acts[:4, l] @ W_out.T, cache[hooks.mlp_out(l)][:, -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["answer", "answer_vs_digits"])
def test_attribution_is_the_direct_effect(tiny_arch, items, target):
    """Zeroing one last-layer neuron at END, final-norm scale frozen, moves the target by −attribution."""
    tiny = tiny_arch
    some = items[:6]
    attr = Nn.direct_attributions(tiny, some, [1], target)
    tokens = torch.tensor([it.clean_tokens for it in some])
    answers = torch.tensor([it.answer_token for it in some])
    digits = hooks.digit_tokens(tiny.tokenizer)
    _, cache = tiny.bridge.run_with_cache(tokens)
    scale = cache[hooks.FINAL_SCALE][:, -1]

    def measure(logits):
        ans = logits.gather(1, answers[:, None])[:, 0]
        if target == "answer":
            return ans
        other = (digits[None] != answers[:, None]).float()
        return ans - (logits[:, digits] * other).sum(1) / other.sum(1)

    base = measure(tiny.bridge(tokens)[:, -1])
    for neuron in (3, 50, 127):
        def zero(act, hook=None):
            act = act.clone()
            act[:, -1, neuron] = 0
            return act
        fwd = [(Nn.mlp_post(1), zero), (hooks.FINAL_SCALE, hooks.set_at_end(scale))]
        changed = measure(tiny.bridge.run_with_hooks(tokens, fwd_hooks=fwd)[:, -1])
        torch.testing.assert_close(base - changed, attr[:, 0, neuron], rtol=1e-4, atol=1e-5)
    table = Nn.neuron_attribution(tiny, some, [0, 1], target)
    assert len(table) == len({it.operator for it in some}) * 2 * tiny.cfg.d_mlp


def test_top_neurons_order():
    table = pd.DataFrame({"operator": "+", "layer": [0, 0, 1, 1], "neuron": [0, 1, 0, 1],
                          "attribution": [0.1, 0.5, 0.5, -1.0], "abs_attribution": [0.1, 0.5, 0.5, 1.0]})
    assert Nn.top_neurons(table, 50) == [Nn.Neuron(0, 1), Nn.Neuron(1, 0)]  # tie at 0.5: layer order
    assert Nn.top_neurons(table, 25, by="abs_attribution") == [Nn.Neuron(1, 1)]


def test_keep_top_k_spans_clean_to_all_ablated(tiny, items):
    # relabel every item with the clean model's own prediction: clean accuracy 1, so ablation shows
    own = [int(tiny.bridge(torch.tensor([it.clean_tokens]))[0, -1].argmax()) for it in items]
    relabelled = [dataclasses.replace(it, answer_token=p) for it, p in zip(items, own)]
    layers = [0, 1]
    means = Nn.mean_activations(tiny, relabelled, layers)

    def all_ablated(act, hook=None, layer=None):
        act = act.clone()
        act[:, -1] = means[layer]
        return act
    fwd = [(Nn.mlp_post(l), lambda act, hook=None, l=l: all_ablated(act, layer=l)) for l in layers]
    expected = np.mean([int(tiny.bridge.run_with_hooks(torch.tensor([it.clean_tokens]), fwd_hooks=fwd)[0, -1].argmax())
                        == it.answer_token for it in relabelled])
    assert expected < 1.0  # ablating every neuron changes some predictions

    ranking = Nn.top_neurons(Nn.neuron_attribution(tiny, relabelled, layers), 100)
    curve = Nn.keep_top_k_accuracy(tiny, relabelled, ranking, layers, percents=(0, 5, 100), n_seeds=2, means=means)
    top = curve[curve.condition == "top"].set_index("percent")["accuracy"]
    assert curve[curve.condition == "clean"]["accuracy"].item() == 1.0
    assert top[100.0] == 1.0 and top[0.0] == pytest.approx(expected)
    assert len(curve) == 1 + 3 * (1 + 2) and set(curve[curve.percent == 5.0]["n_kept"]) == {round(0.05 * 256)}
    with pytest.raises(ValueError, match="more than the"):
        Nn.keep_top_k_accuracy(tiny, relabelled, ranking[:10], layers, percents=(10,), means=means)

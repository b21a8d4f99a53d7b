"""Neurons: planted grid patterns are classified by the written rules, noise is "other"; on the tiny
model the neuron hook is the down projection's input, attributions are exact direct effects, and
keep-top-k runs from the clean model (100 % kept) to the all-ablated one (0 % kept)."""

import copy
import dataclasses
import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from arithlens.core import hooks
from arithlens.analyses import neurons as Nn
from arithlens.tasks.prompts import OPERATORS, PromptConfig, make_prompts


def grid(op, pattern, noise=0.1, seed=0):
    """A synthetic 10 × 10 grid: activation = pattern(a, b, result) (0 where result is undefined) + noise."""
    rng = np.random.default_rng(seed)
    cells = list(itertools.product(range(10), repeat=2))
    a, b = np.array(cells).T
    res = np.array([np.nan if OPERATORS[op].apply(x, y) is None else OPERATORS[op].apply(x, y) for x, y in cells])
    with np.errstate(invalid="ignore"):
        act = np.nan_to_num(pattern(a, b, res).astype(float)) + noise * rng.normal(size=len(cells))
    return pd.DataFrame({"a": a, "b": b, "result": res, "activation": act})


def test_classify_planted_patterns():
    h = Nn.classify_heuristic(grid("+", lambda a, b, c: a % 5 == 2))
    assert (h.kind, h.on, h.modulus, h.residue) == ("operand modulo", "a", 5, 2) and h.score > 0.9
    h = Nn.classify_heuristic(grid("+", lambda a, b, c: c % 5 == 0))
    assert (h.kind, h.on, h.modulus, h.residue) == ("result modulo", "result", 5, 0) and h.score > 0.9
    h = Nn.classify_heuristic(grid("*", lambda a, b, c: (c >= 10) & (c <= 20)))
    assert (h.kind, h.on, h.low, h.high) == ("result range", "result", 10, 20)
    h = Nn.classify_heuristic(grid("-", lambda a, b, c: (b >= 3) & (b <= 6)))
    assert (h.kind, h.on, h.low, h.high) == ("operand range", "b", 3, 6)
    h = Nn.classify_heuristic(grid("*", lambda a, b, c: a == b))
    assert h.kind == "identical operands" and h.on is None
    for seed in range(5):
        noise = Nn.classify_heuristic(grid("*", lambda a, b, c: np.zeros_like(a), noise=1.0, seed=seed))
        assert noise.kind == "other" and noise.score < 0.6  # the best match is still named
    assert Nn.classify_heuristic(grid("+", lambda a, b, c: np.ones_like(a), noise=0.0)).pattern == "constant"


def test_threshold_and_classify_neurons():
    weak = grid("+", lambda a, b, c: a % 5 == 2, noise=0.45, seed=1)
    h = Nn.classify_heuristic(weak)
    assert h.pattern == "a ≡ 2 (mod 5)" and 0.4 < h.score < 0.9
    assert Nn.classify_heuristic(weak, threshold=h.score + 1e-9).kind == "other"
    assert Nn.classify_heuristic(weak, threshold=h.score).kind == "operand modulo"
    both = pd.concat([grid("+", lambda a, b, c: a == b).assign(neuron=0),
                      grid("+", lambda a, b, c: c % 3 == 1).assign(neuron=7)]).assign(layer=1, operator="+", template="t")
    table = Nn.classify_neurons(both).set_index("neuron")
    assert table.loc[0, "kind"] == "identical operands" and table.loc[7, "pattern"] == "result ≡ 1 (mod 3)"


def test_patterns_are_distinct_and_ordered():
    g = grid("+", lambda a, b, c: a)
    specs, masks = Nn.heuristic_patterns(g["a"].to_numpy(), g["b"].to_numpy(), g["result"].to_numpy())
    assert len({m.tobytes() for m in masks}) == len(masks)  # every mask once
    kinds = [s[0] for s in specs]
    order = ["identical operands", "operand range", "operand modulo", "result range", "result modulo"]
    assert kinds == sorted(kinds, key=order.index)
    # a ≡ 3 (mod 7) on 0..9 is {3}: the same mask as the range [3, 3], which comes first and is kept
    assert "a ≡ 3 (mod 7)" not in [s[-1] for s in specs] and "a in [3, 3]" in [s[-1] for s in specs]


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


def test_operand_grid_activations(tiny):
    g = Nn.operand_grid_activations(tiny, 1, [5, 9], "-", template="eq_spaced")
    assert len(g) == 2 * 100 and g[(g.a == 3) & (g.b == 5)]["result"].isna().all()
    row = g[(g.neuron == 9) & (g.a == 7) & (g.b == 2)].iloc[0]
    assert row["result"] == 5
    _, cache = tiny.bridge.run_with_cache(torch.tensor([tiny.tokenizer("7 - 2 = ")["input_ids"]]))
    assert row["activation"] == pytest.approx(float(cache[Nn.mlp_post(1)][0, -1, 9]), abs=1e-6)


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


def test_activation_change_sees_only_the_perturbed_neuron(tiny, items):
    after = dataclasses.replace(tiny, bridge=copy.deepcopy(tiny.bridge))
    with torch.no_grad():
        after.bridge.blocks[1].mlp.original_component.up_proj.weight[17] += 0.5
    layer1 = Nn.activation_change(tiny, after, items, 1)
    moved = layer1[layer1["abs_change"] > 0]
    assert set(moved["neuron"]) == {17} and len(moved) == 2  # once per operator
    assert Nn.activation_change(tiny, after, items, 0)["abs_change"].max() == 0.0  # layer 0 is upstream
    h0 = Nn.end_activations(tiny, items, [1])[:, 0, 17]
    h1 = Nn.end_activations(after, items, [1])[:, 0, 17]
    plus = np.array([it.operator == "+" for it in items])
    row = layer1[(layer1.neuron == 17) & (layer1.operator == "+")].iloc[0]
    assert row["change"] == pytest.approx(float((h1 - h0)[torch.from_numpy(plus)].mean()), rel=1e-6)


def test_tuning_change_sees_only_the_tuned_neuron_and_restores_the_weights(tiny, items):
    """A delta that rescales one row of layer 1's up projection moves that neuron at END, and no other;
    the model's weights are as before afterwards; the summary ranks that neuron's group first."""
    from arithlens.core.deltas import Delta, Slice, named_weights, slice_view

    weights = named_weights(tiny)
    param = next(n for n in weights if n.endswith("layers.1.mlp.up_proj.weight"))
    target = Slice(param, 0, 17, 18)
    before = slice_view(weights, target).detach().clone()
    change = Nn.tuning_change(tiny, items, [1], Delta({target: before * 3.0}),
                              ranking=[Nn.Neuron(1, 17)], top_n=1)
    moved = change[change["abs_change"] > 1e-6]
    assert moved[["layer", "neuron", "group"]].values.tolist() == [[1, 17, "top"]]
    assert torch.equal(slice_view(named_weights(tiny), target), before)
    summary = Nn.change_summary(change).set_index("group")
    assert summary.loc["top", "neurons"] == 1 and summary.loc["top", "÷ rest"] > 100
    assert summary.loc["top", "p (top moves more)"] < 0.05


def test_tuning_comparison_finds_shared_and_disjoint_moves():
    """Two deltas that move the same five neurons (one with every sign flipped) agree on |change| and share
    their most-moved set; a third that moves five other neurons shares none of it."""
    grid = [(layer, j) for layer in (0, 1) for j in range(20)]

    def frame(moved, scale=1.0):
        change = [scale * (10.0 + j if (layer, j) in moved else 0.01 * j) for layer, j in grid]
        return pd.DataFrame({"layer": [g[0] for g in grid], "neuron": [g[1] for g in grid], "change": change,
                             "abs_change": np.abs(change), "group": "rest"})

    same = {(1, j) for j in range(5)}
    other = {(0, j) for j in range(10, 15)}
    table = Nn.tuning_comparison({"precise": frame(same), "flipped": frame(same, -1.0), "other": frame(other)},
                                 top_n=5).set_index(["method", "other"])
    assert table.loc[("precise", "flipped"), "IoU of top-5 moved"] == 1.0
    assert table.loc[("precise", "flipped"), "ρ |change|"] == pytest.approx(1.0)
    assert table.loc[("precise", "flipped"), "ρ change"] < 0
    assert table.loc[("precise", "other"), "IoU of top-5 moved"] == 0.0
    with pytest.raises(ValueError, match="different neurons"):
        Nn.tuning_comparison({"a": frame(same), "b": frame(same).iloc[:-1]}, top_n=5)

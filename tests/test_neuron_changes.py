"""Neuron changes under fine-tuning: a perturbed or tuned neuron is the only one that moves, the weights
come back, and two deltas that move the same neurons agree."""

import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from arithlens.analyses import neuron_changes as Nc
from arithlens.analyses.neurons import Neuron, end_activations
from arithlens.tasks.prompts import PromptConfig, make_prompts


@pytest.fixture(scope="module")
def items(tiny):
    return list(make_prompts(tiny.tokenizer, PromptConfig(operators=("+", "*"), templates=("eq_spaced",), n_per_cell=12)).items)


def test_activation_change_sees_only_the_perturbed_neuron(tiny, items):
    after = dataclasses.replace(tiny, bridge=copy.deepcopy(tiny.bridge))
    with torch.no_grad():
        after.bridge.blocks[1].mlp.original_component.up_proj.weight[17] += 0.5
    layer1 = Nc.activation_change(tiny, after, items, 1)
    moved = layer1[layer1["abs_change"] > 0]
    assert set(moved["neuron"]) == {17} and len(moved) == 2  # once per operator
    assert Nc.activation_change(tiny, after, items, 0)["abs_change"].max() == 0.0  # layer 0 is upstream
    h0 = end_activations(tiny, items, [1])[:, 0, 17]
    h1 = end_activations(after, items, [1])[:, 0, 17]
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
    change = Nc.tuning_change(tiny, items, [1], Delta({target: before * 3.0}),
                              ranking=[Neuron(1, 17)], top_n=1)
    moved = change[change["abs_change"] > 1e-6]
    assert moved[["layer", "neuron", "group"]].values.tolist() == [[1, 17, "top"]]
    assert torch.equal(slice_view(named_weights(tiny), target), before)
    summary = Nc.change_summary(change).set_index("group")
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
    table = Nc.tuning_comparison({"precise": frame(same), "flipped": frame(same, -1.0), "other": frame(other)},
                                 top_n=5).set_index(["method", "other"])
    assert table.loc[("precise", "flipped"), "IoU of top-5 moved"] == 1.0
    assert table.loc[("precise", "flipped"), "ρ |change|"] == pytest.approx(1.0)
    assert table.loc[("precise", "flipped"), "ρ change"] < 0
    assert table.loc[("precise", "other"), "IoU of top-5 moved"] == 0.0
    with pytest.raises(ValueError, match="different neurons"):
        Nc.tuning_comparison({"a": frame(same), "b": frame(same).iloc[:-1]}, top_n=5)

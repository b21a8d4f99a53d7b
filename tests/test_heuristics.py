"""Heuristic types: planted grid patterns are classified by the written rules, noise is "other", and the
operand grid reads each neuron's activation at END of every cell's prompt."""

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from arithlens.analyses import heuristics as Hu
from arithlens.analyses.neurons import mlp_post
from arithlens.tasks.prompts import OPERATORS


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
    h = Hu.classify_heuristic(grid("+", lambda a, b, c: a % 5 == 2))
    assert (h.kind, h.on, h.modulus, h.residue) == ("operand modulo", "a", 5, 2) and h.score > 0.9
    h = Hu.classify_heuristic(grid("+", lambda a, b, c: c % 5 == 0))
    assert (h.kind, h.on, h.modulus, h.residue) == ("result modulo", "result", 5, 0) and h.score > 0.9
    h = Hu.classify_heuristic(grid("*", lambda a, b, c: (c >= 10) & (c <= 20)))
    assert (h.kind, h.on, h.low, h.high) == ("result range", "result", 10, 20)
    h = Hu.classify_heuristic(grid("-", lambda a, b, c: (b >= 3) & (b <= 6)))
    assert (h.kind, h.on, h.low, h.high) == ("operand range", "b", 3, 6)
    h = Hu.classify_heuristic(grid("*", lambda a, b, c: a == b))
    assert h.kind == "identical operands" and h.on is None
    for seed in range(5):
        noise = Hu.classify_heuristic(grid("*", lambda a, b, c: np.zeros_like(a), noise=1.0, seed=seed))
        assert noise.kind == "other" and noise.score < 0.6  # the best match is still named
    assert Hu.classify_heuristic(grid("+", lambda a, b, c: np.ones_like(a), noise=0.0)).pattern == "constant"


def test_threshold_and_classify_neurons():
    weak = grid("+", lambda a, b, c: a % 5 == 2, noise=0.45, seed=1)
    h = Hu.classify_heuristic(weak)
    assert h.pattern == "a ≡ 2 (mod 5)" and 0.4 < h.score < 0.9
    assert Hu.classify_heuristic(weak, threshold=h.score + 1e-9).kind == "other"
    assert Hu.classify_heuristic(weak, threshold=h.score).kind == "operand modulo"
    both = pd.concat([grid("+", lambda a, b, c: a == b).assign(neuron=0),
                      grid("+", lambda a, b, c: c % 3 == 1).assign(neuron=7)]).assign(layer=1, operator="+", template="t")
    table = Hu.classify_neurons(both).set_index("neuron")
    assert table.loc[0, "kind"] == "identical operands" and table.loc[7, "pattern"] == "result ≡ 1 (mod 3)"


def test_patterns_are_distinct_and_ordered():
    g = grid("+", lambda a, b, c: a)
    specs, masks = Hu.heuristic_patterns(g["a"].to_numpy(), g["b"].to_numpy(), g["result"].to_numpy())
    assert len({m.tobytes() for m in masks}) == len(masks)  # every mask once
    kinds = [s[0] for s in specs]
    order = ["identical operands", "operand range", "operand modulo", "result range", "result modulo"]
    assert kinds == sorted(kinds, key=order.index)
    # a ≡ 3 (mod 7) on 0..9 is {3}: the same mask as the range [3, 3], which comes first and is kept
    assert "a ≡ 3 (mod 7)" not in [s[-1] for s in specs] and "a in [3, 3]" in [s[-1] for s in specs]


def test_operand_grid_activations(tiny):
    g = Hu.operand_grid_activations(tiny, 1, [5, 9], "-", template="eq_spaced")
    assert len(g) == 2 * 100 and g[(g.a == 3) & (g.b == 5)]["result"].isna().all()
    row = g[(g.neuron == 9) & (g.a == 7) & (g.b == 2)].iloc[0]
    assert row["result"] == 5
    _, cache = tiny.bridge.run_with_cache(torch.tensor([tiny.tokenizer("7 - 2 = ")["input_ids"]]))
    assert row["activation"] == pytest.approx(float(cache[mlp_post(1)][0, -1, 9]), abs=1e-6)

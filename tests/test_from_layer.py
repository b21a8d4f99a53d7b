"""Chapter 4's evaluation from a cached layer (:mod:`arithlens.analyses.sft.from_layer`) against the plain
evaluation through the bridge (:func:`arithlens.analyses.sft.evaluation.evaluate`), on each tiny
architecture: the base model, a delta above the cached layer, and one below it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arithlens.analyses.sft import evaluation
from arithlens.analyses.sft.from_layer import FromLayerEvaluator
from arithlens.core import deltas
from arithlens.core.deltas import Delta, Slice
from arithlens.tasks import suites as suites_lib

SUITES = ("multidigit", "years", "capitals", "antonyms")  # exact and mass scoring; math and controls
FILES = ["tests/data/benchmarks/mmlu_style.csv", "tests/data/benchmarks/gsm8k_style.jsonl"]  # choice; exact, multi-token


@pytest.fixture(scope="module", params=["tiny", "tiny:qwen2"], ids=["llama", "qwen2"])
def setup(request):
    from arithlens.core.models import load_model

    model = load_model(request.param)
    data = evaluation.make_sft_data(model.tokenizer, operators=("+", "*"), max_eval_per_set=24, eval_shots=(0, 2))
    from arithlens.tasks.benchmarks import reader

    suites = [suites_lib.make_suite(name, model.tokenizer, n=8, seed=0) for name in SUITES]
    suites += list(reader.load_benchmarks(FILES, model.tokenizer, n=8, shots=3, seed=0).values())  # as chapter 4 reads them
    return model, data, suites


def _perturbed(model, layer: int | None, seed: int) -> Delta:
    """New values for a block of rows of one weight: layer ``layer``'s o_proj, or the embedding (None)."""
    weights = deltas.named_weights(model)
    name = "model.embed_tokens.weight" if layer is None else f"model.layers.{layer}.self_attn.o_proj.weight"
    s = Slice(name, 0, 0, 8)
    base = deltas.slice_view(weights, s)
    g = torch.Generator().manual_seed(seed)
    return Delta({s: base + 0.5 * base.std() * torch.randn(base.shape, generator=g)})


def _agree(fast, slow):
    assert list(fast.columns) == list(slow.columns)
    assert fast[["set", "kind", "item"]].equals(slow[["set", "kind", "item"]])
    np.testing.assert_allclose(fast["p_answer"].to_numpy(float), slow["p_answer"].to_numpy(float), atol=2e-5, rtol=1e-4)
    # a greedy answer can differ only at a tie to float rounding: never on more than one item in a hundred
    assert (fast["correct"].to_numpy() == slow["correct"].to_numpy()).mean() >= 0.99
    math = slow["digit"].notna()
    assert (fast.loc[math, "digit"].astype(bool) == slow.loc[math, "digit"].astype(bool)).mean() >= 0.99


@pytest.mark.parametrize("layer", [None, "above", "below"])
def test_evaluation_from_the_cached_layer_matches_the_bridge(setup, layer):
    model, data, suites = setup
    evaluator = FromLayerEvaluator(model, data, suites, start=1)
    delta = None if layer is None else _perturbed(model, 1 if layer == "above" else None, seed=3)
    assert evaluator.first_layer(delta) == {None: model.n_layers, "above": 1, "below": 0}[layer]
    fast = evaluator.evaluate(delta)
    _agree(fast, evaluation.evaluate(model, delta, data, suites))
    assert set(fast["set"]) == set(data.evals) | {s.name for s in suites} and len(suites) == len(SUITES) + len(FILES)
    slow_val = evaluation.validation_correct(model, delta, data)
    assert (evaluator.validation(delta) == slow_val).mean() >= 0.99


def test_a_delta_changes_the_scores_and_is_taken_off_afterwards(setup):
    model, data, suites = setup
    evaluator = FromLayerEvaluator(model, data, suites, start=1)
    before = evaluator.evaluate(None)
    changed = evaluator.evaluate(_perturbed(model, 1, seed=5))
    assert not np.allclose(before["p_answer"], changed["p_answer"])  # the delta reached the twin's layers
    after = evaluator.evaluate(None)
    np.testing.assert_array_equal(before["p_answer"].to_numpy(), after["p_answer"].to_numpy())

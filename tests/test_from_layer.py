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
    assert any(b.packing is not None for b in evaluator.sets["held-out pairs (2-shot)"])  # demonstrations read once
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


def test_items_sharing_a_beginning_run_packed_and_score_as_unpacked(setup, monkeypatch):
    """A batch whose items share their demonstrations runs packed; split over several packed rows (the last
    filled with a repeat) it scores as the plain batches do."""
    from arithlens.analyses.sft import from_layer

    model, data, suites = setup
    plain = FromLayerEvaluator.__new__(FromLayerEvaluator)
    monkeypatch.setattr(from_layer, "_pack", lambda *a: None)
    plain.__init__(model, data, suites, start=1)
    monkeypatch.undo()
    monkeypatch.setattr(from_layer, "PACKED_ROW", 48)  # at most two items a row here: three items make two rows
    packed = FromLayerEvaluator(model, data, suites, start=1)
    shapes = [(len(b.index), tuple(b.packing.tokens.shape)) for bs in packed.suite_batches for b in bs if b.packing]
    assert any(rows > 1 for _, (rows, _) in shapes), shapes
    assert not any(b.packing for bs in plain.suite_batches for b in bs)
    for delta in (None, _perturbed(model, 1, seed=7), _perturbed(model, None, seed=7)):
        fast, slow = packed.evaluate(delta), plain.evaluate(delta)
        np.testing.assert_allclose(fast["p_answer"].to_numpy(float), slow["p_answer"].to_numpy(float), atol=2e-6)
        assert (fast["correct"] == slow["correct"]).mean() >= 0.99


def test_pack_declines_where_it_would_not_pay_or_could_change_a_result():
    from arithlens.analyses.sft.from_layer import _pack

    shared = torch.tensor([[5, 6, 7, 8, 1, 2], [5, 6, 7, 8, 3, 4], [5, 6, 7, 8, 3, 9]])
    head, own, per = _pack(shared, read_from=4, window=None)
    assert head.tolist() == [5, 6, 7, 8] and own == 2 and per >= 3
    assert _pack(shared, read_from=3, window=None)[0].tolist() == [5, 6, 7]  # the last prompt token stays the item's own
    assert _pack(shared[:1], read_from=4, window=None) is None  # one item
    assert _pack(shared, read_from=4, window=6) is None  # a sliding window no longer than the items
    assert _pack(shared, read_from=4, window=7) is not None
    assert _pack(torch.tensor([[5, 1, 2, 3], [5, 4, 2, 3]]), read_from=3, window=None) is None  # shares less than the rest


def test_evaluate_can_score_some_kinds_only(setup):
    model, data, suites = setup
    evaluator = FromLayerEvaluator(model, data, suites, start=1)
    delta = _perturbed(model, 1, seed=11)
    full, math = evaluator.evaluate(delta), evaluator.evaluate(delta, kinds=("math",))
    assert set(math["kind"]) == {"math"} and set(math["set"]) == set(full.loc[full["kind"] == "math", "set"])
    same_rows = full[full["kind"] == "math"].reset_index(drop=True)
    np.testing.assert_array_equal(math["p_answer"].to_numpy(), same_rows["p_answer"].to_numpy())

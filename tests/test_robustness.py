"""Layer-matched null, selectivity, rule and ablation sensitivity: hand-computed cases and references."""

import dataclasses
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from arithlens.analyses import knockout as K
from arithlens.analyses import robustness as R
from arithlens.core import hooks
from arithlens.core.hooks import Head
from arithlens.core.items import to_tokens
from arithlens.tasks.prompts import PromptConfig, make_prompts

KEY = [Head(0, 1), Head(2, 0), Head(2, 3)]


def test_layer_matched_sets_match_layers_and_exclude_key_heads():
    sets = hooks.layer_matched_random_sets(KEY, n_layers=3, n_heads=5, n_sets=200, seed=3)
    assert len(sets) == 200
    for s in sets:
        assert Counter(h.layer for h in s) == Counter({0: 1, 2: 2})
        assert not set(s) & set(KEY) and len(set(s)) == len(s) and s == sorted(s)
    # every eligible head is drawn sometime, no other is: layer 0 offers 4 heads, layer 2 offers 3
    drawn = Counter(h for s in sets for h in s)
    assert set(drawn) == {Head(0, h) for h in (0, 2, 3, 4)} | {Head(2, h) for h in (1, 2, 4)}
    assert sets == hooks.layer_matched_random_sets(KEY, 3, 5, 200, seed=3)
    assert sets != hooks.layer_matched_random_sets(KEY, 3, 5, 200, seed=4)
    with pytest.raises(ValueError, match="only 1 other heads"):
        hooks.layer_matched_random_sets([Head(1, 0), Head(1, 1)], n_layers=2, n_heads=3, n_sets=1)
    with pytest.raises(ValueError, match="outside"):
        hooks.layer_matched_random_sets([Head(5, 0)], 2, 3)


def test_null_test_by_hand():
    t = R.null_test(5.0, np.array([1.0, 2.0, 5.0, 6.0]))
    assert t.p_value == pytest.approx((1 + 2) / (1 + 4))  # 5 and 6 are ≥ 5: ties count against the key
    assert t.percentile == pytest.approx(50.0) and t.null_mean == pytest.approx(3.5) and t.n_sets == 4
    assert R.null_test(10.0, np.zeros(99)).p_value == pytest.approx(1 / 100)  # the smallest p with 99 sets
    with pytest.raises(ValueError, match="empty"):
        R.null_test(1.0, np.array([]))


@pytest.fixture(scope="module")
def prompt_set(tiny):
    """Items relabelled with the random model's own greedy answer: unablated accuracy is 1, so an
    ablation's effect shows as a mix of right and wrong items rather than all wrong."""
    ps = make_prompts(tiny.tokenizer, PromptConfig(operators=("+", "*"), templates=("eq_spaced", "st_is"), n_per_cell=4))
    with torch.no_grad():
        own = [int(tiny.bridge(torch.tensor([it.clean_tokens]))[0, -1].argmax()) for it in ps.items]
    return dataclasses.replace(ps, items=tuple(dataclasses.replace(it, answer_token=p) for it, p in zip(ps.items, own)))


def test_knockout_null_rows_are_knockout_accuracies(tiny, prompt_set):
    ev = K.KnockoutEvaluator(tiny, prompt_set, K.mean_z(tiny, prompt_set, "end"), "end")
    key = [Head(0, 1), Head(1, 2)]  # 3 × 3 possible layer-matched sets
    frame, test = R.knockout_null(ev, key, n_sets=6, seed=1)
    assert len(frame) == 7 and list(frame["set"]) == ["key"] + ["random"] * 6
    base = ev.accuracy([])
    assert base == 1.0 and frame["drop"].nunique() > 1  # the sets' drops differ: the test can tell them apart
    assert frame["accuracy"].iloc[0] == ev.accuracy(key)
    for i, heads in enumerate(hooks.layer_matched_random_sets(key, tiny.n_layers, tiny.n_heads, 6, seed=1)):
        assert frame["accuracy"].iloc[i + 1] == ev.accuracy(heads)
    np.testing.assert_allclose(frame["drop"], base - frame["accuracy"])
    null = frame["drop"].to_numpy()[1:]
    assert test.p_value == pytest.approx((1 + np.sum(null >= frame["drop"].iloc[0])) / 7)


def test_selectivity_by_hand():
    math = (np.array([1, 1, 1, 1], bool), np.array([0, 0, 1, 1], bool))      # drop 0.5
    ctrl = (np.array([1, 1, 0, 0, 1], bool), np.array([1, 1, 0, 0, 1], bool))  # drop 0
    ctrl2 = (np.array([1, 0], bool), np.array([0, 0], bool))                  # drop 0.5
    out = R.selectivity({"math": math, "capitals": ctrl, "years": ctrl2}, "math", n_boot=2000, seed=0).set_index("control")
    assert out.loc["capitals", "selectivity"] == pytest.approx(0.5) and out.loc["years", "selectivity"] == pytest.approx(0.0)
    assert out.loc["capitals", "ci_low"] <= 0.5 <= out.loc["capitals", "ci_high"]
    # the control's drop is exactly 0 on every resample, so the CI is the target drop's own CI: within [0, 1]
    assert 0.0 <= out.loc["capitals", "ci_low"] < out.loc["capitals", "ci_high"] <= 1.0
    # "years" resamples its own drop (0, 0.5 or 1 on two items) too: its CI reaches below zero
    assert out.loc["years", "ci_low"] < 0.0 < out.loc["years", "ci_high"]
    again = R.selectivity({"math": math, "capitals": ctrl, "years": ctrl2}, "math", n_boot=2000, seed=0).set_index("control")
    pd.testing.assert_frame_equal(out, again)
    with pytest.raises(ValueError, match="equal-length"):
        R.selectivity({"math": math, "bad": (np.ones(3, bool), np.ones(2, bool))}, "math")


def test_threshold_sensitivity_by_hand():
    heads = [(0, 0), (0, 1), (1, 0), (1, 1)]
    means = {"rel_logit": [-0.10, -0.03, -0.005, 0.02], "d_prob": [-0.06, -0.02, -0.2, 0.0],
             "d_logit_diff": [-1.0, -0.2, -0.05, 0.3]}
    summary = pd.DataFrame([{"mode": "path", "layer": l, "head": h, "metric": m, "mean": v[i], "se": 0.01}
                            for m, v in means.items() for i, (l, h) in enumerate(heads)])
    out = R.threshold_sensitivity(summary).set_index(["metric", "threshold"])
    assert out.loc[("rel_logit", -0.05), "heads"] == "0.0" and out.loc[("rel_logit", -0.01), "heads"] == "0.0 0.1"
    assert out.loc[("rel_logit", -0.01), "jaccard_vs_reference"] == pytest.approx(0.5)
    assert out.loc[("d_prob", -0.05), "heads"] == "0.0 1.0"
    assert out.loc[("d_logit_diff", -0.1), "n_heads"] == 2
    long = R.key_heads_by_rule(summary, [("rel_logit", -0.01)])
    assert list(zip(long["layer"], long["head"])) == [(0, 0), (0, 1)]  # most negative first


def test_ablation_kinds(tiny, prompt_set):
    ev = R.AblationEvaluator(tiny, prompt_set, batch_size=5)
    heads = [Head(0, 2), Head(1, 1)]
    means = K.mean_z(tiny, prompt_set, "end")
    # mean ablation is the paper's knockout
    mean_vals = R.ablation_values(tiny, prompt_set, "mean")
    by_mean = ev.correct(heads, mean_vals)
    assert by_mean.any() and not by_mean.all()
    np.testing.assert_array_equal(by_mean, K.KnockoutEvaluator(tiny, prompt_set, means, "end").correct(heads))
    # resample: every item gets another item's counterfactual END value, never its own
    z = K.end_z(tiny, prompt_set)
    res = R.ablation_values(tiny, prompt_set, "resample", seed=2)
    donors = [int(torch.where((z == res[i]).all(-1).all(-1).all(-1))[0][0]) for i in range(len(res))]
    assert all(d != i for i, d in enumerate(donors)) and sorted(donors) == list(range(len(res)))
    # zero ablation against a plain full forward with the heads' END hook_z set to zero
    zero_vals = R.ablation_values(tiny, prompt_set, "zero")
    got = ev.correct(heads, zero_vals)
    assert got.any() and not got.all()
    zeros = torch.zeros(tiny.n_layers, tiny.n_heads, tiny.cfg.d_head)
    for i, it in enumerate(prompt_set.items):
        with torch.no_grad():
            logits = tiny.bridge.run_with_hooks(to_tokens([it]), fwd_hooks=K.ablation_hooks(heads, zeros, "end"))
        assert got[i] == (int(logits[0, -1].argmax()) == it.answer_token)
    table = R.ablation_sensitivity(ev, heads, n_random=3, seed=0)
    assert len(table) == 3 * 4 and set(table["ablation"]) == {"mean", "zero", "resample"}
    key_mean = table[(table["ablation"] == "mean") & (table["set"] == "key")]["accuracy"].iloc[0]
    assert key_mean == pytest.approx(float(ev.correct(heads, mean_vals).mean()))


def test_suite_null_key_row_is_chapter_3s_key_knockout(tiny):
    """On every suite the key set's accuracy is what chapter 3's knockout transfer measures for the key
    heads (same scorer, same ablation values); the random rows are the layer-matched sets, scored the
    same way; the null test places the key drop among them."""
    from arithlens.tasks import suites as S
    from arithlens.analyses.transfer import knockout_transfer

    made = {n: S.make_suite(n, tiny.tokenizer, n=6, seed=0) for n in ("multidigit", "capitals")}
    arith = make_prompts(tiny.tokenizer, PromptConfig(operators=("+", "*"), templates=("eq_spaced",), n_per_cell=2))
    means = K.mean_z(tiny, arith, "end")
    key = [Head(0, 1), Head(1, 0), Head(1, 2)]
    own = {n: K.mean_z(tiny, s, "end", which="clean") for n, s in made.items()}
    rows, tests = R.suite_null(tiny, made, key, own, n_sets=4, seed=3)
    ch3 = knockout_transfer(tiny, made, key, means, n_seeds=0, margin=None, own_means=True)
    for name, suite in made.items():
        mine = rows[rows.suite == name].set_index("set")
        theirs = ch3[ch3.suite == name].groupby("condition")["correct"].mean()  # the whole answer, either kind
        assert mine.loc["key", "accuracy"] == pytest.approx(theirs["key (own mean)"])
        assert (mine["drop"] == theirs["none"] - mine["accuracy"]).all()
        assert len(mine.loc["random"]) == 4
        test = tests.set_index("suite").loc[name]
        null = mine.loc["random", "drop"].to_numpy()
        assert test["p_value"] == pytest.approx((1 + (null >= mine.loc["key", "drop"]).sum()) / 5)
    sets = hooks.layer_matched_random_sets(key, tiny.n_layers, tiny.n_heads, 4, seed=3)
    capitals = S.SuiteScorer(tiny, made["capitals"])
    first = rows[(rows.suite == "capitals") & (rows.set == "random")]["accuracy"].iloc[0]
    assert first == pytest.approx(capitals.score(K.ablation_hooks(sets[0], own["capitals"], "all"))["correct"].mean())

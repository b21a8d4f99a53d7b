"""Ranking agreement and faithfulness curves: hand-computed cases and plain-loop references."""

import numpy as np
import pandas as pd
import pytest
import torch

from arithlens.analyses import agreement as G
from arithlens.analyses import attribution as A
from arithlens.analyses import knockout as K
from arithlens.analyses import end_cache as EC
from arithlens.core.hooks import Head, digit_tokens, scores_from_logits
from arithlens.core.items import to_tokens
from arithlens.tasks.prompts import PromptConfig, make_prompts


def _table(means_by_method, n_prompts=3):
    """A per-prompt table whose mean over prompts is exactly the given per-head means."""
    rows = []
    for method, means in means_by_method.items():
        for j, m in enumerate(means):
            for p, jitter in enumerate(np.linspace(-1, 1, n_prompts)):
                rows.append({"method": method, "mode": "total", "prompt": p, "layer": j // 4, "head": j % 4,
                             "rel_logit": m + jitter})
    return pd.DataFrame(rows)


def test_rank_agreement_on_hand_computed_cases():
    exact = [-0.9, -0.5, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2]  # heads 0.0 … 1.3, most negative first
    table = _table({"exact": exact, "scaled": [2 * x for x in exact], "reversed": [-x for x in exact]})
    out = G.rank_agreement(table).set_index(["method", "measure", "k"])["value"]
    assert out[("scaled", "spearman", 8)] == pytest.approx(1.0)
    assert out[("reversed", "spearman", 8)] == pytest.approx(-1.0)
    assert out[("scaled", "jaccard", 5)] == 1.0
    # reversed top-5 = exact's bottom 5 heads; they share 2 of the 8 heads: 2 / (5 + 5 − 2)
    assert out[("reversed", "jaccard", 5)] == pytest.approx(2 / 8)
    assert set(G.rank_agreement(table)["k"]) == {5, 8}  # k = 10, 20 are capped at the 8 heads
    # |mean| ordering: reversed has the same magnitudes, so it agrees perfectly
    absolute = G.rank_agreement(table, order="abs").set_index(["method", "measure", "k"])["value"]
    assert absolute[("reversed", "spearman", 8)] == pytest.approx(1.0)
    assert G.rank_heads(G.mean_effects(table[table["method"] == "exact"]))[:2] == [Head(0, 0), Head(0, 1)]
    assert G.jaccard([], []) == 1.0 and G.jaccard([Head(0, 0)], [Head(0, 1)]) == 0.0
    # screen size: the same order needs only the top 5 for exact's top 5; the reversed order ranks exact's
    # top head last, so all 8 must be measured
    assert out[("scaled", "screen", 5)] == 5 and out[("reversed", "screen", 5)] == 8
    swapped = [exact[0], exact[5], exact[2], exact[3], exact[4], exact[1], exact[6], exact[7]]  # heads 0.1 and 1.1 swap
    assert G.rank_agreement(_table({"exact": exact, "swapped": swapped})).set_index(
        ["method", "measure", "k"])["value"][("swapped", "screen", 5)] == 6
    assert G.screen_size([Head(0, 0)], [Head(0, 1), Head(0, 0)], 0) == 0
    with pytest.raises(ValueError, match="does not score every head"):
        G.rank_agreement(table[~((table["method"] == "scaled") & (table["layer"] == 1) & (table["head"] == 3))])


def test_random_ranking_is_seeded_and_complete():
    r = G.random_ranking(3, 4, seed=7)
    assert sorted(r) == [Head(l, h) for l in range(3) for h in range(4)]
    assert r == G.random_ranking(3, 4, seed=7) and r != G.random_ranking(3, 4, seed=8)


@pytest.fixture(scope="module")
def prompt_set(tiny_arch):
    return tiny_arch, make_prompts(tiny_arch.tokenizer, PromptConfig(operators=("+", "*"), templates=("eq_spaced", "st_is"),
                                                                     n_per_cell=3, shots=1))


def _reference_logit_diff(model, prompts, ablated, means):
    """Plain loop: one full hooked forward per prompt, mean of answer − best other digit."""
    digits = digit_tokens(model.tokenizer)
    fwd = K.ablation_hooks(ablated, means, "end")
    vals = []
    for it in prompts.items:
        with torch.no_grad():
            logits = model.bridge.run_with_hooks(to_tokens([it]), fwd_hooks=fwd)[:, -1].float()
        vals.append(float(scores_from_logits(logits, torch.tensor([it.answer_token]), digits, False).logit_diff[0]))
    return float(np.mean(vals))


def test_faithfulness_curve_matches_plain_loop(prompt_set):
    model, ps = prompt_set
    means = K.mean_z(model, ps, "end")
    ev = G.LogitDiffEvaluator(model, ps, means, batch_size=4)
    ranking = G.random_ranking(model.n_layers, model.n_heads, seed=1)
    curve = G.faithfulness_curve(ev, {"r": ranking})
    n_all = model.n_layers * model.n_heads
    assert list(curve["n"]) == list(range(n_all + 1))
    assert curve["fraction_recovered"].iloc[0] == 0.0 and curve["fraction_recovered"].iloc[-1] == 1.0
    m_clean = _reference_logit_diff(model, ps, [], means)
    m_ablated = _reference_logit_diff(model, ps, ranking, means)
    assert curve["m_clean"].iloc[0] == pytest.approx(m_clean, abs=1e-4)
    assert curve["m_ablated"].iloc[0] == pytest.approx(m_ablated, abs=1e-4)
    for n in (1, 3, 6):
        m = _reference_logit_diff(model, ps, ranking[n:], means)
        row = curve[curve["n"] == n].iloc[0]
        assert row["logit_diff"] == pytest.approx(m, abs=1e-4)
        assert row["fraction_recovered"] == pytest.approx((m - m_ablated) / (m_clean - m_ablated), rel=1e-3)
    with pytest.raises(ValueError, match="every head exactly once"):
        G.faithfulness_curve(ev, {"short": ranking[:-1]})
    # chapter 1's per-prompt rows at one n give the curve's F(n) as a ratio of means, with an interval around it
    from arithlens.claims.intervals import recovered
    items = G.kept_items(ev, {"r": ranking, "other": ranking[::-1]}, 3)
    assert len(items) == 2 * 3 * len(ps) and set(items["condition"]) == {"clean", "ablated", "kept"}
    got = recovered(items, n_boot=200).set_index("ranking")
    assert got.loc["r", "recovered"] == pytest.approx(curve[curve["n"] == 3]["fraction_recovered"].iloc[0], rel=1e-6)
    assert got.loc["r", "low"] <= got.loc["r", "recovered"] <= got.loc["r", "high"] and got.loc["r", "n"] == 3


def test_curve_area_on_hand_computed_curves():
    n = np.arange(5)
    linear = pd.DataFrame({"ranking": "linear", "n": n, "n_heads": 4, "fraction_recovered": n / 4})
    step = pd.DataFrame({"ranking": "step", "n": n, "n_heads": 4, "fraction_recovered": (n >= 1).astype(float)})
    area = G.curve_area(pd.concat([linear, step])).set_index("ranking")["area"]
    assert area["linear"] == pytest.approx(0.5) and area["step"] == pytest.approx(1 - 0.5 / 4)


def test_attribution_ranks_heads_like_exact_patching_on_tiny(prompt_set):
    model, ps = prompt_set
    caches = EC.cache_prompt_set(model, ps)
    table = A.compare_with_exact(model, ps, caches, modes=("total",), methods=(A.ATTRIBUTION, A.eap_ig(4)))
    out = G.rank_agreement(table, "rel_logit").set_index(["method", "measure", "k"])["value"]
    # measured: Spearman 1.0 for both methods and both tiny architectures (8 heads, nearly linear model)
    assert out[("attribution", "spearman", 8)] >= 0.95 and out[("eap_ig", "spearman", 8)] >= 0.95
    ranks = G.rankings_from_table(table, "total")
    assert set(ranks) == {"exact", "attribution", "eap_ig"} and all(len(r) == 8 for r in ranks.values())

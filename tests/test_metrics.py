import numpy as np
import pandas as pd
import pytest

from arithlens.core.metrics import bootstrap_means, select_key_heads, summarize_effects


def test_bootstrap_matches_a_plain_loop():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(50, 3))
    mean, lo, hi, se = bootstrap_means(values, n_boot=4000, seed=0)
    np.testing.assert_allclose(mean, values.mean(0))
    loop = np.array([values[rng.integers(0, 50, 50)].mean(0) for _ in range(4000)])
    np.testing.assert_allclose(se, loop.std(0), rtol=0.1)
    np.testing.assert_allclose(lo, np.quantile(loop, 0.025, axis=0), atol=0.05)
    assert (lo < mean).all() and (mean < hi).all()


def _summary(means):
    return pd.DataFrame({"layer": range(len(means)), "head": 0, "mean": means, "se": 0.001})


def test_selection_rules():
    s = _summary([-0.2, -0.06, -0.01, 0.3, -0.0001])
    assert list(select_key_heads(s, "threshold", threshold=-0.05)["layer"]) == [0, 1]
    assert list(select_key_heads(s, "top_k", k=3)["layer"]) == [0, 1, 2]
    assert list(select_key_heads(s, "significant", min_effect=0.005)["layer"]) == [0, 1, 2]
    assert select_key_heads(s, "threshold", threshold=-0.5).empty  # a finding, not an error
    with pytest.raises(ValueError, match="larger than the number of heads"):
        select_key_heads(s, "top_k", k=6)


def test_summarize_effects_is_tidy():
    effects = pd.DataFrame({"mode": "direct", "prompt": np.repeat(range(10), 4), "layer": np.tile([0, 0, 1, 1], 10),
                            "head": np.tile([0, 1, 0, 1], 10), "rel_logit": np.arange(40.0)})
    out = summarize_effects(effects, metrics=("rel_logit",), n_boot=100)
    assert len(out) == 4 and set(out.columns) == {"mode", "layer", "head", "metric", "mean", "ci_low", "ci_high", "se", "n"}
    row = out[(out.layer == 1) & (out["head"] == 1)].iloc[0]
    assert row["mean"] == pytest.approx(np.arange(3, 40, 4).mean()) and row["n"] == 10

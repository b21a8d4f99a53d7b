"""Number representations: planted periods and helices are recovered, random tables show none; on the
tiny model, positions and activations are exact and the helix patch is plumbed (exact fit keeps 1, mean keeps 0)."""

import dataclasses

import numpy as np
import pytest
import torch

from arithlens.analyses import numbers as N
from arithlens.tasks.prompts import PromptConfig, make_prompts

NUMS = list(range(100))


def planted(periods, linear=0.0, noise=0.05, d=32, seed=0):
    """Activations [100, d] = random linear image of cos/sin(2πn/T) for T in ``periods`` (+ linear·n/100) + noise."""
    rng = np.random.default_rng(seed)
    n = np.array(NUMS, dtype=float)
    feats = [f(2 * np.pi * n / T) for T in periods for f in (np.cos, np.sin)] + ([linear * n / 100] if linear else [])
    signal = np.stack(feats, 1) @ rng.normal(size=(len(feats), d))
    return torch.from_numpy(signal), torch.from_numpy(signal + noise * rng.normal(size=signal.shape))


def test_fourier_power_finds_planted_periods():
    _, acts = planted([10, 5])
    table = N.fourier_power(acts, NUMS, periods=(2, 3, 5, 7, 10, 100)).set_index("period")
    assert table.loc[10, "share"] + table.loc[5, "share"] > 0.95
    assert min(table.loc[10, "ratio"], table.loc[5, "ratio"]) > 10
    for other in (2, 3, 7, 100):
        assert table.loc[other, "share"] < 0.01
    assert table.loc[2, "n_basis"] == 1 and table.loc[10, "n_basis"] == 2  # sin(πn) vanishes on integers
    assert table.loc[2, "chance"] == pytest.approx(1 / 99) and table.loc[10, "chance"] == pytest.approx(2 / 99)


def test_fourier_power_equals_regression_r2():
    """Plain reference: regress every dimension on [1, cos, sin] and pool the explained sum of squares."""
    acts = torch.from_numpy(np.random.default_rng(3).normal(size=(40, 6)))
    nums = list(range(40))
    table = N.fourier_power(acts, nums, periods=(4, 7)).set_index("period")
    x = acts.numpy()
    for T in (4, 7):
        design = np.stack([np.ones(40), np.cos(2 * np.pi * np.arange(40) / T), np.sin(2 * np.pi * np.arange(40) / T)], 1)
        fit = design @ np.linalg.lstsq(design, x, rcond=None)[0]
        expected = ((fit - x.mean(0)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        assert table.loc[T, "share"] == pytest.approx(expected, rel=1e-9)


def test_no_periodic_structure_no_dominant_period():
    acts = torch.from_numpy(np.random.default_rng(1).normal(size=(100, 32)))
    table = N.fourier_power(acts, NUMS, periods=(2, 5, 10, 100))
    assert (table["ratio"] < 2).all() and (table["ratio"] > 0.3).all()  # near chance, each period


def test_fit_helix_recovers_planted_helix():
    clean, acts = planted([10, 5], linear=3.0)
    helix = N.fit_helix(acts, NUMS, periods=(10, 5))
    assert helix.rank == 5 and helix.columns == ("n", "cos 10", "sin 10", "cos 5", "sin 5")
    assert helix.share > 0.98 and helix.share <= helix.pca_share + 1e-12
    assert helix.share / helix.pca_share > 0.99
    error = (helix.reconstruct(NUMS) - clean).pow(2).mean().sqrt()
    assert error < 0.3 * 0.05  # closer to the noiseless helix than the noise (0.05 per entry) puts the data
    wrong = N.fit_helix(acts, NUMS, periods=(7, 3))
    assert wrong.share < 0.5 * helix.share
    # random data: a 5-dim helix stays below its PCA ceiling, which is far from 1
    rnd = N.fit_helix(torch.from_numpy(np.random.default_rng(2).normal(size=(100, 32))), NUMS, periods=(10, 5))
    assert rnd.share < 0.5 * rnd.pca_share < 0.5


def test_fit_helix_drops_vanishing_and_repeated_columns():
    acts = torch.from_numpy(np.random.default_rng(4).normal(size=(20, 8)))
    helix = N.fit_helix(acts, list(range(20)), periods=(2, 10, 10))
    assert helix.columns == ("n", "cos 2", "cos 10", "sin 10")  # sin(πn) = 0; the second T = 10 repeats


@pytest.fixture(scope="module")
def addition(tiny):
    return list(make_prompts(tiny.tokenizer, PromptConfig(operators=("+",), templates=("eq_spaced",),
                                                         n_per_cell=40, operand_range=(1, 9))).items)


def test_number_activations_positions_and_values(tiny):
    acts = N.number_activations(tiny, [3, 7, 12, 45], layers=[0, 1], template="{n} + ")
    assert acts.single_token == (True, True, False, False)  # the tiny tokenizer is per character
    assert acts.acts.shape == (2, 4, tiny.cfg.d_model)
    bos = tiny.tokenizer.bos_token_id
    tokens = torch.tensor([[bos] + tiny.tokenizer("12 + ")["input_ids"]])
    _, cache = tiny.bridge.run_with_cache(tokens)
    # "12" is BOS, "1", "2": the number's last token is position 2
    torch.testing.assert_close(acts.at(1)[2], cache["blocks.1.hook_resid_post"][0, 2].double())
    pre = N.number_activations(tiny, [12], layers=[0], template="{n} + ", site="resid_pre")
    torch.testing.assert_close(pre.acts[0, 0], cache["blocks.0.hook_resid_pre"][0, 2].double())
    with pytest.raises(ValueError, match="exactly once"):
        N.number_activations(tiny, [1], layers=[0], template="no slot")


def test_operand_activations_and_average(tiny, addition):
    acts = N.operand_activations(tiny, addition, layers=[0, 1], operand="b")
    item = addition[5]
    _, cache = tiny.bridge.run_with_cache(torch.tensor([item.clean_tokens]))
    torch.testing.assert_close(acts.at(0)[5], cache["blocks.0.hook_resid_post"][0, item.b_pos].double())
    avg = acts.averaged()
    assert list(avg.numbers) == sorted(set(acts.numbers))
    mask = np.array(acts.numbers) == avg.numbers[0]
    torch.testing.assert_close(avg.acts[:, 0], acts.acts[:, mask].mean(1))


def test_helix_patch_share_plumbing(tiny, addition):
    # operand A is the first token, so its layer-0 vector depends on A alone; its eight values (a + b
    # is one digit) span a 7-dim centred space, which a rank-7 helix fits exactly
    acts = N.operand_activations(tiny, addition, layers=[0], operand="a").averaged()
    assert acts.numbers == tuple(range(1, 9))
    exact = N.fit_helix(acts.at(0), acts.numbers, periods=(3, 4, 5))
    assert exact.rank == 7 and exact.share == pytest.approx(1.0, abs=1e-9)
    row = N.helix_patch_share(tiny, addition, 0, exact, operand="a").iloc[0]
    assert abs(row["clean"] - row["ablated"]) > 1e-3  # the ablation matters, so the share is defined
    assert row["helix_share"] == pytest.approx(1.0, abs=1e-4)
    assert row["pca_share"] == pytest.approx(1.0, abs=1e-4)
    flat = dataclasses.replace(exact, coef=torch.zeros_like(exact.coef))  # reconstructs every number as the mean
    assert N.helix_patch_share(tiny, addition, 0, flat, operand="a").iloc[0]["helix_share"] == pytest.approx(0.0, abs=1e-9)
    # a linear-only helix is neither: it keeps part of the difference
    line = N.fit_helix(acts.at(0), acts.numbers, periods=())
    share = N.helix_patch_share(tiny, addition, 0, line, operand="a").iloc[0]["helix_share"]
    assert abs(share - 1.0) > 1e-3 and abs(share) > 1e-3


def test_operand_patch_identity_is_clean(tiny, addition):
    # layer 0: after the last layer, only END's own residual reaches the logits
    clean = N.operand_patch_logit_diffs(tiny, addition, 0, "b", None)
    same = N.operand_patch_logit_diffs(tiny, addition, 0, "b", lambda act, batch: act)
    zero = N.operand_patch_logit_diffs(tiny, addition, 0, "b", lambda act, batch: torch.zeros_like(act))
    torch.testing.assert_close(same, clean)
    assert not torch.allclose(zero, clean)


def test_helix_coordinates_recover_the_planted_circle():
    """Vectors built on a period-10 circle (plus a linear term and noise): the coordinates along the
    fitted cos/sin directions are cos(2πn/10), sin(2πn/10) up to the noise; an absent period is an error."""
    import numpy as np
    import torch

    from arithlens.analyses import numbers as N

    n = list(range(100))
    rng = np.random.default_rng(3)
    basis, _ = N.helix_basis(n, [10])
    acts = torch.tensor(basis @ rng.normal(size=(3, 32)) + 0.01 * rng.normal(size=(100, 32)))
    helix = N.fit_helix(acts, n, [10])
    coords = N.helix_coordinates(helix, acts, 10)
    angle = 2 * np.pi * np.asarray(n) / 10
    assert np.abs(coords[:, 0] - (np.cos(angle) - np.cos(angle).mean())).max() < 0.05
    assert np.abs(coords[:, 1] - (np.sin(angle) - np.sin(angle).mean())).max() < 0.05
    with pytest.raises(ValueError, match="no cos/sin pair for period 5"):
        N.helix_coordinates(helix, acts, 5)

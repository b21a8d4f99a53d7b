"""Each claim's rule on small hand-made run tables: every verdict it can give, the numbers it cites, and
the same verdict on a page (its own tables, ``record.page_run``) as on the first page (the stored run)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from arithlens import record
from arithlens.claims import intervals, rules, verdicts
from arithlens.claims.verdicts import FAILS, HOLDS, PARTLY, UNTESTABLE


@dataclass
class FakeRun:
    tables: dict[str, pd.DataFrame]
    parameters: dict = field(default_factory=dict)
    key: str = "k"

    def table(self, name: str) -> pd.DataFrame:
        return self.tables[name]


def heads_run(rel: dict[tuple[int, int], float], key: list[tuple[int, int]], roles: list[str] = (),
              knock: tuple[float, float, float] | None = None, n: int = 100, layers: int = 10, per_layer: int = 10,
              recovered: dict[str, float] | None = None, other_roles: list[str] = (), draws: int = 20, seed: int = 0):
    """A chapter-1 run: every head with relative-logit effect ``rel`` (0 if not given), key heads,
    their roles and the roles of other heads in their layers, the few-heads curve (the share the top 5 %
    recover per convention) and END knockout per prompt: each prompt right with probability ``knock`` =
    (none, top, layer-matched random) at k = len(key), over ``draws`` random draws."""
    eff = pd.DataFrame([{"mode": "path", "layer": l, "head": h, "metric": "rel_logit", "mean": rel.get((l, h), 0.0)}
                        for l in range(layers) for h in range(per_layer)])
    keys = pd.DataFrame({"layer": [l for l, _ in key], "head": [h for _, h in key]})
    roles_t = keys.assign(role=list(roles) if roles else ["other"] * len(keys))
    others = pd.DataFrame({"layer": [0] * len(other_roles), "head": range(len(other_roles)), "role": list(other_roles)})
    layer_roles = pd.concat([roles_t.assign(key=True), others.assign(key=False)], ignore_index=True)
    n_heads = layers * per_layer
    curve = pd.DataFrame([{"ranking": m, "n": x, "n_heads": n_heads, "fraction_recovered": f}
                          for m, r in (recovered or {"direct": 0.9, "path": 0.9}).items()
                          for x, f in ((0, 0.0), (n_heads // 20, r), (n_heads // 2, max(r, 0.85)), (n_heads, 1.0))])
    noise = np.random.default_rng(seed + 7)
    items = pd.DataFrame([{"ranking": m, "condition": cond, "prompt": i, "n": n_heads // 20,
                           "logit_diff": {"clean": 2.0, "ablated": 0.0, "kept": 2.0 * r}[cond] + noise.normal(0, 0.05)}
                          for m, r in (recovered or {"direct": 0.9, "path": 0.9}).items()
                          for cond in ("clean", "ablated", "kept") for i in range(40)])
    rows = []
    if knock:
        rng = np.random.default_rng(seed)
        k = len(key)
        for cond, p, ds in (("none", knock[0], [-1]), ("top", knock[1], [-1]), ("layer_matched", knock[2], range(draws))):
            for d in ds:
                rows += [{"condition": cond, "draw": d, "prompt": i, "correct": bool(rng.random() < p), "k": k,
                          "positions": "end"} for i in range(n)]
    return FakeRun({"effects_summary": eff, "key_heads": keys, "head_roles": roles_t, "layer_roles": layer_roles,
                    "few_heads_curve": curve, "few_heads_items": items,
                    "knockout_items": pd.DataFrame(rows, columns=["condition", "draw", "prompt", "correct", "k", "positions"])},
                   {"lead_mode": "path"})


MID = [(4, 1), (4, 2), (5, 3)]  # median layer 4: depth 0.45 of 10 layers, inside the paper's band


def test_c1_few_heads_recover_most_in_both_conventions_in_the_papers_band():
    v = verdicts.claim_c1({"01_heads": heads_run({}, MID)})
    assert v.verdict == HOLDS and "direct: top 5 recover 91% [90%, 91%]" in v.numbers and "median at 0.45" in v.numbers
    assert "(40 evaluation prompts resampled)" in v.numbers
    v = verdicts.claim_c1({"01_heads": heads_run({}, MID, recovered={"direct": 0.5, "path": 0.9})})
    assert v.verdict == PARTLY and "80 % needs 50 (50%)" in v.numbers
    late = [(7, 0), (7, 1), (8, 0)]  # 0.75 of depth: outside 0.375–0.5625
    assert verdicts.claim_c1({"01_heads": heads_run({}, late, recovered={"direct": 0.5, "path": 0.3})}).verdict == FAILS
    assert verdicts.claim_c1({"01_heads": heads_run({}, [])}).verdict == UNTESTABLE
    # shifting every logit changes the paper's relative-logit count but not this rule: it reads only the curve
    shifted = heads_run({(l, h): -0.5 for l in range(10) for h in range(10)}, MID)
    assert verdicts.claim_c1({"01_heads": shifted}) == verdicts.claim_c1({"01_heads": heads_run({}, MID)})


def test_c2_needs_both_kinds_and_more_roles_than_the_other_heads_of_their_layers():
    decide = lambda roles, others: verdicts.claim_c2({"01_heads": heads_run({}, MID, roles, other_roles=others)})
    v = decide(["operand", "operator", "operand"], ["other"] * 20)
    assert v.verdict == HOLDS and "0 of 20 other heads" in v.numbers
    assert decide(["operand", "operator", "operand"], ["operand"] * 10 + ["operator"] * 10).verdict == PARTLY  # no enrichment
    assert decide(["operand", "operand", "other"], ["other"] * 20).verdict == PARTLY  # enriched, one kind
    assert decide(["other"] * 3, ["other"] * 20).verdict == FAILS


def test_c3_pairs_prompts_and_resamples_draws():
    decide = lambda knock, n=100, **kw: verdicts.claim_c3({"01_heads": heads_run({}, MID, knock=knock, n=n, **kw)})
    v = decide((1.0, 0.30, 0.98))
    assert v.verdict == HOLDS and "top-3 28%" in v.numbers and "100 prompts × 20 draws" in v.numbers
    assert decide((1.0, 0.85, 0.90), n=10).verdict == PARTLY or decide((1.0, 0.85, 0.90), n=10, seed=1).verdict == PARTLY
    assert decide((1.0, 0.99, 0.90)).verdict == FAILS
    assert decide((0.0, 0.0, 0.0)).verdict == UNTESTABLE  # the model gets nothing right to begin with
    low, high = intervals.wilson(30, 100)
    assert low == pytest.approx(0.2189, abs=1e-3) and high == pytest.approx(0.3958, abs=1e-3)  # textbook values


def test_knockout_gap_interval_widens_with_the_spread_between_draws():
    """The variance between head sets enters the interval: draws that disagree widen it, equal draws do not."""
    from arithlens.claims.intervals import knockout_gap
    n, rows = 60, []
    for spread in (0.0, 0.45):
        rows = [{"condition": "none", "draw": -1, "prompt": i, "correct": True, "k": 3} for i in range(n)]
        rows += [{"condition": "top", "draw": -1, "prompt": i, "correct": i % 2 == 0, "k": 3} for i in range(n)]
        for d in range(20):
            p = 0.5 + spread * (1 if d % 2 else -1)  # draws alternate between high and low accuracy
            rows += [{"condition": "layer_matched", "draw": d, "prompt": i, "correct": (i / n) < p, "k": 3} for i in range(n)]
        g = knockout_gap(pd.DataFrame(rows))
        if spread == 0.0:
            narrow = g["high"] - g["low"]
            assert g["gap"] == pytest.approx(0.0) and g["rank_p"] == 1.0
        else:
            assert g["high"] - g["low"] > narrow + 0.05


def mlp_run(effects: dict[int, tuple[float, float, float]], layers: int = 10, routed_share: float = 0.5,
            n: int = 40, seed: int = 0):
    """A chapter-2 run: per-layer direct effects (mean, CI) on the digit log-probability, and per prompt a
    joint path effect of −1 (± noise) of which ``routed_share`` passes through layers 7–9 together."""
    rows = [{"mode": "direct", "layer": l, "metric": "d_digit_logprob", "mean": effects.get(l, (0.0, -0.01, 0.01))[0],
             "ci_low": effects.get(l, (0.0, -0.01, 0.01))[1], "ci_high": effects.get(l, (0.0, -0.01, 0.01))[2]}
            for l in range(layers)]
    rng = np.random.default_rng(seed)
    joint = [{"mode": m, "prompt": i, "d_digit_logprob": -1.0 + rng.normal(0, 0.1) if m == "path" else -0.2}
             for m in ("direct", "path") for i in range(n)]
    routed = [{"prompt": i, "layer": l, "d_digit_logprob": (-routed_share / 3 + rng.normal(0, 0.02)) if l >= 7 else 0.0}
              for i in range(n) for l in range(layers)]
    return FakeRun({"mlp_effects": pd.DataFrame(rows), "heads_joint": pd.DataFrame(joint),
                    "heads_to_mlp_items": pd.DataFrame(routed)})


def test_c4_the_largest_mlps_come_after_the_key_heads_and_carry_their_effect():
    heads = heads_run({}, [(4, 1), (5, 2), (5, 3)])  # median key-head layer 5
    late = {7: (-0.3, -0.4, -0.2), 8: (-0.2, -0.3, -0.1), 9: (-0.1, -0.2, -0.05)}
    v = verdicts.claim_c4({"01_heads": heads, "02_mlp": mlp_run(late)})
    assert v.verdict == HOLDS and "they carry 49% [48%, 51%]" in v.numbers and "20% of it direct" in v.numbers
    assert verdicts.claim_c4({"01_heads": heads, "02_mlp": mlp_run(late, routed_share=0.1)}).verdict == PARTLY  # after, not through
    mixed = {1: (-0.3, -0.4, -0.2), 8: (-0.2, -0.3, -0.1), 9: (-0.1, -0.2, -0.05)}
    v = verdicts.claim_c4({"01_heads": heads, "02_mlp": mlp_run(mixed, routed_share=0.1)})
    assert v.verdict == FAILS and "2 of 3 after it" in v.numbers  # neither all after nor a quarter through
    noise = {7: (-0.3, -0.5, 0.1), 8: (-0.2, -0.4, 0.1), 9: (-0.1, -0.3, 0.1)}  # every CI crosses zero
    assert verdicts.claim_c4({"01_heads": heads, "02_mlp": mlp_run(noise)}).verdict == FAILS
    old = FakeRun({"mlp_effects": mlp_run(late).tables["mlp_effects"]})
    assert verdicts.claim_c4({"01_heads": heads, "02_mlp": old}).verdict == UNTESTABLE


def transfer_run(math_key: float, math_random: float, control_key: float, n: int = 200, seed: int = 0,
                 own_means: bool = True):
    """Chapter-3 tables: two math suites and one control, every item right without ablation; under an
    ablation (with the arithmetic mean, and with each suite's own mean) each item stays right with the
    given probability."""
    rng = np.random.default_rng(seed)
    rows, usable = [], []
    for suite, kind, keep in (("power", "math", (math_key, math_random)), ("years", "math", (math_key, math_random)),
                              ("capitals", "control", (control_key, 0.99))):
        usable += [{"suite": suite, "kind": kind, "metric": m, "usable": True} for m in ("correct", "first_correct")]
        for item in range(n):
            conds = [("none", 1.0, -1), ("key", keep[0], -1), ("random", keep[1], 0)]
            if own_means:
                conds += [("key (own mean)", keep[0], -1), ("random (own mean)", keep[1], 0)]
            for cond, p, s in conds:
                hit = bool(rng.random() < p)
                rows.append({"suite": suite, "kind": kind, "item": item, "condition": cond, "seed": s,
                             "correct": hit, "first_correct": hit})
    return FakeRun({"transfer_scores": pd.DataFrame(rows), "usability": pd.DataFrame(usable)})


def test_c5_math_drop_beyond_random_and_selective_against_controls():
    decide = lambda *a, **kw: verdicts.claim_c5({"03_transfer": transfer_run(*a, **kw)})
    v = decide(0.3, 0.95, 0.97)
    assert v.verdict == HOLDS and v.numbers.startswith("math -68") and "selectivity +" in v.numbers
    assert decide(0.3, 0.95, 0.3).verdict == PARTLY  # math drops, but controls drop as much
    assert decide(0.3, 0.95, 0.8).verdict == PARTLY  # controls lose less than math, but more than the 10 % margin
    assert decide(0.95, 0.95, 0.95).verdict == FAILS
    assert decide(0.3, 0.95, 0.97, own_means=False).verdict == UNTESTABLE  # the rule reads each suite's own mean


def test_c5_suites_the_model_never_gets_right_cannot_count():
    run = transfer_run(0.3, 0.95, 0.97)
    scores = run.tables["transfer_scores"]
    run.tables["transfer_scores"] = scores.assign(correct=False, first_correct=False)
    assert verdicts.claim_c5({"03_transfer": run}).verdict == UNTESTABLE


def sft_run(precise: tuple[float, float, float, float, float, float], full: tuple[float, float, float, float, float, float],
            full_loss: tuple[float, float] | None = None):
    cols = ["math change", "math low", "math high", "control change", "control low", "control high"]
    rows = [{"method": "Precise SFT (10 key heads)", **dict(zip(cols, precise))},
            {"method": "full SFT", **dict(zip(cols, full))},
            {"method": "random 10 heads", **dict(zip(cols, precise))}]
    tables = {"math_vs_control": pd.DataFrame(rows)}
    if full_loss:  # (untrained, trained) loss on full SFT's last batches; the slice methods' losses fell
        tables["training"] = pd.DataFrame([{"method": "full SFT", "first loss": 0.01, "last loss": full_loss[1],
                                            "untrained loss": full_loss[0]},
                                           {"method": "Precise SFT (10 key heads)", "first loss": 2.0, "last loss": 1.5,
                                            "untrained loss": 2.0}])
    return FakeRun(tables)


def test_c6_improves_matches_tuned_full_sft_with_less_forgetting_and_keeps_controls_within_the_margin():
    decide = lambda p, f: verdicts.claim_c6({"04_precise_sft": sft_run(p, f)}).verdict
    kept, hurt = (0.0, -0.02, 0.02), (-0.10, -0.15, -0.05)
    assert decide((0.2, 0.15, 0.25) + kept, (0.05, 0.0, 0.1) + hurt) == HOLDS
    assert decide((0.1, 0.05, 0.15) + kept, (0.12, 0.08, 0.16) + hurt) == HOLDS  # matches: its interval reaches full's
    assert decide((0.2, 0.15, 0.25) + hurt, (0.05, 0.0, 0.1) + hurt) == PARTLY  # hurts controls beyond the 5-point margin
    assert decide((0.1, 0.05, 0.12) + kept, (0.3, 0.25, 0.35) + kept) == PARTLY  # improves and keeps; full SFT does better
    assert decide((0.2, 0.15, 0.25) + (-0.03, -0.049, -0.025), (0.05, 0.0, 0.1) + kept) == PARTLY  # more forgetting than full
    assert decide((0.0, -0.05, 0.05) + hurt, (0.2, 0.15, 0.25) + kept) == FAILS  # none of the three


def test_c6_does_not_count_matching_a_full_sft_that_diverged():
    better, kept, hurt = (0.2, 0.15, 0.25), (0.0, -0.02, 0.02), (-0.6, -0.7, -0.5)
    trained = verdicts.claim_c6({"04_precise_sft": sft_run(better + kept, hurt + hurt, full_loss=(2.5, 2.37))})
    assert trained.verdict == HOLDS and "diverged" not in trained.numbers
    diverged = verdicts.claim_c6({"04_precise_sft": sft_run(better + kept, hurt + hurt, full_loss=(0.08, 3.57))})
    assert diverged.verdict == PARTLY  # improves and keeps; *matches* a diverged baseline is not counted
    assert diverged.numbers.endswith("; full SFT diverged at its chosen rate (mean loss on its last batches 0.08 "
                                     "untrained → 3.57 trained): *matches* not counted")


def test_c6_reads_full_sfts_training_over_its_seeds_on_the_same_batches():
    """The last quarter's losses are read against the untrained weights' on those same batches, over the seeds:
    a first batch easier than the last ones is not a divergence (Qwen 0.5B at lr 1e-6: first-step loss 0.09 over
    the seeds, last quarter 0.15, and held-out math +11 points)."""
    better, kept = (0.2, 0.15, 0.25), (0.0, -0.02, 0.02)
    run = sft_run(better + kept, (0.05, 0.0, 0.1) + kept)
    run.tables["training"] = pd.DataFrame({"method": ["full SFT"] * 3, "first loss": [0.08, 0.09, 0.10],
                                           "last loss": [0.16, 0.12, 0.17], "untrained loss": [0.17, 0.13, 0.18]})
    v = verdicts.claim_c6({"04_precise_sft": run})
    assert v.verdict == HOLDS and "diverged" not in v.numbers
    run.tables["training"]["last loss"] = [0.2, 0.1, 0.3]  # one seed below its untrained loss; the mean is above
    assert "mean loss on its last batches 0.16 untrained → 0.20 trained" in verdicts.claim_c6({"04_precise_sft": run}).numbers


def test_r6_places_the_key_heads_among_the_random_draws():
    def r6(key, draws):
        rows = [{"arm": "key", "method": "Precise SFT (10 key heads)", "seed": 0, "math change": key}]
        rows += [{"arm": "random", "method": "random 10 heads", "seed": d, "math change": v} for d, v in enumerate(draws)]
        return verdicts.claim_r6({"04_precise_sft": FakeRun({"random_draws": pd.DataFrame(rows)})})
    draws = [0.01 * i for i in range(10)]  # 0 … 9 points
    v = r6(0.095, draws)  # above every draw, but 10 draws cannot give p ≤ 0.05
    assert v.verdict == PARTLY and "percentile 100, p = 0.091 (the smallest p 10 draws allow is 0.091)" in v.numbers
    assert r6(0.05, draws).verdict == PARTLY  # above the median (0.045)
    assert r6(0.02, draws).verdict == FAILS
    assert r6(0.5, draws[:9]).verdict == UNTESTABLE  # fewer than ten draws
    more = [0.01 * i for i in range(19)]  # 0 … 18 points
    v = r6(0.185, more)
    assert v.verdict == HOLDS and "percentile 100, p = 0.050" in v.numbers and "allow" not in v.numbers
    assert r6(0.175, more).verdict == PARTLY  # above 18 of 19: p = 0.1


def test_missing_runs_make_a_claim_not_testable_and_the_table_is_claims_by_models():
    runs = {"01_heads": heads_run({(5, 2): -0.08}, MID, ["operand", "operator", "other"], (1.0, 0.3, 0.98))}
    table = verdicts.verdict_table({"a": runs, "b": {**runs, "01_heads": None}})
    assert len(table) == 2 * len(rules.CLAIMS) and list(dict.fromkeys(table["model"])) == ["a", "b"]
    b = table[table.model == "b"].set_index("claim")
    assert (b["verdict"] == UNTESTABLE).all() and b.loc["C4", "numbers"] == "no run of 01_heads, 02_mlp"
    wide = verdicts.wide(table)
    assert list(wide.columns) == ["claim", "statement", "a", "b"] and wide.loc[0, "a"].startswith("holds — ")


def robust_run(rel_1: int = 2, null: tuple[float, float, float] = (0.5, 0.07, 0.01), suites: dict | None = None):
    """A chapter-7 run: ``rel_1`` heads pass −1 % in path patching; the knockout null (key drop, null mean,
    p); per-suite null p-values ``{suite: (kind, p)}`` (None: a run made before the suite null)."""
    rules = pd.DataFrame([{"mode": m, "metric": "rel_logit", "threshold": t, "n_heads": n}
                          for m in ("direct", "path") for t, n in ((-0.05, 0), (-0.01, rel_1 if m == "path" else 99))])
    tables = {"threshold_rules": rules,
              "null_test": pd.DataFrame([{"key": null[0], "null_mean": null[1], "null_sd": 0.02, "percentile": 99.0,
                                          "p_value": null[2], "n_sets": 100}])}
    if suites is not None:
        tables["suite_null_test"] = pd.DataFrame([{"suite": s, "kind": k, "p_value": p, "n_sets": 200}
                                                  for s, (k, p) in suites.items()])
    return FakeRun(tables, {"mode": "path"})


def test_r1_few_heads_under_the_looser_threshold_in_chapter_7s_convention():
    ch1 = heads_run({}, MID)  # 100 heads
    r1 = lambda n: verdicts.claim_r1({"01_heads": ch1, "07_robustness": robust_run(rel_1=n)})
    assert r1(2).verdict == HOLDS and r1(2).numbers.startswith("2 heads (2.0%) pass −1 % in path patching; −5 %: 0")
    assert r1(0).verdict == FAILS and r1(6).verdict == FAILS  # none; more than 5 %
    assert r1(5).verdict == HOLDS  # the direct row (99 heads) is not the chapter's convention


def test_r3_places_the_key_drop_in_the_layer_matched_null():
    r3 = lambda null: verdicts.claim_r3({"07_robustness": robust_run(null=null)}).verdict
    assert r3((0.5, 0.07, 0.0099)) == HOLDS
    assert r3((0.1, 0.07, 0.2)) == PARTLY
    assert r3((0.05, 0.07, 0.7)) == FAILS


def test_r5_math_suites_beyond_the_null_and_controls_not():
    r5 = lambda suites: verdicts.claim_r5({"07_robustness": robust_run(suites=suites)})
    math2 = {"multidigit": ("math", 0.01), "years": ("math", 0.02)}
    assert r5({**math2, "capitals": ("control", 0.5)}).verdict == HOLDS
    v = r5({**math2, "capitals": ("control", 0.02)})
    assert v.verdict == PARTLY and "1 of 1 controls (capitals)" in v.numbers
    # Holm across the math suites: 0.04 alone would pass, but not as the larger of two (0.04 × 1 after 0.03 × 2)
    v = r5({"multidigit": ("math", 0.03), "years": ("math", 0.04), "capitals": ("control", 0.5)})
    assert v.verdict == FAILS and "Holm-adjusted p ≤ 0.05 on 0 of 2 math suites" in v.numbers
    # controls are not corrected: a control at p = 0.04 counts against the claim
    assert r5({**math2, "capitals": ("control", 0.04), "antonyms": ("control", 0.5)}).verdict == PARTLY
    assert r5({"multidigit": ("math", 0.01), "years": ("math", 0.3), "capitals": ("control", 0.5)}).verdict == PARTLY
    assert r5({"multidigit": ("math", 0.2), "capitals": ("control", 0.01)}).verdict == FAILS
    assert r5({"multidigit": ("math", 0.01)}).verdict == UNTESTABLE  # no control
    assert r5(None).verdict == UNTESTABLE  # a run made before the suite null


def test_robustness_rows_are_not_testable_without_chapter_7():
    runs = {"01_heads": heads_run({(5, 2): -0.08}, MID, ["operand", "operator", "other"], (1.0, 0.3, 0.98))}
    table = verdicts.verdict_table({"a": runs}).set_index("claim")
    assert table.loc["R3", "numbers"] == "no run of 07_robustness" and table.loc["R3", "verdict"] == UNTESTABLE
    assert set(rules.PAPER_CLAIMS) == {f"C{i}" for i in range(1, 7)}


def _stored(tmp_path, chapter: str, fake: FakeRun):
    """``fake``'s tables saved as a finished run of ``chapter`` and opened again, as chapter 5 opens runs."""
    folder = tmp_path / chapter
    record.save_tables(str(folder), **fake.tables)
    (folder / "manifest.json").write_text(json.dumps({"chapter": chapter, "run_key": "stored", "parameters": fake.parameters}))
    return record.open_run(folder)


def test_a_page_decides_on_the_tables_it_saves_as_the_first_page_does_on_the_stored_run(tmp_path):
    ch1 = heads_run({(5, 2): -0.08, (4, 1): -0.06}, MID, ["operand", "operator", "other"], (1.0, 0.3, 0.98), n=40)
    ch3 = transfer_run(0.3, 0.95, 0.97, n=60)
    stored = {"01_heads": _stored(tmp_path, "01_heads", ch1), "03_transfer": _stored(tmp_path, "03_transfer", ch3)}
    first_page = verdicts.verdict_table({"m": stored}).set_index("claim")
    pages = {"01_heads": record.page_run("01_heads", {"lead_mode": "path"}, **ch1.tables),
             "03_transfer": record.page_run("03_transfer", **ch3.tables)}
    claims = {"01_heads": ["C1", "C2", "C3"], "03_transfer": ["C5"]}
    for chapter, page in pages.items():
        table = verdicts.page_verdicts(claims[chapter], {chapter: page})
        assert list(table.columns) == ["claim", "statement", "verdict", "numbers", "chapter"]
        for row in table.itertuples():
            assert (row.verdict, row.numbers) == tuple(first_page.loc[row.claim, ["verdict", "numbers"]]), row.claim
            assert row.verdict != UNTESTABLE
        text = verdicts.verdict_markdown(table)
        row = table.iloc[0]
        assert f"- **{row.claim} · {row.statement}: {row.verdict}.** {row.numbers}." in text
        assert f"  *Rule (version {rules.rule_version(row.claim)}):* {rules.RULES[row.claim]}" in text
    # a page run hands over the tables as they read back from disk, not the frames it was given
    assert pages["01_heads"].table("key_heads").index.equals(pd.RangeIndex(len(MID)))


def test_a_page_must_hand_a_rule_every_parameter_it_reads():
    ch1 = heads_run({(5, 2): -0.08}, MID)
    with pytest.raises(KeyError, match="did not hand the rule its parameter 'lead_mode'"):
        verdicts.relative_logit_effects(record.page_run("01_heads", **ch1.tables))
    page = record.page_run("04_precise_sft", **sft_run((0.2, 0.15, 0.25, 0.0, -0.02, 0.02),
                                                     (0.05, 0.0, 0.1, -0.1, -0.15, -0.05)).tables)
    assert verdicts.table_or_none(page, "training") is None  # a table the page does not save reads as absent
    assert verdicts.page_verdicts(["C6"], {"04_precise_sft": page}).loc[0, "verdict"] == HOLDS


def test_every_rule_change_is_listed_with_its_version():
    table = rules.rule_history_table()
    assert set(table["claim"]) <= set(rules.CLAIMS) and table["date"].str.match(r"\d{4}-\d{2}-\d{2}$").all()
    for claim, part in table.groupby("claim"):
        assert part["version"].tolist() == list(range(2, len(part) + 2))
        assert rules.rule_version(claim) == len(part) + 1
    assert rules.rule_version("R3") == 1  # never changed

"""Chapter notebooks run end to end on the tiny model with small parameters.

Tests that only read a chapter's results share the session's run store (``shared_runs``): every test
gives a chapter the same tiny parameters, so each run is made once per suite. A test that needs its
store empty (an upstream run must be missing, nothing may be written, a run fails) keeps its own."""

import json
from pathlib import Path

import pytest

from arithlens.runner.chapters import RunError
from arithlens.runner.runs import run_chapter

#: Chapter 1's tiny parameters, for every test that reads chapter 1 (so they share one run per suite).
#: Two key heads: the tiny model has 4 heads a layer, and chapter 7's layer-matched null needs as many
#: other heads in the key heads' layers.
HEADS_TINY = ["n_per_cell=2", "filter_correct=false", "templates=[eq_spaced, st_is]", "n_total_prompts=3",
              "n_boot=50", "knockout_seeds=2", "top_k=2", "knockout_k_max=3", "all_positions_k=[2]", "min_correct=1"]


def _markdown_outputs(run):
    nb = json.loads(run.notebook.read_text())
    return "\n".join("".join(o.get("data", {}).get("text/markdown", "")) for c in nb["cells"] if c["cell_type"] == "code"
                     for o in c.get("outputs", []))


@pytest.mark.slow
def test_heads_chapter_end_to_end(shared_runs):
    run = run_chapter("01_heads", "tiny", HEADS_TINY, log=lambda m: None)
    tables = set(run.manifest["tables"])
    assert {"effects_summary.parquet", "key_heads.parquet", "knockout.parquet", "head_roles.parquet",
            "knockout_items.parquet", "layer_roles.parquet", "few_heads_curve.parquet"} <= tables
    summary = run.table("effects_summary")
    assert set(summary["mode"]) == {"direct", "path", "total"}
    assert set(summary["metric"]) == {"rel_logit", "d_prob", "d_logit_diff", "d_digit_logprob"}
    # localization and evaluation use different facts
    scores = run.table("prompt_scores")
    halves = {h: set(zip(p["operator"], p["a"], p["b"])) for h, p in scores.groupby("facts")}
    assert set(halves) == {"localization", "evaluation"} and not halves["localization"] & halves["evaluation"]
    items = run.table("knockout_items")
    assert set(items["condition"]) == {"none", "top", "layer_matched"} and items["draw"].max() == 19
    assert set(run.table("few_heads_curve")["ranking"]) == {"direct", "path"}
    cf = run.table("counterfactual_heads")  # every head in a top set, and the sets it is in
    assert {"null", "swap", "operand", "found by"} <= set(cf.columns) and cf["null"].sum() == 2
    assert len(summary[(summary["mode"] == "path") & (summary["metric"] == "d_digit_logprob")]) == 2 * 4  # every head
    knock = run.table("knockout")
    assert set(knock["positions"]) == {"end", "all"} and len(run.table("key_heads")) == 2  # top_k


@pytest.mark.slow
def test_threshold_no_head_passes_still_renders(shared_runs):
    params = HEADS_TINY + ["selection=threshold", "threshold=-0.99", "lead_metric=rel_logit"]
    run = run_chapter("01_heads", "tiny", params, log=lambda m: None)
    text = _markdown_outputs(run)
    assert "No key heads were selected" in text and "no head passes" in text
    assert len(run.table("key_heads")) == 0


@pytest.mark.slow
def test_k_larger_than_heads_is_a_clear_error(isolated_runs):  # its own store: a failing run
    with pytest.raises(RunError, match="k=9 is larger than the number of heads \\(8\\)"):
        run_chapter("01_heads", "tiny", [p for p in HEADS_TINY if not p.startswith("top_k")] + ["top_k=9"],
                    log=lambda m: None)


MLP_TINY = ["n_boot=50", "lens_cases=[[4, '+', 3]]"]  # its prompts are chapter 1's


HEADS_AS_INPUT = [f"01_heads.{p}" for p in HEADS_TINY]


@pytest.mark.slow
def test_mlp_chapter_runs_chapter1_first_and_reads_its_key_heads(isolated_runs):  # its own store: no chapter 1 yet
    logged = []
    run = run_chapter("02_mlp", "tiny", MLP_TINY + HEADS_AS_INPUT, log=logged.append)
    first = run_chapter("01_heads", "tiny", HEADS_TINY, log=lambda m: None)
    assert first.reused and "02_mlp needs 01_heads: running it first" in logged
    assert run.manifest["inputs"] == {"01_heads": {"run_key": first.key, "path": str(first.path)}}
    assert f"from chapter 1's run `{first.path.name}`" in _markdown_outputs(run)
    scored = first.table("prompt_scores")  # chapter 2 traces chapter 1's localization prompts, scored there once
    n1 = int((scored["facts"] == "localization").sum())
    assert f"{n1} correct prompts of {n1} (" in _markdown_outputs(run)  # chapter 1's tiny run keeps all (no filter)
    assert {"mlp_effects.parquet", "heads_to_mlp.parquet", "cosines.parquet", "logit_lens_cases.parquet"} <= set(run.manifest["tables"])
    lens = run.table("logit_lens_cases")
    assert set(lens["label"]) >= {"A", "B", "answer"} and lens["layer"].max() == 1


def test_missing_input_with_no_upstream_is_one_line(isolated_runs):  # its own store: nothing may be written
    with pytest.raises(RunError, match=r"^02_mlp needs a finished run of 01_heads on tiny \(key [0-9a-f]{12}\): run `arithlens run 01_heads --model tiny") as err:
        run_chapter("02_mlp", "tiny", MLP_TINY + HEADS_AS_INPUT, log=lambda m: None, upstream=False)
    assert "\n" not in str(err.value)
    assert not list(isolated_runs.rglob("manifest.json"))  # refused before anything ran


TRANSFER_TINY = ["n_items=6", "suite_names=[power, multidigit, years, capitals]", "benchmarks=[svamp]", "n_benchmark=4",
                 "n_random_seeds=2", "margin=-1.0",
                 "min_correct=0", "localize_top_k=3", "mean_per_cell=1", "n_boot=20", "localize_correct_only=false"]


@pytest.mark.slow
def test_transfer_chapter_end_to_end(shared_runs):
    run = run_chapter("03_transfer", "tiny", TRANSFER_TINY + HEADS_AS_INPUT, log=lambda m: None)
    heads = run_chapter("01_heads", "tiny", HEADS_TINY, log=lambda m: None)
    assert heads.reused and f"from chapter 1's run `{heads.key}`" in _markdown_outputs(run)
    scores = run.table("transfer_scores")
    assert set(scores["condition"]) == {"none", "key", "random", "key (own mean)", "random (own mean)", "key (resample)",
                                        "random (resample)"}
    check = run.table("resample_check")  # the same contrast as C5's, read from the resampled conditions
    assert (len(check) > 0) == ("**Check: resample ablation.**" in _markdown_outputs(run))
    assert set(scores["suite"]) == {"power", "multidigit", "years", "capitals", "svamp"}
    assert set(scores[scores.suite == "svamp"]["condition"]) == set(scores["condition"])  # the public file is knocked out too
    overlap = run.table("overlap")
    assert set(overlap["a"]) == {"arithmetic (ch. 1)", "power", "multidigit"}  # suites with a counterfactual
    assert len(run.table("attention")) == 2 * 3


MLP_AS_INPUT = [f"02_mlp.{p}" for p in MLP_TINY]
SFT_TINY = ["max_eval_per_set=12", "key_heads_top_k=2", "steps=2", "batch_size=8", "training_seeds=2", "random_draws=10",
            "all_layer_draws=1", "lr_grid=[0.001, 0.01]", "full_lr_grid=[0.001, 0.01]", "lora_lr_grid=[0.01]", "head_counts=[1]", "mlp_counts=[1]",
            "suites=[power, capitals]", "n_suite=4", "n_control=4", "n_boot=20"]


@pytest.mark.slow
def test_precise_sft_chapter_end_to_end(shared_runs):
    run = run_chapter("04_precise_sft", "tiny", SFT_TINY + HEADS_AS_INPUT + MLP_AS_INPUT, log=lambda m: None)
    assert set(run.manifest["inputs"]) == {"01_heads", "02_mlp"}
    tables = set(run.manifest["tables"])
    assert {"scores.parquet", "comparison.parquet", "math_vs_control.parquet", "training.parquet", "random_draws.parquet",
            "lr_selection.parquet"} <= tables
    selection = run.table("lr_selection")  # one row per family and rate, one chosen per family
    assert set(selection["family"]) == {"full SFT", "Precise SFT", "random heads", "LoRA"}
    assert selection.groupby("family")["chosen"].sum().eq(1).all()
    chosen = selection[selection["chosen"]].set_index("family")["lr"]
    from arithlens.analyses.sft.comparison import EDGE_TRIES, at_edge
    for family, side in at_edge(selection).items():  # a best rate left at an edge went EDGE_TRIES rates past the grid
        lrs = selection[selection.family == family]["lr"]
        grid = [0.01] if family == "LoRA" else [0.001, 0.01]
        assert ((lrs < min(grid)) if side == "low" else (lrs > max(grid))).sum() == EDGE_TRIES, family
    convergence = run.table("convergence")  # each family's chosen run trained on to twice the steps
    assert set(convergence["family"]) == set(chosen.index) and (convergence.set_index("family")["lr"] == chosen).all()
    assert convergence["converged"].dtype == bool and convergence["gain low"].le(convergence["gain high"]).all()
    arms = run.manifest["timings"]["arms_s"]  # the time split by arm
    assert set(chosen.index) <= set(arms)  # seconds, rounded: a tiny run's stage may round to 0.0
    assert all({"rate selection", "training", "evaluation"} <= set(arms[f]) and min(arms[f].values()) >= 0
               for f in chosen.index)
    training = run.table("training")
    assert (training[training["method"] == "full SFT"]["lr"] == chosen["full SFT"]).all()
    assert training[training["method"] == "full SFT"]["seed"].nunique() == 2  # training seeds
    draws = run.table("random_draws")
    assert (draws["arm"] == "random").sum() == 10 and (draws["arm"] == "key").sum() == 1
    methods = set(run.table("training")["method"])
    assert {"full SFT", "LoRA"} & {m.split(" r=")[0] for m in methods} and any(m.startswith("random") for m in methods)
    from arithlens.core.deltas import load_delta
    for folder, method in (("delta", "precise"), ("delta_random", "precise"), ("delta_lora", "lora"), ("delta_full", "full")):
        delta = load_delta(Path(run.path) / folder)  # chapter 6 reads the first three, chapter 8 all four
        assert delta.values and delta.meta.get("method") == method, folder
    assert load_delta(Path(run.path) / "delta_random").meta["method_name"].startswith("random")
    assert "table1.parquet" not in tables  # the paper's Table 1 is chapter 8's


BENCH_TINY = ["benchmarks=[gsm8k, svamp, mmlu]", "n_benchmark=3", "n_cot=2", "n_boot=20"]


@pytest.mark.slow
def test_table1_chapter_asks_the_public_benchmarks_of_chapter_4s_kept_rows(shared_runs):
    sft = run_chapter("04_precise_sft", "tiny", SFT_TINY + HEADS_AS_INPUT + MLP_AS_INPUT, log=lambda m: None)
    run = run_chapter("08_benchmarks", "tiny", BENCH_TINY + SFT_AS_INPUT + [f"01_heads.{p}" for p in HEADS_TINY]
                      + [f"02_mlp.{p}" for p in MLP_TINY], log=lambda m: None)
    assert run.manifest["inputs"]["04_precise_sft"]["run_key"] == sft.key
    table1 = run.table("table1")  # the paper's Table 1: the base model and the first row of each tuned family
    assert set(table1["set"]) == {"gsm8k", "svamp", "mmlu"} and table1.groupby("set")["method"].nunique().eq(5).all()
    assert table1[table1.set == "gsm8k"]["n"].eq(2).all() and table1[table1.set == "mmlu"]["n"].eq(3).all()
    training = sft.table("training")
    first = training[training.group == "main"].drop_duplicates("method")  # full SFT, Precise SFT, random draw 0, LoRA
    expected = ["base"] + [m for m in first["method"] if m.startswith(("full", "Precise", "random", "LoRA"))
                           and "all layers" not in m]
    assert list(run.table("rows")["row"]) == expected[1:] and set(table1["method"]) == set(expected)
    chains = run.table("table1_scores")
    assert set(chains[chains.set == "gsm8k"]["mode"]) == {"cot"} and set(chains[chains.set == "mmlu"]["mode"]) == {"choice"}
    # the same row asked again by hand: the delta chapter 4 kept gives the scores this chapter stored
    from arithlens.claims.findings import tuned_deltas
    from arithlens.core.models import load_model
    from arithlens.tasks.benchmarks import shipped
    lm = load_model("tiny")
    name, delta = next(iter(tuned_deltas(sft, with_full=True).items()))
    assert name == "full SFT"
    svamp = shipped.load_shipped("svamp", lm.tokenizer, n=3, seed=0)
    again, _ = shipped.ask(lm, delta, [svamp])
    stored = chains[(chains.method == name) & (chains.set == "svamp")]
    assert list(again["correct"]) == list(stored["correct"]) and list(again["prediction"]) == list(stored["prediction"])


BENCH = "tests/data/benchmarks"


@pytest.mark.slow
def test_transfer_and_sft_chapters_take_benchmark_files(shared_runs):
    files = f"benchmark_files=[{BENCH}/gsm8k_style.jsonl, {BENCH}/mmlu_style.csv]"
    run = run_chapter("03_transfer", "tiny", TRANSFER_TINY + HEADS_AS_INPUT + [files], log=lambda m: None)
    scores = run.table("transfer_scores")
    assert {"gsm8k_style", "mmlu_style"} <= set(scores["suite"])
    assert {"none", "key", "random"} <= set(scores[scores.suite == "gsm8k_style"]["condition"])
    assert set(run.table("usability")["suite"]) >= {"gsm8k_style", "mmlu_style"}
    sft = run_chapter("04_precise_sft", "tiny", SFT_TINY + HEADS_AS_INPUT + MLP_AS_INPUT +
                      [f"benchmark_files=[{BENCH}/mmlu_style.jsonl]", f"train_file={BENCH}/generic.jsonl"], log=lambda m: None)
    assert "mmlu_style" in set(sft.table("scores")["set"])


NUMBERS_TINY = ["n_per_cell=3", "filter_correct=false", "min_correct=1", "number_range=[0, 20]", "keep_percents=[10, 50]",
                "top_percent=10", "n_random_seeds=2"]
SFT_AS_INPUT = [f"04_precise_sft.{p}" for p in SFT_TINY]


@pytest.mark.slow
def test_numbers_chapter_reads_chapters_1_2_and_4_and_saves_its_tables(shared_runs):
    run = run_chapter("06_numbers", "tiny", NUMBERS_TINY + HEADS_AS_INPUT + MLP_AS_INPUT + SFT_AS_INPUT, log=lambda m: None)
    assert set(run.manifest["inputs"]) == {"01_heads", "02_mlp", "04_precise_sft"}
    assert {"fourier.parquet", "helix.parquet", "helix_causal.parquet", "heuristics.parquet", "keep_top_k.parquet",
            "tuning_change.parquet"} <= set(run.manifest["tables"])
    power = run.table("fourier")
    assert set(power["period"]) == {2.0, 5.0, 10.0, 100.0} and (power["share"].between(0, 1)).all()
    keep = run.table("keep_top_k")
    assert set(keep["condition"]) == {"clean", "top", "random"} and set(keep[keep.condition == "top"]["percent"]) == {10.0, 50.0}
    moved = run.table("tuning_change")
    assert set(moved["group"]) == {"top", "rest"} and moved["method"].str.startswith("Precise SFT").any()
    assert moved["method"].nunique() == 3  # Precise SFT, the first random-head draw and LoRA, from chapter 4's deltas
    pairs = run.table("tuning_pairs")
    assert len(pairs) == 3 and pairs["ρ |change|"].between(-1, 1).all()


ROBUST_TINY = ["n_per_cell=2", "filter_correct=false", "min_correct=1", "templates=[eq_spaced, st_is]", "ig_steps=3",
               "curve_points=[0, 1, 2, 4]", "n_null_sets=5", "n_random_ablation=2", "n_boot=50",
               "n_suite_null_sets=3"]
TRANSFER_AS_INPUT = [f"03_transfer.{p}" for p in TRANSFER_TINY]


@pytest.mark.slow
def test_robustness_chapter_reads_chapters_1_and_3_and_saves_its_tables(shared_runs):
    # chapter 1's two key heads (HEADS_TINY): the layer-matched null needs as many other heads in their layers
    run = run_chapter("07_robustness", "tiny", ROBUST_TINY + HEADS_AS_INPUT + TRANSFER_AS_INPUT, log=lambda m: None)
    assert set(run.manifest["inputs"]) == {"01_heads", "03_transfer"}
    agree = run.table("agreement")
    assert set(agree["method"]) == {"attribution", "eap_ig"} and set(agree["measure"]) == {"spearman", "jaccard", "screen"}
    n_heads = 2 * 4  # the tiny model's heads
    assert agree.query("measure == 'screen'")["value"].between(agree.query("measure == 'screen'")["k"], n_heads).all()
    assert "to be sure of the exact top" in run.notebook.read_text()  # the page states the screen size
    curve = run.table("faithfulness")
    assert set(curve["ranking"]) == {"exact", "attribution", "eap_ig", "random"}
    assert curve[curve.n == 0]["fraction_recovered"].abs().max() < 1e-9 and (curve[curve.n == 8]["fraction_recovered"] - 1).abs().max() < 1e-9
    null = run.table("null_distribution")
    assert (null["set"] == "random").sum() == 5 and (null["set"] == "key").sum() == 1
    assert set(run.table("ablations")["ablation"]) == {"mean", "zero", "resample"}
    suite_null, suite_tests = run.table("suite_null"), run.table("suite_null_test")
    # margin −1: every suite usable, the shipped SVAMP among them (rebuilt from chapter 3's parameters)
    assert set(suite_tests["suite"]) == {"power", "multidigit", "years", "capitals", "svamp"}
    assert (suite_null.groupby("suite")["set"].apply(lambda s: (s == "random").sum()) == 3).all()
    from arithlens.record import open_run
    ch3 = open_run(run.manifest["inputs"]["03_transfer"]["path"]).table("transfer_scores")
    for r in suite_tests.itertuples():  # the key heads' accuracy on each suite is chapter 3's
        key = suite_null[(suite_null.suite == r.suite) & (suite_null.set == "key")]["accuracy"].iloc[0]
        column = "first_correct" if r.kind == "math" else "correct"
        assert key == pytest.approx(ch3[(ch3.suite == r.suite) & (ch3.condition == "key")][column].mean())
    assert "method_seconds" in run.manifest["notebook_info"]  # timings go to the manifest, not the tables

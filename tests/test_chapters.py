"""Chapter notebooks run end to end on the tiny model with small parameters."""

import json

import pytest

from arithlens.runs import RunError, run_chapter

HEADS_TINY = ["n_per_cell=2", "filter_correct=false", "templates=[eq_spaced, st_is]", "n_total_prompts=3",
              "n_boot=50", "knockout_seeds=2", "top_k=3", "knockout_k_max=3", "all_positions_k=[2]", "min_correct=1"]


def _markdown_outputs(run):
    nb = json.loads(run.notebook.read_text())
    return "\n".join("".join(o.get("data", {}).get("text/markdown", "")) for c in nb["cells"] if c["cell_type"] == "code"
                     for o in c.get("outputs", []))


@pytest.mark.slow
def test_heads_chapter_end_to_end(isolated_runs):
    run = run_chapter("01_heads", "tiny", HEADS_TINY, log=lambda m: None)
    tables = set(run.manifest["tables"])
    assert {"effects_summary.parquet", "key_heads.parquet", "knockout.parquet", "head_roles.parquet"} <= tables
    summary = run.table("effects_summary")
    assert set(summary["mode"]) == {"direct", "path", "total"}
    assert set(summary["metric"]) == {"rel_logit", "d_prob", "d_logit_diff"}
    assert len(summary[(summary["mode"] == "path") & (summary["metric"] == "d_prob")]) == 2 * 4  # every head
    knock = run.table("knockout")
    assert set(knock["positions"]) == {"end", "all"} and len(run.table("key_heads")) == 3


@pytest.mark.slow
def test_threshold_no_head_passes_still_renders(isolated_runs):
    params = HEADS_TINY + ["selection=threshold", "threshold=-0.99", "lead_metric=rel_logit"]
    run = run_chapter("01_heads", "tiny", params, log=lambda m: None)
    text = _markdown_outputs(run)
    assert "No key heads were selected" in text and "no head passes" in text
    assert len(run.table("key_heads")) == 0


@pytest.mark.slow
def test_k_larger_than_heads_is_a_clear_error(isolated_runs):
    with pytest.raises(RunError, match="k=9 is larger than the number of heads \\(8\\)"):
        run_chapter("01_heads", "tiny", [p for p in HEADS_TINY if not p.startswith("top_k")] + ["top_k=9"],
                    log=lambda m: None)


MLP_TINY = ["n_per_cell=2", "filter_correct=false", "templates=[eq_spaced, st_is]", "n_boot=50", "key_heads_top_k=3",
            "min_correct=1", "lens_cases=[[4, '+', 3]]"]


@pytest.mark.slow
def test_mlp_chapter_computes_key_heads_without_chapter1(isolated_runs):
    run = run_chapter("02_mlp", "tiny", MLP_TINY, log=lambda m: None)
    assert "computed here (no chapter-1 run of this model)" in _markdown_outputs(run)
    assert {"mlp_effects.parquet", "heads_to_mlp.parquet", "cosines.parquet", "logit_lens_cases.parquet"} <= set(run.manifest["tables"])
    lens = run.table("logit_lens_cases")
    assert set(lens["label"]) >= {"A", "B", "answer"} and lens["layer"].max() == 1


@pytest.mark.slow
def test_mlp_chapter_reads_key_heads_from_chapter1(isolated_runs):
    first = run_chapter("01_heads", "tiny", HEADS_TINY, log=lambda m: None)
    run = run_chapter("02_mlp", "tiny", MLP_TINY, log=lambda m: None)
    assert f"from chapter 1's run `{first.path.name}`" in _markdown_outputs(run)


TRANSFER_TINY = ["n_items=6", "suite_names=[power, multidigit, years, capitals]", "n_random_seeds=2", "margin=-1.0",
                 "min_correct=0", "key_heads_top_k=3", "localize_top_k=3", "mean_per_cell=1", "n_boot=20",
                 "filter_correct=false", "localize_correct_only=false"]


@pytest.mark.slow
def test_transfer_chapter_end_to_end(isolated_runs):
    run = run_chapter("03_transfer", "tiny", TRANSFER_TINY, log=lambda m: None)
    assert "no chapter-1 run of this model, so computed here" in _markdown_outputs(run)
    scores = run.table("transfer_scores")
    assert set(scores["condition"]) == {"none", "key", "random", "key (own mean)", "random (own mean)"} and set(scores["suite"]) == {"power", "multidigit", "years", "capitals"}
    overlap = run.table("overlap")
    assert set(overlap["a"]) == {"arithmetic (ch. 1)", "power", "multidigit"}  # suites with a counterfactual
    assert len(run.table("attention")) == 2 * 3


SFT_TINY = ["max_eval_per_set=12", "key_heads_top_k=2", "steps=2", "batch_size=8", "random_seeds=1", "head_counts=[1]",
            "mlp_counts=[1]", "suites=[power, capitals]", "n_suite=4", "n_boot=20"]


@pytest.mark.slow
def test_precise_sft_chapter_end_to_end(isolated_runs):
    run_chapter("01_heads", "tiny", HEADS_TINY, log=lambda m: None)  # key heads (the tiny model gets no prompt right)
    run = run_chapter("04_precise_sft", "tiny", SFT_TINY, log=lambda m: None)
    tables = set(run.manifest["tables"])
    assert {"scores.parquet", "comparison.parquet", "math_vs_control.parquet", "training.parquet"} <= tables
    methods = set(run.table("training")["method"])
    assert {"full SFT", "LoRA"} & {m.split(" r=")[0] for m in methods} and any(m.startswith("random") for m in methods)

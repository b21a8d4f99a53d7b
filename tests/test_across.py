"""Books of several models: per-model parameters, the across-models chapter's inputs (one run per chapter
and model), model chains run side by side, the generated table of contents and first-page verdicts,
and `arithlens compare`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from arithlens import paths
from arithlens.runner import book, chapters, schedule
from arithlens.claims import rules, verdicts
from arithlens.runner.book import check_consistent
from arithlens.cli import main
from arithlens.record import RunResult
from arithlens.runner.chapters import RunError
from arithlens.runner.runs import gather_overrides, plan_run

from test_chapters import BENCH_TINY, NUMBERS_TINY, ROBUST_TINY
from test_graph import BOOK, _tiny_given

ACROSS = "05_across_models"
BEYOND = ["06_numbers", "07_robustness", "08_benchmarks"]
INPUTS = BOOK + BEYOND  # what the comparison reads of each model
#: the tiny parameters of chapters 6 and 7 (test_chapters' own: the runs are shared)
TINY_BEYOND = ([f"06_numbers.{p}" for p in NUMBERS_TINY] + [f"07_robustness.{p}" for p in ROBUST_TINY]
               + [f"08_benchmarks.{p}" for p in BENCH_TINY])
TWO = ["tiny", "tiny:1"]  # two tiny models: the same architecture, different initialisation seeds


def test_a_parameter_can_be_given_for_one_model(tmp_path):
    given = gather_overrides(["tiny:1@01_heads.n_per_cell=2", "01_heads.top_k=4"])
    assert plan_run("01_heads", "tiny:1", given).params["n_per_cell"] == 2
    assert plan_run("01_heads", "tiny", given).params["n_per_cell"] == chapters.notebook_parameters("01_heads")["n_per_cell"]
    assert plan_run("01_heads", "tiny", given).params["top_k"] == plan_run("01_heads", "tiny:1", given).params["top_k"] == 4
    f = tmp_path / "p.yaml"
    f.write_text("01_heads: {top_k: 4}\nmodels:\n  'tiny:1':\n    01_heads: {n_per_cell: 2}\n")
    assert gather_overrides(None, str(f)) == {"01_heads": {"top_k": 4}, "tiny:1@01_heads": {"n_per_cell": 2}}
    with pytest.raises(RunError, match="MODEL@CHAPTER.key=value"):
        gather_overrides(["tiny@top_k=3"])


def test_the_across_chapter_takes_every_chapter_of_every_model_as_inputs():
    given = _tiny_given([f"{ACROSS}.models=[tiny, 'tiny:1']"])
    plan = plan_run(ACROSS, "tiny", given)
    assert plan.params["models"] == TWO
    assert [(p.model, p.chapter) for p in plan.inputs] == [(m, c) for m in TWO for c in INPUTS]
    upstream = plan.upstream()
    assert list(upstream) == TWO and list(upstream["tiny:1"]) == INPUTS
    names = {plan.input_name(p) for p in plan.inputs}
    assert "01_heads" in names and "tiny:1/01_heads" in names
    # one model's upstream parameter re-keys the comparison; the other model's runs stay the same
    other = plan_run(ACROSS, "tiny", _tiny_given([f"{ACROSS}.models=[tiny, 'tiny:1']", "tiny:1@01_heads.top_k=3"]))
    assert other.key != plan.key
    assert {p.key for p in other.inputs if p.model == "tiny"} == {p.key for p in plan.inputs if p.model == "tiny"}
    # a model may skip chapters: the comparison takes the rest of its runs
    skip = f"{ACROSS}.skip_chapters={{'tiny:1': [02_mlp, 04_precise_sft, 06_numbers, 07_robustness, 08_benchmarks]}}"
    partial = plan_run(ACROSS, "tiny", _tiny_given([f"{ACROSS}.models=[tiny, 'tiny:1']", skip]))
    assert [p.chapter for p in partial.inputs if p.model == "tiny:1"] == ["00_task", "01_heads", "03_transfer"]
    chains, _ = schedule.model_chains(schedule.plan_models(INPUTS + [ACROSS], TWO, _tiny_given([skip])))
    assert [p.chapter for p in chains[1]] == ["00_task", "01_heads", "03_transfer"]
    with pytest.raises(RunError, match="names 09_x, not among its inputs"):
        plan_run(ACROSS, "tiny", _tiny_given([f"{ACROSS}.models=[tiny, 'tiny:1']",
                                              f"{ACROSS}.skip_chapters={{'tiny:1': [09_x]}}"]))
    # on its own model only, it is the degenerate one-model comparison
    assert plan_run(ACROSS, "tiny", _tiny_given()).params["models"] == ["tiny"]


def test_models_are_planned_as_chains_with_the_comparison_last():
    plans = schedule.plan_models(INPUTS + [ACROSS], TWO, _tiny_given())
    assert [(p.model, p.chapter) for p in plans] == [(m, c) for m in TWO for c in INPUTS] + [("tiny", ACROSS)]
    chains, last = schedule.model_chains(plans)
    assert [[p.chapter for p in c] for c in chains] == [INPUTS, INPUTS] and [p.chapter for p in last] == [ACROSS]
    assert last[0].params["models"] == TWO


def _fake(chapter: str, key: str, model: str = "tiny", inputs: dict[str, str] | None = None) -> RunResult:
    return RunResult(Path("/nowhere") / model / key, {"chapter": chapter, "run_key": key, "model": model,
                     "inputs": {c: {"run_key": k, "path": ""} for c, k in (inputs or {}).items()}})


def test_a_book_of_several_models_never_shows_a_comparison_of_other_runs():
    shown = [_fake("01_heads", "a"), _fake("01_heads", "b", "tiny:1")]
    check_consistent(shown + [_fake(ACROSS, "c", inputs={"01_heads": "a", "tiny:1/01_heads": "b"})])
    with pytest.raises(RunError, match="computed from tiny:1/01_heads run x, but the book shows 01_heads run b"):
        check_consistent(shown + [_fake(ACROSS, "c", inputs={"01_heads": "a", "tiny:1/01_heads": "x"})])
    with pytest.raises(RunError, match="two runs of 01_heads on tiny:1"):
        check_consistent(shown + [_fake("01_heads", "d", "tiny:1")])


def test_the_table_of_contents_gets_a_part_per_further_model(tmp_path, monkeypatch):
    shutil.copy(paths.project_root() / "book" / "_toc.yml", tmp_path / "_toc.yml")
    monkeypatch.setenv("ARITHLENS_BOOK_DIR", str(tmp_path))
    shown = [_fake(c, c, m) for m in TWO for c in INPUTS] + [_fake(ACROSS, "x")]
    toc = book.yaml.safe_load(book.book_toc(shown, "tiny").read_text())
    captions = [p["caption"] for p in toc["parts"]]
    assert captions[:4] == ["Chapters", "Beyond the paper", "Chapters on tiny:1", "Exercises"]
    # in the table of contents' order: chapter 8 (the paper's Table 1) right after chapter 4
    assert [e["file"] for e in toc["parts"][2]["chapters"]] == [f"models/tiny_1/{c}" for c in
                                                                ["00_task", "01_heads", "02_mlp", "03_transfer",
                                                                 "04_precise_sft", "08_benchmarks", "06_numbers", "07_robustness"]]
    assert {"file": f"chapters/{ACROSS}"} in toc["parts"][0]["chapters"]
    assert book.page("tiny:1", "01_heads", "tiny") == "models/tiny_1/01_heads"


def test_bad_model_lists_are_one_line_errors(isolated_runs, capsys):
    assert main(["book", "--models", " , "]) == 2
    assert main(["compare", "--models", "tiny,tiny"]) == 2
    assert main(["compare"]) == 2  # an empty store
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("arithlens: error: ") for line in err)
    assert "names a model twice" in err[1] and "no finished run" in err[2]


@pytest.mark.slow
def test_the_across_chapter_compares_two_tiny_models_and_the_book_opens_with_its_verdicts(shared_runs, tmp_path,
                                                                                          monkeypatch, capsys):
    # a model may skip chapters (chapters 6 and 8 read chapter 4's deltas, so they go too)
    given = _tiny_given([f"{ACROSS}.skip_chapters={{'tiny:1': [04_precise_sft, 06_numbers, 08_benchmarks]}}"] + TINY_BEYOND)
    plans = schedule.plan_models(INPUTS + [ACROSS], TWO, given)
    results = schedule.execute_plans(plans, jobs=2, log=lambda m: None)  # runs side by side as the graph allows
    across = results[("tiny", ACROSS)]
    table = across.table("verdicts")
    assert list(dict.fromkeys(table["model"])) == TWO and len(table) == 2 * len(rules.CLAIMS)
    harder = table[table.claim.isin(["R1", "R3", "R5"])]  # chapter 7's harder tests, from each model's run
    assert len(harder) == 6 and set(harder["chapter"]) == {"07_robustness"} and harder["run_key"].notna().all()
    assert list(across.table("robustness")["model"]) == TWO and list(across.table("numbers")["model"]) == ["tiny"]
    robust = across.table("robustness")  # what a screen by EAP-IG would cut, and each sweep's cost in forward pairs
    assert (robust["exact ÷ two forwards"] > 0).all() and (robust["EAP-IG ÷ two forwards"] > 0).all()
    screened = robust["EAP-IG top N holding exact's top 10 (N)"]
    assert (screened.isna() | screened.between(1, 8)).all()  # 8 heads: a top 10 is every head
    assert set(table["verdict"]) <= {"holds", "partly", "does not hold", "not testable"}
    c6 = table[(table.claim == "C6") & (table.model == "tiny:1")].iloc[0]
    assert (c6.verdict, c6.numbers) == ("not testable", "no run of 04_precise_sft")
    keys = {(m, c): r.key for (m, c), r in results.items()}
    tested = table.dropna(subset=["run_key"])
    assert dict(zip(tested["model"] + "/" + tested["chapter"], tested["run_key"])) == {
        f"{m}/{c}": keys[(m, c)] for m, c in zip(tested["model"], tested["chapter"])}
    assert across.manifest["inputs"]["tiny:1/01_heads"]["run_key"] == keys[("tiny:1", "01_heads")]
    bench = across.table("benchmarks")  # the shipped benchmarks: Table 1 where chapter 8 ran, else chapter 3's base run
    assert set(bench[bench.model == "tiny"]["source"]) == {"chapter 8 (Table 1)"}
    assert set(bench[bench.model == "tiny"]["benchmark"]) == {"gsm8k", "svamp", "mmlu"}
    assert set(bench[bench.model == "tiny:1"]["source"]) == {"chapter 3 (unablated)"}
    assert set(bench[bench.model == "tiny:1"]["benchmark"]) == {"svamp"}
    trend = across.table("trend")  # the measures against size, by the verdicts' own functions
    assert set(trend["model"]) == set(TWO) and (trend["parameters (M)"] > 0).all()
    assert set(trend["measure"]) <= {"key-head depth", "knockout gap", "selectivity"}
    assert ((trend["low"] <= trend["value"] + 1e-12) & (trend["value"] <= trend["high"] + 1e-12)).all()
    c3 = table[(table.claim == "C3") & (table.model == "tiny")].iloc[0]
    gap = trend[(trend.model == "tiny") & (trend.measure == "knockout gap")]
    if c3.verdict != "not testable":  # the gap C3 states is the one drawn
        assert f"gap {gap['value'].iloc[0]:+.0%} [{gap['low'].iloc[0]:+.0%}, {gap['high'].iloc[0]:+.0%}]" in c3.numbers
    costs = across.table("costs")  # what each run took, from its manifest
    assert len(costs) == len(INPUTS) + len(INPUTS) - 3 and (costs["minutes"] >= 0).all() and (costs["cores"] >= 1).all()
    assert dict(zip(costs["model"] + "/" + costs["chapter"], costs["run"])) == {
        f"{m}/{c}": keys[(m, c)] for m, c in zip(costs["model"], costs["chapter"])}

    # the same verdicts in the terminal, read from the store
    params = tmp_path / "tiny.yaml"
    params.write_text(json.dumps({c: dict(p) for c, p in given.items()}))
    assert main(["compare", "--models", ",".join(TWO), "--params-file", str(params)]) == 0
    out = capsys.readouterr().out
    first = table[(table.claim == "C1") & (table.model == "tiny:1")].iloc[0]
    assert f"tiny:1  {first.verdict:<14} {first.numbers}" in out

    # and on the book's first page, each cell linking to the chapter page of its model
    for name in ("_toc.yml", "intro.md", "glossary.md"):
        shutil.copy(paths.project_root() / "book" / name, tmp_path / name)
    monkeypatch.setenv("ARITHLENS_BOOK_DIR", str(tmp_path))
    index = book.build_book(list(results.values()), primary="tiny")
    verdicts_md = (tmp_path / "_generated" / "verdicts.md").read_text()
    assert "| claim | tiny | tiny:1 |" in verdicts_md and "(models/tiny_1/01_heads.ipynb)" in verdicts_md
    assert "Rows R1, R3, R5, R6 are not the paper's" in verdicts_md and "[chapter 7](chapters/07_robustness.ipynb) (R1, R3, R5)" in verdicts_md
    assert "[chapter 4](chapters/04_precise_sft.ipynb) (R6)" in verdicts_md
    intro = (index.parent / "intro.html").read_text()
    assert "tiny:1" in intro and 'href="models/tiny_1/01_heads.html"' in intro
    page = (index.parent / "models" / "tiny_1" / "01_heads.html").read_text()
    assert "This page shows <strong>tiny:1</strong>" in page
    assert not (index.parent / "models" / "tiny_1" / "04_precise_sft.html").exists()
    assert (index.parent / "models" / "tiny_1" / "07_robustness.html").exists()


@pytest.mark.slow
def test_model_chains_run_as_submitit_jobs_on_the_local_executor(isolated_runs, tmp_path):
    # its own store: the notebooks must execute inside the jobs, not be found finished
    plans = schedule.plan_models(["00_task"], TWO, _tiny_given())
    results = schedule.execute_plans(plans, executor="local", folder=tmp_path / "jobs", log=lambda m: None)
    assert {k: r.manifest["status"] for k, r in results.items()} == {("tiny", "00_task"): "complete",
                                                                      ("tiny:1", "00_task"): "complete"}
    assert list((tmp_path / "jobs").glob("*_log.out"))  # submitit kept each job's log


def test_the_first_page_sets_c5s_check_beside_its_rule():
    """The first page names C5's selectivity under resample ablation beside the own mean's, per model that
    ran both, and says nothing for a comparison without the check."""
    import pandas as pd

    from arithlens.claims.across import ABLATIONS

    rule, check = ABLATIONS.values()
    rows = [{"model": "a", "ablation": rule, "quantity": "selectivity", "value": -0.07, "low": -0.19, "high": 0.04},
            {"model": "a", "ablation": check, "quantity": "selectivity", "value": 0.28, "low": 0.14, "high": 0.42},
            {"model": "a", "ablation": check, "quantity": "math key", "value": -0.5, "low": -0.6, "high": -0.4},
            {"model": "b", "ablation": rule, "quantity": "selectivity", "value": 0.5, "low": 0.3, "high": 0.7}]
    line = book.c5_check_line(pd.DataFrame(rows), ["a", "b"])
    assert "a: +28% [+14%, +42%] (own mean -7% [-19%, +4%])" in line and "b:" not in line
    assert book.c5_check_line(pd.DataFrame(rows[3:]), ["a", "b"]) == ""
    assert book.c5_check_line(pd.DataFrame(), ["a"]) == ""


def test_the_trend_sentences_say_whether_the_intervals_resolve_a_change():
    import pandas as pd

    from arithlens.claims.across import trend_lines

    rows = [{"model": "small", "parameters (M)": 135.0, "measure": "selectivity", "value": -0.07, "low": -0.18, "high": 0.05,
             "interval": "95 % CI"},
            {"model": "large", "parameters (M)": 630.0, "measure": "selectivity", "value": 0.53, "low": 0.44, "high": 0.6,
             "interval": "95 % CI"},
            {"model": "small", "parameters (M)": 135.0, "measure": "knockout gap", "value": 0.51, "low": 0.46, "high": 0.56,
             "interval": "95 % CI"},
            {"model": "large", "parameters (M)": 630.0, "measure": "knockout gap", "value": 0.43, "low": 0.36, "high": 0.5,
             "interval": "95 % CI"}]
    gap, sel = trend_lines(pd.DataFrame(rows[::-1]))  # in TREND's order, each in size order
    assert sel.startswith("**selectivity** (95 % CI): small (135M) -7% [-18%, 5%] → large (630M) 53%")
    assert sel.endswith("rises, the intervals apart.")
    assert gap.endswith("changes within overlapping intervals.")
    assert trend_lines(pd.DataFrame(rows[:1])) == []  # one model: no trend


def test_the_comparison_names_chapter_3s_resample_conditions_as_chapter_3_does():
    from arithlens.analyses import transfer
    from arithlens.claims import intervals

    assert intervals.RESAMPLE == transfer.RESAMPLE

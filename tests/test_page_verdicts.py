"""One decision per claim: each chapter page states its claims' verdicts by the rule the book's first
page applies (:mod:`arithlens.claims.verdicts`), decided on the page's own run while it executes — so
the page and chapter 5's table (from which the first page is rendered) agree, verdict and numbers."""

from __future__ import annotations

import pytest

from arithlens.claims import rules, verdicts
from arithlens.runner.runs import execute, plan_book

from test_across import ACROSS, INPUTS, TINY_BEYOND
from test_chapters import _markdown_outputs
from test_graph import _tiny_given

#: The claims each chapter page decides; chapters 0 (the task) and 6 (numbers and neurons) decide none.
STATED = {"01_heads": ["C1", "C2", "C3"], "02_mlp": ["C4"], "03_transfer": ["C5"], "04_precise_sft": ["C6", "R6"],
          "07_robustness": ["R1", "R3", "R5"]}


@pytest.mark.slow
def test_every_page_states_the_verdict_the_first_page_shows(shared_runs):
    given = _tiny_given([f"{ACROSS}.models=[tiny]"] + TINY_BEYOND)
    plans = plan_book(INPUTS + [ACROSS], "tiny", given)
    runs = {plan.chapter: execute(plan, log=lambda m: None) for plan in plans}
    # the session's shared store may already hold these runs; each page is the run of its planned key
    assert all(runs[plan.chapter].key == plan.key for plan in plans)
    first_page = runs[ACROSS].table("verdicts").set_index(["model", "claim"])
    stated = []
    for chapter in INPUTS:
        run = runs[chapter]
        if chapter not in STATED:
            assert "verdicts.parquet" not in run.manifest["tables"], chapter
            continue
        page, text = run.table("verdicts"), _markdown_outputs(run)
        assert page["claim"].tolist() == STATED[chapter]
        for row in page.itertuples():
            cell = first_page.loc[("tiny", row.claim)]
            assert (row.verdict, row.numbers) == (cell.verdict, cell.numbers), (chapter, row.claim)
            assert row.chapter == cell.chapter == chapter and cell.run_key == run.key
            assert f"- **{row.claim} · {row.statement}: {row.verdict}.** {row.numbers}." in text  # shown on the page
            assert f"*Rule (version {rules.rule_version(row.claim)}):* {rules.RULES[row.claim]}" in text
        stated += page["claim"].tolist()
    assert sorted(stated) == sorted(rules.CLAIMS)  # every row of the first page is stated on its chapter's page
    decided = first_page.loc["tiny"]
    assert (decided["verdict"] != verdicts.UNTESTABLE).sum() >= 6  # the pages decided, not merely agreed on "not testable"

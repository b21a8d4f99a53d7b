"""What one chapter hands another, read from its stored tables: chapter 3's per-item results (the one
extractor chapters 5 and 7 share) and its suites rebuilt from its parameters."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from arithlens.analyses import robustness
from arithlens.claims import findings, transfer_suites
from arithlens.record import UpstreamError

from test_verdicts import FakeRun


def _scores(suite: str, kind: str, none: list[bool], key: list[bool] | None = None,
            random: list[list[bool]] = ()) -> list[dict]:
    rows = [{"suite": suite, "kind": kind, "item": i, "condition": "none", "seed": -1, "correct": c, "first_correct": c}
            for i, c in enumerate(none)]
    if key is not None:
        rows += [{"suite": suite, "kind": kind, "item": i, "condition": "key", "seed": -1, "correct": c,
                  "first_correct": not c} for i, c in enumerate(key)]
    rows += [{"suite": suite, "kind": kind, "item": i, "condition": "random", "seed": s, "correct": c, "first_correct": c}
             for s, draw in enumerate(random) for i, c in enumerate(draw)]
    return rows


def chapter3(parameters: dict | None = None) -> FakeRun:
    """power and years (math), capitals and antonyms (controls); years is usable only by its first token,
    antonyms usable but never ablated (chapter 3 ablates a suite only when the model can do it)."""
    t, f = True, False
    rows = (_scores("power", "math", [t, t, t, f], [f, t, f, f], [[t, t, f, f], [t, f, t, f]])
            + _scores("years", "math", [t, t, f, f], [t, f, f, f], [[t, t, f, f]])
            + _scores("capitals", "control", [t, t, t, f], [t, f, t, f], [[t, t, t, f]])
            + _scores("antonyms", "control", [t, f, t]))
    usable = pd.DataFrame([{"suite": s, "kind": k, "metric": m, "usable": ok} for s, k, m, ok in (
        ("power", "math", "correct", True), ("power", "math", "first_correct", True),
        ("years", "math", "correct", False), ("years", "math", "first_correct", True),
        ("capitals", "control", "correct", True), ("capitals", "control", "first_correct", True),
        ("antonyms", "control", "correct", True), ("antonyms", "control", "first_correct", True))])
    return FakeRun({"transfer_scores": pd.DataFrame(rows), "usability": usable}, parameters or {})


def test_transfer_items_keep_the_usable_ablated_suites_under_their_kinds_metric():
    items = findings.transfer_items(chapter3())
    assert list(items[["suite", "kind", "metric"]].drop_duplicates().itertuples(index=False, name=None)) == [
        ("power", "math", "correct"), ("capitals", "control", "correct")]  # both kinds by the whole answer
    assert list(items.columns[:4]) == ["suite", "kind", "metric", "item"]
    power = items[items.suite == "power"]
    assert power["item"].tolist() == [0, 1, 2, 3] and power["none"].tolist() == [1, 1, 1, 0]
    assert power["random"].tolist() == [1.0, 0.5, 0.5, 0.0]  # the share of the two draws that got it right
    capitals = items[items.suite == "capitals"]
    assert capitals["key"].tolist() == [1, 0, 1, 0]  # the whole answer, not the first token (flipped in the fake)
    assert items[items.suite == "power"]["key"].tolist() == [0, 1, 0, 0]


def test_chapter_7s_selectivity_reads_the_same_items():
    table = robustness.suite_selectivity(findings.transfer_items(chapter3()), n_boot=200, key="key")
    row = table.iloc[0]
    assert len(table) == 1 and (row.target, row.control) == ("power", "capitals")
    assert row.target_drop == pytest.approx(np.mean([1, 0, 1, 0]))  # none − key per item on power
    assert row.control_drop == pytest.approx(1 / 4)


def test_transfer_suites_are_rebuilt_from_chapter_3s_parameters_and_checked(tiny):
    run = chapter3({"n_items": 4, "seed": 0, "suite_names": ["power", "years", "capitals", "antonyms"], "shots": 3})
    made = transfer_suites.transfer_suites(run, tiny.tokenizer)
    assert list(made) == ["power", "capitals"] and len(made["power"]) == 4
    assert made["power"].items == transfer_suites.transfer_suites(run, tiny.tokenizer)["power"].items
    with pytest.raises(UpstreamError, match="scored other items of power"):  # chapter 3 scored 4, these build 3
        transfer_suites.transfer_suites(chapter3({**run.parameters, "n_items": 3}), tiny.tokenizer)

"""A long chapter resumes: each finished unit of work is kept in ``<key>.checkpoints/`` (record.resumed),
a complete run leaves none behind, and a run with the same key takes a kept unit instead of computing it."""

import json
import pickle

import pandas as pd
import pytest

from arithlens import record
from arithlens.runner.runs import run_chapter


def test_resumed_computes_once_per_run_key(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or pd.DataFrame({"x": [len(calls)]})
    assert record.resumed("", "unit", compute)["x"][0] == 1 and record.resumed("", "unit", compute)["x"][0] == 2
    work = tmp_path / "abc.partial-123"
    work.mkdir()
    assert record.checkpoint_dir(str(work)) is None  # the runner made no checkpoint folder: compute
    (tmp_path / "abc.checkpoints").mkdir()
    assert record.checkpoint_dir(str(work)) == tmp_path / "abc.checkpoints"
    first = record.resumed(str(work), "row 1 a/b", compute)
    again = record.resumed(str(work), "row 1 a/b", compute)
    assert len(calls) == 3 and again.equals(first)  # the second came from the folder
    assert json.loads((work / "info.json").read_text())["resumed"] == ["row 1 a/b"]
    assert [p.name for p in (tmp_path / "abc.checkpoints").iterdir()] == ["row 1 a∕b.pkl"]


@pytest.mark.slow
def test_precise_sft_chapter_resumes_from_a_kept_unit(isolated_runs):
    """Plant a base-model evaluation in the checkpoint folder of chapter 4's tiny run: a run with that key
    takes it (its base rows are the planted ones, and the manifest says so) and removes the folder."""
    from test_chapters import HEADS_AS_INPUT, MLP_AS_INPUT, SFT_TINY

    params = SFT_TINY + HEADS_AS_INPUT + MLP_AS_INPUT
    first = run_chapter("04_precise_sft", "tiny", params, log=lambda m: None)
    checkpoints = first.path.with_name(first.key + record.CHECKPOINTS)
    assert not checkpoints.exists()  # a complete run leaves none
    base = first.table("scores").query("method == 'base'")
    assert not base["correct"].all()
    checkpoints.mkdir()
    with (checkpoints / "base.pkl").open("wb") as f:  # what the notebook's "base" unit returns, all right
        pickle.dump(base.drop(columns=["method", "seed", "group"]).assign(correct=True).reset_index(drop=True), f)
    logged = []
    again = run_chapter("04_precise_sft", "tiny", params, force=True, log=logged.append)
    assert again.key == first.key and any("resuming: 1 finished units" in m for m in logged)
    assert again.table("scores").query("method == 'base'")["correct"].all()
    assert again.manifest["notebook_info"]["resumed"] == ["base"] and not checkpoints.exists()

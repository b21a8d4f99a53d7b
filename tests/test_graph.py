"""The run graph: declared chapter inputs, keys that carry their inputs' keys, dependency order,
books that never mix runs, and chapters that give the same tables when run twice."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from arithlens.runner import chapters, runs
from arithlens.core import threads
from arithlens.runner.book import check_consistent
from arithlens.record import RunResult
from arithlens.runner.chapters import RunError
from arithlens.runner.runs import execute, gather_overrides, plan_book

from test_chapters import HEADS_TINY, MLP_TINY, SFT_TINY, TRANSFER_TINY

BOOK = ["00_task", "01_heads", "02_mlp", "03_transfer", "04_precise_sft"]


def test_chapters_declare_their_inputs():
    assert chapters.chapter_inputs("00_task") == () and chapters.chapter_inputs("01_heads") == ()
    assert chapters.chapter_inputs("02_mlp") == ("01_heads",) and chapters.chapter_inputs("03_transfer") == ("01_heads",)
    assert set(chapters.chapter_inputs("04_precise_sft")) == {"01_heads", "02_mlp"}
    assert "upstream" in runs.RESERVED_PARAMS
    with pytest.raises(RunError, match="set by the runner"):
        runs.resolve_parameters("02_mlp", ["upstream={}"])


def test_book_order_puts_inputs_first_and_each_chapter_once():
    order = [p.chapter for p in plan_book(["04_precise_sft", "00_task"], "tiny")]
    assert order == ["01_heads", "02_mlp", "04_precise_sft", "00_task"]
    plans = plan_book(BOOK, "tiny")
    assert [p.chapter for p in plans] == BOOK
    sft = plans[-1]
    assert {p.chapter: p.key for p in sft.inputs} == {p.chapter: p.key for p in plans if p.chapter in ("01_heads", "02_mlp")}
    assert sft.inputs[1].inputs[0] == sft.inputs[0]  # chapter 2's chapter 1 is chapter 4's chapter 1


def _keys(given=None) -> dict[str, str]:
    return {p.chapter: p.key for p in plan_book(BOOK, "tiny", given)}


def test_changing_a_chapter1_parameter_rekeys_chapters_1_to_4_only():
    before, after = _keys(), _keys({"01_heads": {"top_k": "5"}})
    assert {c for c in BOOK if before[c] != after[c]} == {"01_heads", "02_mlp", "03_transfer", "04_precise_sft"}
    mlp_only = _keys({"02_mlp": {"rise": "0.3"}})
    assert {c for c in BOOK if before[c] != mlp_only[c]} == {"02_mlp", "04_precise_sft"}


def test_overrides_are_sorted_by_chapter():
    given = gather_overrides(["01_heads.top_k=5", "seed=3", "2.rise=0.5"], target="03_transfer")
    assert given == {"01_heads": {"top_k": "5"}, "03_transfer": {"seed": "3"}, "02_mlp": {"rise": "0.5"}}
    with pytest.raises(RunError, match="names no chapter: write CHAPTER.seed"):
        gather_overrides(["seed=3"], target=None)
    with pytest.raises(RunError, match="unknown chapter 'nine'"):
        gather_overrides(["nine.top_k=5"], target="02_mlp")
    with pytest.raises(RunError, match="unknown parameter 'top_kk' for chapter 01_heads"):
        plan_book(["02_mlp"], "tiny", gather_overrides(["01_heads.top_kk=5"]))


def test_params_file_takes_chapter_sections(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("seed: 4\n01_heads:\n  top_k: 7\n")
    assert gather_overrides(None, str(f), target="02_mlp") == {"02_mlp": {"seed": 4}, "01_heads": {"top_k": 7}}


def _fake(chapter: str, key: str, inputs: dict[str, str] | None = None) -> RunResult:
    return RunResult(Path("/nowhere") / key, {"chapter": chapter, "run_key": key, "model": "tiny",
                                              "inputs": {c: {"run_key": k, "path": ""} for c, k in (inputs or {}).items()}})


def test_a_book_never_mixes_runs_whose_keys_disagree():
    check_consistent([_fake("01_heads", "a"), _fake("02_mlp", "b", {"01_heads": "a"})])
    with pytest.raises(RunError, match="02_mlp was computed from 01_heads run x, but the book shows 01_heads run a"):
        check_consistent([_fake("01_heads", "a"), _fake("02_mlp", "b", {"01_heads": "x"})])
    with pytest.raises(RunError, match="two runs of 01_heads"):
        check_consistent([_fake("01_heads", "a"), _fake("01_heads", "c")])


TINY_BOOK = {"00_task": ["n_per_cell=1", "filter_correct=false", "templates=[eq_spaced, qa_what]", "shots=[0, 1]",
                         "analysis_shots=1"],
             "01_heads": HEADS_TINY, "02_mlp": MLP_TINY, "03_transfer": TRANSFER_TINY, "04_precise_sft": SFT_TINY}


def _tiny_given(extra: list[str] = ()) -> dict:
    return gather_overrides([f"{c}.{p}" for c, ps in TINY_BOOK.items() for p in ps] + list(extra))


def _tables(root: Path) -> dict[str, pd.DataFrame]:
    return {str(p.relative_to(root)).split("/")[0] + "/" + p.name: pd.read_parquet(p)
            for p in sorted(root.rglob("tables/*.parquet"))}


@pytest.mark.slow
def test_every_chapter_is_deterministic_and_a_rebuild_reruns_only_what_changed(tmp_path, monkeypatch):
    """Two stores, same inputs: identical tables (at whatever thread count torch picks here). Then a
    chapter-1 parameter change re-executes chapters 1-4 and reuses chapter 0. Private stores, not the
    session's shared one: every run must execute here, twice."""
    monkeypatch.setenv("ARITHLENS_QUIET", "1")
    stores = [tmp_path / "a", tmp_path / "b"]
    for store in stores:
        monkeypatch.setenv("ARITHLENS_RUNS", str(store))
        for plan in plan_book(BOOK, "tiny", _tiny_given()):
            assert not execute(plan, log=lambda m: None).reused
    first, second = _tables(stores[0]), _tables(stores[1])
    assert first.keys() == second.keys() and len(first) >= 20
    for name in first:
        pd.testing.assert_frame_equal(first[name], second[name], check_exact=True, obj=name)

    executed = []
    for plan in plan_book(BOOK, "tiny", _tiny_given(["01_heads.top_k=3"])):
        if not execute(plan, log=lambda m: None).reused:
            executed.append(plan.chapter)
    assert executed == ["01_heads", "02_mlp", "03_transfer", "04_precise_sft"]


def test_a_run_whose_code_changed_while_it_ran_is_not_kept_as_complete(isolated_runs, monkeypatch):
    import papermill

    plan = runs.plan_run("00_task", "tiny")
    monkeypatch.setattr(papermill, "execute_notebook", lambda src, out, **kw: Path(out).write_text("{}"))
    monkeypatch.setattr(runs, "code_hash", lambda chapter: "after")  # an edit landed mid-run
    with pytest.raises(RunError, match="code changed while it ran"):
        runs._execute_notebook(runs.RunPlan(plan.chapter, plan.model, plan.params, "before"), log=lambda m: None, timeout=None)
    assert not list(isolated_runs.rglob("manifest.json")) and len(list(isolated_runs.rglob("*.failed"))) == 1


def test_data_files_named_by_parameters_are_keyed_by_content(tmp_path):
    data = tmp_path / "bench.jsonl"
    data.write_text('{"prompt": "1 + 1 =", "answer": "2"}\n')
    params = {"seed": 0, "benchmark_files": [str(data)], "train_file": ""}
    first = runs.run_key("03_transfer", "tiny", params, "code")
    assert runs.run_key("03_transfer", "tiny", params, "code") == first
    data.write_text('{"prompt": "1 + 2 =", "answer": "3"}\n')
    assert runs.run_key("03_transfer", "tiny", params, "code") != first
    with pytest.raises(RunError, match=r"parameter 'train_file': no such file .*missing.jsonl"):
        runs.run_key("04_precise_sft", "tiny", {"train_file": str(tmp_path / "missing.jsonl")}, "code")


def test_run_graph_starts_each_run_once_its_inputs_finished_and_runs_independent_ones_side_by_side(monkeypatch):
    import os
    import threading
    import time as _time

    from arithlens.runner import schedule

    plans = plan_book(["00_task", "01_heads", "02_mlp", "03_transfer", "04_precise_sft"], "tiny")
    events, lock = [], threading.Lock()
    both = threading.Barrier(2, timeout=10)  # chapters 2 and 3 need only chapter 1: they must overlap
    threads_seen, shares_named, published = {}, set(), []

    def fake_execute(plan, force=False, upstream=True, log=print, timeout=None):
        assert upstream is False  # the graph runs inputs itself, never execute()'s recursion
        with lock:
            events.append(("start", plan.chapter))
        threads_seen[plan.chapter] = os.environ.get("OMP_NUM_THREADS")
        shares_named.add(os.environ.get(threads.ENV))
        if plan.chapter in ("02_mlp", "03_transfer"):
            both.wait()
        _time.sleep(0.01)
        with lock:
            events.append(("end", plan.chapter))
        return RunResult(Path(plan.chapter), {}, False)

    monkeypatch.setattr(schedule, "execute", fake_execute)
    prepared = []
    monkeypatch.setattr(schedule, "_dequantize_once", lambda models, log: prepared.append(models))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    write_share = threads.write_share
    monkeypatch.setattr(threads, "write_share", lambda path, n: published.append(n) or write_share(path, n))
    done = schedule.run_graph(plans, jobs=2, log=lambda m: None)
    assert {k: r.path.name for k, r in done.items()} == {p.key: p.chapter for p in plans}
    assert prepared == [{"tiny"}]  # weights cached once, before any kernel starts
    for plan in plans:  # a run starts only after every input has ended
        start = events.index(("start", plan.chapter))
        assert all(events.index(("end", i.chapter)) < start for i in plan.inputs)
    running = peak = 0
    for kind, _ in events:
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 2  # never more than jobs at once
    assert set(threads_seen.values()) == {"2"} and "OMP_NUM_THREADS" not in os.environ  # 4 cores ÷ 2, then unset
    # the share: 2 threads each while two run, all 4 for a run left alone; one file, gone afterwards
    assert published[0] == 2 and set(published) == {2, 4}
    (share,) = shares_named
    assert share and not Path(share).exists() and threads.ENV not in os.environ

    # a thread count the user set is kept; a failure stops new runs and is raised once the others finish
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    events.clear()

    def failing(plan, **kwargs):
        events.append(("start", plan.chapter))
        if plan.chapter == "01_heads":
            raise RunError("chapter 01_heads failed: boom")
        return RunResult(Path(plan.chapter), {}, False)

    monkeypatch.setattr(schedule, "execute", failing)
    with pytest.raises(RunError, match="boom"):
        schedule.run_graph(plans, jobs=2, log=lambda m: None)
    assert {c for _, c in events} == {"00_task", "01_heads"} and os.environ["OMP_NUM_THREADS"] == "1"
    assert threads.ENV not in os.environ  # a user's thread count is not shared


def test_the_thread_share_divides_the_cores_among_the_runs_going():
    assert [threads.share_for(n, cores=2) for n in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert [threads.share_for(n, cores=8) for n in (1, 2, 3, 4)] == [8, 4, 2, 2]


def test_a_kernel_follows_the_share_before_its_forward_passes(tmp_path):
    import torch

    from arithlens.core.models import load_model

    model = load_model("tiny:qwen2")
    before = torch.get_num_threads()
    share = tmp_path / "share"
    handle = threads.follow_share(model.bridge.original_model.get_input_embeddings(), share, interval=0.0)
    tokens = torch.randint(0, 60, (2, 6))
    try:
        for wanted in (1, 2, 1):
            threads.write_share(share, wanted)
            model.bridge(tokens)
            assert torch.get_num_threads() == wanted
        share.write_text("not a number")  # unreadable: nothing changes
        model.bridge(tokens)
        assert torch.get_num_threads() == 1
    finally:
        handle.remove()
        torch.set_num_threads(before)
    assert threads.follow_share(torch.nn.Linear(1, 1), None) is None  # no share named: nothing installed


def test_book_refuses_fewer_than_one_job(isolated_runs, capsys):
    from arithlens.cli import main

    assert main(["book", "--model", "tiny", "--jobs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "arithlens: error: --jobs must be at least 1, got 0"


def test_dry_run_times_each_run_by_earlier_runs_with_the_same_parameters_and_runs_nothing(isolated_runs, capsys):
    import json

    from arithlens.runner import schedule
    from arithlens.cli import main

    plans = plan_book(["01_heads", "02_mlp"], "tiny")
    heads = plans[0]

    def stored(key, params, seconds, started, cpu=None):
        folder = isolated_runs / "01_heads" / "tiny" / key
        folder.mkdir(parents=True)
        manifest = {"run_key": key, "parameters": params, "timings": {"seconds": seconds, "started": started}}
        (folder / "manifest.json").write_text(json.dumps(manifest | ({"cpu": cpu} if cpu else {})))

    stored("old1", heads.params, 600, "2026-01-01T00:00:00", {"cores": 2, "OMP_NUM_THREADS": "1"})
    stored("old2", heads.params, 1200, "2026-01-02T00:00:00", {"cores": 2, "OMP_NUM_THREADS": None})
    stored("other", {**heads.params, "top_k": 99}, 60_000, "2026-01-03T00:00:00")  # other parameters: not a timing
    lines, summary = schedule.estimate(plans, jobs=2)
    assert lines[0] == (f"01_heads on tiny: to run (key {heads.key}), ≈ 15 min — the median of 2 earlier runs with "
                        f"these parameters (10–20 min), torch threads 1/default")
    assert lines[1].endswith("no earlier run with these parameters to time it by")
    assert summary == ("2 of 2 runs to execute: ≈ 15 min of chapter time, at least 15 min with --jobs 2 (the longest "
                       "chain of inputs); 1 run(s) not timed (never run with these parameters here)")
    assert main(["book", "--model", "tiny", "--chapters", "02_mlp", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("01_heads on tiny: to run") and out[-1].startswith("2 of 2 runs to execute")
    assert sorted(p.name for p in isolated_runs.rglob("*") if p.is_dir() and p.parent.name == "tiny") == ["old1", "old2", "other"]


def test_gguf_weights_are_dequantized_once_before_runs_start_side_by_side(monkeypatch, tmp_path):
    from arithlens.core import models
    from arithlens.runner import schedule
    from arithlens.core.specs import ModelSpec

    specs = {"a.gguf": ModelSpec("a.gguf", "gguf", str(tmp_path / "a.gguf"), "ab" * 32), "tiny": ModelSpec("tiny", "tiny", "llama:0")}
    monkeypatch.setattr("arithlens.core.specs.resolve_spec", lambda name, log=None: specs[name])
    calls, lines = [], []
    monkeypatch.setattr(models, "dequantize_gguf", lambda path, sha: calls.append((path, sha)) or (tmp_path / "cache", False))
    schedule._dequantize_once({"a.gguf", "tiny"}, lines.append)
    assert calls == [(tmp_path / "a.gguf", "ab" * 32)]  # the tiny model has no weights to cache
    assert lines == [f"dequantized a.gguf once into {tmp_path / 'cache'}, before its runs start side by side"]


def test_of_the_runs_ready_the_longest_chain_starts_first(monkeypatch, isolated_runs):
    """With two models and two jobs, both chapter 1s (each ahead of chapter 2) start before either
    chapter 0, which nothing follows: the plan's order alone would start the first model's 0 and 1."""
    from arithlens.runner import schedule
    from arithlens.runner.schedule import chain_minutes, plan_models

    plans = plan_models(["00_task", "01_heads", "02_mlp"], ["tiny", "tiny:1"])
    chain = chain_minutes(plans)
    assert [round(chain[p.key]) for p in plans] == [1, 2, 1, 1, 2, 1]  # no earlier runs here: a minute each
    started = []
    monkeypatch.setattr(schedule, "_dequantize_once", lambda models, log: None)
    monkeypatch.setattr(schedule, "execute", lambda plan, **kw: started.append(plan.chapter) or RunResult(Path(plan.chapter), {}, False))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    schedule.run_graph(plans, jobs=2, log=lambda m: None)
    assert started[:2] == ["01_heads", "01_heads"] and sorted(started) == sorted(p.chapter for p in plans)

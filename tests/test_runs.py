import json

import pytest

from arithlens.runner import chapters, runs
from arithlens.runner.chapters import RunError
from arithlens.runner.runs import resolve_parameters, run_chapter

TINY = ["n_per_cell=1", "filter_correct=false", "templates=[eq_spaced, qa_what]", "shots=[0, 1]",
        "analysis_shots=1"]


def test_parameters_are_checked_by_name_and_type(tmp_path):
    params = resolve_parameters("00_task", ["n_per_cell=3", "operators=[+, '*']", "filter_correct=false"])
    assert params["n_per_cell"] == 3 and params["operators"] == ["+", "*"] and params["filter_correct"] is False
    assert resolve_parameters("00_task", ["operators=*"])["operators"] == ["*"]
    with pytest.raises(RunError, match="unknown parameter 'n_per_cel' for chapter 00_task"):
        resolve_parameters("00_task", ["n_per_cel=3"])
    with pytest.raises(RunError, match="parameter 'n_per_cell' expects int"):
        resolve_parameters("00_task", ["n_per_cell=many"])
    with pytest.raises(RunError, match="set by the runner"):
        resolve_parameters("00_task", ["model=tiny"])
    with pytest.raises(RunError, match="key=value"):
        resolve_parameters("00_task", ["n_per_cell"])
    f = tmp_path / "p.yaml"
    f.write_text("seed: 4\nshots: [0, 2]\nanalysis_shots: 2\n")  # analysis_shots must be one of shots
    assert resolve_parameters("00_task", ["seed=5"], str(f))["seed"] == 5
    assert resolve_parameters("00_task", None, str(f))["shots"] == [0, 2]
    f.write_text("- not a mapping\n")
    with pytest.raises(RunError, match="YAML mapping"):
        resolve_parameters("00_task", None, str(f))


def test_chapter_names():
    assert chapters.find_chapter("0") == chapters.find_chapter("task") == chapters.find_chapter("00_task") == "00_task"
    with pytest.raises(RunError, match="unknown chapter"):
        chapters.find_chapter("99")


def test_run_key_changes_with_every_input():
    base = runs.run_key("00_task", "tiny", {"seed": 0}, "abc")
    assert base == runs.run_key("00_task", "tiny", {"seed": 0}, "abc")
    assert len({base, runs.run_key("00_task", "tiny:1", {"seed": 0}, "abc"),
                runs.run_key("00_task", "tiny", {"seed": 1}, "abc"),
                runs.run_key("00_task", "tiny", {"seed": 0}, "abd")}) == 4


@pytest.mark.slow
def test_reuse_reexecute_and_failure(isolated_runs, monkeypatch):
    first = run_chapter("00_task", "tiny", TINY, log=lambda m: None)
    assert not first.reused
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["parameters"]["n_per_cell"] == 1
    assert manifest["device"] == "cpu" and manifest["seed"] == 0 and manifest["packages"]["torch"]
    assert manifest["timings"]["seconds"] > 0 and "model_load_s" in manifest["timings"]
    assert {"scores.parquet", "accuracy.parquet", "correct_set.parquet"} <= set(manifest["tables"])
    assert len(first.table("scores")) > 0

    again = run_chapter("00_task", "tiny", TINY, log=lambda m: None)
    assert again.reused and again.path == first.path

    changed = run_chapter("00_task", "tiny", TINY + ["seed=1"], log=lambda m: None)
    assert not changed.reused and changed.path != first.path

    monkeypatch.setattr(runs, "code_hash", lambda chapter: "library-changed")
    recoded = run_chapter("00_task", "tiny", TINY, log=lambda m: None)
    assert not recoded.reused and recoded.path != first.path

    # the untrained tiny model answers (almost) nothing: the correct-set filter fails inside the kernel
    with pytest.raises(RunError, match=r"chapter 00_task failed: ValueError: only \d+ of \d+ prompts are answered correctly"):
        run_chapter("00_task", "tiny", TINY + ["filter_correct=true"], log=lambda m: None)
    finished = [p for p in isolated_runs.rglob("manifest.json")]
    assert len(finished) == 3  # the failed run left no manifest
    failed = list(isolated_runs.rglob("*.failed"))
    assert len(failed) == 1 and (failed[0] / "error.txt").read_text().startswith("ValueError")
    assert not list(isolated_runs.rglob("*.partial-*"))


def test_a_run_another_live_process_is_executing_is_refused_not_run_twice(isolated_runs):
    """Two books at once (two terminals, two `make book`): a run whose `<key>.partial-<pid>` belongs to
    another live process is refused in one line naming that process, and nothing of it is touched; a
    partial folder of a process that is gone does not block."""
    import subprocess
    import sys

    from arithlens.runner.chapters import RunError
    from arithlens.runner.runs import plan_run
    from arithlens.runner.store import running_elsewhere

    plan = plan_run("00_task", "tiny", {})
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        work = plan.path.with_name(f"{plan.key}.partial-{other.pid}")
        (work / "tables").mkdir(parents=True)
        assert running_elsewhere(plan.path) == other.pid
        with pytest.raises(RunError, match=f"being executed by process {other.pid}") as err:
            runs.execute(plan, log=lambda m: None)
        assert "\n" not in str(err.value) and work.is_dir() and not plan.path.exists()
    finally:
        other.kill()
        other.wait()
    assert running_elsewhere(plan.path) is None  # the process is gone: its folder is only interrupted

"""The command line as a newcomer meets it: one-line errors, non-zero exits, end-to-end runs."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from arithlens import paths
from arithlens.runner import runs
from arithlens.cli import main

TINY = ["--param", "n_per_cell=1", "--param", "filter_correct=false", "--param", "templates=[eq_spaced, st_is]",
        "--param", "shots=[0, 1]", "--param", "analysis_shots=1"]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "arithlens.cli", *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("args, message", [
    (["run", "0", "--model", "gpt-17"], "unknown model spec 'gpt-17'"),
    (["run", "0", "--model", "/missing/model.gguf"], "GGUF file not found"),
    (["run", "0", "--model", "tiny", "--param", "bogus=1"], "unknown parameter 'bogus'"),
    (["run", "0", "--model", "tiny", "--param", "seed=zero"], "parameter 'seed' expects int"),
    (["run", "nine", "--model", "tiny"], "unknown chapter 'nine'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, isolated_runs, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("arithlens: error:") and message in err and "\n" not in err
    assert not isolated_runs.exists() or not list(isolated_runs.rglob("manifest.json"))


@pytest.mark.slow
def test_failing_chapter_and_empty_correct_set(isolated_runs, capsys):
    # an unknown operator is refused before the kernel starts (arithlens.runner.checks), in one line
    assert main(["run", "0", "--model", "tiny", *TINY, "--param", "operators=['%']"]) == 2
    assert "parameter 'operators' of 00_task is ['%']" in capsys.readouterr().err
    # the untrained model answers nothing: with the filter on, the correct set is empty
    assert main(["run", "0", "--model", "tiny", *TINY, "--param", "filter_correct=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "answered correctly" in err
    assert not list(isolated_runs.rglob("manifest.json"))


@pytest.mark.slow
def test_chapter0_end_to_end_through_the_cli(isolated_runs, tmp_path):
    # its own store: the run must execute here, with progress bars on (a run found finished, made quiet by
    # another test, would pass the check that nothing leaked into the notebook without testing it)
    import os

    env = {**os.environ, "ARITHLENS_RUNS": str(isolated_runs)}
    env.pop("ARITHLENS_QUIET", None)  # progress bars on: they must reach the terminal, not the notebook
    proc = _cli("run", "00_task", "--model", "tiny", *TINY, env=env)
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["chapter"] == "00_task" and manifest["model"] == "tiny"
    nb = json.loads((run_dir / "notebook.ipynb").read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert any("arithlens-chart" in "".join(o.get("data", {}).get("text/html", "")) for o in outputs)
    streams = ["".join(o.get("text", "")) for o in outputs if o.get("output_type") == "stream"]
    assert not streams, f"progress bars or warnings leaked into the notebook: {streams[:2]}"
    again = _cli("run", "00_task", "--model", "tiny", *TINY, env=env)
    assert again.returncode == 0 and "reusing finished run" in again.stderr

    # the book: staged from that run, built offline, charts wired to the bundled vega
    book = tmp_path / "book"
    shutil.copytree(paths.project_root() / "book", book, ignore=shutil.ignore_patterns("_build", "chapters", "_static"))
    env["ARITHLENS_BOOK_DIR"] = str(book)
    built = _cli("book", "--model", "tiny", "--chapters", "00_task", *TINY, env=env)
    assert built.returncode == 0, built.stderr
    page = (book / "_build" / "html" / "chapters" / "00_task.html").read_text()
    assert "vega-bundle.js" in page and "arithlens-chart" in page
    assert "injected-parameters" not in page and str(isolated_runs) not in page  # parameter cells hidden
    assert (book / "_build" / "html" / "_static" / "vega-bundle.js").stat().st_size > 500_000

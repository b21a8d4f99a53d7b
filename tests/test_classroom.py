"""The classroom as a teacher meets it: build student notebooks, grade submissions, trust the scores.

Fast tests run the checks in-process on the instructor solutions (and on deliberately broken ones);
the ``slow`` tests execute whole notebooks through the grader (a Jupyter kernel each).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from arithlens import paths
from arithlens.analyses import patching
from arithlens.tasks import prompts
from arithlens.runner import chapters
from arithlens.classroom import EXERCISE_IDS, ClassroomError, exercise_notebooks
from arithlens.classroom import build as cbuild
from arithlens.classroom import checks
from arithlens.classroom.grade import check_names, format_report, grade_notebook
from arithlens.core.items import to_tokens
from arithlens.cli import main

EXERCISES = paths.project_root() / "exercises"
REAL = {"01_prompts"}  # exercises whose checks load SmolLM2 (its tokenizer)
SMOLLM2_DEMO = {"01_prompts", "02_direct_effect", "03_knockout", "04_logit_lens", "06_attribution_patching"}  # notebooks that load it


def _marks(exercise: str, notebook: bool = False):
    real = exercise in (SMOLLM2_DEMO if notebook else REAL)
    return [pytest.mark.real_model] * real + [pytest.mark.slow] * notebook


def _instructor(exercise: str) -> nbformat.NotebookNode:
    return nbformat.read(EXERCISES / f"{exercise}.ipynb", as_version=4)


def _solutions(exercise: str, edit: tuple[str, str] | None = None) -> dict:
    """The namespace the instructor's solution cells define (optionally with one source edit)."""
    namespace = {"torch": torch, "prompts": prompts, "patching": patching}
    applied = False
    for cell in _instructor(exercise).cells:
        if "solution" in cell.metadata.get("tags", []):
            source = cell.source
            if edit and edit[0] in source:
                source, applied = source.replace(*edit), True
            exec(compile(source, f"<{exercise} solution>", "exec"), namespace)
    assert edit is None or applied, f"edit {edit[0]!r} not found in {exercise}'s solutions"
    return namespace


def _failed(results) -> set[str]:
    return {r.name for r in results if not r.passed}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- building ------------------------------------------------------------------------------------

def test_stub_keeps_signature_docstring_and_hints():
    source = 'def f(x, y=2):\n    """Add."""\n    # hint: use +\n    z = x + y  # the answer\n    return z\n'
    stub = cbuild.stub_source(source)
    assert stub.startswith('def f(x, y=2):\n    """Add."""\n    # hint: use +') and "x + y" not in stub
    namespace = {}
    exec(stub, namespace)
    with pytest.raises(NotImplementedError, match="f: use \\+"):
        namespace["f"](1)
    with pytest.raises(ClassroomError, match="no '# hint:' comment"):
        cbuild.stub_source('def f():\n    return 1\n')
    with pytest.raises(ClassroomError, match="exactly one function"):
        cbuild.stub_source('import os\ndef f():\n    # hint: x\n    return 1\n')


def test_build_is_deterministic_and_hides_every_solution(tmp_path):
    first = cbuild.build(tmp_path / "a")
    cbuild.build(tmp_path / "b")
    for kind in ("student", "instructor"):
        names = sorted(p.name for p in (tmp_path / "a" / kind).iterdir())
        assert names == sorted(f"{e}.ipynb" for e in EXERCISE_IDS)
        for name in names:
            assert (tmp_path / "a" / kind / name).read_bytes() == (tmp_path / "b" / kind / name).read_bytes(), name
    cbuild.build(tmp_path / "a")  # rebuilding over an earlier build changes nothing either
    assert all((tmp_path / "a" / "student" / p.name).read_bytes() == p.read_bytes() for p in (tmp_path / "b" / "student").iterdir())
    for path in first["student"]:
        student = nbformat.read(path, as_version=4)
        instructor = _instructor(path.stem)
        assert student.metadata["arithlens"] == {**instructor.metadata["arithlens"], "version": "student"}
        for s_cell, i_cell in zip(student.cells, instructor.cells, strict=True):
            assert s_cell.id == i_cell.id
            if "solution" not in i_cell.metadata.get("tags", []):
                assert s_cell.source == i_cell.source
                continue
            assert s_cell.source.rstrip().splitlines()[-1].strip().startswith("raise NotImplementedError(")
            body = [ln for ln in i_cell.source.splitlines()[1:] if ln.strip() and not ln.strip().startswith(("#", '"""'))]
            assert not any(ln in s_cell.source for ln in body), f"solution code leaked into the student's {path.name}"


def test_book_copy_shows_the_stub_and_folds_the_solution():
    nb = cbuild.book_copy(_instructor("05_one_head_sft"), "05_one_head_sft")
    cells = nb.cells
    solutions = [i for i, c in enumerate(cells) if "solution" in c.metadata.get("tags", [])]
    assert len(solutions) == 2
    for i in solutions:
        assert "hide-input" in cells[i].metadata["tags"]
        assert cells[i].metadata["mystnb"]["code_prompt_show"] == "Show solution"
        assert "NotImplementedError" in cells[i - 1].source and "student-stub" in cells[i - 1].metadata["tags"]
    assert len({c.id for c in cells}) == len(cells)


def test_every_exercise_is_registered_with_its_checks():
    assert list(exercise_notebooks()) == list(EXERCISE_IDS)
    for exercise in EXERCISE_IDS:
        module = checks.exercise_module(exercise)
        defined = [name for name in _solutions(exercise) if name in module.FUNCTIONS]
        assert sorted(defined) == sorted(module.FUNCTIONS), exercise
        assert all(set(checks.needs(c)) <= set(module.FUNCTIONS) for c in module.CHECKS)
        assert check_names(exercise) == [c.__name__ for c in module.CHECKS]  # what the grader reads without importing
        nb = _instructor(exercise)
        assert nb.metadata["arithlens"]["exercise"] == exercise
        assert any("check" in c.metadata.get("tags", []) for c in nb.cells)


def test_classroom_edits_do_not_invalidate_chapter_runs(monkeypatch):
    read = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self) or original(self))
    chapters.code_hash("01_heads")
    assert any(p.name == "patching.py" for p in read)
    assert not any("classroom" in p.parts or p.name in ("book.py", "cli.py") for p in read)


# --- checks, in-process -------------------------------------------------------------------------

BROKEN = [  # (exercise, edit to the instructor solution, the checks it must fail — and no others)
    ("02_direct_effect", ("return (change / scale", "return -(change / scale"),
     {"direct_effect_matches_library", "every_head_matches_library"}),
    ("02_direct_effect", ("attn.W_O[head]", "attn.W_O[head - 1]"),
     {"head_output_change_matches_library", "every_head_matches_library"}),
    ("03_knockout", ("means[layer, chosen]", "means[layer, [c - 1 for c in chosen]]"), {"ablation_matches_library"}),
    ("04_logit_lens", ("original_component(model.bridge.ln_final.original_component(resid))", "original_component(resid)"),
     {"last_layer_is_the_output", "lens_matches_library"}),
    ("05_one_head_sft", ("weight -= lr", "weight += lr"), {"sgd_matches_reference", "one_head_end_to_end"}),
    ("05_one_head_sft", ('("q_proj", head)', '("q_proj", (head + 1) % cfg.num_attention_heads)'),
     {"masks_match_reference", "one_head_end_to_end"}),
    ("06_attribution_patching", ("(z_cf - z_clean)", "(z_clean - z_cf)"), {"estimate_matches_library"}),
]


@pytest.mark.parametrize("exercise", [pytest.param(e, marks=_marks(e)) for e in EXERCISE_IDS])
def test_instructor_solutions_pass_and_stubs_fail(exercise):
    results = checks.run_checks(exercise, _solutions(exercise))
    assert all(r.passed for r in results), [(r.name, r.reason) for r in results if not r.passed]
    stubs = {}
    for cell in _instructor(exercise).cells:
        if "solution" in cell.metadata.get("tags", []):
            exec(cbuild.stub_source(cell.source), stubs)
    for r in checks.run_checks(exercise, stubs):
        assert not r.passed and "is not implemented yet" in r.reason, (r.name, r.reason)
    for r in checks.run_checks(exercise, {}):
        assert not r.passed and "is not defined" in r.reason


@pytest.mark.parametrize("exercise, edit, expected", [pytest.param(*b, marks=_marks(b[0])) for b in BROKEN],
                         ids=[f"{b[0]}-{sorted(b[2])[0]}" for b in BROKEN])
def test_a_broken_solution_loses_exactly_its_checks(exercise, edit, expected):
    results = checks.run_checks(exercise, _solutions(exercise, edit))
    assert _failed(results) == expected, [(r.name, r.reason) for r in results]


ATTRIBUTION_MISTAKES = [  # (edit to exercise 6's solution, the checks it must fail, what the first failure must say)
    (("(z_cf - z_clean)", "(z_clean - z_cf)"), {"estimate_matches_library"}, "the sign is flipped"),
    (("grad[:, -1, head]", "grad[:, -1, head - 1]"),
     {"z_and_grad_match_library", "slope_of_exact_patching", "estimate_matches_library"}, "this is the gradient for head 0.0"),
    (("answers[:, None]).sum()", "answers[:, None]).mean()"),
     {"z_and_grad_match_library", "slope_of_exact_patching", "estimate_matches_library"}, "averaged over prompts"),
    (("logits[:, -1].gather", "logits[:, -1].log_softmax(-1).gather"),
     {"z_and_grad_match_library", "slope_of_exact_patching", "estimate_matches_library"}, "not the gradient of the answer logit"),
]


@pytest.mark.parametrize("edit, expected, says", ATTRIBUTION_MISTAKES, ids=["sign-flipped", "wrong-head", "mean-not-sum", "log-prob"])
def test_attribution_exercise_says_what_is_wrong(edit, expected, says):
    # exercise 6: a flipped Δz, the gradient of the neighbouring head, a mean over prompts, the wrong metric
    results = checks.run_checks("06_attribution_patching", _solutions("06_attribution_patching", edit))
    assert _failed(results) == expected, [(r.name, r.reason) for r in results]
    first = next(r for r in results if not r.passed)
    assert says in first.reason and len(first.reason) <= 160, first.reason


def test_a_stored_answer_cannot_pass():
    # a function that returns numbers computed once, on the notebook's prompt, fails on the checks' fresh prompt
    from arithlens.core.models import load_model

    honest = _solutions("04_logit_lens")
    model = load_model("tiny:4")
    item = prompts.make_item(model.tokenizer, "eq_spaced", "*", 2, 4)
    stored = honest["layer_logits"](model, to_tokens([item]))
    results = checks.run_checks("04_logit_lens", {"layer_logits": lambda model, tokens: stored,
                                                  "token_ranks": honest["token_ranks"]})
    assert _failed(results) == {"last_layer_is_the_output", "lens_matches_library"}


# --- grading whole notebooks (a kernel each) ----------------------------------------------------

def _write(tmp_path: Path, name: str, nb) -> Path:
    path = tmp_path / "submitted" / name
    path.parent.mkdir(exist_ok=True)
    nbformat.write(nb, path)
    return path


def _graded(path: Path, out: Path, **kwargs):
    before = (_sha(path), path.stat().st_mtime_ns)
    report = grade_notebook(path, out, **kwargs)
    assert (_sha(path), path.stat().st_mtime_ns) == before, "grading modified the submitted notebook"
    assert json.loads((out / f"{path.stem}.json").read_text())["score"] == report.score
    return report


@pytest.mark.parametrize("exercise", [pytest.param(e, marks=_marks(e, notebook=True)) for e in EXERCISE_IDS])
def test_instructor_notebook_scores_full_marks(exercise, tmp_path):
    path = _write(tmp_path, f"{exercise}.ipynb", _instructor(exercise))
    report = _graded(path, tmp_path / "grades")
    assert report.status == "graded" and report.cell_errors == [], (report.message, report.cell_errors)
    assert report.score == report.max_score == len(checks.exercise_module(exercise).CHECKS), format_report(report)
    assert report.seconds < 120 * 2  # the exercise budget is 2 minutes; allow for a busy test machine


@pytest.mark.slow
@pytest.mark.real_model
def test_student_notebooks_score_zero_and_say_why(tmp_path):
    built = cbuild.build(tmp_path / "build")
    for path in built["student"]:
        report = _graded(path, tmp_path / "grades")
        assert report.status == "graded" and report.max_score >= 3
        assert report.score == 0, format_report(report)
        assert all("is not implemented yet" in c["reason"] for c in report.checks), format_report(report)
        assert all("NotImplementedError" in e["error"] for e in report.cell_errors)  # demo cells call the stubs


@pytest.mark.slow
def test_broken_notebook_loses_exactly_its_checks_and_the_cli_says_so(tmp_path):
    nb = _instructor("05_one_head_sft")
    for cell in nb.cells:
        cell.source = cell.source.replace("weight -= lr", "weight += lr")
    path = _write(tmp_path, "05_one_head_sft.ipynb", nb)
    before = _sha(path)
    proc = subprocess.run([sys.executable, "-m", "arithlens.cli", "classroom", "grade", str(path), "--out", str(tmp_path / "g")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _sha(path) == before
    out = proc.stdout
    assert "05_one_head_sft.ipynb — exercise 05_one_head_sft: 2/4" in out
    assert "[FAIL 0/1] sgd_matches_reference: losses" in out and "[PASS 1/1] only_the_slices_move" in out
    report = json.loads((tmp_path / "g" / "05_one_head_sft.json").read_text())
    assert {c["name"] for c in report["checks"] if not c["passed"]} == {"sgd_matches_reference", "one_head_end_to_end"}
    assert report["sha256"] == before and Path(report["executed_notebook"]).is_file()
    assert "Traceback" not in out and "IPKernelApp" not in proc.stderr  # kernel noise goes to the log file


@pytest.mark.slow
def test_crash_timeout_and_strangers_get_a_clear_report(tmp_path):
    out = tmp_path / "grades"
    five = _instructor("05_one_head_sft")
    crash = nbformat.from_dict(json.loads(json.dumps(five)))
    crash.cells.insert(3, nbformat.v4.new_code_cell("import os\nos._exit(3)"))
    report = _graded(_write(tmp_path, "05_one_head_sft.ipynb", crash), out)
    assert report.status == "crashed" and report.score == 0 and "kernel died while running cell 4 (import os)" in report.message
    assert [c["name"] for c in report.checks] == check_names("05_one_head_sft")
    assert all(c["reason"] == "not graded (see above)" for c in report.checks)

    slow = nbformat.from_dict(json.loads(json.dumps(five)))
    slow.cells.insert(3, nbformat.v4.new_code_cell("import time\ntime.sleep(120)"))
    report = _graded(_write(tmp_path, "05_one_head_sft.ipynb", slow), out, timeout=15)
    assert report.status == "timeout" and report.score == 0 and report.max_score == 4
    assert "ran past its 15 s limit while running cell 4 (import time)" in report.message
    assert report.seconds < 60
    text = format_report(report)
    assert "TIMEOUT" in text and "Traceback" not in text

    stranger = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    report = _graded(_write(tmp_path, "homework.ipynb", stranger), out)
    assert report.status == "not-an-exercise" and report.max_score == 0
    broken = tmp_path / "submitted" / "02_direct_effect.ipynb"
    broken.write_text("{ not json")
    report = _graded(broken, out)
    assert report.status == "unreadable" and "not a readable notebook" in report.message


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["classroom", "grade", str(tmp_path / "missing.ipynb")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"arithlens: error: no such notebook: {tmp_path / 'missing.ipynb'}"
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("ARITHLENS_EXERCISES", str(empty))
    assert main(["classroom", "build", "--out", str(tmp_path / "out")]) == 2
    assert "no exercise notebooks" in capsys.readouterr().err

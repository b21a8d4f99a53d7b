"""Parameter values are checked before any kernel starts: every chapter parameter has a rule (or is
declared free-form), the notebooks' defaults keep their rules, and a bad value stops the command line
with one line — parameter, value, rule — exit status 2 and no run folder."""

from __future__ import annotations

import math

import pytest

from arithlens.cli import main
from arithlens.runner import checks
from arithlens.runner.chapters import RunError, list_chapters, notebook_parameters
from arithlens.runner.runs import RESERVED_PARAMS, check_parameters, resolve_parameters


def _parameters(chapter: str) -> list[str]:
    return [n for n in notebook_parameters(chapter) if n not in RESERVED_PARAMS]


def test_every_parameter_of_every_chapter_has_a_rule_or_is_free_form():
    missing, both = [], []
    for chapter in list_chapters():
        for name in _parameters(chapter):
            ruled = checks.rule_for(chapter, name) is not None
            if not ruled and name not in checks.FREE_FORM:
                missing.append(f"{chapter}.{name}")
            if ruled and name in checks.FREE_FORM:
                both.append(f"{chapter}.{name}")
    assert not missing, f"parameters with no rule (add one to arithlens.runner.checks, or list it in FREE_FORM): {missing}"
    assert not both, f"parameters both ruled and free-form: {both}"


def test_no_rule_names_a_parameter_no_chapter_has():
    every = {(c, n) for c in list_chapters() for n in _parameters(c)}
    names = {n for _, n in every}
    assert set(checks.RULES) <= names, f"rules for no parameter: {sorted(set(checks.RULES) - names)}"
    assert set(checks.FREE_FORM) <= names, f"free-form entries for no parameter: {sorted(set(checks.FREE_FORM) - names)}"
    for chapter, rules in checks.CHAPTER_RULES.items():
        assert {(chapter, n) for n in rules} <= every, chapter
    for chapter, relations in checks.RELATIONS.items():
        assert {(chapter, n) for r in relations for n in r.names} <= every, chapter


def test_every_chapter_default_keeps_its_rule():
    for chapter in list_chapters():
        check_parameters(chapter, {})  # raises on a default that breaks a rule or relation


@pytest.mark.parametrize("rule, good, bad", [
    (checks.COUNT, [1, 40], [0, -3, True, 2.0]),
    (checks.COUNT0, [0, 7], [-1, False]),
    (checks.FRACTION, [0, 0.5, 1], [-0.1, 1.5, math.nan, math.inf]),
    (checks.number(0, open_low=True), [1e-5, 3], [0, -1, math.inf]),
    (checks.OPERATOR, ["+", "/"], ["%", "plus", ""]),
    (checks.each(checks.TEMPLATE), [["eq_spaced"], ["eq_spaced", "st_is"]], [[], ["eq_spaced", "eq_spaced"], ["nope"]]),
    (checks.each(checks.COUNT, empty=True), [[], [5, 20]], [[0], [5, 5]]),
    (checks.span(0), [[1, 9], [0, 0]], [[9, 1], [-1, 3], [1, 2, 3]]),
    (checks.RULES["lens_cases"], [[[4, "+", 3], [8, "/", 2]]], [[[7, "/", 2]], [[2, "-", 5]], [[4, "%", 3]], [[4, "+"]]]),
    (checks.RULES["number_template"], ["The number {n}"], ["The number", "{n} and {n}"]),
])
def test_rules_take_what_the_analyses_can_run_and_refuse_the_rest(rule, good, bad):
    for value in good:
        assert rule.holds(value), value
    for value in bad:
        assert not checks._keeps(rule, value), value


def test_a_bad_value_names_the_parameter_the_value_and_the_rule():
    with pytest.raises(RunError, match=r"^parameter 'top_k' of 01_heads is -3; it must be a whole number ≥ 1$"):
        resolve_parameters("01_heads", ["top_k=-3"])
    with pytest.raises(RunError, match=r"'operators' of 00_task is \['\+', '%'\]; .*each an operator: one of \+, -, \*, /"):
        resolve_parameters("00_task", ["operators=[+, '%']"])
    with pytest.raises(RunError, match=r"'lead_mode' of 01_heads is 'total'; it must be a per-head patching mode: one of direct, path"):
        resolve_parameters("01_heads", ["lead_mode=total"])
    with pytest.raises(RunError, match=r"parameters of 01_heads \(lead_mode='path', modes=\['direct'\]\): lead_mode must be one of modes"):
        resolve_parameters("01_heads", ["modes=[direct]"])
    with pytest.raises(RunError, match="heldout_templates must leave at least one template to train on"):
        resolve_parameters("04_precise_sft", ["heldout_templates=[" + ", ".join(checks._templates()) + "]"])
    with pytest.raises(RunError, match=r"'train_file' of 04_precise_sft is '/no/such.jsonl'; it must be a file that exists"):
        resolve_parameters("04_precise_sft", ["train_file=/no/such.jsonl"])
    assert resolve_parameters("01_heads", ["top_k=3", "threshold=-0.1"])["top_k"] == 3  # good values pass


@pytest.fixture()
def no_kernel(monkeypatch):
    """Fail the test if a notebook kernel would start."""
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("a kernel started"))


@pytest.mark.parametrize("args, message", [
    (["run", "01_heads", "--param", "top_k=-3"], "parameter 'top_k' of 01_heads is -3; it must be a whole number ≥ 1"),
    (["run", "02_mlp", "--param", "01_heads.knockout_seeds=0"],  # an input chapter's parameter, checked too
     "parameter 'knockout_seeds' of 01_heads is 0; it must be a whole number ≥ 1"),
    (["run", "0", "--param", "operators=['%']"], "parameter 'operators' of 00_task is ['%']"),
    (["run", "0", "--param", "analysis_shots=5"], "analysis_shots must be one of shots"),
    (["run", "06_numbers", "--param", "top_percent=0"], "parameter 'top_percent' of 06_numbers is 0.0; it must be a number in (0, 100]"),
    (["run", "07_robustness", "--param", "survive_share=1.5"], "it must be a number in [0, 1]"),
    (["book", "--chapters", "01_heads", "--param", "01_heads.matched_draws=5"], "a whole number ≥ 20"),
])
def test_a_bad_value_stops_the_command_line_before_any_kernel(args, message, isolated_runs, no_kernel, capsys):
    assert main([*args, "--model", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("arithlens: error:") and message in err and "\n" not in err
    assert not isolated_runs.exists(), "a run folder was created"


def test_a_bad_value_in_a_params_file_is_stopped_too(tmp_path, isolated_runs, no_kernel, capsys):
    given = tmp_path / "p.yaml"
    given.write_text("01_heads:\n  n_boot: 0\n")
    assert main(["run", "02_mlp", "--model", "tiny", "--params-file", str(given)]) == 2
    assert "parameter 'n_boot' of 01_heads is 0; it must be a whole number ≥ 1" in capsys.readouterr().err
    assert not isolated_runs.exists()

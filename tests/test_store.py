"""`arithlens runs`: what the store holds and cleaning it (failed, interrupted, stale go; complete,
running and whatever the built book shows stay)."""

from __future__ import annotations

import json
import os

import pytest

from arithlens.runner import chapters, store
from arithlens.cli import main


def _complete(root, chapter, key, code=None, inputs=None, model="tiny"):
    path = root / chapter / model / key
    (path / "tables").mkdir(parents=True)
    (path / "tables" / "t.parquet").write_bytes(b"x" * 100)
    manifest = {"chapter": chapter, "run_key": key, "model": model, "code_hash": code or chapters.code_hash(chapter),
                "inputs": {c: {"run_key": p.name, "path": str(p)} for c, p in (inputs or {}).items()}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.fixture()
def filled(isolated_runs):
    root = isolated_runs
    heads = _complete(root, "01_heads", "aaaaaaaaaaaa")
    old_heads = _complete(root, "01_heads", "bbbbbbbbbbbb", code="0" * 16)                    # code changed
    mlp = _complete(root, "02_mlp", "cccccccccccc", inputs={"01_heads": heads})                # current
    _complete(root, "02_mlp", "dddddddddddd", inputs={"01_heads": old_heads})                  # input stale
    _complete(root, "02_mlp", "eeeeeeeeeeee", inputs={"01_heads": root / "01_heads/tiny/gone"})  # input gone
    failed = root / "00_task" / "tiny" / "ffffffffffff.failed"
    failed.mkdir(parents=True)
    (failed / "error.txt").write_text("ValueError: unknown operator(s) ['%']\n")
    dead = root / "00_task" / "tiny" / "999999999999.partial-999999999"
    dead.mkdir(parents=True)
    live = root / "00_task" / "tiny" / f"777777777777.partial-{os.getpid()}"
    live.mkdir(parents=True)
    resumable = root / "04_precise_sft" / "tiny" / "121212121212.checkpoints"
    old_checkpoints = root / "04_precise_sft" / "tiny" / "343434343434.checkpoints"
    for path, code in ((resumable, chapters.code_hash("04_precise_sft")), (old_checkpoints, "0" * 16)):
        path.mkdir(parents=True)
        (path / "about.json").write_text(json.dumps({"chapter": "04_precise_sft", "model": "tiny", "code_hash": code}))
        (path / "row 0 full SFT seed 0.pkl").write_bytes(b"x")
    return {"heads": heads, "old_heads": old_heads, "mlp": mlp, "failed": failed, "dead": dead, "live": live,
            "resumable": resumable, "old_checkpoints": old_checkpoints}


def test_scan_names_every_state(filled):
    found = {r.key: r for r in store.scan()}
    assert {k: r.status for k, r in found.items()} == {
        "aaaaaaaaaaaa": "complete", "bbbbbbbbbbbb": "stale", "cccccccccccc": "complete", "dddddddddddd": "stale",
        "eeeeeeeeeeee": "stale", "ffffffffffff": "failed", "999999999999": "interrupted", "777777777777": "running",
        "121212121212": "resumable", "343434343434": "stale"}
    assert found["121212121212"].why == "1 finished units; the next run with this key resumes from them"
    assert found["343434343434"].why == "checkpoints of code that has changed since"
    assert found["bbbbbbbbbbbb"].why == "its notebook or library code changed"
    assert found["dddddddddddd"].why == "its input 01_heads run bbbbbbbbbbbb is stale"
    assert found["eeeeeeeeeeee"].why == "its input 01_heads run gone is gone"
    assert found["ffffffffffff"].why.startswith("ValueError: unknown operator")
    assert found["aaaaaaaaaaaa"].size_bytes > 100


def test_clean_removes_failed_interrupted_stale_but_never_the_books_runs(filled):
    rows = store.scan()
    removed = store.clean(rows, in_book={filled["old_heads"].resolve()})
    assert {r.key for r in removed} == {"dddddddddddd", "eeeeeeeeeeee", "ffffffffffff", "999999999999", "343434343434"}
    assert filled["old_heads"].is_dir() and filled["heads"].is_dir() and filled["mlp"].is_dir() and filled["live"].is_dir()
    assert filled["resumable"].is_dir() and not filled["old_checkpoints"].exists()  # work a rerun can still use stays
    assert not filled["failed"].exists() and not filled["dead"].exists()


def test_cli_lists_and_cleans(filled, capsys):
    assert main(["runs"]) == 0
    out = capsys.readouterr().out
    assert "stale" in out and "interrupted" in out
    assert "2 complete, 4 stale, 1 failed, 1 interrupted, 1 running, 1 resumable" in out
    assert main(["runs", "clean", "--dry-run"]) == 0
    assert "would remove failed 00_task/tiny/ffffffffffff.failed" in capsys.readouterr().out
    assert filled["failed"].exists()
    assert main(["runs", "clean"]) == 0
    out = capsys.readouterr().out
    assert out.count("removed ") == 6 and not filled["failed"].exists()

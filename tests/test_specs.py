"""Spec checks fail in one line and in seconds — before a kernel starts — instead of inside a notebook."""

import struct
import time

import pytest

from arithlens.core import specs
from arithlens.cli import main
from arithlens.core.registry import ModelSpecError
from arithlens.core.specs import check_spec, resolve_spec


def _string(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


def gguf_file(path, arch: str, before: bytes = b"", n_before: int = 0):
    """A GGUF v3 header whose general.architecture comes after ``n_before`` other key/value pairs."""
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, n_before + 1) + before
                     + _string("general.architecture") + struct.pack("<I", 8) + _string(arch))
    return path


def _fails_fast(spec, message, within=2.0):
    start = time.perf_counter()
    with pytest.raises(ModelSpecError, match=message) as err:
        check_spec(spec)
    assert "\n" not in str(err.value)
    assert time.perf_counter() - start < within
    return str(err.value)


def test_tiny_forms():
    assert resolve_spec("tiny").source == "llama:0"
    assert resolve_spec("tiny:3").source == "llama:3"
    assert resolve_spec("tiny:qwen2").source == "qwen2:0"
    assert resolve_spec("tiny:qwen2:7").source == "qwen2:7"
    assert resolve_spec("tiny-qwen2").kind == "tiny"
    with pytest.raises(ModelSpecError, match="unknown model spec 'tiny:gpt2'"):
        resolve_spec("tiny:gpt2")


def test_gguf_architecture_read_from_the_header(tmp_path):
    # keys before the architecture are skipped: a uint32, and an array of strings (like a vocabulary)
    before = (_string("general.alignment") + struct.pack("<I", 4) + struct.pack("<I", 32)
              + _string("tokenizer.ggml.tokens") + struct.pack("<I", 9) + struct.pack("<I", 8) + struct.pack("<Q", 2)
              + _string("a") + _string("bc"))
    path = gguf_file(tmp_path / "ok.gguf", "qwen2", before, 2)
    assert specs.gguf_architecture(path) == "qwen2"
    assert check_spec(str(path)).kind == "gguf"


def test_gguf_architecture_transformers_cannot_read(tmp_path):
    path = gguf_file(tmp_path / "rwkv.gguf", "rwkv6")
    _fails_fast(str(path), r"GGUF architecture 'rwkv6' of rwkv\.gguf cannot be read by transformers \(it reads: .*llama")


def test_truncated_gguf_header(tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(gguf_file(tmp_path / "x.gguf", "llama").read_bytes()[:30])
    _fails_fast(str(path), "GGUF header of .* is truncated")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _fails_fast(str(tmp_path), "has config.json but no weights")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert check_spec(str(tmp_path)).kind == "local"


def test_hub_id_without_hub_or_cache_fails_fast(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(specs, "hub_status", lambda repo_id, timeout=3.0: None)
    _fails_fast("org/not-there", "hub id 'org/not-there' is not in the local Hugging Face cache and the hub cannot be reached")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails_fast("org/not-there", "not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    # a warm cache needs no hub
    snap = tmp_path / "hf" / "models--org--cached" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "hf" / "models--org--cached" / "refs").mkdir()
    (tmp_path / "hf" / "models--org--cached" / "refs" / "main").write_text("abc123")
    assert check_spec("org/cached").kind == "hub"
    _fails_fast("org/bad--name", "is not a valid hub id")


def test_hub_probe_gives_up_within_its_timeout(monkeypatch):
    import socket

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    assert specs.hub_status("org/x", timeout=0.5) is None
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.perf_counter()
        assert specs.hub_status("org/x", timeout=0.3) is None
        assert time.perf_counter() - start < 1.0


def test_hub_without_the_model(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(specs, "hub_status", lambda repo_id, timeout=3.0: 404)
    _fails_fast("org/not-there", "the hub has no model 'org/not-there'")
    monkeypatch.setattr(specs, "hub_status", lambda repo_id, timeout=3.0: 200)
    assert check_spec("org/there").kind == "hub"


def test_cli_refuses_an_unreachable_hub_id_before_the_kernel(monkeypatch, isolated_runs, capsys, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(specs, "hub_status", lambda repo_id, timeout=3.0: None)
    start = time.perf_counter()
    assert main(["run", "00_task", "--model", "org/not-there"]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err.strip()
    assert err.startswith("arithlens: error: hub id 'org/not-there'") and "\n" not in err
    assert not isolated_runs.exists() or not list(isolated_runs.rglob("*.ipynb"))

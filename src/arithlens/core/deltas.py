"""Deltas: new values for slices of a model's weights — apply, restore, save, load.

Science wing, support for :mod:`arithlens.analyses.sft.trainer` (paper § "Precise SFT"). A tuned model is kept
as the base model plus a :class:`Delta`: only the changed slices, each with a digest of the base
values it replaces, so loading onto the wrong base fails loudly. On disk: ``delta.safetensors``
(safetensors does the format) and ``manifest.json``. Written by hand: the slice bookkeeping.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from arithlens.core.models import LoadedModel


@dataclass(frozen=True, order=True)
class Slice:
    """A contiguous block of one weight: rows (``dim=0``) or columns (``dim=1``) ``start:stop``."""

    param: str  # the plain Hugging Face name, e.g. "model.layers.14.self_attn.q_proj.weight"
    dim: int
    start: int
    stop: int

    def __str__(self) -> str:
        return f"{self.param}[{':, ' if self.dim else ''}{self.start}:{self.stop}]"

    @property
    def layer(self) -> int | None:
        parts = self.param.split(".")
        return int(parts[2]) if parts[:2] == ["model", "layers"] else None


@dataclass(frozen=True)
class Delta:
    """New values for some slices of a model's weights, and a digest of the base values they replace."""

    values: dict[Slice, Tensor]
    base_digest: dict[Slice, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.values.values())


def hf_model(model: LoadedModel | torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face module under a ``LoadedModel``'s bridge (or the module itself)."""
    return model.bridge.original_model if hasattr(model, "bridge") else model


def named_weights(model: LoadedModel | torch.nn.Module) -> dict[str, Tensor]:
    """Plain HF parameter names → tensors: the HF model's own parameters, named as in a plain model.
    Tied weights appear once.

    TransformerBridge wraps HF modules in place: a wrapper holds the HF module as
    ``_original_component`` and may add modules of its own beside it (Phi-3's attention and MLP
    wrappers add ``q``, ``k``, ``v``, ``gate`` and ``in``, views of the fused ``qkv_proj`` and
    ``gate_up_proj``, and are listed before the HF module). So a wrapper is entered through its
    ``_original_component`` only, and that step is left out of the name."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()

    def walk(module: torch.nn.Module, prefix: str) -> None:
        while "_original_component" in module._modules:
            module = module._modules["_original_component"]
        for name, param in module._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                out[prefix + name] = param
        for name, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(hf_model(model), "")
    return out


def slice_view(weights: dict[str, Tensor], s: Slice) -> Tensor:
    return weights[s.param].narrow(s.dim, s.start, s.stop - s.start)


def tensor_digest(t: Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().float().numpy().tobytes()).hexdigest()[:16]


def _write(weights: dict[str, Tensor], values: dict[Slice, Tensor]) -> None:
    with torch.no_grad():
        for s, v in values.items():
            target = slice_view(weights, s)
            target.copy_(v.to(device=target.device, dtype=target.dtype))


def apply_delta(model: LoadedModel | torch.nn.Module, delta: Delta, check_base: bool = True) -> None:
    """Write ``delta`` into ``model``'s weights in place (the bridge sees them: it wraps these modules)."""
    weights = named_weights(model)
    if check_base:
        wrong = [str(s) for s, d in delta.base_digest.items() if tensor_digest(slice_view(weights, s)) != d]
        if wrong:
            raise ValueError(f"delta was trained on a different base: {len(wrong)} slices differ, e.g. {wrong[0]}")
    _write(weights, delta.values)


@contextmanager
def applied(model: LoadedModel | torch.nn.Module, delta: Delta) -> Iterator[LoadedModel | torch.nn.Module]:
    """Within the block, ``model`` carries ``delta``; afterwards its original values are restored."""
    weights = named_weights(model)
    saved = {s: slice_view(weights, s).detach().clone() for s in delta.values}
    apply_delta(model, delta)
    try:
        yield model
    finally:
        _write(weights, saved)


def save_delta(delta: Delta, folder: str | Path, base_model: str = "") -> Path:
    """``delta.safetensors`` (only the tuned slices) and ``manifest.json`` (slices, base digests, meta)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = {s: f"t{i}" for i, s in enumerate(sorted(delta.values))}
    save_file({keys[s]: t.contiguous().cpu() for s, t in delta.values.items()}, str(folder / "delta.safetensors"))
    manifest = {"base_model": base_model, "n_params": delta.n_params, "meta": jsonable(delta.meta),
                "slices": [{"key": keys[s], **asdict(s), "base_digest": delta.base_digest.get(s)} for s in sorted(keys)]}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def load_delta(folder: str | Path) -> Delta:
    """Read what :func:`save_delta` wrote."""
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    tensors = load_file(str(folder / "delta.safetensors"))
    values, digest = {}, {}
    for row in manifest["slices"]:
        s = Slice(row["param"], row["dim"], row["start"], row["stop"])
        values[s] = tensors[row["key"]]
        if row.get("base_digest"):
            digest[s] = row["base_digest"]
    return Delta(values, digest, manifest.get("meta", {}))


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj if isinstance(obj, (int, float, str, bool, type(None))) else str(obj)

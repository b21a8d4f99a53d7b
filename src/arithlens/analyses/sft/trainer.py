"""Precise SFT: fine-tune only chosen heads' slices of W_Q, W_K, W_V, W_O (and, optionally, MLP layers).

Science wing (paper § "Precise SFT"). Exactness is by construction: the tuned slices are copied out
into their own leaf tensors, and those tensors are the *only* thing the optimizer (torch AdamW) ever
sees. Each forward pass rebuilds the touched weight matrices as ``frozen base with the slices pasted
in`` and runs the model's own modules on them (``torch.func.functional_call``), so AdamW's momentum
and weight decay cannot reach a frozen weight — they never hold one. After training, the slices form
a :class:`arithlens.core.deltas.Delta`, which :mod:`arithlens.core.deltas` writes into the model
(:func:`arithlens.core.deltas.applied`), saves as a small safetensors file plus a JSON manifest
(:func:`arithlens.core.deltas.save_delta`) and loads back exactly (:func:`arithlens.core.deltas.load_delta`).

* Slices: head ``h`` of a layer owns rows ``h·d_head … (h+1)·d_head`` of ``q_proj.weight`` and the
  same columns of ``o_proj.weight`` — and, in a model whose projections have biases (Qwen2), the same
  entries of ``q_proj.bias`` (and of ``k_proj.bias``/``v_proj.bias`` with the K/V rows below). Where Q,
  K and V are one fused ``qkv_proj`` (Phi-3: its rows are Q, then K, then V) the same rows are taken
  from it, offset to the Q, K or V block. With grouped-query attention (SmolLM2: 9 query heads share 3
  KV heads) K and V belong to a *group* of query heads, so the policy is a parameter
  (:data:`KVPolicy`): ``"shared"`` tunes the K/V rows of the head's KV group (which the group's other
  query heads also read), ``"frozen"`` tunes only Q and O (strictly head-local).
* The paper's gradient rescale by H/h (heads per layer ÷ heads tuned there) is an option, almost a no-op
  under Adam(W): Adam divides each gradient by its own running scale (under SGD it would boost the rate).
* Cost scales with what is tuned: the loss uses the logits at the answer (last) position only, and
  the residual stream entering the lowest tuned layer is computed once per batch before training
  (nothing below it can change), so each step runs only the layers above.
* Training runs on a plain Hugging Face "twin" of the model that *shares* the bridge's weight
  tensors (no copy; nothing writes to them during training), so TransformerLens hooks cost nothing.

Baselines: :func:`full_sft` (every parameter, same engine) and :func:`lora_sft` (peft LoRA on the
attention projections; its merged update ``B·A·scale`` becomes a delta of whole matrices). All three
train in one loop (:func:`_optimize`): same batches, prefix cache, last-position loss and AdamW. That
loop runs the model's decoder layers itself (:func:`arithlens.core.twin.run_layers`), so it trains only
the architectures whose forward pass that loop is checked to reproduce (:data:`arithlens.core.twin.LAYER_LOOP_CHECKED`); any
other is refused in one line before anything is built (:func:`check_trainable`).
Written by hand: slice bookkeeping and the prefix-cached layer loop; the optimizer is torch's AdamW (its
fused kernel, :func:`fused_adamw`), LoRA is peft, the layers are the model's own.
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from arithlens.core import layout
from arithlens.core.deltas import Delta, Slice, hf_model, jsonable, named_weights, slice_view, tensor_digest
from arithlens.core.twin import LAYER_LOOP_CHECKED, embed, end_logits, make_twin, run_layers
from arithlens.core.hooks import Head
from arithlens.core.models import LoadedModel

KVPolicy = Literal["shared", "frozen"]
MethodKind = Literal["precise", "full", "lora"]
Batch = tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch"]]


@dataclass(frozen=True)
class PreciseSFTConfig:
    """What Precise SFT tunes: heads' attention slices, optionally whole MLP layers."""

    heads: tuple[Head, ...]
    mlp_layers: tuple[int, ...] = ()
    kv: KVPolicy = "shared"
    rescale: bool = False  # the paper's H/h gradient rescale (≈ no-op under AdamW, see module doc)


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer settings shared by every method (AdamW, constant learning rate)."""

    steps: int = 40
    batch_size: int = 32  # what the batches were made with (evaluation.make_batches); kept for the record
    lr: float = 1e-4
    weight_decay: float = 0.01
    seed: int = 0  # seeds peft's LoRA initialisation (nothing else here is random)
    prefix_cache: bool = True


@dataclass(frozen=True)
class Method:
    """One row of the comparison: what is trained, under which label and group."""

    name: str
    kind: MethodKind
    precise: PreciseSFTConfig | None = None
    lora_rank: int = 0
    lora_layers: tuple[int, ...] | None = None  # None: every layer
    lr: float | None = None  # None: the shared TrainConfig's
    seed: int = 0            # the row's seed: LoRA's initialisation, and which training seed or draw it is
    group: str = "main"
    batch_seed: int = 0      # which seeded order of the training batches it trains on


@dataclass(frozen=True)
class TrainResult:
    """A trained delta with its loss curve and timings."""

    delta: Delta
    n_trainable: int
    losses: list[float]
    step_seconds: list[float]
    prefix_seconds: float
    untrained_losses: list[float]  # the untrained weights' loss on the batches of the last quarter of steps
    longer: Delta | None = None  # where asked (``longer`` steps), the same run trained on to that many steps


# --- names and slices ----------------------------------------------------------------------------

def head_slices(cfg, heads, kv: KVPolicy = "shared", bias: bool = False, fused_qkv: bool = False) -> list[Slice]:
    """The Q, O (and, with ``kv="shared"``, K, V) slices of ``heads``; K/V slices deduplicated. With
    ``bias`` (q/k/v projections that have biases) the same rows of each bias too: they are the head's
    as much as its weights are. With ``fused_qkv`` the Q, K and V rows are those of one ``qkv_proj``
    (rows: Q of every head, then K, then V of every KV head)."""
    d_head, n_heads = int(cfg.d_head), int(cfg.n_heads)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    if kv not in ("shared", "frozen"):
        raise ValueError(f"unknown kv policy {kv!r}: choose 'shared' or 'frozen'")
    kinds = ("weight", "bias") if bias else ("weight",)
    # where each of Q, K, V lives: (projection, first row of its block)
    where = ({"q": ("qkv_proj", 0), "k": ("qkv_proj", n_heads * d_head), "v": ("qkv_proj", (n_heads + n_kv) * d_head)}
             if fused_qkv else {"q": ("q_proj", 0), "k": ("k_proj", 0), "v": ("v_proj", 0)})
    out: list[Slice] = []
    for h in heads:
        if not (0 <= h.layer < cfg.n_layers and 0 <= h.head < n_heads):
            raise ValueError(f"head {h} is outside the model ({cfg.n_layers} layers × {n_heads} heads)")
        attn = f"model.layers.{h.layer}.self_attn"
        group = h.head // (n_heads // n_kv)  # the KV head this query head reads
        rows = {"q": h.head, "k": group, "v": group}
        out.append(Slice(f"{attn}.o_proj.weight", 1, h.head * d_head, (h.head + 1) * d_head))
        for which in ("q", "k", "v") if kv == "shared" else ("q",):
            proj, first = where[which]
            start = first + rows[which] * d_head
            out += [Slice(f"{attn}.{proj}.{kind}", 0, start, start + d_head) for kind in kinds]
    return sorted(set(out))


def whole_slices(model: LoadedModel | torch.nn.Module, predicate=lambda name: True) -> list[Slice]:
    """Every parameter whose name satisfies ``predicate``, as whole-tensor slices."""
    return [Slice(n, 0, 0, p.shape[0]) for n, p in named_weights(model).items() if predicate(n)]


def mlp_slices(model: LoadedModel | torch.nn.Module, layers: Iterable[int]) -> list[Slice]:
    """All MLP weights (gate, up, down) of ``layers``."""
    wanted = {f"model.layers.{l}.mlp." for l in layers}
    return whole_slices(model, lambda n: any(n.startswith(w) for w in wanted))


def fused_qkv(model: LoadedModel | torch.nn.Module) -> bool:
    """Whether the model's attention projects Q, K and V with one ``qkv_proj`` (Phi-3)."""
    return any(n.endswith("self_attn.qkv_proj.weight") for n in named_weights(model))


def precise_slices(model: LoadedModel, config: PreciseSFTConfig) -> list[Slice]:
    """Everything ``config`` tunes: its heads' attention slices (their q/k/v bias entries too, where the
    model has them) and its MLP layers' weights."""
    fused = fused_qkv(model)
    bias = any(n.endswith(f"self_attn.{'qkv_proj' if fused else 'q_proj'}.bias") for n in named_weights(model))
    heads = head_slices(model.cfg, config.heads, config.kv, bias=bias, fused_qkv=fused)
    return heads + mlp_slices(model, config.mlp_layers)


def count_params(model: LoadedModel | torch.nn.Module, slices: list[Slice]) -> int:
    """Number of weights in ``slices`` (trainable parameters, before training)."""
    weights = named_weights(model)
    return sum(slice_view(weights, s).numel() for s in slices)


def rescale_factors(cfg, config: PreciseSFTConfig, slices: list[Slice]) -> dict[Slice, float]:
    """The paper's H/h per slice: H heads per layer ÷ h heads tuned in that layer (MLP slices: 1)."""
    per_layer = defaultdict(int)
    for h in set(config.heads):
        per_layer[h.layer] += 1
    return {s: (cfg.n_heads / per_layer[s.layer] if ".self_attn." in s.param else 1.0) for s in slices}


# --- the forward pass above a cached prefix --------------------------------------------------------

def start_layer(slices: list[Slice], n_layers: int) -> int:
    """The first layer whose input depends on a tuned slice; -1 when the embedding is tuned."""
    layers = [s.layer if s.layer is not None else (-1 if "embed_tokens" in s.param else n_layers) for s in slices]
    return min(layers)


def check_trainable(model: LoadedModel) -> None:
    """Refuse, in one line, a model whose forward pass the training loop is not checked to reproduce."""
    arch = layout.architecture(model)
    if arch not in LAYER_LOOP_CHECKED:
        raise NotImplementedError(f"the fine-tuning loop does not reproduce {arch}'s forward pass (checked on: "
                                  f"{', '.join(sorted(LAYER_LOOP_CHECKED))}); it cannot train this model")


def effective_weights(weights: dict[str, Tensor], trainable: dict[Slice, Tensor]) -> dict[str, Tensor]:
    """Each touched weight rebuilt as the frozen base with the trainable slices pasted in (autograd
    flows into the slices only); a slice covering a whole tensor is used as is."""
    by_param: dict[str, list[Slice]] = defaultdict(list)
    for s in trainable:
        by_param[s.param].append(s)
    out = {}
    for name, slices in by_param.items():
        base = weights[name]
        if len(slices) == 1 and slices[0].start == 0 and slices[0].stop == base.shape[slices[0].dim]:
            out[name] = trainable[slices[0]]
            continue
        w = base.detach().clone()
        for s in slices:
            w.narrow(s.dim, s.start, s.stop - s.start).copy_(trainable[s])
        out[name] = w
    return out


# --- training ----------------------------------------------------------------------------------------

def step_loss(twin: torch.nn.Module, batch: Batch, start: int, eff: dict[str, Tensor],
              prefix: Tensor | None = None) -> Tensor:
    """Cross-entropy of the answer token at the last position; ``prefix`` = cached residual entering ``start``."""
    tokens, answers = batch
    hidden = prefix
    if hidden is None and start > 0:  # nothing below ``start`` is tuned: no graph needed there
        with torch.no_grad():
            hidden = run_layers(twin, embed(twin, tokens), 0, start)
    elif hidden is None:
        hidden = embed(twin, tokens, eff)
    return F.cross_entropy(end_logits(twin, hidden, start, eff).float(), answers)


#: Prefix caches kept for the next rows that train from the same layer on the same batches (every Precise SFT
#: seed on its batches, each random draw, LoRA from the key heads' layer): the most recent few.
PREFIXES_KEPT = 4
_PREFIXES: dict[tuple, tuple[list[Tensor], dict[int, Tensor]]] = {}


def _prefixes(net: torch.nn.Module, batches: list[Batch], start: int, dev) -> dict[int, Tensor]:
    """The residual stream entering ``start`` for each of ``batches``, computed once and kept
    (:data:`PREFIXES_KEPT`). Nothing below ``start`` is trained, and the key holds the storage and version
    counter of every weight below it: a weight written in place in between (a delta applied) makes a new cache."""
    below = [net.model.embed_tokens.weight, *(p for layer in net.model.layers[:start] for p in layer.parameters())]
    key = (start, tuple(id(tokens) for tokens, _ in batches), tuple((p.data_ptr(), p._version) for p in below))
    if key not in _PREFIXES:
        with torch.no_grad():
            cache = {i: run_layers(net, embed(net, tokens.to(dev)), 0, start) for i, (tokens, _) in enumerate(batches)}
        while len(_PREFIXES) >= PREFIXES_KEPT:
            _PREFIXES.pop(next(iter(_PREFIXES)))
        _PREFIXES[key] = ([tokens for tokens, _ in batches], cache)  # the tokens held: their ids stay theirs
    return _PREFIXES[key][1]


def fused_adamw(params: list[Tensor]) -> bool:
    """AdamW's fused kernel where every parameter is a float on a CPU or CUDA device: the same update in one
    pass over each tensor's state (full SFT of Qwen 0.5B on 2 cores: ~0.3 s a step instead of ~3.5)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def _optimize(net: torch.nn.Module, params: list[Tensor], batches: list[Batch], train: TrainConfig, start: int,
              lr: float, desc: str, effective: Callable[[], dict[str, Tensor]] = dict,
              after_backward: Callable[[], None] | None = None, progress=None,
              snapshot: Callable[[], Delta] | None = None,
              longer: int = 0) -> tuple[list[float], list[float], float, list[float], Delta | None]:
    """The training loop every method shares: AdamW on ``params``, one step per batch (``train.steps``,
    cycling), the answer's cross-entropy at the last position (:func:`step_loss`) with the weights
    ``effective()`` returns, the residual stream entering layer ``start`` cached per batch beforehand
    (``train.prefix_cache``). Returns (losses, seconds per step, seconds spent on the prefix cache, the
    untrained weights' loss on the batches of the last quarter of steps: what the last quarter's losses are
    read against to tell whether the run trained, on the same batches, :func:`last_quarter`; None).

    With ``longer`` > ``train.steps`` the loop goes on to ``longer`` steps, and the last item is ``snapshot()`` after
    step ``train.steps``: exactly the shorter run (constant rate, same batches). Losses and times: the first steps'."""
    dev = next(net.parameters()).device
    total = max(train.steps, longer)
    if longer > train.steps and snapshot is None:
        raise ValueError("training on past train.steps needs a snapshot of the shorter run")
    t0 = time.perf_counter()
    prefixes: dict[int, Tensor] = {}
    if train.prefix_cache and start > 0:
        prefixes = _prefixes(net, batches[: total], start, dev)
    prefix_s = time.perf_counter() - t0
    untrained = []
    with torch.no_grad():  # the untrained weights on the last quarter's batches: what *trained* is read against
        for step in last_quarter(train.steps):
            tokens, answers = batches[step % len(batches)]
            untrained.append(float(step_loss(net, (tokens.to(dev), answers.to(dev)), start, effective(),
                                             prefixes.get(step % len(batches)))))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=train.weight_decay, fused=fused_adamw(params))
    losses, times, shorter = [], [], None
    steps = range(total)
    for step in (progress(steps, desc=desc) if progress else steps):
        tokens, answers = batches[step % len(batches)]
        t = time.perf_counter()
        loss = step_loss(net, (tokens.to(dev), answers.to(dev)), start, effective(), prefixes.get(step % len(batches)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
        if step + 1 == train.steps and total > train.steps:
            shorter = snapshot()
    return losses[: train.steps], times[: train.steps], prefix_s, untrained, shorter


def last_quarter(steps: int) -> range:
    """The steps whose losses tell whether a run trained: the last quarter (at least one)."""
    return range(steps - max(1, steps // 4), steps)


def _longer(result: TrainResult, shorter: Delta | None) -> TrainResult:
    """``result`` as the shorter run it passed through, its own delta as ``longer`` (unchanged if none)."""
    return result if shorter is None else replace(result, delta=shorter, longer=result.delta)


def train_slices(model: LoadedModel, slices: list[Slice], batches: list[Batch], train: TrainConfig,
                 grad_scale: dict[Slice, float] | None = None, progress=None,
                 twin: torch.nn.Module | None = None, longer: int = 0) -> TrainResult:
    """AdamW on exactly ``slices`` over ``batches`` (one step each, ``train.steps`` of them, cycling); with
    ``longer`` (more steps than ``train.steps``), trained on to that many and returned with it as ``longer``."""
    if not slices:
        raise ValueError("nothing to train: no slices")
    check_trainable(model)
    twin = twin or make_twin(model)
    weights = named_weights(twin)
    trainable = {s: slice_view(weights, s).detach().clone().requires_grad_(True) for s in slices}

    def rescale() -> None:
        for s, tensor in trainable.items():
            tensor.grad.mul_(grad_scale.get(s, 1.0))
    digest = {s: tensor_digest(slice_view(weights, s)) for s in slices}
    trained = lambda: Delta({s: t.detach().clone() for s, t in trainable.items()}, dict(digest))
    losses, times, prefix_s, untrained, shorter = _optimize(
        twin, list(trainable.values()), batches, train, start_layer(slices, len(twin.model.layers)), train.lr,
        f"training {len(slices)} slices", lambda: effective_weights(weights, trainable),
        rescale if grad_scale else None, progress, trained, longer)
    result = TrainResult(trained(), sum(t.numel() for t in trainable.values()), losses, times, prefix_s, untrained)
    return _longer(result, shorter)


def _with_meta(result: TrainResult, meta: dict) -> TrainResult:
    longer = None if result.longer is None else replace(result.longer, meta=meta)
    return replace(result, delta=replace(result.delta, meta=meta), longer=longer)


def precise_sft(model: LoadedModel, batches: list[Batch], config: PreciseSFTConfig, train: TrainConfig = TrainConfig(),
                progress=None, twin: torch.nn.Module | None = None, longer: int = 0) -> TrainResult:
    """Paper § "Precise SFT": tune only ``config``'s head slices (and MLP layers)."""
    slices = precise_slices(model, config)
    scale = rescale_factors(model.cfg, config, slices) if config.rescale else None
    result = train_slices(model, slices, batches, train, scale, progress, twin, longer)
    return _with_meta(result, {"method": "precise", "heads": [str(h) for h in config.heads], "config": jsonable(asdict(config))})


def full_sft(model: LoadedModel, batches: list[Batch], train: TrainConfig = TrainConfig(), progress=None,
             twin: torch.nn.Module | None = None, longer: int = 0) -> TrainResult:
    """The paper's baseline: every parameter trainable, same optimizer, same last-position loss."""
    return _with_meta(train_slices(model, whole_slices(model), batches, train, None, progress, twin, longer), {"method": "full"})


def lora_sft(model: LoadedModel, batches: list[Batch], rank: int, train: TrainConfig = TrainConfig(), layers=None,
             alpha: float | None = None, lr: float | None = None, progress=None, longer: int = 0) -> TrainResult:
    """peft LoRA on q/k/v/o of ``layers`` (default all; a fused ``qkv_proj`` and ``o_proj`` where Q, K and
    V are one projection); its merged update becomes a whole-matrix delta."""
    from peft import LoraConfig, get_peft_model

    check_trainable(model)
    twin = make_twin(model)
    layers = list(range(model.n_layers)) if layers is None else sorted(layers)
    targets = ["qkv_proj", "o_proj"] if fused_qkv(model) else ["q_proj", "k_proj", "v_proj", "o_proj"]
    cfg = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, layers_to_transform=layers,
                     target_modules=targets, layers_pattern="layers")
    torch.manual_seed(train.seed)  # peft initialises A from the global generator
    with warnings.catch_warnings():  # peft asks transformers about gradient checkpointing via a deprecated name
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(twin, cfg)
    inner = peft_model.base_model.model
    params = [p for p in peft_model.parameters() if p.requires_grad]
    weights = named_weights(model)

    def merged() -> Delta:  # each adapted matrix with its update B·A·scale merged in, as it stands
        values, digest = {}, {}
        for name, module in inner.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                pname = name + ".weight"
                s = Slice(pname, 0, 0, weights[pname].shape[0])
                with torch.no_grad():
                    values[s] = (weights[pname] + module.get_delta_weight("default")).detach().clone()
                digest[s] = tensor_digest(weights[pname])
        return Delta(values, digest, {"method": "lora", "rank": rank, "layers": layers})

    losses, times, prefix_s, untrained, shorter = _optimize(inner, params, batches, train, min(layers), lr or train.lr,
                                                            f"LoRA r={rank}", progress=progress, snapshot=merged,
                                                            longer=longer)
    return _longer(TrainResult(merged(), sum(p.numel() for p in params), losses, times, prefix_s, untrained), shorter)


def lora_rank_for(model: LoadedModel, n_params: int, layers=None) -> int:
    """The LoRA rank on q/k/v/o of ``layers`` whose trainable-parameter count is closest to ``n_params``."""
    cfg = model.cfg
    d, kv = int(cfg.d_model), int(cfg.d_head) * int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    # A and B of each adapted matrix: fused qkv d→d+2kv and o d→d; or q and o d→d, k and v d→kv
    per_rank = (d + d + 2 * kv) + (d + d) if fused_qkv(model) else (d + d) * 2 + (d + kv) * 2
    n_layers = model.n_layers if layers is None else len(layers)
    return max(1, round(n_params / (per_rank * n_layers)))


def train_method(model: LoadedModel, batches: list[Batch], method: Method, train: TrainConfig = TrainConfig(),
                 progress=None, twin: torch.nn.Module | None = None, longer: int = 0) -> TrainResult:
    """Dispatch one :class:`Method` to :func:`precise_sft`, :func:`full_sft` or :func:`lora_sft` (``longer``:
    also the same run trained on to that many steps, :func:`_optimize`)."""
    train = replace(train, lr=method.lr or train.lr, seed=method.seed)
    if method.kind == "precise":
        return precise_sft(model, batches, method.precise, train, progress, twin, longer)
    if method.kind == "full":
        return full_sft(model, batches, train, progress, twin, longer)
    if method.kind == "lora":
        return lora_sft(model, batches, method.lora_rank, train, method.lora_layers, progress=progress, longer=longer)
    raise ValueError(f"unknown method kind {method.kind!r}")

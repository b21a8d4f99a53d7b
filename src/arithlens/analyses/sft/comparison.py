"""The rows of chapter 4's comparison: which methods are trained, at which learning rate, and which
trained deltas are kept (the rows' names and families are :mod:`arithlens.analyses.sft.naming`).

Science wing (paper § "Precise SFT", and the baselines the paper does not report). Chapter 4 first
chooses a learning rate for each family on validation (:func:`selection_methods`: one row per family
and rate of its grid — full SFT, Precise SFT on chapter 1's key heads, one layer-matched random draw,
LoRA with a matched parameter budget — trained with the first training seed), then trains the grid
:func:`method_grid` builds at those rates: full SFT, Precise SFT and LoRA over several training seeds;
as many random heads as key heads, in many layer-matched draws (the distribution the key heads are
placed in, verdict R6) and a few from every layer as a check; the *anti-key* heads (the key heads'
layers and above, smallest effect in chapter 1); and two ablations (fewer or more key heads; key heads
plus MLP layers). Its tables name each row (``"Precise SFT (10 key heads)"``, ``"random 10 heads"``,
``"LoRA r=9"``, ``"full SFT"``), and later readers of those stored tables — the C6 and R6 rules
(:mod:`arithlens.claims.verdicts`), chapter 5's summaries, chapter 6 — tell the rows apart by
:func:`arithlens.analyses.sft.naming.method_family`, never by matching strings of their own. Each family's chosen run is
then trained on to twice the steps (:func:`convergence_table`) to say whether its training had converged. Chapter 4
keeps the trained deltas of those four runs (:func:`kept_deltas`, :data:`~arithlens.analyses.sft.naming.KEPT_FOLDERS`): chapter 6 compares the neurons three of them move, chapter 8 asks each the paper's
public benchmarks (its Table 1).

Each rate tried (:func:`try_rate`) and each trained row (:func:`train_and_evaluate`: trained and
evaluated) is one unit of work with a result that can be stored, so that a long
chapter killed part-way resumes from the units it finished (:func:`arithlens.record.resumed`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from arithlens.analyses.sft.naming import (FULL, KEPT_FOLDERS, LORA, PRECISE, RANDOM, anti_name, lora_name,
                                            method_family, mlp_name, precise_name, random_all_name, random_name)
from arithlens.analyses.sft.from_layer import FromLayerEvaluator
from arithlens.analyses.sft.trainer import (KVPolicy, Method, PreciseSFTConfig, TrainConfig, count_params, last_quarter,
                                            lora_rank_for, precise_slices, train_method)
from arithlens.core.metrics import bootstrap_means
from arithlens.core.hooks import Head, layer_matched_random_sets, random_heads
from arithlens.core.deltas import Delta
from arithlens.core.models import LoadedModel


@dataclass(frozen=True)
class GridConfig:
    """Chapter 4's choices of rows (its parameters of the same names).

    ``lr_grid`` is tried for Precise SFT and the random heads, ``full_lr_grid`` for full SFT (every
    weight moves: the usual full fine-tuning rates are lower) and ``lora_lr_grid`` for LoRA (whose update
    starts at zero). ``training_seeds`` seeds of full SFT, Precise SFT and LoRA (each
    its own order of the training batches); ``random_draws`` layer-matched random sets (as many heads
    in each layer as the key heads, never a key head, :func:`arithlens.core.hooks.layer_matched_random_sets`
    seeded ``seed + 1``) and ``all_layer_draws`` from every layer; LoRA on the key heads' lowest layer
    and above."""

    key_heads: int = 10
    kv: KVPolicy = "shared"
    rescale: bool = False
    lr_grid: tuple[float, ...] = (1e-5, 1e-4, 3e-4, 1e-3)
    full_lr_grid: tuple[float, ...] = (1e-6, 1e-5, 1e-4)
    lora_lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3)
    training_seeds: int = 3
    random_draws: int = 10
    all_layer_draws: int = 2
    anti_key: bool = True
    head_counts: tuple[int, ...] = (5, 20)
    mlp_counts: tuple[int, ...] = (3,)
    seed: int = 0


@dataclass(frozen=True)
class Sizing:
    """What every grid shares: the key heads, Precise SFT's size, the matched LoRA rank and the band."""

    key: tuple[Head, ...]
    n_precise: int           # Precise SFT's trainable weights (before training)
    lora_rank: int           # the LoRA rank whose trainable weights come closest to n_precise
    lora_layers: tuple[int, ...]
    band: int                # the key heads' lowest layer


@dataclass(frozen=True)
class MethodGrid:
    """The rows to train, in the order the chapter shows them, with what sizing them found."""

    methods: tuple[Method, ...]
    precise: Method          # the main row: Precise SFT on the key heads (first seed)
    n_precise: int
    lora_rank: int
    lora_layers: tuple[int, ...]
    band: int


def _tuned(config: GridConfig, heads, mlps=()) -> PreciseSFTConfig:
    return PreciseSFTConfig(tuple(heads), tuple(mlps), kv=config.kv, rescale=config.rescale)


def sizing(model: LoadedModel, ranking: Sequence[Head], config: GridConfig) -> Sizing:
    key = tuple(ranking[:config.key_heads])
    band = min(h.layer for h in key)
    n_precise = count_params(model, precise_slices(model, _tuned(config, key)))
    layers = tuple(range(band, model.n_layers))
    return Sizing(key, n_precise, lora_rank_for(model, n_precise, layers), layers, band)


def _random_draws(model: LoadedModel, key: Sequence[Head], config: GridConfig) -> list[list[Head]]:
    return layer_matched_random_sets(key, model.n_layers, model.n_heads, max(1, config.random_draws), config.seed + 1)


def selection_methods(model: LoadedModel, ranking: Sequence[Head], config: GridConfig) -> list[Method]:
    """One row per tuned family and learning rate (group ``lr selection``), first training seed: full
    SFT, Precise SFT on the key heads, the first layer-matched random draw, LoRA."""
    size = sizing(model, ranking, config)
    k = len(size.key)
    draw = _random_draws(model, size.key, config)[0]
    rows = [Method(FULL, "full", lr=lr, group="lr selection") for lr in config.full_lr_grid]
    for lr in config.lr_grid:
        rows += [Method(precise_name(k), "precise", _tuned(config, size.key), lr=lr, group="lr selection"),
                 Method(random_name(k), "precise", _tuned(config, draw), lr=lr, group="lr selection")]
    rows += [Method(lora_name(size.lora_rank), "lora", lora_rank=size.lora_rank, lora_layers=size.lora_layers, lr=lr,
                    group="lr selection") for lr in config.lora_lr_grid]
    return rows


def choose_rates(validation: pd.DataFrame) -> dict[str, float]:
    """Per family, the learning rate with the highest validation accuracy (ties: the smaller rate).
    ``validation``: one row per selection row with ``method``, ``lr`` and ``accuracy``."""
    out = {}
    for family, part in validation.assign(family=validation["method"].map(method_family)).groupby("family"):
        best = part.sort_values(["accuracy", "lr"], ascending=[False, True]).iloc[0]
        out[family] = float(best["lr"])
    return out


#: A family whose best rate is the smallest (or largest) it has tried is tried again this factor lower (or
#: higher), one rate at a time, until its best rate lies inside what it tried or it has gone
#: :data:`EDGE_TRIES` rates past its grid on that side (:func:`beyond_edges`).
EDGE_STEP = 10 ** 0.5
EDGE_TRIES = 2


def at_edge(validation: pd.DataFrame) -> dict[str, str]:
    """The families whose chosen rate (:func:`choose_rates`) is the smallest or the largest they have
    tried: family → ``"low"`` or ``"high"`` (a family that tried one rate only: ``"low"``)."""
    tried = validation.assign(family=validation["method"].map(method_family)).groupby("family")["lr"]
    lo, hi = tried.min(), tried.max()
    return {f: "low" if lr == lo[f] else "high" for f, lr in choose_rates(validation).items() if lr in (lo[f], hi[f])}


def grid_of(config: GridConfig, family: str) -> tuple[float, ...]:
    """The rates a family's selection starts from: LoRA's and full SFT's own grids, the shared grid for
    the families that tune heads."""
    return {LORA: config.lora_lr_grid, FULL: config.full_lr_grid}.get(family, config.lr_grid)


def beyond_edges(tried: Sequence[Method], validation: pd.DataFrame, config: GridConfig) -> list[Method]:
    """The rates to try next: for each family :func:`at_edge`, its chosen selection row (one of ``tried``,
    the rows ``validation`` scored) again at the rate :data:`EDGE_STEP` beyond — unless it has already gone
    :data:`EDGE_TRIES` rates past its grid (:func:`grid_of`) that way."""
    rates, out = choose_rates(validation), []
    for family, side in at_edge(validation).items():
        grid = grid_of(config, family)
        lrs = [m.lr for m in tried if method_family(m.name) == family]
        past = sum(lr < min(grid) for lr in lrs) if side == "low" else sum(lr > max(grid) for lr in lrs)
        if past < EDGE_TRIES:
            row = next(m for m in tried if method_family(m.name) == family and m.lr == rates[family])
            out.append(replace(row, lr=row.lr / EDGE_STEP if side == "low" else row.lr * EDGE_STEP))
    return out


def method_grid(model: LoadedModel, ranking: Sequence[Head], mlp_order: Sequence[int], config: GridConfig,
                rates: Mapping[str, float]) -> MethodGrid:
    """Chapter 4's rows at the chosen ``rates`` (family → learning rate, :func:`choose_rates`): full SFT,
    Precise SFT and LoRA for each training seed; the layer-matched random draws and the all-layer check
    draws at the random family's rate; the anti-key heads at Precise SFT's rate; Precise SFT on the top
    ``k`` heads for each ``k`` of ``head_counts`` (group ``heads ablation``) and the key heads plus the
    first ``m`` MLP layers of ``mlp_order`` (chapter 2's ranking, group ``MLP ablation``), at Precise
    SFT's rate, first seed."""
    size = sizing(model, ranking, config)
    key, k = size.key, len(size.key)
    seeds = range(config.training_seeds)
    p_lr = rates[PRECISE]
    rows = [Method(FULL, "full", lr=rates[FULL], seed=s, batch_seed=s) for s in seeds]
    precise = [Method(precise_name(k), "precise", _tuned(config, key), lr=p_lr, seed=s, batch_seed=s) for s in seeds]
    rows += precise
    rows += [Method(random_name(k), "precise", _tuned(config, heads), lr=rates[RANDOM], seed=d)
             for d, heads in enumerate(_random_draws(model, key, config)[:config.random_draws])]
    rows += [Method(random_all_name(k), "precise", _tuned(config, random_heads(model.n_layers, model.n_heads, k,
                                                                              seed=config.seed + 101 + d, exclude=key)),
                    lr=rates[RANDOM], seed=d, group="check") for d in range(config.all_layer_draws)]
    rows += [Method(lora_name(size.lora_rank), "lora", lora_rank=size.lora_rank, lora_layers=size.lora_layers,
                    lr=rates[LORA], seed=s, batch_seed=s) for s in seeds]
    if config.anti_key:
        rows.append(Method(anti_name(k), "precise", _tuned(config, anti_key_heads(ranking, key, size.band, k)), lr=p_lr))
    rows += [Method(precise_name(n), "precise", _tuned(config, ranking[:n]), lr=p_lr, group="heads ablation")
             for n in config.head_counts]
    rows += [Method(mlp_name(k, m), "precise", _tuned(config, key, sorted(mlp_order[:m])), lr=p_lr, group="MLP ablation")
             for m in config.mlp_counts]
    return MethodGrid(tuple(rows), precise[0], size.n_precise, size.lora_rank, size.lora_layers, size.band)


def anti_key_heads(ranking: Sequence[Head], key: Sequence[Head], band: int, k: int) -> list[Head]:
    """The ``k`` heads at the end of chapter 1's full ranking (strongest first) in layers ≥ ``band``,
    never a key head: the heads whose patching moved the answer least, or raised it."""
    pool = [h for h in ranking if h.layer >= band and h not in set(key)]
    return pool[-k:]


def scored_kinds(method: Method, config: GridConfig) -> tuple[str, ...] | None:
    """The kinds of set a row is scored on: the layer-matched random draws past the first
    ``config.training_seeds`` only on the math sets (0-shot arithmetic and the math suites: what R6 places
    the key heads among), so that the random heads' controls and 3-shot sets rest on as many draws as
    the other families have seeds; every other row on every set (None)."""
    if method_family(method.name) == RANDOM and method.group == "main" and method.seed >= config.training_seeds:
        return ("math",)
    return None


def first_rows(methods: Sequence[Method]) -> list[Method]:
    """The first main-group row of full SFT, Precise SFT, random heads and LoRA: each family's first training
    seed (the random heads' first draw), trained as its rate was chosen — on the first seed's batches."""
    rows: dict[str, Method] = {}
    for method in methods:
        family = method_family(method.name)
        if method.group == "main" and family in (FULL, PRECISE, RANDOM, LORA):
            rows.setdefault(family, method)
    return list(rows.values())


def kept_deltas(methods: Sequence[Method]) -> dict[Method, str]:
    """The rows whose trained delta chapter 4 keeps, each with its folder (:data:`~arithlens.analyses.sft.naming.KEPT_FOLDERS`): each
    family's :func:`first_rows` row — the first full SFT, Precise SFT and LoRA seeds, the first random draw."""
    return {method: KEPT_FOLDERS[method_family(method.name)] for method in first_rows(methods)}


#: When chapter 4 says a family's chosen training has not converged.
CONVERGENCE_RULE = ("the family's chosen run trained on to twice the steps, on the same batches and then the next "
                    "ones: not converged when the paired 95 % interval of its validation accuracy gain lies above zero")


def convergence_table(rows: Sequence[Method], at_steps: Mapping[str, np.ndarray], longer: Mapping[str, np.ndarray],
                      steps: int, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Each family's chosen run (``rows``: :func:`first_rows`, trained on to ``2 × steps`` steps — the selection
    run's batches first, :func:`arithlens.analyses.sft.evaluation.make_batches` being a prefix of itself, then the
    next ones; :func:`train_and_evaluate`'s ``longer``) against itself at ``steps`` (``at_steps``: the selection
    run's per-prompt validation correctness, ``longer``: the longer run's, by row name). One row per family:
    accuracy at both lengths, the paired gain with a bootstrap CI over the validation prompts, and
    ``converged`` (:data:`CONVERGENCE_RULE`)."""
    out = []
    for method in rows:
        before, after = (np.asarray(c[method.name], dtype=float) for c in (at_steps, longer))
        mean, low, high, _ = bootstrap_means(np.stack([before, after, after - before], axis=1), n_boot, seed)
        out.append({"family": method_family(method.name), "method": method.name, "lr": method.lr,
                    "steps": steps, "accuracy": mean[0], f"accuracy at {2 * steps}": mean[1],
                    "gain": mean[2], "gain low": low[2], "gain high": high[2], "converged": not low[2] > 0})
    return pd.DataFrame(out)


# --- units of work (each can be kept and resumed) ---------------------------------------------------

def _last_loss(losses: Sequence[float], steps: int) -> float:
    """The mean loss over the last quarter of the steps (:func:`~arithlens.analyses.sft.trainer.last_quarter`)."""
    return float(pd.Series([losses[s] for s in last_quarter(steps)]).mean())


def _losses(result, steps: int) -> dict[str, float]:
    """A row's loss columns: its first step's, its last quarter's, and the untrained weights' on those same
    batches (what *trained* is read against: the batches differ from step to step)."""
    return {"first loss": result.losses[0], "last loss": _last_loss(result.losses, steps),
            "untrained loss": float(np.mean(result.untrained_losses))}


@dataclass(frozen=True)
class Trial:
    """One learning rate tried on validation (:func:`try_rate`)."""

    correct: np.ndarray  # per validation prompt
    row: dict  # method, family, lr, accuracy, first loss, last loss, untrained loss
    seconds: float


def try_rate(model: LoadedModel, batches, method: Method, config: TrainConfig, evaluator: FromLayerEvaluator,
             twin=None) -> Trial:
    """Train ``method`` at its rate on ``batches`` and score it on the validation prompts (``evaluator``'s)."""
    tick = time.perf_counter()
    result = train_method(model, batches, method, config, twin=twin)
    correct = evaluator.validation(result.delta)
    row = {"method": method.name, "family": method_family(method.name), "lr": method.lr, "accuracy": correct.mean(),
           **_losses(result, config.steps)}
    return Trial(correct, row, time.perf_counter() - tick)


@dataclass(frozen=True)
class RowRun:
    """One trained row of the comparison (:func:`train_and_evaluate`)."""

    scores: pd.DataFrame  # evaluation.evaluate's rows, with method, seed and group
    trained: dict  # the training table's row
    delta: Delta | None  # the trained delta where the row's is kept (:func:`kept_deltas`), else None
    seconds: dict[str, float]  # training and evaluation
    longer: np.ndarray | None = None  # where asked, per validation prompt: the run trained on to ``longer`` steps


def train_and_evaluate(model: LoadedModel, batches, method: Method, config: TrainConfig, evaluator: FromLayerEvaluator,
                       keep: bool = False, twin=None, kinds: tuple[str, ...] | None = None, longer: int = 0) -> RowRun:
    """Train ``method`` and score the evaluation sets and suites of ``evaluator`` with its delta (those of ``kinds``
    only where given, :func:`scored_kinds`); ``keep``: return the delta too. With ``longer`` (more steps than
    ``config.steps``; ``batches`` at least that many) the run goes on to that many steps, and the validation
    prompts are scored with that longer run too (:func:`convergence_table`; counted as training)."""
    tick = time.perf_counter()
    result = train_method(model, batches, method, config, twin=twin, longer=longer)
    longer_correct = None if result.longer is None else evaluator.validation(result.longer)
    seconds = {"training": time.perf_counter() - tick}
    tick = time.perf_counter()
    scores = evaluator.evaluate(result.delta, kinds).assign(method=method.name, seed=method.seed, group=method.group)
    seconds["evaluation"] = time.perf_counter() - tick
    trained = {"method": method.name, "group": method.group, "seed": method.seed, "lr": method.lr,
               "heads": ", ".join(map(str, method.precise.heads)) if method.precise else "—",
               "trainable (M)": result.n_trainable / 1e6, "step (s)": pd.Series(result.step_seconds).median(),
               "prefix (s)": result.prefix_seconds, **_losses(result, config.steps)}
    return RowRun(scores, trained, result.delta if keep else None, seconds, longer_correct)

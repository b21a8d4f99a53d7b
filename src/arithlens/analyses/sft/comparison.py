"""The rows of chapter 4's comparison: which methods are trained and which trained deltas are kept
(the rows' names and families are :mod:`arithlens.analyses.sft.naming`).

Science wing (paper § "Precise SFT", and the two baselines the paper does not report). Chapter 4
trains the grid :func:`method_grid` builds from its parameters: full SFT, Precise SFT on chapter 1's
key heads, the same number of random heads (several draws), LoRA with a matched parameter budget,
and two ablations (fewer or more key heads; key heads plus MLP layers). Its tables name each row
(``"Precise SFT (10 key heads)"``, ``"random 10 heads"``, ``"LoRA r=9"``, ``"full SFT"``), and later
readers of those stored tables — the C6 rule (:mod:`arithlens.claims.verdicts`), chapter 5's
summaries, chapter 6 — tell the rows apart by :func:`arithlens.analyses.sft.naming.method_family`, never by matching strings of
their own. Chapter 4 keeps the trained deltas of three rows (:data:`arithlens.analyses.sft.naming.DELTA_FOLDERS`,
:func:`kept_deltas`) for chapter 6 to compare the neurons each moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from arithlens.analyses.sft.naming import (DELTA_FOLDERS, FULL, lora_name, method_family, mlp_name, precise_name,
                                            random_name)
from arithlens.analyses.sft.trainer import KVPolicy, Method, PreciseSFTConfig, count_params, lora_rank_for, precise_slices
from arithlens.core.hooks import Head, random_heads
from arithlens.core.models import LoadedModel

Scope = Literal["band", "all"]


@dataclass(frozen=True)
class GridConfig:
    """Chapter 4's choices of rows (its parameters of the same names).

    ``random_scope`` / ``lora_scope``: ``"band"`` draws random heads, and places LoRA, in the key
    heads' lowest layer and above (the rows then cost the same per step as Precise SFT and differ
    only in *which* weights are tuned); ``"all"`` uses every layer. Random draw ``s`` is seeded
    ``seed + 1 + s`` and never picks a key head."""

    key_heads: int = 10
    kv: KVPolicy = "shared"
    rescale: bool = False
    random_seeds: int = 3
    random_scope: Scope = "band"
    lora_scope: Scope = "band"
    lora_lrs: tuple[float, ...] = (3e-4,)
    head_counts: tuple[int, ...] = (5, 20)
    mlp_counts: tuple[int, ...] = (3,)
    seed: int = 0


@dataclass(frozen=True)
class MethodGrid:
    """The rows to train, in the order the chapter shows them, with what sizing them found."""

    methods: tuple[Method, ...]
    precise: Method          # the main row: Precise SFT on the key heads
    n_precise: int           # its trainable weights (before training)
    lora_rank: int           # the LoRA rank whose trainable weights come closest to n_precise
    lora_layers: tuple[int, ...] | None  # None: every layer
    band: int                # the key heads' lowest layer


def method_grid(model: LoadedModel, ranking: Sequence[Head], mlp_order: Sequence[int], config: GridConfig) -> MethodGrid:
    """Chapter 4's rows: full SFT; Precise SFT on the top ``config.key_heads`` of ``ranking``
    (chapter 1's head ranking, strongest first); as many random heads, ``config.random_seeds`` draws;
    LoRA at each of ``config.lora_lrs`` with a matched budget; Precise SFT on the top ``k`` heads for
    each ``k`` of ``head_counts`` (group ``heads ablation``); the key heads plus the first ``m`` MLP
    layers of ``mlp_order`` (chapter 2's ranking) for each ``m`` of ``mlp_counts`` (group ``MLP ablation``)."""
    k = config.key_heads
    key = tuple(ranking[:k])
    band = min(h.layer for h in key)
    tuned = lambda heads, mlps=(): PreciseSFTConfig(tuple(heads), tuple(mlps), kv=config.kv, rescale=config.rescale)
    precise = Method(precise_name(k), "precise", tuned(key))
    n_precise = count_params(model, precise_slices(model, precise.precise))
    lora_layers = tuple(range(band, model.n_layers)) if config.lora_scope == "band" else None
    rank = lora_rank_for(model, n_precise, lora_layers)
    several = len(config.lora_lrs) > 1
    rows = [Method(FULL, "full"), precise]
    rows += [Method(random_name(k), "precise", tuned(random_heads(
        model.n_layers, model.n_heads, k, seed=config.seed + 1 + s, min_layer=band if config.random_scope == "band" else 0,
        exclude=key)), seed=s) for s in range(config.random_seeds)]
    rows += [Method(lora_name(rank, lr if several else None), "lora", lora_rank=rank, lora_layers=lora_layers, lr=lr)
             for lr in config.lora_lrs]
    rows += [Method(precise_name(n), "precise", tuned(ranking[:n]), group="heads ablation") for n in config.head_counts]
    rows += [Method(mlp_name(k, m), "precise", tuned(key, sorted(mlp_order[:m])), group="MLP ablation")
             for m in config.mlp_counts]
    return MethodGrid(tuple(rows), precise, n_precise, rank, lora_layers, band)


def kept_deltas(methods: Sequence[Method]) -> dict[Method, str]:
    """The rows whose trained delta chapter 4 keeps, each with its folder (:data:`DELTA_FOLDERS`): the
    first main-group row of each family there — the main Precise SFT row, the first random draw, the
    first LoRA row."""
    kept: dict[Method, str] = {}
    for method in methods:
        folder = DELTA_FOLDERS.get(method_family(method.name)) if method.group == "main" else None
        if folder and folder not in kept.values():
            kept[method] = folder
    return kept

"""Same-answer counterfactuals: patch each head with a different problem that has the same answer.

Science wing, a control for the paper's head localization (§ "Path patching (head localization)"
patches in a null-operator prompt, which removes the answer). Here the counterfactual keeps the
answer and changes the problem: the operands (``3 + 4`` ← ``5 + 2``) or the operator (``2 * 3`` ←
``8 - 2``), same template. A head whose patching effect *survives* this counterfactual does not just
carry "the answer is 7": its END output depends on which operands or which operation produced it.
A head whose effect vanishes carries only what both problems share — their answer.

Items are built from a :class:`arithlens.tasks.prompts.PromptSet` with the public prompt machinery
(:data:`arithlens.tasks.prompts.OPERATORS`, :data:`arithlens.tasks.prompts.TEMPLATES`): the counterfactual is
the clean text with only the query re-rendered (few-shot demonstrations, which use the clean
operator, are kept verbatim). A pair is kept only if both texts tokenize to the same length and the
tokens are equal at every position outside the tokens of the query's three slots (A, operator, B)
in either text, END included; otherwise the next candidate is tried, and items with none are
counted as dropped. They follow :class:`arithlens.core.items.Item`, so :func:`arithlens.analyses.end_cache.cache_end`
and :func:`arithlens.analyses.patching.patch_heads` run on them unchanged.

Written by hand (no library builds these pairs).
"""

from __future__ import annotations

import random
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd

from arithlens.analyses import end_cache, patching
from arithlens.core.hooks import Head
from arithlens.core.items import encode, tokens_over
from arithlens.core.models import LoadedModel
from arithlens.analyses.patching import Mode
from arithlens.tasks.prompts import OPERATORS, TEMPLATES, PromptItem, PromptSet

Change = Literal["operands", "operator"]
CHANGES: tuple[Change, ...] = ("operands", "operator")


@dataclass(frozen=True)
class SameAnswerItem:
    """A clean prompt and a counterfactual with other operands or another operator, same answer."""

    operator: str
    template: str
    a: int
    b: int
    answer: int
    change: Change
    cf_operator: str
    cf_a: int
    cf_b: int
    clean: str
    counterfactual: str
    answer_token: int
    clean_tokens: tuple[int, ...]
    cf_tokens: tuple[int, ...]
    end_pos: int


@dataclass(frozen=True)
class SameAnswerSet:
    """Same-answer items and how many clean items found no aligned counterfactual, per change."""

    items: tuple[SameAnswerItem, ...]
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def to_frame(self) -> pd.DataFrame:
        """One row per item (tokens left out)."""
        keys = ("operator", "template", "a", "b", "answer", "change", "cf_operator", "cf_a", "cf_b", "clean",
                "counterfactual", "answer_token", "end_pos")
        return pd.DataFrame([{k: getattr(it, k) for k in keys} for it in self.items])


def _slot_tokens(text: str, offset: int, offsets: list[tuple[int, int]], a: str, op: str, b: str) -> set[int]:
    """Positions of the tokens covering the {a}, {op}, {b} slots of template ``text`` rendered at
    character ``offset`` (``offsets``: the rendered prompt's token spans)."""
    values, out, pos = {"a": a, "op": op, "b": b}, set(), offset
    for literal, name, _, _ in string.Formatter().parse(text):
        pos += len(literal)
        if name is not None:
            out |= set(tokens_over(offsets, pos, pos + len(values[name])))
            pos += len(values[name])
    return out


def donors(operators: Sequence[str], operand_range: tuple[int, int], answer: int) -> list[tuple[str, int, int]]:
    """Every (operator, a, b) with operands in range whose exact answer is ``answer``."""
    lo, hi = operand_range
    return [(o, a, b) for o in operators for a in range(lo, hi + 1) for b in range(lo, hi + 1)
            if OPERATORS[o].apply(a, b) == answer]


def same_answer_item(tokenizer, item: PromptItem, change: Change, candidates: Sequence[tuple[str, int, int]]
                     ) -> SameAnswerItem | None:
    """The first candidate (operator, a, b) that makes an aligned same-answer counterfactual of
    ``item`` for ``change`` (``operands``: same operator, other operands; ``operator``: another
    operator), or None."""
    tpl = TEMPLATES[item.template]
    op_text = OPERATORS[item.operator].render(tpl.form)
    query = tpl.render(item.a, op_text, item.b)
    assert item.clean.endswith(query), f"{item.clean!r} does not end with its query {query!r}"
    start = len(item.clean) - len(query)
    prefix = item.clean[:start]
    ids, offsets = list(item.clean_tokens), encode(tokenizer, item.clean)[1]
    assert len(offsets) == len(ids), "the item's tokens are not the tokenizer's"
    clean_slots = _slot_tokens(tpl.text, start, offsets, str(item.a), op_text, str(item.b))
    for o, a, b in candidates:
        if OPERATORS[o].apply(a, b) != item.answer or (o, a, b) == (item.operator, item.a, item.b):
            continue
        if (change == "operands") != (o == item.operator):
            continue
        cf_op = OPERATORS[o].render(tpl.form)
        cf = prefix + tpl.render(a, cf_op, b)
        cf_ids, cf_offsets = encode(tokenizer, cf)
        if len(cf_ids) != len(ids):
            continue
        slots = clean_slots | _slot_tokens(tpl.text, start, cf_offsets, str(a), cf_op, str(b))
        if all(x == y for i, (x, y) in enumerate(zip(ids, cf_ids)) if i not in slots) and len(ids) - 1 not in slots:
            return SameAnswerItem(item.operator, item.template, item.a, item.b, item.answer, change, o, a, b, item.clean,
                                  cf, item.answer_token, item.clean_tokens, tuple(cf_ids), item.end_pos)
    return None


def make_same_answer(tokenizer, prompts: PromptSet, changes: Sequence[Change] = CHANGES, seed: int = 0,
                     operators: Sequence[str] | None = None, operand_range: tuple[int, int] | None = None) -> SameAnswerSet:
    """A same-answer counterfactual of every item of ``prompts`` for each change that has one.

    Candidates are every (operator, a, b) over ``operators`` (default: the set's) and
    ``operand_range`` (default: the set's) with the item's answer, tried in an order shuffled by a
    ``random.Random`` seeded per item and change.
    """
    operators = tuple(operators or prompts.config.operators)
    operand_range = operand_range or prompts.config.operand_range
    items, dropped = [], Counter()
    for it in prompts.items:
        pool = donors(operators, operand_range, it.answer)
        for change in changes:
            order = pool[:]
            random.Random(f"{seed}|{change}|{it.clean}").shuffle(order)
            made = same_answer_item(tokenizer, it, change, order)
            if made is None:
                dropped[f"no aligned same-answer {change} counterfactual"] += 1
            else:
                items.append(made)
    return SameAnswerSet(tuple(items), dict(dropped))


def same_answer_patching(model: LoadedModel, same: SameAnswerSet, modes: Sequence[Mode] = ("total",),
                         batch_size: int = 16) -> pd.DataFrame:
    """Exact patching of every head at END with the same-answer counterfactuals: the table of
    :func:`arithlens.analyses.patching.patch_heads` plus the item's ``change``."""
    caches = end_cache.cache_prompt_set(model, same, batch_size)
    table = patching.patch_heads(model, same, caches, modes=tuple(modes))
    changes = pd.Series([it.change for it in same.items])
    table.insert(3, "change", changes.to_numpy()[table["prompt"].to_numpy()])
    return table


def surviving_heads(null_effects: pd.DataFrame, same_effects: pd.DataFrame, metric: str = "rel_logit",
                    threshold: float = -0.05) -> pd.DataFrame:
    """Key heads under the null-operator counterfactual and whether their effect survives a
    same-answer counterfactual. One row per (mode, change, layer, head) with ``null_mean`` and
    ``same_mean`` (mean ``metric`` over prompts), ``key`` (null mean ≤ ``threshold``) and
    ``survives`` (key, and the same-answer mean ≤ ``threshold`` too)."""
    null = null_effects.groupby(["mode", "layer", "head"])[metric].mean().rename("null_mean").reset_index()
    same = same_effects.groupby(["mode", "change", "layer", "head"])[metric].mean().rename("same_mean").reset_index()
    out = same.merge(null, on=["mode", "layer", "head"], how="inner")
    out["key"] = out["null_mean"] <= threshold
    out["survives"] = out["key"] & (out["same_mean"] <= threshold)
    return out[["mode", "change", "layer", "head", "null_mean", "same_mean", "key", "survives"]]


def key_head_survival(key_heads: Sequence[Head], null_summary: pd.DataFrame, same_effects: pd.DataFrame,
                      mode: str = "path", metric: str = "d_prob", keep: float = 0.5) -> pd.DataFrame:
    """Which of the given key heads keep their effect when the counterfactual keeps the answer.

    ``null_summary``: per-head means under the null-operator counterfactual (chapter 1's
    ``effects_summary``); ``same_effects``: :func:`same_answer_patching`'s per-prompt table. One row per
    (change, key head) with ``null_mean``, ``same_mean`` and ``kept`` = same ÷ null; the head
    *survives* when ``kept`` ≥ ``keep`` — it still moves the answer by at least that share of its
    null-counterfactual effect although the answer did not change, so it carries the operands or
    the operator as such, not the computation's result."""
    null = null_summary[(null_summary["mode"] == mode) & (null_summary["metric"] == metric)].set_index(["layer", "head"])["mean"]
    same = same_effects[same_effects["mode"] == mode].groupby(["change", "layer", "head"])[metric].mean()
    rows = []
    for change in same.index.get_level_values("change").unique():
        for h in key_heads:
            n, s = float(null.get((h.layer, h.head), float("nan"))), float(same.get((change, h.layer, h.head), float("nan")))
            kept = s / n if n else float("nan")
            rows.append({"change": change, "head": str(h), "layer": h.layer, "null_mean": n, "same_mean": s,
                         "kept": kept, "survives": bool(kept >= keep)})
    return pd.DataFrame(rows)

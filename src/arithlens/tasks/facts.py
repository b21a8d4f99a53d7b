"""Arithmetic facts: the operators, the facts a ∘ b in an operand range, and their split in two halves.

Ground floor of the science wing (paper § "Setup"). A *fact* is (a, b, operator) with a natural-number
answer; templates, shots and counterfactuals are the prompts' business (:mod:`arithlens.tasks.prompts`).
The facts of each operator are split once, by a stated hash (:data:`FACT_SPLIT_RULE`), into a
*localization* half — the heads are found on it — and an *evaluation* half, on which everything that
tests them runs (knockout, robustness, fine-tuning evaluation): no fact is used for both.

Written by hand: the operators and the split (no library holds either).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import pandas as pd

Form = Literal["symbol", "word", "noun"]


@dataclass(frozen=True)
class Operator:
    """An arithmetic operator and the ways templates write it."""

    symbol: str
    word: str
    noun: str

    def render(self, form: Form) -> str:
        return {"symbol": self.symbol, "word": self.word, "noun": self.noun}[form]

    def apply(self, a: int, b: int) -> int | None:
        """The exact integer answer, or None where it is not a natural number."""
        if self.symbol == "+":
            return a + b
        if self.symbol == "-":
            return a - b if a >= b else None
        if self.symbol == "*":
            return a * b
        return a // b if b != 0 and a % b == 0 else None


OPERATORS: dict[str, Operator] = {
    "+": Operator("+", "plus", "sum"),
    "-": Operator("-", "minus", "difference"),
    "*": Operator("*", "times", "product"),
    "/": Operator("/", "divided by", "quotient"),
}

#: Each operator's partner under the *swap* counterfactual: the answer keeps its format, the operation changes.
SWAPPED = {"+": "-", "-": "+", "*": "/", "/": "*"}

#: Replacements for the operator, per form: the paper's null words and meaningless symbols.
NULL_OPERATORS: dict[Form, tuple[str, ...]] = {
    "symbol": ("@", "<", "#", "&", "~"),
    "word": ("nothing", "none", "nothing at", "none of"),
    "noun": ("nothing", "none", "null", "nothing at", "none of"),
}


def operand_pairs(op: Operator, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """All (a, b, answer) in range whose answer is a natural number."""
    out = []
    for a, b in itertools.product(range(lo, hi + 1), repeat=2):
        c = op.apply(a, b)
        if c is not None:
            out.append((a, b, c))
    return out


#: The stated rule that splits arithmetic facts (a, b, operator) into two halves, shared by every chapter.
FACT_SPLIT_RULE = ("the facts a ∘ b of each operator in the operand range are ordered by sha256(\"∘|a|b\") "
                   "(e.g. sha256(\"+|3|4\")); the first half (rounded down) *localizes* the heads, the rest is "
                   "the *evaluation* half; fine-tuning trains on the localization half's first three quarters and "
                   "chooses its learning rates on the last quarter (*validation*)")


@functools.lru_cache(maxsize=None)
def _order(operator: str, operand_range: tuple[int, int]) -> list[tuple[int, int]]:
    """The facts (a, b) of ``operator`` in range, in the stated hash order."""
    facts = sorted(operand_pairs(OPERATORS[operator], *operand_range),
                   key=lambda f: hashlib.sha256(f"{operator}|{f[0]}|{f[1]}".encode()).hexdigest())
    return [(a, b) for a, b, _ in facts]


@functools.lru_cache(maxsize=None)
def _halves(operator: str, operand_range: tuple[int, int]) -> dict[tuple[int, int], str]:
    order = _order(operator, operand_range)
    return {f: "localization" if i < len(order) // 2 else "evaluation" for i, f in enumerate(order)}


def fact_half(operator: str, a: int, b: int, operand_range: tuple[int, int] = (1, 9)) -> str:
    """``"localization"`` or ``"evaluation"``: the half of the facts (:data:`FACT_SPLIT_RULE`) that
    ``a operator b`` belongs to, whatever the template, the shots or the model. Heads are localized on
    the first half; knockouts, transfer, robustness and fine-tuning evaluation use only the second."""
    half = _halves(operator, tuple(operand_range)).get((a, b))
    if half is None:
        raise ValueError(f"{a} {operator} {b} is not a fact in the operand range {operand_range}")
    return half


def fact_part(operator: str, a: int, b: int, operand_range: tuple[int, int] = (1, 9)) -> str:
    """``"train"``, ``"validation"`` or ``"evaluation"``: fine-tuning's three parts of the facts
    (:data:`FACT_SPLIT_RULE`). The evaluation half is :func:`fact_half`'s; the localization half is cut in
    the same hash order, its last quarter (rounded down) kept for choosing learning rates."""
    order = _order(operator, tuple(operand_range))
    n_loc = len(order) // 2
    n_train = n_loc - n_loc // 4
    i = order.index((a, b)) if (a, b) in order else None
    if i is None:
        raise ValueError(f"{a} {operator} {b} is not a fact in the operand range {operand_range}")
    return "train" if i < n_train else "validation" if i < n_loc else "evaluation"


def fact_split_table(operators=("+", "-", "*", "/"), operand_range: tuple[int, int] = (1, 9)) -> pd.DataFrame:
    """Per operator: how many facts in range have a natural-number answer, and how many fall in each half."""
    rows = []
    for op in operators:
        halves = Counter(_halves(op, tuple(operand_range)).values())
        rows.append({"operator": op, "facts": sum(halves.values()), "localization": halves["localization"],
                     "evaluation": halves["evaluation"]})
    return pd.DataFrame(rows)

"""What each transfer suite's prompts look like: candidate generators and renderers.

Science wing, ground floor, beside :mod:`arithlens.tasks.suites` (which aligns, checks and scores the items;
the registry ``suites.SUITES`` names these generators). Each ``source(seed)`` returns the candidate
pool and ``render(candidate) -> (label, parts, answer, valid_answers, meta)``, where ``parts`` are
``(kind, text)`` pieces tagged ``text``, ``num`` (a number whose tokens are recorded) or ``op`` (the
operation the counterfactual replaces). Answers are computed here with Python arithmetic or read from
the shipped, hand-checked ``data/controls.json``.

Written by hand: the templates and word lists (no library generates these prompts).
"""

from __future__ import annotations

import json
import random
from decimal import Decimal

from arithlens.paths import data_file

NULL_SYMBOLS = ("@", "<", "#", "&", "~")
NULL_WORDS = ("nothing", "none", "null")
NEUTRAL_VERBS = ("sees", "likes", "draws", "counts")


def _two_operand_source(key: str, draw, ops: tuple[str, str], equals: str):
    """Seeded (a, op, b) candidates with ``ops`` = (plus, minus) spelled as in the prompt; a minus never
    goes below zero. ``draw(rng)`` picks one operand; ``equals`` ends the prompt."""
    r = random.Random(key)
    cands = []
    for _ in range(4000):
        op = r.choice(ops)
        a, b = draw(r), draw(r)
        if op == ops[1] and a < b:
            a, b = b, a
        cands.append((a, op, b))

    def render(c):
        a, op, b = c
        res = a + b if op == ops[0] else a - b
        return op, [("num", str(a)), ("text", " "), ("op", op), ("text", " "), ("num", str(b)), ("text", equals)], \
            str(res), (), (("a", str(a)), ("b", str(b)), ("result", str(res)))
    return list(dict.fromkeys(cands)), render


def multidigit_source(rng_seed: int, digits: int = 2):
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    return _two_operand_source(f"{rng_seed}|multidigit{digits}|pairs", lambda r: r.randint(lo, hi), ("+", "-"), " = ")


def decimals_source(rng_seed: int):
    tenths = [Decimal(i).scaleb(-1) for i in range(10, 100)]  # 1.0 … 9.9, always one decimal
    return _two_operand_source(f"{rng_seed}|decimals|pairs", lambda r: r.choice(tenths), ("plus", "minus"), " equals ")


YEAR_EVENTS = ("war", "expedition", "reign", "drought", "famine", "siege", "voyage", "truce", "dynasty", "boom")


def years_source(rng_seed: int):
    cands = [(ev, century, d, u) for ev in YEAR_EVENTS for century in range(11, 19) for d in range(1, 9)
             for u in range(1, 9)]

    def render(c):
        ev, century, d, u = c
        start = f"{century}{d}{u}"
        valid = tuple(str(x) for x in range(u + 1, 10))
        parts = [("text", f"The {ev} lasted from the year "), ("num", start), ("text", " to the year "),
                 ("num", f"{century}{d}")]
        return "later year", parts, f"> {u}", valid, (("event", ev), ("start", int(start)), ("units", u))
    return cands, render


NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Jack", "Emma")
OBJECTS = ("apples", "pens", "books", "cards", "coins", "stamps", "shells", "marbles")
ADD_VERBS = ("gets", "finds", "buys", "wins")
SUB_VERBS = ("loses", "sells", "breaks", "gives away")


def word_problems_source(rng_seed: int):
    cands = []
    for name in NAMES:
        for obj in OBJECTS:
            for a in range(1, 10):
                for b in range(1, 10):
                    if a + b <= 9:
                        cands.append((name, obj, a, "+", b))
                    if b <= a:
                        cands.append((name, obj, a, "-", b))
    r = random.Random(f"{rng_seed}|word_problems|verbs")
    verbs = {c: r.choice(ADD_VERBS if c[3] == "+" else SUB_VERBS) for c in cands}

    def render(c):
        name, obj, a, op, b = c
        res = a + b if op == "+" else a - b
        parts = [("text", f"{name} has "), ("num", str(a)), ("text", f" {obj}. {name} "), ("op", verbs[c]),
                 ("text", " "), ("num", str(b)), ("text", f" {obj}. Now {name} has ")]
        return op, parts, str(res), (), (("a", a), ("b", b), ("verb", verbs[c]), ("result", res))
    return cands, render


def power_source(rng_seed: int):
    def render(c):
        a, e = c
        return "^", [("num", str(a)), ("text", " "), ("op", "^"), ("text", " "), ("num", str(e)), ("text", " = ")], \
            str(a ** e), (), (("a", a), ("b", e), ("result", a ** e))
    return [(a, e) for a in range(2, 10) for e in range(0, 4)], render


def load_controls() -> dict:
    """The shipped non-math control data (``arithlens/data/controls.json``)."""
    return json.loads(data_file("controls.json").read_text(encoding="utf-8"))


def pairs_source(name: str):
    spec = load_controls()[name]

    def render(c):
        x, y = c
        return name, [("text", spec["template"].format(x=x))], spec["answer"].format(y=y), (), (("query", x), ("expected", y))
    return [tuple(p) for p in spec["pairs"]], render


def sequences_source(rng_seed: int):
    spec = load_controls()["sequences"]
    w, sep = spec["window"], spec["separator"]
    cands = [(lst, tuple(vals[i: i + w]), vals[i + w]) for lst, vals in spec["lists"].items()
             for i in range(len(vals) - w)]

    def render(c):
        lst, window, nxt = c
        return lst, [("text", sep.join(window) + sep.rstrip())], " " + nxt, (), (("list", lst), ("expected", nxt))
    return cands, render

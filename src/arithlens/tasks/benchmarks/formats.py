"""What each published benchmark file looks like: its fields, and how a row becomes a question and answer.

Science wing, ground floor, beside :mod:`arithlens.tasks.benchmarks.reader` (which reads the files, applies the rule
for unusable rows, and builds suites; this module is its registry ``FORMATS``, as
:mod:`arithlens.tasks.generators` is for the generated suites). Each :class:`BenchmarkFormat` says which
rows it fits (by their fields) and parses one row into ``(question, answer, choices, subject)``, or
raises :class:`Unusable` with a reason that is counted.

Numbers: :func:`parse_number` reads ``1,234``, ``-5``, ``3.50``, ``$12`` (and JSON numbers);
:func:`format_number` writes the canonical form (``1234``, ``3.5``) that answers are kept in.

Written by hand: the field names of each published format and the answer rules.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal
from collections.abc import Callable
from typing import Literal

AnswerKind = Literal["numeric", "choice", "text"]
LETTERS = "ABCDEFGHIJ"


class Unusable(Exception):
    """One row's answer or question cannot be used: ``reason`` is counted, ``detail`` shown."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# --- numbers -----------------------------------------------------------------------------------------

_PLAIN = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+")


def parse_number(value) -> Decimal | None:
    """A file's answer as a number, or None: ``1,234``, ``-5``, ``3.50``, ``$12``, ``12.`` and JSON
    numbers parse; ``1,23``, ``3/4``, ``twelve`` do not."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value)) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    text = value.strip().replace("\u2212", "-").removesuffix(".").strip()
    sign = ""
    for _ in range(2):  # "-$5" and "$-5" both mean minus five
        if text[:1] in ("-", "+"):
            sign, text = ("-" if text[0] == "-" else ""), text[1:].strip()
        text = text.lstrip("$€£").strip()
    if not _PLAIN.fullmatch(text):
        return None
    return Decimal(sign + text.replace(",", ""))


def format_number(value: Decimal) -> str:
    """Canonical text of a number: ``Decimal("3.50")`` → ``"3.5"``, ``1E+2`` → ``"100"``, ``-0`` → ``"0"``."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


# --- formats -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchmarkFormat:
    """A published file format: how rows are recognised and turned into (question, answer, choices)."""

    name: str
    label: str
    kind: AnswerKind
    fits: Callable[[dict], bool]     # does a row have this format's fields?
    parse: Callable[[dict], tuple]   # row → (question, answer, choices, subject); raises Unusable


def _text(row: dict, key: str, what: str | None = None) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise Unusable(f"missing {what or key}", f"no {key!r}")
    return value.strip()


def _number(value, what: str = "answer") -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise Unusable(f"missing {what}")
    number = parse_number(value)
    if number is None:
        raise Unusable(f"non-numeric {what}", f"{str(value)[:40]!r}")
    return format_number(number)


def _gsm8k(row: dict) -> tuple:
    question, answer = _text(row, "question"), row.get("answer")
    if isinstance(answer, str) and "####" in answer:
        answer = answer.rsplit("####", 1)[1].strip()
    return question, _number(answer), (), ""


def _svamp(row: dict) -> tuple:
    body, question = row.get("Body") or "", _text(row, "Question", "question")
    return f"{body.strip()} {question}".strip(), _number(row.get("Answer")), (), ""


def _mawps(row: dict) -> tuple:
    solutions = row.get("lSolutions")
    first = solutions[0] if isinstance(solutions, list) and solutions else solutions
    return _text(row, "sQuestion", "question"), _number(first), (), ""


def _choice(row: dict) -> tuple:
    question, choices = row.get("question"), row.get("choices")
    if isinstance(question, dict):  # CommonsenseQA as published: {"stem": …, "choices": […]}
        question, choices = question.get("stem"), question.get("choices", choices)
    question = _text({"question": question}, "question")
    labels = None
    if isinstance(choices, dict):  # {"label": [...], "text": [...]}
        labels, choices = choices.get("label"), choices.get("text")
    elif isinstance(choices, list) and choices and all(isinstance(c, dict) for c in choices):
        labels, choices = [c.get("label") for c in choices], [c.get("text") for c in choices]
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) \
            or not all(isinstance(c, (str, int, float)) and str(c).strip() for c in choices):
        raise Unusable("unusable choices", f"{str(choices)[:40]!r}")
    choices = tuple(str(c).strip() for c in choices)
    letters = list(labels) if labels else list(LETTERS[: len(choices)])
    answer = row.get("answer", row.get("answerKey"))
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise Unusable("missing answer")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        index = answer
    elif isinstance(answer, str) and answer.strip() in letters:
        index = letters.index(answer.strip())
    elif isinstance(answer, str) and list(choices).count(answer.strip()) == 1:
        index = choices.index(answer.strip())
    else:
        raise Unusable("answer not among the choices", f"{str(answer)[:40]!r}")
    return question, LETTERS[index], choices, str(row.get("subject", "") or "")


def _generic(row: dict) -> tuple:
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise Unusable("missing prompt")
    answer = row.get("answer")
    if answer is None or isinstance(answer, (dict, list, bool)) or not str(answer).strip():
        raise Unusable("missing answer")
    return prompt, str(answer).strip(), (), ""


def _csv_row(row: list) -> tuple:
    if len(row) < 4:
        raise Unusable("too few columns", f"{len(row)} columns")
    return _choice({"question": row[0], "choices": row[1:-1], "answer": row[-1].strip()})


_has = lambda *keys: (lambda row: all(k in row for k in keys))
FORMATS: dict[str, BenchmarkFormat] = {f.name: f for f in [
    BenchmarkFormat("gsm8k", "GSM8K JSONL (question, answer ending in '#### N')", "numeric",
                    lambda r: _has("question", "answer")(r) and "choices" not in r and isinstance(r["question"], str),
                    _gsm8k),
    BenchmarkFormat("svamp", "SVAMP JSON (Body, Question, Answer)", "numeric", _has("Body", "Question", "Answer"), _svamp),
    BenchmarkFormat("mawps", "AddSub / SingleEq / MultiArith JSON (sQuestion, lSolutions)", "numeric",
                    _has("sQuestion", "lSolutions"), _mawps),
    BenchmarkFormat("choice", "multiple-choice JSONL (MMLU: question, choices, answer; CommonsenseQA: answerKey)",
                    "choice", lambda r: "question" in r and ("answer" in r or "answerKey" in r)
                    and ("choices" in r or isinstance(r["question"], dict)), _choice),
    BenchmarkFormat("mmlu_csv", "MMLU CSV (question, choices…, answer letter; no header)", "choice",
                    lambda r: len(r) >= 4 and r[-1].strip() in LETTERS, _csv_row),
    BenchmarkFormat("generic", "generic JSONL (prompt, answer)", "numeric", _has("prompt", "answer"), _generic),
]}
EXPECTED = ("GSM8K (question, answer), SVAMP (Body, Question, Answer), AddSub/SingleEq (sQuestion, lSolutions), "
             "multiple choice (question, choices, answer), MMLU CSV, generic (prompt, answer)")

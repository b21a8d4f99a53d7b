"""Bring your own benchmark: a public benchmark file on disk → a :class:`arithlens.tasks.suites.Suite`.

Science wing, ground floor, beside :mod:`arithlens.tasks.suites`. The paper measures transfer (§ "Transfer")
and Precise SFT (§ "Precise SFT") on public benchmarks — GSM8K, SVAMP, AddSub, SingleEq for math, MMLU
and CommonsenseQA for general ability. GSM8K, SVAMP and MMLU ship with arithlens
(:mod:`arithlens.tasks.benchmarks.shipped`); a researcher who has another file reads it here, and chapter 1's knockout code, :class:`arithlens.tasks.suites.SuiteScorer` and
:mod:`arithlens.tasks.benchmarks.scoring` run on the result unchanged.

**Reading** (:func:`read_benchmark`, no model needed). The format is recognised by the rows' fields —
whichever of :data:`FORMATS` (:mod:`arithlens.tasks.benchmarks.formats`) the most rows fit:

* ``gsm8k`` — JSONL, ``question`` and ``answer``; the answer's ``#### N`` line (or a bare number);
* ``svamp`` — ``Body`` + ``Question`` and a numeric ``Answer``;
* ``mawps`` — AddSub / SingleEq / MultiArith: ``sQuestion`` and ``lSolutions`` (its first value);
* ``choice`` — ``question``, ``choices`` and ``answer`` (a letter, a 0-based index or a choice's text),
  or CommonsenseQA's ``question.stem``, ``question.choices`` / ``choices.label``+``text`` and ``answerKey``;
* ``mmlu_csv`` — CSV without header: question, the choices, the answer letter;
* ``generic`` — JSONL with ``prompt`` and ``answer`` (numeric if every answer is a number, else text).

A file is a JSON list of objects, JSONL (one object a line), or CSV. *Row* numbers in messages are
line numbers (JSONL, CSV) or 1-based positions (a JSON list).

**The rule for bad rows.** A broken file — empty, not JSON where JSON is expected, a row that is not an
object, no known format — raises :class:`BenchmarkFileError`, one line naming the file, the row and the
problem. A row with an unusable answer or question (missing, non-numeric where a number is expected, a
letter that is not among the choices) is *skipped and counted by reason* (``Benchmark.skipped``), unless
``strict=True``; if more than half of the rows are skipped the file is an error, never a silently
skipped majority. Numbers parse as ``1,234``, ``-5``, ``3.50``, ``$12`` and compare as numbers
(``3.50 == 3.5``): answers are kept in canonical form (``"1234"``, ``"3.5"``).

**Building** (:func:`make_benchmark_suite`) writes each item as ``Question: …\\nAnswer:`` (the choices as
``A. …`` lines), after ``shots`` fixed demonstrations drawn (seeded) from the same file and never used as
queries, so every prompt shares one prefix. The answer is the direct answer — no chain of thought.
Where the tokenizer writes ``": 72"`` as ``':' ' ' '7' '2'`` the space goes into the prompt, so the
first answer token is the first digit (an answer written ``" -5"`` keeps its space: ``' -' '5'``).

Written by hand: format recognition, the rule for unusable rows and the prompt layout; ``json`` and
``csv`` do the parsing.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from arithlens.tasks.benchmarks.formats import (
    EXPECTED, FORMATS, LETTERS, AnswerKind, BenchmarkFormat, Unusable, format_number, parse_number)
from arithlens.core.items import continuation
from arithlens.tasks.suites import Kind, Suite, SuiteItem, build_item


class BenchmarkFileError(ValueError):
    """A benchmark file that cannot be used; the message is one line: file, row, what is wrong."""


# --- reading -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchmarkRecord:
    """One usable row: the question (or prompt), the canonical answer, the choices if any."""

    row: int
    question: str
    answer: str                 # "1234", "3.5", a letter "B", or text
    choices: tuple[str, ...] = ()
    subject: str = ""


@dataclass(frozen=True)
class Benchmark:
    """A read benchmark file: its format, usable records, and the skipped rows by reason."""

    path: str
    format: BenchmarkFormat
    kind: AnswerKind
    records: tuple[BenchmarkRecord, ...]
    n_rows: int
    skipped: dict[str, int] = field(default_factory=dict)
    first_skipped: dict[str, int] = field(default_factory=dict)  # reason → its first row

    def __len__(self) -> int:
        return len(self.records)

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def describe(self) -> str:
        """``"8 rows, 7 items, 1 skipped (non-numeric answer: 1, first at row 4)"``."""
        skipped = sum(self.skipped.values())
        why = ", ".join(f"{r}: {c}, first at row {self.first_skipped[r]}" for r, c in self.skipped.items())
        return f"{self.n_rows} rows, {len(self.records)} items, {skipped} skipped" + (f" ({why})" if why else "")

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"row": r.row, "question": r.question, "answer": r.answer,
                              "choices": " | ".join(r.choices), "subject": r.subject} for r in self.records])


def _error(path, row, what: str) -> BenchmarkFileError:
    where = f"{path}: row {row}: " if row is not None else f"{path}: "
    return BenchmarkFileError(" ".join((where + what).split()))  # one line, whatever the parser said


def _rows(path: Path) -> tuple[list[tuple[int, object]], bool]:
    """(row number, row) pairs and whether the file is CSV."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise _error(path, None, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _error(path, None, f"cannot read: {exc}") from None
    if not text.strip():
        raise _error(path, None, "empty file (no rows)")
    start = text.lstrip()[0]
    if path.suffix.lower() == ".csv" or start not in "[{":
        rows = []
        reader = csv.reader(text.splitlines())
        for cells in reader:
            if any(c.strip() for c in cells):
                rows.append((reader.line_num, cells))
        if rows and rows[0][1][-1].strip().lower() in ("answer", "target", "label"):
            rows = rows[1:]  # a header row, as some MMLU copies have
        return rows, True
    if start == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _error(path, exc.lineno, f"not valid JSON ({exc.msg})") from None
        return list(enumerate(data, 1)), False
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise _error(path, number, f"not a valid JSON line ({exc.msg} at column {exc.colno})") from None
    return rows, False


def read_benchmark(path, strict: bool = False) -> Benchmark:
    """Read and check a benchmark file (see the module docstring for the formats and the rule for
    unusable rows); ``strict`` makes the first unusable row an error."""
    path = Path(path).expanduser()
    rows, is_csv = _rows(path)
    if not rows:
        raise _error(path, None, "no rows")
    if not is_csv:
        for number, row in rows:
            if not isinstance(row, dict):
                raise _error(path, number, f"not a JSON object but {type(row).__name__}")
    candidates = [FORMATS["mmlu_csv"]] if is_csv else [f for f in FORMATS.values() if f.name != "mmlu_csv"]
    fits = [sum(f.fits(row) for _, row in rows) for f in candidates]
    if max(fits) == 0:
        number, row = rows[0]
        seen = f"{len(row)} columns" if is_csv else f"fields {sorted(row)}"
        raise _error(path, number, f"no known benchmark format ({seen}); expected {EXPECTED}")
    fmt = candidates[fits.index(max(fits))]
    records, skipped, first = [], Counter(), {}
    for number, row in rows:
        try:
            question, answer, choices, subject = fmt.parse(row)
        except Unusable as bad:
            if strict:
                raise _error(path, number, f"{bad.reason} {bad.detail}".strip()) from None
            skipped[bad.reason] += 1
            first.setdefault(bad.reason, (number, bad.detail))
            continue
        records.append(BenchmarkRecord(number, question, answer, choices, subject))
    if sum(skipped.values()) * 2 > len(rows) or not records:
        reason, (number, detail) = next(iter(first.items()))
        raise _error(path, number, f"{reason} {detail} ({sum(skipped.values())} of {len(rows)} rows unusable: "
                                   + ", ".join(f"{r}: {c}" for r, c in skipped.items()) + ")")
    kind = fmt.kind
    if fmt.name == "generic":  # numeric only if every answer is a number
        numbers = [parse_number(r.answer) for r in records]
        if all(n is not None for n in numbers):
            records = [BenchmarkRecord(r.row, r.question, format_number(n)) for r, n in zip(records, numbers)]
        else:
            kind = "text"
    return Benchmark(str(path), fmt, kind, tuple(records), len(rows), dict(skipped),
                     {r: n for r, (n, _) in first.items()})


# --- building a suite --------------------------------------------------------------------------------

def _question_parts(question: str) -> list[tuple[str, str]]:
    """The question as ``text``/``num`` parts, so every number's tokens are recorded (``number_pos``)."""
    parts, last = [], 0
    for m in re.finditer(r"\d+(?:[.,]\d+)*", question):
        parts += [("text", question[last: m.start()]), ("num", m.group())]
        last = m.end()
    return [p for p in parts + [("text", question[last:])] if p[1]]


def query_parts(record: BenchmarkRecord, bench: Benchmark) -> list[tuple[str, str]]:
    """The query without its answer: ``Question: …\\nAnswer:`` (choices as ``A. …`` lines); a generic
    file's prompt as it is."""
    if bench.format.name == "generic":
        return _question_parts(record.question)
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, record.choices))
    return [("text", "Question: "), *_question_parts(record.question), ("text", options + "\nAnswer:")]


def render_demo(record: BenchmarkRecord, bench: Benchmark) -> str:
    """One demonstration: the query, its answer, a blank line."""
    query = "".join(text for _, text in query_parts(record, bench))
    return query + ("" if query[-1:].isspace() else " ") + record.answer + "\n\n"


def _build_item(tokenizer, name: str, record: BenchmarkRecord, bench: Benchmark, prefix: str,
                label: str) -> tuple[SuiteItem | None, str]:
    """The item for ``record`` after ``prefix``; its answer must continue the prompt's tokens.

    The space before the answer goes into the prompt where the tokenizer writes it as its own token
    (``': ' '7' '2'``), else into the answer (``' -' '5'``, ``' B'``)."""
    parts = query_parts(record, bench)
    query = "".join(text for _, text in parts)
    meta = (("row", record.row), ("value", record.answer), ("answer_kind", bench.kind), ("format", bench.format.name))
    meta += (("subject", record.subject),) if record.subject else ()
    spacings = [("", "")] if query[-1:].isspace() else [(" ", ""), ("", " ")]
    reason = ""
    for tail, lead in spacings:
        item, why = build_item(tokenizer, name, label, prefix, parts + [("text", tail)], lead + record.answer, None,
                           random.Random(0), (), meta)
        if item is None:
            reason = why
            continue
        if bench.kind != "choice":
            return item, ""
        options = [continuation(tokenizer, item.clean, lead + letter) for letter in LETTERS[: len(record.choices)]]
        if all(o is not None and len(o) == 1 for o in options) and len({o[0] for o in options}) == len(options):
            return replace(item, choice_tokens=tuple(o[0] for o in options)), ""
        reason = "an option letter is not one token"
    return None, reason


def make_benchmark_suite(bench: Benchmark, tokenizer, n: int | None = None, shots: int = 3, seed: int = 0,
                         name: str | None = None, kind: Kind | None = None, demonstrations: str | None = None) -> Suite:
    """Up to ``n`` items of ``bench`` (a seeded sample, in file order; all when ``n`` is None) after
    ``shots`` demonstrations drawn from the same file under the same seed and never queries — or after
    ``demonstrations``, a prefix written elsewhere (worked solutions from a training split,
    :func:`arithlens.tasks.benchmarks.cot.worked_prefix`), when every row of ``bench`` may be a query.

    The suite is ``exact`` (numeric or text answers: whole answer and first token, teacher-forced) or
    ``choice`` (multiple choice: the option letters at END); ``kind`` defaults to ``math`` for numeric
    answers, ``control`` otherwise. Items whose answer cannot be tokenized as a continuation are
    dropped and counted in ``Suite.dropped`` beside the rows skipped on reading.
    """
    if demonstrations is not None:
        shots = 0
    if shots < 0 or (n is not None and n < 1):
        raise ValueError(f"need shots >= 0 and n >= 1 (or None), got shots={shots}, n={n}")
    if shots >= len(bench.records):
        raise ValueError(f"{bench.path}: {shots} shots need more than {shots} usable items, it has {len(bench.records)}")
    name = name or bench.name
    order = list(range(len(bench.records)))
    random.Random(f"{seed}|benchmark").shuffle(order)
    prefix = demonstrations if demonstrations is not None else "".join(render_demo(bench.records[i], bench)
                                                                       for i in order[:shots])
    items, dropped = [], Counter(bench.skipped)
    for i in order[shots:]:
        if n is not None and len(items) == n:
            break
        record = bench.records[i]
        item, reason = _build_item(tokenizer, name, record, bench, prefix, record.subject or bench.format.name)
        if item is None:
            dropped[reason] += 1
        else:
            items.append(item)
    items.sort(key=lambda it: dict(it.meta)["row"])
    description = (f"{bench.format.label}: {Path(bench.path).name}, "
                   + (f"{prefix.count('Question:')}-shot worked solutions" if demonstrations is not None else f"{shots}-shot"))
    return Suite(name, kind or ("math" if bench.kind == "numeric" else "control"),
                 "choice" if bench.kind == "choice" else "exact", description, None, tuple(items), dict(dropped))


def load_benchmark(path, tokenizer, n: int | None = None, shots: int = 3, seed: int = 0, strict: bool = False,
                   kind: Kind | None = None) -> Suite:
    """:func:`read_benchmark` then :func:`make_benchmark_suite` (named after the file)."""
    return make_benchmark_suite(read_benchmark(path, strict), tokenizer, n, shots, seed, kind=kind)


def load_benchmarks(paths, tokenizer, n: int | None = None, shots: int = 3, seed: int = 0,
                    strict: bool = False) -> dict[str, Suite]:
    """Several files → ``{name: Suite}`` (named after the files; a repeated name gets its folder)."""
    stems = [Path(p).expanduser().stem for p in paths]
    out = {}
    for path, stem in zip(paths, stems):
        name = stem if stems.count(stem) == 1 else f"{Path(path).expanduser().parent.name}/{stem}"
        out[name] = make_benchmark_suite(read_benchmark(path, strict), tokenizer, n, shots, seed, name=name)
    return out

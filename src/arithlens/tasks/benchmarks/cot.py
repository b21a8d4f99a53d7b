"""Chain of thought for multi-step word problems: worked demonstrations, and the rule that reads the answer.

Science wing, beside :mod:`arithlens.tasks.benchmarks.scoring` (its ``cot`` mode generates with these
demonstrations and judges with :func:`extract_cot_answer`). The paper reports GSM8K accuracy (Table 1);
multi-step problems answered directly in a few tokens sit at the floor on small models, so GSM8K is asked
the way Wei et al. (2022) ask it: worked solutions as demonstrations, then the model writes its own.

**Demonstrations** (:func:`worked_prefix`). Each comes from GSM8K's *training* split (never an evaluated
item): the published solution with its calculator annotations (``<<48/2=24>>``) removed, its lines joined
by spaces, and its ``#### N`` line written as the closing sentence ``The answer is N.``::

    Question: Natalia sold clips to 48 of her friends in April, …
    Answer: Natalia sold 48/2 = 24 clips in May. … The answer is 72.

**The stop and the answer** (:data:`COT_RULE`). Generation stops at a blank line or when the model starts
a new ``Question:`` — or after the token budget (``hit_budget``). The text before that stop is the
model's solution; the prediction is the first number after its last ``The answer is`` (case-folded), or,
when the phrase is missing, the last number of the solution. It is compared as a number (``3.50 == 3.5``).

Written by hand: the demonstration layout and the stop/answer rule (both stated on the pages that use
them); numbers are read by :func:`arithlens.tasks.benchmarks.scoring.extract_last_number`'s pattern.
"""

from __future__ import annotations

import re
from decimal import Decimal

from arithlens.tasks.benchmarks.formats import format_number, parse_number

#: The rule, as the pages state it.
COT_RULE = ("generation stops at a blank line, at the start of a new `Question:`, or after the token budget; "
            "the prediction is the first number after the solution's last `The answer is`, else the "
            "solution's last number, compared as a number")
#: The generation budget of a chain of thought (new tokens).
BUDGET = 256
#: Where a solution ends: a blank line, or the model going on to a question of its own.
STOPS = ("\n\n", "Question:")
_ANNOTATION = re.compile(r"<<[^<>]*>>")
_PHRASE = re.compile(r"the answer is", re.IGNORECASE)
#: A number in generated text (a minus sign only where no word or digit precedes it).
NUMBER = re.compile(r"(?:(?<![\w.])(-))?[$€£]?(\d[\d,]*(?:\.\d+)?)")


def worked_solution(answer: str) -> tuple[str, str]:
    """A GSM8K training answer → (the solution as one line ending ``The answer is N.``, N in canonical form).

    Raises ValueError if the answer has no ``#### N`` line with a number."""
    if "####" not in answer:
        raise ValueError(f"no '#### N' line in the solution {answer[:60]!r}")
    steps, final = answer.rsplit("####", 1)
    number = parse_number(final.strip())
    if number is None:
        raise ValueError(f"the solution's final line {final.strip()[:40]!r} is not a number")
    lines = [" ".join(_ANNOTATION.sub("", line).split()) for line in steps.strip().splitlines()]
    value = format_number(number)
    return " ".join(line for line in lines if line) + f" The answer is {value}.", value


def worked_prefix(rows: list[dict], shots: int) -> str:
    """The first ``shots`` training rows (``question``, ``answer``) as worked demonstrations, each followed
    by a blank line; the query that follows is written ``Question: …\\nAnswer:``."""
    if shots < 1 or shots > len(rows):
        raise ValueError(f"need 1 <= shots <= {len(rows)} worked demonstrations, got {shots}")
    demos = []
    for row in rows[:shots]:
        solution, _ = worked_solution(row["answer"])
        demos.append(f"Question: {' '.join(row['question'].split())}\nAnswer: {solution}\n\n")
    return "".join(demos)


def solution_text(generated: str) -> tuple[str, bool]:
    """The generated text up to the first stop (:data:`STOPS`), and whether a stop was found."""
    cut = [generated.find(s) for s in STOPS if s in generated]
    return (generated[: min(cut)], True) if cut else (generated, False)


def stopped(generated_tail: str) -> bool:
    """Whether the end of a generation contains a stop (checked on its last few tokens' text)."""
    return any(s in generated_tail for s in STOPS)


def number_at(match) -> Decimal:
    """The number a :data:`NUMBER` match reads (``1,2,3``: the last of a list)."""
    sign, digits = match.groups()
    digits = digits.rstrip(",")
    if "," in digits and not re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", digits):
        digits, sign = digits.rsplit(",", 1)[1], ""
    return Decimal((sign or "") + digits.replace(",", ""))


def extract_cot_answer(solution: str) -> Decimal | None:
    """The prediction of a solution by :data:`COT_RULE`: the first number after its last ``The answer is``,
    else its last number; None when it has no number."""
    text = solution.replace("\u2212", "-")
    phrases = list(_PHRASE.finditer(text))
    if phrases:
        after = NUMBER.search(text, phrases[-1].end())
        if after is not None:
            return number_at(after)
    numbers = list(NUMBER.finditer(text))
    return number_at(numbers[-1]) if numbers else None

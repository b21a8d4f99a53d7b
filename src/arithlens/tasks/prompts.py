"""Arithmetic prompt sets with the paper's operator counterfactuals.

Ground floor of the science wing (paper § "Setup", "Data" and "Counterfactual input"). Two operands
A, B in a range (default 1..9), an operator (+ - * /), an answer C that must be a *single token*
right after the prompt, written in one of the shipped templates (three styles: equation, statement,
question-answer), over the facts and operators of :mod:`arithlens.tasks.facts` (one half of the facts,
or all). The counterfactual is the same text with the operator replaced by a null word ("nothing",
"none") or a meaningless symbol ("@", "<") — the paper's; operands and template unchanged — or, as
checks of what the heads detect, by its partner operation (``swap``: + ↔ −, × ↔ ÷, answer format
kept) or with operand B replaced by another digit (``operand``).

Every position the analyses use (operand A, operand B, operator, END) is found from the tokenizer's
character offsets and asserted; a clean/counterfactual pair that does not tokenize to the same length
with equal tokens outside the operator is dropped and counted, never silently misaligned. The items
follow :class:`arithlens.core.items.Item`; the alignment itself is :func:`arithlens.core.items.align_counterfactual`,
shared with the transfer suites.

Written by hand: the templates and the checks (no library generates these prompts).
"""

from __future__ import annotations

import random
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch

from arithlens.core.items import align_counterfactual, continuation, encode, length_batches, to_tokens, tokens_over
from arithlens.core.models import LoadedModel, logits_at_end
from arithlens.tasks.facts import NULL_OPERATORS, OPERATORS, SWAPPED, Form, Operator, fact_half, operand_pairs

Style = Literal["equation", "statement", "question"]
Facts = Literal["all", "localization", "evaluation"]
Counterfactual = Literal["null", "swap", "operand"]


@dataclass(frozen=True)
class Template:
    """A prompt template: ``{a}``, ``{op}``, ``{b}`` slots; it ends where the answer's token starts."""

    name: str
    style: Style
    text: str
    form: Form

    def render(self, a: int, op: str, b: int) -> str:
        return self.text.format(a=a, op=op, b=b)


TEMPLATES: dict[str, Template] = {t.name: t for t in [
    Template("eq_spaced", "equation", "{a} {op} {b} = ", "symbol"),
    Template("eq_compact", "equation", "{a}{op}{b}=", "symbol"),
    Template("eq_compute", "equation", "Compute: {a} {op} {b} = ", "symbol"),
    Template("eq_calculate", "equation", "Calculate {a} {op} {b}. The answer is ", "symbol"),
    Template("st_equals", "statement", "{a} {op} {b} equals ", "word"),
    Template("st_is", "statement", "{a} {op} {b} is ", "word"),
    Template("st_result", "statement", "The result of {a} {op} {b} is ", "word"),
    Template("st_noun", "statement", "The {op} of {a} and {b} is ", "noun"),
    Template("qa_what", "question", "What is {a} {op} {b}? Answer: ", "word"),
    Template("qa_noun", "question", "Q: What is the {op} of {a} and {b}? A: ", "noun"),
    Template("qa_symbol", "question", "Question: {a} {op} {b} = ? Answer: ", "symbol"),
    Template("qa_howmuch", "question", "How much is {a} {op} {b}? It is ", "word"),
]}


@dataclass(frozen=True)
class PromptItem:
    """One clean prompt, its counterfactual, the answer token and the asserted positions."""

    operator: str
    template: str
    style: Style
    a: int
    b: int
    answer: int
    clean: str
    counterfactual: str
    answer_token: int
    clean_tokens: tuple[int, ...]
    cf_tokens: tuple[int, ...]
    a_pos: int
    b_pos: int
    op_pos: int
    end_pos: int


@dataclass(frozen=True)
class PromptConfig:
    """What to generate. ``n_per_cell`` items per operator × template (fewer if the pool is smaller)."""

    operators: tuple[str, ...] = ("+", "-", "*", "/")
    templates: tuple[str, ...] = tuple(TEMPLATES)
    n_per_cell: int = 30
    operand_range: tuple[int, int] = (1, 9)
    shots: int = 0
    seed: int = 0
    facts: Facts = "all"  # which half of the arithmetic facts (:func:`fact_half`) queries and demonstrations use
    counterfactual: Counterfactual = "null"  # the paper's null operator, an operator swap, or another operand B

    def __post_init__(self):
        unknown_ops = [o for o in self.operators if o not in OPERATORS]
        if unknown_ops:
            raise ValueError(f"unknown operator(s) {unknown_ops}: choose from {list(OPERATORS)}")
        unknown_t = [t for t in self.templates if t not in TEMPLATES]
        if unknown_t:
            raise ValueError(f"unknown template(s) {unknown_t}: choose from {list(TEMPLATES)}")
        lo, hi = self.operand_range
        if not (0 <= lo <= hi):
            raise ValueError(f"operand_range must be (lo, hi) with 0 <= lo <= hi, got {self.operand_range}")
        if self.n_per_cell < 1 or self.shots < 0:
            raise ValueError("n_per_cell must be >= 1 and shots >= 0")
        if self.facts not in ("all", "localization", "evaluation"):
            raise ValueError(f"facts must be 'all', 'localization' or 'evaluation', got {self.facts!r}")
        if self.counterfactual not in ("null", "swap", "operand"):
            raise ValueError(f"counterfactual must be 'null', 'swap' or 'operand', got {self.counterfactual!r}")


@dataclass(frozen=True)
class PromptSet:
    """Items plus how many candidates were dropped and why."""

    config: PromptConfig
    items: tuple[PromptItem, ...]
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def to_frame(self) -> pd.DataFrame:
        """One row per item (tokens left out)."""
        rows = [{k: getattr(it, k) for k in ("operator", "template", "style", "a", "b", "answer", "clean",
                                              "counterfactual", "answer_token", "a_pos", "b_pos", "op_pos",
                                              "end_pos")} for it in self.items]
        return pd.DataFrame(rows)

    def subset(self, keep) -> "PromptSet":
        """A new set with the items for which ``keep`` (a boolean sequence) is true."""
        keep = list(keep)
        assert len(keep) == len(self.items)
        return PromptSet(self.config, tuple(it for it, k in zip(self.items, keep) if k), dict(self.dropped))


def _span_token(offsets: list[tuple[int, int]], start: int, end: int) -> int:
    """Index of the last token overlapping characters [start, end)."""
    hits = tokens_over(offsets, start, end)
    if not hits:
        raise AssertionError(f"no token covers characters {start}..{end}")
    return hits[-1]


def _answer_token(tokenizer, prompt: str, answer: int) -> int | None:
    """The answer's token right after ``prompt``, or None if the answer is not exactly one token there."""
    added = continuation(tokenizer, prompt, str(answer))
    return added[0] if added is not None and len(added) == 1 else None


def _single_token_answer(tokenizer, prompt: str, answer: int) -> bool:
    return _answer_token(tokenizer, prompt, answer) is not None


def few_shot_prefix(template: Template, op: Operator, pool, shots: int, rng: random.Random) -> str:
    """``shots`` demonstrations drawn from ``pool`` (``(a, b, answer)`` facts) with ``rng``, one line each:
    the question in ``template`` with ``op``, then its answer."""
    demos = rng.sample(pool, min(shots, len(pool)))
    return "".join(template.render(a, op.render(template.form), b) + f"{c}\n" for a, b, c in demos)


def make_prompts(tokenizer, config: PromptConfig = PromptConfig()) -> PromptSet:
    """Generate a seeded prompt set (see module docstring) for ``tokenizer``.

    Few-shot demonstrations (``config.shots``) use the same template and operator, are fixed per
    cell, and are never the query itself; with ``config.facts`` set, queries and demonstrations alike
    come from that half of the facts (:func:`fact_half`). Only the query's operator is replaced in the counterfactual.
    """
    items: list[PromptItem] = []
    dropped: Counter[str] = Counter()
    lo, hi = config.operand_range
    for op_key in config.operators:
        op = OPERATORS[op_key]
        pool = [p for p in operand_pairs(op, lo, hi) if config.facts == "all"
                or fact_half(op_key, p[0], p[1], config.operand_range) == config.facts]
        for t_name in config.templates:
            tpl = TEMPLATES[t_name]
            cell_rng = random.Random(f"{config.seed}|{op_key}|{t_name}")
            # The paper's answers are one token; pairs whose answer is not are out of scope (not
            # counted as dropped), and they are not used as demonstrations either.
            eligible = [p for p in pool if _single_token_answer(tokenizer, tpl.render(p[0], op.render(tpl.form), p[1]), p[2])]
            chosen = cell_rng.sample(eligible, min(config.n_per_cell, len(eligible)))
            for a, b, c in chosen:
                others = [p for p in eligible if p != (a, b, c)]
                prefix = few_shot_prefix(tpl, op, others, config.shots, cell_rng) if config.shots else ""
                item, reason = build_item(tokenizer, tpl, op, a, b, c, prefix,
                                          random.Random(f"{config.seed}|{op_key}|{t_name}|{a}|{b}"), config.counterfactual)
                if item is None:
                    dropped[reason] += 1
                else:
                    items.append(item)
    return PromptSet(config, tuple(items), dict(dropped))


def build_item(tokenizer, tpl: Template, op: Operator, a: int, b: int, c: int, prefix: str,
               rng: random.Random, counterfactual: Counterfactual = "null") -> tuple[PromptItem | None, str]:
    """The item asking ``a op b`` in ``tpl`` after ``prefix`` (its demonstrations), with its counterfactual and
    token positions; or ``(None, reason)`` where it cannot be built (the answer is not one token after it)."""
    op_text = op.render(tpl.form)
    clean = prefix + tpl.render(a, op_text, b)
    ids, offsets = encode(tokenizer, clean)
    answer_token = _answer_token(tokenizer, clean, c)
    if answer_token is None:
        return None, "answer is not a single token after the prompt"
    # Character spans of the query's slots, found by rendering with sentinels.
    spans = _slot_spans(tpl, prefix, a, op_text, b)
    a_pos = _span_token(offsets, *spans["a"])
    b_pos = _span_token(offsets, *spans["b"])
    op_pos = _span_token(offsets, *spans["op"])
    # The slots' last tokens must spell the operands' last digits: positions come from offsets, and
    # this check catches a tokenizer whose offsets are not what we assume.
    assert tokenizer.decode([ids[a_pos]]).strip().endswith(str(a)[-1]), f"operand A misplaced in {clean!r}"
    assert tokenizer.decode([ids[b_pos]]).strip().endswith(str(b)[-1]), f"operand B misplaced in {clean!r}"
    if counterfactual == "operand":  # another B in the range: the same operation on other numbers
        candidates = [str(x) for x in range(1, 10) if x != b]
        span, fixed = spans["b"], (a_pos, op_pos)
    else:  # the paper's null operator, or the partner operation written the same way
        candidates = ([OPERATORS[SWAPPED[op.symbol]].render(tpl.form)] if counterfactual == "swap"
                      else list(NULL_OPERATORS[tpl.form]))
        span, fixed = spans["op"], (a_pos, b_pos)
    rng.shuffle(candidates)
    # Equal length and equal tokens outside the replaced span: A, B, the operator and END stay in place.
    aligned = align_counterfactual(tokenizer, clean, ids, offsets, span, candidates, fixed=fixed)
    if aligned is None:
        return None, "no counterfactual tokenizes to the same length"
    cf, cf_ids = aligned
    return PromptItem(op.symbol, tpl.name, tpl.style, a, b, c, clean, cf, answer_token, tuple(ids),
                      cf_ids, a_pos, b_pos, op_pos, len(ids) - 1), ""


def _slot_spans(tpl: Template, prefix: str, a: int, op_text: str, b: int) -> dict[str, tuple[int, int]]:
    """Character spans of {a}, {op}, {b} in ``prefix + tpl.render(...)``."""
    values = {"a": str(a), "op": op_text, "b": str(b)}
    spans, pos, rest = {}, len(prefix), tpl.text
    for literal, fname, _, _ in string.Formatter().parse(rest):
        pos += len(literal)
        if fname is None:
            continue
        spans[fname] = (pos, pos + len(values[fname]))
        pos += len(values[fname])
    return spans


def score_prompts(model: LoadedModel, prompts: PromptSet, batch_size: int = 32, progress=None) -> pd.DataFrame:
    """Greedy next-token check of every item: one row per item with ``correct`` and ``p_answer``.

    ``model`` is a :class:`arithlens.core.models.LoadedModel`; ``progress`` an optional callable wrapping
    an iterable (e.g. :func:`arithlens.core.progress.progress`).
    """
    frame = prompts.to_frame()
    predicted = np.zeros(len(prompts), dtype=np.int64)
    p_answer = np.zeros(len(prompts))
    answer_logit = np.zeros(len(prompts))
    batches = length_batches(prompts.items, batch_size)
    for batch in (progress(batches, desc="scoring prompts") if progress else batches):
        tokens = to_tokens([prompts.items[i] for i in batch])
        logits = logits_at_end(model, tokens)
        answers = torch.tensor([prompts.items[i].answer_token for i in batch], device=logits.device)
        probs = logits.softmax(-1)
        predicted[batch] = logits.argmax(-1).cpu().numpy()
        p_answer[batch] = probs.gather(1, answers[:, None])[:, 0].cpu().numpy()
        answer_logit[batch] = logits.gather(1, answers[:, None])[:, 0].cpu().numpy()
    frame["predicted"] = [model.tokenizer.decode([int(t)]) for t in predicted]
    frame["correct"] = predicted == frame["answer_token"].to_numpy()
    frame["p_answer"] = p_answer
    frame["answer_logit"] = answer_logit
    return frame


def accuracy_table(scores: pd.DataFrame, by=("operator", "template", "style")) -> pd.DataFrame:
    """Accuracy, item count and mean p(answer) per group (tidy: one row per group)."""
    grouped = scores.groupby(list(by), sort=False)
    return grouped.agg(n=("correct", "size"), accuracy=("correct", "mean"),
                       mean_p_answer=("p_answer", "mean")).reset_index()


def filter_correct(prompts: PromptSet, scores: pd.DataFrame, min_items: int = 1) -> PromptSet:
    """Keep the items the model answers correctly; fail with a clear message if fewer than ``min_items``."""
    kept = prompts.subset(scores["correct"].tolist())
    if len(kept) < min_items:
        raise ValueError(
            f"only {len(kept)} of {len(prompts)} prompts are answered correctly (need {min_items}); "
            "try few-shot prompts (shots), other templates, or turn the correctness filter off"
        )
    return kept


def tokenization_table(tokenizer, prompts: PromptSet, per_template: int = 1) -> pd.DataFrame:
    """Example items with the query's tokens and the asserted positions marked.

    Tokens are separated by ``│``, a space shows as ``␣``, and the tokens at the A, B, operator and
    END positions carry a ``[A]``, ``[B]``, ``[op]``, ``[END]`` tag.
    """
    rows, seen = [], Counter()
    for it in prompts.items:
        if seen[(it.template, it.operator)] >= per_template:
            continue
        seen[(it.template, it.operator)] += 1
        marks = {it.a_pos: "A", it.b_pos: "B", it.op_pos: "op", it.end_pos: "END"}
        start = len(it.clean.rsplit("\n", 1)[0]) if "\n" in it.clean else 0
        first = next(i for i, t in enumerate(encode(tokenizer, it.clean)[1]) if t[1] > start)
        shown = " │ ".join(
            tokenizer.decode([t]).replace(" ", "␣") + (f"[{marks[i]}]" if i in marks else "")
            for i, t in enumerate(it.clean_tokens) if i >= first
        )
        rows.append({"template": it.template, "operator": it.operator,
                     "query": it.clean.rsplit("\n", 1)[-1], "counterfactual": it.counterfactual.rsplit("\n", 1)[-1],
                     "answer": it.answer, "query tokens": shown, "prompt length": len(it.clean_tokens)})
    return pd.DataFrame(rows)


def make_item(tokenizer, template: str, operator: str, a: int, b: int, shots: int = 0, seed: int = 0) -> PromptItem:
    """One specific prompt (e.g. ``4 + 3``) with seeded few-shot demonstrations, or a ValueError."""
    if template not in TEMPLATES or operator not in OPERATORS:
        raise ValueError(f"unknown template {template!r} or operator {operator!r}")
    tpl, op = TEMPLATES[template], OPERATORS[operator]
    c = op.apply(a, b)
    if c is None:
        raise ValueError(f"{a} {operator} {b} has no natural-number answer")
    rng = random.Random(f"{seed}|{operator}|{template}|{a}|{b}")
    pool = [p for p in operand_pairs(op, 1, 9) if p != (a, b, c)
            and _single_token_answer(tokenizer, tpl.render(p[0], op.render(tpl.form), p[1]), p[2])]
    prefix = few_shot_prefix(tpl, op, pool, shots, rng) if shots else ""
    item, reason = build_item(tokenizer, tpl, op, a, b, c, prefix, rng)
    if item is None:
        raise ValueError(f"cannot build {a} {operator} {b} in {template}: {reason}")
    return item

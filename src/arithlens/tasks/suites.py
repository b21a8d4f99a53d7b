"""Transfer suites: other arithmetic tasks and non-math controls, generated under a seed.

Science wing, ground floor (paper § "Transfer"). Each suite is a list of :class:`SuiteItem` — a clean
prompt, its answer (one or more tokens), the token positions of the numbers and of the operation
word, and, where the suite has one, a counterfactual that replaces only the operation (the paper's
null-operator idea, stated per suite below). Items follow :class:`arithlens.core.items.Item` (``clean_tokens``,
``cf_tokens``, ``answer_token``, ``operator``, ``end_pos``), like chapter 0's prompts, so chapter 1's
patching and knockout code runs on them unchanged; the counterfactual is aligned by the same
:func:`arithlens.core.items.align_counterfactual`.

Suites (``SUITES``):

- ``multidigit`` / ``multidigit3``: ``28 + 35 = 63`` / ``281 + 135 = 416`` (2- or 3-digit operands, + and
  −); counterfactual: operator → a null symbol (``@``, ``<``, …). Scored by greedy decoding of the whole
  answer and by its first token.
- ``decimals``: ``4.2 plus 2.5 equals 6.7``; counterfactual: operator word → a null word.
- ``years``: "The war lasted from the year 1723 to the year 172" → any digit larger than 3 ends a
  later year (the greater-than task). Scored by the probability mass on valid digits minus the mass on
  the others; correct when the top token is a valid digit. No counterfactual.
- ``word_problems``: "Tom has 3 apples. Tom gets 4 apples. Now Tom has 7"; counterfactual: the
  operation verb → a neutral verb ("sees", "likes", …).
- ``power``: ``2 ^ 3 = 8`` (bases 2–9, exponents 0–3); counterfactual: ``^`` → a null symbol.
- ``capitals``, ``antonyms``, ``languages`` (country → main language), ``plurals``, ``past_tense``,
  ``elements`` (chemical symbols), ``sequences``: non-math controls shipped as hand-checked data
  (``data/controls.json``); no counterfactual. Only ``sequences`` (next day, month, letter) is ordinal.

Every suite uses a few fixed demonstrations (same format, never the query). Answers are computed by
the generator (Python arithmetic or the data file) and checked in the tests independently.

The task generators themselves (templates, word lists, answers) are in :mod:`arithlens.tasks.generators`.

Written by hand: alignment checks and the teacher-forced scorer (no library generates or scores these
tasks on a TransformerLens bridge).
"""

from __future__ import annotations

import copy
import functools
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch

from arithlens.core.conditions import after_prefix_many
from arithlens.core.hooks import Hook, digit_tokens, prefix_kv
from arithlens.core.items import (align_counterfactual, continuation, encode, length_batches, prompt_families,
                                  shared_prefix_length, tokens_over)
from arithlens.core.models import LoadedModel
from arithlens.tasks.generators import (
    NEUTRAL_VERBS, NULL_SYMBOLS, NULL_WORDS, decimals_source, multidigit_source, pairs_source,
    power_source, sequences_source, word_problems_source, years_source,
)

Kind = Literal["math", "control"]
Scoring = Literal["exact", "mass", "choice"]


@dataclass(frozen=True)
class SuiteItem:
    """One prompt of a suite with its answer tokens and asserted positions."""

    suite: str
    operator: str                       # operation label ("+", "^", "capital", …) — groups items
    clean: str
    answer: str                         # the answer text right after the prompt (display and checks)
    counterfactual: str | None
    clean_tokens: tuple[int, ...]
    cf_tokens: tuple[int, ...] | None
    answer_tokens: tuple[int, ...]      # teacher-forced targets ("exact" scoring)
    valid_tokens: tuple[int, ...] = ()  # tokens counted correct at END ("mass" scoring)
    number_pos: tuple[int, ...] = ()    # every token of every number in the query
    op_pos: int | None = None           # last token of the operation (symbol/word/verb)
    end_pos: int = -1
    meta: tuple = ()                    # (key, value) pairs: operands, template, …
    choice_tokens: tuple[int, ...] = ()  # the option letters at END ("choice" scoring; the answer is one of them)

    @property
    def answer_token(self) -> int:
        return self.answer_tokens[0] if self.answer_tokens else self.valid_tokens[0]


@dataclass(frozen=True)
class Suite:
    name: str
    kind: Kind
    scoring: Scoring
    description: str
    counterfactual: str | None          # how the counterfactual is made, or None
    items: tuple[SuiteItem, ...]
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def has_counterfactual(self) -> bool:
        return self.counterfactual is not None

    @property
    def chance(self) -> float:
        """Accuracy of guessing uniformly among the valid-looking options (digits for years, the options of
        a multiple-choice item, else 0)."""
        if self.scoring == "choice":
            return float(np.mean([1 / len(it.choice_tokens) for it in self.items])) if self.items else 0.0
        if self.scoring == "mass":
            return float(np.mean([len(it.valid_tokens) / 10 for it in self.items])) if self.items else 0.0
        return 0.0

    def subset(self, keep) -> "Suite":
        keep = list(keep)
        assert len(keep) == len(self.items)
        return Suite(self.name, self.kind, self.scoring, self.description, self.counterfactual,
                     tuple(it for it, k in zip(self.items, keep) if k), dict(self.dropped))

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"suite": it.suite, "operator": it.operator, "prompt": it.clean, "answer": it.answer,
                              "counterfactual": it.counterfactual, "n_tokens": len(it.clean_tokens),
                              **dict(it.meta)} for it in self.items])


# --- building one item ---------------------------------------------------------------------------

def build_item(tokenizer, suite: str, label: str, prefix: str, parts: list[tuple[str, str]], answer: str,
           nulls: tuple[str, ...] | None, rng: random.Random, valid_answers: tuple[str, ...] = (),
           meta: tuple = ()) -> tuple[SuiteItem | None, str]:
    """Assemble ``prefix + parts`` (each part tagged ``text``/``num``/``op``), align and check.

    The answer must tokenize as a continuation of the prompt (prompt tokens unchanged). The
    counterfactual replaces the ``op`` part with one of ``nulls`` that keeps every other token.
    """
    clean, spans = prefix, {"num": [], "op": None}
    for kind, text in parts:
        if kind == "num":
            spans["num"].append((len(clean), len(clean) + len(text)))
        elif kind == "op":
            spans["op"] = (len(clean), len(clean) + len(text))
        clean += text
    ids, offsets = encode(tokenizer, clean)
    answer_tokens: tuple[int, ...] = ()
    valid: tuple[int, ...] = ()
    if valid_answers:
        conts = [continuation(tokenizer, clean, v, ids) for v in valid_answers]
        if any(c is None or len(c) != 1 for c in conts):
            return None, "valid answer not one token"
        valid = tuple(c[0] for c in conts)
    else:
        cont = continuation(tokenizer, clean, answer, ids)
        if cont is None:
            return None, "answer does not continue the prompt's tokens"
        answer_tokens = cont
    number_pos = tuple(sorted({i for s, e in spans["num"] for i in tokens_over(offsets, s, e)}))
    op_pos = tokens_over(offsets, *spans["op"])[-1] if spans["op"] else None
    cf, cf_tokens = None, None
    if nulls is not None:
        aligned = align_counterfactual(tokenizer, clean, ids, offsets, spans["op"], rng.sample(list(nulls), len(nulls)),
                                       fixed=number_pos)
        if aligned is None:
            return None, "no counterfactual keeps the other tokens"
        cf, cf_tokens = aligned
    return SuiteItem(suite, label, clean, answer, cf, tuple(ids), cf_tokens, answer_tokens, valid, number_pos,
                     op_pos, len(ids) - 1, meta), ""


def _generate(tokenizer, suite: str, candidates: list, render: Callable, n: int, shots: int, seed: int,
              nulls: tuple[str, ...] | None, per_label: bool = True) -> tuple[list[SuiteItem], Counter]:
    """Pick up to ``n`` candidates (seeded, split evenly over labels) with ``shots`` fixed demonstrations.

    ``render(candidate) -> (label, parts, answer, valid_answers, meta)``. With ``per_label`` the
    demonstrations share the query's label (operator), as in chapter 0's "same template and operator";
    otherwise they are drawn from the whole suite. Demonstrations are never queries.
    """
    rng = random.Random(f"{seed}|{suite}")
    pool = list(candidates)
    rng.shuffle(pool)
    groups: dict[str, list] = {}
    for c in pool:
        groups.setdefault(render(c)[0] if per_label else "", []).append(c)

    def line(c) -> str:
        _, parts, ans, valid, _ = render(c)
        return "".join(t for _, t in parts) + (ans if not valid else valid[-1]) + "\n"

    items, dropped = [], Counter()
    quota = -(-n // len(groups))
    for group in groups.values():
        demos, queries = group[:shots], group[shots:]
        prefix = "".join(line(d) for d in demos)
        kept = 0
        for cand in queries:
            if kept == quota or len(items) == n:
                break
            label, parts, ans, valid, meta = render(cand)
            item, reason = build_item(tokenizer, suite, label, prefix, parts, ans, nulls, rng, valid, meta)
            if item is None:
                dropped[reason] += 1
            else:
                items.append(item)
                kept += 1
    return items, dropped


@dataclass(frozen=True)
class SuiteSpec:
    kind: Kind
    scoring: Scoring
    description: str
    counterfactual: str | None
    nulls: tuple[str, ...] | None
    source: Callable[[int], tuple[list, Callable]]
    shots: int = 3
    per_label: bool = True


SUITES: dict[str, SuiteSpec] = {
    "multidigit": SuiteSpec("math", "exact", "2-digit + and − (`28 + 35 = 63`)", "operator → null symbol",
                            NULL_SYMBOLS, multidigit_source),
    "multidigit3": SuiteSpec("math", "exact", "3-digit + and − (`281 + 135 = 416`, the paper's example)",
                             "operator → null symbol", NULL_SYMBOLS, lambda s: multidigit_source(s, 3)),
    "decimals": SuiteSpec("math", "exact", "one-decimal plus/minus (`4.2 plus 2.5 equals 6.7`)",
                          "operator word → null word", NULL_WORDS, decimals_source),
    "years": SuiteSpec("math", "mass", "year spans (`from the year 1723 to the year 172_`: a digit > 3)",
                       None, None, years_source, shots=0),
    "word_problems": SuiteSpec("math", "exact", "one-step word problems, answer 0–9", "operation verb → neutral verb",
                               NEUTRAL_VERBS, word_problems_source),
    "power": SuiteSpec("math", "exact", "exponentiation (`2 ^ 3 = 8`, bases 2–9, exponents 0–3)",
                       "`^` → null symbol", NULL_SYMBOLS, power_source),
    "capitals": SuiteSpec("control", "exact", "capital cities (`The capital of France is Paris`)", None, None,
                          lambda s: pairs_source("capitals")),
    "antonyms": SuiteSpec("control", "exact", "antonyms (`The opposite of hot is cold`)", None, None,
                          lambda s: pairs_source("antonyms")),
    "languages": SuiteSpec("control", "exact", "main language (`The main language of Brazil is Portuguese`)", None,
                           None, lambda s: pairs_source("languages")),
    "plurals": SuiteSpec("control", "exact", "noun plurals (`The plural of mouse is mice`)", None, None,
                         lambda s: pairs_source("plurals")),
    "past_tense": SuiteSpec("control", "exact", "verb past tense (`The past tense of go is went`)", None, None,
                            lambda s: pairs_source("past_tense")),
    "elements": SuiteSpec("control", "exact", "chemical symbols (`The chemical symbol for gold is Au`)", None, None,
                          lambda s: pairs_source("elements")),
    "sequences": SuiteSpec("control", "exact", "next item of days, months, letters (`March, April, May, June`)",
                           None, None, sequences_source, per_label=False),
}
SUITE_NAMES = list(SUITES)


def make_suite(name: str, tokenizer, n: int = 64, seed: int = 0, shots: int | None = None) -> Suite:
    """Generate suite ``name`` with up to ``n`` items (seeded; the same seed gives the same items)."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}: choose from {SUITE_NAMES}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    spec = SUITES[name]
    cands, render = spec.source(seed)
    items, dropped = _generate(tokenizer, name, cands, render, n, spec.shots if shots is None else shots, seed,
                               spec.nulls, spec.per_label)
    return Suite(name, spec.kind, spec.scoring, spec.description, spec.counterfactual, tuple(items), dict(dropped))


# --- scoring -----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def number_continuations(tokenizer) -> torch.Tensor:
    """Token ids that would go on writing a number written just before them: every token whose text
    starts with a digit (no leading space or word marker), so ``12`` followed by one of them is not the
    number 12 — the ten digits on digit-by-digit tokenizers, also ``00``–``999`` where numbers are
    split into groups."""
    ids = [i for tok, i in tokenizer.get_vocab().items() if tok[:1].isdigit()]
    return torch.tensor(sorted(ids), dtype=torch.long)


def number_ended(tokenizer, answers: Sequence[str], next_tokens: torch.Tensor) -> torch.Tensor:
    """The end-of-number rule both teacher-forced scorers apply: per answer, False where it ends in a
    digit and ``next_tokens`` (the greedy token after its last one) would go on writing the number
    (:func:`number_continuations`), else True."""
    numeric = torch.tensor([a[-1:].isdigit() for a in answers], device=next_tokens.device)
    return ~(numeric & torch.isin(next_tokens, number_continuations(tokenizer).to(next_tokens.device)))


def forced_answer(suite: Suite, item) -> tuple[int, ...]:
    """The answer tokens fed after the prompt when scoring teacher-forced: all of them for exact match,
    all but the last otherwise (mass and choice are judged where the answer starts)."""
    return tuple(item.answer_tokens) if suite.scoring == "exact" else tuple(item.answer_tokens[:-1])


class SuiteScorer:
    """Teacher-forced scoring of a suite, with the prompts' KV caches computed once for every condition.

    Input = prompt + answer tokens; the positions that predict are END and the answer tokens. Greedy
    decoding yields the answer iff each of them predicts the next answer token and, where the answer
    ends in a digit, the last one predicts no token that would go on writing the number
    (:func:`number_continuations`): on a digit-by-digit tokenizer, ``1`` followed
    by ``2`` is the answer 12, not 1. The prompt before END runs once (HF ``past_key_values``) — the
    demonstrations a family of prompts shares (:func:`arithlens.core.items.prompt_families`) once for the family; each
    condition re-runs only END and the answer positions, so a hook applied there (``fwd_hooks``) acts
    at every predicting position and nowhere else. A ``choice`` suite (multiple choice, e.g. a benchmark file
    read by :mod:`arithlens.tasks.benchmarks.reader`) is scored at END among its items' option letters only.
    """

    def __init__(self, model: LoadedModel, suite: Suite, batch_size: int = 32):
        self.model, self.suite = model, suite
        self.batches = []
        self.shared: list[int] = []  # per family of prompts (:func:`arithlens.core.items.prompt_families`): the tokens it shares
        hf = model.bridge.original_model
        with torch.no_grad():
            for family in prompt_families([it.clean_tokens for it in suite.items]):
                its = [suite.items[i] for i in family]
                shared = shared_prefix_length(it.clean_tokens for it in its) if len(family) > 1 else 0
                self.shared.append(shared)
                head = prefix_kv(model, torch.tensor([its[0].clean_tokens[:shared]], device=model.device)) if shared else None
                for part in length_batches(its, batch_size, key=lambda it: (len(it.clean_tokens), len(it.answer_tokens))):
                    batch = [its[j] for j in part]
                    answers = [forced_answer(suite, it) for it in batch]
                    seq = torch.tensor([list(it.clean_tokens) + list(a) for it, a in zip(batch, answers)], device=model.device)
                    n_prompt = len(batch[0].clean_tokens)
                    if head is not None:  # the family's prefix once, then each row's own tokens before END
                        kv = copy.deepcopy(head)
                        kv.batch_repeat_interleave(len(batch))
                        if n_prompt - 1 > shared:
                            hf(seq[:, shared: n_prompt - 1], past_key_values=kv, use_cache=True, logits_to_keep=1)
                    else:
                        kv = prefix_kv(model, seq[:, : n_prompt - 1]) if n_prompt > 1 else None
                    self.batches.append((np.asarray([family[j] for j in part]), seq, n_prompt, kv))

    @torch.no_grad()
    def score(self, fwd_hooks: Iterable[Hook] = (),
              item_hooks: Callable[[np.ndarray], list[Hook]] | None = None) -> pd.DataFrame:
        """One row per item: ``correct``, ``first_correct``, ``p_answer`` (first token, or valid mass, or
        the answer's share among the options), ``score`` (exact: log p of the full answer; mass: p(valid) −
        p(other digits); choice: log of that share). ``item_hooks`` maps a batch's item indices to more
        hooks, for interventions that differ by item (resample ablation)."""
        fwd_hooks = list(fwd_hooks)
        condition = (lambda b: fwd_hooks + item_hooks(b)) if item_hooks is not None else fwd_hooks
        return self.score_many([condition])[0]

    @torch.no_grad()
    def score_many(self, conditions: Sequence[Iterable[Hook] | Callable[[np.ndarray], list[Hook]]]) -> list[pd.DataFrame]:
        """:meth:`score` under each condition — hooks, or a map from a batch's item indices to hooks — with
        the conditions stacked along the batch on each batch's cached prompt
        (:func:`arithlens.core.conditions.after_prefix_many`): what a null over hundreds of head sets needs."""
        n = len(self.suite.items)
        cols = [{"correct": np.zeros(n, bool), "first_correct": np.zeros(n, bool), "p_answer": np.zeros(n),
                 "score": np.zeros(n)} for _ in conditions]
        for b, seq, n_prompt, kv in self.batches:
            fwds = [c(b) if callable(c) else list(c) for c in conditions]
            after_prefix_many(self.model, seq[:, n_prompt - 1:], fwds, kv,
                              lambda j, logits, b=b: self._judge(b, logits.float(), cols[j]))
        items = self.suite.items
        return [pd.DataFrame({"suite": self.suite.name, "kind": self.suite.kind, "item": np.arange(n),
                              "operator": [it.operator for it in items], **c}) for c in cols]

    def _judge(self, b: np.ndarray, logits: torch.Tensor, out: dict[str, np.ndarray]) -> None:
        judge(self.suite, self.model.tokenizer, b, logits, out)


def judge(suite: Suite, tokenizer, b: np.ndarray, logits: torch.Tensor, out: dict[str, np.ndarray]) -> None:
    """Write items ``b``'s columns of :meth:`SuiteScorer.score` into ``out`` from their logits at END and
    the answer positions (``[batch, tail, d_vocab]``, fp32): the suite's own rule for ``correct``,
    whichever pass made the logits."""
    items = suite.items
    correct, first, p_ans, score = out["correct"], out["first_correct"], out["p_answer"], out["score"]
    logp = logits.log_softmax(-1)
    if suite.scoring == "mass":
        valid = [items[i].valid_tokens for i in b]
        digits = digit_tokens(tokenizer).tolist()
        end = logp[:, -1].exp()
        top = logits[:, -1].argmax(-1)
        for j, v in enumerate(valid):
            vm = end[j, list(v)].sum()
            other = end[j, digits].sum() - vm
            correct[b[j]] = first[b[j]] = int(top[j]) in v
            p_ans[b[j]], score[b[j]] = float(vm), float(vm - other)
    elif suite.scoring == "choice":
        for j, i in enumerate(b):  # the options' log-probabilities renormalised among themselves
            options = logp[j, -1, list(items[i].choice_tokens)].log_softmax(-1)
            gold = items[i].choice_tokens.index(items[i].answer_tokens[0])
            correct[i] = first[i] = int(options.argmax()) == gold
            p_ans[i], score[i] = float(options[gold].exp()), float(options[gold])
    else:
        targets = torch.tensor([items[i].answer_tokens for i in b], device=logits.device)
        top = logits.argmax(-1)
        hits = top[:, :-1] == targets
        lp = logp[:, :-1].gather(-1, targets[..., None])[..., 0]
        ended = number_ended(tokenizer, [items[i].answer for i in b], top[:, -1])
        correct[b] = (hits.all(-1) & ended).cpu().numpy()
        first[b] = hits[:, 0].cpu().numpy()
        p_ans[b] = lp[:, 0].exp().cpu().numpy()
        score[b] = lp.sum(-1).cpu().numpy()


def score_suite(model: LoadedModel, suite: Suite, fwd_hooks: Iterable[Hook] = (), batch_size: int = 32) -> pd.DataFrame:
    """:meth:`SuiteScorer.score` once (build a :class:`SuiteScorer` to score several conditions)."""
    return SuiteScorer(model, suite, batch_size).score(fwd_hooks)

"""Scoring a benchmark file's suite: greedy generation, chain of thought, the first answer token, or the choice letters.

Science wing, beside :mod:`arithlens.tasks.benchmarks.reader` (paper § "Transfer" and § "Precise SFT" report
accuracy on public benchmarks). Four modes (:data:`MODES`), one engine (:class:`BenchmarkScorer`):

* ``generate`` — greedy decoding of at most ``max_new_tokens`` (default 16) new tokens, stopping at a
  newline or end-of-sequence; the *last number* of the text is the prediction, compared as a number
  (``3.50 == 3.5``). Text answers (a generic file) compare the text before the newline, case-folded.
  The direct answer only: 16 tokens leave no room for a chain of thought.
* ``cot`` — chain of thought: greedy decoding of at most ``max_new_tokens`` (default 256) new tokens
  after worked demonstrations (:func:`arithlens.tasks.benchmarks.cot.worked_prefix`), stopping at a blank
  line or a new ``Question:``; the answer is read by :data:`arithlens.tasks.benchmarks.cot.COT_RULE`.
* ``first_token`` — teacher-forced, the cheap variant: ``correct`` when greedy decoding would write the
  whole answer, ``first_correct`` its first token (what :class:`arithlens.tasks.suites.SuiteScorer` computes;
  the tests check the two agree).
* ``choice`` — multiple choice: the option letters' log-probabilities at END, renormalised among
  themselves; the most likely letter is the prediction.

Every mode returns one row per item with :class:`SuiteScorer`'s columns (``correct``,
``first_correct``, ``p_answer``, ``score``), so :func:`arithlens.analyses.transfer.knockout_transfer` takes a
:class:`BenchmarkScorer` (its ``scorer`` argument) as it takes a ``SuiteScorer``.

How the work is shared. The longest token prefix all prompts share (the few-shot demonstrations) runs
once per scorer. Each batch (items sorted by length) runs the rest of its prompts, left-padded *after*
the shared prefix — the attention mask hides the padding and position ids count real tokens only, so
an item sees exactly its own prompt — but for the last token, without hooks (HF ``past_key_values``).
END, then the teacher-forced answer or each generated token, runs through the bridge with
``fwd_hooks``: a knockout hook acts at every predicting position and nowhere else, as in
``SuiteScorer``.

Written by hand: the batched, cached decoding loop (HF ``generate`` does not run TransformerLens hooks
on a bridge, nor share one prefix across a batch); the model is the bridge's, the cache is HF's.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from arithlens.tasks.benchmarks import cot
from arithlens.tasks.benchmarks.formats import LETTERS, format_number
from arithlens.core import shared_prefix
from arithlens.core.shared_prefix import PrefixDecoder, RowCache
from arithlens.core.twin import make_twin
from arithlens.core.hooks import prefix_kv
from arithlens.core.items import shared_prefix_length
from arithlens.tasks.suites import Suite, number_ended

Mode = Literal["generate", "first_token", "choice", "cot"]
MODES: tuple[Mode, ...] = ("generate", "first_token", "choice", "cot")
#: The generation budget of each generating mode when none is given.
BUDGETS = {"generate": 16, "cot": cot.BUDGET}
#: Prompts a batch: hooked runs (the bridge, HF's cache) and the shared-prefix decoder (rows cost little
#: there: on a 2-core CPU a SmolLM2 decoding step takes 93 ms for 4 rows, 138 for 16, 247 for 48).
HOOKED_ROWS, DECODE_ROWS = 16, 64
#: The shared-prefix decoder runs a batch's prompts in chunks of similar length, at most this many
#: (padded) tokens a chunk, so one long prompt does not pad the whole batch.
PREFILL_TOKENS = 2048


def prefill_chunks(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` of rows sorted by length, each with ``rows × its longest ≤ budget``
    (a row longer than ``budget`` alone)."""
    chunks, r0 = [], 0
    for r in range(1, len(lengths) + 1):
        if r == len(lengths) or (r + 1 - r0) * max(lengths[r0: r + 1]) > budget:
            chunks.append((r0, r))
            r0 = r
    return chunks


def extract_last_number(text: str) -> Decimal | None:
    """The last number in generated text (``"It is 1,234 apples."`` → 1234; ``"5-3"`` → 3, the hyphen
    after a digit is not a minus sign); None when there is none."""
    found = list(cot.NUMBER.finditer(text.replace("\u2212", "-")))
    return cot.number_at(found[-1]) if found else None


def answers_match(predicted: Decimal | None, answer: str) -> bool:
    """Numeric equality (``3.50 == 3.5``); False when nothing was predicted."""
    try:
        return predicted is not None and predicted == Decimal(answer)
    except InvalidOperation:
        return False


def normalize_text(text: str) -> str:
    """How text answers are compared: stripped, case-folded, trailing ``.!?`` dropped."""
    return text.strip().rstrip(".!?").strip().casefold()


def default_mode(suite: Suite) -> Mode:
    """``choice`` for a multiple-choice suite, else ``generate``."""
    return "choice" if suite.scoring == "choice" else "generate"


@dataclass(frozen=True)
class PromptBatch:
    """Equal-width prompts after the shared prefix: left-padded tokens and their mask (1 = real)."""

    index: np.ndarray
    tokens: Int[Tensor, "batch pos"]
    mask: Int[Tensor, "batch pos"]


class BenchmarkScorer:
    """Score ``suite`` in ``mode`` (default: :func:`default_mode`), any number of conditions.

    ``max_new_tokens`` is the generation budget (default :data:`BUDGETS`); ``batch_size`` prompts run
    together (default: :data:`HOOKED_ROWS` for hooked runs, :data:`DECODE_ROWS` for the shared-prefix
    decoder). The shared prefix's cache is kept; each :meth:`score` call re-runs the rest of the prompts.
    """

    def __init__(self, model, suite: Suite, mode: Mode | None = None, max_new_tokens: int | None = None,
                 batch_size: int | None = None):
        mode = mode or default_mode(suite)
        if mode not in MODES:
            raise ValueError(f"unknown scoring {mode!r}: choose from {list(MODES)}")
        fits = {"exact": ("generate", "cot", "first_token"), "choice": ("choice", "first_token")}.get(suite.scoring, ())
        if mode not in fits:
            hint = f"use one of {list(fits)}" if fits else "score it with suites.SuiteScorer"
            raise ValueError(f"scoring {mode!r} does not fit suite {suite.name!r} ({suite.scoring} scoring): {hint}")
        if not len(suite):
            raise ValueError(f"suite {suite.name!r} has no items to score")
        self.model, self.suite, self.mode = model, suite, mode
        self.max_new_tokens = max_new_tokens if max_new_tokens is not None else BUDGETS.get(mode, 16)
        self.batch_size = batch_size
        items = suite.items
        self.shared = shared_prefix_length(it.clean_tokens for it in items)
        self._head = torch.tensor([items[0].clean_tokens[: self.shared]], device=model.device)
        self._prefix = self._decoder = self._decode_batches = None
        self._order = sorted(range(len(items)), key=lambda i: len(items[i].clean_tokens))
        self.batches = self._make_batches(batch_size or HOOKED_ROWS)
        self._stops: dict[int, bool] = {}
        self._twin = None

    def _make_batches(self, rows: int) -> list[PromptBatch]:
        """``rows`` prompts a batch, in order of length, each left-padded to its batch's longest."""
        items, model = self.suite.items, self.model
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        batches = []
        for s in range(0, len(self._order), rows):
            idx = self._order[s: s + rows]
            rest = [items[i].clean_tokens[self.shared:] for i in idx]
            width = max(map(len, rest))
            tokens = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rest], device=model.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rest], device=model.device)
            batches.append(PromptBatch(np.asarray(idx), tokens, mask))
        return batches

    def batches_for(self, fwd_hooks=()) -> list[PromptBatch]:
        """The batches a run with ``fwd_hooks`` takes: :data:`DECODE_ROWS` prompts each for the
        shared-prefix decoder (a decoding step costs little more for 64 rows than for 16 on a CPU, and
        its prompts run in chunks of similar length), :attr:`batches` otherwise."""
        if self.batch_size or self._shared_decoder(fwd_hooks) is None:
            return self.batches
        if self._decode_batches is None:
            self._decode_batches = self._make_batches(DECODE_ROWS)
        return self._decode_batches

    # --- the engine --------------------------------------------------------------------------------

    @property
    def prefix(self):
        """The shared prefix's HF cache, through the bridge (made on first use)."""
        if self._prefix is None and self.shared:
            self._prefix = prefix_kv(self.model, self._head)
        return self._prefix

    def _shared_decoder(self, fwd_hooks) -> PrefixDecoder | None:
        """With no hooks, a prefix of its own and a checked architecture: the shared-prefix decoder
        (:mod:`arithlens.core.shared_prefix`: the prefix's keys and values held once, each row's in a
        buffer allocated once); else None (HF's cache, the prefix repeated per row)."""
        if fwd_hooks or not self.shared or not shared_prefix.fits(self.model):
            return None
        if self._decoder is None:
            self._decoder = PrefixDecoder(self.model, self._head)
        return self._decoder

    @torch.no_grad()
    def _prompt_cache(self, batch: PromptBatch, fwd_hooks=(), extra: int = 1):
        """Run every prompt token but the last (no hooks); return the cache, the mask over prefix +
        prompt (END included) and END's position id. ``extra``: how many tokens will follow in the cache
        (END, then the answer or the generated tokens), for the shared-prefix decoder's buffers."""
        from transformers import DynamicCache

        n = len(batch.index)
        mask = torch.cat([torch.ones(n, self.shared, dtype=batch.mask.dtype, device=batch.mask.device), batch.mask], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        decoder = self._shared_decoder(fwd_hooks)
        if decoder is not None:
            width = batch.tokens.shape[1] - 1  # the prompts but END, left-padded
            kv = decoder.cache(n, width + extra, zeroed=width)
            lengths = batch.mask[:, :-1].sum(1).tolist()
            for r0, r1 in prefill_chunks(lengths, PREFILL_TOKENS):  # rows of similar length, each chunk its own width
                w = max(lengths[r0:r1])
                if w:
                    cols = slice(width - w, width)
                    decoder.forward(batch.tokens[r0:r1, cols], batch.mask[r0:r1, cols],
                                    positions[r0:r1, self.shared:][:, cols], kv.rows(r0, r1, start=width - w))
            kv.length = width
            return kv, mask, positions[:, -1:]
        kv = copy.deepcopy(self.prefix) if self.prefix is not None else DynamicCache()
        if self.prefix is not None:
            kv.batch_repeat_interleave(n)
        if batch.tokens.shape[1] > 1:
            self.model.bridge.original_model(input_ids=batch.tokens[:, :-1], attention_mask=mask[:, :-1],
                                             position_ids=positions[:, self.shared: -1], past_key_values=kv,
                                             use_cache=True, logits_to_keep=1)
        return kv, mask, positions[:, -1:]

    def _run(self, tokens: Tensor, kv, mask: Tensor, positions: Tensor, fwd_hooks) -> Tensor:
        """The hooked part: ``tokens`` [batch, t] after the cache; logits [batch, t, d_vocab] (fp32).
        With no hooks a plain HF twin runs instead (:func:`arithlens.core.twin.make_twin`: the same weight
        tensors, so a delta applied to the model applies to it; fused attention, 2–4× faster a step on CPU),
        the shared-prefix decoder where the cache is its own."""
        if isinstance(kv, RowCache):
            return self._decoder.forward(tokens, torch.ones_like(tokens), positions, kv, last_only=False)
        if not fwd_hooks:
            if self._twin is None:
                self._twin = make_twin(self.model)
            return self._twin(input_ids=tokens, past_key_values=kv, attention_mask=mask, position_ids=positions,
                              use_cache=True).logits.float()
        return self.model.bridge.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks), past_key_values=kv,
                                                attention_mask=mask, position_ids=positions).float()

    def _is_stop(self, token: int) -> bool:
        if token not in self._stops:
            tok = self.model.tokenizer
            self._stops[token] = token == tok.eos_token_id or "\n" in tok.decode([token])
        return self._stops[token]

    def _done(self, new: list[int]) -> bool:
        """Whether a generation has stopped: a newline (direct answers), a blank line or a new question
        (chain of thought, :data:`arithlens.tasks.benchmarks.cot.STOPS`), or end-of-sequence."""
        if self.mode != "cot":
            return self._is_stop(new[-1])
        return new[-1] == self.model.tokenizer.eos_token_id or cot.stopped(self.model.tokenizer.decode(new[-6:]))

    @torch.no_grad()
    def generate(self, batch: PromptBatch, fwd_hooks=()) -> tuple[Tensor, list[list[int]]]:
        """Greedy tokens for one batch: (END logits [batch, d_vocab], new tokens per item, stop included).
        A row that has stopped leaves the batch (its cache rows too, ``DynamicCache.batch_select_indices``),
        so a few long chains of thought do not carry the finished ones to the budget."""
        kv, mask, pos = self._prompt_cache(batch, fwd_hooks, extra=self.max_new_tokens)
        current = batch.tokens[:, -1:]
        new: list[list[int]] = [[] for _ in batch.index]
        live = list(range(len(batch.index)))  # batch rows still generating, in cache order
        end_logits = None
        for step in range(self.max_new_tokens):
            logits = self._run(current, kv, mask, pos, fwd_hooks)[:, -1]
            end_logits = logits if end_logits is None else end_logits
            nxt = logits.argmax(-1)
            keep = []
            for j, t in enumerate(nxt.tolist()):
                new[live[j]].append(t)
                if not self._done(new[live[j]]):
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(live):
                rows = torch.tensor(keep, device=nxt.device)
                kv.batch_select_indices(rows)
                nxt, pos, mask = nxt[rows], pos[rows], mask[rows]
                live = [live[j] for j in keep]
            current, pos = nxt[:, None], pos + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        return end_logits, new

    # --- the modes ---------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, fwd_hooks=(), progress=None) -> pd.DataFrame:
        """One row per item (file order): ``row``, ``answer``, ``prediction``, ``correct``,
        ``first_correct``, ``p_answer`` (first answer token; choice: its share among the options),
        ``score`` (log p of the whole answer / first token / option); ``generate`` adds ``generated``
        (text up to the stop), ``n_new_tokens`` and ``hit_budget`` (no newline within the budget)."""
        items, n = self.suite.items, len(self.suite)
        out = {k: [None] * n for k in ("prediction", "correct", "first_correct", "p_answer", "score",
                                        "generated", "n_new_tokens", "hit_budget")}
        batches = self.batches_for(fwd_hooks)
        batches = progress(batches, desc=f"{self.suite.name} ({self.mode})") if progress else batches
        for batch in batches:
            its = [items[i] for i in batch.index]
            if self.mode in ("generate", "cot"):
                end, new = self.generate(batch, fwd_hooks)
            elif self.mode == "choice":
                kv, mask, pos = self._prompt_cache(batch, fwd_hooks)
                end = self._run(batch.tokens[:, -1:], kv, mask, pos, fwd_hooks)[:, -1]
            else:
                rows = self._teacher_forced(batch, its, fwd_hooks)
            for j, (i, it) in enumerate(zip(batch.index, its)):
                if self.mode in ("generate", "cot"):
                    row = self._judge_generation(it, end[j], new[j])
                elif self.mode == "choice":
                    row = self._judge_choice(it, end[j])
                else:
                    row = rows[j]
                for k, v in row.items():
                    out[k][i] = v
        frame = pd.DataFrame({"suite": self.suite.name, "kind": self.suite.kind, "mode": self.mode,
                              "item": np.arange(n), "row": [dict(it.meta).get("row", -1) for it in items],
                              "operator": [it.operator for it in items],
                              "answer": [dict(it.meta).get("value", it.answer.strip()) for it in items],
                              **{k: v for k, v in out.items()}})
        if self.mode not in ("generate", "cot"):
            frame = frame.drop(columns=["generated", "n_new_tokens", "hit_budget"])
        return frame.astype({"correct": bool, "first_correct": bool, "p_answer": float, "score": float})

    def _teacher_forced(self, batch: PromptBatch, its, fwd_hooks) -> list[dict]:
        """SuiteScorer's rule: every answer token predicted, and after a number nothing that goes on
        writing it (:func:`arithlens.tasks.suites.number_ended`)."""
        width = max(len(it.answer_tokens) for it in its) + 1
        kv, mask, pos = self._prompt_cache(batch, fwd_hooks, extra=width)
        end = batch.tokens[:, -1].tolist()
        tail = torch.tensor([[e, *it.answer_tokens] + [e] * (width - 1 - len(it.answer_tokens))
                             for e, it in zip(end, its)], device=batch.tokens.device)
        mask = torch.cat([mask, torch.ones(len(its), width - 1, dtype=mask.dtype, device=mask.device)], 1)
        positions = pos + torch.arange(width, device=pos.device)
        logp = self._run(tail, kv, mask, positions, fwd_hooks).log_softmax(-1)
        tops = [logp[j, : len(it.answer_tokens) + 1].argmax(-1) for j, it in enumerate(its)]
        ended = number_ended(self.model.tokenizer, [it.answer for it in its],
                             torch.stack([top[-1] for top in tops]))
        rows = []
        for j, (it, top) in enumerate(zip(its, tops)):
            k = len(it.answer_tokens)
            target = torch.tensor(it.answer_tokens, device=logp.device)
            hits = top[:k] == target
            lp = logp[j, :k].gather(-1, target[:, None])[:, 0]
            rows.append({"prediction": self.model.tokenizer.decode(top[:k].tolist()),
                         "correct": bool(hits.all()) and bool(ended[j]), "first_correct": bool(hits[0]),
                         "p_answer": float(lp[0].exp()), "score": float(lp.sum())})
        return rows

    def _judge_choice(self, it, end: Tensor) -> dict:
        options = end.log_softmax(-1)[list(it.choice_tokens)].log_softmax(-1)
        gold = it.choice_tokens.index(it.answer_tokens[0])
        pick = int(options.argmax())
        return {"prediction": LETTERS[pick], "correct": pick == gold, "first_correct": pick == gold,
                "p_answer": float(options[gold].exp()), "score": float(options[gold])}

    def _judge_generation(self, it, end: Tensor, new: list[int]) -> dict:
        tok = self.model.tokenizer
        lp = end.log_softmax(-1)[it.answer_tokens[0]]
        answer = dict(it.meta).get("value", it.answer.strip())
        if self.mode == "cot":
            text, found = cot.solution_text(tok.decode(new, skip_special_tokens=True))
            hit_budget = not (found or (new and new[-1] == tok.eos_token_id))
            number = cot.extract_cot_answer(text)
            prediction, correct = (format_number(number) if number is not None else ""), answers_match(number, answer)
            return {"prediction": prediction, "correct": correct, "first_correct": bool(new) and new[0] == it.answer_tokens[0],
                    "p_answer": float(lp.exp()), "score": float(lp), "generated": text.strip(), "n_new_tokens": len(new),
                    "hit_budget": hit_budget}
        text = tok.decode(new, skip_special_tokens=True).split("\n")[0]
        hit_budget = not (new and self._is_stop(new[-1]))
        if dict(it.meta).get("answer_kind", "numeric") == "text":
            prediction, correct = text.strip(), normalize_text(text) == normalize_text(answer)
        else:
            number = extract_last_number(text)
            prediction, correct = (format_number(number) if number is not None else ""), answers_match(number, answer)
        return {"prediction": prediction, "correct": correct, "first_correct": bool(new) and new[0] == it.answer_tokens[0],
                "p_answer": float(lp.exp()), "score": float(lp), "generated": text, "n_new_tokens": len(new),
                "hit_budget": hit_budget}


def score_benchmark(model, suite: Suite, mode: Mode | None = None, fwd_hooks=(), max_new_tokens: int | None = None,
                    batch_size: int | None = None, progress=None) -> pd.DataFrame:
    """:meth:`BenchmarkScorer.score` once (build a :class:`BenchmarkScorer` to score several conditions)."""
    return BenchmarkScorer(model, suite, mode, max_new_tokens, batch_size).score(fwd_hooks, progress)


def timed_score(model, suite: Suite, mode: Mode | None = None, **kwargs) -> tuple[pd.DataFrame, float]:
    """:func:`score_benchmark` and its wall-clock seconds (prefix cache included)."""
    start = time.perf_counter()
    frame = score_benchmark(model, suite, mode, **kwargs)
    return frame, time.perf_counter() - start


def evaluate_benchmarks(model, delta, suites, mode: Mode | None = None, batch_size: int | None = None,
                        progress=None, modes: dict[str, Mode] | None = None) -> pd.DataFrame:
    """Chapter 4's evaluation on benchmark suites with ``delta`` applied (``None`` = the base model);
    each suite in ``modes[suite.name]`` where given, else ``mode``.

    Rows as :func:`arithlens.analyses.sft.evaluation.evaluate` (``set``, ``kind``, ``item``, ``correct``,
    ``p_answer``) plus ``mode`` and ``prediction`` (and, for generated answers, ``n_new_tokens`` and ``hit_budget``), so the two concatenate before :func:`arithlens.analyses.sft.evaluation.compare_to_base`.
    """
    from arithlens.core.deltas import applied

    frames = []
    with (applied(model, delta) if delta is not None else nullcontext()):
        for suite in suites:
            scores = score_benchmark(model, suite, (modes or {}).get(suite.name, mode), batch_size=batch_size,
                                     progress=progress)
            frames.append(pd.DataFrame({"set": suite.name, "kind": suite.kind, "item": scores["item"],
                                        "correct": scores["correct"], "p_answer": scores["p_answer"],
                                        "mode": scores["mode"], "prediction": scores["prediction"],
                                        **{k: scores[k] for k in ("n_new_tokens", "hit_budget") if k in scores}}))
    return pd.concat(frames, ignore_index=True)

"""Chapter 4's evaluation, each trained row run only from the lowest layer its delta changes.

Science wing, beside :mod:`arithlens.analyses.sft.evaluation` (paper § "Precise SFT"). Chapter 4 scores
some thirty trained rows on the same prompts: the arithmetic sets, the validation prompts, the transfer
suites and the controls. A delta that tunes heads (or LoRA, or MLPs) of layer ``L`` and above leaves
the residual stream entering ``L`` exactly as the base model makes it, so :class:`FromLayerEvaluator`
computes that stream once per batch, at the key heads' lowest layer (``start``), and each row runs only
the twin's layers from there (:mod:`arithlens.core.twin`: the same weight tensors, so a delta written
into the model is in the twin; PyTorch's fused attention). A row whose delta reaches below ``start``
(full SFT; random heads drawn from every layer) runs from the embedding.

Its rows are :func:`arithlens.analyses.sft.evaluation.evaluate`'s and its validation answers
:func:`~arithlens.analyses.sft.evaluation.validation_correct`'s, to float rounding (a greedy answer at
an exact tie between two tokens can differ; ``tests/test_from_layer.py`` checks the two on each tiny
architecture). A suite is scored teacher-forced on whole sequences — prompt and answer tokens, one
length per batch, no shared-prefix cache — and judged by the suite's own rule
(:func:`arithlens.tasks.suites.judge`). The base model (no delta) runs from ``start`` too, so every row
and the base share one pass.

A batch whose items begin with the same tokens — a suite's demonstrations, the same for every item, or
those of one template and operator in the arithmetic sets asked with demonstrations — runs *packed*
(:class:`_Packing`): that shared beginning once, then each item's own tokens after it in
the same row, each attending to the shared beginning and to itself only, at the positions it has
unpacked. The control suites are some 26–35 tokens an item, 24–32 of them shared, so a packed pass
reads a fraction of the tokens. :meth:`FromLayerEvaluator.evaluate` can also be asked for some kinds
of set only (chapter 4 asks the layer-matched random draws past its training seeds for the math sets
R6 ranks them by).

Written by hand: the batching, the cache and the packing (transformers has no forward pass that starts
at a given layer, and packs sequences only to keep them apart, never to share a beginning).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from arithlens.analyses.sft.evaluation import SFTData, is_digit_answer
from arithlens.analyses.sft.trainer import start_layer
from arithlens.core.deltas import Delta, applied
from arithlens.core.items import clean_length, length_batches, to_tokens
from arithlens.core.models import LoadedModel
from arithlens.core.twin import LAYER_LOOP_CHECKED, embed, run_layers, twin_of
from arithlens.tasks.suites import Suite, forced_answer, judge


#: The longest packed row, in tokens: a batch's items go into as many packed rows as this allows.
PACKED_ROW = 1024


@dataclass(frozen=True)
class _Packing:
    """A batch packed: rows of the shared beginning (``shared`` tokens) followed by the ``per`` items'
    own tokens, each ``own`` long; ``where`` (``[items, own]``) indexes each item's own positions in the
    flattened rows, and ``context`` is every layer's keyword arguments (positions as unpacked; a mask
    that lets each token see the shared beginning and its own item's earlier tokens)."""

    tokens: Tensor
    shared: int
    where: Tensor
    context: dict


def _pack(tokens: Tensor, read_from: int, window: int | None) -> tuple[Tensor, int, int] | None:
    """How to pack ``tokens`` (``[items, length]``, one length): the shared beginning's length, the own
    length and the items per packed row; None where packing would not pay (one item; a shared beginning
    shorter than the rest) or could change a result (a sliding window shorter than the items)."""
    items, length = tokens.shape
    same = (tokens == tokens[:1]).all(0)
    shared = min(int(same.long().cumprod(0).sum()), read_from)  # the item's last prompt token stays its own
    own = length - shared
    if items < 2 or shared < own or (window is not None and window <= length):
        return None
    return tokens[0, :shared], own, max(1, (PACKED_ROW - shared) // own)


def _packing(twin, tokens: Tensor, read_from: int) -> _Packing | None:
    plan = _pack(tokens, read_from, getattr(twin.config, "sliding_window", None))
    if plan is None:
        return None
    head, own, per = plan
    items, shared = tokens.shape[0], len(head)
    per = min(per, items)
    rows = -(-items // per)
    order = torch.cat([torch.arange(items), torch.full((rows * per - items,), items - 1)])  # the last item fills the last row
    tails = tokens[order, shared:].reshape(rows, per * own)
    packed = torch.cat([head.expand(rows, shared), tails], 1)
    pos = torch.cat([torch.arange(shared), shared + torch.arange(own).repeat(per)]).to(tokens.device)
    seg = torch.cat([torch.full((shared,), -1), torch.arange(per).repeat_interleave(own)]).to(tokens.device)
    mask = (pos[None, :] <= pos[:, None]) & ((seg[None, :] == -1) | (seg[None, :] == seg[:, None]))
    # item i's own positions in the flattened rows: row i // per, slot i % per
    slot = torch.arange(items) % per * own + shared + (torch.arange(items) // per * packed.shape[1])
    where = (slot[:, None] + torch.arange(own)[None]).to(tokens.device)
    hidden = embed(twin, packed[:1])
    context = {"attention_mask": mask[None, None], "position_ids": pos[None],
               "position_embeddings": twin.model.rotary_emb(hidden, pos[None])}
    return _Packing(packed, shared, where, context)


@dataclass(frozen=True)
class _Batch:
    """Items of one token length: their indices, their tokens, the first position whose logits are read,
    the base model's residual stream entering the evaluator's ``start`` layer, and (where the items share
    a beginning) how they are packed — ``hidden`` is then the packed rows' stream."""

    index: np.ndarray
    tokens: Tensor
    read_from: int
    hidden: Tensor
    packing: _Packing | None = None


class FromLayerEvaluator:
    """Chapter 4's evaluation passes with the base model's residual stream entering ``start`` cached.

    ``data``'s evaluation sets and validation prompts and ``suites`` (:class:`arithlens.tasks.suites.Suite`)
    are batched and run to ``start`` once, here; :meth:`evaluate` and :meth:`validation` then score a
    delta (None: the base model) from ``start`` or, where the delta reaches lower, from the embedding.
    """

    def __init__(self, model: LoadedModel, data: SFTData, suites=(), start: int = 0, batch_size: int = 64):
        from arithlens.core import layout

        if layout.architecture(model) not in LAYER_LOOP_CHECKED:
            raise NotImplementedError(f"the layer loop does not reproduce {layout.architecture(model)}'s forward pass; "
                                      f"use arithlens.analyses.sft.evaluation.evaluate")
        self.model, self.data, self.suites = model, data, list(suites)
        self.twin, self.n_layers = twin_of(model), model.n_layers
        self.start = max(0, min(start, self.n_layers))
        self._words: dict[int, bool] = {}
        with torch.no_grad():
            self.sets = {name: self._prompt_batches(prompts, batch_size) for name, prompts in data.evals.items()}
            self.held = self._prompt_batches(data.validation, batch_size) if data.validation is not None else []
            self.suite_batches = [self._suite_batches(suite, batch_size) for suite in self.suites]

    # --- the cache ---------------------------------------------------------------------------------

    def _cached(self, index, tokens: Tensor, read_from: int) -> _Batch:
        tokens = tokens.to(self.model.device)
        packing = _packing(self.twin, tokens, read_from)
        if packing is None:
            hidden = run_layers(self.twin, embed(self.twin, tokens), 0, self.start)
        else:
            hidden = self._run_packed(embed(self.twin, packing.tokens), 0, self.start, packing)
        return _Batch(np.asarray(index), tokens, read_from, hidden, packing)

    def _run_packed(self, hidden: Tensor, begin: int, stop: int, packing: _Packing) -> Tensor:
        for i in range(begin, stop):
            hidden = self.twin.model.layers[i](hidden, **packing.context)
        return hidden

    def _prompt_batches(self, prompts, batch_size: int) -> list[_Batch]:
        """One token length per batch; with demonstrations (``shots``), one template and operator too — the
        questions that begin with the same demonstrations (:func:`arithlens.analyses.sft.evaluation.with_demonstrations`),
        so that the batch runs packed."""
        items = prompts.items
        cell = (lambda it: (len(it.clean_tokens), it.template, it.operator)) if prompts.config.shots else clean_length
        out = []
        for index in length_batches(items, batch_size, key=cell):
            tokens = to_tokens([items[i] for i in index])
            out.append(self._cached(index, tokens, tokens.shape[1] - 1))
        return out

    def _suite_batches(self, suite: Suite, batch_size: int) -> list[_Batch]:
        """Prompt + answer tokens (all but the last answer token where the rule is not exact match), one
        (prompt, answer) length per batch; logits are read from END on (:func:`arithlens.tasks.suites.judge`)."""
        out = []
        for index in length_batches(suite.items, batch_size, key=lambda it: (len(it.clean_tokens), len(forced_answer(suite, it)))):
            batch = [suite.items[i] for i in index]
            tokens = torch.tensor([list(it.clean_tokens) + list(forced_answer(suite, it)) for it in batch], dtype=torch.long)
            out.append(self._cached(index, tokens, len(batch[0].clean_tokens) - 1))
        return out

    # --- one pass ------------------------------------------------------------------------------------

    def first_layer(self, delta: Delta | None) -> int:
        """The first layer whose input a delta changes (0: the embedding is tuned; ``n_layers``: none)."""
        return self.n_layers if delta is None or not delta.values else max(0, start_layer(list(delta.values), self.n_layers))

    def _logits(self, batch: _Batch, first: int) -> Tensor:
        """Logits from ``batch.read_from`` on (``[batch, read, d_vocab]``, fp32) with the weights as they are now."""
        packing = batch.packing
        if first >= self.start:
            hidden, begin = batch.hidden, self.start
        else:
            hidden, begin = embed(self.twin, batch.tokens if packing is None else packing.tokens), 0
        if packing is None:
            hidden = run_layers(self.twin, hidden, begin, self.n_layers)[:, batch.read_from:]
        else:  # each item's own positions, from read_from on
            hidden = self._run_packed(hidden, begin, self.n_layers, packing)
            hidden = hidden.reshape(-1, hidden.shape[-1])[packing.where[:, batch.read_from - packing.shared:]]
        return self.twin.lm_head(self.twin.model.norm(hidden)).float()

    def _is_digit(self, token: int) -> bool:
        if token not in self._words:
            self._words[token] = is_digit_answer(self.model.tokenizer.decode([token]))
        return self._words[token]

    def _answers(self, items, batches: list[_Batch], first: int) -> pd.DataFrame:
        n = len(items)
        correct, p_answer, digit = np.zeros(n, bool), np.zeros(n), np.zeros(n, bool)
        for batch in batches:
            logits = self._logits(batch, first)[:, -1]
            answers = torch.tensor([items[i].answer_token for i in batch.index], device=logits.device)
            predicted = logits.argmax(-1)
            correct[batch.index] = (predicted == answers).cpu().numpy()
            p_answer[batch.index] = logits.softmax(-1).gather(1, answers[:, None])[:, 0].cpu().numpy()
            digit[batch.index] = [self._is_digit(int(t)) for t in predicted.tolist()]
        return pd.DataFrame({"correct": correct, "p_answer": p_answer, "digit": digit})

    # --- what chapter 4 asks --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, delta: Delta | None, kinds: tuple[str, ...] | None = None) -> pd.DataFrame:
        """:func:`arithlens.analyses.sft.evaluation.evaluate`'s rows for ``delta`` (None: the base model), of
        the sets and suites of ``kinds`` only where given (e.g. ``("math",)``: the 0-shot arithmetic sets
        and the math suites)."""
        first, frames = self.first_layer(delta), []
        wanted = lambda kind: kinds is None or kind in kinds
        with (applied(self.model, delta) if delta is not None else nullcontext()):
            for name, batches in self.sets.items():
                if not wanted(self.data.kind(name)):
                    continue
                scores = self._answers(self.data.evals[name].items, batches, first)
                frames.append(scores.assign(set=name, kind=self.data.kind(name), item=np.arange(len(scores)))[
                    ["set", "kind", "item", "correct", "p_answer", "digit"]])
            for suite, batches in zip(self.suites, self.suite_batches):
                if not wanted(suite.kind):
                    continue
                n = len(suite.items)
                cols = {"correct": np.zeros(n, bool), "first_correct": np.zeros(n, bool), "p_answer": np.zeros(n),
                        "score": np.zeros(n)}
                for batch in batches:
                    judge(suite, self.model.tokenizer, batch.index, self._logits(batch, first), cols)
                frames.append(pd.DataFrame({"set": suite.name, "kind": suite.kind, "item": np.arange(n),
                                            "correct": cols["correct"], "p_answer": cols["p_answer"]}))
        return pd.concat(frames, ignore_index=True)

    @torch.no_grad()
    def validation(self, delta: Delta | None) -> np.ndarray:
        """Per validation prompt, greedy correctness with ``delta`` applied: what chooses a learning rate."""
        if self.data.validation is None:
            raise ValueError("these data have no validation prompts")
        with (applied(self.model, delta) if delta is not None else nullcontext()):
            return self._answers(self.data.validation.items, self.held, self.first_layer(delta))["correct"].to_numpy()


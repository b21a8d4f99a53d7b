"""Items: clean/counterfactual prompt pairs — how they are tokenized, aligned, stacked and batched.

Ground floor of the science wing (paper § "Counterfactual input"; § "Transfer" reuses it). Chapter
0's arithmetic prompts (:class:`arithlens.tasks.prompts.PromptItem`) and chapter 3's transfer suites
(:class:`arithlens.tasks.suites.SuiteItem`) are two makers of one thing, an :class:`Item`: the clean
prompt's tokens, the counterfactual's tokens (or none), the answer token, an operation label and
the END position. Every analysis reads items only through that protocol, so chapter 1's patching
and knockout run on a transfer suite unchanged. What the two makers share is here:

* :func:`encode`, :func:`tokens_over` and :func:`continuation` — token ids with character offsets,
  the tokens that cover a character span (positions come from the tokenizer, never from counting),
  and the tokens an answer adds after a prompt that it leaves unchanged;
* :func:`align_counterfactual` — the paper's null-operator counterfactual: the operation's
  characters are replaced by each candidate in turn, and the first whose tokens equal the clean
  prompt's everywhere outside the operation wins (same length, so operands and END line up);
* :func:`to_tokens` and :func:`length_batches` — items of one token length stacked without padding,
  and the one iterator that buckets items by length and cuts each bucket into batches;
  :func:`answer_batches` — those batches with their tokens and answer tokens, ready to score;
* :func:`shared_prefix_length` — how many leading tokens some token sequences share, the part a
  prefix KV cache can run once for all of them — and :func:`prompt_families`, prompts grouped by
  the demonstrations they share.

Imports nothing of arithlens. Written by hand (no library aligns these counterfactuals).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

Offsets = list[tuple[int, int]]


@runtime_checkable
class Item(Protocol):
    """One prompt as the analyses read it."""

    clean_tokens: tuple[int, ...]
    cf_tokens: tuple[int, ...] | None  # None: the set has no counterfactual
    answer_token: int                  # the token that must follow the prompt (the first, if several)
    operator: str                      # the operation label items are grouped by
    end_pos: int                       # the last prompt position, where the answer is read


@runtime_checkable
class ItemSet(Protocol):
    """Anything holding items: a :class:`arithlens.tasks.prompts.PromptSet`, an :class:`arithlens.tasks.suites.Suite`."""

    items: Sequence[Any]  # of Item


def encode(tokenizer, text: str) -> tuple[list[int], Offsets]:
    """Token ids of ``text`` and each token's character span (start, end)."""
    enc = tokenizer(text, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def continuation(tokenizer, prompt: str, text: str, ids: Sequence[int] | None = None) -> tuple[int, ...] | None:
    """The tokens ``text`` adds right after ``prompt`` (whose token ids are ``ids``, encoded if not
    given), or None when appending it re-tokenizes the prompt itself or adds nothing."""
    ids = encode(tokenizer, prompt)[0] if ids is None else list(ids)
    full, _ = encode(tokenizer, prompt + text)
    return tuple(full[len(ids):]) if len(full) > len(ids) and full[: len(ids)] == ids else None


def tokens_over(offsets: Offsets, start: int, end: int) -> list[int]:
    """Indices of the (non-empty) tokens overlapping characters ``[start, end)``, in order."""
    return [i for i, (s, e) in enumerate(offsets) if s < end and e > start and e > s]


def align_counterfactual(tokenizer, clean: str, ids: Sequence[int], offsets: Offsets, span: tuple[int, int],
                         replacements: Iterable[str], fixed: Iterable[int] = ()) -> tuple[str, tuple[int, ...]] | None:
    """The counterfactual of ``clean`` with the characters ``span`` (the operation) replaced.

    ``replacements`` are tried in the order given (the caller shuffles them under its seed); the first
    whose tokens have the clean length and equal the clean ``ids`` at every position outside the
    operation's tokens is returned as (text, token ids). None when none does. Positions ``fixed``
    (operands) and END are then asserted unchanged.
    """
    start, end = span
    inside = set(tokens_over(offsets, start, end))
    for replacement in replacements:
        text = clean[:start] + replacement + clean[end:]
        cf_ids, _ = encode(tokenizer, text)
        if len(cf_ids) == len(ids) and all(x == y for i, (x, y) in enumerate(zip(ids, cf_ids)) if i not in inside):
            assert all(cf_ids[p] == ids[p] for p in fixed) and cf_ids[-1] == ids[-1], f"misaligned {text!r}"
            return text, tuple(cf_ids)
    return None


def to_tokens(items: Sequence[Item], which: Literal["clean", "counterfactual"] = "clean") -> Int[Tensor, "batch pos"]:
    """Stack equal-length items' tokens into one tensor."""
    seqs = [it.clean_tokens if which == "clean" else it.cf_tokens for it in items]
    if len({len(s) for s in seqs}) != 1:
        raise ValueError("items have different token lengths; batch them with length_batches()")
    return torch.tensor(seqs, dtype=torch.long)


def clean_length(item: Item) -> int:
    """The default batching key: the clean prompt's token length."""
    return len(item.clean_tokens)


def length_groups(items: Sequence[Any], key: Callable[[Any], Hashable] = clean_length) -> dict[Hashable, list[int]]:
    """Item indices grouped by ``key`` (default: token length), groups in order of first appearance.
    ``items`` may be anything ``key`` reads (e.g. token sequences with ``key=len``)."""
    groups: dict[Hashable, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(key(it), []).append(i)
    return groups


def length_batches(items: Sequence[Any], batch_size: int, key: Callable[[Any], Hashable] = clean_length,
                   rng: random.Random | None = None) -> list[list[int]]:
    """Batches of item indices that need no padding, so every position is exact.

    Items are grouped by ``key`` (:func:`length_groups`); each group, in item order — or, with
    ``rng``, shuffled by ``rng.shuffle`` group by group — is cut into batches of at most
    ``batch_size``. Group by group, in order of first appearance.
    """
    out: list[list[int]] = []
    for idx in length_groups(items, key).values():
        if rng is not None:
            idx = idx[:]
            rng.shuffle(idx)
        out += [idx[i: i + batch_size] for i in range(0, len(idx), batch_size)]
    return out


def shared_prefix_length(token_lists: Iterable[Sequence[int]]) -> int:
    """Length of the token prefix every list shares, leaving at least one token of each (its END)."""
    lists = list(token_lists)
    limit = min(len(t) for t in lists) - 1
    n = 0
    while n < limit and all(t[n] == lists[0][n] for t in lists):
        n += 1
    return n


def prompt_families(prompts: Sequence[Sequence[int]], min_share: float = 0.5) -> list[list[int]]:
    """Indices of ``prompts`` (token lists) in families that share their demonstrations: in token order,
    neighbours whose shared prefix (:func:`shared_prefix_length`) is at least ``min_share`` of the
    shorter prompt are one family (a suite's operators, an arithmetic template × operator cell with
    fixed demonstrations). Prompts in no family of two or more form one last family, sharing nothing."""
    order = sorted(range(len(prompts)), key=lambda i: tuple(prompts[i]))
    runs: list[list[int]] = []
    for prev, i in zip([None] + order, order):
        a = prompts[prev] if prev is not None else None
        b = prompts[i]
        if a is not None and shared_prefix_length((a, b)) >= min_share * min(len(a), len(b)):
            runs[-1].append(i)
        else:
            runs.append([i])
    alone = sorted(i for run in runs if len(run) == 1 for i in run)
    return [sorted(run) for run in runs if len(run) > 1] + ([alone] if alone else [])


AnswerBatch = tuple[np.ndarray, Tensor, Tensor]
"""One batch of items of one length: their indices in the set, their tokens (batch × pos; the length
differs from batch to batch, so it is not a jaxtyping axis here) and their answer tokens."""


def answer_batches(items: Sequence[Item], batch_size: int, device: torch.device | str = "cpu") -> list[AnswerBatch]:
    """:func:`length_batches` of ``items`` with each batch's clean tokens and answer tokens on ``device``."""
    out = []
    for b in length_batches(items, batch_size):
        tokens = to_tokens([items[i] for i in b]).to(device)
        answers = torch.tensor([items[i].answer_token for i in b], device=device)
        out.append((np.asarray(b), tokens, answers))
    return out

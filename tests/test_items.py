"""Items: one protocol for chapter 0's prompts and chapter 3's suites, one counterfactual alignment,
and one length-bucketed batch iterator (checked against plain loops)."""

import random

import pytest

from arithlens.core import items as I
from arithlens.tasks.prompts import PromptConfig, make_prompts
from arithlens.tasks.suites import make_suite


@pytest.fixture(scope="module")
def mixed(tiny):
    """A prompt set of many token lengths, in an order that interleaves them."""
    ps = make_prompts(tiny.tokenizer, PromptConfig(operators=("+", "*"), n_per_cell=3, shots=1))
    assert len(I.length_groups(ps.items)) > 3
    return ps


def _plain_batches(items, batch_size, key=lambda it: len(it.clean_tokens), rng=None):
    groups = {}
    for i, it in enumerate(items):
        groups.setdefault(key(it), []).append(i)
    out = []
    for idx in groups.values():
        if rng is not None:
            idx = idx[:]
            rng.shuffle(idx)
        for s in range(0, len(idx), batch_size):
            out.append(idx[s: s + batch_size])
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 16, 1000])
def test_length_batches_equal_a_plain_loop(mixed, batch_size):
    batches = I.length_batches(mixed.items, batch_size)
    assert batches == _plain_batches(mixed.items, batch_size)
    assert sorted(i for b in batches for i in b) == list(range(len(mixed)))
    for b in batches:
        assert len(b) <= batch_size and len({len(mixed.items[i].clean_tokens) for i in b}) == 1
        I.to_tokens([mixed.items[i] for i in b])  # stacks without padding
    key = lambda it: (len(it.clean_tokens), it.operator)
    assert I.length_batches(mixed.items, batch_size, key) == _plain_batches(mixed.items, batch_size, key)
    shuffled = I.length_batches(mixed.items, batch_size, rng=random.Random(5))
    assert shuffled == _plain_batches(mixed.items, batch_size, rng=random.Random(5))
    # any sequence groups by any key: token sequences by their length give the items' groups
    assert I.length_groups([it.clean_tokens for it in mixed.items], key=len) == I.length_groups(mixed.items)


def test_prompts_and_suites_are_items(tiny, mixed):
    suite = make_suite("multidigit", tiny.tokenizer, n=8)
    control = make_suite("capitals", tiny.tokenizer, n=4)
    for item_set in (mixed, suite, control):
        assert isinstance(item_set, I.ItemSet)
        assert all(isinstance(it, I.Item) for it in item_set.items)
    assert all(it.cf_tokens is None for it in control.items)


def test_alignment_skips_replacements_that_move_tokens(tiny):
    tok = tiny.tokenizer  # one character per token
    clean = "3 + 4 = "
    ids, offsets = I.encode(tok, clean)
    assert I.tokens_over(offsets, 2, 3) == [2]
    text, cf_ids = I.align_counterfactual(tok, clean, ids, offsets, (2, 3), ["nothing", "@", "<"], fixed=(0, 4))
    assert text == "3 @ 4 = " and len(cf_ids) == len(ids)
    assert [i for i, (x, y) in enumerate(zip(ids, cf_ids)) if x != y] == [2]
    assert I.align_counterfactual(tok, clean, ids, offsets, (2, 3), ["none", "xy"]) is None
    assert I.continuation(tok, clean, "12") == tuple(I.encode(tok, "12")[0]) and I.continuation(tok, clean, "") is None


def test_shared_prefix_length_keeps_each_sequences_end(mixed):
    assert I.shared_prefix_length([(1, 2, 3, 4), (1, 2, 9, 4), (1, 2, 3)]) == 2
    assert I.shared_prefix_length([(5, 6, 7), (5, 6, 7)]) == 2  # identical: END stays out of the prefix
    assert I.shared_prefix_length([(5,), (5, 6)]) == 0 and I.shared_prefix_length([(1, 2), (3, 2)]) == 0
    for it in mixed.items:  # a clean/counterfactual pair shares every token before the operation
        first = next(i for i, (x, y) in enumerate(zip(it.clean_tokens, it.cf_tokens)) if x != y)
        assert I.shared_prefix_length((it.clean_tokens, it.cf_tokens)) == first


@pytest.mark.real_model
def test_continuation_refuses_an_answer_that_retokenizes_the_prompt(smollm2):
    tok = smollm2.tokenizer
    assert len(I.continuation(tok, "7 + 2 = ", "9")) == 1
    assert len(I.continuation(tok, "7 + 2 =", " 9")) == 2  # " 9" is two tokens here: "Ġ", "9"
    assert I.continuation(tok, "The cat", "s") is None  # "Ġcat" + "s" becomes "Ġcats"


@pytest.mark.parametrize("maker", ["prompts", "multidigit", "decimals", "word_problems", "power"])
def test_both_makers_change_only_the_operation(tiny, maker):
    if maker == "prompts":
        made = make_prompts(tiny.tokenizer, PromptConfig(n_per_cell=2, shots=1)).items
        kept = lambda it: (it.a_pos, it.b_pos)
    else:
        made = make_suite(maker, tiny.tokenizer, n=12).items
        kept = lambda it: it.number_pos
    assert made
    for it in made:
        changed = [i for i, (x, y) in enumerate(zip(it.clean_tokens, it.cf_tokens)) if x != y]
        assert len(it.cf_tokens) == len(it.clean_tokens) and changed and max(changed) <= it.op_pos
        assert all(it.cf_tokens[p] == it.clean_tokens[p] for p in kept(it)) and it.end_pos == len(it.clean_tokens) - 1

"""Same-answer counterfactuals: the answer is kept, the problem changes, positions line up."""

import pandas as pd
import pytest
import torch

from arithlens.analyses import end_cache as EC
from arithlens.analyses import patching as P
from arithlens.core import hooks
from arithlens.analyses import same_answer as S
from arithlens.core.items import encode
from arithlens.tasks.prompts import OPERATORS, PromptConfig, make_item, make_prompts


@pytest.fixture(scope="module")
def same_set(tiny):
    ps = make_prompts(tiny.tokenizer, PromptConfig(operators=("+", "-", "*"), templates=("eq_spaced", "st_is"),
                                                   n_per_cell=3, shots=1))
    return ps, S.make_same_answer(tiny.tokenizer, ps, seed=0)


def test_items_keep_the_answer_and_change_the_problem(tiny, same_set):
    ps, same = same_set
    assert len(same) > 0 and {it.change for it in same.items} == {"operands", "operator"}
    for it in same.items:
        assert OPERATORS[it.cf_operator].apply(it.cf_a, it.cf_b) == it.answer == OPERATORS[it.operator].apply(it.a, it.b)
        assert (it.cf_operator == it.operator) == (it.change == "operands")
        assert (it.cf_operator, it.cf_a, it.cf_b) != (it.operator, it.a, it.b)
        # the tokens are the tokenizer's, of equal length, equal at END and at the demonstration
        assert tuple(encode(tiny.tokenizer, it.counterfactual)[0]) == it.cf_tokens
        assert len(it.cf_tokens) == len(it.clean_tokens) and it.cf_tokens[-1] == it.clean_tokens[-1]
        demo = it.clean.rsplit("\n", 1)[0]
        assert it.counterfactual.startswith(demo + "\n")
        assert it.cf_tokens[: len(demo) + 1] == it.clean_tokens[: len(demo) + 1]  # character tokenizer
    # a clean item and its counterfactual are what the prompt machinery renders for those problems
    it = next(i for i in same.items if i.template == "eq_spaced" and i.change == "operator")
    assert it.counterfactual.endswith(f"{it.cf_a} {it.cf_operator} {it.cf_b} = ")
    frame = same.to_frame()
    assert len(frame) == len(same) and "change" in frame
    assert same == S.make_same_answer(tiny.tokenizer, ps, seed=0)  # seeded


def test_misaligned_candidates_are_refused(tiny, monkeypatch):
    # "st_is" renders the operator as a word: "plus" → "minus" changes the length in characters, so
    # with the character tokenizer no operator change of 3 plus 4 aligns unless the word lengths match
    item = make_item(tiny.tokenizer, "st_is", "+", 3, 4)
    assert S.same_answer_item(tiny.tokenizer, item, "operator", [("-", 9, 2)]) is None  # "minus" ≠ "plus" in length
    assert S.same_answer_item(tiny.tokenizer, item, "operands", [("+", 3, 4)]) is None  # the item itself
    assert S.same_answer_item(tiny.tokenizer, item, "operands", [("+", 1, 5)]) is None  # wrong answer
    made = S.same_answer_item(tiny.tokenizer, item, "operands", [("+", 5, 2)])
    assert made is not None and made.counterfactual == "5 plus 2 is "
    # a counterfactual whose tokens differ outside the slots (here: at END) is refused, length equal or not
    real = S.encode

    def end_changed(tokenizer, text):
        ids, offsets = real(tokenizer, text)
        return (ids[:-1] + [ids[-1] + 1], offsets) if text.endswith("5 plus 2 is ") else (ids, offsets)

    monkeypatch.setattr(S, "encode", end_changed)
    assert S.same_answer_item(tiny.tokenizer, item, "operands", [("+", 5, 2)]) is None
    assert S.same_answer_item(tiny.tokenizer, item, "operands", [("+", 5, 2), ("+", 6, 1)]).counterfactual == "6 plus 1 is "
    products = [("*", 1, 6), ("*", 2, 3), ("*", 3, 2), ("*", 6, 1)]
    assert S.donors(["+", "*"], (1, 9), 6) == [("+", a, 6 - a) for a in range(1, 6)] + products


def test_same_answer_patching_is_exact_patching_with_these_counterfactuals(tiny, same_set):
    _, same = same_set
    table = S.same_answer_patching(tiny, same, modes=("total",))
    assert len(table) == len(same) * tiny.n_layers * tiny.n_heads
    assert set(table["change"]) == {"operands", "operator"}
    # spot check one head against a plain hooked forward with that item's counterfactual z at END
    item_i, layer, head = 1, 1, 2
    it = same.items[item_i]
    cache = EC.cache_end(tiny, [it])
    ref = P.reference_effect(tiny, cache, hooks.Head(layer, head), "total", hooks.digit_tokens(tiny.tokenizer))
    clean = cache.clean_logits[0, it.answer_token]
    row = table[(table["prompt"] == item_i) & (table["layer"] == layer) & (table["head"] == head)].iloc[0]
    assert row["rel_logit"] == pytest.approx(float((ref.logit[0] - clean) / clean), abs=1e-4)
    with torch.no_grad():
        _, run = tiny.bridge.run_with_cache(torch.tensor([it.cf_tokens]))
    torch.testing.assert_close(cache.z_cf[0, layer], run[f"blocks.{layer}.attn.hook_z"][0, -1].float(), rtol=1e-5, atol=1e-5)


def test_surviving_heads_by_hand():
    null = pd.DataFrame({"mode": "total", "prompt": [0, 0, 1, 1], "layer": 0, "head": [0, 1, 0, 1],
                         "rel_logit": [-0.2, -0.1, -0.1, 0.0]})   # means: head 0 −0.15, head 1 −0.05
    same = pd.DataFrame({"mode": "total", "change": "operands", "prompt": [0, 0], "layer": 0, "head": [0, 1],
                         "rel_logit": [-0.01, -0.3]})
    out = S.surviving_heads(null, same, threshold=-0.1).set_index("head")
    assert bool(out.loc[0, "key"]) and not bool(out.loc[0, "survives"])   # key, but the effect vanishes
    assert not bool(out.loc[1, "key"]) and not bool(out.loc[1, "survives"])  # not key under the null operator
    out = S.surviving_heads(null, same, threshold=-0.04).set_index("head")
    assert bool(out.loc[1, "survives"]) and out.loc[1, "null_mean"] == pytest.approx(-0.05)


def test_key_head_survival_is_the_share_of_the_null_effect_kept():
    import pandas as pd

    from arithlens.core.hooks import Head
    from arithlens.analyses.same_answer import key_head_survival

    null = pd.DataFrame([{"mode": "path", "metric": "d_prob", "layer": 0, "head": h, "mean": m}
                         for h, m in ((0, -0.2), (1, -0.1))])
    same = pd.DataFrame([{"mode": "path", "change": "operands", "prompt": p, "layer": 0, "head": h, "d_prob": v}
                         for p in range(2) for h, v in ((0, -0.15), (1, -0.01))])
    out = key_head_survival([Head(0, 0), Head(0, 1)], null, same).set_index("head")
    assert out.loc["0.0", "kept"] == pytest.approx(0.75) and bool(out.loc["0.0", "survives"])
    assert out.loc["0.1", "kept"] == pytest.approx(0.1) and not bool(out.loc["0.1", "survives"])

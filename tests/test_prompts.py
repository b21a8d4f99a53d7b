import dataclasses
import hashlib
import re

import pandas as pd

import pytest

from arithlens.core.items import length_groups, to_tokens
from arithlens.tasks.prompts import (
    OPERATORS, TEMPLATES, PromptConfig, accuracy_table, filter_correct, make_prompts, operand_pairs,
    score_prompts,
)


def test_ships_twelve_templates_in_three_styles():
    assert len(TEMPLATES) >= 12
    assert {t.style for t in TEMPLATES.values()} == {"equation", "statement", "question"}


@pytest.mark.parametrize("op", list(OPERATORS))
def test_operand_pairs_answers_are_exact(op):
    for a, b, c in operand_pairs(OPERATORS[op], 1, 9):
        assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
        assert c >= 0


def test_positions_and_alignment_tiny(tiny):
    ps = make_prompts(tiny.tokenizer, PromptConfig(n_per_cell=5, shots=2))
    assert len(ps) > 100
    tok = tiny.tokenizer
    for it in ps.items:
        assert len(it.clean_tokens) == len(it.cf_tokens)
        assert it.end_pos == len(it.clean_tokens) - 1
        assert tok.decode([it.clean_tokens[it.a_pos]]) == str(it.a)[-1]
        assert tok.decode([it.clean_tokens[it.b_pos]]) == str(it.b)[-1]
        diff = [i for i, (x, y) in enumerate(zip(it.clean_tokens, it.cf_tokens)) if x != y]
        assert it.op_pos in diff and max(diff) == it.op_pos  # only the operator's tokens differ
        assert it.a_pos not in diff and it.b_pos not in diff
        assert tok.decode(list(it.clean_tokens) + [it.answer_token]).endswith(str(it.answer))
        # only the query's operator changed: the demonstrations are identical
        assert it.clean.rsplit("\n", 1)[0] == it.counterfactual.rsplit("\n", 1)[0]
        assert OPERATORS[it.operator].apply(it.a, it.b) == it.answer


def test_deterministic_under_seed(tiny):
    cfg = PromptConfig(n_per_cell=4, shots=1, seed=7)
    assert make_prompts(tiny.tokenizer, cfg).items == make_prompts(tiny.tokenizer, cfg).items
    other = make_prompts(tiny.tokenizer, dataclasses.replace(cfg, seed=8))
    assert other.items != make_prompts(tiny.tokenizer, cfg).items


def test_misaligned_counterfactuals_are_dropped_and_counted(tiny, monkeypatch):
    import arithlens.tasks.prompts as P

    monkeypatch.setitem(P.NULL_OPERATORS, "symbol", ("@@",))  # two characters: never the same length
    ps = make_prompts(tiny.tokenizer, PromptConfig(operators=("+",), templates=("eq_spaced",), n_per_cell=5))
    assert len(ps) == 0
    assert ps.dropped == {"no counterfactual tokenizes to the same length": 5}


def test_bad_config_names_the_problem():
    with pytest.raises(ValueError, match="unknown operator"):
        PromptConfig(operators=("%",))
    with pytest.raises(ValueError, match="unknown template"):
        PromptConfig(templates=("nope",))


def test_score_and_filter(tiny):
    ps = make_prompts(tiny.tokenizer, PromptConfig(n_per_cell=2))
    scores = score_prompts(tiny, ps, batch_size=7)
    assert len(scores) == len(ps)
    assert scores.p_answer.between(0, 1).all()
    # scoring in batches equals scoring one at a time
    one = score_prompts(tiny, ps.subset([i == 3 for i in range(len(ps))]))
    assert one.p_answer.iloc[0] == pytest.approx(scores.p_answer.iloc[3], rel=1e-4)
    table = accuracy_table(scores)
    assert table.n.sum() == len(ps)
    forced = scores.assign(correct=[i % 2 == 0 for i in range(len(scores))])
    assert len(filter_correct(ps, forced)) == (len(ps) + 1) // 2
    with pytest.raises(ValueError, match="answered correctly"):
        filter_correct(ps, scores.assign(correct=False), min_items=1)


def test_to_tokens_refuses_ragged(tiny):
    ps = make_prompts(tiny.tokenizer, PromptConfig(n_per_cell=1))
    groups = length_groups(ps.items)
    assert len(groups) > 1
    with pytest.raises(ValueError, match="different token lengths"):
        to_tokens(ps.items)


@pytest.mark.real_model
def test_smollm2_tokenization_and_positions(smollm2):
    tok = smollm2.tokenizer
    assert tok.convert_ids_to_tokens(tok("7 + 2 = ")["input_ids"]) == ["7", "Ġ+", "Ġ", "2", "Ġ=", "Ġ"]
    ps = make_prompts(tok, PromptConfig(n_per_cell=3, shots=3))
    assert ps.dropped == {}
    for it in ps.items:
        assert tok.decode([it.answer_token]) == str(it.answer)
        assert tok.decode([it.clean_tokens[it.a_pos]]).strip() == str(it.a)


class _Chapter1Run:
    """What findings.scored_prompts reads of a chapter-1 run: its parameters and prompt_scores table."""

    key = "abc123abc123"

    def __init__(self, parameters, scores):
        self.parameters, self._scores = parameters, scores

    def table(self, name):
        assert name == "prompt_scores"
        return self._scores


def test_chapter2_takes_chapter1s_scored_prompts_without_a_forward_pass(tiny):
    from arithlens.claims import findings
    from arithlens.record import UpstreamError

    params = {"operators": ["+", "-"], "templates": ["eq_spaced", "st_is"], "n_per_cell": 3, "shots": 1, "seed": 2,
              "filter_correct": True, "min_correct": 1}
    halves = {half: make_prompts(tiny.tokenizer, PromptConfig(operators=("+", "-"), templates=("eq_spaced", "st_is"),
                                                              n_per_cell=3, shots=1, seed=2, facts=half))
              for half in ("localization", "evaluation")}
    generated = halves["localization"]
    scores = pd.concat([ps.to_frame().assign(correct=[i % 3 != 0 for i in range(len(ps))], facts=half)
                        for half, ps in halves.items()], ignore_index=True)
    got, got_scores, kept = findings.scored_prompts(_Chapter1Run(params, scores), tiny.tokenizer)
    held = findings.scored_prompts(_Chapter1Run(params, scores), tiny.tokenizer, "evaluation")[0]
    assert [it.clean for it in held.items] == [it.clean for it in halves["evaluation"].items]
    assert [it.clean for it in got.items] == [it.clean for it in generated.items]
    assert [it.clean for it in kept.items] == [it.clean for i, it in enumerate(generated.items) if i % 3 != 0]
    everything = findings.scored_prompts(_Chapter1Run({**params, "filter_correct": False}, scores), tiny.tokenizer)[2]
    assert len(everything) == len(generated)
    with pytest.raises(UpstreamError, match="scored other prompts"):  # a run made with other prompts (or tokenizer)
        findings.scored_prompts(_Chapter1Run({**params, "seed": 3}, scores), tiny.tokenizer)
    with pytest.raises(UpstreamError, match="predates the split"):
        findings.scored_prompts(_Chapter1Run(params, scores.drop(columns="facts")), tiny.tokenizer)


def test_facts_split_in_two_halves_by_the_stated_hash_whatever_the_template():
    from arithlens.tasks import facts
    for op in OPERATORS:
        pairs = operand_pairs(OPERATORS[op], 1, 9)
        halves = {(a, b): facts.fact_half(op, a, b) for a, b, _ in pairs}
        n_loc = sum(h == "localization" for h in halves.values())
        assert n_loc == len(pairs) // 2 and set(halves.values()) == {"localization", "evaluation"}
        # the rule as stated: order by sha256("op|a|b"), first half localizes
        order = sorted(pairs, key=lambda f: hashlib.sha256(f"{op}|{f[0]}|{f[1]}".encode()).hexdigest())
        assert [halves[(a, b)] for a, b, _ in order] == ["localization"] * n_loc + ["evaluation"] * (len(pairs) - n_loc)
    with pytest.raises(ValueError, match="not a fact"):
        facts.fact_half("-", 2, 5)


def test_each_half_of_the_prompts_uses_only_its_facts_in_queries_and_demonstrations(tiny):
    from arithlens.tasks import facts
    seen = {}
    for half in ("localization", "evaluation"):
        ps = make_prompts(tiny.tokenizer, PromptConfig(operators=("+", "*"), n_per_cell=4, shots=2, facts=half))
        assert len(ps) and all(facts.fact_half(it.operator, it.a, it.b) == half for it in ps.items)
        for it in ps.items:  # every demonstration line "a op b = c" of the prefix is a fact of the same half
            for line in it.clean.split("\n")[:-1]:
                nums = [int(x) for x in re.findall(r"\d+", line)]
                assert facts.fact_half(it.operator, nums[0], nums[1]) == half, line
        seen[half] = {(it.operator, it.a, it.b) for it in ps.items}
    assert not seen["localization"] & seen["evaluation"]
    with pytest.raises(Exception, match="facts"):  # a ValueError, or the test run's type check before it
        PromptConfig(facts="train")


def test_three_counterfactuals_change_only_what_they_name_and_keep_the_clean_prompts(tiny):
    from arithlens.tasks.facts import OPERATORS as OPS, SWAPPED
    config = PromptConfig(operators=("+", "-", "*"), templates=("eq_spaced", "st_is"), n_per_cell=4, shots=1)
    made = {cf: make_prompts(tiny.tokenizer, dataclasses.replace(config, counterfactual=cf))
            for cf in ("null", "swap", "operand")}
    null_clean = {it.clean for it in made["null"].items}
    for cf, ps in made.items():
        assert len(ps) and {it.clean for it in ps.items} <= null_clean | {it.clean for it in ps.items}
        for it in ps.items:
            cf_text = it.counterfactual.rsplit("\n", 1)[-1]
            query = it.clean.rsplit("\n", 1)[-1]
            assert len(it.cf_tokens) == len(it.clean_tokens) and it.cf_tokens[it.a_pos] == it.clean_tokens[it.a_pos]
            if cf == "operand":  # B changes, the operator stays
                assert it.cf_tokens[it.b_pos] != it.clean_tokens[it.b_pos]
                assert it.cf_tokens[it.op_pos] == it.clean_tokens[it.op_pos]
            else:  # the operator changes, B stays
                assert it.cf_tokens[it.b_pos] == it.clean_tokens[it.b_pos] and cf_text != query
            if cf == "swap":
                partner = OPS[SWAPPED[it.operator]]
                assert any(partner.render(f) in cf_text for f in ("symbol", "word", "noun"))
    # the clean prompts do not depend on the counterfactual chosen (items that cannot be aligned aside)
    by_key = {cf: {(it.operator, it.template, it.a, it.b): it.clean for it in ps.items} for cf, ps in made.items()}
    for cf in ("swap", "operand"):
        assert all(by_key["null"][k] == v for k, v in by_key[cf].items() if k in by_key["null"])

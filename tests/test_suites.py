"""Transfer suites: determinism, independently computed answers, asserted positions, exact scoring."""

import re
from decimal import Decimal

import numpy as np
import pandas as pd
import pytest
import torch

from arithlens.analyses import knockout, transfer
from arithlens.core.hooks import Head
from arithlens.core.items import continuation, prompt_families
from arithlens.tasks.generators import load_controls
from arithlens.tasks.suites import SUITE_NAMES, SUITES, Suite, SuiteItem, SuiteScorer, make_suite, number_continuations

# [query, answer] controls: every control with a "pairs" section in controls.json (the rest are ordinal)
PAIR_CONTROLS = [n for n in SUITE_NAMES if SUITES[n].kind == "control" and "pairs" in load_controls().get(n, {})]
NEW_CONTROLS = ("languages", "plurals", "past_tense", "elements")  # added 2026-12-06: >= 60 pairs, >= 48 items each


def _query(item: SuiteItem) -> str:
    return item.clean.rsplit("\n", 1)[-1]


def _expected(item: SuiteItem) -> str:
    """The answer computed from the prompt text alone (not from the generator's metadata)."""
    q = _query(item)
    if item.suite in ("multidigit", "multidigit3", "power"):
        a, op, b = re.fullmatch(r"(\d+) ([+\-^]) (\d+) = ", q).groups()
        a, b = int(a), int(b)
        return str({"+": a + b, "-": a - b, "^": a ** b}[op])
    if item.suite == "decimals":
        a, op, b = re.fullmatch(r"(\d\.\d) (plus|minus) (\d\.\d) equals ", q).groups()
        return str(Decimal(a) + Decimal(b) if op == "plus" else Decimal(a) - Decimal(b))
    if item.suite == "years":
        start, prefix = re.fullmatch(r"The \w+ lasted from the year (\d{4}) to the year (\d{3})", q).groups()
        assert prefix == start[:3]
        return f"> {start[3]}"
    if item.suite == "word_problems":
        a, verb, b = _word(q)
        sign = {"gets": 1, "finds": 1, "buys": 1, "wins": 1, "loses": -1, "sells": -1, "breaks": -1, "gives away": -1}[verb]
        return str(int(a) + sign * int(b))
    data = load_controls()
    if item.suite in PAIR_CONTROLS:
        x = re.fullmatch(data[item.suite]["template"].format(x="(.+)"), q).group(1)
        return " " + dict(map(tuple, data[item.suite]["pairs"]))[x]
    if item.suite == "sequences":
        window = q.rstrip(",").split(", ")
        for values in data["sequences"]["lists"].values():
            if window[0] in values:
                i = values.index(window[0])
                assert values[i: i + len(window)] == window
                return " " + values[i + len(window)]
    raise AssertionError(f"no independent answer for {item.suite}")


def _word(q: str):
    m = re.fullmatch(r"(\w+) has (\d) (\w+)\. (\w+) (gets|finds|buys|wins|loses|sells|breaks|gives away) (\d) (\w+)\. "
                     r"Now (\w+) has ", q)
    assert m, q
    name, a, obj, name2, verb, b, obj2, name3 = m.groups()
    assert name == name2 == name3 and obj == obj2
    return a, verb, b


@pytest.mark.parametrize("name", SUITE_NAMES)
def test_suite_is_deterministic_under_a_seed(tiny, name):
    a = make_suite(name, tiny.tokenizer, n=20, seed=3)
    b = make_suite(name, tiny.tokenizer, n=20, seed=3)
    assert a == b and len(a) > 0
    if name not in ("sequences", "capitals", "antonyms", "power"):  # small fixed pools may coincide
        assert make_suite(name, tiny.tokenizer, n=20, seed=4).items != a.items


@pytest.mark.parametrize("name", SUITE_NAMES)
def test_answers_are_correct_and_positions_asserted(tiny, name):
    suite = make_suite(name, tiny.tokenizer, n=40, seed=0)
    tok = tiny.tokenizer
    for it in suite.items:
        assert it.answer == _expected(it), it.clean
        assert it.end_pos == len(it.clean_tokens) - 1
        if suite.scoring == "exact":
            assert tok.decode(list(it.answer_tokens)) == it.answer
            assert tok.decode(list(it.clean_tokens) + list(it.answer_tokens)) == it.clean + it.answer
        else:
            u = int(it.answer[-1])
            assert sorted(tok.decode([t]) for t in it.valid_tokens) == [str(d) for d in range(u + 1, 10)]
        # numbers: every token of every number of the query, nothing else
        numbers = "".join(tok.decode([it.clean_tokens[p]]) for p in it.number_pos)
        q_numbers = re.findall(r"\d+(?:\.\d)?", _query(it))
        assert numbers.replace(" ", "") == "".join(q_numbers)
        if suite.has_counterfactual:
            assert len(it.cf_tokens) == len(it.clean_tokens)
            diff = [i for i, (x, y) in enumerate(zip(it.clean_tokens, it.cf_tokens)) if x != y]
            assert diff and max(diff) <= it.op_pos  # only the operation's tokens differ (its last may coincide)
            assert tok.decode(list(it.clean_tokens[min(diff): it.op_pos + 1])).strip() in it.clean.rsplit("\n", 1)[-1]
            assert not set(diff) & set(it.number_pos)
            assert it.clean.rsplit("\n", 1)[0] == it.counterfactual.rsplit("\n", 1)[0]  # demos unchanged
        else:
            assert it.cf_tokens is None and it.counterfactual is None


def test_demonstrations_never_are_the_query(tiny):
    for name in SUITE_NAMES:
        for it in make_suite(name, tiny.tokenizer, n=30).items:
            demos = it.clean.split("\n")[:-1]
            assert _query(it) + it.answer not in demos


@pytest.mark.real_model
@pytest.mark.parametrize("name", SUITE_NAMES)
def test_positions_with_the_real_tokenizer(smollm2, name):
    suite = make_suite(name, smollm2.tokenizer, n=16)
    assert len(suite) > 0
    tok = smollm2.tokenizer
    for it in suite.items:
        assert it.answer == _expected(it)
        if suite.scoring == "exact":
            assert tok.decode(list(it.clean_tokens) + list(it.answer_tokens)) == it.clean + it.answer
        if it.op_pos is not None:
            assert tok.decode([it.clean_tokens[it.op_pos]]).strip() in it.clean.rsplit("\n", 1)[-1]


def test_control_registry():
    """At least six non-math controls, at most one of them ordinal (not a [query, answer] lookup); every
    data section is a registered suite, scored exactly, with no counterfactual, reading its own pairs."""
    data = load_controls()
    controls = [n for n, spec in SUITES.items() if spec.kind == "control"]
    assert len(controls) >= 6 and len(set(controls) - set(PAIR_CONTROLS)) <= 1
    assert set(NEW_CONTROLS) <= set(PAIR_CONTROLS)
    assert {k for k in data if not k.startswith("_")} == set(controls)
    for name in PAIR_CONTROLS:
        spec = SUITES[name]
        assert (spec.scoring, spec.counterfactual, spec.nulls) == ("exact", None, None)
        assert spec.source(0)[0] == [tuple(p) for p in data[name]["pairs"]]


@pytest.mark.parametrize("name", PAIR_CONTROLS)
def test_shipped_control_pairs(tiny, name):
    """Hand-checked data: unique queries (>= 60 for the new controls), non-empty ASCII answers, none equal to
    its query nor the start of its query or of another answer (a model copying the query would score)."""
    spec = load_controls()[name]
    assert "{x}" in spec["template"] and spec["answer"] == " {y}"
    pairs = [tuple(p) for p in spec["pairs"]]
    assert all(len(p) == 2 for p in pairs)
    queries = [x for x, _ in pairs]
    assert len(set(queries)) == len(queries), [q for q in set(queries) if queries.count(q) > 1]
    assert len(queries) >= (60 if name in NEW_CONTROLS else 48)
    answers = {y for _, y in pairs}
    for x, y in pairs:
        assert x and y and x == x.strip() and y == y.strip() and (x + y).isascii(), (x, y)
        assert x.lower() != y.lower() and not x.startswith(y), (x, y)
        assert not [a for a in answers if a != y and a.startswith(y)], (x, y)
    if name in NEW_CONTROLS:
        assert len(make_suite(name, tiny.tokenizer, n=64)) >= 48


def test_unknown_suite_and_bad_n(tiny):
    with pytest.raises(ValueError, match="unknown suite"):
        make_suite("gsm9k", tiny.tokenizer)
    with pytest.raises(ValueError, match="n must be"):
        make_suite("power", tiny.tokenizer, n=0)


@pytest.mark.real_model
@pytest.mark.parametrize("name", PAIR_CONTROLS)
def test_controls_with_the_real_tokenizer(smollm2, name):
    """The new controls keep >= 48 items; no answer's tokens start another answer's, nor the query copied
    as is or capitalised (" Rh" would score a model saying " Rhodium", tokens " Rh" "odium")."""
    tok, spec = smollm2.tokenizer, load_controls()[name]
    if name in NEW_CONTROLS:
        assert len(make_suite(name, tok, n=64)) >= 48
    answers = {y for _, y in spec["pairs"]}
    for x, y in spec["pairs"]:
        prompt = spec["template"].format(x=x)
        ans = continuation(tok, prompt, " " + y)
        for other in (answers | {x, x[:1].upper() + x[1:]}) - {y}:
            toks = continuation(tok, prompt, " " + other)
            assert toks is None or len(toks) <= len(ans) or toks[: len(ans)] != ans, (x, y, other)


def _greedy_suite(model, prompts: list[str], n_new: int) -> Suite:
    """A suite whose answers are the model's own greedy continuations (so all must score correct)."""
    items = []
    for p in prompts:
        ids = model.tokenizer(p)["input_ids"]
        seq = torch.tensor([ids])
        for _ in range(n_new):
            nxt = model.bridge.original_model(seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
        ans = tuple(seq[0, len(ids):].tolist())
        items.append(SuiteItem("greedy", "g", p, model.tokenizer.decode(list(ans)), None, tuple(ids), None, ans))
    return Suite("greedy", "math", "exact", "", None, tuple(items))


@torch.no_grad()
def test_teacher_forced_scoring_equals_greedy_decoding(tiny):
    suite = _greedy_suite(tiny, ["12 + 34 = ", "98 + 76 = ", "hello wor", "abc def "], 3)
    scores = SuiteScorer(tiny, suite).score()
    assert scores["correct"].all() and scores["first_correct"].all()
    wrong = Suite("w", "math", "exact", "", None, tuple(
        SuiteItem(it.suite, it.operator, it.clean, it.answer, None, it.clean_tokens, None,
                  it.answer_tokens[:-1] + ((it.answer_tokens[-1] + 1) % 90,)) for it in suite.items))
    scores = SuiteScorer(tiny, wrong).score()
    assert not scores["correct"].any() and scores["first_correct"].all()


@torch.no_grad()
def test_a_number_is_correct_only_where_the_model_stops_writing_it(tiny):
    """Teacher forcing checks the token after a number: a model that writes 777… has not answered 7 or
    77 (on digit-by-digit tokenizers the first digits alone would pass), and the benchmark scorer's
    teacher-forced mode applies the same rule."""
    from arithlens.tasks.benchmarks.scoring import BenchmarkScorer
    seven = tiny.tokenizer.convert_tokens_to_ids("7")
    push = tiny.bridge.original_model.lm_head.weight[seven].detach()
    always_seven = [(f"blocks.{tiny.bridge.cfg.n_layers - 1}.hook_resid_post", lambda x, hook: x + 100 * push)]
    ids = tuple(tiny.tokenizer("12 + 34 = ")["input_ids"])
    items = tuple(SuiteItem("s", "+", "12 + 34 = ", answer, None, ids, None, tokens)
                  for answer, tokens in [("7", (seven,)), ("77", (seven, seven)), ("seven", (seven,))])
    suite = Suite("s", "math", "exact", "", None, items)
    scores = SuiteScorer(tiny, suite).score(always_seven)
    assert scores["first_correct"].all()
    assert scores["correct"].tolist() == [False, False, True]
    bench = BenchmarkScorer(tiny, suite, "first_token").score(always_seven)
    assert bench["correct"].tolist() == [False, False, True]


def test_prompt_families_group_prompts_by_their_demonstrations():
    demo_a, demo_b = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]
    prompts = [demo_a + [20, 21], demo_b + [22], demo_a + [23], [30, 31], demo_b + [24, 25], [32]]
    assert prompt_families(prompts) == [[0, 2], [1, 4], [3, 5]]
    assert prompt_families([[1, 2], [3, 4]]) == [[0, 1]] and prompt_families([]) == []


def _full_pass_with(model, item, heads, values):
    """Logits at END and the answer positions of one full hooked pass over prompt + answer, with
    ``heads``' ``hook_z`` set to ``values[layer, head]`` at those positions (the reference for the
    cached scorer)."""
    seq = torch.tensor([item.clean_tokens + item.answer_tokens])
    n = len(item.clean_tokens)
    hooks = []
    for h in heads:
        def fn(z, hook=None, h=h):
            z = z.clone()
            z[:, n - 1:, h.head] = values[h.layer, h.head]
            return z
        hooks.append((f"blocks.{h.layer}.attn.hook_z", fn))
    return model.bridge.run_with_hooks(seq, fwd_hooks=hooks)[0, n - 1:].float()


@torch.no_grad()
def test_cached_knockout_equals_full_hooked_forward(tiny):
    suite = make_suite("multidigit", tiny.tokenizer, n=12)
    heads = [Head(0, 1), Head(1, 3)]
    means = torch.randn(tiny.n_layers, tiny.n_heads, tiny.cfg.d_head)
    scorer = SuiteScorer(tiny, suite)
    assert max(scorer.shared) > 0  # the demonstrations of a family of prompts ran once, for all of them
    got = scorer.score(knockout.ablation_hooks(heads, means, "all"))
    again = scorer.score(knockout.ablation_hooks(heads, means, "all"))  # the KV cache was given back intact
    assert got.equals(again)
    goes_on = set(number_continuations(tiny.tokenizer).tolist())
    for i, it in enumerate(suite.items):
        logits = _full_pass_with(tiny, it, heads, means)
        target = torch.tensor(it.answer_tokens)
        top = logits.argmax(-1)
        written = bool((top[:-1] == target).all()) and int(top[-1]) not in goes_on
        assert written == bool(got.loc[i, "correct"])
        assert np.isclose(float(logits.log_softmax(-1)[0, target[0]].exp()), got.loc[i, "p_answer"], atol=1e-5)


@torch.no_grad()
def test_resample_ablation_gives_each_item_its_donors_value(tiny):
    """SuiteScorer's item hooks on the cached prefix equal, item by item, a full hooked pass that sets
    the heads to the item's own row of the values at END and every answer position; resample donors
    are never the item itself, and the values are the donors' END outputs."""
    suite = make_suite("multidigit", tiny.tokenizer, n=12)
    heads = [Head(0, 1), Head(1, 3)]
    donors = knockout.resample_donors(len(suite.items), seed=3)
    assert sorted(donors) == list(range(len(suite.items))) and not (donors == np.arange(len(donors))).any()
    values = knockout.resample_z(tiny, suite, "clean", seed=3)
    torch.testing.assert_close(values, knockout.end_z(tiny, suite, "clean")[torch.as_tensor(donors)])
    got = SuiteScorer(tiny, suite).score(item_hooks=knockout.item_ablation_hooks(heads, values))
    for i, it in enumerate(suite.items):
        logits = _full_pass_with(tiny, it, heads, values[i])
        assert np.isclose(float(logits.log_softmax(-1)[0, it.answer_tokens[0]].exp()), got.loc[i, "p_answer"], atol=1e-5)
    plain = SuiteScorer(tiny, suite).score()
    assert not np.allclose(plain["p_answer"], got["p_answer"])  # the values did act


@torch.no_grad()
@pytest.mark.parametrize("name", ["multidigit", "years", "capitals"])
def test_score_many_equals_one_score_per_condition(tiny, name, monkeypatch):
    """Conditions stacked along the batch (a budget small enough to split them unevenly across passes)
    give, condition by condition, what one scoring pass each gives — plain hooks and per-item hooks."""
    from arithlens.core import conditions as C

    suite = make_suite(name, tiny.tokenizer, n=8)
    scorer = SuiteScorer(tiny, suite)
    means = 30 * torch.randn(tiny.n_layers, tiny.n_heads, tiny.cfg.d_head)  # large: every condition moves the scores
    values = 30 * torch.randn(len(suite.items), tiny.n_layers, tiny.n_heads, tiny.cfg.d_head)
    conditions = [[], knockout.ablation_hooks([Head(0, 1)], means, "all"),
                  knockout.item_ablation_hooks([Head(1, 2), Head(0, 3)], values),
                  knockout.ablation_hooks([Head(0, 1), Head(1, 3)], means, "all"), []]
    one_each = [scorer.score(item_hooks=c) if callable(c) else scorer.score(c) for c in conditions]
    widest = max(len(b) * (seq.shape[1] - n + 1) for b, seq, n, _ in scorer.batches)
    monkeypatch.setattr(C, "STACK_ROWS", 3 * widest)  # three conditions a pass, then two
    many = scorer.score_many(conditions)
    for a, b in zip(many, one_each):
        assert a["correct"].tolist() == b["correct"].tolist()
        np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5, atol=1e-5)
    for a, b in zip(one_each[:3], one_each[1:4]):
        assert not np.allclose(a["score"], b["score"], rtol=1e-3, atol=1e-3)


def test_knockout_transfer_and_summary(tiny):
    S = {n: make_suite(n, tiny.tokenizer, n=10) for n in ("power", "capitals")}
    means = torch.zeros(tiny.n_layers, tiny.n_heads, tiny.cfg.d_head)
    scores = transfer.knockout_transfer(tiny, S, [Head(1, 0)], means, n_seeds=2, margin=-1.0, min_correct=0)
    assert set(scores[scores.suite == "capitals"].condition) == {"none", "key", "random"}
    own = transfer.knockout_transfer(tiny, {"power": S["power"]}, [Head(1, 0)], means, n_seeds=1, margin=None,
                                     own_means=True)
    assert list(dict.fromkeys(own.condition)) == ["none", "key", "random", "key (own mean)", "random (own mean)"]
    both = transfer.knockout_transfer(tiny, {"power": S["power"]}, [Head(1, 0)], means, n_seeds=1, margin=None,
                                      own_means=True, resample=True)
    assert list(dict.fromkeys(both.condition))[-2:] == ["key (resample)", "random (resample)"]
    assert both[both.condition.isin(["key", "key (own mean)"])].equals(own[own.condition.isin(["key", "key (own mean)"])])
    assert list(transfer.drop_table(transfer.summarize_transfer(own, n_boot=10)).columns[4:]) == [
        "key", "random", "key (own mean)", "random (own mean)"]
    strict = transfer.knockout_transfer(tiny, S, [Head(1, 0)], means, n_seeds=1, margin=0.15)
    assert set(strict.condition) == {"none"}  # a random-init model can do none of them: nothing ablated
    assert scores[scores.suite == "power"].groupby("condition").size().to_dict() == {
        "none": len(S["power"]), "key": len(S["power"]), "random": 2 * len(S["power"])}
    summary = transfer.summarize_transfer(scores, n_boot=50)
    none = summary[summary.condition == "none"]
    assert np.allclose(none.relative_drop.fillna(0), 0)
    assert transfer.change_text(summary, "power").startswith(("+", "-", "−", "nan"))
    assert transfer.change_text(transfer.summarize_transfer(strict, n_boot=10), "power").startswith("not ablated")


def test_relative_drop_and_its_interval():
    base = np.array([1.0] * 8 + [0.0] * 2)
    vals = np.array([1.0] * 4 + [0.0] * 6)
    point, lo, hi = transfer._paired_relative(vals, base, 500, 0)
    assert point == pytest.approx(-0.5) and lo <= point <= hi and hi < 0


def test_overlap_matrix():
    a = [Head(1, 1), Head(1, 2), Head(2, 0)]
    b = [Head(1, 1), Head(3, 3), Head(2, 0)]
    m = transfer.overlap_matrix({"a": a, "b": b}).set_index(["a", "b"])
    assert m.loc[("a", "b"), "shared"] == 2 and m.loc[("a", "b"), "shared_frac"] == pytest.approx(2 / 3)
    assert m.loc[("a", "b"), "jaccard"] == pytest.approx(2 / 4) and m.loc[("a", "a"), "jaccard"] == 1


def test_localize_suite_is_chapter_one_patching(tiny):
    suite = make_suite("power", tiny.tokenizer, n=8)
    summary = transfer.localize_suite(tiny, suite, n_boot=20)
    assert len(summary) == 2 * tiny.n_layers * tiny.n_heads
    assert len(transfer.top_heads(summary, 3)) == 3
    with pytest.raises(ValueError, match="no counterfactual"):
        transfer.localize_suite(tiny, make_suite("capitals", tiny.tokenizer, n=4))
    att = transfer.attention_of(tiny, suite, [Head(0, 0), Head(1, 2)], reference=[Head(1, 2)])
    assert att["in_reference"].tolist() == [False, True]
    assert np.allclose(att[["numbers", "operation", "other"]].sum(axis=1), 1, atol=1e-5)


def test_first_token_chance_is_the_most_common_first_token_where_that_beats_guessing():
    first = [1, 1, 1, 1, 2, 3, 4, 5, 6, 7]  # four answers in ten start with the same token
    items = tuple(SuiteItem("s", "+", "q", str(i), None, (9,), None, (f, 20 + i)) for i, f in enumerate(first))
    suite = Suite("s", "math", "exact", "", None, items)
    assert transfer.chance_levels(suite) == {"correct": pytest.approx(0.1), "first_correct": pytest.approx(0.4)}
    few = Suite("s", "math", "exact", "", None, tuple(SuiteItem("s", "+", "q", str(a), None, (9,), None, (a,))
                                                      for a in [3, 3, 3, 5, 7]))
    assert transfer.chance_levels(few)["correct"] == pytest.approx(0.6)  # always answering 3: 60 % right
    base = pd.DataFrame({"correct": [True] * 5 + [False] * 5, "first_correct": [True] * 5 + [False] * 5})
    u = transfer.usability(suite, base, margin=0.15, min_correct=1).set_index("metric")
    assert u.loc["correct", "usable"] and not u.loc["first_correct", "usable"]  # 50 % is within 15 points of 40 %


def test_usability_rule(tiny):
    suite = make_suite("power", tiny.tokenizer, n=20)
    good = pd.DataFrame({"correct": [True] * 15 + [False] * 5, "first_correct": [True] * 20})
    bad = pd.DataFrame({"correct": [True] * 2 + [False] * 18, "first_correct": [True] * 3 + [False] * 17})
    assert transfer.usability(suite, good)["usable"].all()
    u = transfer.usability(suite, bad)
    assert not u["usable"].any() and "chance" in u["reason"].iloc[0]

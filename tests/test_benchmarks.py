"""Benchmark files: format detection, answer rules, one-line errors, suites, and cached batched scoring
checked against plain loops (the files under tests/data/benchmarks are written for these tests)."""

import json
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch

from arithlens.tasks.benchmarks import cot, scoring, shipped
from arithlens.analyses.sft import evaluation
from arithlens.analyses import knockout, transfer
from arithlens.tasks.benchmarks.scoring import BenchmarkScorer, answers_match, evaluate_benchmarks, extract_last_number
from arithlens.tasks.benchmarks.formats import format_number, parse_number
from arithlens.tasks.benchmarks.reader import (BenchmarkFileError, load_benchmark, load_benchmarks, make_benchmark_suite,
                                               read_benchmark)
from arithlens.cli import main
from arithlens.core.hooks import Head
from arithlens.tasks.suites import SuiteScorer

DATA = Path(__file__).parent / "data" / "benchmarks"


# --- reading -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, fmt, kind, answers", [
    ("gsm8k_style.jsonl", "gsm8k", "numeric", ["24", "1234", "-5", "3.5", "14"]),
    ("svamp_style.json", "svamp", "numeric", ["20", "19", "7.5", "4"]),
    ("addsub_style.json", "mawps", "numeric", ["12", "9", "7.75", "30"]),
    ("mmlu_style.csv", "mmlu_csv", "choice", ["B", "C", "D", "A"]),
    ("mmlu_style.jsonl", "choice", "choice", ["C", "B", "D", "B"]),
    ("csqa_style.jsonl", "choice", "choice", ["C", "A", "E"]),
    ("generic.jsonl", "generic", "numeric", ["12", "12", "3.5", "-5", "1234"]),
    ("generic_text.jsonl", "generic", "text", ["down", "blue", "Tuesday"]),
])
def test_each_published_format_is_recognised(name, fmt, kind, answers):
    bench = read_benchmark(DATA / name)
    assert (bench.format.name, bench.kind) == (fmt, kind)
    assert [r.answer for r in bench.records] == answers
    assert all(r.question.strip() for r in bench.records)
    if kind == "choice":
        assert all(len(r.choices) == (5 if "csqa" in name else 4) for r in bench.records)


def test_fields_of_each_format_reach_the_record():
    svamp = read_benchmark(DATA / "svamp_style.json").records[0]
    assert svamp.question == "Priya planted 12 tulips and 8 daisies in her garden. How many flowers did she plant?"
    csqa = read_benchmark(DATA / "csqa_style.jsonl").records[0]
    assert csqa.question.startswith("Where would you keep") and csqa.choices[2] == "by the front door"
    mmlu = read_benchmark(DATA / "mmlu_style.csv").records[1]
    assert mmlu.question == "What is the chemical symbol for table salt's metal, sodium?"  # a quoted comma
    assert read_benchmark(DATA / "mmlu_style.jsonl").records[0].subject == "biology"


@pytest.mark.parametrize("text, value", [
    ("1,234", "1234"), ("-5", "-5"), ("3.50", "3.5"), ("$12", "12"), ("-$5", "-5"), (" 72. ", "72"),
    ("1,000,000", "1000000"), (".5", "0.5"), ("\u22123", "-3"), (27.0, "27"), (12, "12"), (2.5, "2.5"), ("-0", "0"),
])
def test_numbers_parse_to_canonical_text(text, value):
    assert format_number(parse_number(text)) == value


@pytest.mark.parametrize("text", ["1,23", "3/4", "twelve", "", "1 234", "12a", None, True, float("nan"), [3]])
def test_non_numbers_do_not_parse(text):
    assert parse_number(text) is None


@pytest.mark.parametrize("text, value", [
    ("The answer is 1,234 apples.", Decimal(1234)), ("It was -5 degrees", Decimal(-5)), ("costs $3.50.", Decimal("3.5")),
    ("5-3", Decimal(3)), ("1,2,3", Decimal(3)), ("72", Decimal(72)), ("x = -0.25", Decimal("-0.25")), ("none", None),
])
def test_last_number_of_generated_text(text, value):
    assert extract_last_number(text) == value


def test_answers_compare_as_numbers():
    assert answers_match(Decimal("3.50"), "3.5") and answers_match(Decimal("1234"), "1234")
    assert not answers_match(Decimal(72), "720") and not answers_match(None, "3")


@pytest.mark.parametrize("name, message", [
    ("no_match.jsonl", "row 1: no known benchmark format (fields ['label', 'text'])"),
    ("missing_answer.jsonl", "row 2: missing answer (2 of 3 rows unusable"),
    ("non_numeric.jsonl", "row 1: non-numeric answer 'eight' (2 of 3 rows unusable"),
    ("empty.jsonl", "empty file"),
    ("blank.jsonl", "empty file"),
    ("bad_json.jsonl", "row 2: not a valid JSON line"),
])
def test_malformed_files_raise_one_line_naming_file_and_row(name, message):
    path = DATA / "malformed" / name
    with pytest.raises(BenchmarkFileError) as err:
        read_benchmark(path)
    text = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in text
    assert text.startswith(str(path)) and message in text


def _write(tmp_path, name, rows) -> Path:
    path = tmp_path / name
    path.write_text(rows if isinstance(rows, str) else "\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_unusable_rows_are_skipped_and_counted_unless_a_majority(tmp_path):
    bench = read_benchmark(DATA / "gsm8k_style.jsonl")
    assert bench.n_rows == 6 and len(bench) == 5
    assert bench.skipped == {"non-numeric answer": 1} and bench.first_skipped == {"non-numeric answer": 6}
    assert "1 skipped (non-numeric answer: 1, first at row 6)" in bench.describe()
    with pytest.raises(BenchmarkFileError, match=r"row 6: non-numeric answer 'many'$"):
        read_benchmark(DATA / "gsm8k_style.jsonl", strict=True)
    good, bad = {"question": "q?", "answer": "#### 1"}, {"question": "q?", "answer": "#### lots"}
    assert len(read_benchmark(_write(tmp_path, "half.jsonl", [good, bad, good, bad]))) == 2  # half: kept
    with pytest.raises(BenchmarkFileError, match="3 of 5 rows unusable"):
        read_benchmark(_write(tmp_path, "most.jsonl", [good, bad, bad, good, bad]))


def test_variants_of_the_published_formats(tmp_path):
    listed = _write(tmp_path, "gsm.json", json.dumps([{"question": "a?", "answer": "#### 3"},
                                                       {"question": "b?", "answer": "7"}]))
    assert [r.answer for r in read_benchmark(listed).records] == ["3", "7"]
    header = _write(tmp_path, "mmlu.csv", "question,A,B,C,D,answer\nWhich?,x,y,z,w,C\nShort row,x,B\n")
    bench = read_benchmark(header)
    assert [r.answer for r in bench.records] == ["C"] and bench.n_rows == 2  # the header is not a row
    assert bench.skipped == {"too few columns": 1}  # one of two rows: half, so kept
    hf = _write(tmp_path, "csqa.jsonl", [
        {"question": "Where?", "choices": {"label": ["A", "B", "C"], "text": ["up", "down", "in"]}, "answerKey": "B"},
        {"question": "Which?", "choices": ["red", "blue"], "answer": "blue"},
        {"question": "Odd?", "choices": ["1", "2"], "answer": 5}])
    bench = read_benchmark(hf)
    assert [r.answer for r in bench.records] == ["B", "B"] and bench.skipped == {"answer not among the choices": 1}
    with pytest.raises(BenchmarkFileError, match=r"row 2: not a JSON object but list"):
        read_benchmark(_write(tmp_path, "mixed.jsonl", [{"prompt": "p", "answer": 1}, [1, 2]]))
    with pytest.raises(BenchmarkFileError, match=r"row 2: not valid JSON"):
        read_benchmark(_write(tmp_path, "broken.json", '[{"prompt": "p", "answer": 1},\n{"prompt": }]'))
    with pytest.raises(BenchmarkFileError, match="no such file"):
        read_benchmark(tmp_path / "absent.jsonl")


# --- suites ------------------------------------------------------------------------------------------

def test_suite_items_continue_their_prompts_and_demos_are_never_queries(tiny):
    tok = tiny.tokenizer
    bench = read_benchmark(DATA / "gsm8k_style.jsonl")
    suite = make_benchmark_suite(bench, tok, shots=2, seed=1)
    assert len(suite) == 3 and suite.scoring == "exact" and suite.kind == "math" and suite.dropped == bench.skipped
    demos = suite.items[0].clean.split("\n\n")[:-1]
    assert len(demos) == 2 and all(it.clean.split("\n\n")[:-1] == demos for it in suite.items)
    for it in suite.items:
        assert tok.decode(list(it.clean_tokens) + list(it.answer_tokens)) == it.clean + it.answer
        assert it.clean.endswith("\nAnswer: ") and it.answer == dict(it.meta)["value"]
        assert it.clean.split("\n\n")[-1] not in "\n\n".join(demos)
        query = it.clean.split("\n\n")[-1]
        numbers = "".join(tok.decode([it.clean_tokens[p]]) for p in it.number_pos)
        assert numbers == "".join(c for c in query if c.isdigit() or c == ",")
    assert make_benchmark_suite(bench, tok, shots=2, seed=1) == suite
    assert make_benchmark_suite(bench, tok, shots=2, seed=2) != suite
    assert len(make_benchmark_suite(bench, tok, n=2, shots=0)) == 2
    with pytest.raises(ValueError, match="5 shots need more than 5 usable items"):
        make_benchmark_suite(bench, tok, shots=5)


def test_choice_suites_carry_the_option_letters(tiny):
    suites = load_benchmarks([DATA / "mmlu_style.csv", DATA / "csqa_style.jsonl"], tiny.tokenizer, shots=1)
    mmlu, csqa = suites["mmlu_style"], suites["csqa_style"]
    assert mmlu.scoring == "choice" and mmlu.kind == "control" and mmlu.chance == pytest.approx(0.25)
    assert csqa.chance == pytest.approx(0.2)
    for it in mmlu.items + csqa.items:
        letters = [tiny.tokenizer.decode([t]) for t in it.choice_tokens]
        assert letters == list("ABCDE"[: len(it.choice_tokens)])
        assert it.answer_tokens[0] in it.choice_tokens and it.clean.endswith("\nAnswer: ")


# --- scoring -----------------------------------------------------------------------------------------

def _greedy_loop(model, tokens, n_new, stop, hooks_from=None, heads=(), means=None):
    """Plain reference: full forward pass per step, no cache, no batch; optional knockout from a position."""
    seq, out = list(tokens), []
    for _ in range(n_new):
        hooks = []
        for h in heads:
            def fn(z, hook=None, h=h):
                z = z.clone()
                z[:, hooks_from:, h.head] = means[h.layer, h.head]
                return z
            hooks.append((f"blocks.{h.layer}.attn.hook_z", fn))
        t = int(model.bridge.run_with_hooks(torch.tensor([seq]), fwd_hooks=hooks)[0, -1].argmax())
        out.append(t)
        seq.append(t)
        if stop(t):
            break
    return out


@torch.no_grad()
@pytest.mark.parametrize("name, shots", [("gsm8k_style.jsonl", 2), ("generic.jsonl", 0), ("svamp_style.json", 1)])
def test_batched_cached_generation_equals_a_plain_greedy_loop(tiny, name, shots):
    suite = load_benchmark(DATA / name, tiny.tokenizer, shots=shots)
    scorer = BenchmarkScorer(tiny, suite, "generate", max_new_tokens=5, batch_size=2)
    assert len({len(it.clean_tokens) for it in suite.items}) > 1  # padding is exercised
    assert (scorer.shared > 0) == (shots > 0)  # the demonstrations are the shared prefix
    heads, means = [Head(0, 1), Head(1, 2)], torch.randn(tiny.n_layers, tiny.n_heads, tiny.cfg.d_head)
    hooks = knockout.ablation_hooks(heads, means, "all")
    for batch in scorer.batches:
        end, plain = scorer.generate(batch)
        _, ablated = scorer.generate(batch, hooks)
        for j, i in enumerate(batch.index):
            tokens = suite.items[i].clean_tokens
            # logits to float rounding (a wrong position id after the shared prefix moves them ~1e-4 here)
            ref = tiny.bridge(torch.tensor([tokens]))[0, -1].float().log_softmax(-1)
            torch.testing.assert_close(end[j].log_softmax(-1), ref, atol=2e-5, rtol=0)
            assert plain[j] == _greedy_loop(tiny, tokens, 5, scorer._is_stop)
            assert ablated[j] == _greedy_loop(tiny, tokens, 5, scorer._is_stop, len(tokens) - 1, heads, means)
    assert any(a != p for b in scorer.batches for a, p in zip(scorer.generate(b, hooks)[1], scorer.generate(b)[1]))


@torch.no_grad()
def test_a_stopped_row_leaves_the_batch_and_the_others_are_unchanged(tiny, monkeypatch):
    suite = load_benchmark(DATA / "generic.jsonl", tiny.tokenizer, shots=0)
    scorer = BenchmarkScorer(tiny, suite, "generate", max_new_tokens=6, batch_size=4)
    batch = scorer.batches[0]
    _, free = scorer.generate(batch)
    scorer._stops.update({t: False for row in free for t in row})
    scorer._stops[free[0][1]] = True  # the first row stops at its second token; the others run on
    widths, run = [], scorer._run
    monkeypatch.setattr(scorer, "_run", lambda tokens, *a: widths.append(len(tokens)) or run(tokens, *a))
    _, new = scorer.generate(batch)
    assert len(new[0]) <= 2 and max(map(len, new)) == 6
    assert widths[0] == len(batch.index) and widths[-1] < len(batch.index)  # rows left the batch
    for j, i in enumerate(batch.index):
        assert new[j] == _greedy_loop(tiny, suite.items[i].clean_tokens, 6, scorer._is_stop)


def test_generation_reuses_the_prompt_cache(tiny, monkeypatch):
    suite = load_benchmark(DATA / "gsm8k_style.jsonl", tiny.tokenizer, shots=2)
    calls, decoders = [], []
    monkeypatch.setattr(scoring, "prefix_kv", lambda m, t: calls.append(t.shape) or _prefix(m, t))
    real_decoder = scoring.PrefixDecoder
    monkeypatch.setattr(scoring, "PrefixDecoder", lambda m, t: decoders.append(t.shape) or real_decoder(m, t))
    scorer = BenchmarkScorer(tiny, suite, "generate", max_new_tokens=4, batch_size=2)
    widths = []
    real = scorer._run
    monkeypatch.setattr(scorer, "_run", lambda x, *args: widths.append(x.shape[1]) or real(x, *args))
    first, again = scorer.score(), scorer.score()
    # with no hooks the shared prefix ran once, for both calls, in the shared-prefix decoder
    assert decoders == [(1, scorer.shared)] and calls == []
    assert set(widths) == {1} and len(widths) <= 2 * 4 * len(scorer.batches)  # one new token a step
    assert first.drop(columns="p_answer").equals(again.drop(columns="p_answer"))
    assert np.allclose(first.p_answer, again.p_answer)
    hooks = knockout.ablation_hooks([Head(1, 0)], torch.zeros(tiny.n_layers, tiny.n_heads, tiny.cfg.d_head), "all")
    scorer.score(hooks), scorer.score(hooks)
    assert calls == [(1, scorer.shared)] and len(decoders) == 1  # hooked runs: the bridge's cache, made once


def _prefix(model, tokens):
    from arithlens.core.hooks import prefix_kv

    return prefix_kv(model, tokens)


@torch.no_grad()
def test_first_token_mode_equals_suite_scorer_with_and_without_knockout(tiny):
    suite = load_benchmark(DATA / "generic.jsonl", tiny.tokenizer, shots=1)
    hooks = knockout.ablation_hooks([Head(1, 0)], torch.randn(tiny.n_layers, tiny.n_heads, tiny.cfg.d_head), "all")
    for fwd in ((), hooks):
        got = BenchmarkScorer(tiny, suite, "first_token", batch_size=3).score(fwd)
        ref = SuiteScorer(tiny, suite).score(fwd)
        assert (got.correct.values == ref.correct.values).all() and (got.first_correct.values == ref.first_correct.values).all()
        torch.testing.assert_close(torch.tensor(got.score.values), torch.tensor(ref.score.values), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_choice_picks_the_most_likely_letter(tiny):
    suite = load_benchmark(DATA / "mmlu_style.jsonl", tiny.tokenizer, shots=1)
    got = BenchmarkScorer(tiny, suite, batch_size=2).score()
    assert (got["mode"] == "choice").all()
    ref = SuiteScorer(tiny, suite).score()
    assert (got.correct.values == ref.correct.values).all() and np.allclose(got.p_answer, ref.p_answer, atol=1e-5)
    for i, it in enumerate(suite.items):
        end = tiny.bridge(torch.tensor([it.clean_tokens]))[0, -1]
        letters = end[list(it.choice_tokens)]
        assert got.loc[i, "prediction"] == "ABCD"[int(letters.argmax())]
        assert got.loc[i, "correct"] == (it.choice_tokens[int(letters.argmax())] == it.answer_tokens[0])
        assert np.isclose(got.loc[i, "p_answer"], float(letters.softmax(-1)[it.choice_tokens.index(it.answer_tokens[0])]),
                          atol=1e-5)


def test_a_generation_is_judged_by_its_last_number(tiny):
    suite = load_benchmark(DATA / "gsm8k_style.jsonl", tiny.tokenizer, shots=0)
    scorer = BenchmarkScorer(tiny, suite, "generate")
    item = next(it for it in suite.items if it.answer == "1234")
    end = torch.zeros(len(tiny.tokenizer))
    tokens = lambda text: tiny.tokenizer(text)["input_ids"]
    row = scorer._judge_generation(item, end, tokens("1,234 books\n"))
    assert row["correct"] and row["prediction"] == "1234" and row["generated"] == "1,234 books"
    assert row["first_correct"] and not row["hit_budget"]
    row = scorer._judge_generation(item, end, tokens("about 12"))
    assert not row["correct"] and not row["first_correct"] and row["hit_budget"]


def test_scoring_must_fit_the_suite(tiny):
    numeric = load_benchmark(DATA / "svamp_style.json", tiny.tokenizer, shots=0)
    with pytest.raises(ValueError, match="scoring 'choice' does not fit"):
        BenchmarkScorer(tiny, numeric, "choice")
    mc = load_benchmark(DATA / "mmlu_style.csv", tiny.tokenizer, shots=0)
    with pytest.raises(ValueError, match="scoring 'generate' does not fit"):
        BenchmarkScorer(tiny, mc, "generate")


def test_benchmarks_feed_knockout_transfer_and_finetuning(tiny):
    mc = load_benchmark(DATA / "mmlu_style.csv", tiny.tokenizer, shots=1)
    math = load_benchmark(DATA / "generic.jsonl", tiny.tokenizer, shots=1)
    means = torch.zeros(tiny.n_layers, tiny.n_heads, tiny.cfg.d_head)
    scores = transfer.knockout_transfer(tiny, {"mmlu": mc}, [Head(1, 0)], means, n_seeds=1, margin=None)
    assert set(scores.condition) == {"none", "key", "random"}
    assert set(transfer.usability(mc, scores[scores.condition == "none"]).chance) == {0.25}
    gen = transfer.knockout_transfer(tiny, {"generic": math}, [Head(1, 0)], means, n_seeds=1, margin=None,
                                     scorer=lambda m, s: BenchmarkScorer(m, s, "generate", max_new_tokens=3))
    assert (gen["mode"] == "generate").all() and len(gen) == 3 * len(math)
    batches = evaluation.make_batches(math, batch_size=4, n_batches=6, seed=0)
    for tokens, answers in batches:
        rows = [it for it in math.items if any(list(it.clean_tokens) == t for t in tokens.tolist())]
        assert len(rows) == len(tokens) and answers.tolist() == [it.answer_tokens[0] for it in rows]
    table = evaluate_benchmarks(tiny, None, [mc, math], mode=None)
    assert list(table.columns[:5]) == ["set", "kind", "item", "correct", "p_answer"]
    assert table.groupby("set")["mode"].first().to_dict() == {"generic": "generate", "mmlu_style": "choice"}


# --- command line ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    ([str(DATA / "malformed" / "no_match.jsonl")], "no known benchmark format"),
    ([str(DATA / "malformed" / "bad_json.jsonl")], "row 2: not a valid JSON line"),
    ([str(DATA / "malformed" / "empty.jsonl")], "empty file"),
    ([str(DATA / "svamp_style.json"), "--model", "tiny", "--scoring", "choice"], "scoring 'choice' does not fit"),
    ([str(DATA / "svamp_style.json"), "--model", "tiny", "--shots", "9"], "9 shots need more than"),
    ([str(DATA / "svamp_style.json"), "--model", "gpt-17"], "unknown model spec"),
    ([str(DATA / "mmlu_style.csv"), "--model", "tiny", "--scoring", "cot"], "scoring 'cot' needs numeric answers"),
    (["gsm9k"], "no such file"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(["benchmark", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("arithlens: error:") and message in err and "\n" not in err


def test_cli_reports_format_counts_and_scores(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ARITHLENS_QUIET", "1")
    assert main(["benchmark", str(DATA / "gsm8k_style.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "format: gsm8k" in out and "6 rows, 5 items, 1 skipped (non-numeric answer: 1, first at row 6)" in out
    table = tmp_path / "items.csv"
    assert main(["benchmark", str(DATA / "mmlu_style.csv"), "--model", "tiny", "--shots", "1", "--out", str(table)]) == 0
    out = capsys.readouterr().out
    assert "suite: 3 items, 1-shot" in out and "scoring: choice" in out and "items/s" in out
    assert len(table.read_text().splitlines()) == 4
    assert main(["benchmark", "svamp"]) == 0  # a shipped benchmark by name
    out = capsys.readouterr().out
    assert "shipped benchmark: SVAMP (arkilpatel/SVAMP" in out and "MIT" in out and "1000 rows, 1000 items" in out
    assert main(["benchmark", str(DATA / "gsm8k_style.jsonl"), "--model", "tiny", "--scoring", "cot", "--shots", "2",
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "2-shot worked solutions" in out and "chain of thought, at most 3 new tokens" in out and "ran out of the budget" in out


@pytest.mark.real_model
def test_real_tokenizer_answers_and_generation(smollm2):
    tok = smollm2.tokenizer
    suite = load_benchmark(DATA / "gsm8k_style.jsonl", tok, shots=1)
    for it in suite.items:
        first = tok.decode([it.answer_tokens[0]])
        assert first == (" -" if it.answer.startswith(" -") else it.answer[0])  # a digit, not a bare space
        assert tok.decode(list(it.clean_tokens) + list(it.answer_tokens)) == it.clean + it.answer
    mc = load_benchmark(DATA / "mmlu_style.csv", tok, shots=1)
    assert [tok.decode([t]) for t in mc.items[0].choice_tokens] == [" A", " B", " C", " D"]
    scorer = BenchmarkScorer(smollm2, suite, "generate", max_new_tokens=6, batch_size=4)
    _, new = scorer.generate(scorer.batches[0])
    hf = smollm2.bridge.original_model
    for j, i in enumerate(scorer.batches[0].index):
        ids = torch.tensor([suite.items[i].clean_tokens])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        stop = next((k for k, t in enumerate(out) if scorer._is_stop(t)), len(out) - 1)
        assert new[j] == out[: stop + 1]


# --- chain of thought and the shipped benchmarks -----------------------------------------------------

def test_a_worked_solution_drops_calculator_notes_and_ends_with_its_answer():
    solution, value = cot.worked_solution("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                                          "She sold 48+24 = <<48+24=72>>72 clips.\n#### 1,072")
    assert solution == "Natalia sold 48/2 = 24 clips in May. She sold 48+24 = 72 clips. The answer is 1072."
    assert value == "1072"
    prefix = cot.worked_prefix([{"question": "How  many?\n", "answer": "2+2=<<2+2=4>>4\n#### 4"}] * 2, 2)
    assert prefix == "Question: How many?\nAnswer: 2+2=4 The answer is 4.\n\n" * 2
    with pytest.raises(ValueError, match="no '#### N' line"):
        cot.worked_solution("just text")
    with pytest.raises(ValueError, match="need 1 <= shots <= 2"):
        cot.worked_prefix([{"question": "q", "answer": "#### 1"}] * 2, 3)


@pytest.mark.parametrize("generated, solution, value", [
    ("She has 3 + 4 = 7 apples. The answer is 7.\n\nQuestion: next", "She has 3 + 4 = 7 apples. The answer is 7.", "7"),
    ("so 12 - 5 = 7, and then the answer is $1,250. Then 3 more", None, "1250"),   # the phrase wins over later numbers
    ("The answer is 4. Wait, the answer is -3.", None, "-3"),                    # the last phrase
    ("2 + 2 = 4\n8 * 2 = 16\nQuestion: what", "2 + 2 = 4\n8 * 2 = 16\n", "16"),  # no phrase: the last number
    ("The answer is unknown", None, None),
])
def test_the_chain_of_thought_rule(generated, solution, value):
    text, found = cot.solution_text(generated)
    assert text == (solution if solution is not None else generated) and found == (solution is not None)
    number = cot.extract_cot_answer(text)
    assert (format_number(number) if number is not None else None) == value


@torch.no_grad()
def test_chain_of_thought_generation_stops_at_a_blank_line_and_equals_a_plain_loop(tiny, monkeypatch):
    suite = load_benchmark(DATA / "gsm8k_style.jsonl", tiny.tokenizer, shots=1)
    scorer = BenchmarkScorer(tiny, suite, "cot", max_new_tokens=6, batch_size=2)
    assert scorer.max_new_tokens == 6 and BenchmarkScorer(tiny, suite, "cot").max_new_tokens == cot.BUDGET
    done = lambda new: new[-1] == tiny.tokenizer.eos_token_id or cot.stopped(tiny.tokenizer.decode(new[-6:]))
    for batch in scorer.batches:
        _, new = scorer.generate(batch)
        for j, i in enumerate(batch.index):
            ref = []
            for t in _greedy_loop(tiny, suite.items[i].clean_tokens, 6, lambda t: False):
                ref.append(t)
                if done(ref):
                    break
            assert new[j] == ref
    frame = scorer.score()
    assert (frame["mode"] == "cot").all() and {"generated", "hit_budget", "n_new_tokens"} <= set(frame.columns)
    item = suite.items[0]
    tokens = lambda text: tiny.tokenizer(text)["input_ids"]
    row = scorer._judge_generation(item, torch.zeros(len(tiny.tokenizer)), tokens(f"x The answer is {item.answer.strip()}.\n\n"))
    assert row["correct"] and not row["hit_budget"] and row["generated"] == f"x The answer is {item.answer.strip()}."


@pytest.mark.parametrize("name", sorted(shipped.SHIPPED))
def test_each_shipped_benchmark_reads_whole_and_builds_its_suite(tiny, name):
    spec = shipped.SHIPPED[name]
    bench = read_benchmark(spec.file(), strict=True)
    assert not bench.skipped and len(bench.records) >= 570
    suite = shipped.load_shipped(name, tiny.tokenizer, n=12, seed=0)
    assert len(suite) == 12 and suite.kind == spec.kind
    prefix = suite.items[0].clean[: suite.items[0].clean.rindex("Question:")]
    assert prefix.count("Question:") == spec.shots and all(it.clean.startswith(prefix) for it in suite.items)
    queries = {it.clean[len(prefix):] for it in suite.items}
    assert not any(q.split("\nAnswer:")[0] in prefix for q in queries)  # no demonstration is queried
    if spec.mode == "cot":
        assert prefix.count("The answer is") == spec.shots and "<<" not in prefix
    BenchmarkScorer(tiny, suite, spec.mode)  # the mode fits the suite
    assert shipped.load_shipped(name, tiny.tokenizer, n=12, seed=0).items == suite.items
    with pytest.raises(ValueError, match="no shipped benchmark 'addsub'"):
        shipped.load_shipped("addsub", tiny.tokenizer)


def test_every_shipped_benchmark_has_its_license_and_source_beside_it():
    folder = shipped.SHIPPED["gsm8k"].file().parent
    sources = (folder / "SOURCES.md").read_text()
    for spec in shipped.SHIPPED.values():
        assert (folder / "licenses" / f"{spec.title}.txt").read_text().startswith("MIT License")
        for path in [spec.file()] + ([spec.demos()] if spec.demos else []):
            assert f"`{path.name}`" in sources
            from arithlens.paths import file_sha256
            assert file_sha256(path) in sources, f"{path.name}: its sha256 in SOURCES.md is not the file's"
    assert set(shipped.shipped_table()["benchmark"]) == {"GSM8K", "SVAMP", "MMLU"}


def test_prefill_chunks_bound_the_padded_tokens():
    assert scoring.prefill_chunks([1, 2, 2, 3, 9, 10], 6) == [(0, 3), (3, 4), (4, 5), (5, 6)]
    assert scoring.prefill_chunks([4, 4, 4, 4], 16) == [(0, 4)]
    assert scoring.prefill_chunks([], 8) == []
    chunks = scoring.prefill_chunks(sorted([3, 50, 7, 7, 12, 40, 41, 2]), 64)
    assert [r for c in chunks for r in range(*c)] == list(range(8))  # every row once, in order


@torch.no_grad()
@pytest.mark.parametrize("name, mode", [("gsm8k_style.jsonl", "cot"), ("mmlu_style.csv", "choice"),
                                        ("svamp_style.json", "first_token")])
def test_the_decoders_batches_score_as_the_hooked_engines_batches(tiny, monkeypatch, name, mode):
    """The shared-prefix decoder's 64-prompt batches, prompts written in chunks, score every item as
    16-prompt batches through HF's cache do (the prefill budget is shrunk so chunks are exercised)."""
    monkeypatch.setattr(scoring, "PREFILL_TOKENS", 24)
    suite = load_benchmark(DATA / name, tiny.tokenizer, shots=2)
    scorer = BenchmarkScorer(tiny, suite, mode, max_new_tokens=6)
    assert len(scorer.batches_for()) < len(scorer.batches) or len(suite) <= scoring.HOOKED_ROWS
    lengths = scorer.batches_for()[0].mask[:, :-1].sum(1).tolist()
    assert len(scoring.prefill_chunks(lengths, 24)) > 1
    ours = scorer.score()
    monkeypatch.setattr(scorer, "_shared_decoder", lambda fwd_hooks: None)
    ref = scorer.score()
    assert ours["prediction"].equals(ref["prediction"]) and ours["correct"].equals(ref["correct"])
    assert np.allclose(ours["score"], ref["score"], atol=1e-4)

"""Checks for exercise 1 — a prompt pair with its counterfactual and asserted token positions.

Compared with :func:`arithlens.tasks.prompts.make_item` on cases the notebook never shows, with two
tokenizers: SmolLM2's (BPE; digits one token each) and the tiny model's character-level one, on
which many word operators cannot be replaced by a null word of the same token length.
"""

from __future__ import annotations

import random
from functools import lru_cache

from arithlens.core import models
from arithlens.tasks import prompts

FUNCTIONS = ("build_pair",)
#: Out of the student's reach while the checks run (:mod:`arithlens.classroom.guard`): what the
#: exercise asks for, and what would do the work instead.
REFERENCES = ("arithlens.tasks.prompts.make_item",
              "arithlens.tasks.prompts.make_prompts",
              "arithlens.tasks.prompts.build_item",
              "arithlens.core.items.align_counterfactual")
KEYS = ("clean", "counterfactual", "clean_tokens", "cf_tokens", "answer_token", "a_pos", "b_pos", "op_pos", "end_pos")


@lru_cache(maxsize=None)
def _tokenizers() -> dict:
    return {"SmolLM2": models.load_model("smollm2-135m").tokenizer, "char-level": models.build_tiny_tokenizer()}


@lru_cache(maxsize=None)
def _cases() -> dict[str, tuple[list, list]]:
    """Per tokenizer: (cases the library builds, with its item), (cases it cannot build)."""
    out = {}
    for name, tok in _tokenizers().items():
        rng = random.Random(f"classroom-01|{name}")
        grid = [(t, o, a, b) for t in prompts.TEMPLATES for o in prompts.OPERATORS for a in range(1, 10)
                for b in range(1, 10) if prompts.OPERATORS[o].apply(a, b) is not None]
        built, dropped = [], []
        for case in rng.sample(grid, len(grid)):
            try:
                built.append((case, prompts.make_item(tok, *case)))
            except ValueError:
                dropped.append(case)
            if len(built) >= 10 and len(dropped) >= 5:
                break
        out[name] = (built[:10], dropped[:5])
    return out


def _show(case) -> str:
    t, o, a, b = case
    return f"{a} {o} {b} in template {t}"


def _call(build_pair, tok, case) -> dict | None:
    pair = build_pair(tok, *case)
    if pair is not None:
        assert isinstance(pair, dict), f"build_pair should return a dict or None, got {type(pair).__name__}"
        missing = [k for k in KEYS if k not in pair]
        assert not missing, f"the dict from build_pair lacks key(s) {missing}"
    return pair


def clean_prompt_and_answer(build_pair) -> str:
    """The clean text, its tokens and the answer token equal the library's on fresh cases."""
    n = 0
    for name, tok in _tokenizers().items():
        for case, item in _cases()[name][0]:
            pair = _call(build_pair, tok, case)
            assert pair is not None, f"returned None for {_show(case)} ({name} tokenizer), which the library builds"
            assert pair["clean"] == item.clean, f"clean text {pair['clean']!r} for {_show(case)}; expected {item.clean!r}"
            assert list(pair["clean_tokens"]) == list(item.clean_tokens), f"clean_tokens differ for {item.clean!r} ({name})"
            assert int(pair["answer_token"]) == item.answer_token, f"wrong answer_token for {item.clean!r} ({name} tokenizer)"
            n += 1
    return f"{n} fresh prompts on two tokenizers match prompts.make_item"


def positions(build_pair) -> str:
    """a_pos, b_pos, op_pos and end_pos equal the library's (found from the tokenizer's offsets)."""
    n = 0
    for name, tok in _tokenizers().items():
        for case, item in _cases()[name][0]:
            pair = _call(build_pair, tok, case)
            assert pair is not None, f"returned None for {_show(case)} ({name} tokenizer), which the library builds"
            for key in ("a_pos", "b_pos", "op_pos", "end_pos"):
                assert int(pair[key]) == getattr(item, key), (
                    f"{key} = {pair[key]} for {item.clean!r} ({name} tokenizer); expected {getattr(item, key)}")
            n += 1
    return f"all four positions right on {n} fresh prompts"


def counterfactual_aligned(build_pair) -> str:
    """The counterfactual puts a null operator in the operator's place and tokenizes in alignment."""
    n = 0
    for name, tok in _tokenizers().items():
        for case, item in _cases()[name][0]:
            pair = _call(build_pair, tok, case)
            assert pair is not None, f"returned None for {_show(case)} ({name} tokenizer), which the library builds"
            tpl, op = prompts.TEMPLATES[case[0]], prompts.OPERATORS[case[1]]
            a, b = case[2], case[3]
            nulls = prompts.NULL_OPERATORS[tpl.form]
            assert any(pair["counterfactual"] == tpl.render(a, null, b) for null in nulls), (
                f"counterfactual {pair['counterfactual']!r} is not {item.clean!r} with the operator replaced by one of {list(nulls)}")
            cf_tokens, clean_tokens = list(pair["cf_tokens"]), list(item.clean_tokens)
            assert cf_tokens == list(tok(pair["counterfactual"])["input_ids"]), f"cf_tokens are not the tokens of {pair['counterfactual']!r}"
            assert len(cf_tokens) == len(clean_tokens), f"{pair['counterfactual']!r} has {len(cf_tokens)} tokens, the clean prompt {len(clean_tokens)}"
            # the operator's characters, and the tokens overlapping them: the only ones allowed to differ
            start = len(tpl.text.split("{op}")[0].format(a=a, b=b))
            end = start + len(op.render(tpl.form))
            offsets = tok(item.clean, return_offsets_mapping=True)["offset_mapping"]
            op_tokens = {i for i, (s, e) in enumerate(offsets) if s < end and e > start}
            bad = [i for i, (x, y) in enumerate(zip(clean_tokens, cf_tokens)) if x != y and i not in op_tokens]
            assert not bad, f"{pair['counterfactual']!r} differs from {item.clean!r} outside the operator (token {bad[0]})"
            n += 1
    return f"{n} counterfactuals aligned token by token with their clean prompts"


def drops_what_cannot_align(build_pair) -> str:
    """Returns None where the answer is not one token or no null operator keeps the tokens aligned."""
    n = 0
    for name, tok in _tokenizers().items():
        for case in _cases()[name][1]:
            pair = _call(build_pair, tok, case)
            assert pair is None, (f"returned a pair for {_show(case)} ({name} tokenizer); the library drops it "
                                  "(multi-token answer, or no aligned counterfactual)")
            n += 1
    return f"None for all {n} cases the library drops"


CHECKS = [clean_prompt_and_answer, positions, counterfactual_aligned, drops_what_cannot_align]

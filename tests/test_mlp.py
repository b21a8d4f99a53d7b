"""MLP tracing: vectorised MLP effects equal a per-layer hooked reference; logit-lens ranks are exact.

Each test runs on every tiny model of a claimed family (Llama, Qwen2, Qwen3, Mistral, Phi-3, Gemma 2,
Gemma 3, OLMo 2) through the ``tiny_layout`` fixture."""

import numpy as np
import pytest
import torch

from arithlens.analyses import end_cache as EC
from arithlens.analyses import mlp
from arithlens.core import hooks
from arithlens.tasks.prompts import PromptConfig, make_prompts


@pytest.fixture(scope="module")
def batch(tiny_layout):
    tiny = tiny_layout
    ps = make_prompts(tiny.tokenizer, PromptConfig(operators=("+",), templates=("eq_spaced",), n_per_cell=5, shots=1))
    return ps, EC.cache_end(tiny, list(ps.items))


def test_mlp_effects_equal_reference(tiny_layout, batch):
    tiny = tiny_layout
    _, cache = batch
    digits = hooks.digit_tokens(tiny.tokenizer)
    fast = mlp.mlp_direct_effects(tiny, cache, digits)
    scale = float(cache.clean_logits.abs().max())
    for layer in range(tiny.n_layers):
        ref = mlp.reference_mlp_effect(tiny, cache, layer, digits)
        for name in ("logit", "logprob", "logit_diff"):
            torch.testing.assert_close(getattr(fast, name)[:, layer], getattr(ref, name), rtol=1e-4, atol=1e-4 * scale)


def test_clean_into_clean_mlp_changes_nothing(tiny_layout, batch):
    import dataclasses

    tiny = tiny_layout
    _, cache = batch
    same = dataclasses.replace(cache, mlp_out_cf=cache.mlp_out.clone())
    digits = hooks.digit_tokens(tiny.tokenizer)
    out = mlp.mlp_direct_effects(tiny, same, digits)
    clean = EC.clean_scores(tiny, same, digits)
    torch.testing.assert_close(out.logit, clean.logit[:, None].expand_as(out.logit), rtol=1e-5, atol=1e-5)


def test_logit_lens_ranks_are_exact(tiny_layout, batch):
    tiny = tiny_layout
    ps, _ = batch
    items = list(ps.items)
    tokens = torch.tensor([it.clean_tokens for it in items])
    with torch.no_grad():
        final = tiny.bridge(tokens)[:, -1].float()
    top = final.argmax(-1).tolist()
    runner_up = final.topk(2).indices[:, 1].tolist()
    lens = mlp.logit_lens(tiny, items, {"top": top, "second": runner_up, "answer": [it.answer_token for it in items]})
    last = lens[lens.layer == tiny.n_layers - 1]
    assert (last[last.label == "top"]["rank"] == 0).all()
    assert (last[last.label == "second"]["rank"] == 1).all()
    np.testing.assert_allclose(last[last.label == "top"]["logit"], final.max(-1).values.numpy(), rtol=1e-5)
    # the answer's rank is the number of tokens with a larger final logit
    ans = torch.tensor([it.answer_token for it in items])
    expected = (final > final.gather(1, ans[:, None])).sum(-1).numpy()
    np.testing.assert_array_equal(last[last.label == "answer"]["rank"].to_numpy(), expected)


def test_unembed_cosines_shape_and_range(tiny_layout, batch):
    tiny = tiny_layout
    ps, cache = batch
    cos = mlp.unembed_cosines(tiny, cache, list(ps.items))
    assert len(cos) == len(ps) * tiny.n_layers
    assert cos[["cos_input_A", "cos_input_B", "cos_update_C"]].abs().le(1 + 1e-6).all().all()


def test_heads_to_mlp_equal_reference(tiny_layout, batch):
    tiny = tiny_layout
    _, cache = batch
    digits = hooks.digit_tokens(tiny.tokenizer)
    senders = [hooks.Head(0, 1), hooks.Head(0, 3), hooks.Head(1, 2)]
    fast = mlp.heads_to_mlp_effects(tiny, cache, senders, digits)
    scale = float(cache.clean_logits.abs().max())
    for layer in range(tiny.n_layers):
        ref = mlp.reference_heads_to_mlp(tiny, cache, senders, layer, digits)
        for name in ("logit", "logprob", "logit_diff"):
            torch.testing.assert_close(getattr(fast, name)[:, layer], getattr(ref, name), rtol=1e-4, atol=1e-4 * scale)


def test_detect_layers_rule():
    import pandas as pd

    profile = pd.DataFrame({"operands": [0.0, 0.01, 0.0, 0.05, 0.2, 0.3, 0.1, 0.0],
                            "answer": [0, 0, 0, 0, 0.1, 0.2, 0.4, 0.3]})
    assert mlp.detect_layers(profile) == {"start": 4, "inflection": 5, "end": 6}
    early_bump = pd.DataFrame({"operands": [0.2, 0.0, -0.1, 0.1, 0.3, 0.2], "answer": [0, 0, 0, 0, 0.1, 0.3]})
    assert mlp.detect_layers(early_bump) == {"start": 3, "inflection": 4, "end": 5}


def test_joint_effect_of_one_head_is_its_patching_effect_and_direct_effects_add(tiny):
    """One head patched alone by joint_head_effect is the reference patching of that head (direct and path);
    in the direct convention (final-norm scale frozen) the answer logit's change of a set is the sum of
    its heads' changes — and in the path convention it is not (the MLPs are recomputed)."""
    from arithlens.analyses import mlp as M
    from arithlens.analyses import patching as P
    from arithlens.analyses.end_cache import cache_prompt_set
    from arithlens.core.hooks import Head, digit_tokens

    ps = make_prompts(tiny.tokenizer, PromptConfig(operators=("+", "*"), templates=("eq_spaced",), n_per_cell=4, shots=1))
    cache = cache_prompt_set(tiny, ps)[0]
    digits = digit_tokens(tiny.tokenizer)
    for mode in ("direct", "path"):
        one = M.joint_head_effect(tiny, cache, [Head(0, 1)], mode, digits)
        ref = P.reference_effect(tiny, cache, Head(0, 1), mode, digits, with_prob=False)
        torch.testing.assert_close(one.logit, ref.logit, rtol=1e-4, atol=1e-4)
    heads = [Head(0, 1), Head(1, 2)]
    clean = cache.clean_logits.gather(1, cache.answers[:, None])[:, 0]
    change = lambda hs, mode: M.joint_head_effect(tiny, cache, hs, mode, digits).logit - clean
    both = change(heads, "direct")
    torch.testing.assert_close(both, change(heads[:1], "direct") + change(heads[1:], "direct"), rtol=1e-3, atol=1e-4)
    assert not torch.allclose(change(heads, "path"), change(heads[:1], "path") + change(heads[1:], "path"), atol=1e-6)
    table = M.joint_effects(tiny, [cache], heads)
    assert set(table["mode"]) == {"direct", "path"} and len(table) == 2 * len(cache.answers)

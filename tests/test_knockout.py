import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from arithlens.analyses import knockout as K
from arithlens.core import conditions as C
from arithlens.core import hooks as H
from arithlens.core.hooks import Head, end_only_logits, prefix_kv, random_heads
from arithlens.tasks.prompts import PromptConfig, make_prompts


@pytest.fixture(scope="module")
def prompt_set(tiny):
    return make_prompts(tiny.tokenizer, PromptConfig(operators=("+", "*"), templates=("eq_spaced", "st_is"), n_per_cell=4))


def test_end_only_knockout_equals_full_forward(tiny, prompt_set):
    means = K.mean_z(tiny, prompt_set, "end")
    heads = [Head(0, 1), Head(1, 3)]
    end = K.KnockoutEvaluator(tiny, prompt_set, means, "end")
    hooks = K.ablation_hooks(heads, means, "end")
    for b, tokens, answers in end.batches:
        fast = end_only_logits(tiny, tokens, hooks, prefix_kv(tiny, tokens[:, :-1]))
        full = tiny.bridge.run_with_hooks(tokens, fwd_hooks=hooks)[:, -1].float()
        torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    # ablating nothing reproduces the model's own predictions: relabel every other item with the token a
    # plain forward pass predicts at END, so the expected correctness is mixed (True where relabelled)
    own = [int(tiny.bridge(torch.tensor([it.clean_tokens]))[0, -1].argmax()) for it in prompt_set.items]
    relabelled = [dataclasses.replace(it, answer_token=p) if i % 2 == 0 else it
                  for i, (it, p) in enumerate(zip(prompt_set.items, own))]
    expected = np.array([it.answer_token == p for it, p in zip(relabelled, own)])
    assert expected.any() and not expected.all()
    relabelled_set = dataclasses.replace(prompt_set, items=tuple(relabelled))
    np.testing.assert_array_equal(K.KnockoutEvaluator(tiny, relabelled_set, means, "end").correct([]), expected)


def test_stacked_conditions_equal_one_pass_each(tiny_arch):
    """end_only_many stacks conditions along the batch: per condition, the logits one END-only pass gives,
    for hooks that return a new tensor and for one that edits in place and returns None, across an
    uneven split into passes (3 conditions a pass, then 2); the prefix cache comes back unchanged."""
    ps = make_prompts(tiny_arch.tokenizer, PromptConfig(operators=("+",), templates=("eq_spaced",), n_per_cell=3))
    means = K.mean_z(tiny_arch, ps, "end")
    tokens = torch.tensor([it.clean_tokens for it in ps.items])

    def zero_in_place(z, hook=None):
        z[:, -1, 2] = 0.0

    conditions = [[], K.ablation_hooks([Head(0, 1)], means, "end"), [(H.hook_z(1), zero_in_place)],
                  K.ablation_hooks([Head(0, 1), Head(1, 3)], means, "end"),
                  K.ablation_hooks([Head(1, 0)], means, "end") + [(H.hook_z(0), zero_in_place)]]
    kv = prefix_kv(tiny_arch, tokens[:, :-1])
    length = kv.get_seq_length()
    one_each = [end_only_logits(tiny_arch, tokens, fwd, kv) for fwd in conditions]
    stacked = C.end_only_many(tiny_arch, tokens, conditions, kv, max_rows=3 * tokens.shape[0])
    assert tokens.shape[0] > 1 and kv.get_seq_length() == length and len(stacked) == len(conditions)
    for a, b in zip(stacked, one_each):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(one_each[0], one_each[2])  # the in-place hook did act
    argmax = C.end_only_many(tiny_arch, tokens, conditions, read=lambda logits: logits.argmax(-1))
    assert [t.tolist() for t in argmax] == [t.argmax(-1).tolist() for t in one_each]


@pytest.mark.parametrize("positions", ["end", "all"])
def test_many_conditions_run_batch_major_with_one_prefix_per_batch(tiny, prompt_set, monkeypatch, positions):
    """correct_many gives, set by set, what one full hooked pass per set gives, and makes each batch's
    prefix KV cache once for all sets (at END), never once per set, and none when every position is ablated."""
    means = K.mean_z(tiny, prompt_set, positions)
    head_sets = [[], [Head(0, 1)], [Head(0, 1), Head(1, 3)], [Head(1, 0), Head(1, 2), Head(0, 3)]]
    predicted = [np.array([int(tiny.bridge.run_with_hooks(torch.tensor([it.clean_tokens]),
                                                          fwd_hooks=K.ablation_hooks(heads, means, positions))[0, -1].argmax())
                           for it in prompt_set.items]) for heads in head_sets]
    # relabel every other item with what the last set's pass predicts, so correctness is mixed
    relabelled = dataclasses.replace(prompt_set, items=tuple(
        dataclasses.replace(it, answer_token=int(predicted[-1][i])) if i % 2 == 0 else it
        for i, it in enumerate(prompt_set.items)))
    answers = np.array([it.answer_token for it in relabelled.items])
    ev = K.KnockoutEvaluator(tiny, relabelled, means, positions, batch_size=4)
    calls = []
    real = C.prefix_kv
    monkeypatch.setattr(C, "prefix_kv", lambda model, tokens: calls.append(tokens.shape) or real(model, tokens))
    many = ev.correct_many(head_sets)
    assert many.shape == (len(head_sets), len(prompt_set)) and len(ev.batches) > 1
    assert len(calls) == (len(ev.batches) if positions == "end" else 0)
    for row, pred in zip(many, predicted):
        np.testing.assert_array_equal(row, pred == answers)
    assert many[-1].any() and not many[-1].all()
    monkeypatch.undo()
    np.testing.assert_array_equal(ev.correct(head_sets[2]), many[2])


def test_every_position_sets_run_from_their_lowest_layer(tiny_layout):
    """Where the twin's layer loop is checked, every-position knockout runs each set from its lowest
    ablated layer on one clean pass per batch: the logits one full hooked pass per set gives (to float
    rounding), on every family, with the layers below a set run once per batch, not once per set.
    Elsewhere (Gemma 2 and 3) each set stays one full hooked pass."""
    from arithlens.core import layout
    from arithlens.core.twin import LAYER_LOOP_CHECKED, make_twin

    ps = make_prompts(tiny_layout.tokenizer, PromptConfig(operators=("+",), templates=("eq_spaced", "st_is"), n_per_cell=3))
    means = K.mean_z(tiny_layout, ps, "all")
    ev = K.KnockoutEvaluator(tiny_layout, ps, means, "all")
    assert ev.from_lowest == (layout.architecture(tiny_layout) in LAYER_LOOP_CHECKED)
    if not ev.from_lowest:
        return
    head_sets = [[], [Head(1, 0)], [Head(1, 2), Head(1, 3)], [Head(0, 1), Head(1, 3)]]
    twin = make_twin(tiny_layout)
    runs = {0: 0, 1: 0}
    for i in runs:
        twin.model.layers[i].register_forward_hook(lambda *a, i=i: runs.__setitem__(i, runs[i] + 1))
    for _, tokens, _ in ev.batches:
        before = dict(runs)
        fast = K.every_position_logits(twin, tokens, head_sets, means)
        assert runs[0] - before[0] == 2 and runs[1] - before[1] == 4  # clean pass + the set from layer 0; + three sets
        for heads, logits in zip(head_sets, fast):
            full = tiny_layout.bridge.run_with_hooks(tokens, fwd_hooks=K.ablation_hooks(heads, means, "all"))[:, -1].float()
            torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(fast[0], fast[1])  # the ablation did act


def test_mean_z_is_the_counterfactual_mean(tiny, prompt_set):
    means = K.mean_z(tiny, prompt_set, "end")
    assert means.shape == (tiny.n_layers, tiny.n_heads, tiny.cfg.d_head)
    item = prompt_set.items[0]
    _, cache = tiny.bridge.run_with_cache(torch.tensor([item.cf_tokens]))
    assert not torch.allclose(means[0], cache["blocks.0.attn.hook_z"][0, -1])  # a mean, not one prompt


@pytest.mark.parametrize("positions", ["end", "all"])
def test_mean_z_stops_after_the_last_layer_and_leaves_no_hook(tiny_arch, positions):
    """The early-stopped pass gives the mean of a full cached pass, and the model runs plainly afterwards."""
    ps = make_prompts(tiny_arch.tokenizer, PromptConfig(operators=("+", "-"), templates=("eq_spaced", "st_is"), n_per_cell=3))
    names = [f"blocks.{l}.attn.hook_z" for l in range(tiny_arch.n_layers)]
    total, count = 0, 0
    for it in ps.items:
        _, cache = tiny_arch.bridge.run_with_cache(torch.tensor([it.cf_tokens]), names_filter=lambda n: n in names)
        z = torch.stack([cache[n][0] for n in names]).float()  # [layer, pos, head, d_head]
        z = z[:, -1:] if positions == "end" else z
        total, count = total + z.sum(1), count + z.shape[1]
    torch.testing.assert_close(K.mean_z(tiny_arch, ps, positions, batch_size=4), total / count, rtol=1e-5, atol=1e-6)
    tokens = torch.tensor([ps.items[0].clean_tokens])
    plain = tiny_arch.bridge(tokens)
    assert plain.shape[-1] == tiny_arch.cfg.d_vocab and torch.equal(plain, tiny_arch.bridge(tokens))


def test_knockout_curve_shape_and_errors(tiny, prompt_set):
    ev = K.KnockoutEvaluator(tiny, prompt_set, K.mean_z(tiny, prompt_set, "all"), "all")
    ranking = [Head(l, h) for l in range(2) for h in range(4)]
    curve = K.knockout_curve(ev, ranking, [1, 2], n_seeds=3)
    assert len(curve) == 1 + 2 + 2 * 3 and set(curve["condition"]) == {"none", "top", "random"}
    with pytest.raises(ValueError, match="exceeds"):
        K.knockout_curve(ev, ranking, [9])
    with pytest.raises(ValueError, match="larger than the number of heads"):
        random_heads(2, 4, 9, 0)
    assert random_heads(2, 4, 3, 5) == random_heads(2, 4, 3, 5)


def test_attention_labels(tiny, prompt_set):
    heads = [Head(0, 0), Head(1, 2)]
    att = K.end_attention(tiny, prompt_set, heads)
    assert np.allclose(att[["A", "B", "operator_token", "other"]].sum(axis=1), 1.0)
    # the shares are the END row of the head's attention pattern at the item's asserted positions
    item = prompt_set.items[3]
    _, cache = tiny.bridge.run_with_cache(torch.tensor([item.clean_tokens]))
    pattern = cache["blocks.1.attn.hook_pattern"][0, 2, -1]
    row = att[(att["prompt"] == 3) & (att["layer"] == 1) & (att["head"] == 2)].iloc[0]
    assert row["A"] == pytest.approx(float(pattern[item.a_pos]), abs=1e-6)
    assert row["B"] == pytest.approx(float(pattern[item.b_pos]), abs=1e-6)
    assert row["operator_token"] == pytest.approx(float(pattern[item.op_pos]), abs=1e-6)
    # labels follow the stated rule on the per-head *mean* over prompts
    two = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 0, 2, 2], "A": [0.4, 0.0, 0.05, 0.05], "B": [0.0, 0.0, 0.05, 0.05],
                        "operator_token": [0.1, 0.1, 0.5, 0.1], "other": [0.5, 0.9, 0.4, 0.8]})
    labels = K.label_heads(two, min_share=0.2).set_index(["layer", "head"])["role"]
    assert labels[(0, 0)] == "operand"     # mean A + B = 0.2 ≥ 0.2 and > operator 0.1
    assert labels[(1, 2)] == "operator"    # mean operator = 0.3 ≥ 0.2 and > operands 0.1
    assert K.label_heads(two, min_share=0.25).set_index(["layer", "head"])["role"][(0, 0)] == "other"  # 0.2 < 0.25
    tie = pd.DataFrame({"layer": [0], "head": [0], "A": [0.15], "B": [0.15], "operator_token": [0.3], "other": [0.4]})
    assert K.label_heads(tie)["role"].iloc[0] == "other"  # neither side is larger


def test_conditions_on_heads_run_from_their_lowest_layer(tiny_layout):
    """Conditions that hook only heads' outputs run after the prefix from their lowest hooked layer, on the
    twin, where its layer loop is checked: per condition, the logits at every tail position one bridge
    pass gives (to float rounding) — on every family, the tiny Mistral's prompts longer than its
    sliding window — with layer 0 run once per tail rather than once per pass when no condition hooks
    it, and the prefix cache given back unchanged, layer by layer. Elsewhere the bridge runs them."""
    from arithlens.core import conditions as C, layout
    from arithlens.core.twin import LAYER_LOOP_CHECKED, tail_route, twin_of

    ps = make_prompts(tiny_layout.tokenizer, PromptConfig(operators=("+",), templates=("eq_spaced",), n_per_cell=3, shots=2))
    tokens = torch.tensor([it.clean_tokens for it in ps.items])
    means = K.mean_z(tiny_layout, ps, "all")
    conditions = [K.ablation_hooks([Head(1, 0)], means, "all"), [],
                  K.ablation_hooks([Head(1, 2), Head(1, 3)], means, "all"), K.ablation_hooks([Head(1, 1)], means, "end")]
    kv = prefix_kv(tiny_layout, tokens[:, :-3])
    before = [(layer.keys.clone(), layer.values.clone()) for layer in kv.layers]
    checked = layout.architecture(tiny_layout) in LAYER_LOOP_CHECKED
    assert (tail_route(tiny_layout, tokens[:, -3:], conditions, kv) is not None) == checked
    assert tail_route(tiny_layout, tokens[:, -3:], [[(H.resid_post(0), lambda x, hook=None: x)]], kv) is None
    runs = [0]
    if checked:
        twin_of(tiny_layout).model.layers[0].register_forward_hook(lambda *a: runs.__setitem__(0, runs[0] + 1))
    got = {}
    C.after_prefix_many(tiny_layout, tokens[:, -3:], conditions, kv, lambda j, logits: got.setdefault(j, logits.clone()),
                        max_rows=2 * 3 * tokens.shape[0])  # two conditions a pass
    for j, fwd in enumerate(conditions):
        torch.testing.assert_close(got[j], H.run_after_prefix(tiny_layout, tokens[:, -3:], fwd, kv).float(), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[0], got[1])
    assert runs[0] == (1 if checked else 0)  # the clean pass only: both passes start at layer 1
    for layer, (k, v) in zip(kv.layers, before):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)

"""Precise SFT (arithlens.analyses.sft.trainer, arithlens.analyses.sft.evaluation) on the tiny random-init model;
its layer loop on every tiny family, and a fused-projection model (Phi-3)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from arithlens.analyses.sft import trainer as ft
from arithlens.analyses.sft import evaluation as fd
from arithlens.core import deltas, layout
from arithlens.core.models import load_model
from arithlens.core import twin as T
from arithlens.core.twin import make_twin
from arithlens.core.hooks import Head, random_heads

HEADS = (Head(0, 1), Head(1, 3))  # head 3 of 4 reads KV head 1 (2 KV heads)


@pytest.fixture(scope="module")
def batches(tiny):
    gen = torch.Generator().manual_seed(0)
    vocab = tiny.cfg.d_vocab
    return [(torch.randint(4, vocab, (6, 9), generator=gen), torch.randint(4, vocab, (6,), generator=gen))
            for _ in range(3)]


@pytest.fixture(scope="module")
def tiny_phi3():
    """The 2-layer Phi-3: Q, K and V in one ``qkv_proj``, gate and up in one ``gate_up_proj``."""
    return load_model("tiny:phi3")


def _snapshot(model):
    return {n: p.detach().clone() for n, p in deltas.named_weights(model).items()}


def _logits(model, tokens):
    with torch.no_grad():
        return model.bridge(tokens, return_type="logits")[:, -1]


def test_head_slices_follow_gqa(tiny):
    shared = ft.head_slices(tiny.cfg, [Head(1, 3)], kv="shared")
    frozen = ft.head_slices(tiny.cfg, [Head(1, 3)], kv="frozen")
    d = tiny.cfg.d_head
    names = {s.param.rsplit(".", 2)[-2]: s for s in shared}
    assert (names["q_proj"].dim, names["q_proj"].start, names["q_proj"].stop) == (0, 3 * d, 4 * d)
    assert (names["o_proj"].dim, names["o_proj"].start) == (1, 3 * d)
    assert (names["k_proj"].start, names["v_proj"].start) == (d, d)  # KV group 1
    assert {s.param.rsplit(".", 2)[-2] for s in frozen} == {"q_proj", "o_proj"}
    # two query heads of one KV group share one K and one V slice
    assert len(ft.head_slices(tiny.cfg, [Head(0, 0), Head(0, 1)], kv="shared")) == 6
    with pytest.raises(ValueError):
        ft.head_slices(tiny.cfg, [Head(5, 0)])


def test_head_slices_take_a_heads_bias_entries_where_the_model_has_biases(tiny_arch):
    config = ft.PreciseSFTConfig((Head(1, 3),), kv="shared")
    slices = ft.precise_slices(tiny_arch, config)
    biases = {s.param.rsplit(".", 2)[-2]: s for s in slices if s.param.endswith(".bias")}
    has_bias = "model.layers.1.self_attn.q_proj.bias" in deltas.named_weights(tiny_arch)
    assert has_bias == (type(deltas.hf_model(tiny_arch)).__name__ == "Qwen2ForCausalLM")
    if not has_bias:
        assert not biases
        return
    d = tiny_arch.cfg.d_head
    assert (biases["q_proj"].start, biases["q_proj"].stop) == (3 * d, 4 * d)
    assert (biases["k_proj"].start, biases["v_proj"].start) == (d, d)  # KV group 1, as the weights
    frozen = ft.precise_slices(tiny_arch, ft.PreciseSFTConfig((Head(1, 3),), kv="frozen"))
    assert {s.param for s in frozen if s.param.endswith(".bias")} == {"model.layers.1.self_attn.q_proj.bias"}


def test_head_slices_of_a_fused_qkv_projection(tiny_phi3):
    """Phi-3's head slices are rows of its one ``qkv_proj`` (Q, then K, then V blocks), and they hold what
    TransformerLens splits out of it as the head's W_Q and its KV group's W_K and W_V."""
    slices = ft.precise_slices(tiny_phi3, ft.PreciseSFTConfig((Head(1, 3),), kv="shared"))
    assert {s.param.rsplit(".", 2)[-2] for s in slices} == {"qkv_proj", "o_proj"}
    weights, bridge, d = deltas.named_weights(tiny_phi3), tiny_phi3.bridge, tiny_phi3.cfg.d_head
    q, k, v = sorted((s for s in slices if "qkv_proj" in s.param), key=lambda s: s.start)
    assert (q.start, k.start, v.start) == (3 * d, 4 * d + d, 4 * d + 2 * d + d)  # head 3; KV group 1 of 2
    for s, split in ((q, bridge.W_Q[1, 3]), (k, bridge.W_K[1, 1]), (v, bridge.W_V[1, 1])):
        torch.testing.assert_close(deltas.slice_view(weights, s), split.T, rtol=0, atol=0)
    frozen = ft.precise_slices(tiny_phi3, ft.PreciseSFTConfig((Head(1, 3),), kv="frozen"))
    assert sorted((s.param.rsplit(".", 2)[-2], s.start) for s in frozen) == [("o_proj", 3 * d), ("qkv_proj", 3 * d)]


def test_the_layer_loop_reproduces_each_checked_family_or_refuses(tiny_layout):
    """Training runs the decoder layers itself (run_layers, end_logits). On each family it is checked for
    its logits equal the bridge's, on a prompt longer than the tiny Mistral's sliding window; the others
    (Gemma 2 and 3) are refused in one line, before anything is built."""
    tokens = torch.tensor([tiny_layout.tokenizer("1 + 8 = 9\n3 + 5 = 8\n5 + 4 = ")["input_ids"]])
    if layout.architecture(tiny_layout) not in T.LAYER_LOOP_CHECKED:
        for train in (lambda: ft.precise_sft(tiny_layout, [(tokens, tokens[:, -1])], ft.PreciseSFTConfig(HEADS)),
                      lambda: ft.lora_sft(tiny_layout, [(tokens, tokens[:, -1])], 2)):
            with pytest.raises(NotImplementedError, match="does not reproduce") as err:
                train()
            assert "\n" not in str(err.value)
        return
    twin = make_twin(tiny_layout)
    with torch.no_grad():
        loop = T.end_logits(twin, T.embed(twin, tokens), 0)
        upper = T.end_logits(twin, T.run_layers(twin, T.embed(twin, tokens), 0, 1), 1)
    torch.testing.assert_close(loop, _logits(tiny_layout, tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(upper, loop, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_name", ["tiny", "tiny_qwen2", "tiny_phi3"])
def test_precise_sft_moves_only_the_tuned_slices(model_name, request, batches):
    tiny = request.getfixturevalue(model_name)
    before = _snapshot(tiny)
    config = ft.PreciseSFTConfig(HEADS, mlp_layers=(1,), kv="shared")
    result = ft.precise_sft(tiny, batches, config, ft.TrainConfig(steps=3, lr=1e-2, weight_decay=0.5))
    assert all(torch.equal(p, before[n]) for n, p in deltas.named_weights(tiny).items()), "training wrote to the model"
    slices = ft.precise_slices(tiny, config)
    assert set(result.delta.values) == set(slices)
    assert result.n_trainable == sum(t.numel() for t in result.delta.values.values())
    with deltas.applied(tiny, result.delta):
        after = _snapshot(tiny)
    for name, value in after.items():
        mask = torch.zeros_like(value, dtype=torch.bool)
        for s in slices:
            if s.param == name:
                mask.narrow(s.dim, s.start, s.stop - s.start).fill_(True)
        assert torch.equal(value[~mask], before[name][~mask]), f"frozen part of {name} moved"
        for s in slices:
            if s.param == name:
                changed = (value.narrow(s.dim, s.start, s.stop - s.start) != before[name].narrow(s.dim, s.start, s.stop - s.start))
                assert changed.float().mean() > 0.9, f"tuned slice {s} barely changed"
    assert all(torch.equal(p, before[n]) for n, p in deltas.named_weights(tiny).items()), "applied() did not restore"
    assert result.losses[-1] < result.losses[0]


@pytest.mark.parametrize("model_name, kv", [("tiny", "frozen"), ("tiny_qwen2", "shared"),  # Qwen2: bias slices too
                                           ("tiny_phi3", "shared")])  # Phi-3: the bridge reads the fused rows written
def test_delta_roundtrip_reproduces_logits_exactly(model_name, kv, request, batches, tmp_path):
    tiny = request.getfixturevalue(model_name)
    result = ft.precise_sft(tiny, batches, ft.PreciseSFTConfig(HEADS, kv=kv), ft.TrainConfig(steps=2, lr=1e-2))
    tokens = batches[0][0]
    base = _logits(tiny, tokens)
    with deltas.applied(tiny, result.delta):
        tuned = _logits(tiny, tokens)
    folder = deltas.save_delta(result.delta, tmp_path / "delta", base_model="tiny")
    loaded = deltas.load_delta(folder)
    assert loaded.meta["method"] == "precise" and loaded.n_params == result.delta.n_params
    with deltas.applied(tiny, loaded):
        again = _logits(tiny, tokens)
    assert not torch.equal(tuned, base)
    assert torch.equal(again, tuned)
    assert torch.equal(_logits(tiny, tokens), base)
    # a delta refuses a base whose touched slices differ from the one it was trained on
    with deltas.applied(tiny, loaded):
        with pytest.raises(ValueError, match="different base"):
            deltas.apply_delta(tiny, loaded)


def test_prefix_cached_step_equals_uncached(tiny, batches):
    slices = ft.precise_slices(tiny, ft.PreciseSFTConfig((Head(1, 0), Head(1, 2))))
    twin = make_twin(tiny)
    weights = deltas.named_weights(twin)
    start = 1
    grads = []
    for cached in (False, True):
        trainable = {s: deltas.slice_view(weights, s).detach().clone().requires_grad_(True) for s in slices}
        eff = ft.effective_weights(weights, trainable)
        tokens, answers = batches[0]
        prefix = T.run_layers(twin, T.embed(twin, tokens), 0, start).detach() if cached else None
        loss = ft.step_loss(twin, (tokens, answers), start, eff, prefix)
        loss.backward()
        grads.append((loss.detach(), [trainable[s].grad for s in slices]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))
    runs = [ft.train_slices(tiny, slices, batches, ft.TrainConfig(steps=3, lr=1e-2, prefix_cache=c)) for c in (False, True)]
    for s in slices:
        assert torch.allclose(runs[0].delta.values[s], runs[1].delta.values[s], atol=1e-6)


def test_the_prefix_cache_is_shared_between_rows_and_made_anew_when_a_lower_weight_changes(tiny, batches):
    ft._PREFIXES.clear()
    config = ft.TrainConfig(steps=3, lr=1e-2)
    first = ft.precise_sft(tiny, batches, ft.PreciseSFTConfig((Head(1, 0),)), config)
    assert len(ft._PREFIXES) == 1 and first.prefix_seconds > 0
    again = ft.precise_sft(tiny, batches, ft.PreciseSFTConfig((Head(1, 0),)), config)  # the next seed or draw
    assert len(ft._PREFIXES) == 1
    assert all(torch.equal(again.delta.values[s], v) for s, v in first.delta.values.items())
    ft.lora_sft(tiny, batches, rank=2, train=config, layers=[1])  # LoRA from the same layer reads the same cache
    assert len(ft._PREFIXES) == 1
    below = deltas.Delta({deltas.Slice("model.layers.0.self_attn.o_proj.weight", 0, 0, 4):
                          deltas.slice_view(deltas.named_weights(tiny), deltas.Slice("model.layers.0.self_attn.o_proj.weight", 0, 0, 4)) + 1.0})
    with deltas.applied(tiny, below):  # a weight below the tuned layer written in place: a new cache
        moved = ft.precise_sft(tiny, batches, ft.PreciseSFTConfig((Head(1, 0),)), config)
        plain = ft.precise_sft(tiny, batches, ft.PreciseSFTConfig((Head(1, 0),)), replace(config, prefix_cache=False))
    assert len(ft._PREFIXES) == 2
    assert all(torch.allclose(moved.delta.values[s], v, atol=1e-6) for s, v in plain.delta.values.items())
    assert not all(torch.allclose(moved.delta.values[s], v, atol=1e-6) for s, v in first.delta.values.items())


def test_twin_forward_matches_the_bridge(tiny, batches):
    tokens = batches[0][0]
    with torch.no_grad():
        eager = T.end_logits(make_twin(tiny, "eager"), T.embed(make_twin(tiny, "eager"), tokens), 0)
        twin = make_twin(tiny)
        fused = T.end_logits(twin, T.embed(twin, tokens), 0)
    # The twin and the bridge are two code paths (HF modules vs. TransformerLens' bridge components): the
    # same arithmetic in a different order of float operations, which at torch's default thread count
    # differs in the last bits. Logits here are O(0.1-1) and fp32 rounding is ~1e-7 relative per op over
    # two layers, so 1e-5 is far above rounding yet far below any real difference (a wrong weight moves
    # logits by ~1e-2).
    torch.testing.assert_close(eager, _logits(tiny, tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)  # sdpa vs eager attention: rounding only


def test_rescale_is_nearly_a_noop_under_adamw(tiny, batches):
    config = ft.PreciseSFTConfig((Head(0, 0), Head(0, 1), Head(1, 2)), kv="frozen")
    factors = ft.rescale_factors(tiny.cfg, config, ft.precise_slices(tiny, config))
    assert sorted(set(factors.values())) == [2.0, 4.0]  # 4 heads per layer; 2 tuned in layer 0, 1 in layer 1
    train = ft.TrainConfig(steps=3, lr=1e-3, weight_decay=0.0)
    plain = ft.precise_sft(tiny, batches, config, train).delta
    scaled = ft.precise_sft(tiny, batches, ft.PreciseSFTConfig(config.heads, kv="frozen", rescale=True), train).delta
    base = deltas.named_weights(tiny)
    for s in plain.values:
        update = plain.values[s] - deltas.slice_view(base, s)
        # a 2-4x larger gradient changes AdamW's update only through eps: by well under 5 %
        assert (plain.values[s] - scaled.values[s]).norm() < 0.05 * update.norm()


def test_the_fused_adamw_kernel_gives_the_per_tensor_update(tiny, batches, monkeypatch):
    """Every method trains with AdamW's fused kernel (one pass over each tensor's state): the same update
    as torch's per-tensor loop, up to float rounding."""
    train = ft.TrainConfig(steps=3, lr=1e-3)
    assert ft.fused_adamw([p for p in deltas.named_weights(tiny).values()])
    assert not ft.fused_adamw([]) and not ft.fused_adamw([torch.zeros(2, dtype=torch.long)])
    fused = ft.full_sft(tiny, batches, train).delta
    monkeypatch.setattr(ft, "fused_adamw", lambda params: False)
    loop = ft.full_sft(tiny, batches, train).delta
    base = deltas.named_weights(tiny)
    for s in fused.values:
        update = loop.values[s] - deltas.slice_view(base, s)
        assert update.norm() > 0
        torch.testing.assert_close(fused.values[s], loop.values[s], rtol=1e-5, atol=1e-6)


def test_full_sft_and_lora(tiny, batches):
    full = ft.full_sft(tiny, batches, ft.TrainConfig(steps=2, lr=1e-3))
    assert full.n_trainable == sum(p.numel() for p in deltas.named_weights(tiny).values())
    rank = 2
    lora = ft.lora_sft(tiny, batches, rank, ft.TrainConfig(steps=2, lr=1e-2))
    assert lora.n_trainable == rank * tiny.n_layers * ((64 + 64) * 2 + (64 + 32) * 2)
    assert ft.lora_rank_for(tiny, lora.n_trainable) == rank
    assert {s.param.rsplit(".", 2)[-2] for s in lora.delta.values} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    tokens = batches[0][0]
    base = _logits(tiny, tokens)
    for delta in (full.delta, lora.delta):
        with deltas.applied(tiny, delta):
            assert not torch.equal(_logits(tiny, tokens), base)
    assert torch.equal(_logits(tiny, tokens), base)


def test_untrained_losses_are_the_untrained_weights_on_the_last_quarters_batches(tiny, batches):
    """What *trained* is read against (chapter 4, C6): the untrained weights' loss on the batches of the last
    quarter of steps — the steps' own losses when nothing moves (lr 0), above them once training helps — for
    every way of training (slices from a layer with its prefix cached, the whole model, LoRA)."""
    steps = 8  # cycling over the 3 batches: the last quarter is steps 6 and 7, batches 0 and 1
    assert list(ft.last_quarter(steps)) == [6, 7] and list(ft.last_quarter(3)) == [2]
    still = ft.TrainConfig(steps=steps, lr=0.0, weight_decay=0.0)
    for run in (lambda c: ft.precise_sft(tiny, batches, ft.PreciseSFTConfig(HEADS), c),
                lambda c: ft.full_sft(tiny, batches, c), lambda c: ft.lora_sft(tiny, batches, 2, c)):
        frozen = run(still)
        assert len(frozen.untrained_losses) == 2
        torch.testing.assert_close(torch.tensor(frozen.untrained_losses), torch.tensor(frozen.losses[6:]),
                                   rtol=1e-5, atol=1e-6)
        assert frozen.untrained_losses[0] == pytest.approx(frozen.losses[0], rel=1e-5)  # step 6 is batch 0 again
        trained = run(ft.TrainConfig(steps=steps, lr=1e-2))
        assert trained.untrained_losses == pytest.approx(frozen.untrained_losses, rel=1e-6)
        assert sum(trained.losses[6:]) < sum(trained.untrained_losses)


def test_a_run_trained_on_to_more_steps_passes_through_the_shorter_run_exactly(tiny, batches):
    """Chapter 4's convergence check trains each family's chosen run on to twice the steps: the delta it
    returns at ``steps`` is the shorter run's, and its ``longer`` delta is a run that long (every way of
    training; the same code path, so equal bit for bit at any thread count)."""
    steps, cfg = 3, ft.TrainConfig(steps=3, lr=1e-2)
    runs = (lambda c, **k: ft.precise_sft(tiny, batches, ft.PreciseSFTConfig(HEADS), c, **k),
            lambda c, **k: ft.full_sft(tiny, batches, c, **k), lambda c, **k: ft.lora_sft(tiny, batches, 2, c, **k))
    for run in runs:
        short, both, long = run(cfg), run(cfg, longer=2 * steps), run(replace(cfg, steps=2 * steps))
        assert short.longer is None and both.losses == short.losses and len(both.losses) == steps
        assert both.untrained_losses == short.untrained_losses and both.delta.meta == short.delta.meta
        for a, b in ((both.delta, short.delta), (both.longer, long.delta)):
            assert a.values.keys() == b.values.keys() and all(torch.equal(a.values[k], b.values[k]) for k in a.values)
        assert both.longer.meta == long.delta.meta
        assert not all(torch.equal(both.delta.values[k], both.longer.values[k]) for k in both.delta.values)
    with pytest.raises(ValueError, match="snapshot"):
        ft._optimize(tiny.bridge, [], batches, cfg, 0, 1e-2, "x", longer=2 * steps)


def test_lora_on_a_fused_qkv_projection(tiny_phi3, batches):
    rank = 2
    lora = ft.lora_sft(tiny_phi3, batches, rank, ft.TrainConfig(steps=2, lr=1e-2))
    assert lora.n_trainable == rank * tiny_phi3.n_layers * ((64 + 64 + 2 * 32) + (64 + 64))
    assert ft.lora_rank_for(tiny_phi3, lora.n_trainable) == rank
    assert {s.param.rsplit(".", 2)[-2] for s in lora.delta.values} == {"qkv_proj", "o_proj"}
    tokens = batches[0][0]
    base = _logits(tiny_phi3, tokens)
    with deltas.applied(tiny_phi3, lora.delta):
        assert not torch.equal(_logits(tiny_phi3, tokens), base)
    assert torch.equal(_logits(tiny_phi3, tokens), base)


def test_sft_data_split_and_batches(tiny):
    data = fd.make_sft_data(tiny.tokenizer, operators=("+", "-"), seed=1)
    train_pairs = {(it.operator, it.a, it.b) for it in data.train.items}
    assert not train_pairs & {(it.operator, it.a, it.b) for it in data.evals["held-out pairs"].items}
    assert not {it.template for it in data.train.items} & set(fd.HELDOUT_TEMPLATES)
    assert {it.template for it in data.evals["held-out templates"].items} <= set(fd.HELDOUT_TEMPLATES)
    # three parts of the facts: train, validation (for the learning rates), evaluation (both evaluation sets)
    from arithlens.tasks.facts import fact_half, fact_part
    facts = lambda ps: {(it.operator, it.a, it.b) for it in ps.items}
    evaluated = facts(data.evals["held-out pairs"]) | facts(data.evals["held-out templates"])
    assert len(data.validation) and not facts(data.validation) & (train_pairs | evaluated)
    assert all(fact_part(*f[:1], *f[1:]) == "train" for f in train_pairs)
    assert all(fact_half(op, a, b) == "evaluation" for op, a, b in evaluated)
    assert not {it.template for it in data.validation.items} & set(fd.HELDOUT_TEMPLATES)
    batches = fd.make_batches(data.train, batch_size=16, n_batches=200, seed=0)
    epoch, count = [], 0
    for tokens, answers in batches:
        assert tokens.shape[0] == answers.shape[0] <= 16
        epoch += [tuple(t) for t in tokens.tolist()]
        count += len(answers)
        if count >= len(data.train):
            break
    assert count == len(data.train)  # an epoch uses every item exactly once
    assert sorted(epoch) == sorted(it.clean_tokens for it in data.train.items)


def test_compare_to_base_paired_changes():
    rows = []
    for method, correct in (("base", [0, 0, 1, 1]), ("tuned", [1, 1, 1, 1])):
        for seed in ((0,) if method == "base" else (0, 1)):
            rows += [{"method": method, "seed": seed, "kind": "math", "set": "s", "item": i, "correct": bool(c),
                      "p_answer": 0.5} for i, c in enumerate(correct)]
    scores = pd.DataFrame(rows)
    table = fd.compare_to_base(scores, n_boot=200).set_index("method")
    assert table.loc["base", "change"] == 0 and table.loc["tuned", "change"] == 0.5
    assert table.loc["tuned", "seeds"] == 2 and table.loc["tuned", "accuracy"] == 1.0
    summary = fd.math_vs_control(scores, n_boot=200).set_index("method")
    assert np.isclose(summary.loc["tuned", "change"], 0.5) and summary.loc["tuned", "low"] <= 0.5 <= summary.loc["tuned", "high"]


def test_format_split_separates_answering_with_a_digit_from_computing(tiny):
    rows = []
    for method, digits, right in (("base", [1, 1, 0, 0], [1, 0, 0, 0]), ("tuned", [1, 1, 1, 1], [1, 0, 1, 0])):
        rows += [{"method": method, "seed": 0, "kind": "math", "set": "s", "item": i, "digit": bool(d), "correct": bool(c)}
                 for i, (d, c) in enumerate(zip(digits, right))]
    rows += [{"method": m, "seed": 0, "kind": "math", "set": "power", "item": 0, "digit": None, "correct": True}
             for m in ("base", "tuned")]  # a transfer suite records no digit: left out
    split = fd.format_split(pd.DataFrame(rows)).set_index("method")
    assert split.loc["tuned", "digit share change"] == 0.5  # answers with a digit twice as often
    assert split.loc["base", "accuracy among digits"] == 0.5 and split.loc["tuned", "accuracy among digits change"] == 0.0
    data = fd.make_sft_data(tiny.tokenizer, operators=("+",), seed=1, eval_shots=(0, 2))
    assert data.kind("held-out pairs (2-shot)") == "math (2-shot)" and data.kind("held-out pairs") == "math"
    assert all(it.clean.count("\n") == 2 for it in data.evals["held-out pairs (2-shot)"].items)


def test_the_shot_sets_ask_the_same_questions_after_demonstrations_fixed_per_cell_from_facts_never_asked(tiny):
    """Each question of a k-shot set is the 0-shot set's question, in order, after k demonstrations that every
    question of its template and operator shares, all of them facts of the localization half: none is a
    question asked in evaluation or gives its answer away."""
    from arithlens.tasks.facts import fact_half
    from arithlens.tasks.prompts import PromptConfig, make_prompts

    data = fd.make_sft_data(tiny.tokenizer, operators=("+", "*"), seed=1, max_eval_per_set=40, eval_shots=(0, 2))
    every = make_prompts(tiny.tokenizer, PromptConfig(operators=("+", "*"), n_per_cell=10_000, seed=1)).items
    localization = {it.clean + f"{it.answer}" for it in every if fact_half(it.operator, it.a, it.b) == "localization"}
    for name in ("held-out pairs", "held-out templates"):
        zero, shot = data.evals[name].items, data.evals[f"{name} (2-shot)"].items
        assert [(it.template, it.operator, it.a, it.b) for it in shot] == [(it.template, it.operator, it.a, it.b) for it in zero]
        prefixes = {}
        for question, asked in zip(zero, shot):
            assert asked.clean.endswith(question.clean) and asked.answer_token == question.answer_token
            prefix = asked.clean[: -len(question.clean)]
            assert prefixes.setdefault((asked.template, asked.operator), prefix) == prefix  # one prefix per cell
            assert len(prefix.splitlines()) == 2 and set(prefix.splitlines()) <= localization
        assert len(prefixes) > 1 and len(set(prefixes.values())) == len(prefixes)  # each cell its own demonstrations
    # trained with demonstrations of its own (shots=1): the 2-shot copies still carry two lines before the question
    trained_with_one = fd.make_sft_data(tiny.tokenizer, operators=("+",), seed=1, shots=1, max_eval_per_set=20, eval_shots=(0, 2))
    for zero, asked in zip(trained_with_one.evals["held-out pairs (0-shot)"].items, trained_with_one.evals["held-out pairs (2-shot)"].items):
        assert zero.clean.count("\n") == 0 and asked.clean.count("\n") == 2 and asked.clean.endswith(zero.clean)


def test_math_vs_control_resamples_seeds_with_items():
    """Two methods with the same mean change on the same items: one whose seeds agree, one whose seeds
    disagree. Resampling seeds and items together gives the second a wider interval; per_seed_changes
    gives each seed's own change."""
    n, rows = 40, []
    rows += [{"method": "base", "seed": 0, "kind": "math", "set": "s", "item": i, "correct": i % 2 == 0} for i in range(n)]
    for seed in range(4):
        rows += [{"method": "steady", "seed": seed, "kind": "math", "set": "s", "item": i, "correct": i % 4 != 3}
                 for i in range(n)]  # every seed: 75 %
        rows += [{"method": "erratic", "seed": seed, "kind": "math", "set": "s", "item": i,
                  "correct": (i % 2 == 0) or seed % 2 == 0} for i in range(n)]  # seeds alternate 100 % / 50 %
    scores = pd.DataFrame(rows).assign(p_answer=0.5)
    summary = fd.math_vs_control(scores, n_boot=400).set_index("method")
    width = summary["high"] - summary["low"]
    assert np.isclose(summary.loc["steady", "change"], 0.25) and np.isclose(summary.loc["erratic", "change"], 0.25)
    assert width["erratic"] > width["steady"] + 0.05 and summary.loc["erratic", "seeds"] == 4
    per_seed = fd.per_seed_changes(scores).set_index(["method", "seed"])["math change"]
    assert per_seed.loc[("erratic", 0)] == 0.5 and per_seed.loc[("erratic", 1)] == 0.0 and per_seed.loc[("steady", 2)] == 0.25


def test_random_heads_are_seeded_and_avoid_the_key_heads(tiny):
    drawn = random_heads(tiny.n_layers, tiny.n_heads, 3, seed=1, min_layer=1, exclude=[Head(1, 0)])
    assert drawn == random_heads(tiny.n_layers, tiny.n_heads, 3, seed=1, min_layer=1, exclude=[Head(1, 0)])
    assert all(h.layer >= 1 and h != Head(1, 0) for h in drawn) and len(set(drawn)) == 3
    with pytest.raises(ValueError):
        random_heads(tiny.n_layers, tiny.n_heads, 4, seed=0, min_layer=1, exclude=[Head(1, 0)])


def test_a_family_whose_best_rate_sits_at_an_edge_of_its_grid_tries_rates_beyond_it(tiny):
    from arithlens.analyses.sft import comparison as cmp
    from arithlens.analyses.sft import naming

    ranking = [Head(1, 2), Head(1, 0), Head(0, 3), Head(1, 3), Head(0, 1), Head(0, 0), Head(0, 2), Head(1, 1)]
    config = cmp.GridConfig(key_heads=2, lr_grid=(1e-3, 1e-2), full_lr_grid=(1e-3, 1e-2), lora_lr_grid=(3e-2,),
                            training_seeds=1, random_draws=1)
    tried = cmp.selection_methods(tiny, ranking, config)
    # a made-up validation curve per family: full SFT best ever lower; Precise SFT peaks at its grid's lower end,
    # so one rate below shows the peak is inside; random heads best ever higher; LoRA (one rate in its grid)
    # better one step lower, then worse
    curve = {naming.FULL: lambda lr: -lr, naming.PRECISE: lambda lr: -abs(lr - 1e-3) if lr <= 1e-2 else -1,
             naming.RANDOM: lambda lr: lr, naming.LORA: lambda lr: 1.0 if abs(lr - 3e-2 / cmp.EDGE_STEP) < 1e-12 else 0.5}
    score = lambda ms: pd.DataFrame({"method": [m.name for m in ms], "lr": [m.lr for m in ms],
                                     "accuracy": [curve[naming.method_family(m.name)](m.lr) for m in ms]})
    rounds = []
    while True:
        more = cmp.beyond_edges(tried, score(tried), config)
        if not more:
            break
        rounds.append(sorted((naming.method_family(m.name), round(m.lr, 8)) for m in more))
        tried = tried + more
    step = cmp.EDGE_STEP
    assert rounds[0] == sorted([(naming.FULL, round(1e-3 / step, 8)), (naming.PRECISE, round(1e-3 / step, 8)),
                                (naming.RANDOM, round(1e-2 * step, 8)), (naming.LORA, round(3e-2 / step, 8))])
    lrs = lambda family: sorted(m.lr for m in tried if naming.method_family(m.name) == family)
    assert len(lrs(naming.FULL)) == len(lrs(naming.RANDOM)) == 2 + cmp.EDGE_TRIES  # at most EDGE_TRIES past the grid
    assert lrs(naming.PRECISE) == [1e-3 / step, 1e-3, 1e-2]  # one below: the best is inside what it tried
    assert len(lrs(naming.LORA)) == 3  # 3e-2, then lower (best), then lower still (worse): inside, stop
    assert cmp.at_edge(score(tried)) == {naming.FULL: "low", naming.RANDOM: "high"}
    # the row tried again is the family's own chosen row at the new rate: same heads, same draw
    again = [m for m in tried if naming.method_family(m.name) == naming.RANDOM]
    assert len({m.precise.heads for m in again}) == 1 and len({m.name for m in again}) == 1


def test_method_grid_names_every_row_and_each_name_reads_back_as_its_family(tiny):
    from arithlens.analyses.sft import comparison as cmp
    from arithlens.analyses.sft import naming

    # the full ranking, strongest first: the key heads are the first two, the anti-key heads the last of layer ≥ 1
    ranking = [Head(1, 2), Head(1, 0), Head(0, 3), Head(1, 3), Head(0, 1), Head(0, 0), Head(0, 2), Head(1, 1)]
    config = cmp.GridConfig(key_heads=2, lr_grid=(1e-3, 1e-2), full_lr_grid=(1e-4, 1e-3), lora_lr_grid=(3e-2,),
                            training_seeds=2, random_draws=3, all_layer_draws=1, head_counts=(1, 3), mlp_counts=(1,))
    selection = cmp.selection_methods(tiny, ranking, config)  # full SFT on its own grid
    assert [(naming.method_family(m.name), m.lr) for m in selection] == [
        (naming.FULL, 1e-4), (naming.FULL, 1e-3), (naming.PRECISE, 1e-3), (naming.RANDOM, 1e-3), (naming.PRECISE, 1e-2),
        (naming.RANDOM, 1e-2), (naming.LORA, 3e-2)]
    assert cmp.grid_of(config, naming.FULL) == (1e-4, 1e-3) and cmp.grid_of(config, naming.RANDOM) == (1e-3, 1e-2)
    val = pd.DataFrame({"method": [m.name for m in selection], "lr": [m.lr for m in selection],
                        "accuracy": [0.5, 0.5, 0.6, 0.4, 0.7, 0.4, 0.3]})
    rates = cmp.choose_rates(val)  # best validation accuracy; a tie goes to the smaller rate
    assert rates == {naming.FULL: 1e-4, naming.PRECISE: 1e-2, naming.RANDOM: 1e-3, naming.LORA: 3e-2}
    grid = cmp.method_grid(tiny, ranking, mlp_order=[1, 0], config=config, rates=rates)
    names = [m.name for m in grid.methods]
    r = grid.lora_rank
    assert names == (["full SFT"] * 2 + ["Precise SFT (2 key heads)"] * 2 + ["random 2 heads"] * 3
                     + ["random 2 heads (all layers)"] + [f"LoRA r={r}"] * 2 + ["anti-key 2 heads", "Precise SFT (1 key head)",
                                                                                  "Precise SFT (3 key heads)", "2 key heads + 1 MLP"])
    families = [naming.method_family(n) for n in names]
    assert families[:4] == [naming.FULL] * 2 + [naming.PRECISE] * 2 and families[4:7] == [naming.RANDOM] * 3
    assert families[7] == "random 2 heads (all layers)" and families[10] == naming.ANTI
    assert [m.lr for m in grid.methods] == [1e-4] * 2 + [1e-2] * 2 + [1e-3] * 4 + [3e-2] * 2 + [1e-2] * 4
    assert [m.batch_seed for m in grid.methods[:4]] == [0, 1, 0, 1]  # each training seed its own batch order
    assert grid.precise is grid.methods[2] and grid.precise.precise.heads == (Head(1, 2), Head(1, 0)) and grid.band == 1
    draws = [m for m in grid.methods if naming.method_family(m.name) == naming.RANDOM]
    # layer-matched: both key heads sit in layer 1, so each draw is two other heads of layer 1
    assert [m.seed for m in draws] == [0, 1, 2]
    assert all(len(m.precise.heads) == 2 and {h.layer for h in m.precise.heads} == {1}
               and not set(m.precise.heads) & {Head(1, 2), Head(1, 0)} for m in draws)
    assert grid.methods[10].precise.heads == (Head(1, 3), Head(1, 1))  # anti-key: the last of layer ≥ 1 in the ranking
    assert grid.lora_layers == (1,) and grid.n_precise == ft.count_params(tiny, ft.precise_slices(tiny, grid.precise.precise))
    assert grid.methods[-1].precise.mlp_layers == (1,) and grid.methods[-1].group == "MLP ablation"
    # the deltas kept: the first full SFT row, the main Precise SFT row, the first random draw, the first LoRA row
    kept = cmp.kept_deltas(grid.methods)
    assert list(kept.values()) == ["delta_full", "delta", "delta_random", "delta_lora"]
    # each family's chosen run (its first seed, the first draw): kept, and trained on for the convergence check
    assert list(kept) == cmp.first_rows(grid.methods) == [grid.methods[0], grid.methods[2], draws[0], grid.methods[8]]
    # the draws past the training seeds are scored on the math sets only; every other row on every set
    assert [cmp.scored_kinds(m, config) for m in grid.methods] == [None] * 6 + [("math",)] + [None] * 7
    assert naming.method_family("base") == naming.BASE and naming.lora_name(9) == "LoRA r=9"

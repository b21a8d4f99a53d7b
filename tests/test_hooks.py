"""The ground floor under the analyses: hook names, END-only reruns on a prefix cache that survives a
failing hook, the one random-head draw, and shapes that are checked under pytest."""

import dataclasses

import jaxtyping
import pytest
import torch

from arithlens.core import hooks
from arithlens.core.hooks import Head
from arithlens.core.items import to_tokens
from arithlens.analyses.end_cache import cache_end
from arithlens.tasks.prompts import PromptConfig, make_prompts


@pytest.fixture(scope="module")
def items(tiny):
    ps = make_prompts(tiny.tokenizer, PromptConfig(operators=("+",), templates=("eq_spaced",), n_per_cell=5, shots=1))
    return list(ps.items)


def test_hook_names_are_the_bridges_hook_points(tiny):
    points = set(tiny.bridge.hook_dict)
    for layer in range(tiny.n_layers):
        for build in (hooks.hook_z, hooks.hook_pattern, hooks.hook_attn_out, hooks.resid_mid, hooks.resid_post,
                      hooks.mlp_out, hooks.ln2_in):
            assert build(layer) in points, build(layer)
    assert hooks.FINAL_SCALE in points
    assert hooks.hook_z(3) == "blocks.3.attn.hook_z" and hooks.mlp_out(0) == "blocks.0.hook_mlp_out"


@pytest.mark.parametrize("batch_size", [None, 2])
def test_activations_at_equal_one_pass_per_sequence(tiny, batch_size):
    ps = make_prompts(tiny.tokenizer, PromptConfig(operators=("+", "*"), n_per_cell=2, shots=1))
    seqs = [it.clean_tokens for it in ps.items]  # several token lengths, interleaved
    assert len({len(s) for s in seqs}) > 1
    positions = [it.a_pos for it in ps.items]
    names = [hooks.resid_post(0), hooks.FINAL_SCALE]
    at_end = hooks.activations_at(tiny, seqs, names, batch_size=batch_size)
    at_a = hooks.activations_at(tiny, seqs, names, positions, batch_size)
    for i, (seq, pos) in enumerate(zip(seqs, positions)):
        _, cache = tiny.bridge.run_with_cache(torch.tensor([seq]), names_filter=lambda n: n in names)
        for name in names:
            torch.testing.assert_close(at_end[name][i], cache[name][0, -1].float(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(at_a[name][i], cache[name][0, pos].float(), rtol=1e-5, atol=1e-5)


def test_end_only_rerun_equals_a_full_hooked_forward(tiny, items):
    tokens = to_tokens(items)
    value = torch.randn(len(items), tiny.cfg.d_head, generator=torch.Generator().manual_seed(0))
    fwd = [(hooks.hook_z(1), hooks.set_at_end(value, 2))]
    full = tiny.bridge.run_with_hooks(tokens, fwd_hooks=fwd)[:, -1].float()
    torch.testing.assert_close(hooks.end_only_logits(tiny, tokens, fwd), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hooks.end_only_logits(tiny, tokens, []), tiny.bridge(tokens)[:, -1].float(),
                               rtol=1e-5, atol=1e-5)


def test_a_hook_that_raises_leaves_the_prefix_cache_intact(tiny, items):
    tokens = to_tokens(items)
    kv = hooks.prefix_kv(tiny, tokens[:, :-1])
    length = kv.get_seq_length()
    before = hooks.end_only_logits(tiny, tokens, [], kv)

    def broken(act, hook=None):
        raise RuntimeError("a hook failed")

    for rerun in (lambda: hooks.end_only_logits(tiny, tokens, [(hooks.hook_z(1), broken)], kv),
                  lambda: hooks.run_after_prefix(tiny, tokens[:, -1:], [(hooks.mlp_out(1), broken)], kv)):
        with pytest.raises(RuntimeError, match="a hook failed"):
            rerun()
        assert kv.get_seq_length() == length  # not left holding the failed run's END position
        torch.testing.assert_close(hooks.end_only_logits(tiny, tokens, [], kv), before, rtol=0, atol=0)


def test_kept_crops_back_what_a_block_appended(tiny, items):
    tokens = to_tokens(items)
    kv = hooks.prefix_kv(tiny, tokens[:, :-2])
    length = kv.get_seq_length()
    with pytest.raises(ValueError):
        with hooks.kept(kv):
            tiny.bridge.original_model(tokens[:, -2:], past_key_values=kv, use_cache=True)
            assert kv.get_seq_length() == length + 2
            raise ValueError("leave the block early")
    assert kv.get_seq_length() == length


# The draws of knockout.random_heads(n_layers, n_heads, k, seed) and trainer.random_heads(cfg, k, seed,
# min_layer, exclude=[Head(1, 0), Head(n_layers - 1, n_heads - 1)]) before the two became one
# (captured from commit 9c97174 on these seeds): the shared draw must give the same heads (now
# sorted by (layer, head), as the Precise SFT draw always was; a set of heads ablated has no order).
KNOCKOUT_BEFORE = {
    (2, 4, 3, 0): ["1.2", "1.3", "0.3"], (2, 4, 3, 1003): ["1.3", "1.0", "0.2"],
    (2, 4, 5, 7): ["1.1", "0.1", "0.3", "0.0", "1.0"], (2, 4, 5, 2005): ["1.3", "0.0", "1.2", "0.3", "0.1"],
    (30, 9, 3, 1): ["7.5", "3.5", "14.4"], (30, 9, 5, 1003): ["28.2", "20.4", "12.5", "26.3", "25.3"],
}
FINETUNE_BEFORE = {
    (2, 4, 1, 0, 1): ["1.2"], (2, 4, 3, 42, 0): ["0.0", "1.1", "1.2"], (30, 9, 1, 1, 1): ["8.6"],
    (30, 9, 3, 0, 0): ["2.3", "22.0", "24.0"], (30, 9, 3, 42, 1): ["2.4", "7.4", "16.6"],
}


def test_one_random_head_draw_gives_each_caller_its_old_heads():
    by_position = lambda names: sorted(names, key=lambda n: tuple(map(int, n.split("."))))
    for (n_layers, n_heads, k, seed), want in KNOCKOUT_BEFORE.items():
        assert [str(h) for h in hooks.random_heads(n_layers, n_heads, k, seed)] == by_position(want)
    for (n_layers, n_heads, k, seed, min_layer), want in FINETUNE_BEFORE.items():
        exclude = [Head(1, 0), Head(n_layers - 1, n_heads - 1)]
        assert [str(h) for h in hooks.random_heads(n_layers, n_heads, k, seed, min_layer, exclude)] == want
    # the random-head controls of the knockout curve and the transfer ablation: seed s · 1000 + k
    assert hooks.control_heads(2, 4, 3, 1) == hooks.random_heads(2, 4, 3, 1003)
    assert [str(h) for h in hooks.control_heads(2, 4, 5, 2)] == by_position(KNOCKOUT_BEFORE[2, 4, 5, 2005])
    with pytest.raises(ValueError, match="larger than the number of heads"):
        hooks.random_heads(2, 4, 3, 0, min_layer=1, exclude=[Head(1, 0), Head(1, 3)])


def test_a_wrong_shape_raises_under_pytest(tiny, items):
    cache = cache_end(tiny, items)
    with pytest.raises(jaxtyping.TypeCheckError):  # one answer short: "batch" disagrees between fields
        dataclasses.replace(cache, answers=cache.answers[:-1])
    with pytest.raises(jaxtyping.TypeCheckError):  # nine digit columns where the scores need ten
        hooks.scores_from_columns(torch.zeros(3), torch.zeros(3, 9), torch.zeros(3, 9, dtype=torch.bool), None)
    with pytest.raises(jaxtyping.TypeCheckError):  # float tokens where token ids are integers
        hooks.prefix_kv(tiny, to_tokens(items).float())
    with pytest.raises(jaxtyping.TypeCheckError):  # not a loaded model
        hooks.prefix_kv(tiny.bridge, to_tokens(items))

"""Fast END-only patching sweeps agree with plain hooked forward passes; invariants hold."""

import dataclasses

import numpy as np
import pytest
import torch

from arithlens.analyses import end_cache as EC
from arithlens.analyses import patching as P
from arithlens.core import hooks, layout
from arithlens.tasks.prompts import PromptConfig, make_prompts


def _batch(model, n=6, shots=1, op="+"):
    ps = make_prompts(model.tokenizer, PromptConfig(operators=(op,), templates=("eq_spaced",), n_per_cell=n, shots=shots))
    return ps, EC.cache_end(model, list(ps.items))


def _assert_agree(fast, ref, scale):
    # tolerance: 1e-4 relative to the scale of the logits (a patched logit or log-probability that is
    # itself near zero cannot be compared relatively; END-only reruns differ from full passes by ~1e-5)
    for name in ("logit", "logprob", "logit_diff", "digit_logprob"):
        a, b = getattr(fast, name), getattr(ref, name)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("mode", P.MODES)
def test_fast_equals_reference_for_every_head_tiny(tiny_layout, mode):
    """Every claimed family (tiny Llama, Qwen2, Qwen3, Mistral, Phi-3, Gemma 2, Gemma 3, OLMo 2): the
    fast sweep equals one hooked pass per head, for every head."""
    tiny = tiny_layout
    assert P.fast_path_supported(tiny)
    _, cache = _batch(tiny)
    digits = hooks.digit_tokens(tiny.tokenizer)
    fast = P.sweep_heads(tiny, cache, mode, digits)
    scale = float(cache.clean_logits.abs().max())
    for layer in range(tiny.n_layers):
        for head in range(tiny.n_heads):
            ref = P.reference_effect(tiny, cache, hooks.Head(layer, head), mode, digits)
            j = layer * tiny.n_heads + head
            _assert_agree(fast.map(lambda t: t[:, j]), ref, scale)


@pytest.mark.parametrize("n", [6, 30])
def test_direct_sweep_equals_reference_both_ways_of_unembedding(tiny, n):
    """With few prompts the direct sweep unembeds each head's change to the residual; with more than
    d_head·d_model / (d_model − d_head) (21 on the tiny Llama) it builds W_O·diag(w)·W_Uᵀ per head
    first. Both equal one hooked pass per head, for every head."""
    _, cache = _batch(tiny, n=n)
    assert P.builds_head_unembedding(len(cache.answers), tiny.cfg.d_head, tiny.cfg.d_model) == (n == 30)
    digits = hooks.digit_tokens(tiny.tokenizer)
    fast = P.sweep_direct(tiny, [cache], digits)[0]
    scale = float(cache.clean_logits.abs().max())
    for j in range(tiny.n_layers * tiny.n_heads):
        ref = P.reference_effect(tiny, cache, hooks.Head(j // tiny.n_heads, j % tiny.n_heads), "direct", digits)
        _assert_agree(fast.map(lambda t: t[:, j]), ref, scale)


def test_patching_clean_into_clean_changes_nothing(tiny_layout):
    tiny = tiny_layout
    _, cache = _batch(tiny)
    same = dataclasses.replace(cache, z_cf=cache.z_clean.clone())
    digits = hooks.digit_tokens(tiny.tokenizer)
    clean = EC.clean_scores(tiny, same, digits)
    for mode in P.MODES:
        out = P.sweep_heads(tiny, same, mode, digits)
        torch.testing.assert_close(out.logit, clean.logit[:, None].expand_as(out.logit), rtol=1e-5, atol=1e-5)


def test_cache_matches_plain_forward(tiny_layout):
    tiny = tiny_layout
    _, cache = _batch(tiny, shots=2)
    with torch.no_grad():
        full = tiny.bridge(cache.tokens)[:, -1].float()
    torch.testing.assert_close(cache.clean_logits, full, rtol=1e-5, atol=1e-5)


def test_patch_heads_table_is_tidy(tiny):
    ps, cache = _batch(tiny, n=4)
    table = P.patch_heads(tiny, ps, [cache], modes=("direct", "path"))
    assert len(table) == 2 * len(ps) * tiny.n_layers * tiny.n_heads
    assert set(table.columns) >= {"mode", "prompt", "operator", "layer", "head", "rel_logit", "d_prob", "d_logit_diff"}
    assert not table.duplicated(["mode", "prompt", "layer", "head"]).any()


def test_unknown_architecture_falls_back_to_reference(tiny, monkeypatch, capsys):
    _, cache = _batch(tiny, n=3)
    digits = hooks.digit_tokens(tiny.tokenizer)
    fast = P.sweep_heads(tiny, cache, "path", digits)
    monkeypatch.setattr(layout, "describe", lambda model: None)  # a layout that cannot be described
    assert not P.fast_path_supported(tiny)
    slow = P.sweep_heads(tiny, cache, "path", digits)
    torch.testing.assert_close(fast.logit, slow.logit, rtol=1e-4, atol=1e-4)
    assert "no checked fast path for LlamaForCausalLM: 8 hooked passes, ≈ " in capsys.readouterr().out
    with pytest.raises(NotImplementedError, match="no checked fast path patching"):
        P.sweep_heads(tiny, cache, "path", digits, allow_reference=False)
    with pytest.raises(ValueError, match="unknown patching mode"):
        P.sweep_heads(tiny, cache, "sideways", digits)


@pytest.mark.real_model
@pytest.mark.parametrize("model", ["smollm2", pytest.param("qwen05", marks=pytest.mark.qwen)])
@pytest.mark.parametrize("mode", P.MODES)
def test_fast_equals_reference_on_real_model_sample(request, model, mode):
    smollm2 = request.getfixturevalue(model)  # SmolLM2 (Llama), or Qwen2.5-0.5B when fetched
    _, cache = _batch(smollm2, n=4, shots=3)
    digits = hooks.digit_tokens(smollm2.tokenizer)
    fast = P.sweep_heads(smollm2, cache, mode, digits)
    scale = float(cache.clean_logits.abs().max())
    rng = np.random.default_rng(0)
    for j in rng.choice(smollm2.n_layers * smollm2.n_heads, size=4, replace=False):
        head = hooks.Head(int(j) // smollm2.n_heads, int(j) % smollm2.n_heads)
        ref = P.reference_effect(smollm2, cache, head, mode, digits)
        _assert_agree(fast.map(lambda t: t[:, j]), ref, scale)


def test_tiled_logsumexp_matches_torch_also_where_exp_would_overflow_or_underflow():
    from arithlens.analyses.end_cache import tiled_lse

    g = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 50, generator=g) * 5
    shift = clean.amax(-1, keepdim=True)
    # small changes; changes that push a patched logit far above the clean max (exp overflows); and
    # changes that push every logit far below it (exp underflows to a zero sum)
    for scale, offset in ((0.5, 0.0), (200.0, 0.0), (0.5, -300.0)):
        delta = torch.randn(4, 3, 50, generator=g) * scale + offset
        expected = torch.logsumexp(clean[None] + delta, -1)
        for tile in (7, 50, 64):  # tiles that do not divide the vocabulary, one tile, one larger tile
            got = tiled_lse(lambda sl: (clean - shift)[None, :, sl] + delta[..., sl], 50, shift[:, 0], tile=tile)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)

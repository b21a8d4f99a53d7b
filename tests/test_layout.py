"""Block layouts: what :func:`arithlens.core.layout.describe` reads for each tiny family, that the fast sweeps
depend on it (a wrong layout gives wrong numbers), and that a model it cannot describe falls back,
visibly, to one hooked pass per head.

Fast == reference for every head on every claimed layout is tests/test_patching.py's
``test_fast_equals_reference_for_every_head_tiny`` (and tests/test_mlp.py's reference tests), both over
the ``tiny_layout`` fixture.
"""

import dataclasses

import pytest
import torch

from arithlens.analyses import end_cache as EC
from arithlens.analyses import mlp, patching as P
from arithlens.core import hooks, layout
from arithlens.core.models import LoadedModel, build_tiny_hf_model, build_tiny_tokenizer
from arithlens.tasks.prompts import PromptConfig, make_prompts
from arithlens.core.specs import ModelSpec

EXPECTED = {  # architecture → (norm slots, (1 + w) norms, final soft-cap)
    "LlamaForCausalLM": (("ln1", "ln2"), False, None),
    "Qwen2ForCausalLM": (("ln1", "ln2"), False, None),
    "Qwen3ForCausalLM": (("ln1", "ln2"), False, None),
    "MistralForCausalLM": (("ln1", "ln2"), False, None),
    "Phi3ForCausalLM": (("ln1", "ln2"), False, None),
    "Gemma2ForCausalLM": (("ln1", "ln1_post", "ln2", "ln2_post"), True, 0.5),
    "Gemma3ForCausalLM": (("ln1", "ln1_post", "ln2", "ln2_post"), True, None),
    "Olmo2ForCausalLM": (("ln1_post", "ln2_post"), False, None),
}
PLAIN = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM")



def _cache(model, n=4):
    ps = make_prompts(model.tokenizer, PromptConfig(operators=("+",), templates=("eq_spaced",), n_per_cell=n, shots=1))
    return EC.cache_end(model, list(ps.items))


def test_layout_of_each_tiny_family(tiny_layout):
    lay = layout.describe(tiny_layout)
    assert lay is not None and P.fast_path_supported(tiny_layout)
    assert (lay.norms, lay.norm_weight_offset, lay.final_softcap) == EXPECTED[lay.architecture]
    assert not lay.unembed_bias  # the bridge's zero lm_head bias does not count
    assert lay.plain == (lay.architecture in PLAIN)
    cache = _cache(tiny_layout, n=2)
    assert (cache.attn_pre is not None) == lay.post_attn_norm


def test_the_bridge_runs_each_tiny_family_as_hugging_face_does(tiny_layout):
    """Fast == reference compares two ways of running the bridge; this compares the bridge (through
    the cached clean run: the prefix on HF's KV cache, the suffix hooked) with a plain HF model of the
    same weights, built again from the same seed, on prompts longer than the tiny sliding window."""
    arch, seed = tiny_layout.spec.source.split(":")
    plain = build_tiny_hf_model(int(seed), vocab_size=len(tiny_layout.tokenizer), architecture=arch)
    plain = plain.to(device=tiny_layout.device, dtype=tiny_layout.dtype)
    cache = _cache(tiny_layout, n=3)
    with torch.no_grad():
        expected = plain(cache.tokens).logits[:, -1].float()
    torch.testing.assert_close(cache.clean_logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["tiny:mistral", "tiny:gemma3"])
def test_a_sliding_window_shorter_than_the_prompt(spec):
    """The tiny Mistral's and Gemma 3's windows cut the test prompts (the same weights with a wide
    window answer otherwise), so fast == reference on them covers sliding-window attention. HF's own
    cache for such a layer drops what leaves the window and then cannot be cropped back, which END
    reruns on one prefix need; :func:`arithlens.core.hooks.prefix_kv` keeps every position instead."""
    import copy

    from arithlens.core.models import load_model

    model = load_model(spec)
    arch, seed = model.spec.source.split(":")
    hf = build_tiny_hf_model(int(seed), vocab_size=len(model.tokenizer), architecture=arch)
    hf = hf.to(device=model.device, dtype=model.dtype)
    cache = _cache(model)
    tokens = cache.tokens
    assert tokens.shape[1] > hf.config.sliding_window
    config = copy.deepcopy(hf.config)
    config.sliding_window = 512
    wide = type(hf)(config).to(device=model.device, dtype=model.dtype).eval()
    wide.load_state_dict(hf.state_dict())
    with torch.no_grad():
        moved = float((wide(tokens).logits[:, -1] - cache.clean_logits).abs().max())
        assert moved > 1e-2 * float(cache.clean_logits.abs().max())
        own = hf(tokens[:, :-1], use_cache=True).past_key_values
        with pytest.raises(RuntimeError, match="crop"), hooks.kept(own):
            hf(tokens[:, -1:], past_key_values=own)
    kv = hooks.prefix_kv(model, tokens[:, :-1])
    assert all(layer.keys.shape[-2] == tokens.shape[1] - 1 for layer in kv.layers)
    for _ in range(2):  # the cache is given back as it was found, and serves again
        end = hooks.end_only_logits(model, tokens, [], kv)
        torch.testing.assert_close(end, cache.clean_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec, wrong, modes", [
    ("tiny:gemma2", {"final_softcap": None}, ("direct", "path")),
    ("tiny:gemma2", {"post_attn_norm": False}, ("direct", "path")),
    ("tiny:gemma2", {"norm_weight_offset": False}, ("direct",)),  # path re-runs the model's own final norm
    ("tiny:gemma2", {"post_mlp_norm": False}, ("path",)),  # direct freezes the MLPs
    ("tiny:gemma3", {"final_softcap": 0.5}, ("direct", "path")),  # Gemma 3 has no cap: one would bend its logits
    ("tiny:gemma3", {"post_attn_norm": False}, ("direct", "path")),
    ("tiny:gemma3", {"norm_weight_offset": False}, ("direct",)),
    ("tiny:gemma3", {"post_mlp_norm": False}, ("path",)),
    ("tiny:gemma3", {"pre_mlp_norm": False}, ("path",)),
    ("tiny:olmo2", {"post_attn_norm": False}, ("direct", "path")),
    ("tiny:olmo2", {"post_mlp_norm": False}, ("path",)),
])
def test_a_wrong_layout_gives_wrong_numbers(spec, wrong, modes, monkeypatch):
    """The tiny models are built so that every layout field matters: change one and the fast sweeps
    miss the reference by over 10× the tolerance the fast == reference tests allow (1e-4 × the
    logit scale), so fast == reference on them is evidence, not luck."""
    from arithlens.core.models import load_model

    model = load_model(spec)
    cache = _cache(model)
    digits = hooks.digit_tokens(model.tokenizer)
    right = layout.describe(model)
    monkeypatch.setattr(layout, "describe", lambda m: dataclasses.replace(right, **wrong))
    scale = float(cache.clean_logits.abs().max())
    for mode in modes:
        out = P.sweep_heads(model, cache, mode, digits)
        refs = [P.reference_effect(model, cache, hooks.Head(l, h), mode, digits)
                for l in range(model.n_layers) for h in range(model.n_heads)]
        err = max(float((getattr(out, name) - torch.stack([getattr(r, name) for r in refs], 1)).abs().max())
                  for name in ("logit", "logprob", "logit_diff"))
        assert err > 1e-3 * scale, (mode, wrong, err)


@pytest.fixture(scope="module")
def granite():
    """A tiny Granite: Llama's two pre-norms, but residual updates, embeddings and logits scaled by
    constants — a layout :func:`arithlens.core.layout.describe` does not claim."""
    from transformers import GraniteConfig, GraniteForCausalLM
    from transformer_lens.model_bridge import TransformerBridge

    tokenizer = build_tiny_tokenizer()
    config = GraniteConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           residual_multiplier=0.5, logits_scaling=2.0, embedding_multiplier=3.0,
                           architectures=["GraniteForCausalLM"])
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        hf = GraniteForCausalLM(config).eval()
    finally:
        torch.random.set_rng_state(state)
    device = torch.device("cpu")
    bridge = TransformerBridge.boot_transformers("arithlens-tiny", hf_model=hf, tokenizer=tokenizer, device=device,
                                                 dtype=torch.float32)
    bridge.eval()
    return LoadedModel(bridge, tokenizer, ModelSpec("tiny-granite", "tiny", "granite:0"), device, torch.float32, 0.0, False)


def test_undescribed_model_falls_back_to_reference_and_says_so(granite, capsys, monkeypatch):
    assert layout.describe(granite) is None and not P.fast_path_supported(granite)
    cache = _cache(granite)
    assert cache.attn_pre is None
    digits = hooks.digit_tokens(granite.tokenizer)
    capsys.readouterr()
    for mode in ("direct", "path"):
        out = P.sweep_heads(granite, cache, mode, digits)
        line = capsys.readouterr().out
        assert line.startswith("no checked fast path for GraniteForCausalLM: 8 hooked passes, ≈ ")
        assert " min " in line and line.count("\n") == 1
        for j, hd in enumerate([hooks.Head(l, h) for l in range(2) for h in range(4)]):
            ref = P.reference_effect(granite, cache, hd, mode, digits)
            torch.testing.assert_close(out.logit[:, j], ref.logit, rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="no checked fast direct patching for GraniteForCausalLM"):
        P.sweep_heads(granite, cache, "direct", digits, allow_reference=False)
    # several batches: one line for the whole sweep
    P.sweep_many(granite, [cache, cache], "path", digits)
    assert capsys.readouterr().out.count("no checked fast path for GraniteForCausalLM: 16 hooked passes") == 1
    # MLP tracing falls back too
    out = mlp.mlp_direct_effects(granite, cache, digits)
    assert "no checked fast path for GraniteForCausalLM: 2 hooked passes" in capsys.readouterr().out
    ref = mlp.reference_mlp_effect(granite, cache, 1, digits)
    torch.testing.assert_close(out.logit[:, 1], ref.logit, rtol=1e-5, atol=1e-6)
    # and Granite is rightly left out: read as Llama's plain layout, the fast path is wrong there
    plain = layout.BlockLayout("GraniteForCausalLM", True, False, True, False, False, False, None)
    monkeypatch.setattr(layout, "describe", lambda m: plain)
    fast = P.sweep_heads(granite, cache, "path", digits)
    ref = torch.stack([P.reference_effect(granite, cache, hooks.Head(l, h), "path", digits).logit
                       for l in range(2) for h in range(4)], 1)
    assert float((fast.logit - ref).abs().max()) > 1e-2 * float((ref - cache.clean_logits.gather(1, cache.answers[:, None])).abs().max())


@pytest.mark.parametrize("spec", ["tiny:gemma2", "tiny:gemma3", "tiny:olmo2"])
def test_neuron_attribution_refuses_a_post_mlp_norm(spec):
    """Neuron direct attributions are linear only without a post-MLP norm: they refuse rather than mislead."""
    from arithlens.analyses import neurons
    from arithlens.core.models import load_model

    model = load_model(spec)
    ps = make_prompts(model.tokenizer, PromptConfig(operators=("+",), templates=("eq_spaced",), n_per_cell=2, shots=1))
    with pytest.raises(NotImplementedError, match="not linear"):
        neurons.direct_attributions(model, list(ps.items), [1])

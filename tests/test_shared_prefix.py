"""The shared-prefix decoder equals HF's own cached decoding (the prefix repeated per row), on each family
whose layer loop is checked: left padding, grouped-query heads, sliding windows (Mistral's 8-token
window is shorter than the prefix here), rows leaving the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from arithlens.core import shared_prefix
from arithlens.core.models import load_model
from arithlens.core.shared_prefix import PrefixDecoder
from arithlens.core.twin import twin_of

CHECKED = ["tiny", "tiny:qwen2", "tiny:qwen3", "tiny:mistral", "tiny:phi3", "tiny:olmo2"]


def _batch(lengths, n_prefix=13, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab, (1, n_prefix), generator=g)
    rests = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    width = max(lengths)
    tokens = torch.tensor([[0] * (width - len(r)) + r for r in rests])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rests])
    full = torch.cat([torch.ones(len(rests), n_prefix, dtype=mask.dtype), mask], 1)
    return prefix, tokens, mask, full, (full.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
@pytest.mark.parametrize("spec", CHECKED)
def test_prompt_and_greedy_steps_equal_hf_cached_decoding(spec):
    model = load_model(spec)
    assert shared_prefix.fits(model)
    prefix, tokens, mask, full, pos = _batch([5, 2, 9])
    n, n_prefix, steps = len(tokens), prefix.shape[1], 6
    decoder = PrefixDecoder(model, prefix)
    cache = decoder.cache(n, tokens.shape[1] + steps)
    ours = decoder.forward(tokens, mask, pos[:, n_prefix:], cache, last_only=False)
    twin = twin_of(model)
    kv = twin(input_ids=prefix, past_key_values=DynamicCache(), use_cache=True).past_key_values
    kv.batch_repeat_interleave(n)
    ref = twin(input_ids=tokens, attention_mask=full, position_ids=pos[:, n_prefix:], past_key_values=kv,
               use_cache=True).logits.float()
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=0)
    current, p, m = ref[:, -1].argmax(-1)[:, None], pos[:, -1:], full
    rows = torch.arange(n)
    for step in range(steps):
        if step == 3:  # the middle row stops: both caches drop it
            rows = torch.tensor([0, 2])
            cache.batch_select_indices(rows)
            kv.batch_select_indices(rows)
            current, p, m = current[rows], p[rows], m[rows]
        p, m = p + 1, torch.cat([m, torch.ones_like(m[:, :1])], 1)
        a = decoder.forward(current, torch.ones_like(current), p, cache)[:, -1]
        b = twin(input_ids=current, attention_mask=m, position_ids=p, past_key_values=kv, use_cache=True).logits[:, -1].float()
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        current = b.argmax(-1)[:, None]


@torch.no_grad()
def test_the_mask_hides_padding_and_the_future(tiny):
    """A padded row's logits do not depend on what its padding slots hold, nor on later tokens."""
    prefix, tokens, mask, full, pos = _batch([3, 7])
    decoder = PrefixDecoder(tiny, prefix)
    first = decoder.forward(tokens, mask, pos[:, prefix.shape[1]:], decoder.cache(2, 8), last_only=False)
    noisy = tokens.clone()
    noisy[0, :4] = 42  # row 0's padding
    again = decoder.forward(noisy, mask, pos[:, prefix.shape[1]:], decoder.cache(2, 8), last_only=False)
    torch.testing.assert_close(first[0, 4:], again[0, 4:], atol=1e-6, rtol=0)
    cut = decoder.forward(tokens[:, :5], mask[:, :5], pos[:, prefix.shape[1]:][:, :5], decoder.cache(2, 8), last_only=False)
    torch.testing.assert_close(first[1, :5], cut[1], atol=1e-5, rtol=0)


def test_a_full_row_cache_and_an_unchecked_architecture_are_clear_errors(tiny):
    prefix, tokens, mask, full, pos = _batch([4, 4])
    decoder = PrefixDecoder(tiny, prefix)
    with pytest.raises(ValueError, match="holds 3 slots; 4 are needed"):
        decoder.forward(tokens, mask, pos[:, prefix.shape[1]:], decoder.cache(2, 3))
    gemma = load_model("tiny:gemma2")
    assert not shared_prefix.fits(gemma)
    with pytest.raises(ValueError, match="not checked"):
        PrefixDecoder(gemma, prefix)


@torch.no_grad()
def test_prompts_written_in_chunks_equal_one_padded_pass(tiny):
    """A batch's prompts run in chunks of similar length (each chunk its own width, the unwritten slots
    zeros and masked): the same cache and logits as one pass over the whole left-padded batch."""
    prefix, tokens, mask, full, pos = _batch([2, 3, 8, 9])
    decoder = PrefixDecoder(tiny, prefix)
    width, n_prefix = tokens.shape[1], prefix.shape[1]
    whole = decoder.cache(4, width + 2)
    decoder.forward(tokens, mask, pos[:, n_prefix:], whole)
    chunked = decoder.cache(4, width + 2, zeroed=width)
    for r0, r1, w in ((0, 2, 3), (2, 4, 9)):
        cols = slice(width - w, width)
        decoder.forward(tokens[r0:r1, cols], mask[r0:r1, cols], pos[r0:r1, n_prefix:][:, cols], chunked.rows(r0, r1, width - w))
    chunked.length = width
    assert torch.equal(whole.valid, chunked.valid)
    step, p = torch.tensor([[5], [6], [7], [8]]), pos[:, -1:] + 1
    a = decoder.forward(step, torch.ones_like(step), p, whole)
    b = decoder.forward(step, torch.ones_like(step), p, chunked)
    assert torch.isfinite(b).all()
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


@torch.no_grad()
def test_a_delta_reaches_the_decoder_and_comes_off_with_it(tiny):
    """Table 1 scores each tuned row with its delta applied (``evaluate_benchmarks``): the decoder's twin
    shares the model's tensors, so the delta shows in its scores — prefix included — and is gone after."""
    from pathlib import Path

    from arithlens.core import deltas
    from arithlens.core.deltas import Delta, Slice
    from arithlens.tasks.benchmarks.reader import load_benchmark
    from arithlens.tasks.benchmarks.scoring import evaluate_benchmarks

    suite = load_benchmark(Path(__file__).parent / "data" / "benchmarks" / "gsm8k_style.jsonl", tiny.tokenizer, shots=2)
    s = Slice("model.layers.0.self_attn.o_proj.weight", 0, 0, 8)
    base = deltas.slice_view(deltas.named_weights(tiny), s)
    delta = Delta({s: base + base.std() * torch.randn(base.shape, generator=torch.Generator().manual_seed(3))})
    before = evaluate_benchmarks(tiny, None, [suite], mode="cot")
    changed = evaluate_benchmarks(tiny, delta, [suite], mode="cot")
    after = evaluate_benchmarks(tiny, None, [suite], mode="cot")
    assert not np.allclose(before["p_answer"], changed["p_answer"])
    np.testing.assert_array_equal(before["p_answer"].to_numpy(), after["p_answer"].to_numpy())

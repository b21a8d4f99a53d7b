"""Chain-of-thought throughput on the shipped GSM8K, per model: what chapter 8's Table 1 pays for it.

    python benchmarks/bench_cot.py [--models smollm2-135m,qwen2.5-0.5b] [--n 32] [--batch 16] [--threads 0]

For each model: ``--n`` GSM8K test items (the seeded sample chapter 4 asks), 4 worked demonstrations, greedy
decoding of at most 256 new tokens (:mod:`arithlens.tasks.benchmarks.cot`), batched with the shared prefix
cached. Prints items/s, new tokens per item, the share that ran out of the budget and the accuracy, and
the time of a decoding step (8 steps on the first batch) through the TransformerLens bridge and through the
shared-prefix decoder, each over one through the plain HF twin.

The scorer decodes with the shared-prefix decoder (:mod:`arithlens.core.shared_prefix`); ``bench_table1.py``
times it against HF's cache on every Table 1 benchmark.
Wall-clock on this machine, model load excluded; ``--threads 0`` keeps torch's default.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("ARITHLENS_QUIET", "1")


def step_times(model, scorer, steps: int = 8) -> dict[str, float]:
    """Seconds of ``steps`` decoding steps on the first batch through the bridge and the plain twin (HF's
    cache, the prefix repeated per row), and through the shared-prefix decoder."""
    import torch

    batch = scorer.batches[0]
    times, decoder = {}, scorer._shared_decoder
    for name in ("bridge", "twin", "shared"):
        scorer._shared_decoder = decoder if name == "shared" else (lambda fwd_hooks: None)
        kv, mask, pos = scorer._prompt_cache(batch, extra=steps)
        current = batch.tokens[:, -1:]
        start = time.perf_counter()
        for _ in range(steps):
            if name == "bridge":
                logits = model.bridge.original_model(input_ids=current, past_key_values=kv, attention_mask=mask,
                                                     position_ids=pos, use_cache=True).logits[:, -1]
            else:
                logits = scorer._run(current, kv, mask, pos, ())[:, -1]
            current, pos = logits.argmax(-1)[:, None], pos + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        times[name] = time.perf_counter() - start
    scorer._shared_decoder = decoder
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    import torch

    from arithlens.core.models import load_model
    from arithlens.tasks.benchmarks import shipped
    from arithlens.tasks.benchmarks.scoring import BenchmarkScorer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"GSM8K, chain of thought; {args.n} items, batch {args.batch}, {torch.get_num_threads()} torch threads")
    for name in args.models.split(","):
        model = load_model(name)
        suite = shipped.load_shipped("gsm8k", model.tokenizer, n=args.n, seed=0)
        scorer = BenchmarkScorer(model, suite, "cot", batch_size=args.batch)
        steps = step_times(model, scorer)
        start = time.perf_counter()
        frame = scorer.score()
        seconds = time.perf_counter() - start
        print(f"{name}: {len(frame) / seconds:.2f} items/s ({seconds:.0f} s; prefix {scorer.shared} tokens), "
              f"{frame['n_new_tokens'].mean():.0f} new tokens an item, {frame['hit_budget'].mean():.0%} ran out of "
              f"the budget, accuracy {frame['correct'].mean():.1%}; a decoding step through the bridge ÷ the twin "
              f"{steps['bridge'] / steps['twin']:.2f}, the shared-prefix decoder ÷ the twin {steps['shared'] / steps['twin']:.2f}")


if __name__ == "__main__":
    main()

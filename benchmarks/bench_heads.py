"""Benchmark of chapter 1's head patching and knockout (issue #3's targets), printing ratios.

    python benchmarks/bench_heads.py [--model smollm2-135m] [--n 256] [--ref-heads 6]

Times are wall-clock on this machine; only the ratios are meant to be compared across machines.
Lines starting with ``ratio`` are the targets:

* exact direct sweep (all heads, all metrics) ÷ two plain forward passes        target ≤ 1.3
* exact path sweep ÷ two plain forward passes                                   target ≤ 2
* per-head reference loop ÷ fast sweep (reference timed on --ref-heads heads
  and scaled to all heads)                                                      expect ≥ 50
* one END-only knockout condition (chapter 1's 61, batch-major, their prefix caches
  shared) ÷ one plain forward pass                                            target ≤ 0.1
and peak RSS (target ≤ 2.5 GB).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

os.environ.setdefault("ARITHLENS_QUIET", "1")

from arithlens.analyses import knockout
from arithlens.analyses import end_cache, patching  # noqa: E402
from arithlens.core import hooks  # noqa: E402
from arithlens.core.items import length_batches, to_tokens  # noqa: E402
from arithlens.core.models import load_model  # noqa: E402
from arithlens.tasks.prompts import PromptConfig, make_prompts  # noqa: E402


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=256, help="number of prompts")
    ap.add_argument("--ref-heads", type=int, default=6, help="heads timed with the reference loop")
    args = ap.parse_args()

    model = load_model(args.model)
    full = make_prompts(model.tokenizer, PromptConfig(n_per_cell=max(8, args.n // 40 + 2), shots=3, seed=0))
    prompts = full.subset([i < args.n for i in range(len(full))])
    batches = length_batches(prompts.items, 16)
    digits = hooks.digit_tokens(model.tokenizer)
    print(f"model {args.model}: {len(prompts)} prompts, {len(batches)} batches, {model.n_layers}×{model.n_heads} heads, "
          f"threads {torch.get_num_threads()}")

    @torch.no_grad()
    def forwards(which):
        for b in batches:
            model.bridge(to_tokens([prompts.items[i] for i in b], which).to(model.device))

    forwards("clean")  # warm-up
    _, t_clean = timed(lambda: forwards("clean"))
    _, t_cf = timed(lambda: forwards("counterfactual"))
    two = t_clean + t_cf
    print(f"two plain forward passes: {two:.1f} s (peak RSS so far {peak_gb():.2f} GB)")

    caches, t_cache = timed(lambda: end_cache.cache_prompt_set(model, prompts))
    results = {}
    for mode in ("direct", "path"):
        for with_prob in (True, False):
            _, t = timed(lambda: patching.sweep_many(model, caches, mode, digits, with_prob))
            results[(mode, with_prob)] = t_cache + t
            print(f"{mode:6s} sweep ({'all metrics' if with_prob else 'logit + logit diff only'}): cache {t_cache:.1f} s + "
                  f"sweep {t:.1f} s (peak RSS so far {peak_gb():.2f} GB)")

    heads = [hooks.Head(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
    step = max(1, len(heads) // args.ref_heads)
    sample = heads[::step][: args.ref_heads]
    _, t_ref = timed(lambda: [patching.reference_effect(model, c, h, "path", digits) for c in caches for h in sample])
    t_ref_all = t_ref / len(sample) * len(heads)
    print(f"reference loop: {t_ref:.1f} s for {len(sample)} heads → {t_ref_all:.0f} s for all {len(heads)} (scaled; "
          f"peak RSS so far {peak_gb():.2f} GB)")

    means = knockout.mean_z(model, prompts, "end")
    evaluator = knockout.KnockoutEvaluator(model, prompts, means, "end")
    evaluator.accuracy(heads[:10])  # warm-up
    # chapter 1's END knockout as the chapter runs it: no ablation, top-k and 5 random draws of k for k = 1 … 10
    k_values, n_seeds = range(1, 11), 5
    n_conditions = 1 + len(k_values) * (1 + n_seeds)
    _, t_all = timed(lambda: knockout.knockout_curve(evaluator, heads, k_values, n_seeds=n_seeds))
    t_ko = t_all / n_conditions
    print(f"END-only knockout: {n_conditions} conditions in {t_all:.1f} s, prefix caches included "
          f"(peak RSS so far {peak_gb():.2f} GB)")

    print(f"ratio direct_sweep/two_forwards = {results[('direct', True)] / two:.2f} (target <= 1.3; "
          f"without p(answer): {results[('direct', False)] / two:.2f})")
    print(f"ratio path_sweep/two_forwards = {results[('path', True)] / two:.2f} (target <= 2; "
          f"without p(answer): {results[('path', False)] / two:.2f})")
    print(f"ratio reference_loop/fast_path_sweep = {t_ref_all / results[('path', True)]:.0f} (expect >= 50)")
    print(f"ratio end_only_knockout/one_forward = {t_ko / t_clean:.3f} (target <= 0.1)")
    print(f"peak RSS {peak_gb():.2f} GB (target <= 2.5)")


if __name__ == "__main__":
    main()

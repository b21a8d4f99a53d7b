"""Cost of each way to score every head at END (issue #16's speed target), printing ratios.

    python benchmarks/bench_attribution.py [--model smollm2-135m] [--n 120] [--mode path] [--steps 5]

Times, over the same ``--n`` three-shot prompts, exact patching of every head (chapter 1's fast
sweep, its caching included), attribution patching (one backward pass) and EAP-IG (``--steps``
points), each divided by two plain forward passes (``attribution.two_forward_seconds``), and the
Spearman ρ of each estimate's per-head mean Δp(answer) against exact patching. Lines starting with
``ratio`` are the target: EAP-IG over all heads in ≤ 3 forward-equivalents with ρ ≥ 0.8. Lines starting
with ``screen`` give, for k = 5, 10, 20, how many of each estimate's top heads exact patching would have
to measure to be sure of its own top k (:func:`arithlens.analyses.agreement.screen_size`).
Only ratios are meant to be compared across machines.
"""

from __future__ import annotations

import argparse
import os
import time

import pandas as pd
import torch

os.environ.setdefault("ARITHLENS_QUIET", "1")

from arithlens.analyses import agreement, attribution
from arithlens.analyses import end_cache, patching  # noqa: E402
from arithlens.core.models import load_model  # noqa: E402
from arithlens.tasks.prompts import PromptConfig, make_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=120, help="number of prompts")
    ap.add_argument("--mode", default="path", choices=["direct", "path", "total"])
    ap.add_argument("--steps", type=int, default=5, help="EAP-IG interpolation points")
    args = ap.parse_args()

    model = load_model(args.model)
    full = make_prompts(model.tokenizer, PromptConfig(n_per_cell=max(2, args.n // 48 + 1), shots=3, seed=0))
    prompts = full.subset([i < args.n for i in range(len(full))])
    print(f"model {args.model}: {len(prompts)} prompts, {model.n_layers}×{model.n_heads} heads, mode {args.mode}, "
          f"threads {torch.get_num_threads()}")
    two = attribution.two_forward_seconds(model, prompts)
    start = time.perf_counter()
    caches = end_cache.cache_prompt_set(model, prompts)
    exact = patching.patch_heads(model, prompts, caches, modes=(args.mode,))
    seconds = {"exact": time.perf_counter() - start}
    parts = [exact.assign(method="exact")]
    for method in (attribution.ATTRIBUTION, attribution.eap_ig(args.steps)):
        start = time.perf_counter()
        caches = end_cache.cache_prompt_set(model, prompts)
        parts.append(attribution.attribute_heads(model, prompts, caches, (args.mode,), (method,)))
        seconds[method.name] = time.perf_counter() - start
    shared = [c for c in exact.columns if all(c in p for p in parts)]  # the estimators have no digit-only log-probability
    table = pd.concat([p[["method", *shared]] for p in parts], ignore_index=True)
    agree = agreement.rank_agreement(table, "d_prob")
    rho = agree.query("measure == 'spearman'").set_index("method")["value"]
    screen = agree.query("measure == 'screen'").set_index(["method", "k"])["value"]
    print(f"two plain forward passes: {two:.1f} s")
    for name, s in seconds.items():
        extra = f", spearman vs exact {rho[name]:.3f}" if name in rho else ""
        print(f"{name:12s} {s:7.1f} s = {s / two:.2f} forward-equivalents{extra}")
    print(f"ratio eap_ig/two_forwards = {seconds['eap_ig'] / two:.2f} (target <= 3; spearman {rho['eap_ig']:.3f}, target >= 0.8)")
    print(f"ratio attribution/two_forwards = {seconds['attribution'] / two:.2f}")
    n_heads = model.n_layers * model.n_heads
    for (name, k), n in screen.items():  # screen-then-measure: the cheap ranking's top N that holds exact's top k
        print(f"screen {name} k={k}: exact's top {k} lie in its top {n:.0f} of {n_heads} heads ({n / n_heads:.0%})")


if __name__ == "__main__":
    main()

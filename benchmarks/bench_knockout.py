"""END-only knockout with conditions stacked along the batch, against one pass per condition.

    python benchmarks/bench_knockout.py [--models smollm2-135m] [--n-per-cell 2] [--conditions 22]
                                        [--rows 32,64,128,256] [--threads 0]

Chapter 1 knocks heads out under ~90 END-only conditions (the knockout curve's top-k and random-k
sets, the layer-matched draws) and chapter 7 under many more, on batches of equal-length prompts that
are often small (a three-shot template × operator cell). A one-token pass over a few prompts is
bound by streaming the weights, not by arithmetic, so :func:`arithlens.core.hooks.end_only_many`
stacks conditions along the batch, up to a number of rows a pass. For each model: chapter 1's
evaluation-half prompts (``--n-per-cell`` per template × operator cell, three-shot), ``--conditions``
head sets (none, the top 10 of a seeded random ranking, then layer-matched draws), END means from the
same prompts; prints seconds for one pass per condition and for each row budget, the speed-up, and
whether the greedy answers agree (they should everywhere; logits agree to float rounding). Wall-clock on
this machine, model load and prefix caches excluded; ``--threads 0`` keeps torch's default.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("ARITHLENS_QUIET", "1")

TEMPLATES = ("eq_spaced", "eq_compact", "eq_compute", "eq_calculate", "st_equals", "st_is", "st_result", "st_noun",
             "qa_what", "qa_noun", "qa_symbol", "qa_howmuch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--n-per-cell", type=int, default=2)
    parser.add_argument("--conditions", type=int, default=22)
    parser.add_argument("--rows", default="32,64,128,256")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    import random

    import torch

    from arithlens.analyses import knockout
    from arithlens.core import hooks
    from arithlens.core.items import answer_batches
    from arithlens.core.models import load_model
    from arithlens.tasks.prompts import PromptConfig, make_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    budgets = [int(r) for r in args.rows.split(",")]
    for name in args.models.split(","):
        model = load_model(name)
        prompts = make_prompts(model.tokenizer, PromptConfig(templates=TEMPLATES, n_per_cell=args.n_per_cell, shots=3,
                                                             seed=0, facts="evaluation"))
        means = knockout.mean_z(model, prompts, "end")
        everything = [hooks.Head(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
        top = random.Random(0).sample(everything, 10)
        draws = hooks.layer_matched_random_sets(top, model.n_layers, model.n_heads, max(0, args.conditions - 2), 0)
        fwds = [knockout.ablation_hooks(heads, means, "end") for heads in [[], top, *draws]]
        batches = answer_batches(prompts.items, 64, model.device)
        caches = [hooks.prefix_kv(model, tokens[:, :-1]) for _, tokens, _ in batches]
        sizes = sorted(len(b) for b, _, _ in batches)
        print(f"{name}: {len(prompts)} prompts in {len(batches)} batches of {sizes[0]}–{sizes[-1]}, "
              f"{len(fwds)} conditions, torch threads {torch.get_num_threads()}")

        def run(max_rows):
            start = time.perf_counter()
            out = [hooks.end_only_many(model, tokens, fwds, kv, read=lambda logits: logits.argmax(-1), max_rows=max_rows)
                   for (_, tokens, _), kv in zip(batches, caches)]
            return time.perf_counter() - start, out

        run(budgets[0])  # warm-up
        base_s, base = run(1)
        print(f"  one pass per condition: {base_s:.1f} s")
        for rows in budgets:
            s, out = run(rows)
            agree = all(torch.equal(a, b) for xs, ys in zip(out, base) for a, b in zip(xs, ys))
            print(f"  stacked, ≤ {rows:3d} rows a pass: {s:.1f} s, speed-up {base_s / s:.2f}×, greedy answers "
                  f"{'identical' if agree else 'DIFFER'}")


if __name__ == "__main__":
    main()

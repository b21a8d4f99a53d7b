"""END-only knockout with conditions stacked along the batch, against one pass per condition.

    python benchmarks/bench_knockout.py [--models smollm2-135m] [--n-per-cell 2] [--conditions 22]
                                        [--rows 32,64,128,256] [--threads 0] [--every-position]

Chapter 1 knocks heads out under ~90 END-only conditions (the knockout curve's top-k and random-k
sets, the layer-matched draws) and chapter 7 under many more, on batches of equal-length prompts that
are often small (a three-shot template × operator cell). A one-token pass over a few prompts is
bound by streaming the weights, not by arithmetic, so :func:`arithlens.core.conditions.end_only_many`
stacks conditions along the batch, up to a number of rows a pass. For each model: chapter 1's
evaluation-half prompts (``--n-per-cell`` per template × operator cell, three-shot), ``--conditions``
head sets (none, the top 10 of ``--ranking`` — a chapter 1 run's ``key_heads.parquet`` — or of a seeded
random ranking, then layer-matched draws), END means from the
same prompts; prints seconds for one bridge pass per condition and, for each row budget, stacked on
the bridge and stacked from the lowest hooked layer on the twin (:data:`arithlens.core.conditions.FROM_LOWEST_LAYER`),
the speed-up, and whether the greedy answers agree (they should everywhere; logits agree to float rounding). Wall-clock on
this machine, model load and prefix caches excluded; ``--threads 0`` keeps torch's default.

``--every-position`` times chapter 1's every-position knockout instead: its sets (none; the top 5 and
top 10 of the model's key-head ranking as chapter 1 found it, or of a seeded random ranking; 5 random
draws of 5 and of 10 heads), one full hooked pass per set against each set run from its lowest ablated
layer on one clean pass per batch (:func:`arithlens.analyses.knockout.every_position_logits`); prints
both times, the ratio, the share of layer passes saved, and whether the greedy answers agree.
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
    parser.add_argument("--every-position", action="store_true")
    parser.add_argument("--ranking", default="", help="a chapter 1 run's key_heads.parquet for the top heads")
    args = parser.parse_args()
    if args.every_position:
        return every_position(args)

    import random

    import torch

    from arithlens.analyses import knockout
    from arithlens.core import conditions, hooks
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
        top = (_ranking(args.ranking)[:10] if args.ranking else random.Random(0).sample(everything, 10))
        draws = hooks.layer_matched_random_sets(top, model.n_layers, model.n_heads, max(0, args.conditions - 2), 0)
        fwds = [knockout.ablation_hooks(heads, means, "end") for heads in [[], top, *draws]]
        batches = answer_batches(prompts.items, 64, model.device)
        caches = [hooks.prefix_kv(model, tokens[:, :-1]) for _, tokens, _ in batches]
        sizes = sorted(len(b) for b, _, _ in batches)
        print(f"{name}: {len(prompts)} prompts in {len(batches)} batches of {sizes[0]}–{sizes[-1]}, "
              f"{len(fwds)} conditions, torch threads {torch.get_num_threads()}")

        def run(max_rows):
            start = time.perf_counter()
            out = [conditions.end_only_many(model, tokens, fwds, kv, read=lambda logits: logits.argmax(-1), max_rows=max_rows)
                   for (_, tokens, _), kv in zip(batches, caches)]
            return time.perf_counter() - start, out

        run(budgets[0])  # warm-up
        conditions.FROM_LOWEST_LAYER = False
        base_s, base = run(1)
        print(f"  one pass per condition (bridge, from the embedding): {base_s:.1f} s")
        for lowest in (False, True):
            conditions.FROM_LOWEST_LAYER = lowest
            for rows in budgets:
                s, out = run(rows)
                agree = all(torch.equal(a, b) for xs, ys in zip(out, base) for a, b in zip(xs, ys))
                print(f"  stacked, ≤ {rows:3d} rows a pass, {'from the lowest hooked layer' if lowest else 'bridge'}: "
                      f"{s:.1f} s, speed-up {base_s / s:.2f}×, greedy answers {'identical' if agree else 'DIFFER'}")


def _ranking(path: str):
    """Heads in the order of a chapter 1 run's ``key_heads.parquet``."""
    import pandas as pd

    from arithlens.core.hooks import Head

    return [Head(int(l), int(h)) for l, h in pd.read_parquet(path)[["layer", "head"]].values]


def every_position(args) -> None:
    import random

    import torch

    from arithlens.analyses import knockout
    from arithlens.core import hooks
    from arithlens.core.items import answer_batches
    from arithlens.core.models import load_model, logits_at_end
    from arithlens.core.twin import make_twin
    from arithlens.tasks.prompts import PromptConfig, make_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    for name in args.models.split(","):
        model = load_model(name)
        prompts = make_prompts(model.tokenizer, PromptConfig(templates=TEMPLATES, n_per_cell=args.n_per_cell, shots=3,
                                                             seed=0, facts="evaluation"))
        means = knockout.mean_z(model, prompts, "all")
        if args.ranking:
            ranking = _ranking(args.ranking)
        else:
            everything = [hooks.Head(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
            ranking = random.Random(0).sample(everything, 10)
        sets = [[], ranking[:5], ranking[:10]] + [hooks.control_heads(model.n_layers, model.n_heads, k, s)
                                                   for k in (5, 10) for s in range(5)]
        batches = answer_batches(prompts.items, 64, model.device)
        twin = make_twin(model)
        starts = [min((h.layer for h in s), default=model.n_layers) for s in sets]
        run_share = (model.n_layers + sum(model.n_layers - s for s in starts)) / (len(sets) * model.n_layers)
        print(f"{name}: {len(prompts)} prompts in {len(batches)} batches, {len(sets)} sets (lowest ablated layers "
              f"{starts[1:]}), torch threads {torch.get_num_threads()}")

        def hooked():
            return [[logits_at_end(model, tokens, knockout.ablation_hooks(s, means, "all")).argmax(-1) for s in sets]
                    for _, tokens, _ in batches]

        def lowest():
            return [[l.argmax(-1) for l in knockout.every_position_logits(twin, tokens, sets, means)]
                    for _, tokens, _ in batches]

        lowest()  # warm-up
        start = time.perf_counter()
        base = hooked()
        base_s = time.perf_counter() - start
        start = time.perf_counter()
        fast = lowest()
        fast_s = time.perf_counter() - start
        agree = sum(int((a == b).sum()) for xs, ys in zip(base, fast) for a, b in zip(xs, ys))
        total = sum(int(a.numel()) for xs in base for a in xs)
        print(f"  one full hooked pass per set: {base_s:.1f} s; from the lowest ablated layer: {fast_s:.1f} s, "
              f"speed-up {base_s / fast_s:.2f}× (layer passes run: {run_share:.0%} of one per set); greedy "
              f"answers agree on {agree} of {total}")


if __name__ == "__main__":
    main()

"""Suite scoring against plain forward passes: what chapters 3, 4 and 7 pay to score a transfer suite.

    python benchmarks/bench_suites.py [--models smollm2-135m] [--n-math 16] [--n-control 48] [--conditions 20]
                                      [--threads 0]

For each model: the twelve suites chapter 4 evaluates after every trained row (math suites × ``--n-math``,
controls × ``--n-control``, seed 0), scored by :class:`arithlens.tasks.suites.SuiteScorer` — which runs the
demonstrations each family of prompts shares once (:func:`arithlens.tasks.suites.prompt_families`), then
each row's own tokens, then END, the answer tokens and one position more (the end-of-number check). The
reference is one plain forward of the HF model over every item's prompt + answer, batched by length,
nothing cached, logits only at END and the answer positions: the cheapest way to read the same logits
without the scorer. Prints, per model, the
scorer's seconds (building the caches, then one scoring pass), the reference's seconds, their ratio, the
tokens each family shares, and the accuracies (so a change that speeds scoring up and moves them shows).
Then what chapter 7's suite null and chapter 3's knockouts pay per head set: ``--conditions`` head sets
(ten random heads each, mean-ablated at every predicting position) scored one pass each
(:meth:`~arithlens.tasks.suites.SuiteScorer.score`) and stacked along the batch
(:meth:`~arithlens.tasks.suites.SuiteScorer.score_many`), with whether their correctness agrees.
Wall-clock on this machine, model load excluded; ``--threads 0`` keeps torch's default.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("ARITHLENS_QUIET", "1")

SUITES = ["multidigit", "decimals", "years", "word_problems", "power", "capitals", "antonyms", "languages", "plurals",
          "past_tense", "elements", "sequences"]


def plain_forwards(model, suites, batch_size: int = 32) -> float:
    """Seconds of plain HF forwards over every item's prompt + answer tokens, batched by length (logits
    at END and the answer positions only)."""
    import torch

    from arithlens.core.items import length_batches

    hf = model.bridge.original_model
    start = time.perf_counter()
    for suite in suites:
        items = suite.items
        for part in length_batches(items, batch_size, key=lambda it: (len(it.clean_tokens), len(it.answer_tokens))):
            seq = torch.tensor([items[j].clean_tokens + items[j].answer_tokens for j in part], device=model.device)
            hf(input_ids=seq, use_cache=False, logits_to_keep=len(items[part[0]].answer_tokens) + 1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--n-math", type=int, default=16)
    parser.add_argument("--n-control", type=int, default=48)
    parser.add_argument("--conditions", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    import torch

    from arithlens.analyses import knockout
    from arithlens.core.hooks import control_heads
    from arithlens.core.models import load_model
    from arithlens.tasks import suites as suites_lib

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    for name in args.models.split(","):
        model = load_model(name)
        suites = [suites_lib.make_suite(s, model.tokenizer, seed=0,
                                        n=args.n_control if suites_lib.SUITES[s].kind == "control" else args.n_math)
                  for s in SUITES]
        plain_forwards(model, suites[:1])  # warm-up
        start = time.perf_counter()
        scorers = [suites_lib.SuiteScorer(model, s) for s in suites]
        built = time.perf_counter() - start
        start = time.perf_counter()
        frames = [sc.score() for sc in scorers]
        scored = time.perf_counter() - start
        plain = plain_forwards(model, suites)
        print(f"{name}: {sum(len(s.items) for s in suites)} items in {len(suites)} suites, torch threads "
              f"{torch.get_num_threads()}")
        print(f"  scorer: {built:.1f} s caches + {scored:.1f} s one scoring pass = {built + scored:.1f} s; "
              f"plain forwards {plain:.1f} s; ratio {(built + scored) / plain:.2f} (one more condition: "
              f"{scored / plain:.2f})")
        for suite, scorer, frame in zip(suites, scorers, frames):
            shared = ", ".join(str(k) for k in scorer.shared)
            print(f"  {suite.name:14s} {len(suite.items):3d} items  shared tokens per family [{shared}]  "
                  f"whole answer {frame['correct'].mean():.3f}  first token {frame['first_correct'].mean():.3f}")
        means = torch.zeros(model.n_layers, model.n_heads, model.cfg.d_head, device=model.device)
        fwds = [knockout.ablation_hooks(control_heads(model.n_layers, model.n_heads, 10, s), means, "all")
                for s in range(args.conditions)]
        start = time.perf_counter()
        one_each = [[sc.score(f) for f in fwds] for sc in scorers]
        each_s = time.perf_counter() - start
        start = time.perf_counter()
        stacked = [sc.score_many(fwds) for sc in scorers]
        many_s = time.perf_counter() - start
        agree = all(a["correct"].equals(b["correct"]) for xs, ys in zip(one_each, stacked) for a, b in zip(xs, ys))
        print(f"  {args.conditions} head sets on every suite: {each_s:.1f} s one pass each, {many_s:.1f} s stacked "
              f"(speed-up {each_s / many_s:.2f}×); correctness {'identical' if agree else 'DIFFERS'}")


if __name__ == "__main__":
    main()

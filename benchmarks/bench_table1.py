"""Chapter 8's Table 1 benchmarks on the base model: the shared-prefix decoder against HF's cache.

    python benchmarks/bench_table1.py [--model smollm2-135m] [--n-cot 40] [--n 64] [--rounds 1] [--threads 0]

Each shipped benchmark (GSM8K with a chain of thought, ``--n-cot`` items; SVAMP and MMLU, ``--n`` items
each) is scored as chapter 4 scores it — :class:`arithlens.tasks.benchmarks.scoring.BenchmarkScorer` with no
hooks: the shared-prefix decoder (:mod:`arithlens.core.shared_prefix`), 64 prompts a batch written in
chunks of similar length — and again with HF's cache (the prefix repeated per row, 16 prompts a batch),
as it was scored before. Prints seconds per benchmark and engine (fastest of ``--rounds`` interleaved
rounds), the ratio new ÷ old, and how many predictions the two engines share. Wall-clock on this
machine, model load excluded; ``--threads 0`` keeps torch's default.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("ARITHLENS_QUIET", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-cot", type=int, default=40)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    import torch

    from arithlens.core.models import load_model
    from arithlens.tasks.benchmarks import shipped
    from arithlens.tasks.benchmarks.scoring import BenchmarkScorer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = load_model(args.model)
    print(f"{args.model}: Table 1's benchmarks, base model, {torch.get_num_threads()} torch threads")
    totals = {"shared": 0.0, "hf": 0.0}
    for name in shipped.SHIPPED:
        n = args.n_cot if shipped.SHIPPED[name].mode == "cot" else args.n
        suite = shipped.load_shipped(name, model.tokenizer, n=n, seed=0)
        best, frames = {"shared": float("inf"), "hf": float("inf")}, {}
        for _ in range(args.rounds):
            for engine in best:
                scorer = BenchmarkScorer(model, suite, shipped.SHIPPED[name].mode)
                if engine == "hf":
                    scorer._shared_decoder = lambda fwd_hooks: None
                start = time.perf_counter()
                frames[engine] = scorer.score()
                best[engine] = min(best[engine], time.perf_counter() - start)
        same = int((frames["shared"]["prediction"] == frames["hf"]["prediction"]).sum())
        for engine in totals:
            totals[engine] += best[engine]
        print(f"{name} ({shipped.SHIPPED[name].mode}, {n} items): shared-prefix decoder {best['shared']:.1f} s, "
              f"HF's cache {best['hf']:.1f} s, ratio {best['shared'] / best['hf']:.2f}; same predictions {same} of {n}",
              flush=True)
    print(f"all three: {totals['shared']:.0f} s vs {totals['hf']:.0f} s, ratio {totals['shared'] / totals['hf']:.2f}")


if __name__ == "__main__":
    main()

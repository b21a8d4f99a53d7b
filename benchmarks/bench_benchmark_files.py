"""Throughput of benchmark-file scoring (issue #15's target: a few hundred items in minutes on a CPU).

    python benchmarks/bench_benchmark_files.py [--model smollm2-135m] [--n 200] [--shots 3] [--batch 16]

Writes two synthetic files of ``--n`` items each in the published formats (their wording is generated
here, not taken from any dataset): ``wordproblems.jsonl`` (GSM8K format, one- and two-step problems
with a ``#### N`` answer) and ``choices.csv`` (MMLU CSV format, four numeric options). Each is read
with :func:`arithlens.tasks.benchmarks.reader.load_benchmark` (``--shots`` demonstrations) and scored once per mode
(``generate``, ``first_token`` for the word problems; ``choice`` for the CSV); prints items/s and
accuracy per mode. Wall-clock on this machine, prefix cache included, model load excluded.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ARITHLENS_QUIET", "1")

NAMES = ["Ava", "Bo", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
THINGS = ["marbles", "stickers", "apples", "pencils", "coins", "cards", "shells", "beads"]


def word_problem(r: random.Random) -> tuple[str, int]:
    name, thing = r.choice(NAMES), r.choice(THINGS)
    a, b, c = r.randint(2, 40), r.randint(2, 20), r.randint(2, 9)
    kind = r.randrange(3)
    if kind == 0:
        return f"{name} has {a} {thing} and finds {b} more. How many {thing} does {name} have now?", a + b
    if kind == 1:
        a = a + b
        return f"{name} had {a} {thing} and gave {b} to a friend. How many {thing} are left?", a - b
    return (f"{name} buys {c} bags with {b} {thing} in each bag, then loses {min(a, b * c)} of them. "
            f"How many {thing} does {name} have left?", b * c - min(a, b * c))


def write_files(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    r = random.Random(seed)
    problems = folder / "wordproblems.jsonl"
    with problems.open("w") as fh:
        for _ in range(n):
            q, ans = word_problem(r)
            fh.write(json.dumps({"question": q, "answer": f"Work it out.\n#### {ans:,}"}) + "\n")
    choices = folder / "choices.csv"
    with choices.open("w", newline="") as fh:
        writer = csv.writer(fh)
        for _ in range(n):
            options = r.sample(range(10, 999), 4)
            best = max(options)
            writer.writerow([f"Which of these numbers is the largest?", *options, "ABCD"[options.index(best)]])
    return problems, choices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()

    import torch

    from arithlens.tasks.benchmarks.scoring import timed_score
    from arithlens.tasks.benchmarks.reader import load_benchmark
    from arithlens.core.models import load_model

    model = load_model(args.model)
    print(f"model {args.model}, torch threads {torch.get_num_threads()}, n {args.n}, shots {args.shots}, "
          f"batch {args.batch}, budget {args.max_new_tokens} new tokens")
    with tempfile.TemporaryDirectory() as tmp:
        problems, choices = write_files(Path(tmp), args.n + args.shots)
        for path, modes in ((problems, ("generate", "first_token")), (choices, ("choice",))):
            t = time.perf_counter()
            suite = load_benchmark(path, model.tokenizer, n=args.n, shots=args.shots)
            load_s = time.perf_counter() - t
            mean_len = sum(len(it.clean_tokens) for it in suite.items) / len(suite)
            print(f"{path.name}: {len(suite)} items, mean prompt {mean_len:.0f} tokens, read+tokenize {load_s:.1f} s")
            for mode in modes:
                kw = {"max_new_tokens": args.max_new_tokens} if mode == "generate" else {}
                frame, seconds = timed_score(model, suite, mode, batch_size=args.batch, **kw)
                extra = (f", mean {frame['n_new_tokens'].mean():.1f} new tokens, {frame['hit_budget'].mean():.0%} hit the budget"
                         if mode == "generate" else "")
                print(f"  {mode:12s} {len(frame) / seconds:6.1f} items/s ({seconds:.1f} s), "
                      f"accuracy {frame['correct'].mean():.1%}{extra}")


if __name__ == "__main__":
    main()

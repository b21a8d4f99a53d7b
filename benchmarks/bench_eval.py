"""Benchmark of chapter 4's evaluation pass: from a cached layer on the twin against the bridge, printing ratios.

    python benchmarks/bench_eval.py [--model smollm2-135m] [--per-set 160] [--rounds 2] [--start 13]

Chapter 4 scores every trained row on its arithmetic sets (0- and 3-shot), its validation prompts, the
transfer suites and the controls. :func:`arithlens.analyses.sft.evaluation.evaluate` runs each through
the TransformerLens bridge (and each suite after its shared prefix); :class:`FromLayerEvaluator` caches
the base model's residual stream entering ``--start`` (the key heads' lowest layer; 13 on smollm2-135m)
and runs each row on the twin from there, or from the embedding when the row's delta reaches lower.

Three rows, each timed both ways in one process, interleaved round by round (so load from other
processes hits both alike; the fastest round is reported, the median beside it): the base model; a
delta on the key heads' layer (``--start``: Precise SFT, layer-matched random heads, LoRA); and a delta
on the embedding (full SFT: the whole pass). The evaluator's one-off cache is timed on its own. Then the
evaluator itself with and without packing (items that share their demonstrations run as one shared
beginning and each item's own tokens; without: the evaluator's ``_pack`` answering None, every item its
own row), and on the math sets only (what chapter 4 scores the random draws past its seeds on). Lines
starting with ``ratio`` are new ÷ old time (below 1 is faster). Agreement of the two (correct answers,
same items) is printed too. Times are wall-clock on this machine; compare only the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("ARITHLENS_QUIET", "1")

SUITES = ("multidigit", "decimals", "years", "word_problems", "power", "capitals", "antonyms", "languages", "plurals",
          "past_tense", "elements", "sequences")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-set", type=int, default=160, help="items per arithmetic set (chapter 4: 160)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--start", type=int, default=13, help="the cached layer (the key heads' lowest)")
    args = parser.parse_args()

    import torch

    from arithlens.analyses.sft import evaluation
    from arithlens.analyses.sft.from_layer import FromLayerEvaluator
    from arithlens.core import deltas
    from arithlens.core.models import load_model
    from arithlens.tasks import suites as suites_lib

    lm = load_model(args.model)
    data = evaluation.make_sft_data(lm.tokenizer, max_eval_per_set=args.per_set, eval_shots=(0, 3))
    suites = [suites_lib.make_suite(n, lm.tokenizer, n=48 if suites_lib.SUITES[n].kind == "control" else 16, seed=0)
              for n in SUITES]
    tick = time.perf_counter()
    evaluator = FromLayerEvaluator(lm, data, suites, start=args.start)
    cache_s = time.perf_counter() - tick
    weights = deltas.named_weights(lm)

    def delta(name: str) -> deltas.Delta:
        s = deltas.Slice(name, 0, 0, 16)
        base = deltas.slice_view(weights, s)
        return deltas.Delta({s: base + 0.01 * base.std() * torch.randn(base.shape, generator=torch.Generator().manual_seed(0))})

    rows = {"base model": None,
            f"delta in layer {args.start}": delta(f"model.layers.{args.start}.self_attn.o_proj.weight"),
            "delta in the embedding": delta("model.embed_tokens.weight")}
    items = sum(len(p) for p in data.evals.values()) + sum(len(s.items) for s in suites)
    print(f"{args.model}: {items} items ({len(data.evals)} arithmetic sets, {len(suites)} suites) + "
          f"{len(data.validation)} validation; torch threads {torch.get_num_threads()}; cache entering layer "
          f"{evaluator.start}: {cache_s:.1f} s (once)")
    times = {(r, w): [] for r in rows for w in ("old", "new")}
    agree = {}
    for _ in range(args.rounds):
        for row, d in rows.items():
            tick = time.perf_counter()
            old = evaluation.evaluate(lm, d, data, suites)
            times[(row, "old")].append(time.perf_counter() - tick)
            tick = time.perf_counter()
            new = evaluator.evaluate(d)
            times[(row, "new")].append(time.perf_counter() - tick)
            agree[row] = float((old["correct"].to_numpy() == new["correct"].to_numpy()).mean())
    for row in rows:
        old, new = times[(row, "old")], times[(row, "new")]
        print(f"{row:28s} bridge {min(old):6.1f} s (median {statistics.median(old):.1f})   from layer {min(new):6.1f} s "
              f"(median {statistics.median(new):.1f})   same answers {agree[row]:.1%}")
        print(f"ratio {row}: {min(new) / min(old):.2f}")

    from arithlens.analyses.sft import from_layer

    packing = from_layer._pack
    from_layer._pack = lambda *a: None
    try:
        unpacked = FromLayerEvaluator(lm, data, suites, start=args.start)
    finally:
        from_layer._pack = packing
    d = rows[f"delta in layer {args.start}"]
    ways = {"unpacked": lambda: unpacked.evaluate(d), "packed": lambda: evaluator.evaluate(d),
            "packed, math sets only": lambda: evaluator.evaluate(d, kinds=("math",))}
    spent = {w: [] for w in ways}
    for _ in range(args.rounds):
        for way, run in ways.items():
            tick = time.perf_counter()
            run()
            spent[way].append(time.perf_counter() - tick)
    packed = lambda groups: f"{sum(b.packing is not None for bs in groups for b in bs)} of {sum(map(len, groups))}"
    print(f"packing: {packed(evaluator.suite_batches)} suite batches and {packed(list(evaluator.sets.values()))} arithmetic-set "
          "batches (the sets asked after demonstrations) share a beginning; "
          + ", ".join(f"{w} {min(t):.1f} s" for w, t in spent.items())
          + f"; same answers {float((unpacked.evaluate(d)['correct'] == evaluator.evaluate(d)['correct']).mean()):.1%}")
    print(f"ratio packed: {min(spent['packed']) / min(spent['unpacked']):.2f}")
    print(f"ratio math sets only: {min(spent['packed, math sets only']) / min(spent['unpacked']):.2f}")


if __name__ == "__main__":
    main()

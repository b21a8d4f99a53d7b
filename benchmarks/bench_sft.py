"""Benchmark of Precise SFT against full SFT on the same batch (issue #6's target), printing ratios.

    python benchmarks/bench_sft.py [--model smollm2-135m] [--batch 32] [--length 24] [--rounds 5]

One batch of real arithmetic prompts (``--batch`` prompts of ``--length`` tokens, few-shot so they
are long enough) is trained on by every method. Step times are taken in one process, the methods
interleaved round by round (each round: one warm-up and one timed AdamW step per method), so load
from other processes on a shared machine hits all methods alike; the *fastest* round is reported
(the least-disturbed estimate of the cost; the median is printed beside it).
Peak RSS is measured separately, one fresh process per method (2 steps), so each is its own.

* ``full``            every parameter trainable (the paper's baseline), last-position loss
* ``full-loop``       the same, AdamW stepping tensor by tensor instead of its fused kernel (what the
                      library used before): the ``full / full-loop`` line is the fused kernel's saving
* ``precise``         the chapter-1 key heads (``--heads``) with K/V of their groups; the residual
                      entering the lowest tuned layer is cached, so a step runs only the layers above
* ``precise-nocache`` the same, but the frozen layers below are re-run (without autograd) every step
* ``precise+mlp``     the key heads plus the MLPs of the three layers above the lowest key head
* ``lora``            peft LoRA on q/k/v/o of every layer, rank matched to ``precise``'s parameters

Lines starting with ``ratio`` are the targets (paper: Precise SFT 3.3× faster; target ≤ 1/3). The
cached prefix costs one forward pass through the lower layers per batch; it is paid once and reused
every epoch, so the amortized line adds prefix time ÷ epochs (the paper trains 2 epochs).
Times are wall-clock on this machine; only the ratios are meant to be compared across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("ARITHLENS_QUIET", "1")

METHODS = ("full", "full-loop", "precise", "precise-nocache", "precise+mlp", "lora")
KEY_HEADS = "14.2,20.8,23.0,14.6,18.5,21.1,23.3,21.2,14.4,13.6"  # chapter 1's top-10 on smollm2-135m


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM). Not ``getrusage``: Linux carries its ``ru_maxrss``
    over ``fork`` + ``exec``, so a child of a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024 ** 2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def setup(args):
    """The model, the batch and a function running ``method`` for ``steps`` AdamW steps on it."""
    import torch

    from arithlens.analyses.sft import trainer as ft
    from arithlens.core.twin import make_twin
    from arithlens.analyses.sft.evaluation import make_sft_data
    from arithlens.core.models import load_model
    from arithlens.core.hooks import Head
    from arithlens.core.items import length_groups, to_tokens

    model = load_model(args.model)
    heads = tuple(Head(*map(int, h.split("."))) for h in args.heads.split(","))
    data = make_sft_data(model.tokenizer, shots=args.shots)
    groups = length_groups(data.train.items)
    length = min(groups, key=lambda n: (abs(n - args.length), -len(groups[n])))
    items = [data.train.items[i] for i in (groups[length] * args.batch)[: args.batch]]
    batches = [(to_tokens(items), torch.tensor([it.answer_token for it in items]))]
    twin = make_twin(model)
    low = min(h.layer for h in heads)
    rank = ft.lora_rank_for(model, ft.count_params(model, ft.precise_slices(model, ft.PreciseSFTConfig(heads))))

    def run(method: str, steps: int):
        train = ft.TrainConfig(steps=steps, lr=1e-4, prefix_cache=method != "precise-nocache")
        if method == "full":
            return ft.full_sft(model, batches, train, twin=twin)
        if method == "full-loop":
            fused, ft.fused_adamw = ft.fused_adamw, lambda params: False
            try:
                return ft.full_sft(model, batches, train, twin=twin)
            finally:
                ft.fused_adamw = fused
        if method.startswith("precise"):
            mlps = tuple(range(low, low + 3)) if method == "precise+mlp" else ()
            return ft.precise_sft(model, batches, ft.PreciseSFTConfig(heads, mlp_layers=mlps), train, twin=twin)
        return ft.lora_sft(model, batches, rank, train)

    return run, list(batches[0][0].shape), torch.get_num_threads()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=24, help="prompt length in tokens (the closest available)")
    ap.add_argument("--shots", type=int, default=2, help="few-shot demonstrations (they set the prompt length)")
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per method, interleaved across methods")
    ap.add_argument("--epochs", type=int, default=2, help="epochs the cached prefix is amortized over")
    ap.add_argument("--heads", default=KEY_HEADS, help="comma-separated layer.head list")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rss-of", help=argparse.SUPPRESS)  # internal: peak RSS of one method in a fresh process
    args = ap.parse_args()
    methods = args.methods.split(",")
    run, shape, threads = setup(args)
    if args.rss_of:
        run(args.rss_of, 2)
        print(json.dumps({"peak_rss_gb": peak_rss_gb()}))
        return
    print(f"model {args.model}: batch {shape[0]}×{shape[1]} tokens, {threads} threads, {args.rounds} rounds", flush=True)
    # Interleaved rounds: on a shared machine, load from other processes hits every method alike.
    # Each call takes a warm-up step and one timed step; setup (copies, optimizer, prefix) is not timed.
    steps, prefix, trainable = {m: [] for m in methods}, {m: [] for m in methods}, {}
    for _ in range(args.rounds):
        for m in methods:
            result = run(m, 2)
            steps[m].append(result.step_seconds[1])
            prefix[m].append(result.prefix_seconds)
            trainable[m] = result.n_trainable
    rows = {}
    for m in methods:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--rss-of", m]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[m] = {"step_s": min(steps[m]), "median_s": statistics.median(steps[m]), "prefix_s": min(prefix[m]),
                   "trainable": trainable[m], **json.loads(out)}
        r = rows[m]
        print(f"{m:16s} step {r['step_s']:6.2f} s (median {r['median_s']:.2f}; all {', '.join(f'{x:.2f}' for x in steps[m])})   "
              f"prefix once per batch {r['prefix_s']:5.2f} s   trainable {r['trainable'] / 1e6:7.2f} M   "
              f"peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    if "full" not in rows:
        return
    full = rows["full"]["step_s"]
    for m, r in rows.items():
        if m == "full":
            continue
        if m == "full-loop":
            print(f"ratio full (fused AdamW) / full-loop step time: {full / r['step_s']:.2f}")
            continue
        print(f"ratio {m} / full step time: {r['step_s'] / full:.2f}")
        if m in ("precise", "precise+mlp"):
            print(f"ratio {m} (prefix amortized over {args.epochs} epochs) / full step time: "
                  f"{(r['step_s'] + r['prefix_s'] / args.epochs) / full:.2f}")
    for m in rows:
        if m != "full":
            print(f"ratio {m} peak RSS / full peak RSS: {rows[m]['peak_rss_gb'] / rows['full']['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()

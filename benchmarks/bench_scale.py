"""How the cost of chapter 1's exact head sweeps grows with heads × prompts: ratios to two forwards.

    python benchmarks/bench_scale.py [--models tiny,smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b] [--rounds 3]
                                     [--shapes 30x9x576,24x14x896,28x12x1536,32x16x2048,32x32x4096x32] [--n 64]

For every real model (registry names or specs; models that are not installed are skipped with a line)
and every random-init shape ``LAYERSxHEADSxD_MODEL[xKV_HEADS]`` (a Llama built from a config in-process,
with the tiny models' character tokenizer, intermediate size 8/3 × d_model rounded to 64; 2 or 3 KV
heads unless given: ``32x32x4096x32`` is LLaMA-2-7B's multi-head shape), it
times two plain forward passes over the same ``--n`` three-shot prompts (clean and counterfactual),
then the cached direct and path sweeps of every head (``end_cache.cache_prompt_set`` +
``patching.sweep_many``), and prints one row per model:

    model  layers×heads  d_model  params  prompts  heads×prompts  two forwards (s)  direct ÷ 2 fwd  path ÷ 2 fwd
    path floor ÷ 2 fwd  peak RSS

``path floor`` is the path sweep's multiply-adds ÷ those of two plain forwards (:func:`path_floor`):
the arithmetic any exact implementation of the sweep does, to read the measured time ratio against.

Lines starting with ``ratio`` restate the issue's target (path sweep ÷ two forwards ≤ 2.0). A shape
whose fp32 weights would not fit in the memory this machine has free is skipped with a line saying so.
Each model is measured in a process of its own, so its peak RSS (and peak GPU memory) is its own. With
``--rounds R`` every term (two forwards, cache, direct and path sweeps) is timed R times, interleaved,
and the fastest of each is kept: on a busy machine the ratios then compare like with like. The
random-init shapes use the tiny character tokenizer (a few dozen tokens), so their sweeps leave out the
full-vocabulary logsumexp that real models pay for p(answer): read their ratios as the cost of the
heads and MLPs alone.
Only ratios are meant to be compared across machines. On a GPU machine the same script runs in bf16
(``--device cuda``) and reports peak GPU memory too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

os.environ.setdefault("ARITHLENS_QUIET", "1")

from arithlens.analyses import end_cache, patching  # noqa: E402
from arithlens.core import hooks  # noqa: E402
from arithlens.analyses.attribution import two_forward_seconds  # noqa: E402
from arithlens.core.models import (LoadedModel, build_tiny_tokenizer, default_dtype, load_model,  # noqa: E402
                                   pick_device)
from arithlens.core.registry import ModelSpecError  # noqa: E402
from arithlens.core.specs import ModelSpec  # noqa: E402
from arithlens.core.items import length_batches  # noqa: E402
from arithlens.tasks.prompts import PromptConfig, make_prompts  # noqa: E402


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def free_gb() -> float:
    with open("/proc/meminfo") as fh:
        info = {line.split(":")[0]: int(line.split()[1]) for line in fh}
    return info["MemAvailable"] / 1024 ** 2


def random_model(shape: str, device: torch.device) -> LoadedModel:
    """A random-init Llama of ``LAYERSxHEADSxD_MODEL`` wrapped like any loaded model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformer_lens.model_bridge import TransformerBridge

    layers, heads, d_model, kv_heads = parse_shape(shape)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=64 * round(8 / 3 * d_model / 64),
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=1024, architectures=["LlamaForCausalLM"])
    dtype = default_dtype(device)
    start = time.perf_counter()
    gen = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        hf_model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    finally:
        torch.random.set_rng_state(gen)
    bridge = TransformerBridge.boot_transformers("arithlens-random", hf_model=hf_model, tokenizer=tokenizer,
                                                 device=device, dtype=dtype)
    bridge.eval()
    return LoadedModel(bridge, tokenizer, ModelSpec(f"random:{shape}", "tiny", "llama:0"), device, dtype,
                       time.perf_counter() - start, False)


def parse_shape(shape: str) -> tuple[int, int, int, int]:
    """``LAYERSxHEADSxD_MODEL[xKV_HEADS]`` → (layers, heads, d_model, KV heads); without KV heads, the
    smallest of 2, 3 that divides the heads (the Qwen and SmolLM2 shapes), else as many as heads."""
    parts = [int(x) for x in shape.lower().split("x")]
    if len(parts) not in (3, 4) or parts[1] % (parts[3] if len(parts) == 4 else 1):
        raise SystemExit(f"bad shape {shape!r}: expected LAYERSxHEADSxD_MODEL[xKV_HEADS], KV heads dividing heads")
    if len(parts) == 4:
        return tuple(parts)  # type: ignore[return-value]
    layers, heads, d_model = parts
    return layers, heads, d_model, next((k for k in (2, 3) if heads % k == 0), heads)


def shape_params(shape: str) -> int:
    layers, _, d_model, _ = parse_shape(shape)
    return layers * (4 * d_model * d_model + 3 * d_model * 64 * round(8 / 3 * d_model / 64))


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def path_floor(model: LoadedModel, prompts) -> float:
    """Multiply-adds of the cached path sweep with p(answer), ÷ those of two plain forward passes.

    The arithmetic any exact implementation does (attention scores left out on both sides): the
    cache runs the shared prefix once and the suffix twice; the sweep re-runs every later gated MLP
    at END once per head (heads of layer l meet L − l MLPs), and unembeds every head's final residual
    over the whole vocabulary for the logsumexp. Time can fall a little below it only where the
    sweep's large products run faster per multiply-add than the forward's many small ones; a time
    target well below it needs another metric or an approximation.
    """
    cfg = model.cfg
    unembed = cfg.d_vocab * cfg.d_model
    body = sum(p.numel() for name, p in model.bridge.original_model.named_parameters()
               if "embed" not in name and "lm_head" not in name)
    tokens = sum(len(it.clean_tokens) for it in prompts.items)
    suffix = 0  # tokens run twice (after the prefix clean and counterfactual share), as cache_end runs them
    for batch in length_batches(prompts.items, 16):  # cache_prompt_set's batches
        items = [prompts.items[i] for i in batch]
        suffix += (len(items[0].clean_tokens) - end_cache.counterfactual_prefix_length(items)) * len(items)
    forward = (body + unembed) * tokens
    cache = body * (tokens - suffix) + (body + unembed) * 2 * suffix
    rows = model.n_heads * sum(range(1, model.n_layers + 1))  # (head, later MLP) pairs
    sweep = len(prompts) * (rows * 3 * cfg.d_model * cfg.d_mlp + model.n_layers * model.n_heads * unembed)
    return (cache + sweep) / (2 * forward)


def measure(name: str, model: LoadedModel, n: int, rounds: int = 1) -> dict:
    """One model's row. With ``rounds`` > 1 the two forwards, the cache and both sweeps are timed once per
    round, interleaved, and the fastest of each is kept: load from other processes then hits every term
    alike, and the ratios are the least-disturbed estimates."""
    full = make_prompts(model.tokenizer, PromptConfig(n_per_cell=max(2, n // 40 + 2), shots=3, seed=0))
    prompts = full.subset([i < n for i in range(len(full))])
    digits = hooks.digit_tokens(model.tokenizer)
    best = dict.fromkeys(("two", "cache", "direct", "path"), float("inf"))
    for _ in range(max(1, rounds)):
        best["two"] = min(best["two"], two_forward_seconds(model, prompts))  # clean + counterfactual, after a warm-up
        caches, t = timed(lambda: end_cache.cache_prompt_set(model, prompts))
        best["cache"] = min(best["cache"], t)
        for mode in ("direct", "path"):
            _, t = timed(lambda: patching.sweep_many(model, caches, mode, digits, True))
            best[mode] = min(best[mode], t)
    two, t_cache = best["two"], best["cache"]
    row = {"model": name, "layers×heads": f"{model.n_layers}×{model.n_heads}", "d_model": int(model.cfg.d_model),
           "params (M)": round(model.n_params / 1e6, 1), "prompts": len(prompts),
           "heads×prompts": model.n_layers * model.n_heads * len(prompts), "two forwards (s)": round(two, 2),
           "fast path": patching.fast_path_supported(model), "rounds": max(1, rounds)}
    for mode in ("direct", "path"):
        row[f"{mode} ÷ 2 fwd"] = round((t_cache + best[mode]) / two, 2)
    row["path floor ÷ 2 fwd"] = round(path_floor(model, prompts), 2)
    row["peak RSS (GB)"] = round(peak_gb(), 2)
    if torch.cuda.is_available():
        row["peak GPU (GB)"] = round(torch.cuda.max_memory_allocated() / 1024 ** 3, 2)
    return row


def measure_one(entry: str, n: int, device: torch.device, rounds: int = 1) -> dict | str:
    """The row of one model or ``random:SHAPE``, or the line saying why it was skipped."""
    if entry.startswith("random:"):
        shape = entry.split(":", 1)[1]
        need = shape_params(shape) * (2 if device.type == "cuda" else 4) / 1024 ** 3 * 1.5
        if device.type == "cpu" and need > free_gb():
            return f"skip {entry}: needs ~{need:.0f} GB, {free_gb():.0f} GB free"
        return measure(entry, random_model(shape, device), n, rounds)
    try:
        model = load_model(entry, device=device)
    except ModelSpecError as exc:
        return f"skip {entry}: {exc}"
    return measure(entry, model, n, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b")
    ap.add_argument("--shapes", default="30x9x576,24x14x896,28x12x1536,32x16x2048,32x32x4096x32",
                    help="random-init Llama shapes LAYERSxHEADSxD_MODEL (empty: none)")
    ap.add_argument("--n", type=int, default=64, help="prompts per model")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every term this many times, interleaved, keeping the fastest (3 on a busy machine)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one entry, print JSON
    args = ap.parse_args()
    device = pick_device(args.device)
    if args.one:
        print("ROW " + json.dumps(measure_one(args.one, args.n, device, args.rounds)), flush=True)
        return
    print(f"device {device}, threads {torch.get_num_threads()}, {args.n} prompts per model, one process per model, "
          f"{max(1, args.rounds)} round(s), fastest kept")
    entries = [m for m in args.models.split(",") if m] + [f"random:{s}" for s in args.shapes.split(",") if s]
    rows = []
    for entry in entries:
        cmd = [sys.executable, __file__, "--one", entry, "--n", str(args.n), "--device", device.type, "--rounds", str(args.rounds)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or not found:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"skip {entry}: measurement failed (exit {done.returncode}): {tail}", flush=True)
            continue
        row = json.loads(found[0])
        print(row if isinstance(row, str) else json.dumps(row, ensure_ascii=False), flush=True)
        if isinstance(row, dict):
            rows.append(row)
    if not rows:
        return
    import pandas as pd

    table = pd.DataFrame(rows)
    print()
    print(table.to_string(index=False))
    for r in rows:
        print(f"ratio path_sweep/two_forwards {r['model']} = {r['path ÷ 2 fwd']:.2f} (target <= 2.0; "
              f"in multiply-adds {r['path floor ÷ 2 fwd']:.2f})")


if __name__ == "__main__":
    main()

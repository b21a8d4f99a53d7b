"""Benchmark of the default model's load: first load (GGUF dequantization) vs cached load.

    python benchmarks/bench_load.py [--model smollm2-135m]

Each load runs in a fresh Python process (nothing is cached in memory) against an empty, temporary
``ARITHLENS_CACHE``; the first call fills it, the second reads it. Issue #2's target: a cached load
takes at most 5 s. Prints the ratio on a line starting with ``ratio``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

SNIPPET = "import time, sys; t = time.perf_counter(); from arithlens.core.models import load_model; " \
          "m = load_model(sys.argv[1]); print(time.perf_counter() - t, m.from_cache)"


def timed_load(model: str, cache: str) -> tuple[float, bool]:
    env = {**os.environ, "ARITHLENS_CACHE": cache}
    out = subprocess.run([sys.executable, "-c", SNIPPET, model], env=env, capture_output=True, text=True, check=True)
    seconds, from_cache = out.stdout.split()[-2:]
    return float(seconds), from_cache == "True"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        first, cached_first = timed_load(args.model, cache)
        second, cached_second = timed_load(args.model, cache)
    assert not cached_first and cached_second, "the second load did not come from the cache"
    print(f"first load (dequantize + write cache): {first:.1f} s")
    print(f"cached load: {second:.1f} s (target <= 5 s)")
    print(f"ratio cached_load/first_load = {second / first:.3f}")


if __name__ == "__main__":
    main()

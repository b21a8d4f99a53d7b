"""Does a chapter give the same tables when it runs twice? (issue: "chapters that cannot go stale")

Runs the book's chapters (or those given) on a model into a fresh run store and compares every
parquet table with the same runs in a second store — by default the project's own ``runs/`` (what
``make book`` filled), executing there too whatever is missing. Same chapter, model, parameters,
seed, code, at torch's default thread count: the tables must be identical.

    python scripts/check_determinism.py                         # default model, every chapter, against runs/
    python scripts/check_determinism.py --model tiny --chapters 00_task 01_heads --against /tmp/a
    python scripts/check_determinism.py --against ../other-clone/runs --store runs   # two existing stores

Prints one line per table and exits 1 if any differs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from arithlens import paths
from arithlens.runner import runs, store
from arithlens.runner.chapters import find_chapter
from arithlens.runner.book import toc_chapters
from arithlens.core.registry import DEFAULT_MODEL


def _execute_all(root: Path, chapters: list[str], model: str, given: dict) -> dict[str, Path]:
    os.environ["ARITHLENS_RUNS"] = str(root)
    done = {}
    for plan in runs.plan_book(chapters, model, given):
        started = time.time()
        result = runs.execute(plan, log=lambda m: None)
        print(f"  {plan.chapter}: {'reused' if result.reused else f'ran in {time.time() - started:.0f} s'} ({result.path})",
              flush=True)
        done[plan.chapter] = result.path
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--chapters", nargs="*", help="chapter ids (default: the book's)")
    parser.add_argument("--param", action="append", default=[], metavar="CHAPTER.KEY=VALUE")
    parser.add_argument("--against", help="the first run store (default: the project's runs/)")
    parser.add_argument("--store", help="the second run store (default: a fresh temporary one)")
    args = parser.parse_args()
    chapters = [find_chapter(c) for c in (args.chapters or toc_chapters())]
    given = runs.gather_overrides(args.param)
    first_root = Path(args.against).expanduser().resolve() if args.against else paths.runs_root()
    print(f"model {args.model}, torch {torch.__version__} with {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    print(f"first store {first_root}:")
    first = _execute_all(first_root, chapters, args.model, given)
    with tempfile.TemporaryDirectory(prefix="arithlens-determinism-") as tmp:
        second_root = Path(args.store).expanduser().resolve() if args.store else Path(tmp)
        print(f"second store {second_root}:")
        second = _execute_all(second_root, chapters, args.model, given)
        different = 0
        for chapter in first:
            if first[chapter] == second[chapter]:
                raise SystemExit(f"both stores are the same directory {first[chapter]}: give two stores")
            for row in store.compare_tables(first[chapter], second[chapter]):
                different += not row["equal"]
                print(f"{chapter:16s} {row['table']:32s} {'identical' if row['equal'] else 'DIFFERENT'}  {row['note']}")
    print(f"{different} table(s) differ" if different else "every table identical")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())

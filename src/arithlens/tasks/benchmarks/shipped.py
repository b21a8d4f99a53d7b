"""The public benchmarks that ship with arithlens: which, from where, under what license, asked how.

Science wing, beside :mod:`arithlens.tasks.benchmarks.reader` (which reads any benchmark file) and
:mod:`arithlens.tasks.benchmarks.scoring` (which scores it). The paper's Table 1 reports GSM8K, AddSub,
SingleEq and SVAMP (math) and MMLU and CommonsenseQA (non-math). Three of them ship here, copied from
their authors' GitHub repositories at a fixed commit, each under its MIT license (texts in
``arithlens/data/benchmarks/licenses/``; sources, commits, subsets and checksums in
``arithlens/data/benchmarks/SOURCES.md``). Nothing is downloaded at run time, and the run key hashes the
files' bytes (each is read through a literal :func:`arithlens.paths.data_file` call).

========  =========================  ========================================  ===================
name      kind, how it is asked      demonstrations                            items
========  =========================  ========================================  ===================
gsm8k     math, chain of thought     4 worked solutions from its train split   the test split, 1319
svamp     math, direct answer        3 items of the same file, never queried   all 1000
mmlu      non-math, choice letter    5 items of its dev split (seeded)         570 of the test split
========  =========================  ========================================  ===================

AddSub, SingleEq and CommonsenseQA do not ship (:data:`NOT_SHIPPED` says why); a reader who has them
passes the files to a chapter's ``benchmark_files``.

Written by hand: the registry, and how each benchmark is asked (the formats are read by
:mod:`arithlens.tasks.benchmarks.formats`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from arithlens.paths import data_file
from arithlens.tasks.benchmarks import cot, reader
from arithlens.tasks.benchmarks.scoring import evaluate_benchmarks
from arithlens.tasks.suites import Kind, Suite


@dataclass(frozen=True)
class ShippedBenchmark:
    """One shipped benchmark: what it is, where it comes from, and how a chapter asks it."""

    name: str
    title: str                       # as the paper's Table 1 heads its column
    kind: Kind                       # math or control (non-math)
    mode: str                        # the scoring of :mod:`arithlens.tasks.benchmarks.scoring`: cot, generate, choice
    shots: int
    source: str                      # owner/repository @ commit
    license: str
    drawn: str                       # which rows ship
    file: Callable[[], Path]
    demos: Callable[[], Path] | None = None

    @property
    def asked(self) -> str:
        return {"cot": f"chain of thought, {self.shots} worked solutions, at most {cot.BUDGET} new tokens",
                "generate": f"direct answer, {self.shots}-shot, greedy",
                "choice": f"choice letter, {self.shots}-shot"}[self.mode]


SHIPPED: dict[str, ShippedBenchmark] = {b.name: b for b in [
    ShippedBenchmark("gsm8k", "GSM8K", "math", "cot", 4, "openai/grade-school-math @ 3101c7d",
                     "MIT (Copyright (c) 2021 OpenAI)", "the whole test split (1319); demonstrations from 64 "
                     "train rows drawn by a seeded rule",
                     lambda: data_file("benchmarks/gsm8k_test.jsonl"),
                     lambda: data_file("benchmarks/gsm8k_train_demos.jsonl")),
    ShippedBenchmark("svamp", "SVAMP", "math", "generate", 3, "arkilpatel/SVAMP @ 689d7cc",
                     "MIT (Copyright (c) 2021 Arkil Patel)", "the whole file (1000)",
                     lambda: data_file("benchmarks/svamp.json")),
    ShippedBenchmark("mmlu", "MMLU", "control", "choice", 5, "hendrycks/test @ 785eba5",
                     "MIT (Copyright (c) 2020 Dan Hendrycks)", "10 test rows per subject (570) and the dev "
                     "split, from the repository's first, in-repository version (13 of the 570 are worded "
                     "differently in the later release)",
                     lambda: data_file("benchmarks/mmlu_test_subset.jsonl"),
                     lambda: data_file("benchmarks/mmlu_dev.jsonl")),
]}

#: Table 1's benchmarks that do not ship, and why.
NOT_SHIPPED = {
    "AddSub": "no license allowing redistribution at its source (the MAWPS repository has none; the authors' "
              "release is off GitHub)",
    "SingleEq": "as AddSub: no license at its source",
    "CSQA": "the license (MIT) is stated only in a maintainer's comment, with no license file, and the data "
            "files are not in the official repository",
}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def training_solutions() -> list[dict]:
    """GSM8K's shipped training rows (``question``, ``answer`` with its worked solution): the demonstrations
    of every chain of thought."""
    return _rows(SHIPPED["gsm8k"].demos())


def load_shipped(name: str, tokenizer, n: int | None = None, seed: int = 0) -> Suite:
    """Up to ``n`` items (a seeded sample, in file order) of shipped benchmark ``name``, with its
    demonstrations: GSM8K's worked solutions (:func:`arithlens.tasks.benchmarks.cot.worked_prefix`), MMLU's
    dev rows (seeded, one shared prefix for every subject), SVAMP's own rows (never queried)."""
    if name not in SHIPPED:
        raise ValueError(f"no shipped benchmark {name!r}: choose from {sorted(SHIPPED)}")
    spec = SHIPPED[name]
    bench = reader.read_benchmark(spec.file(), strict=True)
    if spec.mode == "cot":
        prefix = cot.worked_prefix(training_solutions(), spec.shots)
    elif spec.demos is not None:
        dev = reader.read_benchmark(spec.demos(), strict=True)
        order = list(range(len(dev.records)))
        random.Random(f"{seed}|demonstrations").shuffle(order)
        prefix = "".join(reader.render_demo(dev.records[i], dev) for i in order[: spec.shots])
    else:
        prefix = None
    return reader.make_benchmark_suite(bench, tokenizer, n=n, shots=spec.shots, seed=seed, name=name,
                                       kind=spec.kind, demonstrations=prefix)


def modes(names) -> dict[str, str]:
    """The scoring mode of each named shipped benchmark."""
    return {name: SHIPPED[name].mode for name in names}


def ask(model, delta, suites) -> tuple[pd.DataFrame, float]:
    """Shipped benchmark suites asked of ``model`` with ``delta`` applied (None: the base model), each in its own
    mode (:func:`arithlens.tasks.benchmarks.scoring.evaluate_benchmarks`'s rows), and the wall-clock seconds taken."""
    start = time.perf_counter()
    frame = evaluate_benchmarks(model, delta, suites, modes=modes(s.name for s in suites))
    return frame, round(time.perf_counter() - start, 1)


def shipped_table(names=None) -> pd.DataFrame:
    """One row per shipped benchmark (or those named): how it is asked, its source, license and rows."""
    return pd.DataFrame([{"benchmark": b.title, "kind": "math" if b.kind == "math" else "non-math",
                          "asked": b.asked, "source": b.source, "license": b.license, "rows shipped": b.drawn}
                         for b in SHIPPED.values() if names is None or b.name in names])

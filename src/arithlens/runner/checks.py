"""What each chapter parameter's value may be: one rule per parameter, checked before any kernel starts.

Publishing wing (paper: none). :func:`arithlens.runner.runs.check_parameters` checks each given
parameter's name and type against the chapter's ``parameters`` cell; :func:`check_values` then checks
every value against its rule here, so ``arithlens run 01_heads --param top_k=-3`` stops in seconds
with one line — the parameter, the value and the rule — instead of minutes into a kernel.

* :data:`RULES` — by parameter name, for every chapter that has the parameter (``seed`` means the
  same everywhere); :data:`CHAPTER_RULES` where a chapter uses a name for something else (chapter
  0's ``shots`` is a list; chapter 6's ``threshold`` is a correlation).
* :data:`RELATIONS` — rules between two parameters of one chapter (chapter 0's ``analysis_shots``
  must be among its ``shots``).
* :data:`FREE_FORM` — parameters whose type is their whole rule, each with the reason.

Names the library defines (operators, templates, suites, patching modes, metrics) are read from the
library when a value is checked, so a new template is accepted without an edit here. The rules hold
no defaults: the notebooks' ``parameters`` cells do. Written by hand.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arithlens.runner.chapters import RunError


@dataclass(frozen=True)
class Rule:
    """A rule for one value: ``holds`` tests it (it already has its default's type), ``says`` finishes
    the sentence "must be …" (a function where the words list names read from the library)."""

    holds: Callable[[Any], bool]
    says: str | Callable[[], str]

    def words(self) -> str:
        return self.says() if callable(self.says) else self.says


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def count(least: int = 1) -> Rule:
    """A whole number of at least ``least`` (items, seeds, steps, resamples)."""
    return Rule(lambda v: _whole(v) and v >= least, f"a whole number ≥ {least}")


def number(low: float | None = None, high: float | None = None, *, open_low: bool = False,
           open_high: bool = False) -> Rule:
    """A finite number from ``low`` to ``high`` (None: no bound); an open end excludes the bound itself."""
    def holds(v: Any) -> bool:
        return (_real(v) and (low is None or (v > low if open_low else v >= low))
                and (high is None or (v < high if open_high else v <= high)))
    if low is not None and high is not None:
        says = f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    elif low is not None:
        says = f"a number {'>' if open_low else '≥'} {low:g}"
    else:
        says = f"a number {'<' if open_high else '≤'} {high:g}"
    return Rule(holds, says)


def name_in(names: Callable[[], Iterable[str]], what: str) -> Rule:
    """One of the names ``names()`` gives (read when a value is checked)."""
    return Rule(lambda v: isinstance(v, str) and v in set(names()), lambda: f"{what}: one of {', '.join(names())}")


def each(rule: Rule, *, empty: bool = False, distinct: bool = True) -> Rule:
    """A list whose every element keeps ``rule``; non-empty unless ``empty``, no repeats if ``distinct``."""
    def holds(v: Any) -> bool:
        items = [repr(x) for x in v]
        return ((empty or len(v) > 0) and all(rule.holds(x) for x in v)
                and (not distinct or len(set(items)) == len(items)))
    return Rule(holds, lambda: (f"a {'' if empty else 'non-empty '}list{' without repeats' if distinct else ''}, "
                                f"each {rule.words()}"))


def span(least: int = 0) -> Rule:
    """Two whole numbers ``[low, high]`` with ``least ≤ low ≤ high``."""
    return Rule(lambda v: len(v) == 2 and all(_whole(x) for x in v) and least <= v[0] <= v[1],
                f"two whole numbers [low, high] with {least} ≤ low ≤ high")


def _operators() -> list[str]:
    from arithlens.tasks import prompts
    return list(prompts.OPERATORS)


def _templates() -> list[str]:
    from arithlens.tasks import prompts
    return list(prompts.TEMPLATES)


def _counterfactuals() -> list[str]:
    import typing

    from arithlens.tasks import prompts
    return list(typing.get_args(prompts.Counterfactual))


def _suites() -> list[str]:
    from arithlens.tasks import suites
    return list(suites.SUITES)


def _shipped() -> list[str]:
    from arithlens.tasks.benchmarks import shipped
    return list(shipped.SHIPPED)


def _metrics() -> list[str]:
    from arithlens.core import metrics
    return list(metrics.METRIC_TITLES)


def _patching_modes() -> list[str]:
    from arithlens.analyses import patching
    return list(patching.MODES)


def _lead_modes() -> list[str]:  # chapter 1 leads with a per-head sweep; "total" is measured on a subset
    return [m for m in _patching_modes() if m != "total"]


def _selection_rules() -> list[str]:
    from arithlens.core import metrics
    return list(typing.get_args(metrics.Rule))


def _kv_policies() -> list[str]:
    from arithlens.analyses.sft import trainer
    return list(typing.get_args(trainer.KVPolicy))


def _lens_case(v: Any) -> bool:
    from arithlens.tasks import prompts
    return (isinstance(v, list) and len(v) == 3 and _whole(v[0]) and _whole(v[2]) and min(v[0], v[2]) >= 0
            and v[1] in prompts.OPERATORS and prompts.OPERATORS[v[1]].apply(v[0], v[2]) is not None)


COUNT, COUNT0 = count(1), count(0)
FRACTION = number(0, 1)
SHARE = number(0, 1, open_low=True)  # a positive share: 0 would keep nothing
OPERATOR = name_in(_operators, "an operator")
TEMPLATE = name_in(_templates, "a template")
SUITE = name_in(_suites, "a suite")
#: Chapter 4 trains random heads and LoRA from the key heads' lowest layer up ("band") or anywhere ("all").
FILE = Rule(lambda v: isinstance(v, str) and Path(v).expanduser().is_file(), "a file that exists")
#: The files' contents are keyed too (:func:`arithlens.runner.runs.data_files`).
FILES = each(FILE, empty=True)

NAME = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty name")

RULES: dict[str, Rule] = {
    # prompts, seeds and intervals (chapters 0, 1, 3, 4, 6, 7)
    "seed": COUNT0,  # numpy's generators refuse negative seeds
    "n_per_cell": COUNT,
    "operators": each(OPERATOR),
    "templates": each(TEMPLATE),
    "template": TEMPLATE,
    "shots": COUNT0,
    "analysis_shots": COUNT0,
    "operand_range": span(0),
    "min_correct": COUNT0,
    "n_boot": COUNT,  # bootstrap resamples behind every interval
    # chapter 1: heads
    "modes": each(name_in(_patching_modes, "a patching mode")),
    "n_total_prompts": COUNT,
    "lead_mode": name_in(_lead_modes, "a per-head patching mode"),
    "lead_metric": name_in(_metrics, "a metric"),
    "selection": name_in(_selection_rules, "a selection rule"),
    "top_k": COUNT,
    "threshold": number(high=0),  # key heads lower the answer: the paper's −5 %
    "min_effect": number(0),
    "knockout_k_max": COUNT,
    "knockout_seeds": COUNT,
    "all_positions_k": each(COUNT),
    "matched_draws": count(20),  # the knockout verdict's layer-matched draws: fewer cannot reach p < 0.05
    "few_points": each(COUNT),
    "counterfactuals": each(name_in(_counterfactuals, "a counterfactual")),
    "n_counterfactual_prompts": COUNT,
    "role_min_share": FRACTION,
    # chapter 2: MLPs and the logit lens
    "lens_template": TEMPLATE,
    "lens_cases": each(Rule(_lens_case, "[A, OPERATOR, B] with whole A, B ≥ 0 whose answer is a whole number")),
    "rise": SHARE,
    # chapter 3: transfer
    "n_items": COUNT,
    "suite_names": each(SUITE, empty=True),
    "benchmark_files": FILES,
    "benchmarks": each(name_in(_shipped, "a shipped benchmark"), empty=True),
    "n_random_seeds": COUNT,
    "margin": number(-1, 1),  # accuracy above chance; −1 keeps every suite
    "localize_top_k": COUNT,
    "mean_per_cell": COUNT,
    # chapter 4: Precise SFT
    "heldout_templates": each(TEMPLATE),
    "eval_shots": each(COUNT0),
    "max_eval_per_set": COUNT0,  # 0: every held-out item
    "key_heads_top_k": COUNT,
    "kv_policy": name_in(_kv_policies, "a key/value policy"),
    "steps": COUNT,
    "batch_size": COUNT,
    "lr_grid": each(number(0, open_low=True)),
    "full_lr_grid": each(number(0, open_low=True)),
    "lora_lr_grid": each(number(0, open_low=True)),
    "weight_decay": number(0),
    "training_seeds": COUNT,
    "random_draws": COUNT,
    "all_layer_draws": COUNT0,
    "head_counts": each(COUNT, empty=True),
    "mlp_counts": each(COUNT, empty=True),
    "suites": each(SUITE, empty=True),
    "n_suite": COUNT,
    "n_control": COUNT,
    "n_benchmark": COUNT,
    "n_cot": COUNT,  # chain-of-thought items per benchmark asked that way (GSM8K): up to 256 tokens each
    "train_file": Rule(lambda v: v == "" or FILE.holds(v), 'a file that exists, or "" for the generated arithmetic'),
    # chapter 5: across models (the specs themselves are checked when a model is planned)
    "models": each(NAME, empty=True),
    "skip_chapters": Rule(lambda v: all(isinstance(cs, list) and all(map(NAME.holds, cs)) for cs in v.values()),
                          "a mapping MODEL: [CHAPTER, …]"),
    # chapter 6: numbers and neurons
    "number_template": Rule(lambda v: v.count("{n}") == 1, "text with exactly one {n} slot for the number"),
    "number_range": span(0),
    "depth_fractions": each(FRACTION),
    "periods": each(number(1, open_low=True)),  # a period of 1 is constant on whole numbers
    "operand_periods": each(number(1, open_low=True)),
    "n_mlp_layers": COUNT,
    "top_percent": number(0, 100, open_low=True),
    "keep_percents": each(number(0, 100, open_low=True)),
    # chapter 7: robustness
    "mode": name_in(_patching_modes, "a patching mode"),
    "metric": name_in(_metrics, "a metric"),
    "ig_steps": COUNT,
    "curve_points": each(COUNT0),
    "n_null_sets": COUNT,
    "n_suite_null_sets": COUNT,
    "n_random_ablation": COUNT,
    "survive_share": FRACTION,
}

#: Where a chapter gives a shared name another meaning.
CHAPTER_RULES: dict[str, dict[str, Rule]] = {
    "00_task": {"shots": each(COUNT0)},  # every shot count is scored; one of them is analysed
    "06_numbers": {"threshold": FRACTION},  # the correlation a neuron's best pattern needs to be typed
}


@dataclass(frozen=True)
class Relation:
    """A rule between parameters of one chapter: ``holds`` tests the whole parameter set."""

    names: tuple[str, ...]
    holds: Callable[[dict], bool]
    says: str


RELATIONS: dict[str, tuple[Relation, ...]] = {
    "00_task": (Relation(("analysis_shots", "shots"), lambda p: p["analysis_shots"] in p["shots"],
                         "analysis_shots must be one of shots"),),
    "01_heads": (Relation(("lead_mode", "modes"), lambda p: p["lead_mode"] in p["modes"],
                          "lead_mode must be one of modes"),),
    "03_transfer": (Relation(("suite_names", "benchmarks", "benchmark_files"),
                             lambda p: bool(p["suite_names"] or p["benchmarks"] or p["benchmark_files"]),
                             "suite_names, benchmarks and benchmark_files cannot all be empty"),),
    "04_precise_sft": (Relation(("heldout_templates",),
                                lambda p: len(set(p["heldout_templates"])) < len(_templates()),
                                "heldout_templates must leave at least one template to train on"),),
    "08_benchmarks": (Relation(("benchmarks",), lambda p: bool(p["benchmarks"]), "benchmarks cannot be empty"),),
}

#: Parameters whose type is the whole rule, and why.
FREE_FORM: dict[str, str] = {
    "filter_correct": "a flag", "own_means": "a flag", "resample_check": "a flag", "localize_correct_only": "a flag",
    "rescale": "a flag", "anti_key": "a flag",
}


def rule_for(chapter: str, name: str) -> Rule | None:
    """The rule a chapter's parameter keeps, or None (free-form, or no rule written yet)."""
    return CHAPTER_RULES.get(chapter, {}).get(name) or RULES.get(name)


def _keeps(rule: Rule, value: Any) -> bool:
    try:
        return bool(rule.holds(value))
    except (TypeError, ValueError, AttributeError):  # e.g. a list of lists where names were expected
        return False


def check_values(chapter: str, params: dict[str, Any]) -> None:
    """Raise a one-line :class:`RunError` for the first value that breaks its rule or a relation."""
    for name, value in params.items():
        rule = rule_for(chapter, name)
        if rule is not None and not _keeps(rule, value):
            raise RunError(f"parameter {name!r} of {chapter} is {value!r}; it must be {rule.words()}")
    for relation in RELATIONS.get(chapter, ()):
        if all(n in params for n in relation.names) and not relation.holds(params):
            shown = ", ".join(f"{n}={params[n]!r}" for n in relation.names)
            raise RunError(f"parameters of {chapter} ({shown}): {relation.says}")

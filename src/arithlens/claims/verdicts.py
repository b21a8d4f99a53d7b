"""The paper's six claims, each decided on one model by a stated rule applied to that model's run tables,
chapter 7's three harder tests of C1, C3 and C5 (R1, R3, R5) and chapter 4's of C6 (R6).

Science wing (paper § 3–5). A *verdict* is one of ``holds`` / ``partly`` / ``does not hold`` /
``not testable``; :data:`RULES` states each rule in words, and the function beside it applies exactly
that rule to the chapter runs the run graph handed over (``{chapter: run}``, a run being anything with
``table(name)``, ``parameters`` and ``key``, e.g. ``record.RunResult``). Every verdict carries the
numbers that decided it, so a cell of the table can be checked against its chapter.

Used by the "Across models" chapter (which saves the table), by the book's first page (rendered from
that chapter's saved table), by ``arithlens compare`` (terminal) and by every chapter page that states
a verdict: the page decides its claims with :func:`page_verdicts` on its own run — the tables it saves,
wrapped by :func:`arithlens.record.page_run` — and shows them with :func:`verdict_markdown`, so a page
and the first page can never read the same run differently. The intervals are those of
:mod:`arithlens.claims.intervals` (each says what it resampled); every change to a rule after its first
version is in :data:`RULE_HISTORY`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.stats import fisher_exact

from arithlens.analyses.sft.naming import FULL, PRECISE, RANDOM, method_family
from arithlens.claims.findings import Run
from arithlens.claims.intervals import holm, knockout_gap, recovered, routed_share, transfer_contrast
from arithlens.claims.rules import CLAIMS, RULES, rule_version

HOLDS, PARTLY, FAILS, UNTESTABLE = "holds", "partly", "does not hold", "not testable"
VERDICTS = (HOLDS, PARTLY, FAILS, UNTESTABLE)

@dataclass(frozen=True)
class Verdict:
    """One cell of the table: the claim on one model, the rule's outcome and the numbers behind it."""

    claim: str
    verdict: str
    numbers: str
    chapter: str

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {self.verdict!r}")


def _grade(*parts: object) -> str:
    """Holds when every part of a claim does, partly when some do, does not hold when none does."""
    n_true = sum(bool(p) for p in parts)
    return HOLDS if n_true == len(parts) else PARTLY if n_true else FAILS


def model_shape(heads_run: Run) -> tuple[int, int]:
    """(layers, heads per layer) from chapter 1's per-head table, which lists every head."""
    eff = heads_run.table("effects_summary")
    return int(eff["layer"].max()) + 1, int(eff["head"].max()) + 1


def relative_logit_effects(heads_run: Run) -> pd.Series:
    """Chapter 1's mean relative change of the answer logit per head, in its lead patching mode (what the
    paper's −5 % / −1 % rules threshold)."""
    eff = heads_run.table("effects_summary")
    return eff[(eff["mode"] == heads_run.parameters.get("lead_mode", "path")) & (eff["metric"] == "rel_logit")]["mean"]


def depth(layer: float, n_layers: int) -> float:
    """Fraction of depth at the middle of ``layer`` (layer 0 of 30 → 0.017; the last → 0.983)."""
    return (layer + 0.5) / n_layers


#: The paper's band of key heads as fraction of depth: layers 12–17 of LLaMA2-7B's 32 (their edges).
PAPER_BAND = (12 / 32, 18 / 32)
#: C1's scale-free *few*: the top share of heads kept, and the fraction of the behaviour they must recover.
FEW_SHARE, FEW_RECOVERED = 0.05, 0.8


def few_heads(heads_run: Run) -> pd.DataFrame | None:
    """Per convention (``ranking``: direct, path): the top-5 % count n, the fraction F(n) its heads recover
    alone with a 95 % interval over prompts (:func:`arithlens.claims.intervals.recovered` on chapter 1's
    ``few_heads_items``), and the smallest n measured on the ``few_heads_curve`` with F ≥ 0.8 (None when
    none reaches it); None for a run that has neither."""
    curve, items = table_or_none(heads_run, "few_heads_curve"), table_or_none(heads_run, "few_heads_items")
    if curve is None or items is None or not len(curve) or not len(items):
        return None
    rows = []
    for r in recovered(items).itertuples():
        part = curve[curve["ranking"] == r.ranking]
        enough = part[part["fraction_recovered"] >= FEW_RECOVERED]["n"]
        rows.append({"ranking": r.ranking, "n_heads": int(part["n_heads"].iloc[0]), "n_few": r.n,
                     "recovered": float(r.recovered), "low": float(r.low), "high": float(r.high), "n_prompts": r.n_prompts,
                     "k80": int(enough.min()) if len(enough) else None})
    return pd.DataFrame(rows)


def claim_c1(runs: Mapping[str, Run]) -> Verdict:
    heads = runs["01_heads"]
    n_layers, _ = model_shape(heads)
    key = heads.table("key_heads")
    few = few_heads(heads)
    if not len(key) or few is None:
        return Verdict("C1", UNTESTABLE, "chapter 1 selected no key heads or measured no few-heads curve", "01_heads")
    few = few.set_index("ranking")
    band = depth(float(np.median(key["layer"])), n_layers)
    parts = [bool(few.loc[m, "recovered"] >= FEW_RECOVERED) if m in few.index else False for m in ("direct", "path")]
    mid = PAPER_BAND[0] <= band <= PAPER_BAND[1]
    k80 = lambda m: (f"80 % needs {few.loc[m, 'k80']} ({few.loc[m, 'k80'] / few.loc[m, 'n_heads']:.0%})"
                     if few.loc[m, "k80"] is not None and not pd.isna(few.loc[m, "k80"]) else "no measured n reaches 80 %")
    said = "; ".join(f"{m}: top {few.loc[m, 'n_few']} recover {few.loc[m, 'recovered']:.0%} [{few.loc[m, 'low']:.0%}, "
                     f"{few.loc[m, 'high']:.0%}], {k80(m)}" for m in ("direct", "path") if m in few.index)
    said += f" ({int(few['n_prompts'].iloc[0])} evaluation prompts resampled)"
    return Verdict("C1", _grade(*parts, mid),
                   f"{said}; key heads' median at {band:.2f} of depth (layers {int(key['layer'].min())}–"
                   f"{int(key['layer'].max())} of {n_layers}; the paper's band {PAPER_BAND[0]:.2f}–{PAPER_BAND[1]:.2f})",
                   "01_heads")


def claim_c2(runs: Mapping[str, Run]) -> Verdict:
    heads = runs["01_heads"]
    roles = heads.table("head_roles")
    if not len(roles):
        return Verdict("C2", UNTESTABLE, "chapter 1 selected no key heads", "01_heads")
    counts = roles["role"].value_counts()
    operand, operator = int(counts.get("operand", 0)), int(counts.get("operator", 0))
    said = f"{operand} operand, {operator} operator, {len(roles) - operand - operator} other of {len(roles)} key heads"
    if not operand and not operator:
        return Verdict("C2", FAILS, said, "01_heads")
    layer_roles = table_or_none(heads, "layer_roles")
    enriched = False
    if layer_roles is not None and len(layer_roles):
        others = layer_roles[~layer_roles["key"].astype(bool)]
        k_role, o_role = operand + operator, int((others["role"] != "other").sum())
        p = fisher_exact([[k_role, len(roles) - k_role], [o_role, len(others) - o_role]], alternative="greater")[1]
        enriched = bool(p <= 0.05)
        said += (f"; {o_role} of {len(others)} other heads in their layers have a role (Fisher p "
                 + (f"= {p:.3f})" if p >= 0.001 else "< 0.001)"))
    return Verdict("C2", _grade(bool(operand and operator), enriched), said, "01_heads")


def claim_c3(runs: Mapping[str, Run]) -> Verdict:
    items = table_or_none(runs["01_heads"], "knockout_items")
    if items is None or not len(items):
        return Verdict("C3", UNTESTABLE, "chapter 1 ran no paired knockout", "01_heads")
    if not items[items["condition"] == "none"]["correct"].any():
        return Verdict("C3", UNTESTABLE, "no held-out prompt right even without ablation", "01_heads")
    g = knockout_gap(items)
    verdict = HOLDS if g["low"] > 0 else PARTLY if g["gap"] > 0 else FAILS
    return Verdict("C3", verdict, f"top-{g['k']} {g['top']:.0%} vs layer-matched random-{g['k']} {g['random']:.0%} "
                                  f"(no ablation {g['none']:.0%}): gap {g['gap']:+.0%} [{g['low']:+.0%}, {g['high']:+.0%}] "
                                  f"resampling {g['n_prompts']} prompts × {g['draws']} draws; rank p = {g['rank_p']:.3f}",
                   "01_heads")


#: C4's *through*: the least share of the key heads' joint path effect the top three MLPs must carry (the
#: lower end of its interval).
THROUGH_SHARE = 0.25


def claim_c4(runs: Mapping[str, Run]) -> Verdict:
    key = runs["01_heads"].table("key_heads")
    if not len(key):
        return Verdict("C4", UNTESTABLE, "chapter 1 selected no key heads", "02_mlp")
    mlp = runs["02_mlp"]
    eff = mlp.table("mlp_effects")
    eff = eff[(eff["mode"] == "direct") & (eff["metric"] == "d_digit_logprob")]
    routed, joint = table_or_none(mlp, "heads_to_mlp_items"), table_or_none(mlp, "heads_joint")
    if not len(eff) or routed is None or joint is None:
        return Verdict("C4", UNTESTABLE, "chapter 2's run has no digit log-probability effects or no heads → MLP rows",
                       "02_mlp")
    top = eff.assign(size=eff["mean"].abs()).sort_values("size", ascending=False).head(3)
    median = float(np.median(key["layer"]))
    after = int((top["layer"] > median).sum())
    clear = bool(((top["ci_low"] > 0) | (top["ci_high"] < 0)).any())
    share = routed_share(routed, joint, top["layer"].astype(int).tolist())
    through = share["low"] >= THROUGH_SHARE
    verdict = FAILS if not clear else _grade(after == len(top), through)
    layers = ", ".join(f"{int(r.layer)} ({r.mean:+.3f})" for r in top.itertuples())
    return Verdict("C4", verdict, f"largest MLPs {layers}; key heads' median layer {median:g}; {after} of {len(top)} "
                                  f"after it; they carry {share['share']:.0%} [{share['low']:.0%}, {share['high']:.0%}] "
                                  f"of the key heads' joint effect ({share['direct_share']:.0%} of it direct; "
                                  f"{share['n_prompts']} prompts resampled)", "02_mlp")


#: C5's margin: the most the controls may lose (relative) under the key heads for the heads to count as not non-math.
CONTROL_MARGIN = 0.10


def claim_c5(runs: Mapping[str, Run]) -> Verdict:
    table = transfer_contrast(runs["03_transfer"])
    if table is None:
        return Verdict("C5", UNTESTABLE, "no usable math suite or no usable control the model gets right at all, or no "
                                         "ablation with each suite's own mean", "03_transfer")
    t = table.set_index("quantity")
    math_ok = t.loc["math key − random", "high"] < 0
    selective = t.loc["selectivity", "low"] > 0 and t.loc["control key", "low"] > -CONTROL_MARGIN
    fmt = lambda q: f"{t.loc[q, 'value']:+.0%} [{t.loc[q, 'low']:+.0%}, {t.loc[q, 'high']:+.0%}]"
    return Verdict("C5", _grade(math_ok, selective),
                   f"math {fmt('math key')} (random {fmt('math random')}); controls {fmt('control key')}; "
                   f"selectivity {fmt('selectivity')}; {int(t.loc['math key', 'suites'])} math suites, "
                   f"{int(t.loc['control key', 'suites'])} controls", "03_transfer")


#: C6's non-inferiority margin on the controls: the most (absolute accuracy) their interval may reach below zero.
SFT_CONTROL_MARGIN = 0.05
#: R6 needs at least this many random draws to be tested, and a one-sided rank p at most this to hold
#: (with ``d`` draws the smallest possible p is 1 / (d + 1): 19 draws reach 0.05).
R6_DRAWS, R6_ALPHA = 10, 0.05


def claim_c6(runs: Mapping[str, Run]) -> Verdict:
    table = runs["04_precise_sft"].table("math_vs_control").set_index("method")
    precise = next((m for m in table.index if method_family(m) == PRECISE), None)  # the main row comes first
    if precise is None or FULL not in table.index:
        return Verdict("C6", UNTESTABLE, "chapter 4 trained no Precise SFT or no full SFT", "04_precise_sft")
    p, f = table.loc[precise], table.loc[FULL]
    training = table_or_none(runs["04_precise_sft"], "training")  # older runs lack it: nothing to check
    full = pd.DataFrame(columns=["last loss", "untrained loss"]) if training is None else training[training["method"] == FULL]
    # over its seeds: the mean loss of the last quarter of steps against the untrained weights' on the same batches
    untrained, last = full["untrained loss"].astype(float).mean(), full["last loss"].astype(float).mean()
    diverged = bool(len(full)) and last > untrained
    improves = p["math low"] > 0
    matches = p["math high"] >= f["math change"] and p["control high"] >= f["control change"] and not diverged
    keeps = p["control low"] > -SFT_CONTROL_MARGIN
    fmt = lambda r, kind: f"{r[f'{kind} change']:+.0%} [{r[f'{kind} low']:+.0%}, {r[f'{kind} high']:+.0%}]"
    seeds = f" ({int(p['seeds'])} seeds × items resampled)" if "seeds" in table.columns and not pd.isna(p["seeds"]) else ""
    extra = ""
    if diverged:
        extra = (f"; full SFT diverged at its chosen rate (mean loss on its last batches {untrained:.2f} untrained → "
                 f"{last:.2f} trained): *matches* not counted")
    return Verdict("C6", _grade(improves, matches, keeps),
                   f"math: Precise {fmt(p, 'math')} vs full {fmt(f, 'math')}; controls: Precise {fmt(p, 'control')} vs "
                   f"full {fmt(f, 'control')}{seeds}{extra}", "04_precise_sft")


def claim_r6(runs: Mapping[str, Run]) -> Verdict:
    draws = table_or_none(runs["04_precise_sft"], "random_draws")
    if draws is None or (draws["arm"] == "random").sum() < R6_DRAWS:
        return Verdict("R6", UNTESTABLE, f"chapter 4 trained fewer than {R6_DRAWS} layer-matched random draws",
                       "04_precise_sft")
    key = float(draws[draws["arm"] == "key"]["math change"].iloc[0])
    null = draws[draws["arm"] == "random"]["math change"].to_numpy(float)
    percentile = 100.0 * float(np.mean(null < key))
    p_value = (1 + int(np.sum(null >= key))) / (1 + len(null))
    verdict = HOLDS if p_value <= R6_ALPHA else PARTLY if key > np.median(null) else FAILS
    floor = 1 / (1 + len(null))
    return Verdict("R6", verdict, f"key heads' math change {key:+.1%} vs {len(null)} layer-matched draws (median "
                                  f"{np.median(null):+.1%}, range {null.min():+.1%} to {null.max():+.1%}): percentile "
                                  f"{percentile:.0f}, p = {p_value:.3f}"
                                  + (f" (the smallest p {len(null)} draws allow is {floor:.3f})" if floor > R6_ALPHA else ""),
                   "04_precise_sft")


def table_or_none(run: Run, name: str) -> pd.DataFrame | None:
    """``run``'s table ``name``, or None for a run made before the chapter saved it."""
    try:
        return run.table(name)
    except Exception:  # record.UpstreamError; a hand-made run in the tests raises KeyError
        return None


def claim_r1(runs: Mapping[str, Run]) -> Verdict:
    robust = runs["07_robustness"]
    n_layers, per_layer = model_shape(runs["01_heads"])
    mode = robust.parameters.get("mode", "path")
    rules = robust.table("threshold_rules")
    rules = rules[rules["mode"] == mode]
    row = rules[(rules["metric"] == "rel_logit") & np.isclose(rules["threshold"], -0.01)]
    if not len(row):
        return Verdict("R1", UNTESTABLE, f"chapter 7 has no −1 % relative-logit rule in {mode} patching", "07_robustness")
    n = int(row["n_heads"].iloc[0])
    share = n / (n_layers * per_layer)
    strict = rules[(rules["metric"] == "rel_logit") & np.isclose(rules["threshold"], -0.05)]["n_heads"]
    dp = rules[(rules["metric"] == "d_prob") & np.isclose(rules["threshold"], -0.05)]["n_heads"]
    extra = (f"; −5 %: {int(strict.iloc[0])}" if len(strict) else "") + (f"; Δp ≤ −5 %: {int(dp.iloc[0])}" if len(dp) else "")
    return Verdict("R1", HOLDS if 1 <= n and share <= 0.05 else FAILS,
                   f"{n} heads ({share:.1%}) pass −1 % in {mode} patching{extra}", "07_robustness")


def claim_r3(runs: Mapping[str, Run]) -> Verdict:
    test = runs["07_robustness"].table("null_test").iloc[0]
    verdict = HOLDS if test["p_value"] <= 0.05 else PARTLY if test["key"] > test["null_mean"] else FAILS
    return Verdict("R3", verdict, f"key drop {test['key']:.0%} vs null {test['null_mean']:.0%} ± {test['null_sd']:.0%} "
                                  f"({int(test['n_sets'])} layer-matched sets): percentile {test['percentile']:.0f}, "
                                  f"p = {test['p_value']:.3f}", "07_robustness")


def claim_r5(runs: Mapping[str, Run]) -> Verdict:
    tests = table_or_none(runs["07_robustness"], "suite_null_test")
    if tests is None:
        return Verdict("R5", UNTESTABLE, "chapter 7's run predates the null on the suites", "07_robustness")
    math, control = tests[tests["kind"] == "math"], tests[tests["kind"] != "math"]
    if not len(math) or not len(control):
        return Verdict("R5", UNTESTABLE, "no usable math suite or no usable control in chapter 3", "07_robustness")
    m = math[holm(math["p_value"]) <= 0.05]["suite"].tolist()
    c = control[control["p_value"] <= 0.05]["suite"].tolist()
    verdict = HOLDS if len(m) == len(math) and not c else PARTLY if m else FAILS
    n_sets = int(tests["n_sets"].iloc[0])
    return Verdict("R5", verdict, f"Holm-adjusted p ≤ 0.05 on {len(m)} of {len(math)} math suites; p ≤ 0.05 on {len(c)} "
                                  f"of {len(control)} controls" + (f" ({', '.join(c)})" if c else "")
                                  + f"; {n_sets} sets per suite (smallest possible p {1 / (1 + n_sets):.3f})", "07_robustness")


DECIDERS: dict[str, Callable[[Mapping[str, Run]], Verdict]] = {
    "C1": claim_c1, "C2": claim_c2, "C3": claim_c3, "C4": claim_c4, "C5": claim_c5, "C6": claim_c6,
    "R1": claim_r1, "R3": claim_r3, "R5": claim_r5, "R6": claim_r6}


def needs(claim: str) -> set[str]:
    """The chapters whose runs decide ``claim`` (C4 and R1 also read chapter 1's)."""
    return {"C4": {"01_heads", "02_mlp"}, "R1": {"01_heads", "07_robustness"}}.get(claim, {CLAIMS[claim][1]})


def decide(claim: str, runs: Mapping[str, Run | None]) -> Verdict:
    """``claim`` on one model, or *not testable* naming the chapter runs that are missing."""
    missing = sorted(c for c in needs(claim) if runs.get(c) is None)
    if missing:
        return Verdict(claim, UNTESTABLE, f"no run of {', '.join(missing)}", CLAIMS[claim][1])
    return DECIDERS[claim](runs)


def page_verdicts(claims: Sequence[str], runs: Mapping[str, Run | None]) -> pd.DataFrame:
    """``claims`` decided by :func:`decide` on ``runs`` — the rows a page states and saves as its
    ``verdicts`` table: claim, statement, verdict, numbers, chapter. On a chapter page ``runs`` holds
    the page's own run (:func:`arithlens.record.page_run`) and the stored runs it read; chapter 5's
    :func:`verdict_table` is the same rows for every claim and every model, from stored runs."""
    return pd.DataFrame([{"claim": c, "statement": CLAIMS[c][0], **asdict(decide(c, runs))} for c in claims],
                        columns=["claim", "statement", "verdict", "numbers", "chapter"])


def verdict_markdown(table: pd.DataFrame) -> str:
    """A page's :func:`page_verdicts` as Markdown: per claim its statement and verdict in bold, the
    numbers that decided it, and the rule (:data:`RULES`) — the cell and the rule of the first page."""
    lines = ["**Verdict on this model**, by the rule the book's first page applies "
             "(`arithlens.claims.verdicts`), decided on this run's tables:", ""]
    for r in table.itertuples():
        lines += [f"- **{r.claim} · {r.statement}: {r.verdict}.** {r.numbers}.",
                  f"  *Rule (version {rule_version(r.claim)}):* {RULES[r.claim]}"]
    return "\n".join(lines)


def verdict_table(runs_by_model: Mapping[str, Mapping[str, Run | None]]) -> pd.DataFrame:
    """Claims × models, long form: claim, statement, model, verdict, numbers, chapter, run key."""
    frames = []
    for model, runs in runs_by_model.items():
        rows = page_verdicts(list(CLAIMS), runs)
        keys = [runs[c].key if runs.get(c) is not None else None for c in rows["chapter"]]
        frames.append(rows.assign(model=model, run_key=keys))
    columns = ["claim", "statement", "model", "verdict", "numbers", "chapter", "run_key"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def wide(table: pd.DataFrame, cell: Callable[[pd.Series], str] | None = None) -> pd.DataFrame:
    """Claims as rows, one column per model (in the given order), each cell ``cell(row)`` (default
    "verdict — numbers")."""
    cell = cell or (lambda r: f"{r['verdict']} — {r['numbers']}")
    models = list(dict.fromkeys(table["model"]))
    out = table.assign(cell=table.apply(cell, axis=1)).pivot(index=["claim", "statement"], columns="model", values="cell")
    return out.reindex(columns=models).reset_index()

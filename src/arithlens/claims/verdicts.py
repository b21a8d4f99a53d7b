"""The paper's six claims, each decided on one model by a stated rule applied to that model's run tables,
and chapter 7's three harder tests of C1, C3 and C5 (R1, R3, R5).

Science wing (paper § 3–5). A *verdict* is one of ``holds`` / ``partly`` / ``does not hold`` /
``not testable``; :data:`RULES` states each rule in words, and the function beside it applies exactly
that rule to the chapter runs the run graph handed over (``{chapter: run}``, a run being anything with
``table(name)``, ``parameters`` and ``key``, e.g. ``record.RunResult``). Every verdict carries the
numbers that decided it, so a cell of the table can be checked against its chapter.

Used by the "Across models" chapter (which saves the table), by the book's first page (rendered from
that chapter's saved table), by ``arithlens compare`` (terminal) and by every chapter page that states
a verdict: the page decides its claims with :func:`page_verdicts` on its own run — the tables it saves,
wrapped by :func:`arithlens.record.page_run` — and shows them with :func:`verdict_markdown`, so a page
and the first page can never read the same run differently. Intervals: Wilson score intervals
for knockout accuracies (statsmodels); a paired percentile bootstrap over items for the transfer
drops (written here: the statistic pools several suites, each resampled within itself).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from statsmodels.stats.proportion import proportion_confint

from arithlens.analyses.sft.naming import FULL, PRECISE, RANDOM, method_family
from arithlens.claims.findings import TRANSFER_METRIC, Run, transfer_items

HOLDS, PARTLY, FAILS, UNTESTABLE = "holds", "partly", "does not hold", "not testable"
VERDICTS = (HOLDS, PARTLY, FAILS, UNTESTABLE)

#: Claim id → (short statement, the chapter that measures it).
CLAIMS = {
    "C1": ("Few heads (< 5 %), in a middle band of layers, carry the arithmetic", "01_heads"),
    "C2": ("Key heads split into operand heads and operator heads", "01_heads"),
    "C3": ("Knocking out the top-k heads hurts far more than k random heads", "01_heads"),
    "C4": ("MLPs after the heads write the answer", "02_mlp"),
    "C5": ("The key heads serve other math, but not non-math tasks", "03_transfer"),
    "C6": ("Precise SFT improves math, beats full SFT there, and keeps non-math skills", "04_precise_sft"),
    # harder tests of C1, C3 and C5 from chapter 7 (beyond the paper)
    "R1": ("C1's *few* under the other reading of the threshold (−1 %)", "07_robustness"),
    "R3": ("The key heads beat 100 random sets drawn from their own layers", "07_robustness"),
    "R5": ("Suite by suite, the key heads beat a layer-matched null on math and not on non-math", "07_robustness"),
}
#: The claims the paper makes (C1–C6); the others are chapter 7's harder tests of them.
PAPER_CLAIMS = tuple(c for c in CLAIMS if c.startswith("C"))

#: The rule each verdict applies, as the book prints it next to the table.
RULES = {
    "C1": "Chapter 1's path patching, relative change of the answer logit. *Few*: at least one head and at most 5 % of "
          "heads pass the paper's −5 % rule. *Middle band*: the median key head sits between 25 % and 75 % of depth. "
          "Holds: both; partly: one; does not hold: neither.",
    "C2": "Chapter 1's END-attention roles of the key heads (operand: ≥ 20 % of attention on A + B and more than on the "
          "operator; operator: the reverse). Holds: at least one operand head and one operator head; partly: only one "
          "kind; does not hold: no key head has a role.",
    "C3": "Chapter 1's knockout at END on held-out prompts, k = its largest k: 95 % Wilson intervals of accuracy with the "
          "top-k heads and with k random heads (all seeds' prompts pooled). Holds: the top-k interval lies wholly below "
          "the random-k one; partly: lower, but the intervals overlap; does not hold: not lower.",
    "C4": "Chapter 2's direct MLP patching (mean Δp(answer) per layer, 95 % CI). The three MLPs with the largest |effect| "
          "are compared with the key heads' median layer. Holds: all three come after it and at least one CI excludes "
          "zero; partly: one or two come after it; does not hold: none does, or no MLP's CI excludes zero.",
    "C5": "Chapter 3's knockout transfer, mean relative accuracy change over the usable suites of each kind (math: first "
          "answer token; controls: whole answer), paired bootstrap 95 % CIs over items. *Math*: key heads drop math more "
          "than random heads (CI of key − random below 0). *Selective*: controls lose less than math (CI of control − math "
          "drop above 0). Holds: both; partly: one; does not hold: neither.",
    "C6": "Chapter 4's mean change on held-out math and on non-math controls, 95 % bootstrap CIs. *Improves*: Precise "
          "SFT's math CI lies above zero. *Beats*: its math CI lies above full SFT's, and full SFT trained (its loss over "
          "the last quarter of steps below its first loss; one whose loss rose diverged, and beating it is not counted). "
          "*Keeps*: its control CI reaches zero or above. Holds: all three; partly: one or two; does not hold: none.",
    "R1": "Chapter 7's threshold table, chapter 1's heads in chapter 7's patching convention (`mode`), relative change "
          "of the answer logit at the looser −1 % reading of the paper's threshold. Holds: at least one head and at "
          "most 5 % of heads pass it; does not hold: none, or more than 5 %.",
    "R3": "Chapter 7's knockout null: the key heads' accuracy drop at END against layer-matched random sets (as many "
          "heads in each layer, never a key head), one-sided empirical p = (1 + #{null ≥ key}) / (1 + sets). Holds: "
          "p ≤ 0.05; partly: the key drop exceeds the null's mean but p > 0.05; does not hold: it does not exceed it.",
    "R5": "Chapter 7's null on chapter 3's usable suites (math: first answer token; controls: whole answer), the same "
          "layer-matched sets on every suite, p as in R3. Holds: p ≤ 0.05 on every math suite and on no control; "
          "partly: on some math suite, but not every one or also on a control; does not hold: on no math suite.",
}


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


def claim_c1(runs: Mapping[str, Run]) -> Verdict:
    heads = runs["01_heads"]
    n_layers, per_layer = model_shape(heads)
    passing = int((relative_logit_effects(heads) <= -0.05).sum())
    share = passing / (n_layers * per_layer)
    key = heads.table("key_heads")
    if not len(key):
        return Verdict("C1", UNTESTABLE, "chapter 1 selected no key heads", "01_heads")
    band = depth(float(np.median(key["layer"])), n_layers)
    few, mid = 1 <= passing and share <= 0.05, 0.25 <= band <= 0.75
    return Verdict("C1", _grade(few, mid),
                   f"{passing} heads ({share:.1%}) pass −5 %; key heads' median at {band:.2f} of depth "
                   f"(layers {int(key['layer'].min())}–{int(key['layer'].max())} of {n_layers})", "01_heads")


def claim_c2(runs: Mapping[str, Run]) -> Verdict:
    roles = runs["01_heads"].table("head_roles")
    if not len(roles):
        return Verdict("C2", UNTESTABLE, "chapter 1 selected no key heads", "01_heads")
    counts = roles["role"].value_counts()
    operand, operator = int(counts.get("operand", 0)), int(counts.get("operator", 0))
    verdict = HOLDS if operand and operator else PARTLY if operand or operator else FAILS
    return Verdict("C2", verdict, f"{operand} operand, {operator} operator, {len(roles) - operand - operator} other "
                                  f"of {len(roles)} key heads", "01_heads")


def wilson(successes: float, trials: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (statsmodels)."""
    low, high = proportion_confint(round(successes), trials, alpha=0.05, method="wilson")
    return float(low), float(high)


def knockout_intervals(heads_run: Run) -> dict | None:
    """Chapter 1's END knockout at its largest k: accuracy and Wilson CI with no ablation, with the top-k
    and with k random heads (every seed's prompts pooled), or None when no knockout ran."""
    curve = heads_run.table("knockout")
    curve = curve[curve["positions"] == "end"]
    if not len(curve) or curve["k"].max() == 0:
        return None
    k = int(curve["k"].max())
    top = curve[(curve["condition"] == "top") & (curve["k"] == k)]
    rnd = curve[(curve["condition"] == "random") & (curve["k"] == k)]
    n = int(top["n_prompts"].iloc[0])
    out = {"k": k, "n_prompts": n, "seeds": len(rnd)}
    for name, part in (("none", curve[curve["condition"] == "none"]), ("top", top), ("random", rnd)):
        trials = int(part["n_prompts"].sum())
        acc = float((part["accuracy"] * part["n_prompts"]).sum() / trials)
        out[name], (out[f"{name}_low"], out[f"{name}_high"]) = acc, wilson(acc * trials, trials)
    return out


def claim_c3(runs: Mapping[str, Run]) -> Verdict:
    ko = knockout_intervals(runs["01_heads"])
    if ko is None:
        return Verdict("C3", UNTESTABLE, "chapter 1 ran no knockout", "01_heads")
    if ko["none"] == 0:
        return Verdict("C3", UNTESTABLE, f"no held-out prompt right even without ablation ({ko['n_prompts']} prompts)",
                       "01_heads")
    verdict = HOLDS if ko["top_high"] < ko["random_low"] else PARTLY if ko["top"] < ko["random"] else FAILS
    return Verdict("C3", verdict, f"top-{ko['k']} {ko['top']:.0%} [{ko['top_low']:.0%}, {ko['top_high']:.0%}] vs "
                                  f"random-{ko['k']} {ko['random']:.0%} [{ko['random_low']:.0%}, {ko['random_high']:.0%}] "
                                  f"(no ablation {ko['none']:.0%}, {ko['n_prompts']} prompts)", "01_heads")


def claim_c4(runs: Mapping[str, Run]) -> Verdict:
    key = runs["01_heads"].table("key_heads")
    if not len(key):
        return Verdict("C4", UNTESTABLE, "chapter 1 selected no key heads", "02_mlp")
    eff = runs["02_mlp"].table("mlp_effects")
    eff = eff[(eff["mode"] == "direct") & (eff["metric"] == "d_prob")]
    top = eff.assign(size=eff["mean"].abs()).sort_values("size", ascending=False).head(3)
    median = float(np.median(key["layer"]))
    after = int((top["layer"] > median).sum())
    clear = bool(((top["ci_low"] > 0) | (top["ci_high"] < 0)).any())
    verdict = FAILS if not clear or not after else HOLDS if after == len(top) else PARTLY
    layers = ", ".join(f"{int(r.layer)} ({r.mean:+.3f})" for r in top.itertuples())
    return Verdict("C4", verdict, f"largest MLPs {layers}; key heads' median layer {median:g}; "
                                  f"{after} of {len(top)} after it", "02_mlp")


def _pooled_change(frames: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator | None) -> float:
    """Mean over suites of (mean(ablated) − mean(base)) / mean(base); ``rng`` resamples each suite's items."""
    out = []
    for vals, base in frames:
        idx = rng.integers(0, len(base), len(base)) if rng is not None else slice(None)
        b = base[idx].mean()
        if b > 0:  # a resample that drew only wrong items has no relative change; it is left out
            out.append((vals[idx].mean() - b) / b)
    return float(np.mean(out)) if out else float("nan")


def transfer_contrast(transfer_run: Run, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame | None:
    """Chapter 3's pooled relative change per kind (math: first answer token; control: whole answer) under
    key and random heads, key − random on math and the selectivity (control change − math change under
    the key heads), each with a paired bootstrap 95 % CI over items (suites resampled within
    themselves). Only suites chapter 3 judged usable and ablated (:func:`arithlens.claims.findings.transfer_items`).
    None when a kind has none."""
    items = transfer_items(transfer_run)
    data: dict[str, dict[str, list]] = {}
    for kind in TRANSFER_METRIC:
        part = items[items["kind"] == kind]
        if not len(part):
            return None
        data[kind] = {"key": [], "random": []}
        for _, suite in part.groupby("suite", sort=True):
            if suite["none"].mean() == 0:  # a relative change from zero is undefined: the suite cannot count
                continue
            for cond in data[kind]:
                data[kind][cond].append((suite[cond].to_numpy(float), suite["none"].to_numpy(float)))
        if not data[kind]["key"]:
            return None

    def stats(rng):
        s = {f"{kind} {cond}": _pooled_change(data[kind][cond], rng) for kind in data for cond in data[kind]}
        s["math key − random"] = s["math key"] - s["math random"]
        s["selectivity"] = s["control key"] - s["math key"]
        return s

    point = stats(None)
    rng = np.random.default_rng(seed)
    boots = pd.DataFrame([stats(rng) for _ in range(n_boot)])
    return pd.DataFrame([{"quantity": q, "value": v, "low": float(np.nanpercentile(boots[q], 2.5)),
                          "high": float(np.nanpercentile(boots[q], 97.5)),
                          "suites": len(data[q.split()[0]]["key"]) if q.split()[0] in data else None}
                         for q, v in point.items()])


def claim_c5(runs: Mapping[str, Run]) -> Verdict:
    table = transfer_contrast(runs["03_transfer"])
    if table is None:
        return Verdict("C5", UNTESTABLE, "no usable math suite or no usable control the model gets right at all",
                       "03_transfer")
    t = table.set_index("quantity")
    math_ok, selective = t.loc["math key − random", "high"] < 0, t.loc["selectivity", "low"] > 0
    fmt = lambda q: f"{t.loc[q, 'value']:+.0%} [{t.loc[q, 'low']:+.0%}, {t.loc[q, 'high']:+.0%}]"
    return Verdict("C5", _grade(math_ok, selective),
                   f"math {fmt('math key')} (random {fmt('math random')}); controls {fmt('control key')}; "
                   f"selectivity {fmt('selectivity')}", "03_transfer")


def claim_c6(runs: Mapping[str, Run]) -> Verdict:
    table = runs["04_precise_sft"].table("math_vs_control").set_index("method")
    precise = next((m for m in table.index if method_family(m) == PRECISE), None)  # the main row comes first
    if precise is None or FULL not in table.index:
        return Verdict("C6", UNTESTABLE, "chapter 4 trained no Precise SFT or no full SFT", "04_precise_sft")
    p, f = table.loc[precise], table.loc[FULL]
    training = table_or_none(runs["04_precise_sft"], "training")  # older runs lack it: nothing to check
    full = pd.DataFrame(columns=["first loss", "last loss"]) if training is None else training[training["method"] == FULL]
    diverged = bool((full["last loss"] > full["first loss"]).any())
    improves, beats, keeps = p["math low"] > 0, p["math low"] > f["math high"] and not diverged, p["control high"] >= 0
    verdict = _grade(improves, beats, keeps)
    fmt = lambda r, kind: f"{r[f'{kind} change']:+.0%} [{r[f'{kind} low']:+.0%}, {r[f'{kind} high']:+.0%}]"
    rnd = next((m for m in table.index if method_family(m) == RANDOM), None)
    extra = f"; {rnd} math {fmt(table.loc[rnd], 'math')}" if rnd else ""
    if diverged:
        first, last = full["first loss"].iloc[0], full["last loss"].iloc[0]
        extra += f"; full SFT diverged (loss {first:.2f} → {last:.2f}): *beats* not counted"
    return Verdict("C6", verdict, f"math: Precise {fmt(p, 'math')} vs full {fmt(f, 'math')}; controls: Precise "
                                  f"{fmt(p, 'control')} vs full {fmt(f, 'control')}{extra}", "04_precise_sft")


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
    hit = lambda t: t[t["p_value"] <= 0.05]["suite"].tolist()
    m, c = hit(math), hit(control)
    verdict = HOLDS if len(m) == len(math) and not c else PARTLY if m else FAILS
    return Verdict("R5", verdict, f"p ≤ 0.05 on {len(m)} of {len(math)} math suites and {len(c)} of {len(control)} controls"
                                  + (f" ({', '.join(c)})" if c else "")
                                  + f"; {int(tests['n_sets'].iloc[0])} sets per suite", "07_robustness")


DECIDERS: dict[str, Callable[[Mapping[str, Run]], Verdict]] = {
    "C1": claim_c1, "C2": claim_c2, "C3": claim_c3, "C4": claim_c4, "C5": claim_c5, "C6": claim_c6,
    "R1": claim_r1, "R3": claim_r3, "R5": claim_r5}


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
        lines += [f"- **{r.claim} · {r.statement}: {r.verdict}.** {r.numbers}.", f"  *Rule:* {RULES[r.claim]}"]
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

"""Across models: one tidy row per model for each chapter's headline, read from finished runs only.

Science wing, summaries (paper § 3–5 side by side). The "Across models" chapter receives, through the
run graph, ``{model: {chapter: run dir}}`` (:func:`open_runs`); each function here takes the opened
runs ``{model: {chapter: run}}`` and returns a long-form DataFrame with a ``model`` column and depth
expressed as a fraction of the model's layers, so models of different depth share one axis. Nothing
is recomputed from a model: these are summaries of tables the chapters saved. Intervals: Wilson
(statsmodels) for accuracies, the chapters' own bootstrap CIs otherwise, and
:func:`arithlens.claims.intervals.transfer_contrast` for the pooled transfer drops.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from arithlens.analyses.sft.naming import PRECISE, method_family
from arithlens.claims.findings import Run
from arithlens.record import open_run
from arithlens.claims.intervals import OWN_MEAN, RESAMPLE, knockout_gap, knockout_intervals, transfer_contrast, wilson
from arithlens.claims.verdicts import depth, model_shape, relative_logit_effects, table_or_none

Runs = Mapping[str, Mapping[str, Run]]


def open_runs(upstream: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, Run]]:
    """``{model: {chapter: run dir}}`` (the runner's ``upstream`` for this chapter) → opened runs."""
    return {model: {chapter: open_run(path) for chapter, path in chapters.items()}
            for model, chapters in upstream.items()}


def having(runs: Runs, *chapters: str) -> list[tuple[str, Mapping[str, Run]]]:
    """The models that have a run of every one of ``chapters`` (a model may skip some; see the
    chapter's ``skip_chapters``), with their runs, in the comparison's order."""
    return [(model, chs) for model, chs in runs.items() if all(c in chs for c in chapters)]


def shape(runs: Mapping[str, Run]) -> tuple[int, int]:
    """(layers, heads per layer) of a model (:func:`arithlens.claims.verdicts.model_shape` of its chapter 1)."""
    return model_shape(runs["01_heads"])


def model_summary(runs: Runs) -> pd.DataFrame:
    """Per model: layers, heads, and the run key of each chapter it is read from."""
    rows = []
    for model, chapters in runs.items():
        n_layers, per_layer = shape(chapters) if "01_heads" in chapters else (None, None)
        rows.append({"model": model, "layers": n_layers, "heads per layer": per_layer, "heads": n_layers and n_layers * per_layer,
                     "runs (chapter: key)": " · ".join(f"{chapter.partition('_')[0]}: {run.key}"
                                                       for chapter, run in chapters.items())})
    return pd.DataFrame(rows)


def task_summary(runs: Runs) -> pd.DataFrame:
    """Chapter 0 per model: accuracy on every prompt at the analysis shot count (Wilson 95 % CI) and
    the size of the correct set the other chapters draw from."""
    rows = []
    for model, chapters in having(runs, "00_task"):
        task = chapters["00_task"]
        shots = task.parameters.get("analysis_shots", 3)
        scores = task.table("scores")
        scores = scores[scores["shots"] == shots]
        sizes = task.table("correct_set_sizes")
        low, high = wilson(scores["correct"].sum(), len(scores))
        rows.append({"model": model, "shots": shots, "prompts": len(scores), "accuracy": scores["correct"].mean(),
                     "low": low, "high": high, "correct": int(sizes["correct"].sum()), "kept": int(sizes["kept"].sum())})
    return pd.DataFrame(rows)


def heads_summary(runs: Runs) -> pd.DataFrame:
    """Chapter 1 per model: key heads, their share and depth band, and how many heads pass the paper's
    −5 % and −1 % rules (mean relative change of the answer logit, lead patching mode)."""
    rows = []
    for model, chapters in having(runs, "01_heads"):
        heads = chapters["01_heads"]
        n_layers, per_layer = shape(chapters)
        rel = relative_logit_effects(heads)
        key = heads.table("key_heads")
        rows.append({"model": model, "heads": n_layers * per_layer, "key heads": len(key),
                     "key share": len(key) / (n_layers * per_layer),
                     "band from": depth(key["layer"].min(), n_layers) if len(key) else np.nan,
                     "band to": depth(key["layer"].max(), n_layers) if len(key) else np.nan,
                     "median depth": depth(float(np.median(key["layer"])), n_layers) if len(key) else np.nan,
                     "pass −5 %": int((rel <= -0.05).sum()), "pass −1 %": int((rel <= -0.01).sum()),
                     "largest rel. logit": float(rel.min())})
    return pd.DataFrame(rows)


def key_head_depths(runs: Runs) -> pd.DataFrame:
    """One row per key head per model: layer, head, depth fraction and its chapter-1 effect."""
    frames = []
    for model, chapters in having(runs, "01_heads"):
        n_layers, _ = shape(chapters)
        key = chapters["01_heads"].table("key_heads")
        frames.append(key.assign(model=model, depth=[depth(l, n_layers) for l in key["layer"]],
                                 label=[f"{l}.{h}" for l, h in zip(key["layer"], key["head"])]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def knockout_summary(runs: Runs) -> pd.DataFrame:
    """Chapter 1's END knockout per model, long form: condition (none / top-k / random-k), accuracy and
    Wilson 95 % CI (the interval :func:`arithlens.claims.verdicts.claim_c3` decides on)."""
    rows = []
    for model, chapters in having(runs, "01_heads"):
        ko = knockout_intervals(chapters["01_heads"])
        if ko is None:
            continue
        for name, label, k in (("none", "no ablation", 0), ("top", "top-k", ko["k"]), ("random", "random-k", ko["k"])):
            rows.append({"model": model, "condition": label, "k": k, "accuracy": ko[name],
                         "low": ko[f"{name}_low"], "high": ko[f"{name}_high"], "prompts": ko["n_prompts"]})
    return pd.DataFrame(rows)


def mlp_profile(runs: Runs, metric: str = "d_prob") -> pd.DataFrame:
    """Chapter 2's direct effect of each MLP layer per model against depth fraction (mean and CI)."""
    frames = []
    for model, chapters in having(runs, "01_heads", "02_mlp"):
        n_layers, _ = shape(chapters)
        eff = chapters["02_mlp"].table("mlp_effects")
        eff = eff[(eff["mode"] == "direct") & (eff["metric"] == metric)]
        frames.append(eff.assign(model=model, depth=[depth(l, n_layers) for l in eff["layer"]]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def mlp_summary(runs: Runs, top: int = 3) -> pd.DataFrame:
    """Chapter 2 per model: start–inflection–end layers as fractions of depth (the paper's LLaMA2-7B:
    0.41–0.56–0.88), the MLPs with the largest direct effect and those the key heads act through most."""
    rows = []
    for model, chapters in having(runs, "01_heads", "02_mlp"):
        n_layers, _ = shape(chapters)
        mlp = chapters["02_mlp"]
        found = mlp.table("cosine_layers").iloc[0]
        direct = mlp.table("mlp_effects").query("mode == 'direct' and metric == 'd_prob'")
        routed = mlp.table("heads_to_mlp").query("metric == 'd_prob'")
        biggest = lambda t: ", ".join(str(int(l)) for l in t.assign(s=t["mean"].abs()).nlargest(top, "s")["layer"])
        rows.append({"model": model, "start": found["start"] / n_layers, "inflection": found["inflection"] / n_layers,
                     "end": found["end"] / n_layers, "layers (start–inflection–end)":
                     f"{int(found['start'])}–{int(found['inflection'])}–{int(found['end'])} of {n_layers}",
                     "largest direct effect": biggest(direct), "key heads act through": biggest(routed)})
    return pd.DataFrame(rows)


#: How chapter 3 ablated the heads, as the comparison names it: C5's rule reads the first; the second is its check.
ABLATIONS = {OWN_MEAN: "own mean (C5's rule)", RESAMPLE: "resample (a check)"}


def transfer_summary(runs: Runs, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Chapter 3 per model: pooled relative accuracy change on math suites and on non-math controls under
    key and random heads, key − random, and selectivity, each with a paired bootstrap 95 % CI — under
    each suite's own mean (what C5's rule reads) and, where chapter 3 ran it, under resample ablation
    (its check), told apart by ``ablation`` (:data:`ABLATIONS`)."""
    frames = []
    for model, chapters in having(runs, "03_transfer"):
        for suffix, ablation in ABLATIONS.items():
            table = transfer_contrast(chapters["03_transfer"], n_boot=n_boot, seed=seed, suffix=suffix)
            if table is not None:
                frames.append(table.assign(model=model, ablation=ablation))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def parameters_m(runs: Mapping[str, Run]) -> float | None:
    """A model's parameter count in millions, as its runs recorded it (the manifest's model card)."""
    for run in runs.values():
        card = ((getattr(run, "manifest", {}) or {}).get("notebook_info") or {}).get("model") or {}
        if card.get("parameters (M)") is not None:
            return float(card["parameters (M)"])
    return None


#: The measures :func:`size_trend` follows across sizes, in the page's order.
TREND = ("key-head depth", "knockout gap", "selectivity")


def size_trend(runs: Runs, heads: pd.DataFrame, transfer: pd.DataFrame) -> pd.DataFrame:
    """Three measures against model size, one row per model and measure (``value``, ``low``, ``high``,
    ``interval``), computed by the functions the verdicts use: the key heads' median depth with their
    depth band from ``heads`` (:func:`heads_summary`'s rows; a range, not a CI), chapter 1's knockout gap —
    layer-matched random minus top-k accuracy, two-way bootstrap 95 % CI
    (:func:`arithlens.claims.intervals.knockout_gap`, C3's) — and the selectivity under each suite's own
    mean from ``transfer`` (:func:`transfer_summary`'s rows, C5's). ``parameters (M)`` is what the model's
    runs recorded; a model without it is left out."""
    rows = []
    for model, chapters in runs.items():
        size = parameters_m(chapters)
        if size is None:
            continue
        row = lambda measure, v, lo, hi, interval: rows.append(
            {"model": model, "parameters (M)": size, "measure": measure, "value": v, "low": lo, "high": hi,
             "interval": interval})
        found = heads[heads["model"] == model].dropna(subset=["median depth"]) if len(heads) else heads
        if len(found):
            h = found.iloc[0]
            row("key-head depth", h["median depth"], h["band from"], h["band to"], "key heads' band")
        if "01_heads" in chapters:
            items = table_or_none(chapters["01_heads"], "knockout_items")
            if items is not None and len(items) and (items["condition"] == "layer_matched").any():
                g = knockout_gap(items)
                row("knockout gap", g["gap"], g["low"], g["high"], "95 % CI")
        if len(transfer):
            sel = transfer[(transfer["model"] == model) & (transfer["ablation"] == ABLATIONS[OWN_MEAN])
                           & (transfer["quantity"] == "selectivity")]
            if len(sel):
                s = sel.iloc[0]
                row("selectivity", s["value"], s["low"], s["high"], "95 % CI")
    return pd.DataFrame(rows, columns=["model", "parameters (M)", "measure", "value", "low", "high", "interval"])


def trend_lines(trend: pd.DataFrame) -> list[str]:
    """One sentence per measure of :func:`size_trend`: the models in size order with value and interval, and
    whether the smallest and the largest model's intervals are apart (a change the intervals resolve) or overlap."""
    lines = []
    for measure in TREND:
        part = trend[trend["measure"] == measure].sort_values("parameters (M)")
        if len(part) < 2:
            continue
        cells = " → ".join(f"{r['model']} ({r['parameters (M)']:,.0f}M) {r['value']:.0%} [{r['low']:.0%}, {r['high']:.0%}]"
                           for r in part.to_dict("records"))
        small, large = part.iloc[0], part.iloc[-1]
        apart = small["high"] < large["low"] or large["high"] < small["low"]
        way = "rises" if large["value"] > small["value"] else "falls"
        lines.append(f"**{measure}** ({small['interval']}): {cells}; from the smallest to the largest model it "
                     + (f"{way}, the intervals apart." if apart else "changes within overlapping intervals."))
    return lines


def sft_summary(runs: Runs) -> pd.DataFrame:
    """Chapter 4 per model, long form: each method's mean change on held-out math and on non-math
    controls with its 95 % CI. Methods are named by family (:func:`arithlens.analyses.sft.naming.method_family`:
    Precise SFT, random heads, LoRA, full SFT)."""
    rows = []
    for model, chapters in having(runs, "04_precise_sft"):
        for r in chapters["04_precise_sft"].table("math_vs_control").to_dict("records"):
            for kind in ("math", "control"):
                rows.append({"model": model, "method": r["method"], "family": method_family(r["method"]), "kind": kind,
                             "change": r[f"{kind} change"], "low": r[f"{kind} low"], "high": r[f"{kind} high"]})
    return pd.DataFrame(rows)


def benchmark_summary(runs: Runs) -> pd.DataFrame:
    """The shipped public benchmarks per model, long form: each model's base accuracy (95 % Wilson interval)
    — from chapter 8's Table 1 (GSM8K with a chain of thought, SVAMP, MMLU) where the model ran it, else
    from chapter 3's unablated run (SVAMP and MMLU, whole answer teacher-forced) — and, for the tuned rows of
    Table 1, their change from the base model in points. ``source`` says which chapter gave each row."""
    rows = []
    for model, chapters in runs.items():
        if "08_benchmarks" in chapters:
            for r in chapters["08_benchmarks"].table("table1").to_dict("records"):
                low, high = wilson(round(r["accuracy"] * r["n"]), r["n"])
                rows.append({"model": model, "benchmark": r["set"], "method": r["method"],
                             "family": method_family(r["method"]), "items": r["n"], "accuracy": r["accuracy"],
                             "low": low, "high": high, "change (points)": 100 * r["change"] if r["method"] != "base" else np.nan,
                             "source": "chapter 8 (Table 1)"})
        elif "03_transfer" in chapters:
            scores = chapters["03_transfer"].table("transfer_scores")
            base = scores[(scores["condition"] == "none") & scores["suite"].isin(["gsm8k", "svamp", "mmlu"])]
            for suite, part in base.groupby("suite", sort=False):
                low, high = wilson(int(part["correct"].sum()), len(part))
                rows.append({"model": model, "benchmark": suite, "method": "base", "family": "base", "items": len(part),
                             "accuracy": part["correct"].mean(), "low": low, "high": high, "change (points)": np.nan,
                             "source": "chapter 3 (unablated)"})
    return pd.DataFrame(rows)


#: The paper's LLaMA2-7B numbers the charts draw as reference marks (from :mod:`arithlens.paper`).
PAPER_MARKS = {
    "key-head band": (0.38, 0.53),  # paper.HEADS["layer band of key heads"]: layers 12–17 of 32
    "mlp start–inflection–end": (0.41, 0.56, 0.88),  # paper.MLP["as fraction of depth"]
    "knockout top-10": 0.302, "knockout random-10": 0.98,  # paper.HEADS knockout rows
    "parameters (M)": 6738.0,  # LLaMA2-7B
}


def robustness_summary(runs: Runs, metric: str = "d_prob") -> pd.DataFrame:
    """Chapter 7 per model: does the localization survive other methods, rules and controls? Spearman ρ
    and top-10 overlap of attribution / EAP-IG with exact patching, how many of EAP-IG's top heads an exact
    sweep screened by it must measure to hold exact's top 10, what exact patching and EAP-IG cost in plain
    forward pairs (the run's own clock), the faithfulness-curve areas, the key heads' place in the
    layer-matched null, the −5 % / −1 % rule sizes and the same-answer survivors."""
    rows = []
    for model, chapters in having(runs, "07_robustness"):
        run = chapters["07_robustness"]
        agree = run.table("agreement")
        agree = agree[agree["metric"] == metric]
        row = {"model": model}
        for method in ("attribution", "eap_ig"):
            part = agree[agree["method"] == method]
            row[f"ρ {method}"] = float(part[part["measure"] == "spearman"]["value"].iloc[0]) if len(part) else np.nan
            top = part[(part["measure"] == "jaccard")].sort_values("k")
            row[f"top-10 overlap {method}"] = float(top[top["k"] <= 10]["value"].iloc[-1]) if len(top) else np.nan
        screen = agree[(agree["method"] == "eap_ig") & (agree["measure"] == "screen") & (agree["k"] == 10)]["value"]
        row["EAP-IG top N holding exact's top 10 (N)"] = float(screen.iloc[0]) if len(screen) else np.nan
        info = (getattr(run, "manifest", {}) or {}).get("notebook_info") or {}
        seconds, two = info.get("method_seconds") or {}, info.get("two_forwards_s")
        for method, label in (("exact (fast sweep)", "exact"), ("eap_ig", "EAP-IG")):
            row[f"{label} ÷ two forwards"] = seconds[method] / two if two and method in seconds else np.nan
        area = run.table("faithfulness_area").set_index("ranking")
        for ranking in ("exact", "eap_ig", "random"):
            row[f"CPR area {ranking}"] = float(area.loc[ranking, "area"]) if ranking in area.index else np.nan
        null = run.table("null_test").iloc[0]
        row.update({"key drop": float(null["key"]), "null mean": float(null["null_mean"]),
                    "null percentile": float(null["percentile"]), "null p": float(null["p_value"])})
        suites = table_or_none(run, "suite_null_test")
        if suites is not None and len(suites):
            for kind, label in (("math", "math suites"), ("control", "controls")):
                part = suites[suites["kind"] == kind] if kind == "math" else suites[suites["kind"] != "math"]
                row[f"{label} beyond the null (p ≤ 0.05)"] = f"{int((part['p_value'] <= 0.05).sum())} of {len(part)}"
        same = run.table("same_answer")
        row["same-answer survivors"] = (f"{int(same.groupby('head')['survives'].any().sum())} of "
                                        f"{same['head'].nunique()}" if len(same) else "—")
        rows.append(row)
    return pd.DataFrame(rows)


def numbers_summary(runs: Runs) -> pd.DataFrame:
    """Chapter 6 per model: Fourier power (largest ratio to chance over layers) at T = 2, 5, 10, the best
    layer's helix share and its share of the PCA ceiling, the causal share kept by the helix, the share
    of top neurons classified, keep-top-5 % accuracy against random, mean IoU across operators."""
    rows = []
    for model, chapters in having(runs, "06_numbers"):
        run = chapters["06_numbers"]
        power = run.table("fourier")
        helix = run.table("helix").sort_values("share", ascending=False).iloc[0]
        causal = run.table("helix_causal")
        classes = run.table("heuristics")
        keep = run.table("keep_top_k").groupby(["condition", "percent"])["accuracy"].mean()
        pct = 5.0 if (("top", 5.0) in keep.index) else float(keep.loc["top"].index.min())
        rows.append({"model": model, **{f"Fourier T={t:g} (÷ chance, max)": float(power[power["period"] == t]["ratio"].max())
                                        for t in (2, 5, 10)},
                     "helix share (best layer)": float(helix["share"]), "of PCA ceiling": float(helix["of_ceiling"]),
                     "causal share kept (a, b)": ", ".join(f"{v:.2f}" for v in causal["helix_share"]),
                     "top neurons classified": float((classes["kind"] != "other").mean()),
                     f"keep top {pct:g} %": float(keep.loc[("top", pct)]), f"random {pct:g} %": float(keep.loc[("random", pct)]),
                     "mean IoU across operators": float(run.table("overlap")["iou"].mean()),
                     **_tuning_measures(run)})
    return pd.DataFrame(rows)


def _tuning_measures(numbers_run) -> dict:
    """Chapter 6's fine-tuning rows: how much more Precise SFT moves the top neurons than the rest, and
    whether random-head tuning and LoRA move the same neurons (ρ of |change|, IoU of the most-moved)."""
    moved = numbers_run.table("tuning_change")
    top = moved[moved["group"] == "top"]
    out = {"Precise SFT: top neurons move ÷ rest": float(top["÷ rest"].iloc[0])} if len(top) else {}
    pairs = table_or_none(numbers_run, "tuning_pairs")
    if pairs is not None and len(pairs):
        iou = next(c for c in pairs.columns if c.startswith("IoU"))
        for r in pairs[pairs["method"].map(method_family) == PRECISE].to_dict("records"):
            family = method_family(r["other"])
            out[f"vs {family}: ρ |change|"] = float(r["ρ |change|"])
            out[f"vs {family}: {iou}"] = float(r[iou])
    return out


def as_measures(frame: pd.DataFrame, title: str) -> pd.DataFrame:
    """A per-model summary turned on its side for the page: one row per measure, one column per model,
    numbers as text with three significant digits (a wide table of many measures does not fit a page)."""
    text = lambda v: f"{v:.3g}" if isinstance(v, (float, np.floating)) else str(v)
    return frame.set_index("model").T.map(text).rename_axis(title).reset_index()


def cost_summary(runs: Runs) -> pd.DataFrame:
    """What each run cost: one row per model and chapter with its wall time in minutes (the manifest's
    ``timings.seconds``, model load included), the threads torch was allowed (``OMP_NUM_THREADS`` as the
    runner saw it; "default" = one per core; "1–2 shared" = started at 1 and followed the thread share
    of runs side by side, up to every core, see :mod:`arithlens.core.threads`) and the cores of the machine,
    read from each run's manifest."""
    rows = []
    for model, chapters in runs.items():
        for chapter, run in chapters.items():
            manifest = getattr(run, "manifest", {}) or {}
            seconds = (manifest.get("timings") or {}).get("seconds")
            cpu = manifest.get("cpu") or {}
            threads = cpu.get("OMP_NUM_THREADS") or ("default" if cpu else None)
            if cpu.get("thread_share") and cpu.get("cores"):
                threads = f"{threads}–{cpu['cores']} shared"
            rows.append({"model": model, "chapter": chapter, "minutes": None if seconds is None else round(seconds / 60, 1),
                         "device": manifest.get("device"), "threads": threads,
                         "cores": cpu.get("cores"), "run": run.key})
    return pd.DataFrame(rows, columns=["model", "chapter", "minutes", "device", "threads", "cores", "run"])

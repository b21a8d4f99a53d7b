"""Charts of the "Across models" chapter: tidy frames from :mod:`arithlens.claims.across` in, ``altair`` out.

Publishing wing; they compute nothing. Every chart puts depth on a 0–1 axis (fraction of the model's
layers) so models of different depth line up, gives each model one colour (the same in every chart
of the page, from :func:`model_colours`) and draws the paper's LLaMA2-7B numbers as grey reference
marks where they are comparable.
"""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import pandas as pd

from arithlens.claims.across import PAPER_MARKS, TREND

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
PAPER_GREY = "#7f7f7f"


def model_colours(models: Sequence[str]) -> alt.Scale:
    """One colour per model, in the order given (the chapter's ``models`` order)."""
    return alt.Scale(domain=list(models), range=list(PALETTE[: len(models)]) or [PALETTE[0]])


def key_head_depth_chart(heads: pd.DataFrame, models: Sequence[str], title: str = "") -> alt.Chart:
    """Each model's key heads at their depth; the paper's band (layers 12–17 of 32) shaded."""
    lo, hi = PAPER_MARKS["key-head band"]
    band = alt.Chart(pd.DataFrame({"from": [lo], "to": [hi], "what": ["paper, LLaMA2-7B"]})).mark_rect(
        color=PAPER_GREY, opacity=0.18).encode(x="from:Q", x2="to:Q", tooltip=["what", "from", "to"])
    dots = alt.Chart(heads).mark_circle(size=90, opacity=0.85).encode(
        x=alt.X("depth:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"), title="depth (fraction of layers)"),
        y=alt.Y("model:N", sort=list(models), title=None),
        color=alt.Color("model:N", scale=model_colours(models), legend=None),
        tooltip=["model", "label", alt.Tooltip("d_prob:Q", format=".4f"), alt.Tooltip("depth:Q", format=".2f")])
    return (band + dots).properties(width=520, height=40 * max(len(models), 1) + 30,
                                    title=title or "Key heads by depth (grey: the paper's band, LLaMA2-7B)")


def knockout_chart(knock: pd.DataFrame, models: Sequence[str], title: str = "") -> alt.Chart:
    """Held-out accuracy with no heads, the top-k and k random heads ablated at END, per model, with
    95 % Wilson intervals; grey ticks: the paper's top-10 (30.2 %) and random-10 (98.0 %)."""
    order = ["no ablation", "top-k", "random-k"]
    base = alt.Chart(knock).encode(x=alt.X("condition:N", sort=order, title=None, axis=alt.Axis(labelAngle=0)),
                                   xOffset=alt.XOffset("model:N", sort=list(models)),
                                   color=alt.Color("model:N", scale=model_colours(models), title="model"))
    bars = base.mark_bar(opacity=0.8).encode(
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"), title="held-out accuracy"),
        tooltip=["model", "condition", "k", alt.Tooltip("accuracy:Q", format=".1%"), alt.Tooltip("low:Q", format=".1%"),
                 alt.Tooltip("high:Q", format=".1%"), "prompts"])
    rules = alt.Chart(knock).mark_rule(color="black", strokeWidth=1.5).encode(  # no colour channel: black on any bar
        x=alt.X("condition:N", sort=order, title=None, axis=alt.Axis(labelAngle=0)),
        xOffset=alt.XOffset("model:N", sort=list(models)), y="low:Q", y2="high:Q")
    marks = pd.DataFrame({"condition": ["top-k", "random-k"],
                          "accuracy": [PAPER_MARKS["knockout top-10"], PAPER_MARKS["knockout random-10"]],
                          "what": ["paper top-10", "paper random-10"]})
    paper = alt.Chart(marks).mark_tick(color=PAPER_GREY, thickness=3, size=60).encode(
        x=alt.X("condition:N", sort=order, axis=alt.Axis(labelAngle=0)), y="accuracy:Q", tooltip=["what", alt.Tooltip("accuracy:Q", format=".1%")])
    return (bars + rules + paper).properties(width=360, height=220,
                                             title=title or "Knockout at END (bars: 95 % CI; grey: paper, LLaMA2-7B)")


def mlp_profile_chart(profile: pd.DataFrame, models: Sequence[str], title: str = "") -> alt.Chart:
    """Direct effect of each MLP on p(answer) against depth, one line per model (band: 95 % CI); grey
    rules: the paper's start, inflection and end layers as fractions of depth."""
    colour = alt.Color("model:N", scale=model_colours(models), title="model")
    x = alt.X("depth:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"), title="depth (fraction of layers)")
    base = alt.Chart(profile).encode(x=x, color=colour)
    band = base.mark_area(opacity=0.2).encode(y="ci_low:Q", y2="ci_high:Q")
    line = base.mark_line(point=True).encode(y=alt.Y("mean:Q", title="Δp(answer) when the MLP is patched"),
                                             tooltip=["model", "layer", alt.Tooltip("mean:Q", format=".4f"),
                                                      alt.Tooltip("ci_low:Q", format=".4f"),
                                                      alt.Tooltip("ci_high:Q", format=".4f")])
    marks = pd.DataFrame({"depth": list(PAPER_MARKS["mlp start–inflection–end"]), "what": ["start", "inflection", "end"]})
    paper = alt.Chart(marks).mark_rule(color=PAPER_GREY, strokeDash=[4, 3]).encode(x="depth:Q", tooltip=["what", "depth"])
    return (band + line + paper).properties(width=430, height=220, title=title or
                                            "MLP direct effect by depth (dashed: the paper's start–inflection–end)")


def interval_chart(frame: pd.DataFrame, models: Sequence[str], category: str, facet: str, title: str = "",
                   order: Sequence[str] | None = None) -> alt.Chart:
    """Point and 95 % CI of ``change`` (or ``value``) per ``category`` and model, faceted by ``facet``
    (used for the transfer contrasts and the fine-tuning comparison); a zero line for reference."""
    value = "change" if "change" in frame.columns else "value"
    base = alt.Chart().encode(y=alt.Y(f"{category}:N", sort=list(order) if order else None, title=None),
                              yOffset=alt.YOffset("model:N", sort=list(models)),
                              color=alt.Color("model:N", scale=model_colours(models), title="model"))
    points = base.mark_point(filled=True, size=60).encode(
        x=alt.X(f"{value}:Q", axis=alt.Axis(format="%"), title="change"),
        tooltip=["model", category, alt.Tooltip(f"{value}:Q", format="+.1%"), alt.Tooltip("low:Q", format="+.1%"),
                 alt.Tooltip("high:Q", format="+.1%")])
    rules = base.mark_rule().encode(x="low:Q", x2="high:Q")
    zero = alt.Chart().mark_rule(color=PAPER_GREY).encode(x=alt.datum(0))
    return alt.layer(zero, rules, points, data=frame).properties(width=210, height=alt.Step(14)).facet(
        column=alt.Column(f"{facet}:N", title=None)).properties(title=title)


#: The paper's row in :func:`trend_chart`.
PAPER_ROW = "paper, LLaMA2-7B"


def trend_chart(trend: pd.DataFrame, models: Sequence[str], title: str = "") -> alt.Chart:
    """Each :data:`arithlens.claims.across.TREND` measure against parameters (log axis), one panel each:
    a point per model with its interval (depth: the key heads' band; the others: 95 % CIs), joined in
    size order by a dashed line; grey diamonds: the paper's LLaMA2-7B where the measure is comparable (its
    random heads were not layer-matched, so its gap is 98.0 % − 30.2 %)."""
    lo, hi = PAPER_MARKS["key-head band"]
    size = PAPER_MARKS["parameters (M)"]
    paper = pd.DataFrame([
        {"model": PAPER_ROW, "measure": "key-head depth", "parameters (M)": size, "value": (lo + hi) / 2,
         "low": lo, "high": hi, "interval": "layers 12–17 of 32"},
        {"model": PAPER_ROW, "measure": "knockout gap", "parameters (M)": size,
         "value": PAPER_MARKS["knockout random-10"] - PAPER_MARKS["knockout top-10"], "interval": "none reported"}])
    data = pd.concat([trend.sort_values("parameters (M)"), paper], ignore_index=True)
    x = alt.X("parameters (M):Q", scale=alt.Scale(type="log"), title="parameters (millions, log scale)")
    scale = model_colours(models)
    colour = alt.Color("model:N", title="model", scale=alt.Scale(domain=list(scale.domain) + [PAPER_ROW],
                                                                 range=list(scale.range) + [PAPER_GREY]))
    tip = ["model", "measure", "interval", alt.Tooltip("parameters (M):Q", format=",.0f"),
           alt.Tooltip("value:Q", format="+.1%"), alt.Tooltip("low:Q", format="+.1%"), alt.Tooltip("high:Q", format="+.1%")]
    ours = alt.datum.model != PAPER_ROW
    line = alt.Chart().transform_filter(ours).mark_line(color=PAPER_GREY, strokeDash=[3, 3]).encode(
        x=x, y="value:Q", order="parameters (M):Q")
    bars = alt.Chart().mark_rule(strokeWidth=2).encode(x=x, y="low:Q", y2="high:Q", color=colour)
    points = alt.Chart().mark_point(filled=True, size=80).encode(
        x=x, y=alt.Y("value:Q", axis=alt.Axis(format="%"), title=None), color=colour, tooltip=tip,
        shape=alt.condition(ours, alt.value("circle"), alt.value("diamond")))
    zero = alt.Chart().mark_rule(color=PAPER_GREY, opacity=0.5).encode(y=alt.datum(0))
    return alt.layer(zero, line, bars, points, data=data).properties(width=220, height=200).facet(
        column=alt.Column("measure:N", sort=list(TREND), title=None)).resolve_scale(y="independent").properties(
        title=title or "Against model size (bars: 95 % CI; depth: the key heads' band; grey: the paper)")

"""Charts: tidy DataFrame in, ``altair.Chart`` out — they compute nothing.

Publishing wing. Charts must render in the built book with the network off, so notebooks call
:func:`use_offline_renderer`: each chart's output is a ``<div>`` plus a call to ``vegaEmbed``, which the
book loads once per page from ``_static/vega-bundle.js`` (built by vl-convert, see
:mod:`arithlens.runner.book`) instead of a CDN. Opened in plain Jupyter, where no bundle is on the page, the
same output falls back to the CDN. Written by hand: only that small renderer.
"""

from __future__ import annotations

import json
import uuid

import altair as alt
import pandas as pd

from arithlens.core import metrics

#: The versions the CDN fallback loads (the book uses the bundled copy).
CDN_SCRIPTS = (
    f"https://cdn.jsdelivr.net/npm/vega@{alt.VEGA_VERSION}",
    f"https://cdn.jsdelivr.net/npm/vega-lite@{alt.VEGALITE_VERSION}",
    f"https://cdn.jsdelivr.net/npm/vega-embed@{alt.VEGAEMBED_VERSION}",
)

_HTML = """<div id="{id}" class="arithlens-chart"></div>
<script>
(function() {{
  var spec = {spec};
  var el = document.getElementById("{id}");
  function show() {{
    window.vegaEmbed(el, spec, {{actions: false}}).catch(function(err) {{ el.textContent = "chart error: " + err; }});
  }}
  if (window.vegaEmbed) {{ show(); return; }}
  var urls = {cdn}, i = 0;
  (function next() {{
    if (i === urls.length) {{ show(); return; }}
    var s = document.createElement("script");
    s.src = urls[i++]; s.onload = next;
    s.onerror = function() {{ el.textContent = "chart needs vega (offline and not in the book)"; }};
    document.head.appendChild(s);
  }})();
}})();
</script>"""


def _render(spec: dict, **_) -> dict:
    html = _HTML.format(id=f"chart-{uuid.uuid4().hex[:10]}", spec=json.dumps(spec), cdn=json.dumps(list(CDN_SCRIPTS)))
    return {"text/html": html, "text/plain": "<altair chart>"}


def use_offline_renderer() -> None:
    """Make altair charts render through the book's bundled vega (see module docstring)."""
    alt.renderers.register("arithlens", _render)
    alt.renderers.enable("arithlens")
    alt.data_transformers.disable_max_rows()


def table(frame: pd.DataFrame, percent: tuple[str, ...] = (), decimals: dict[str, int] | None = None):
    """A DataFrame styled for the book: no index column, chosen columns as percentages."""
    formats = {c: "{:.0%}" for c in percent if c in frame.columns}
    formats.update({c: f"{{:.{d}f}}" for c, d in (decimals or {}).items() if c in frame.columns})
    return frame.style.hide(axis="index").format(formats)


def accuracy_heatmap(acc: pd.DataFrame, title: str = "Next-token accuracy") -> alt.Chart:
    """Template × operator heat map, one panel per few-shot setting.

    ``acc``: one row per (shots, style, template, operator) with ``accuracy`` and ``n`` columns.
    """
    base = alt.Chart(acc).encode(
        x=alt.X("operator:N", title="operator", sort=["+", "-", "*", "/"], axis=alt.Axis(labelAngle=0, labelFontSize=13)),
        y=alt.Y("template:N", title=None, sort=alt.EncodingSortField("style")),
    )
    cells = base.mark_rect().encode(
        color=alt.Color("accuracy:Q", scale=alt.Scale(domain=[0, 1], scheme="viridis"), title="accuracy"),
        tooltip=["template", "style", "operator", "shots", alt.Tooltip("accuracy:Q", format=".0%"), "n"],
    )
    labels = base.mark_text(fontSize=10).encode(
        text=alt.Text("accuracy:Q", format=".0%"),
        color=alt.condition("datum.accuracy > 0.6", alt.value("black"), alt.value("white")),
    )
    return (cells + labels).properties(width=140, height=260).facet(
        column=alt.Column("shots:O", title="few-shot demonstrations")
    ).properties(title=title)


def accuracy_by_style(acc: pd.DataFrame, title: str = "Accuracy by template style") -> alt.Chart:
    """Grouped bars: accuracy per operator for each style; ``acc`` one row per (shots, style, operator)."""
    return alt.Chart(acc).mark_bar().encode(
        x=alt.X("style:N", title=None, axis=alt.Axis(labelAngle=-30)),
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"), title="accuracy"),
        color=alt.Color("style:N", legend=None),
        column=alt.Column("operator:N", sort=["+", "-", "*", "/"]),
        row=alt.Row("shots:O", title="shots"),
        tooltip=["style", "operator", "shots", alt.Tooltip("accuracy:Q", format=".0%"), "n"],
    ).properties(width=90, height=120, title=title)


METRIC_TITLES, METRIC_SHORT = metrics.METRIC_TITLES, metrics.METRIC_SHORT


def head_heatmap(summary: pd.DataFrame, facet: str | None = None, title: str = "", independent: bool = False) -> alt.Chart:
    """Layer × head heat map of mean effects (diverging around 0) with CI tooltips.

    ``summary``: rows from :func:`arithlens.core.metrics.summarize_effects` for one metric (and one mode
    unless ``facet`` is ``"mode"``); ``facet`` splits panels by a column (e.g. ``"operator"``), with
    one colour scale per panel when ``independent`` (for panels in different units).
    """
    lim = float(max(summary["mean"].abs().max(), 1e-9))
    # one symmetric scale for a single panel; per-panel scales centred on 0 when independent
    scale = alt.Scale(scheme="redblue", domainMid=0) if independent else alt.Scale(scheme="redblue", domain=[-lim, lim])
    legend = (alt.Legend(orient="bottom", direction="horizontal", gradientLength=100, offset=50)
              if independent else alt.Legend())
    chart = alt.Chart(summary).mark_rect().encode(
        x=alt.X("head:O", title="head"),
        y=alt.Y("layer:O", title="layer", sort="descending"),
        color=alt.Color("mean:Q", scale=scale, title="mean effect", legend=legend),
        tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("head:O"), alt.Tooltip("mean:Q", format=".4f"),
                 alt.Tooltip("ci_low:Q", format=".4f", title="95% CI low"),
                 alt.Tooltip("ci_high:Q", format=".4f", title="95% CI high"), "n"]
        + ([facet] if facet else []),
    ).properties(width=120 if facet else 200, height=300)
    if facet:
        chart = chart.facet(column=alt.Column(f"{facet}:N", title=None))
        if independent:
            chart = chart.resolve_scale(color="independent")
    return chart.properties(title=title)


def knockout_chart(curve: pd.DataFrame, title: str = "Accuracy with heads mean-ablated") -> alt.Chart:
    """Accuracy vs k for top-k and random-k (mean and min–max over seeds); ``curve`` from knockout_curve."""
    data = curve[curve["condition"] != "none"]
    agg = data.groupby(["positions", "condition", "k"], as_index=False).agg(
        accuracy=("accuracy", "mean"), low=("accuracy", "min"), high=("accuracy", "max"), seeds=("seed", "nunique"))
    base = alt.Chart(agg).encode(
        x=alt.X("k:Q", title="heads ablated (k)", axis=alt.Axis(tickMinStep=1)),
        color=alt.Color("condition:N", title=None, scale=alt.Scale(domain=["top", "random"], range=["#d62728", "#7f7f7f"])),
    )
    band = base.mark_area(opacity=0.25).encode(y=alt.Y("low:Q", title="accuracy"), y2="high:Q")
    line = base.mark_line(point=True).encode(
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"), title="accuracy"),
        tooltip=["positions", "condition", "k", alt.Tooltip("accuracy:Q", format=".1%"),
                 alt.Tooltip("low:Q", format=".1%"), alt.Tooltip("high:Q", format=".1%"), "seeds"],
    )
    return (band + line).properties(width=260, height=200).facet(
        column=alt.Column("positions:N", title="ablated at")).properties(title=title)


def attention_roles_chart(roles: pd.DataFrame, title: str = "END-token attention of the key heads") -> alt.Chart:
    """Stacked bars: each head's mean END attention onto A, B, operator and other tokens."""
    long = roles.assign(name=roles["layer"].astype(str) + "." + roles["head"].astype(str) + " (" + roles["role"] + ")")
    long = long.melt(id_vars=["name", "role"], value_vars=["A", "B", "operator_token", "other"],
                     var_name="target", value_name="attention")
    return alt.Chart(long).mark_bar().encode(
        y=alt.Y("name:N", title="head (role)", sort=None),
        x=alt.X("attention:Q", stack="normalize", axis=alt.Axis(format="%"), title="share of END attention"),
        color=alt.Color("target:N", sort=["A", "B", "operator_token", "other"],
                        scale=alt.Scale(range=["#1f77b4", "#2ca02c", "#d62728", "#c7c7c7"])),
        tooltip=["name", "target", alt.Tooltip("attention:Q", format=".2f")],
    ).properties(width=360, height=alt.Step(18), title=title)


def layer_effects_chart(summary: pd.DataFrame, title: str = "") -> alt.Chart:
    """Mean effect per layer with its CI band; ``summary`` one row per layer (mean, ci_low, ci_high),
    optionally a ``series`` column for several lines."""
    data = summary if "series" in summary else summary.assign(series="effect")
    base = alt.Chart(data).encode(x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1)),
                                  color=alt.Color("series:N", title=None, legend=alt.Legend(orient="bottom", columns=1)))
    band = base.mark_area(opacity=0.2).encode(y=alt.Y("ci_low:Q", title="mean effect"), y2="ci_high:Q")
    line = base.mark_line(point=True).encode(
        y="mean:Q", tooltip=["series", "layer", alt.Tooltip("mean:Q", format=".4f"),
                             alt.Tooltip("ci_low:Q", format=".4f"), alt.Tooltip("ci_high:Q", format=".4f")])
    zero = alt.Chart(pd.DataFrame({"y": [0]})).mark_rule(color="#999").encode(y="y:Q")
    return (band + line + zero).properties(width=500, height=220, title=title)


def logit_lens_chart(lens: pd.DataFrame, title: str = "Logit lens: rank of each token by layer") -> alt.Chart:
    """Rank (log scale, 1 = top) of labelled tokens across layers, one panel per case."""
    data = lens.assign(rank1=lens["rank"] + 1)
    return alt.Chart(data).mark_line(point=True).encode(
        x=alt.X("layer:Q", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("rank1:Q", scale=alt.Scale(type="log", reverse=True), title="rank (1 = top)"),
        color=alt.Color("label:N", title=None, legend=alt.Legend(orient="bottom")),
        tooltip=["case", "label", "layer", alt.Tooltip("rank1:Q", title="rank"), alt.Tooltip("logit:Q", format=".2f")],
    ).properties(width=240, height=170).facet(facet=alt.Facet("case:N", title=None), columns=2).properties(title=title)


def transfer_chart(summary: pd.DataFrame, title: str = "Accuracy per suite: no ablation, key heads, random heads") -> alt.Chart:
    """Grouped bars with bootstrap CIs: accuracy per suite and condition, one panel per scoring.

    ``summary`` from :func:`arithlens.analyses.transfer.summarize_transfer` (columns suite, scoring, condition,
    accuracy, acc_ci_low, acc_ci_high, relative_drop)."""
    palette = {"none": "#4c78a8", "key": "#d62728", "random": "#7f7f7f", "key (own mean)": "#ff9896",
               "random (own mean)": "#c7c7c7"}
    order = [c for c in palette if c in set(summary["condition"])]
    base = alt.Chart(summary).encode(
        x=alt.X("condition:N", sort=order, title=None, axis=alt.Axis(labels=False, ticks=False)),
        color=alt.Color("condition:N", sort=order, title="heads ablated",
                        scale=alt.Scale(domain=order, range=[palette[c] for c in order])),
    )
    bars = base.mark_bar().encode(
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"), title="accuracy"),
        tooltip=["suite", "scoring", "condition", alt.Tooltip("accuracy:Q", format=".1%"),
                 alt.Tooltip("relative_drop:Q", format="+.0%", title="relative change"), "n"])
    err = base.mark_rule(color="black").encode(y="acc_ci_low:Q", y2="acc_ci_high:Q")
    return (bars + err).properties(width=12 * len(order), height=170).facet(
        column=alt.Column("suite:N", title=None, sort=list(dict.fromkeys(summary["suite"]))),
        row=alt.Row("scoring:N", title=None)).properties(title=title).configure_legend(orient="bottom")


def overlap_heatmap(overlap: pd.DataFrame, value: str = "shared", title: str = "") -> alt.Chart:
    """Suite × suite matrix of top-k overlap (``overlap`` from :func:`arithlens.analyses.transfer.overlap_matrix`)."""
    order = list(dict.fromkeys(overlap["a"]))
    base = alt.Chart(overlap).encode(x=alt.X("b:N", sort=order, title=None), y=alt.Y("a:N", sort=order, title=None))
    cells = base.mark_rect().encode(
        color=alt.Color(f"{value}:Q", title=value, scale=alt.Scale(scheme="blues")),
        tooltip=["a", "b", "shared", alt.Tooltip("shared_frac:Q", format=".0%"), alt.Tooltip("jaccard:Q", format=".2f")])
    text = base.mark_text(fontSize=13).encode(
        text=alt.Text(f"{value}:Q", format="d" if value == "shared" else ".2f"),
        color=alt.condition(f"datum.{value} > {overlap[value].max() / 2}", alt.value("white"), alt.value("black")))
    return (cells + text).properties(width=60 * len(order), height=40 * len(order), title=title)


def method_scatter(points: pd.DataFrame, methods: list[str], title: str = "") -> alt.Chart:
    """Math change vs non-math change per method with both CIs (chapter 4). ``points`` one row per
    method with ``math change/low/high`` and ``control change/low/high``; ``methods`` fixes the colour
    of each method so several panels agree."""
    base = alt.Chart(points).encode(
        x=alt.X("control change:Q", title="non-math controls: change in accuracy", axis=alt.Axis(format="+%")),
        y=alt.Y("math change:Q", title="math (all math sets): change in accuracy", axis=alt.Axis(format="+%")),
        color=alt.Color("method:N", legend=alt.Legend(orient="bottom", columns=2), scale=alt.Scale(domain=list(methods))))
    zero = alt.Chart(pd.DataFrame({"v": [0]})).mark_rule(color="#999")
    return (base.mark_rule().encode(y="math low:Q", y2="math high:Q")
            + base.mark_rule().encode(x="control low:Q", x2="control high:Q")
            + base.mark_point(filled=True, size=80).encode(tooltip=["method", alt.Tooltip("math change:Q", format="+.1%"),
                                                                    alt.Tooltip("control change:Q", format="+.1%")])
            + zero.encode(x="v:Q") + zero.encode(y="v:Q")).properties(width=420, height=300, title=title)


def heads_curve_chart(curve: pd.DataFrame, title: str = "Math accuracy vs number of tuned heads (95 % CIs over items)") -> alt.Chart:
    """Accuracy vs heads tuned, one panel per evaluation set (chapter 4). ``curve`` one row per (method,
    set) with ``heads``, ``selection`` (key heads / random), ``accuracy``, ``acc_low``, ``acc_high``."""
    line = alt.Chart(curve).mark_line(point=True).encode(
        x=alt.X("heads:Q", title="heads tuned", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("accuracy:Q", axis=alt.Axis(format="%"), title="accuracy"),
        color=alt.Color("selection:N", title=None),
        tooltip=["method", "set", alt.Tooltip("accuracy:Q", format=".1%"), alt.Tooltip("change:Q", format="+.1%")])
    ci = alt.Chart(curve).mark_errorbar().encode(x="heads:Q", y=alt.Y("acc_low:Q", title="accuracy"), y2="acc_high:Q",
                                                 color="selection:N")
    return (line + ci).properties(width=200, height=160).facet(
        facet=alt.Facet("set:N", title=None), columns=2).properties(title=title)


def lr_curve_chart(selection: pd.DataFrame, base: float, title: str = "Validation accuracy by learning rate") -> alt.Chart:
    """Chapter 4's learning-rate selection: validation accuracy per family (``family``) and rate (``lr``,
    log scale), with the base model's accuracy as a dashed rule and each family's chosen rate marked."""
    line = alt.Chart(selection).mark_line(point=True).encode(
        x=alt.X("lr:Q", scale=alt.Scale(type="log"), title="learning rate (log scale)"),
        y=alt.Y("accuracy:Q", axis=alt.Axis(format="%"), title="validation accuracy"),
        color=alt.Color("family:N", title=None),
        tooltip=["method", alt.Tooltip("lr:Q", format="g"), alt.Tooltip("accuracy:Q", format=".1%"),
                 alt.Tooltip("last loss:Q", format=".2f")])
    chosen = alt.Chart(selection[selection["chosen"]]).mark_point(size=160, shape="diamond", filled=True).encode(
        x="lr:Q", y="accuracy:Q", color=alt.Color("family:N", title=None))
    rule = alt.Chart(pd.DataFrame({"base": [base]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="base:Q")
    return (line + chosen + rule).properties(width=420, height=240, title=title)


def method_draws_chart(draws: pd.DataFrame, title: str = "Math change: the key heads among random heads") -> alt.Chart:
    """Chapter 4's R6: each random draw's (and the anti-key and all-layer rows') math change from the base
    model as a point on one axis, the key heads' as a rule. ``draws``: ``arm``, ``method``, ``seed``,
    ``math change``, ``control change``."""
    points = alt.Chart(draws[draws["arm"] != "key"]).mark_circle(size=70, opacity=0.8).encode(
        x=alt.X("math change:Q", axis=alt.Axis(format="+%"), title="math change from the base model"),
        y=alt.Y("arm:N", title=None), color=alt.Color("arm:N", legend=None),
        tooltip=["method", "seed", alt.Tooltip("math change:Q", format="+.1%"), alt.Tooltip("control change:Q", format="+.1%")])
    key = alt.Chart(draws[draws["arm"] == "key"]).mark_rule(color="black", strokeWidth=2).encode(
        x="math change:Q", tooltip=["method", alt.Tooltip("math change:Q", format="+.1%")])
    return (points + key).properties(width=420, height=120, title=title)

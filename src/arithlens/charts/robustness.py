"""Charts of chapter 7 (robustness of the head localization): tidy frames in, altair out.

Publishing wing; they compute nothing.
"""

from __future__ import annotations

import altair as alt
import pandas as pd


def faithfulness_chart(curve: pd.DataFrame, title: str = "") -> alt.Chart:
    """Fraction of the logit difference recovered keeping each ranking's top-n heads (CPR curve)."""
    return alt.Chart(curve).mark_line(point=True).encode(
        x=alt.X("n:Q", title="heads kept (top-n of the ranking; the rest mean-ablated at END)"),
        y=alt.Y("fraction_recovered:Q", axis=alt.Axis(format="%"), title="logit difference recovered"),
        color=alt.Color("ranking:N", title="ranking"),
        tooltip=["ranking", "n", alt.Tooltip("fraction_recovered:Q", format=".1%"),
                 alt.Tooltip("logit_diff:Q", format=".3f")],
    ).properties(width=420, height=240, title=title or "Faithfulness: keep the top-n heads of each ranking")


def null_chart(null: pd.DataFrame, title: str = "") -> alt.Chart:
    """Histogram of the layer-matched random sets' knockout drops, the key heads' drop as a red rule."""
    random = null[null["set"] == "random"]
    key = null[null["set"] == "key"]
    hist = alt.Chart(random).mark_bar(color="#7f7f7f", opacity=0.7).encode(
        x=alt.X("drop:Q", bin=alt.Bin(maxbins=30), axis=alt.Axis(format="%"), title="accuracy drop under knockout"),
        y=alt.Y("count():Q", title="random sets"))
    rule = alt.Chart(key).mark_rule(color="#d62728", size=3).encode(
        x="drop:Q", tooltip=[alt.Tooltip("drop:Q", format=".1%"), "heads"])
    return (hist + rule).properties(width=420, height=200, title=title or
                                    "Layer-matched random head sets (grey) and the key heads (red)")


def suite_null_chart(rows: pd.DataFrame, title: str = "") -> alt.Chart:
    """Per suite: the layer-matched random sets' drops (grey ticks) and the key heads' drop (red), math
    suites and the other suites in separate panels (``rows``: :func:`arithlens.analyses.robustness.suite_null`)."""
    frame = rows.assign(group=rows["kind"].map({"math": "math suites (first answer token)"})
                        .fillna("non-math controls (whole answer)"))
    base = alt.Chart().encode(
        y=alt.Y("suite:N", title=None),
        x=alt.X("drop:Q", axis=alt.Axis(format="%"), title="accuracy drop under knockout (points)"))
    ticks = base.mark_tick(color="#7f7f7f", opacity=0.6, thickness=2).encode(
        tooltip=["suite", alt.Tooltip("drop:Q", format=".1%")]).transform_filter(alt.datum.set == "random")
    key = base.mark_point(color="#d62728", filled=True, size=90, shape="diamond").encode(
        tooltip=["suite", alt.Tooltip("drop:Q", format=".1%")]).transform_filter(alt.datum.set == "key")
    return alt.layer(ticks, key, data=frame).properties(width=420).facet(
        row=alt.Row("group:N", title=None, header=alt.Header(labelAngle=0, labelAlign="left", labelFontWeight="bold")),
    ).resolve_scale(y="independent").properties(
        title=title or "Key heads (red) against layer-matched random sets (grey), suite by suite")

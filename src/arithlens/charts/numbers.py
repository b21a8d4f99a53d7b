"""Charts of chapter 6 (number representations and answer-writing neurons): tidy frames in, altair out.

Publishing wing; they compute nothing. Fourier power is drawn as the ratio to chance (1 = what a
random basis function of the same size explains), so layers and periods compare on one scale.
"""

from __future__ import annotations

import altair as alt
import pandas as pd


def fourier_chart(power: pd.DataFrame, title: str = "") -> alt.Chart:
    """Share of the numbers' variance on each period's cos/sin pair ÷ chance, one line per period, by layer."""
    return alt.Chart(power).mark_line(point=True).encode(
        x=alt.X("layer:O", title="layer (residual stream after it)", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("ratio:Q", scale=alt.Scale(type="log"), title="variance share ÷ chance (log)"),
        color=alt.Color("period:N", title="period T"),
        tooltip=["layer", "period", alt.Tooltip("share:Q", format=".3f"), alt.Tooltip("chance:Q", format=".4f"),
                 alt.Tooltip("ratio:Q", format=".1f")],
    ).properties(width=420, height=220, title=title or "Fourier power of the numbers' residual vectors, per layer")


def helix_scatter(points: pd.DataFrame, title: str = "") -> alt.Chart:
    """Numbers in the plane of two helix coordinates (``x``, ``y`` columns), coloured by the number."""
    base = alt.Chart(points).encode(x=alt.X("x:Q", title=points.attrs.get("x", "x")),
                                    y=alt.Y("y:Q", title=points.attrs.get("y", "y")))
    dots = base.mark_circle(size=60, opacity=0.8).encode(color=alt.Color("number:Q", scale=alt.Scale(scheme="viridis")),
                                                         tooltip=["number", alt.Tooltip("x:Q", format=".2f"),
                                                                  alt.Tooltip("y:Q", format=".2f")])
    return dots.properties(width=300, height=300, title=title)


def heuristic_share_chart(shares: pd.DataFrame, title: str = "") -> alt.Chart:
    """Share of the top neurons of each heuristic type, per operator (stacked bars)."""
    return alt.Chart(shares).mark_bar().encode(
        x=alt.X("share:Q", axis=alt.Axis(format="%"), title="share of top neurons", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("operator:N", title=None),
        color=alt.Color("type:N", title="heuristic"),
        tooltip=["operator", "type", "neurons", alt.Tooltip("share:Q", format=".0%")],
    ).properties(width=420, height=alt.Step(24), title=title or "What the top neurons detect")


def keep_top_k_chart(curve: pd.DataFrame, title: str = "") -> alt.Chart:
    """Accuracy keeping the top k % of neurons (or as many random ones), the rest mean-ablated."""
    agg = curve[curve["condition"] != "clean"].groupby(["condition", "percent"], as_index=False).agg(
        accuracy=("accuracy", "mean"), low=("accuracy", "min"), high=("accuracy", "max"))
    clean = float(curve[curve["condition"] == "clean"]["accuracy"].mean())
    base = alt.Chart(agg).encode(x=alt.X("percent:Q", title="neurons kept (% of the layers' neurons)"),
                                 color=alt.Color("condition:N", title=None,
                                                 scale=alt.Scale(domain=["top", "random"], range=["#d62728", "#7f7f7f"])))
    band = base.mark_area(opacity=0.25).encode(y="low:Q", y2="high:Q")
    line = base.mark_line(point=True).encode(
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"), title="accuracy"),
        tooltip=["condition", "percent", alt.Tooltip("accuracy:Q", format=".1%")])
    rule = alt.Chart(pd.DataFrame({"accuracy": [clean]})).mark_rule(strokeDash=[4, 3]).encode(y="accuracy:Q")
    return (band + line + rule).properties(width=360, height=220, title=title or
                                           "Keep only the top-k % neurons (dashed: nothing ablated)")

"""Charts: tidy DataFrame in, ``altair.Chart`` out — they compute nothing.

Publishing wing. Charts must render in the built book with the network off, so notebooks call
:func:`use_offline_renderer`: each chart's output is a ``<div>`` plus a call to ``vegaEmbed``, which the
book loads once per page from ``_static/vega-bundle.js`` (built by vl-convert, see
:mod:`arithlens.book`) instead of a CDN. Opened in plain Jupyter, where no bundle is on the page, the
same output falls back to the CDN. Written by hand: only that small renderer.
"""

from __future__ import annotations

import json
import uuid

import altair as alt
import pandas as pd

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
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        color=alt.Color("style:N", legend=None),
        column=alt.Column("operator:N", sort=["+", "-", "*", "/"]),
        row=alt.Row("shots:O", title="shots"),
        tooltip=["style", "operator", "shots", alt.Tooltip("accuracy:Q", format=".0%"), "n"],
    ).properties(width=90, height=120, title=title)

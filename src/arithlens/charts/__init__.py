"""Charts: a DataFrame in, an ``altair.Chart`` out; nothing is computed here. ``figures`` (chapters
0–4 and the offline renderer), ``numbers`` (chapter 6), ``robustness`` (chapter 7), ``across``
(chapter 5). Imports ``claims`` at most."""

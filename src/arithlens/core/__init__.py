"""The ground floor of the science: the model and what every analysis stands on.

``registry`` (the models arithlens knows and how to fetch them), ``specs`` (what a model spec names),
``models`` (loading a model into a TransformerLens bridge), ``layout`` (where a block's norms act),
``hooks`` (heads, hook names, END-only reruns), ``items`` (the item protocol, tokenization, batching),
``metrics`` (intervals, effect summaries, key-head selection), ``deltas`` (weight changes written into
a model), ``threads`` (torch's thread share) and ``progress``. Imports only the top-level ground
modules (``paths``, ``record``, ``paper``).
"""

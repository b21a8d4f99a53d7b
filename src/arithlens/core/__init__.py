"""The ground floor of the science: the model and what every analysis stands on.

``registry`` (the models arithlens knows and how to fetch them), ``specs`` (what a model spec names),
``models`` (loading a model into a TransformerLens bridge), ``layout`` (where a block's norms act),
``hooks`` (heads, hook names, END-only reruns), ``conditions`` (many conditions on one prefix, stacked
and from their lowest hooked layer), ``items`` (the item protocol, tokenization, batching),
``metrics`` (intervals, effect summaries, key-head selection), ``deltas`` (weight changes written into
a model), ``twin`` (a hook-free HF twin of the model and its layer loop from any layer), ``threads``
(torch's thread share) and ``progress``. Imports only the top-level ground
modules (``paths``, ``record``, ``paper``).
"""

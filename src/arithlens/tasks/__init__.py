"""What the model is asked: items with counterfactuals and asserted token positions.

``prompts`` (the paper's single-digit arithmetic prompts and templates), ``suites`` and ``generators``
(the transfer suites and their prompt generators), ``benchmarks/`` (public benchmark files read from
disk and scored). Imports ``core``.
"""

"""What the model is asked: items with counterfactuals and asserted token positions.

``facts`` (operators, the facts in range and their split in two halves), ``prompts`` (the paper's
single-digit arithmetic prompts, templates and counterfactuals), ``suites`` and ``generators``
(the transfer suites and their prompt generators), ``benchmarks/`` (public benchmark files read from
disk and scored). Imports ``core``.
"""

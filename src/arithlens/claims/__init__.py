"""From stored tables to the statements a page makes: ``findings`` (what one chapter hands another
through the run graph), ``transfer_suites`` (chapter 3's suites rebuilt for chapter 7), ``intervals``
(the statistics behind them), ``rules`` (each claim's rule in words, with its history), ``verdicts`` (each claim's one rule, applied on every page that states the claim) and ``across`` (chapter 5's
summaries). Imports ``analyses``, ``tasks`` and ``core``.
"""

"""From stored tables to the statements a page makes: ``findings`` (what one chapter hands another
through the run graph), ``verdicts`` (each claim's one rule) and ``across`` (chapter 5's summaries).
Imports ``analyses``, ``tasks`` and ``core``.
"""

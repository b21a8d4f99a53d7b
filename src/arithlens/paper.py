"""What the paper reports, in one place, so chapters put our measurements beside it.

Ground floor. Numbers are from Zhang et al. (ICML 2024) as summarised in ``shared/paper-notes.md``
(the full text could not be read here): cite them as *reported*. Nothing here is computed.
"""

from __future__ import annotations

#: Paper § "Setup" (LLaMA2-7B unless noted).
SETUP = {
    "models": "LLaMA2-7B (32 layers × 32 heads), LLaMA2-13B (40 × 40), Mistral-7B (appendix)",
    "operand range": "1..9",
    "operators": "+ − × ÷",
    "answer": "a single token",
    "templates": "36, in three styles (equation, statement, question-answer)",
    "counterfactual": "operator replaced by a null word ('nothing', 'none') or symbol ('<', '@')",
    "samples": "about 10k, only those the model answers correctly",
    "mean p(correct answer) on kept samples": "≈ 0.82",
}

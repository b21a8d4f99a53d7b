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

#: Paper § "Path patching", "Knockout", "Attention analysis" (LLaMA2-7B, 32 layers × 32 heads).
HEADS = {
    "share of heads that are key heads": "< 5 %",
    "layer band of key heads": "12–17 of 32 (fraction of depth 0.38–0.53)",
    "largest single-head effect": "12.22: answer logit ≈ −14 %",
    "key-head threshold": "relative logit change ≤ −5 %",
    "knockout, top-10 heads": "accuracy 100 % → 30.2 %",
    "knockout, 10 random heads": "accuracy 100 % → 98.0 %",
    "head roles": "operand heads 13.11, 12.22, 15.15; operator heads 14.2, 11.8",
}

#: Paper § "MLP tracing" (LLaMA2-7B unless noted).
MLP = {
    "MLPs before the head band": "layers 0–16: almost no direct effect",
    "later MLPs": "from layer 17: about ±10 % each",
    "start–inflection–end layers": "13–18–28 (LLaMA2-7B), 13–18–35 (13B), 13–20–28 (Mistral-7B)",
    "as fraction of depth": "0.41–0.56–0.88 (LLaMA2-7B)",
    "logit lens": "4+3=: operands promoted first (layers 17, 19), answer emerges 22–27",
}

#: Paper § "Transfer" (LLaMA2-7B).
TRANSFER = {
    "tasks broken by knocking out the key heads": "multi-digit (281+135), decimals (4.2 plus 2.5), year spans "
                                                  "(from 1723 to 172_) — reported qualitatively",
    "SVAMP, key heads knocked out": "−66 % relative",
    "exponentiation, key heads knocked out": "−62 to −66 % relative (uses the same five heads)",
    "MMLU-Humanities (non-math), key heads knocked out": "42.9 → 42.6",
    "GSM8K localized independently": "shares 6 of its top-10 heads with the arithmetic top-10; "
                                     "the other 4 attend to text",
}

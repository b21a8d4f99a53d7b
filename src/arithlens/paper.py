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

#: Paper § "Precise SFT" (LLaMA2-7B unless noted): accuracy in %, rows as reported.
PRECISE_SFT_SETTINGS = {
    "tuned": "key heads' W_Q, W_K, W_V (d_model × d_head) and W_O (d_head × d_model) slices; rest frozen",
    "gradient rescale": "× H/h (H heads per layer, h tuned in that layer)",
    "optimizer settings": "lr 2e-5, batch 128, 2 epochs (the same for full SFT)",
    "training data": "not stated",
    "Precise SFT size and speed": "32 heads = 0.07B parameters, 3.3× faster than full SFT",
    "random-head or LoRA baselines": "not reported",
}
PRECISE_SFT_TABLE = [  # LLaMA2-7B: math (GSM8K, AddSub, SingleEq, SVAMP) and non-math (MMLU, CSQA)
    {"method": "base", "GSM8K": 14.6, "AddSub": 30.5, "SingleEq": 65.4, "SVAMP": 34.7, "MMLU": 46.0, "CSQA": 59.8},
    {"method": "full SFT (6.7B params)", "GSM8K": 24.6, "AddSub": 53.7, "SingleEq": 68.2, "SVAMP": 50.3, "MMLU": 40.5, "CSQA": 54.0},
    {"method": "Precise SFT (32 heads)", "GSM8K": 27.4, "AddSub": 50.6, "SingleEq": 69.7, "SVAMP": 55.8, "MMLU": 46.4, "CSQA": 59.6},
]
PRECISE_SFT_MATH = ("GSM8K", "AddSub", "SingleEq", "SVAMP")
PRECISE_SFT_CONTROL = ("MMLU", "CSQA")
#: Heads tuned (of 1024) → GSM8K / MMLU; heads + MLP layers (with the 32 heads) → GSM8K / MMLU.
PRECISE_SFT_HEADS_ABLATION = {8: (25.4, 45.1), 16: (26.5, 45.8), 32: (27.4, 46.4), 48: (27.4, 46.4), 64: (27.3, 45.5)}
PRECISE_SFT_MLP_ABLATION = {1: (27.5, 46.0), 3: (28.0, 45.2), 6: (28.2, 44.9), "all": (29.2, 43.9)}
PRECISE_SFT_13B = "Precise SFT: +17.6 on math, MMLU +0.2, CSQA −0.1; full SFT: MMLU −4.6, CSQA −5.3"

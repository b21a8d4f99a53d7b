"""What each claim says and the rule that decides it, in words, with every change to a rule since its
first version.

Science wing, claims floor: the words of :mod:`arithlens.claims.verdicts`, which applies each rule (one
function per claim). The book prints :data:`RULES` beside every verdict and :func:`rule_history_table`
where the rules are written; a rule's version is 1 + its changes.
"""

from __future__ import annotations

import pandas as pd

#: Claim id → (short statement, the chapter that measures it).
CLAIMS = {
    "C1": ("Few heads (< 5 %), in a middle band of layers, carry the arithmetic", "01_heads"),
    "C2": ("Key heads split into operand heads and operator heads", "01_heads"),
    "C3": ("Knocking out the top-k heads hurts far more than k random heads", "01_heads"),
    "C4": ("MLPs after the heads write the answer", "02_mlp"),
    "C5": ("The key heads serve other math, but not non-math tasks", "03_transfer"),
    "C6": ("Precise SFT improves math, matches or beats tuned full SFT there with no more forgetting, and keeps "
           "non-math skills", "04_precise_sft"),
    # harder tests of C1, C3 and C5 from chapter 7 (beyond the paper)
    "R1": ("C1's *few* under the other reading of the threshold (−1 %)", "07_robustness"),
    "R3": ("The key heads beat 100 random sets drawn from their own layers", "07_robustness"),
    "R5": ("Suite by suite, the key heads beat a layer-matched null on math and not on non-math", "07_robustness"),
    "R6": ("Tuning the key heads beats tuning random heads of the same layers", "04_precise_sft"),
}
#: The claims the paper makes (C1–C6); the others are harder tests of them (chapter 7's R1, R3, R5; chapter 4's R6).
PAPER_CLAIMS = tuple(c for c in CLAIMS if c.startswith("C"))

#: The rule each verdict applies, as the book prints it next to the table.
RULES = {
    "C1": "Chapter 1, on the evaluation half of the facts. *Few*: keeping only the top 5 % of heads (⌊0.05 × heads⌋, "
          "every other head mean-ablated at END) recovers at least 80 % of the clean logit difference answer − best "
          "other digit (ratio of means over prompts; its 95 % interval from a bootstrap over prompts is shown), for the ranking of the paper's direct convention and for that of the path convention (each "
          "ranked by the change in log p(answer) among the digits, on the localization half). *Middle band*: the "
          "median key head sits inside the paper's band, 0.375–0.5625 of depth (layers 12–17 of 32). Holds: all "
          "three; partly: one or two; does not hold: none.",
    "C2": "Chapter 1's END-attention roles (operand: ≥ 20 % of attention on A + B and more than on the operator; "
          "operator: the reverse), on the evaluation half. *Split*: the key heads include an operand head and an "
          "operator head. *Beyond their layers*: a larger share of the key heads has a role than of the other heads "
          "in the same layers (one-sided Fisher exact test, p ≤ 0.05). Holds: both; partly: one, or only one kind "
          "of role; does not hold: no key head has a role.",
    "C3": "Chapter 1's END knockout at its largest k, on the evaluation half of the facts: accuracy with k "
          "layer-matched random heads (as many in each layer as the top-k, never a top head; at least 20 draws) "
          "minus accuracy with the top-k heads, paired by prompt; 95 % interval from a bootstrap over prompts and "
          "draws together. Holds: the interval lies above 0; partly: the gap is above 0 but the interval reaches 0; "
          "does not hold: the gap is not above 0.",
    "C4": "Chapter 2, on chapter 1's localization prompts: the three MLPs with the largest direct effect (mean change in "
          "log p(answer) among the digits, 95 % CI). *After*: all three come after the key heads' median layer. "
          "*Through*: those three MLPs carry at least 25 % of the key heads' joint path effect (the heads' change routed "
          "into each MLP's input alone, summed, over all key heads patched together; lower end of a 95 % bootstrap "
          "interval over prompts). Holds: both; partly: one; does not hold: neither, or no MLP's CI excludes zero.",
    "C5": "Chapter 3's knockout transfer, every suite scored by its whole answer and ablated with its own mean (the "
          "heads' mean output on that suite's prompts); mean relative accuracy change over the usable suites of each "
          "kind, paired bootstrap 95 % CIs over items. *Math*: key heads drop math more than random heads (CI of key − "
          "random below 0). *Selective*: the controls' CI under the key heads lies above −10 % and above math's change "
          "(CI of control − math above 0). Holds: both; partly: one; does not hold: neither.",
    "C6": "Chapter 4's mean change of accuracy on held-out math and on non-math controls (each set weighing equally), "
          "every method at the learning rate it does best at on validation, 95 % intervals resampling training "
          "seeds and items together. *Improves*: Precise SFT's math interval lies above zero. *Matches*: its math "
          "interval reaches full SFT's math change or above, and so does its control interval full SFT's control "
          "change (no more forgetting), full SFT having trained (over its seeds, the mean loss of its last quarter "
          "of steps at most the untrained weights' loss on those same batches). *Keeps*: "
          "its control interval's lower end is above −5 points. Holds: all three; partly: one or two; does not "
          "hold: none.",
    "R1": "Chapter 7's threshold table, chapter 1's heads in chapter 7's patching convention (`mode`), relative change "
          "of the answer logit at the looser −1 % reading of the paper's threshold. Holds: at least one head and at "
          "most 5 % of heads pass it; does not hold: none, or more than 5 %.",
    "R3": "Chapter 7's knockout null: the key heads' accuracy drop at END against layer-matched random sets (as many "
          "heads in each layer, never a key head), one-sided empirical p = (1 + #{null ≥ key}) / (1 + sets). Holds: "
          "p ≤ 0.05; partly: the key drop exceeds the null's mean but p > 0.05; does not hold: it does not exceed it.",
    "R5": "Chapter 7's null on chapter 3's usable suites, each scored by its whole answer and ablated with its own mean, "
          "the same layer-matched sets on every suite, p as in R3. Holds: p ≤ 0.05 after Holm's correction across the "
          "math suites on every math suite, and uncorrected p > 0.05 on every control (no correction there: it would "
          "make *not on controls* easier); partly: on some math suite, but not every one or also on a control; does "
          "not hold: on no math suite.",
    "R6": "Chapter 4: Precise SFT on the key heads (first training seed) against Precise SFT on at least 10 "
          "layer-matched random head sets (as many heads in each layer, never a key head), each at the random "
          "heads' chosen learning rate, same batches: the key heads' math change placed among the draws'. Holds: "
          "one-sided rank p = (1 + draws at or above the key heads) / (1 + draws) ≤ 0.05, which needs at least 19 "
          "draws; partly: above the draws' median; does not hold: not above it.",
}


#: Every change to a rule after its first version: claim, date, what changed, why, and whether results under
#: the old rule had been seen. A rule's version is 1 + its changes; the first page lists them all.
RULE_HISTORY = (
    {"claim": "C6", "date": "2026-11-23", "change": "Precise SFT must also improve math (its interval above zero)",
     "reason": "beating a full SFT that collapsed at the shared learning rate proved nothing (Qwen 0.5B: full SFT −61 %)",
     "after results": True},
    {"claim": "C6", "date": "2026-11-23", "change": "beating a full SFT whose training loss rose is not counted",
     "reason": "Qwen 0.5B's full SFT diverged (loss 0.08 → 3.57); both changes made the rule stricter",
     "after results": True},
    {"claim": "C1", "date": "2026-12-06",
     "change": "*few* is what the top 5 % of heads recover (≥ 80 %), under the direct and the path ranking, on held-out "
               "facts; the band is the paper's (0.375–0.5625 of depth) instead of 25–75 %",
     "reason": "the old count of heads past −5 % of the answer logit moves when every logit shifts by a constant, "
               "and the old band was wider than the paper's", "after results": True},
    {"claim": "C2", "date": "2026-12-06", "change": "the key heads' role rate is compared with the other heads of "
               "their layers (Fisher exact test)", "reason": "any head may attend to the operands; a claim about "
               "key heads needs a baseline", "after results": True},
    {"claim": "C3", "date": "2026-12-06", "change": "random heads layer-matched, ≥ 20 draws, paired by prompt, one "
               "bootstrap over prompts and draws, on the evaluation half of the facts", "reason": "pooling prompts × "
               "draws as independent trials ignored the variance between head sets, and the held-out prompts "
               "shared their facts with localization", "after results": True},
    {"claim": "C4", "date": "2026-12-06", "change": "*through* added: the top MLPs must carry a quarter of the key "
               "heads' joint effect; the MLPs ranked by the digit log-probability instead of p(answer); *after* needs "
               "all three", "reason": "MLPs after the heads are nearly automatic for a next-token task; the claim is "
               "that the heads' effect goes through them", "after results": True},
    {"claim": "C5", "date": "2026-12-06", "change": "math suites scored by the whole answer like the controls; every "
               "suite ablated with its own mean; *selective* also needs the controls to lose less than 10 %",
     "reason": "math and controls were scored and ablated differently, and *selective* asked only that controls "
               "lose less than math", "after results": True},
    {"claim": "C6", "date": "2026-12-06", "change": "each method at its own learning rate chosen on validation, "
               "several training seeds in the intervals; *beats* becomes *matches* (math interval reaching full "
               "SFT's change, with less forgetting); *keeps* needs the control interval above −5 points instead of "
               "reaching zero", "reason": "one shared rate broke full SFT, one seed hid the variance between runs, "
               "and an interval reaching zero on small control sets is absence of evidence; *matches* compares "
               "math and controls the same way (Precise SFT's interval against full SFT's change), a form settled "
               "after SmolLM2's first run under this version, where a point-against-point reading of the controls "
               "turned on 0.1 points", "after results": True},
    {"claim": "C5", "date": "2026-12-06", "change": "a whole numeric answer must also end: after its last token "
               "the model predicts no token that goes on writing the number", "reason": "on digit-by-digit tokenizers "
               "an answer counted as written when the model went on writing a longer number (SmolLM2 on SVAMP: 9.4 % "
               "teacher-forced against 0 % by generation)", "after results": True},
    {"claim": "R5", "date": "2026-12-06", "change": "whole answer and each suite's own mean as in C5; Holm's correction "
               "across the math suites; 200 sets per suite instead of 20", "reason": "20 sets could not give p below "
               "0.048, and nine suites were tested with no correction", "after results": True},
    {"claim": "R5", "date": "2026-12-06", "change": "a whole numeric answer must also end, as in C5",
     "reason": "as in C5", "after results": True},
    {"claim": "C5", "date": "2026-12-06", "change": "a suite counts when its whole-answer accuracy is 15 points above "
               "the better of guessing and always giving its most common answer (was: guessing, 0 for a free answer)",
     "reason": "a suite whose answers are few (word problems answered 0–9) is passed by a model that always writes "
               "the same number", "after results": True},
    {"claim": "R5", "date": "2026-12-06", "change": "the suites of C5's new chance rule", "reason": "as in C5",
     "after results": True},
    {"claim": "R6", "date": "2026-12-06", "change": "*holds* needs a rank p ≤ 0.05 (19 or more draws) instead of "
               "a percentile of at least 90", "reason": "with 10 draws a percentile of 90 is p = 0.18 and even the top "
               "place only p = 0.091: the old rule called a result that chance gives one time in six a hold "
               "(Qwen 0.5B: percentile 90, p = 0.182)", "after results": True},
    {"claim": "C6", "date": "2026-12-07", "change": "full SFT counts as trained when its last quarter of steps has a "
               "mean loss at most the untrained weights' on the same batches, instead of at most its first step's",
     "reason": "the first step's loss is on another batch: on Qwen 0.5B at its chosen rate (1e-6) the first batches "
               "were the easier (0.09 against 0.15 on the last quarter's), so a full SFT that raised held-out math by "
               "11 points read as diverged", "after results": True},
)


def rule_version(claim: str) -> int:
    """1 + the changes :data:`RULE_HISTORY` lists for ``claim``."""
    return 1 + sum(h["claim"] == claim for h in RULE_HISTORY)


def rule_history_table() -> pd.DataFrame:
    """:data:`RULE_HISTORY` as a table, each change with the version it made."""
    rows, seen = [], {}
    for h in RULE_HISTORY:
        seen[h["claim"]] = seen.get(h["claim"], 1) + 1
        rows.append({"claim": h["claim"], "version": seen[h["claim"]], **{k: v for k, v in h.items() if k != "claim"}})
    return pd.DataFrame(rows, columns=["claim", "version", "date", "change", "reason", "after results"])


def rules_markdown(claims) -> str:
    """``claims``' rules as a Markdown list, each with its version, then every change to them
    (:data:`RULE_HISTORY`): date, what changed, why, and whether results under the old rule had been seen."""
    claims = [c for c in dict.fromkeys(claims) if c in RULES]
    lines = [f"- **{c}** (version {rule_version(c)}) {RULES[c]}" for c in claims]
    changes = [h for h in RULE_HISTORY if h["claim"] in claims]
    if changes:
        lines += ["", "**Changes to the rules**, each with its reason:", ""]
        lines += [f"- {h['date']} · **{h['claim']}**: {h['change']}. *Why:* {h['reason']}"
                  + (" (made after results under the old rule had been seen)." if h["after results"] else ".")
                  for h in changes]
    return "\n".join(lines)

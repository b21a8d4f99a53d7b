"""What chapter 4's rows are called, and which family each belongs to.

Science wing (paper § "Precise SFT"). Chapter 4 names each row it trains (``"Precise SFT (10 key
heads)"``, ``"random 10 heads"``, ``"LoRA r=9"``, ``"full SFT"``, and the base model's ``"base"``); later
readers of its stored tables — the C6 rule (:mod:`arithlens.claims.verdicts`), chapter 5's summaries,
chapter 6 — tell the rows apart by :func:`method_family`, never by matching strings of their own. This
module imports nothing, so the claims that read chapter 4's tables do not reach the trainer (and an
edit to the trainer does not re-key them). :mod:`arithlens.analyses.sft.comparison` builds the grid.
"""

from __future__ import annotations

#: The name of the reference row in a comparison: the base model, scored with no delta applied.
BASE = "base"
#: The families of rows, as :func:`method_family` names them; full SFT is one row, and so is the base
#: model (:data:`BASE`, the reference every change is measured from).
FULL, PRECISE, RANDOM, LORA, ANTI = "full SFT", "Precise SFT", "random heads", "LoRA", "anti-key heads"
#: The baselines the paper does not report, which chapter 4 adds beside Precise SFT.
BASELINES = (RANDOM, LORA, ANTI)
#: The families whose learning rate chapter 4 chooses on validation, each for itself.
TUNED = (FULL, PRECISE, RANDOM, LORA)
#: Where chapter 4 keeps a trained delta (only the tuned slices; see :func:`arithlens.core.deltas.save_delta`),
#: by family: the main Precise SFT row's, the first random-head draw's, the first LoRA row's. Chapter 6
#: compares the neurons these three move (:func:`arithlens.claims.findings.tuned_deltas`).
DELTA_FOLDERS = {PRECISE: "delta", RANDOM: "delta_random", LORA: "delta_lora"}
#: Every delta chapter 4 keeps: full SFT's first seed (every weight), then :data:`DELTA_FOLDERS`. Chapter 8
#: asks each of them the public benchmarks (``tuned_deltas(run, with_full=True)``).
KEPT_FOLDERS = {FULL: "delta_full", **DELTA_FOLDERS}



def precise_name(k: int) -> str:
    """``"Precise SFT (10 key heads)"``: Precise SFT on the top ``k`` heads of chapter 1's ranking."""
    return f"{PRECISE} ({k} key head{'s' if k != 1 else ''})"


def random_name(k: int) -> str:
    """``"random 10 heads"``: Precise SFT on ``k`` random heads (every draw shares the name, and one row)."""
    return f"random {k} heads"


def lora_name(rank: int, lr: float | None = None) -> str:
    """``"LoRA r=9"``, or ``"LoRA r=9 (lr 0.001)"`` when several learning rates are compared."""
    return f"{LORA} r={rank}" + (f" (lr {lr:g})" if lr is not None else "")


def anti_name(k: int) -> str:
    """``"anti-key 10 heads"``: Precise SFT on the ``k`` heads of the key heads' layers and above whose
    effect in chapter 1 is smallest in size."""
    return f"anti-key {k} heads"


def random_all_name(k: int) -> str:
    """``"random 10 heads (all layers)"``: random heads drawn from every layer, a check on the layer-matched draws."""
    return f"random {k} heads (all layers)"


def mlp_name(k: int, n_mlp: int) -> str:
    """``"10 key heads + 3 MLP"``: the ``k`` key heads plus the ``n_mlp`` MLP layers chapter 2 ranks first."""
    return f"{k} key heads + {n_mlp} MLP"


def method_family(name: str) -> str:
    """The family of a row named by this module: ``"Precise SFT (10 key heads)"`` → ``"Precise SFT"``,
    ``"random 10 heads"`` → ``"random heads"``, ``"LoRA r=9"`` → ``"LoRA"``, ``"full SFT"``, ``"base"``;
    an ablation row with MLP layers (``"10 key heads + 3 MLP"``) is its own family."""
    if name.startswith("random ") and name.endswith("(all layers)"):
        return name  # a check beside the random family, not one of its draws
    for prefix, family in ((PRECISE, PRECISE), ("random ", RANDOM), (LORA, LORA), (FULL, FULL), (BASE, BASE),
                           ("anti-key ", ANTI)):
        if name.startswith(prefix):
            return family
    return name

"""Checks for exercise 4 — a logit lens over layers for one prompt.

Reference: :func:`arithlens.analyses.mlp.logit_lens` (each layer's ``resid_post`` at END through the final
norm and the unembedding; rank = how many vocabulary entries score strictly higher). Fresh prompt
and tokens on a tiny random-init model with an unseen seed.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from arithlens.core import hooks, models
from arithlens.core.items import to_tokens
from arithlens.analyses import mlp
from arithlens.tasks import prompts
from arithlens.classroom.checks import max_diff, tensor

FUNCTIONS = ("layer_logits", "token_ranks")
#: Out of the student's reach while the checks run (:mod:`arithlens.classroom.guard`): what the
#: exercise asks for, and what would do the work instead.
REFERENCES = ("arithlens.analyses.mlp.logit_lens",
              "arithlens.core.layout.final_logits")
SPEC = "tiny:4"


@lru_cache(maxsize=None)
def _setup():
    model = models.load_model(SPEC)
    item = prompts.make_item(model.tokenizer, "qa_symbol", "+", 3, 5, shots=1, seed=31)
    tokens = to_tokens([item]).to(model.device)
    ids = [item.answer_token, item.clean_tokens[item.a_pos], item.clean_tokens[item.b_pos],
           int(model.tokenizer.convert_tokens_to_ids("7")), int(model.tokenizer.convert_tokens_to_ids("Q"))]
    lens = mlp.logit_lens(model, [item], {f"t{i}": [t] for i, t in enumerate(ids)})
    return model, item, tokens, ids, lens


def _wide(lens, column: str) -> torch.Tensor:
    table = lens.pivot(index="layer", columns="label", values=column)
    return torch.tensor(table[[f"t{i}" for i in range(table.shape[1])]].to_numpy())


def last_layer_is_the_output(layer_logits) -> str:
    """The lens after the last layer equals the model's own logits at END."""
    model, item, tokens, _, _ = _setup()
    got = tensor(layer_logits(model, tokens.clone()), (model.n_layers, model.cfg.d_vocab), "layer_logits(...)")
    with torch.no_grad():
        want = model.bridge(tokens, return_type="logits")[0, -1].float().cpu()
    diff = max_diff(got[-1], want)
    assert diff <= 1e-4 * (1 + float(want.abs().max())), (
        f"the last layer's lens is off by up to {diff:.3g} from the model's output logits (final norm applied?)")
    return f"last layer = model output (max |error| {diff:.1e})"


def lens_matches_library(layer_logits) -> str:
    """Every layer's logits for five tokens equal mlp.logit_lens on a fresh prompt."""
    model, item, tokens, ids, lens = _setup()
    got = tensor(layer_logits(model, tokens.clone()), (model.n_layers, model.cfg.d_vocab), "layer_logits(...)")[:, ids]
    want = _wide(lens, "logit").float()
    diff = max_diff(got, want)
    bad = int((got - want).abs().amax(1).argmax())
    assert diff <= 1e-4 * (1 + float(want.abs().max())), f"layer {bad}: logits off by up to {diff:.3g} from mlp.logit_lens"
    return f"{model.n_layers} layers × {len(ids)} tokens of {item.clean.splitlines()[-1]!r}, max |error| {diff:.1e}"


def ranks_match_library(token_ranks) -> str:
    """Ranks (0 = top; ties share a rank) equal mlp.logit_lens's, and handle ties."""
    model, item, tokens, ids, lens = _setup()
    with torch.no_grad():
        names = [hooks.resid_post(layer) for layer in range(model.n_layers)]
        _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
        resid = torch.stack([cache[n][0, -1] for n in names])
        full = model.bridge.unembed.original_component(model.bridge.ln_final.original_component(resid)).float()
    got = tensor(token_ranks(full.clone(), list(ids)), (model.n_layers, len(ids)), "token_ranks(...)")
    want = _wide(lens, "rank")
    assert torch.equal(got.long(), want.long()), (
        f"ranks differ from mlp.logit_lens, e.g. layer {int((got.long() != want.long()).any(1).float().argmax())}")
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0]])
    tied = tensor(token_ranks(ties.clone(), [1, 3, 0]), (1, 3), "token_ranks on [[1, 3, 3, 0.5, 3]]").long().tolist()
    assert tied == [[0, 4, 3]], f"on logits [[1, 3, 3, 0.5, 3]] ranks of tokens [1, 3, 0] are {tied}; expected [[0, 4, 3]]"
    return f"{model.n_layers} layers × {len(ids)} tokens match, ties handled"


CHECKS = [last_layer_is_the_output, lens_matches_library, ranks_match_library]

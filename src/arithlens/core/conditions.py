"""Many conditions on one prefix: stacked along the batch, each pass from its lowest hooked layer.

Ground floor, above :mod:`arithlens.core.hooks` (whose prefix cache and reruns it uses). Knockout curves,
null distributions over hundreds of head sets and transfer suites all ask the same question under
many conditions — sets of hooks — on the same prompts. A pass over a few short rows is bound by
streaming the weights, not by arithmetic, so :func:`after_prefix_many` stacks conditions along the
batch (up to :data:`STACK_ROWS` rows × positions a pass), each condition's hooks seeing only its own
rows; where every hook acts on heads' outputs (``hook_z``) and the twin's layer loop is checked for
the architecture, each pass starts at its lowest hooked layer on the clean residual stream
(:class:`arithlens.core.twin.TailFromLayer`), since nothing below it differs. :func:`end_only_many`
reads END; :func:`correct_at_end` gives greedy correctness under every condition, batch by batch,
one batch's prefix cache held at a time.

Written by hand on TransformerLens hooks and Hugging Face ``past_key_values``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from arithlens.core.hooks import Hook, prefix_kv, run_after_prefix
from arithlens.core.items import AnswerBatch
from arithlens.core.models import LoadedModel, logits_at_end
from arithlens.core.twin import tail_route


#: Whether passes whose hooks all act on heads' outputs start at their lowest hooked layer on the twin
#: (where its layer loop is checked); False runs every pass on the bridge, from the embedding — the
#: reference the benchmark compares with.
FROM_LOWEST_LAYER = True

#: Rows × positions of one stacked pass (:func:`after_prefix_many`): a pass over a few short rows is
#: bound by streaming the weights, so conditions share passes until this many.
STACK_ROWS = 128


def _stacked_hooks(condition_hooks: Sequence[list[Hook]]) -> list[Hook]:
    """One hook per site for ``len(condition_hooks)`` conditions stacked row-interleaved (row
    ``i · c + j`` is item ``i`` under condition ``j``): each condition's hook sees its own rows only,
    shaped as in an unstacked pass."""
    c = len(condition_hooks)
    sites: dict[str, list[tuple[int, Callable[..., Any]]]] = {}
    for j, fwd in enumerate(condition_hooks):
        for name, fn in fwd:
            sites.setdefault(name, []).append((j, fn))

    def make(parts):
        def hook(act, hook=None):  # bound per site: hook.name is the internal name
            act = act.clone()
            for j, fn in parts:
                out = fn(act[j::c], hook=hook)  # a view: a hook that edits in place and returns None works too
                if out is not None:
                    act[j::c] = out
            return act
        return hook
    return [(name, make(parts)) for name, parts in sites.items()]


@torch.no_grad()
def after_prefix_many(model: LoadedModel, tail: Int[Tensor, "batch tail"], condition_hooks: Sequence[list[Hook]],
                      kv, read: Callable[[int, Tensor], None], max_rows: int | None = None) -> None:
    """:func:`run_after_prefix` once per condition — ``read(j, logits [batch, tail, d_vocab])`` for
    condition ``j``, in order — but with conditions stacked along the batch, the prefix cache ``kv``
    repeated for them: up to ``max_rows`` (:data:`STACK_ROWS`) rows × tail positions a pass, since a
    pass over a few short rows costs about as much as over many. Each condition's hooks see only its
    own rows, shaped as in an unstacked pass (they must act on the tail's positions only). Where every
    hook acts on heads' outputs, each pass starts at its lowest hooked layer on the twin
    (:func:`arithlens.core.twin.tail_route`). Results agree with one pass per condition to float
    rounding; ``kv`` is given back unchanged."""
    B, T = tail.shape
    per_pass = max(1, (max_rows or STACK_ROWS) // (B * T))
    route = tail_route(model, tail, condition_hooks, kv) if FROM_LOWEST_LAYER else None
    for start in range(0, len(condition_hooks), per_pass):
        chunk = list(condition_hooks[start:start + per_pass])
        c = len(chunk)
        if route is not None:
            logits = route.logits(_stacked_hooks(chunk), c).view(B, c, T, -1)
            for j in range(c):
                read(start + j, logits[:, j])
            continue
        if c == 1:
            read(start, run_after_prefix(model, tail, chunk[0], kv))
            continue
        rep = None
        if kv is not None:
            rep = copy.deepcopy(kv)
            rep.batch_repeat_interleave(c)
        logits = run_after_prefix(model, tail.repeat_interleave(c, 0), _stacked_hooks(chunk), rep)
        logits = logits.view(B, c, T, -1)
        for j in range(c):
            read(start + j, logits[:, j])
        del rep, logits


@torch.no_grad()
def end_only_many(model: LoadedModel, tokens: Int[Tensor, "batch pos"], condition_hooks: Sequence[list[Hook]],
                  kv=None, read: Callable[[Tensor], Tensor] = lambda logits: logits,
                  max_rows: int | None = None) -> list[Tensor]:
    """``read(logits at END)`` under each condition's hooks (acting at END only), on the clean prefix's
    KV cache ``kv`` (made here when None): :func:`end_only_logits` once per condition, but with the
    conditions stacked along the batch (:func:`after_prefix_many`)."""
    if kv is None and tokens.shape[1] > 1:
        kv = prefix_kv(model, tokens[:, :-1])
    out: list[Tensor] = [None] * len(condition_hooks)  # type: ignore[list-item]

    def keep(j: int, logits: Tensor) -> None:
        out[j] = read(logits[:, -1].float())
    after_prefix_many(model, tokens[:, -1:], condition_hooks, kv, keep, max_rows)
    return out


@torch.no_grad()
def correct_at_end(model: LoadedModel, batches: Sequence[AnswerBatch], n_items: int,
                   conditions: Sequence[Callable[[np.ndarray], list[Hook]]], end_only: bool = True,
                   progress=None, desc: str = "conditions") -> np.ndarray:
    """Greedy correctness at END of every item under every condition: a ``conditions × n_items`` bool array.

    A condition maps a batch's item indices to the hooks it runs with. The loop is batch-major: with
    ``end_only`` (every hook acts at END only), a batch's clean prefix KV cache is made once, serves
    every condition (stacked along the batch, :func:`end_only_many`), and is dropped before the next
    batch, so memory holds one batch's cache, never the whole set's (on SmolLM2, 256 three-shot
    prompts' caches are ~0.35 GB). Without ``end_only`` each condition is a full hooked pass.
    ``progress`` (tqdm-like) counts batches.
    """
    out = np.zeros((len(conditions), n_items), dtype=bool)
    todo = progress(batches, desc=f"{desc} ({len(conditions)} per batch)") if progress else batches
    for b, tokens, answers in todo:
        fwds = [hooks_for(b) for hooks_for in conditions]
        if end_only:
            hits = end_only_many(model, tokens, fwds, read=lambda logits: logits.argmax(-1) == answers)
        else:
            hits = [logits_at_end(model, tokens, fwd).argmax(-1) == answers for fwd in fwds]
        for c, hit in enumerate(hits):
            out[c, b] = hit.cpu().numpy()
    return out

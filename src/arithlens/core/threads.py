"""The thread share: how many torch threads each chapter running side by side may use right now.

Publishing wing, under :mod:`arithlens.runner.schedule`. ``arithlens book --jobs N`` runs up to N notebook
kernels at once; on a small CPU each must use fewer threads than torch's default of one per core, or
they fight for the cores (chapter 3 took 1044 s instead of 255 s on a busy 2-core machine). But
the run graph is not always N wide: on one model, chapter 1 runs alone once chapter 0 is done, and
chapter 7 runs alone at the end. A fixed ``cores ÷ N`` would leave cores idle there.

So the scheduler writes one small file, the *share* — ``cores ÷ (kernels running)``, at least 1 —
whenever a run starts or ends, and names it in ``ARITHLENS_THREAD_SHARE`` for every kernel it starts
(:func:`write_share`). Each kernel's model follows it (:func:`follow_share`, installed by
:func:`arithlens.core.models.load_model`): before a forward pass, at most once a second, it reads the file
and calls ``torch.set_num_threads`` when the share changed. A kernel with no share named keeps the
threads it started with. Which threads a run had is recorded in its manifest
(``cpu.thread_share``); its tables never depend on it.

Written by hand: no library shares a thread budget between processes that come and go.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

#: The environment variable naming the share file.
ENV = "ARITHLENS_THREAD_SHARE"


def share_for(running: int, cores: int | None = None) -> int:
    """Threads for each of ``running`` kernels on ``cores`` cores (all of this machine's by default)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, running))


def write_share(path: Path, threads: int) -> None:
    """Publish ``threads`` (replacing the file in one step: a kernel never reads half a number)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{threads}\n")
    os.replace(tmp, path)


class _Follower:
    """A forward pre-hook that sets torch's thread count to the share (checked at most every
    ``interval`` seconds; an unreadable or missing file changes nothing)."""

    def __init__(self, path: Path, interval: float = 1.0):
        self.path, self.interval, self.checked = path, interval, float("-inf")

    def __call__(self, module, args) -> None:
        now = time.monotonic()
        if now - self.checked < self.interval:
            return
        self.checked = now
        try:
            threads = int(self.path.read_text())
        except (OSError, ValueError):
            return
        if threads >= 1 and threads != torch.get_num_threads():
            torch.set_num_threads(threads)


def follow_share(module: torch.nn.Module, path: str | Path | None = None, interval: float = 1.0):
    """Make ``module``'s forward passes follow the share named by ``path`` (default: ``$ARITHLENS_THREAD_SHARE``;
    none: nothing is installed). Returns the hook's handle, or None."""
    path = path or os.environ.get(ENV)
    if not path:
        return None
    return module.register_forward_pre_hook(_Follower(Path(path), interval))

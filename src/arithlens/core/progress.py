"""Progress bars — and the few lines a waiting user must read — in the terminal, not only in the notebook.

Inside a papermill-run kernel, ``sys.stderr`` is captured into the notebook (a tqdm bar there
becomes hundreds of lines in the book), and ipykernel also redirects the process's file descriptor 2
into the notebook. It keeps a duplicate of the original descriptor — the terminal of ``arithlens
run`` — as ``sys.stderr._original_stdstream_copy``; bars are written there. Outside a kernel they go
to stderr as usual. :func:`notice` sends one line the same way, for what a user at the terminal must
know before a long wait (a slow fallback and its estimate), while the notebook keeps its own copy.
tqdm does the work; written by hand: only picking the stream.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.std import tqdm

T = TypeVar("T")
_TERMINAL = None


def _terminal():
    """The stream the user sees: the kernel's saved original stderr, else stderr; None if neither."""
    global _TERMINAL
    if _TERMINAL is None:
        fd = getattr(sys.stderr, "_original_stdstream_copy", None)
        if fd is not None:
            _TERMINAL = os.fdopen(os.dup(fd), "w", buffering=1)
        elif "ipykernel" in sys.modules:
            return None  # a kernel that keeps no copy: stay silent rather than flood the notebook
        else:
            return sys.stderr
    return _TERMINAL


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar on the user's terminal (silent if ARITHLENS_QUIET is set)."""
    stream = _terminal()
    return tqdm(iterable, desc=desc, total=total, file=stream, leave=False, dynamic_ncols=True,
                disable=bool(os.environ.get("ARITHLENS_QUIET")) or stream is None)


def notice(line: str) -> None:
    """Print ``line`` (into the notebook when run in a kernel) and, from inside a kernel, also on the
    user's terminal — where ``arithlens run`` waits — unless ARITHLENS_QUIET is set. Outside a kernel
    the one print already reaches the terminal."""
    print(line, flush=True)
    if getattr(sys.stderr, "_original_stdstream_copy", None) is None or os.environ.get("ARITHLENS_QUIET"):
        return
    stream = _terminal()
    if stream is not None:
        print(line, file=stream, flush=True)

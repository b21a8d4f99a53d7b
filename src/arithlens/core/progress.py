"""Progress bars that show in the terminal, not in the executed notebook.

Inside a papermill-run kernel, ``sys.stderr`` is captured into the notebook (a tqdm bar there
becomes hundreds of lines in the book), and ipykernel also redirects the process's file descriptor 2
into the notebook. It keeps a duplicate of the original descriptor — the terminal of ``arithlens
run`` — as ``sys.stderr._original_stdstream_copy``; bars are written there. Outside a kernel they go
to stderr as usual. tqdm does the work; written by hand: only picking the stream.
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

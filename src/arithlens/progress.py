"""Progress bars that show in the terminal, not in the executed notebook.

Inside a papermill-run kernel, ``sys.stderr`` is captured into the notebook (a tqdm bar there
becomes hundreds of lines in the book), while ``sys.__stderr__`` is the kernel process's own stderr,
which it inherits from ``arithlens run`` — the user's terminal. So bars go there. tqdm does the work.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm as _tqdm_auto
from tqdm.std import tqdm as _tqdm_std

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar on the process's real stderr (silent if ARITHLENS_QUIET is set)."""
    stream = sys.__stderr__ or sys.stderr
    in_kernel = "ipykernel" in sys.modules
    bar = _tqdm_std if in_kernel else _tqdm_auto
    return bar(iterable, desc=desc, total=total, file=stream, leave=False, dynamic_ncols=True,
               disable=bool(os.environ.get("ARITHLENS_QUIET")) or stream is None)

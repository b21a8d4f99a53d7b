"""Where things live: the checkout, the run store, the model cache and the package's data files.

Ground floor (paper: none); imports nothing of arithlens. Every place the library reads a path from
the environment is here, so a reader finds them in one file:

* :func:`project_root` — the checkout holding ``notebooks/`` (``$ARITHLENS_ROOT``);
* :func:`runs_root` — the run store (``$ARITHLENS_RUNS``, default ``<checkout>/runs``);
* :func:`cache_dir` — assembled GGUF files and dequantized weights (``$ARITHLENS_CACHE``);
* :func:`data_file` — a data file shipped inside the package (``arithlens/data/``).

:func:`data_file` is the one door to package data: the run key (:mod:`arithlens.runner.chapters`)
finds each ``data_file("name")`` call in the modules a chapter reaches and hashes that file's bytes,
so editing shipped data re-executes exactly the chapters that read it.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The package's data folder (``src/arithlens/data``), shipped as package data.
DATA_DIR = Path(__file__).resolve().parent / "data"


class ProjectError(RuntimeError):
    """The checkout or a shipped file cannot be found; the message is one line."""


def project_root() -> Path:
    """The checkout holding ``notebooks/`` (arithlens is installed editable from it)."""
    root = Path(os.environ.get("ARITHLENS_ROOT", Path(__file__).resolve().parents[2]))
    if not (root / "notebooks").is_dir():
        raise ProjectError(f"no notebooks/ under {root}; install arithlens editable from its checkout or set ARITHLENS_ROOT")
    return root


def runs_root() -> Path:
    """Where runs are stored (``$ARITHLENS_RUNS``, default ``<checkout>/runs``)."""
    return Path(os.environ.get("ARITHLENS_RUNS", project_root() / "runs")).expanduser().resolve()


def cache_dir() -> Path:
    """Where assembled GGUF files and dequantized weights are cached (``$ARITHLENS_CACHE`` or ``~/.cache/arithlens``)."""
    return Path(os.environ.get("ARITHLENS_CACHE", Path.home() / ".cache" / "arithlens")).expanduser()


def data_file(name: str) -> Path:
    """A data file shipped in ``arithlens/data/``. Call it with the file's name as a literal
    (``data_file("controls.json")``): the run key reads that literal to hash the file."""
    path = DATA_DIR / name
    if not path.is_file():
        raise ProjectError(f"no data file {name!r} in {DATA_DIR}")
    return path

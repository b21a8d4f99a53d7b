"""Where things live — the checkout, the run store, the model cache, the package's data files — and
what a file holds (its sha256).

Ground floor (paper: none); imports nothing of arithlens. Every place the library reads a path from
the environment is here, so a reader finds them in one file:

* :func:`project_root` — the checkout holding ``notebooks/`` (``$ARITHLENS_ROOT``);
* :func:`runs_root` — the run store (``$ARITHLENS_RUNS``, default ``<checkout>/runs``);
* :func:`cache_dir` — assembled GGUF files and dequantized weights (``$ARITHLENS_CACHE``);
* :func:`data_file` — a data file shipped inside the package (``arithlens/data/``);
* :func:`file_sha256` — a file's sha256, the one file hash of the library (the registry's checks,
  the weight cache's names, the run key); :func:`stamped_sha256` computes it once per file version.

:func:`data_file` is the one door to package data: the run key (:mod:`arithlens.runner.chapters`)
finds each ``data_file("name")`` call in the modules a chapter reaches and hashes that file's bytes,
so editing shipped data re-executes exactly the chapters that read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import NamedTuple

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


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read in 4 MiB blocks: a gigabyte GGUF never sits in memory."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


#: Files at least this large get a stamp in the cache (model weights); smaller ones are hashed again
#: in each new process (milliseconds), so tests and benchmark files leave nothing in the cache.
STAMP_MIN_BYTES = 16 << 20
#: A digest is remembered only for a file last written this long before hashing began: a file system
#: stamps times in ticks (milliseconds, or 2 s on FAT), and a second write within the tick of the one
#: hashed would keep the same version (git's "racy clean" problem).
SETTLED_NS = 2_000_000_000


class FileVersion(NamedTuple):
    """What changes whenever a file's bytes may have: replacing it (device, inode), writing it (size,
    mtime), and copying over it with the old mtime kept (``cp -p``, ``rsync -t``: the ctime still moves)."""

    path: str
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


_KNOWN: dict[FileVersion, str] = {}
_KNOWN_LOCK = threading.Lock()


def _version(path: Path) -> FileVersion:
    st = path.stat()
    return FileVersion(str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stamped_sha256(path: Path) -> str:
    """:func:`file_sha256`, computed once per version of the file (:func:`_version`). The digest is
    kept in this process and, for a file of :data:`STAMP_MIN_BYTES` or more, in a stamp under
    ``<cache>/digests/`` that later processes reuse while the file's version is unchanged — the way
    the registry stamps an assembled GGUF, for any file (a ``--model my.gguf``, a model directory's
    weights). A file written just before (:data:`SETTLED_NS`) or while it is hashed is not remembered."""
    path = Path(path).expanduser().resolve()
    version = _version(path)
    with _KNOWN_LOCK:
        if version in _KNOWN:
            return _KNOWN[version]
    stamp = cache_dir() / "digests" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    big = version.size >= STAMP_MIN_BYTES
    if big and stamp.is_file():
        try:
            saved = json.loads(stamp.read_text())
            if saved["version"] == list(version):
                with _KNOWN_LOCK:
                    _KNOWN[version] = saved["sha256"]
                return saved["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a torn or foreign stamp: hash again
    started = time.time_ns()
    digest = file_sha256(path)
    if _version(path) != version or version.mtime_ns > started - SETTLED_NS:
        return digest  # right for the bytes read, but a later write could keep this version: not remembered
    with _KNOWN_LOCK:
        _KNOWN[version] = digest
    if big:
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            tmp = stamp.with_name(f"{stamp.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            tmp.write_text(json.dumps({"path": str(path), "version": list(version), "sha256": digest}))
            tmp.replace(stamp)
        except OSError:
            pass  # a read-only cache: the digest is still right, only not remembered across processes
    return digest

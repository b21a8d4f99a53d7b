"""Where progress bars and notices go: inside a notebook kernel, the user's terminal is the descriptor
ipykernel saved as ``sys.stderr._original_stdstream_copy``."""

import os
import sys

import pytest

from arithlens.core import progress


class _KernelStderr:
    """A stand-in for ipykernel's captured stderr: it keeps a copy of the terminal's descriptor."""

    def __init__(self, fd: int):
        self._original_stdstream_copy = fd

    def write(self, text):
        return len(text)

    def flush(self):
        pass


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """``enter()`` pretends to run inside a kernel whose terminal is a file (call it in the test body:
    pytest's capture swaps the streams again after fixtures are set up); yields (enter, that file)."""
    path = tmp_path / "terminal.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    monkeypatch.setattr(progress, "_TERMINAL", None)
    monkeypatch.delenv("ARITHLENS_QUIET", raising=False)
    yield (lambda: monkeypatch.setattr(sys, "stderr", _KernelStderr(fd))), path
    if progress._TERMINAL is not None:
        progress._TERMINAL.close()
    os.close(fd)


def test_notice_reaches_the_terminal_from_a_kernel(kernel, capsys):
    enter, terminal = kernel
    enter()
    progress.notice("no checked fast path for X: 8 hooked passes, ≈ 1.0 min")
    assert capsys.readouterr().out == "no checked fast path for X: 8 hooked passes, ≈ 1.0 min\n"  # the notebook's copy
    assert terminal.read_text() == "no checked fast path for X: 8 hooked passes, ≈ 1.0 min\n"


def test_quiet_keeps_the_terminal_clean_and_a_plain_script_prints_once(kernel, capsys, monkeypatch):
    enter, terminal = kernel
    enter()
    monkeypatch.setenv("ARITHLENS_QUIET", "1")
    progress.notice("quiet")
    assert capsys.readouterr().out == "quiet\n" and terminal.read_text() == ""
    monkeypatch.delenv("ARITHLENS_QUIET")
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)  # no kernel: stdout is the terminal already
    progress.notice("plain")
    assert capsys.readouterr().out == "plain\n" and terminal.read_text() == ""

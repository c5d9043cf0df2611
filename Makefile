# The two entry points of a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
WORKDIR ?= runs/toy
PYTEST_ARGS ?=

.PHONY: run test test-tpu lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch (tests only: parity with transformers) goes first and pinned, so that a machine whose pip
# sees a local CPU wheel of that version takes it instead of resolving a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
TEST_EXTRAS ?= test
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(TEST_EXTRAS)]"
	rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(BIN)/python -m apo_jax.main --config=configs/toy.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# The TPU compiler (the `tpu` extra: libtpu, ~0.7 GB, Linux x86-64) in a venv of its own, so that
# the main suite never starts libtpu: tests/test_tpu_compile.py lowers and compiles the programs
# for a TPU slice on this CPU (in the main venv those tests skip with the install line).
TPU_VENV := .venv-tpu
TPU_STAMP := $(TPU_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
$(TPU_STAMP):
	$(PY) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/pip install -q --upgrade pip
	$(TPU_VENV)/bin/pip install -q -e ".[tpu]" pytest
	rm -f $(TPU_VENV)/.installed-* && touch $@

test-tpu: $(TPU_STAMP)
	$(TPU_VENV)/bin/python -m pytest -p no:cacheprovider -m "not slow" tests/test_tpu_compile.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check apo_jax tests benchmarks configs experiments
	$(BIN)/ruff format --check apo_jax tests benchmarks configs experiments

clean:
	rm -rf $(VENV) $(TPU_VENV) runs

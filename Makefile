# The two entry points of a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
WORKDIR ?= runs/toy
PYTEST_ARGS ?=

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch (tests only: parity with transformers) goes first and pinned, so that a machine whose pip
# sees a local CPU wheel of that version takes it instead of resolving a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The `tpu` extra (libtpu, ~0.7 GB installed) where its wheels exist, Linux x86-64: then
# tests/test_tpu_compile.py compiles the programs for a TPU slice; elsewhere those tests skip.
# `make test TEST_EXTRAS=test` leaves it out.
ifeq ($(shell uname -sm),Linux x86_64)
TEST_EXTRAS ?= test,tpu
else
TEST_EXTRAS ?= test
endif
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(TEST_EXTRAS)]"
	rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(BIN)/python -m apo_jax.main --config=configs/toy.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check apo_jax tests benchmarks configs experiments
	$(BIN)/ruff format --check apo_jax tests benchmarks configs experiments

clean:
	rm -rf $(VENV) runs

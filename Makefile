# `make run` and `make test` each set up .venv on first use.
# On a machine without an NVIDIA driver the CPU build of torch is installed first
# (TORCH_CPU_SPEC), so pip never pulls the multi-GB CUDA build; with nvidia-smi present
# the normal (CUDA) torch from the index is used. Override either variable if needed.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH_CPU_SPEC ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)

.PHONY: run test test-fast clean-venv

$(BIN)/sftui: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifneq ($(HAS_GPU),yes)
	$(BIN)/python -m pip install -q "$(TORCH_CPU_SPEC)"
endif
	$(BIN)/python -m pip install -q -e ".[test,parquet]"
	touch $(BIN)/sftui

run: $(BIN)/sftui
	$(BIN)/sftui run

test: $(BIN)/sftui
	$(BIN)/python -m pytest -q

# The unit tests only (no real runs): a couple of minutes, for the edit-test loop.
test-fast: $(BIN)/sftui
	$(BIN)/python -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)

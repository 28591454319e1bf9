# proteoflow: `make demo` and `make test` are the two commands a newcomer needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU-only machines take the local CPU wheel; GPU machines keep whatever CUDA torch pip resolves.
TORCH_PIN ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
STORE  ?= demo-store

.PHONY: install demo test test-all lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]" "$(TORCH_PIN)"
	touch $@

demo: install
	$(BIN)/python -m flows.demo --store $(STORE)

test: install
	$(BIN)/python -m pytest -q

test-all: install   # also the tests marked slow
	$(BIN)/python -m pytest -q -m ""

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check esm_core storage flows tests bench

clean:
	rm -rf $(STORE) .pytest_cache .ruff_cache

# The two commands a newcomer needs are `make demo` and `make test`.
# Both build (or refresh) a local virtual environment from pyproject.toml first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# sslyze (TLS audit in the tests) pins an older cryptography than ours: its own venv.
SSLYZE_VENV  := .venv-sslyze
SSLYZE_STAMP := $(SSLYZE_VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "securefl needs Python 3.11 or newer")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

$(SSLYZE_STAMP):
	@test -x $(SSLYZE_VENV)/bin/python || $(PYTHON) -m venv $(SSLYZE_VENV)
	$(SSLYZE_VENV)/bin/python -m pip install --quiet 'sslyze==6.3.1'
	@touch $(SSLYZE_STAMP)

demo: $(STAMP)
	$(BIN)/securefl demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Two workers by default (the two cores the suite is sized for); TEST_WORKERS=0 runs it in
# one process, TEST_WORKERS=auto on every core (each worker starts TensorFlow processes).
TEST_WORKERS ?= 2

test: $(STAMP) $(SSLYZE_STAMP) lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

bench: $(STAMP)
	$(BIN)/python bench/secagg_bench.py

clean:
	rm -rf $(VENV) $(SSLYZE_VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache

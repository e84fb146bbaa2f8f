# make train: the CPU quickstart (offline digits, a few minutes); make test: the fast tests
# (-m "not slow"); make test-all: every test, slow ones included (what .ci/run runs).
# All create .venv with plain pip on first use; a stamp file skips the install afterwards
# until pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: train test test-all lint install clean

train: $(STAMP)
	$(BIN)/python cli.py fit --config configs/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev,export]'
	touch $@

clean:
	rm -rf runs lightning_logs .pytest_cache

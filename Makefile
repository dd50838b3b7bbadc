# Two entry points: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-fast lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# make demo          real models (SAM vit_b, CLIP ViT-B-32, Qwen2.5-0.5B); fetched once into the cache
# make demo SMOKE=1  tiny random "smoke" models, offline, CPU, ~1 minute
demo: venv
	$(BIN)/ssam-pipeline run configs/pipeline/$(if $(SMOKE),smoke,sample).yaml $(ARGS)

# make test       lint, then every test (what CI runs), with the 25 slowest listed
# make test-fast  the tests not marked slow or cluster: about 3 minutes, while working
test: lint
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow and not cluster" $(PYTEST_ARGS)

LINT_PATHS := ssam stages pipeline model tests benchmarks docs sample

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

bench: venv
	$(BIN)/python benchmarks/bench_pipeline.py
	$(BIN)/python benchmarks/bench_model.py

clean:
	rm -rf runs .pytest_cache

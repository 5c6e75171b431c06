# Everything a fresh clone needs: `make test` and `make demo` create .venv and install on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-all demo lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: a bare `pip install torch` would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[dev,export,sweeps,serve]"
	touch $(STAMP)

install: $(STAMP)

# The CI tier: unit + stage tests and the learning tests that fit in CI's time budget.
test: $(STAMP)
	WANDB_MODE=offline $(BIN)/pytest -q -m "not slow" --durations=15

# Every tier, including the long learning tests.
test-all: $(STAMP)
	WANDB_MODE=offline $(BIN)/pytest -q --durations=25

# The main job on the built-in data: all four stages with the tiny model on CPU, then the report
# (outputs/pipeline/report.md). Running it again skips finished stages.
demo: $(STAMP)
	WANDB_MODE=offline $(BIN)/stagelm-pipeline

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: $(STAMP)
	$(BIN)/ruff format src tests scripts
	$(BIN)/ruff check --fix src tests scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

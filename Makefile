# Entry points. `make setup` is idempotent; every other target runs it first.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test lint format demo clean-runs

setup:
	@bash tools/setup_env.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

test: setup lint
	$(PY) -m pytest -q tests

# The main job on CPU: tiny model + synthetic data + (from the trainer issue on) SFT warm start and a VPPO run.
demo: setup
	$(PY) -m vppo_megatron.cli demo --out runs/demo

clean-runs:
	rm -rf runs

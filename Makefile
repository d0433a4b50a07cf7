# Entry points. `make setup` is idempotent; every other target runs it first.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test lint format demo clean-runs miniatures

setup:
	@bash tools/setup_env.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

# Two workers, one test file each at a time (module fixtures such as the vLLM engine stay in one process);
# tests/conftest.py orders the files heaviest first and --no-loadscope-reorder keeps that order (xdist would sort
# them by test count). `pytest tests` alone runs the same tests in one process.
test: setup lint
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

# Every shipped recipe run end to end in miniature (`vppo miniature`), tiny models cached in runs/miniature:
# 20-30 minutes on 2 cores, so not part of `make test`.
miniatures: setup
	VPPO_MINIATURES=1 VPPO_MINIATURE_OUT=runs/miniature $(PY) -m pytest -q tests/test_miniature.py

# The main job on CPU: tiny model + synthetic data, SFT warm start and a VPPO run. FAMILY=qwen3_vl runs the same
# on the tiny Qwen3-VL (in runs/demo-qwen3_vl).
FAMILY ?= qwen2_5_vl
demo: setup
	$(PY) -m vppo_megatron.cli demo --family $(FAMILY) --out runs/$(if $(filter qwen2_5_vl,$(FAMILY)),demo,demo-$(FAMILY))

clean-runs:
	rm -rf runs

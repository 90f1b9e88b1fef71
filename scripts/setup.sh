#!/usr/bin/env bash
# Creates .venv (if missing) and installs lightning_sharing with its dev extras.
# The CPU torch wheel is installed first so that no CUDA packages are pulled on CPU-only machines;
# set LIGHTNING_SHARING_TORCH="torch==2.13.0" (or another spec) to choose a different build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then

    .venv/bin/python -m pip install -q "${LIGHTNING_SHARING_TORCH:-torch==2.13.0}"




fi
.venv/bin/python -m pip install -q -e ".[dev]"

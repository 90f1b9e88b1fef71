#!/usr/bin/env bash
# Sets up .venv (see setup.sh), lints, and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check lightning_sharing tests examples
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q "$@"

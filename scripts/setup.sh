#!/usr/bin/env bash
# Creates .venv (if missing) and installs lightning_sharing with its dev extras, saying what it does as it goes.
# torch==2.13.0 is installed first, on its own: on a CPU machine set up as ours this resolves to the
# local CPU wheel, whereas letting pip resolve a bare "torch" requirement pulls GBs of CUDA packages.
# Override with LIGHTNING_SHARING_TORCH (e.g. "torch==2.13.0" from a CUDA index on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
started=$SECONDS
say() { echo "setup: $*"; }
if [ ! -x .venv/bin/python ]; then
  say "creating the virtual environment .venv ($("$PY" --version 2>&1))"
  "$PY" -m venv .venv
fi
# pip's exit status is kept; only the noise about this machine's empty local index folders is dropped.
pip_install() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  say "installing ${LIGHTNING_SHARING_TORCH:-torch==2.13.0} (the CPU build here; the largest download, a minute or more)"
  pip_install "${LIGHTNING_SHARING_TORCH:-torch==2.13.0}"
fi
say "installing lightning_sharing (editable) with lightning, torchmetrics and the dev tools (pip)"
pip_install -e ".[dev]"
say "checking the imports"
.venv/bin/python -c "import torch, lightning, lightning_sharing" \
  || { echo "setup failed: see pip output above" >&2; exit 1; }
say "ready in $((SECONDS - started))s: run things with .venv/bin/python"

#!/usr/bin/env bash
# The GPU checks in one command, on a machine with one GPU (or more): sets up, shows the GPU, runs tests/gpu and
# the save/load benchmark against torch DCP on the device (benchmarks/gpu_vs_dcp.py), and prints a summary.
# Exits non-zero when there is no usable CUDA device (it never passes by skipping everything), when a test fails
# or is skipped for any reason but "needs 2 CUDA devices", or when the benchmark fails. About 2-4 minutes once
# set up (the first setup downloads torch unless one is reused, see below).
#
# Which Python and torch:
#   - PYTHON=/path/to/python: use that interpreter as it is (no .venv), e.g. one with a CUDA torch installed
#     system-wide or in a conda env; lightning_sharing is imported from this checkout, and its dependencies and
#     pytest are pip-installed into it only if missing (its torch is left alone).
#   - otherwise .venv (scripts/setup.sh). When there is no .venv yet and python3 already has a CUDA build of torch,
#     .venv is created with --system-site-packages so that torch is reused instead of downloaded. Else setup.sh
#     installs ${LIGHTNING_SHARING_TORCH:-torch==2.13.0}: PyPI's Linux x86_64 wheel is a CUDA build, but if your
#     pip is configured for CPU wheels, give a CUDA one (e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128).
#     A .venv holding a CPU-only torch is refused with what to do (remove it, or set PYTHON).
# Options (environment): GPU_CHECK_OUT=DIR keeps pytest's log and JUnit XML and the benchmark's JSON there;
# GPU_CHECK_BENCH_GB (0.75) and GPU_CHECK_ROUNDS (3) size the benchmark; GPU_CHECK_BENCH=0 skips it.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
say() { echo "gpu_check: $*"; }
fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }
OUT_DIR=${GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$OUT_DIR"
limit() { if command -v timeout >/dev/null 2>&1; then timeout --kill-after=10 "$@"; else shift; "$@"; fi; }

# ------------------------------------------------------------------ 1. the interpreter
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
  "$PY" -c "import torch" 2>/dev/null || fail "PYTHON=$PY cannot import torch; install a CUDA build of torch into it"
  # The package is imported from this checkout; only its dependencies and pytest must be installed.
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  probe="import torch, pytest, numpy, xxhash, fsspec, safetensors; import lightning_sharing.engine.coordinator"
  if ! "$PY" -c "$probe" 2>/dev/null; then
    say "installing lightning_sharing's dependencies and pytest into $PY (its torch is kept)"
    "$PY" -m pip install -q -e . pytest || say "pip failed (offline?)"
    "$PY" -c "$probe" || fail "PYTHON=$PY lacks what the checks import (above); install lightning_sharing's \
dependencies and pytest into it (pip install -e . pytest), or run without PYTHON to use .venv"
  fi
else
  if [ ! -x .venv/bin/python ] && python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
      2>/dev/null; then
    say "python3 has a CUDA build of torch ($(python3 -c 'import torch; print(torch.__version__)')): creating .venv" \
        "with --system-site-packages to reuse it"
    python3 -m venv --system-site-packages .venv || fail "could not create .venv"
  fi
  if ! bash scripts/setup.sh; then
    fail "scripts/setup.sh failed (see above). Without network access, point PYTHON at an interpreter that has a CUDA \
torch and lightning_sharing's dependencies: PYTHON=/path/to/python bash scripts/gpu_check.sh"
  fi
  PY=.venv/bin/python
fi

# ------------------------------------------------------------------ 2. the GPU
say "the GPU:"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -L 2>&1 | sed 's/^/  nvidia-smi: /'
else
  echo "  nvidia-smi: not found"
fi
GPU_CHECK_PYTHON_GIVEN=${PYTHON:+1} "$PY" - <<'EOF'
import os
import sys

import torch
import torch.distributed

cuda = torch.version.cuda
print(f"  torch {torch.__version__} ({torch.__file__.rsplit('/', 2)[0]}), built with CUDA {cuda or 'none'}, "
      f"cuDNN {torch.backends.cudnn.version() if cuda else 'none'}")
if not torch.cuda.is_available():
    if not cuda:
        hint = ("this torch is a CPU-only build. Point PYTHON at an interpreter with a CUDA build of torch"
                if os.environ.get("GPU_CHECK_PYTHON_GIVEN") else
                "this torch (in .venv) is a CPU-only build. Remove .venv and rerun with a CUDA build: "
                "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128 (or another CUDA index) or "
                "LIGHTNING_SHARING_TORCH=<a CUDA torch requirement>, or set PYTHON=/path/to/a/python/with/CUDA/torch")
    else:
        hint = ("torch is a CUDA build but sees no device: check the driver (nvidia-smi), CUDA_VISIBLE_DEVICES "
                f"(= {os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}) and that the driver supports "
                f"CUDA {cuda}")
    print(f"gpu_check: FAILED: no CUDA device (torch.cuda.is_available() is False): {hint}", file=sys.stderr)
    sys.exit(1)
for index in range(torch.cuda.device_count()):
    props = torch.cuda.get_device_properties(index)
    print(f"  cuda:{index}: {props.name}, compute capability {props.major}.{props.minor}, "
          f"{props.total_memory / 2**30:.1f} GiB")
try:
    version = torch.cuda.nccl.version()
    nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
except Exception as exc:  # reported, not fatal here: the NCCL tests say what fails
    nccl = f"unknown ({type(exc).__name__}: {exc})"
if not torch.distributed.is_nccl_available():
    nccl = "not available in this torch"
print(f"  {torch.cuda.device_count()} device(s), NCCL {nccl}")
EOF
[ $? -eq 0 ] || exit 1

# ------------------------------------------------------------------ 3. the tests
say "running pytest tests/gpu (log: $OUT_DIR/pytest.log)"
rm -f "$OUT_DIR/pytest.xml" "$OUT_DIR/bench.json"  # a report left by an earlier run must not count for this one
OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} limit 420 "$PY" -m pytest tests/gpu -v -rs --durations=5 \
  -p no:cacheprovider --junitxml="$OUT_DIR/pytest.xml" 2>&1 | tee "$OUT_DIR/pytest.log"
pytest_status=${PIPESTATUS[0]}
[ "$pytest_status" -eq 124 ] || [ "$pytest_status" -eq 137 ] && say "pytest was stopped after 420 s (a hang?)"

# ------------------------------------------------------------------ 4. the benchmark
bench_status=0
if [ "${GPU_CHECK_BENCH:-1}" != "0" ]; then
  say "benchmark: lightning_sharing against torch DCP on the device (figures, not assertions)"
  limit 300 "$PY" benchmarks/gpu_vs_dcp.py --size-gb "${GPU_CHECK_BENCH_GB:-0.75}" \
    --rounds "${GPU_CHECK_ROUNDS:-3}" --json "$OUT_DIR/bench.json" 2>&1 | tee "$OUT_DIR/bench.log"
  bench_status=${PIPESTATUS[0]}
fi

# ------------------------------------------------------------------ 5. the summary
say "logs and reports: $OUT_DIR"
"$PY" - "$OUT_DIR/pytest.xml" "$pytest_status" "$bench_status" "$((SECONDS - started))" <<'EOF'
import sys
import xml.etree.ElementTree as ET

path, pytest_status, bench_status, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
counts = {"passed": 0, "failed": 0, "skipped": 0}
expected_skips, unexpected = [], []
try:
    cases = list(ET.parse(path).getroot().iter("testcase"))
except (OSError, ET.ParseError) as exc:
    cases = []
    unexpected.append(f"no test report ({exc})")
for case in cases:
    name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
    if case.find("failure") is not None or case.find("error") is not None:
        counts["failed"] += 1
        unexpected.append(f"failed: {name}")
    elif (skip := case.find("skipped")) is not None:
        counts["skipped"] += 1
        reason = skip.get("message", "")
        (expected_skips if "needs 2 CUDA devices" in reason else unexpected).append(f"skipped: {name}: {reason}")
    else:
        counts["passed"] += 1
if not counts["passed"]:
    unexpected.append("no test passed")
if pytest_status not in (0, 1) and not unexpected:
    unexpected.append(f"pytest exited with status {pytest_status}")
if bench_status:
    unexpected.append(f"the benchmark exited with status {bench_status}")
print(f"\ngpu_check summary ({seconds} s): {counts['passed']} passed, {counts['failed']} failed, "
      f"{counts['skipped']} skipped")
for line in expected_skips:
    print(f"  expected: {line}")
for line in unexpected:
    print(f"  PROBLEM: {line}")
print("gpu_check: PASSED" if not unexpected else "gpu_check: FAILED")
sys.exit(1 if unexpected else 0)
EOF

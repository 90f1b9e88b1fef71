#!/usr/bin/env bash
# The main demo: a real 2-process training run checkpoints, is interrupted, resumes, and is checked
# bit-for-bit against an uninterrupted run of the same length.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${DEMO_OUT:-demo_output}
rm -rf "$OUT"
export OMP_NUM_THREADS=1
run() { .venv/bin/torchrun --nproc_per_node=2 --master_port="$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')" examples/torchrun_core.py --steps 12 --save-every 3 "$@"; }

echo "== 1/3 uninterrupted reference run: 12 steps on 2 processes"
run --out "$OUT/reference" | tee "$OUT.reference.log"
echo "== 2/3 the same run, interrupted after step 7 (newest checkpoint: step 6)"
run --out "$OUT/interrupted" --stop-after 7
echo "== 3/3 resume from the newest complete checkpoint"
run --out "$OUT/interrupted" --resume | tee "$OUT.resumed.log"

ref=$(grep '^FINAL ' "$OUT.reference.log" | tail -1)
res=$(grep '^FINAL ' "$OUT.resumed.log" | tail -1)
rm -f "$OUT.reference.log" "$OUT.resumed.log"
.venv/bin/python - "$OUT" <<'PY'
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file
out = Path(sys.argv[1])
for rank in (0, 1):
    a = load_file(out / "reference" / f"final-rank{rank}.safetensors")
    b = load_file(out / "interrupted" / f"final-rank{rank}.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"rank {rank} weights differ"
print("final weights of both ranks are torch.equal between the two runs")
PY
if [ "$ref" = "$res" ]; then
  echo "RESUME OK: the interrupted-and-resumed run matches the uninterrupted one bit for bit (${ref#FINAL })"
else
  echo "RESUME MISMATCH: reference '$ref' vs resumed '$res'" >&2
  exit 1
fi

"""A checkpoint directory given as an http(s) URL loads (the core, discovery, verify, a Trainer, load_from_checkpoint),
saving there is refused, and no fsspec event-loop thread is left running (tests/scripts/http_checkpoints.py)."""

from __future__ import annotations

import json
from pathlib import Path

from support.launch import ROOT, run

SCRIPT = ROOT / "tests" / "scripts" / "http_checkpoints.py"


def test_checkpoints_read_over_http(tmp_path: Path) -> None:
    output = run([str(SCRIPT), str(tmp_path / "served")], tmp_path / "http.log", timeout=180)
    result = json.loads(output.strip().splitlines()[-1])
    base = result["latest"].rsplit("/core/", 1)[0]
    assert result["core_loaded"] == ["model"] and result["core_equal"] is True
    assert result["latest"] == f"{base}/core/step=3.ckpt" and result["step"] == 3
    assert result["verify"] == 0
    assert result["save"].startswith(f"DistributedCheckpointError: preparing to write {base}/core/step=4.ckpt failed")
    assert "is read-only here (checkpoints are read over http(s), not saved)" in result["save"]
    assert (result["resumed_at_step"], result["resumed_to_step"]) == (2, 4)  # resumed from the URL's step 2
    assert result["load_from_checkpoint_equal"] is True
    assert not [name for name in result["threads"] if "fsspec" in name.lower()], result["threads"]

"""Migrating in: SharingStrategy resumes from an ordinary single-file .ckpt written by Lightning's own "ddp".

Runs tests/scripts/lightning_migrate.py (2 processes) and checks what was restored at ``on_train_start``, the one
log line naming the per-rank state such a file cannot have, and that the file is read ``weights_only`` by default.
"""

from __future__ import annotations

import json
from pathlib import Path

from support.launch import ROOT, run

SCRIPT = str(ROOT / "tests" / "scripts" / "lightning_migrate.py")


def test_resume_from_a_single_file_checkpoint(tmp_path: Path) -> None:
    output = run([SCRIPT, "--out", str(tmp_path)], tmp_path / "job.log", timeout=240)
    results = [json.loads((tmp_path / f"result-rank{r}.json").read_text()) for r in (0, 1)]
    for result in results:
        assert result["restored_step"] == 3 and result["final_step"] == 6
        assert result["optimizer_equal"] and result["scheduler_equal"] and result["weights_equal"]
        assert result["callback_restored"] == 3  # a stateful callback's own state came back
        assert result["directories"] == ["step=6.ckpt"]  # what the resumed run writes is ours
        # weights_only by default: the unsafe file is refused on every rank, nothing in it is unpickled ...
        refused = result["unsafe_default"]
        assert refused.startswith("DistributedCheckpointError: reading the single-file checkpoint ")
        assert "UnpicklingError: Weights only load failed" in refused and "Unsafe" in refused
        # ... and fit(weights_only=False) reads a file the user trusts.
        assert result["trusted_step"] == 3
    line = (f"{tmp_path / 'files' / 'step=3.ckpt'} is a single-file Lightning checkpoint: resuming with its model, "
            "optimizer, scheduler, loop and callback state; it holds no per-rank state, so each rank's RNG starts "
            "from this run's seed (rng); every rank gets rank 0's dataloader position (dataloader); your components "
            "['counter'] keep their current values")
    assert output.count(line) == 1  # one line, from rank 0
    assert output.count("is a single-file Lightning checkpoint") == 2  # this file and the trusted unsafe one
    assert (tmp_path / "directories" / "step=6.ckpt" / "checkpoint_manifest.json").is_file()

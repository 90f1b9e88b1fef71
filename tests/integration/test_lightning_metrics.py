"""Metric state inside the module: saved per rank without a declaration, restored per rank, resume bit-exact.

Runs tests/scripts/lightning_metrics.py: an uninterrupted 2-process fit, a fit SIGKILLed after its step-4
checkpoint, and new processes resuming from it. Before, the default REPLICATED model check refused the save
(``ReplicationMismatchError ... at 'ppl.mean_value'``), and a plain metric declared as a PER_RANK
StateComponent saved its empty ``state_dict()`` and came back wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from support.launch import ROOT, run

from lightning_sharing import CheckpointManifest

SCRIPT = str(ROOT / "tests" / "scripts" / "lightning_metrics.py")


def test_metrics_in_the_module_resume_bit_exact(tmp_path: Path) -> None:
    run([SCRIPT, "first", "--out", str(tmp_path)], tmp_path / "first.log", expect=-9, timeout=240)
    checkpoint = tmp_path / "checkpoints" / "epoch=0-step=4.ckpt"
    manifest = CheckpointManifest.load(checkpoint)
    components = manifest.components
    assert components["model"].sharing_pattern == "replicated" and components["model"].validation == "quick"
    assert components["model_metrics"].sharing_pattern == "per_rank"
    assert components["acc_metric"].sharing_pattern == "per_rank"
    for key in ("model_metrics", "acc_metric"):
        assert sorted({f.rank for f in components[key].files}) == [0, 1], key
    # Each rank saved its own accumulators, and they differ.
    per_rank = [load_file(checkpoint / f"acc_metric/rank-0000{r}-00001-of-00001.safetensors") for r in (0, 1)]
    assert not torch.equal(per_rank[0]["states.sum_value"], per_rank[1]["states.sum_value"])
    own = [load_file(checkpoint / f"model_metrics/rank-0000{r}-00001-of-00001.safetensors") for r in (0, 1)]
    assert not torch.equal(own[0]["states.ppl.mean_value"], own[1]["states.ppl.mean_value"])

    output = run([SCRIPT, "resume", "--out", str(tmp_path)], tmp_path / "resume.log", timeout=240)
    assert "Restored all states from the checkpoint" in output
    for rank in (0, 1):
        expected = load_file(tmp_path / f"reference-rank{rank}.safetensors")
        actual = load_file(tmp_path / f"resumed-rank{rank}.safetensors")
        assert expected.keys() == actual.keys() and "model.ppl.mean_value" in expected
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"rank {rank}: {key} differs after the resume"
        counts = json.loads((tmp_path / f"resumed-rank{rank}.json").read_text())
        assert counts == json.loads((tmp_path / f"reference-rank{rank}.json").read_text())
        assert counts == {"ppl": 8, "acc": 8, "global_step": 8}
    assert "ReplicationMismatchError" not in output and "nothing of it is saved" not in output

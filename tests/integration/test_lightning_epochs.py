"""Exact resume from checkpoints taken at epoch boundaries (2 processes, tests/scripts/lightning_epochs.py).

For each configuration (every_n_epochs, or every_n_train_steps landing on an epoch's last batch; torchdata's
StatefulDataLoader(shuffle=True) or a plain DataLoader with a DistributedSampler; 0 or 2 workers) the resumed run
must see, step by step, the same epoch number and the same samples on every rank as the uninterrupted run,
including the next epoch's shuffle, and end with the same weights and optimizer state (torch.equal). Before,
a checkpoint on an epoch's last batch resumed into the epoch after the next one (a whole epoch's order skipped).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.launch import ROOT, run

SCRIPT = ROOT / "tests" / "scripts" / "lightning_epochs.py"
CONFIGS = ["epochs-stateful", "last-batch-stateful", "last-batch-stateful-2-workers", "epochs-plain-2-workers",
           "last-batch-plain"]
PER_EPOCH, EPOCHS = 4, 3


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("epochs")
    run([str(SCRIPT), "--out", str(out)], out / "job.log", timeout=300)
    return out


@pytest.mark.parametrize("config", CONFIGS)
def test_resume_at_an_epoch_boundary_is_exact(job: Path, config: str) -> None:
    out = job / config
    assert (out / "checkpoints" / f"step={PER_EPOCH}.ckpt" / "checkpoint_manifest.json").is_file()
    for rank in (0, 1):
        reference = json.loads((out / f"reference-rank{rank}.json").read_text())
        resumed = json.loads((out / f"resumed-rank{rank}.json").read_text())
        assert reference["global_step"] == resumed["global_step"] == PER_EPOCH * EPOCHS
        # Step by step: the resumed run starts at the next epoch's first batch and sees what the reference saw.
        assert resumed["seen"] == reference["seen"][PER_EPOCH:]
        assert resumed["seen"][0]["epoch"] == 1
        expected = load_file(out / f"reference-rank{rank}.safetensors")
        actual = load_file(out / f"resumed-rank{rank}.safetensors")
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"rank {rank}: {key} differs after the resume"

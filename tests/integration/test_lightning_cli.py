"""LightningCLI: strategy given as the registered name "sharing" and as a class_path with init_args (2 processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.launch import ROOT, run

from lightning_sharing import CheckpointManifest

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures] (in the dev extra)")

SCRIPT = ROOT / "tests" / "scripts" / "lightning_cli.py"
TRAINER = """
trainer:
  accelerator: cpu
  devices: 2
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {out}
  max_steps: {steps}
  strategy: {strategy}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: {out}/checkpoints
        every_n_train_steps: 2
        save_last: true
"""
CLASS_PATH = """
    class_path: lightning_sharing.SharingStrategy
    init_args:
      validation_level: tensor
      max_shard_size: 1000000"""


def _fit(out: Path, name: str, strategy: str, steps: int, *extra: str) -> dict:
    config = out / f"{name}.yaml"
    config.write_text(TRAINER.format(out=out, steps=steps, strategy=strategy))
    run([str(SCRIPT), "fit", "--config", str(config), *extra], out / f"{name}.log", timeout=180,
        extra_env={"CLI_TEST_OUT": str(out)})
    finished = [json.loads((out / f"finished-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert finished[0] == finished[1]
    return finished[0]


def test_strategy_by_name_then_class_path_resuming(tmp_path: Path) -> None:
    first = _fit(tmp_path, "by-name", "sharing", 4)
    assert first == {"global_step": 4, "strategy": "SharingStrategy"}
    saved = CheckpointManifest.load(tmp_path / "checkpoints" / "last.ckpt")
    assert saved.step == 4 and saved.components["model"].validation == "quick"  # the strategy's default
    # The class_path form, with init_args, resuming the first run's last checkpoint.
    second = _fit(tmp_path, "class-path", CLASS_PATH, 6, "--ckpt_path", "last")
    assert second == {"global_step": 6, "strategy": "SharingStrategy"}
    resumed = CheckpointManifest.load(tmp_path / "checkpoints" / "last.ckpt")
    assert resumed.step == 6 and resumed.components["model"].validation == "tensor"

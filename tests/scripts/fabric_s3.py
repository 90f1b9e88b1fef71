"""Fabric DDP (2 CPU processes, Fabric's own launcher) saving to and loading from S3, configured by storage_options.

    python tests/scripts/fabric_s3.py --url s3://bucket/p/fabric --endpoint http://127.0.0.1:PORT --out DIR

The endpoint and credentials reach fsspec only as ``FabricSharingStrategy(storage_options=...)`` (the test removes
them from the environment). Each rank trains a small model two steps, ``fabric.save``s ``step=1.ckpt``, trains
two more, saves ``step=2.ckpt``; then ``find_latest_checkpoint(url, storage_options=...)`` picks the newest, a
fresh model and optimizer ``fabric.load`` it, and ``fabric.load(step=1.ckpt, None)`` returns what that one holds.
Each rank writes ``OUT/report-rank{r}.json``: whether every loaded tensor is ``torch.equal`` to the saved one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning_s3 import AWS_SETTINGS, storage_options

from lightning_sharing import SharingPattern, StateComponent, find_latest_checkpoint
from lightning_sharing.fabric.strategy import FabricSharingStrategy


class Holder:
    """A stateful holding a state dict as it is."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state = dict(state or {})

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state)


def _train(fabric: Fabric, model: Any, optimizer: Any, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()


def _snapshot(model: Any, optimizer: Any) -> dict[str, Any]:
    return {"model": {k: v.clone() for k, v in model.module.state_dict().items()},
            "optimizer": {i: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
                          for i, s in optimizer.optimizer.state_dict()["state"].items()}}


def _differences(expected: dict[str, Any], model_state: dict[str, Any], optimizer_state: dict[Any, Any]) -> list[str]:
    wrong = [f"model.{k}" for k, v in expected["model"].items() if not torch.equal(v, model_state[k])]
    for i, tensors in expected["optimizer"].items():
        wrong += [f"optimizer.{i}.{k}" for k, v in tensors.items() if not torch.equal(v, optimizer_state[i][k])]
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    options = storage_options(args.endpoint)
    fabric = Fabric(accelerator="cpu", devices=2, strategy=FabricSharingStrategy(storage_options=options))
    fabric.launch()
    rank = fabric.global_rank
    torch.manual_seed(100 + rank)

    def setup() -> tuple[Any, Any]:
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        return fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2))

    model, optimizer = setup()
    tag = Holder({"rank": rank, "draw": torch.rand(3)})
    saved = {}
    for step in (1, 2):
        _train(fabric, model, optimizer, 2)
        fabric.save(f"{args.url}/step={step}.ckpt", {"model": model, "optimizer": optimizer, "step": step,
                                                     "tag": StateComponent("tag", tag, SharingPattern.PER_RANK)})
        saved[step] = _snapshot(model, optimizer)
    latest = find_latest_checkpoint(args.url, storage_options=options)

    fresh_model, fresh_optimizer = setup()
    fresh_tag = Holder()
    state = {"model": fresh_model, "optimizer": fresh_optimizer, "step": 0,
             "tag": StateComponent("tag", fresh_tag, SharingPattern.PER_RANK)}
    fabric.load(latest, state)
    everything = fabric.load(f"{args.url}/step=1.ckpt", None)
    report = {
        "latest": latest,
        "aws_environment": sorted(name for name in os.environ if name in AWS_SETTINGS),
        "loaded_step": state["step"],
        "latest_differs": _differences(saved[2], fresh_model.module.state_dict(),
                                       fresh_optimizer.optimizer.state_dict()["state"]),
        "tag_equal": fresh_tag.state["rank"] == rank and torch.equal(fresh_tag.state["draw"], tag.state["draw"]),
        "step1_keys": sorted(everything),
        "step1_differs": _differences(saved[1], everything["model"], everything["optimizer"]["state"]),
        # Not the same state (the comparisons above could not pass by accident): step 2's differs from step 1's.
        "step1_vs_step2": _differences(saved[2], everything["model"], everything["optimizer"]["state"]),
    }
    (args.out / f"report-rank{rank}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

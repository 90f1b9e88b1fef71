"""Metric state inside a LightningModule under SharingStrategy (2 processes), for test_lightning_metrics.py.

The module holds two torchmetrics metrics that accumulate different values on each rank:

- ``ppl``: ``persistent(True)``, so its states are in ``module.state_dict()``; nothing is declared for it;
- ``acc``: a plain (non-persistent) metric, declared as ``StateComponent("acc_metric", self.acc, PER_RANK)``.

Phase ``first``: an uninterrupted 8-step fit (the reference), then a fresh fit that checkpoints at step 4 and is
SIGKILLed at step 6. Phase ``resume``: new processes resume from the step-4 checkpoint to step 8. Each phase writes
each rank's final state to OUT/{name}-rank{r}.safetensors (+ .json with the update counts).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import save_file
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_sharing import SharingPattern, SharingStrategy, StateComponent

STEPS = 8


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))
        self.ppl = torchmetrics.MeanMetric()
        self.ppl.persistent(True)
        self.acc = torchmetrics.SumMetric()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.ppl.update(loss.detach() * (self.global_rank + 1))
        self.acc.update(torch.rand(()) + self.global_rank)  # this rank's generator: differs per rank
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def configure_state_components(self) -> list[StateComponent]:
        return [StateComponent("acc_metric", self.acc, SharingPattern.PER_RANK)]


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def loader() -> StatefulDataLoader:
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    return StatefulDataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=True)


def fit(out: Path, name: str, callbacks: list[Callback], ckpt_path: Path | None = None) -> None:
    pl.seed_everything(5)
    trainer = pl.Trainer(strategy=SharingStrategy(), accelerator="cpu", devices=2, max_steps=STEPS, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    module = Module()
    trainer.fit(module, train_dataloaders=loader(), ckpt_path=ckpt_path)
    rank = trainer.global_rank
    tensors = {f"model.{k}": v.contiguous() for k, v in module.state_dict().items()}
    for i, state in trainer.optimizers[0].state_dict()["state"].items():
        tensors.update({f"optimizer.{i}.{k}": v.contiguous() for k, v in state.items()})
    tensors.update({"acc.sum_value": module.acc.sum_value.clone(), "ppl.mean_value": module.ppl.mean_value.clone(),
                    "ppl.weight": module.ppl.weight.clone()})
    save_file(tensors, out / f"{name}-rank{rank}.safetensors")
    counts = {"ppl": module.ppl.update_count, "acc": module.acc.update_count, "global_step": trainer.global_step}
    (out / f"{name}-rank{rank}.json").write_text(json.dumps(counts))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["first", "resume"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ckpts = args.out / "checkpoints"
    if args.phase == "first":
        fit(args.out, "reference", [])
        fit(args.out, "killed", [ModelCheckpoint(dirpath=ckpts, every_n_train_steps=4, save_top_k=-1), KillAt(6)])
    else:
        fit(args.out, "resumed", [], ckpt_path=ckpts / "epoch=0-step=4.ckpt")


if __name__ == "__main__":
    main()

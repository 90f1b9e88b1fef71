"""Elastic resume under SharingStrategy, for tests/integration/test_lightning_elastic.py.

``--phase first``: 2 processes train over a dataset of ids, checkpoint every 3 steps and are SIGKILLed at step 5,
in the middle of the first epoch. ``--phase resume --devices W``: W processes resume from ``last.ckpt`` and
train to the end of epoch 1. ``--loader plain`` is a ``DataLoader(shuffle=True)`` (Lightning inserts the
sampler), ``--loader workers`` a torchdata ``StatefulDataLoader(shuffle=True, num_workers=2)``.

Every rank appends, per step, ``{"epoch", "step", "ids"}`` to OUT/{phase}-w{W}-rank{r}.jsonl; at the end of each
epoch rank 0 appends ``{"epoch_end", "sum", "mean"}``: two persistent torchmetrics metrics inside the module, the
sum and the mean of the ids seen in the epoch, synced over the ranks. The module also declares a PER_RANK
component of its own, ``notes``, with ``on_resize="drop"`` (``--refuse``: the default, ``"error"``).
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
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_sharing import SharingPattern, SharingStrategy, StateComponent

SAMPLES, BATCH, SEED = 45, 3, 11
KILL_AT, EVERY = 5, 3


class Ids(Dataset):
    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, torch.full((2,), float(i) / SAMPLES)


class Notes:
    def __init__(self) -> None:
        self.value = torch.zeros(1)

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


class Module(pl.LightningModule):
    def __init__(self, out: Path, name: str, notes_policy: str) -> None:
        super().__init__()
        self.net = nn.Linear(2, 1)
        self.id_sum = torchmetrics.SumMetric()
        self.id_mean = torchmetrics.MeanMetric()
        for metric in (self.id_sum, self.id_mean):
            metric.persistent(True)
        self.out, self.name, self.notes_policy = out, name, notes_policy
        self.notes = Notes()

    def _record(self, entry: dict[str, Any]) -> None:
        with open(self.out / f"{self.name}-rank{self.global_rank}.jsonl", "a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, x = batch
        self.id_sum.update(ids.float())
        self.id_mean.update(ids.float())
        self._record({"epoch": self.current_epoch, "step": self.global_step + 1, "ids": ids.tolist()})
        return self.net(x).pow(2).mean()

    def on_train_epoch_end(self) -> None:
        total, mean = float(self.id_sum.compute()), float(self.id_mean.compute())
        if self.global_rank == 0:
            self._record({"epoch_end": self.current_epoch, "sum": total, "mean": mean})
        self.id_sum.reset()
        self.id_mean.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def configure_state_components(self) -> list[StateComponent]:
        return [StateComponent("notes", self.notes, SharingPattern.PER_RANK, on_resize=self.notes_policy)]


class KillAt(Callback):
    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)


def loader(kind: str) -> DataLoader:
    if kind == "workers":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(Ids(), batch_size=BATCH, shuffle=True, num_workers=2)
    return DataLoader(Ids(), batch_size=BATCH, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phase", choices=["first", "resume"], required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--loader", choices=["plain", "workers"], default="plain")
    parser.add_argument("--refuse", action="store_true")
    args = parser.parse_args()
    pl.seed_everything(SEED)
    checkpoints = args.out / "checkpoints"
    callbacks: list[Callback] = [ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=EVERY, save_last=True,
                                                 save_top_k=-1)]
    if args.phase == "first":
        callbacks.append(KillAt())
    trainer = pl.Trainer(strategy=SharingStrategy(), accelerator="cpu", devices=args.devices, max_epochs=2,
                         logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    module = Module(args.out, f"{args.phase}-w{args.devices}", "error" if args.refuse else "drop")
    trainer.fit(module, train_dataloaders=loader(args.loader),
                ckpt_path=checkpoints / "last.ckpt" if args.phase == "resume" else None)


if __name__ == "__main__":
    main()

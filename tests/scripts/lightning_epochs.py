"""Exact resume at epoch boundaries under SharingStrategy (2 processes), for tests/integration/test_lightning_epochs.py.

For each configuration (``CONFIGS``) one job runs an uninterrupted fit (the reference), the same fit with a
checkpoint at an epoch boundary, stopped two steps into the next epoch, and a new Trainer resuming from that
checkpoint. Every rank records, per step, the epoch and the sample ids of its batch, and writes its final state to
OUT/CONFIG/{reference,resumed}-rank{r}.*.

A configuration sets ``save``: ``epochs`` (``ModelCheckpoint(every_n_epochs=1)``) or ``last-batch``
(``every_n_train_steps`` equal to the batches per epoch: it lands on an epoch's last batch); ``loader``:
``stateful`` (torchdata's ``StatefulDataLoader(shuffle=True)``) or ``plain`` (a ``DataLoader`` with a
``DistributedSampler(shuffle=True)``, which Lightning reseeds per epoch with ``set_epoch``); ``workers``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_sharing import SharingStrategy

SAMPLES, BATCH = 24, 3  # 2 ranks: 4 batches per epoch on each rank
PER_EPOCH = SAMPLES // 2 // BATCH
EPOCHS = 3
INTERRUPT_AT = PER_EPOCH + 2  # two steps into the second epoch (the checkpoint is at the end of the first)


class Indexed(Dataset):
    """Sample ``i`` is (i, features of i, target of i), so the order each rank saw can be recorded."""

    def __init__(self) -> None:
        self.x = torch.randn(SAMPLES, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        return i, self.x[i], self.x[i].sum(0, keepdim=True)


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.25), nn.Linear(8, 1))
        self.seen: list[dict[str, Any]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, x, y = batch
        self.seen.append({"step": self.global_step, "epoch": self.current_epoch, "ids": ids.tolist()})
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def loader(kind: str, workers: int) -> DataLoader:
    if kind == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(Indexed(), batch_size=BATCH, shuffle=True, num_workers=workers)
    # Lightning keeps a sampler the user passed and calls its set_epoch at each epoch start.
    rank, world = int(os.environ.get("LOCAL_RANK", 0)), 2
    sampler = DistributedSampler(Indexed(), num_replicas=world, rank=rank, shuffle=True, seed=17)
    return DataLoader(Indexed(), batch_size=BATCH, sampler=sampler, num_workers=workers)


def fit(config: dict[str, Any], out: Path, name: str, callbacks: list[Callback], max_epochs: int = EPOCHS,
        max_steps: int = -1, ckpt_path: Path | None = None) -> None:
    pl.seed_everything(9, workers=True)
    trainer = pl.Trainer(strategy=SharingStrategy(), accelerator="cpu", devices=2, max_epochs=max_epochs,
                         max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, num_sanity_val_steps=0, limit_val_batches=0)
    module = Module()
    trainer.fit(module, train_dataloaders=loader(config["loader"], config["workers"]), ckpt_path=ckpt_path)
    rank = trainer.global_rank
    tensors = {f"model.{k}": v.contiguous() for k, v in module.state_dict().items()}
    for i, state in trainer.optimizers[0].state_dict()["state"].items():
        tensors.update({f"optimizer.{i}.{k}": v.contiguous() for k, v in state.items()})
    save_file(tensors, out / f"{name}-rank{rank}.safetensors")
    summary = {"global_step": trainer.global_step, "epoch": trainer.current_epoch, "seen": module.seen}
    (out / f"{name}-rank{rank}.json").write_text(json.dumps(summary))


CONFIGS = {
    "epochs-stateful": {"save": "epochs", "loader": "stateful", "workers": 0},
    "last-batch-stateful": {"save": "last-batch", "loader": "stateful", "workers": 0},
    "last-batch-stateful-2-workers": {"save": "last-batch", "loader": "stateful", "workers": 2},
    "epochs-plain-2-workers": {"save": "epochs", "loader": "plain", "workers": 2},
    "last-batch-plain": {"save": "last-batch", "loader": "plain", "workers": 0},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    args = parser.parse_args()
    for name in args.configs:
        config = CONFIGS[name]
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        every = {"every_n_epochs": 1} if config["save"] == "epochs" else {"every_n_train_steps": PER_EPOCH}
        fit(config, out, "reference", [])
        # Interrupted two steps into the second epoch (the checkpoint is at the end of the first), then resumed
        # by a new Trainer, a new module and a new loader.
        fit(config, out, "interrupted", [ModelCheckpoint(dirpath=out / "checkpoints", filename="{step}",
                                                         save_top_k=-1, **every)], max_steps=INTERRUPT_AT)
        fit(config, out, "resumed", [], ckpt_path=out / "checkpoints" / f"step={PER_EPOCH}.ckpt")


if __name__ == "__main__":
    main()

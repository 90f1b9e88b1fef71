"""Standalone Lightning script for tests/integration/test_lightning_local_tier.py (run under torchrun --nnodes=2).

``SharingStrategy(local_tier=LocalTier(OUT/local/{node}, every_n_steps=2))`` with a ModelCheckpoint every 5 steps
(``save_last=True``). ``--kill-at N`` SIGKILLs every process when step N's hooks have all run (after its local save);
``--resume`` fits with ``ckpt_path="last"``. Each rank writes OUT/final-rank{r}.pt: its model, optimizer, RNG and
data order at the end, for the test to compare with an uninterrupted run.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_sharing import LocalTier, SharingStrategy


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 1))
        self.seen: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen.append(float(x.sum()))
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5)}


class KillAt(Callback):
    """SIGKILL this process at the start of the batch after step ``step`` (every hook of that step has run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-steps", type=int, default=10)
    args = parser.parse_args()
    pl.seed_everything(7)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    loader = StatefulDataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4,
                                shuffle=True)
    callbacks: list[Any] = [ModelCheckpoint(dirpath=args.out / "checkpoints", every_n_train_steps=5, save_top_k=-1,
                                            save_last=True)]
    if args.kill_at is not None:
        callbacks.append(KillAt(args.kill_at))
    strategy = SharingStrategy(local_tier=LocalTier(str(args.out / "local" / "{node}"), every_n_steps=2))
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, num_nodes=2, max_steps=args.max_steps,
                         callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    module = Module()
    trainer.fit(module, train_dataloaders=loader, ckpt_path="last" if args.resume else None)
    optimizer = trainer.optimizers[0]
    torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict(), "step": trainer.global_step,
                "rng": torch.get_rng_state(), "seen": module.seen[-3:], "ckpt_path": str(trainer.ckpt_path),
                "lr": optimizer.param_groups[0]["lr"]}, args.out / f"final-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()

"""LightningCLI with strategy="sharing" (and the class_path form) for tests/integration/test_lightning_cli.py.

Run as ``python lightning_cli.py fit --config ... [--ckpt_path last]``: Lightning's DDP launcher re-runs this
file with the same arguments on the second rank. The module records the step it finished at. As
docs/user_guide.md says, a CLI script imports lightning_sharing once so that the name "sharing" is registered
(a class_path needs no import: jsonargparse imports the class).
"""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_sharing  # noqa: F401  (registers strategy="sharing")


class Module(pl.LightningModule):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.net = nn.Linear(4, width)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x).sum(1, keepdim=True), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01)

    def on_train_end(self) -> None:
        out = os.environ["CLI_TEST_OUT"]
        with open(os.path.join(out, f"finished-rank{self.global_rank}.json"), "w") as handle:
            json.dump({"global_step": self.global_step, "strategy": type(self.trainer.strategy).__name__}, handle)


class Data(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(32, 4, generator=generator)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


if __name__ == "__main__":
    torch.manual_seed(0)
    LightningCLI(Module, Data, save_config_kwargs={"overwrite": True})

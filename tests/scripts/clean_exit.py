"""One rank of a 2-process job that runs to its end and exits, driven by tests/integration/test_clean_exit.py.

Nothing here destroys the process group: the strategy (or Lightning, for it) created it, so the strategy must see
to a clean exit. Both ranks are started by the test itself (``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_PORT`` in the
environment), so that the test sees each rank's own exit status.

Modes:
    trainer   fit with ModelCheckpoint, then validate, test and predict on the same Trainer.
    fabric    Fabric: a few steps, fabric.save, fabric.load.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from pathlib import Path

import torch
from torch import nn


def _data() -> torch.utils.data.TensorDataset:
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))


def trainer(out: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_sharing import SharingStrategy

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

        def predict_step(self, batch, batch_idx):
            return self.net(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    loader = torch.utils.data.DataLoader(_data(), batch_size=4)
    t = pl.Trainer(strategy=SharingStrategy(), accelerator="cpu", devices=2, max_steps=4, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   callbacks=[ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=2)])
    module = Module()
    t.fit(module, train_dataloaders=loader)
    t.validate(module, dataloaders=loader, verbose=False)
    t.test(module, dataloaders=loader, verbose=False)
    t.predict(module, dataloaders=loader)
    print(f"rank {t.global_rank} done", flush=True)


def fabric(out: Path) -> None:
    from lightning.fabric import Fabric

    from lightning_sharing import FabricSharingStrategy

    f = Fabric(accelerator="cpu", devices=2, strategy=FabricSharingStrategy(process_group_backend="gloo"))
    f.launch()
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer = f.setup(model, optimizer)
    for x, y in torch.utils.data.DataLoader(_data(), batch_size=8):
        optimizer.zero_grad()
        f.backward(nn.functional.mse_loss(model(x), y))
        optimizer.step()
    f.save(out / "step=4.ckpt", {"model": model, "optimizer": optimizer, "step": 4})
    f.load(out / "step=4.ckpt", {"model": model, "optimizer": optimizer})
    print(f"rank {f.global_rank} done", flush=True)


def _report_at_exit() -> None:
    # Registered before the strategy registers its hook, so it runs after it (exit hooks run last-in first-out).
    import torch.distributed as dist

    os.write(1, f"at exit: process group initialised: {dist.is_initialized()}\n".encode())


def main() -> None:
    atexit.register(_report_at_exit)
    # The strategy's exit hook that lets gloo's threads settle reports here (distributed/exit.py).
    settle_log = logging.getLogger("lightning_sharing.distributed.exit")
    settle_log.addHandler(logging.StreamHandler(sys.stdout))
    settle_log.setLevel(logging.DEBUG)
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["trainer", "fabric"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    {"trainer": trainer, "fabric": fabric}[args.mode](args.out)


if __name__ == "__main__":
    main()

"""Migrating in from single-file Lightning checkpoints (2 processes), for tests/integration/test_lightning_migrate.py.

1. Lightning's own ``strategy="ddp"`` trains 6 steps with ModelCheckpoint(every_n_train_steps=3): ordinary
   ``.ckpt`` files. Every rank records what ``step=3.ckpt`` holds.
2. ``SharingStrategy`` resumes from that file with ``fit(ckpt_path=...)`` and trains to step 6: a callback
   records at ``on_train_start`` what was restored (step, optimizer and scheduler state, the ModelCheckpoint's
   state); the later saves are directories.
3. A file holding an object outside torch's weights-only allow-list: refused by default, read with
   ``fit(..., weights_only=False)``.
Each rank writes OUT/result-rank{r}.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_sharing import SharingPattern, SharingStrategy, StateComponent

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared support package
from support.compare import same_state


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = state["count"]


class Module(pl.LightningModule):
    def __init__(self, declare: bool = False) -> None:
        super().__init__()
        self.declare = declare
        self.net = nn.Linear(4, 1)
        self.counter = Counter()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.counter.count += 1
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)]

    def configure_state_components(self) -> list[StateComponent]:
        return [StateComponent("counter", self.counter, SharingPattern.PER_RANK)] if self.declare else []


class Unsafe:
    """Not in torch's weights-only allow-list."""


class Restored(Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = trainer.global_step
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())  # training goes on changing it
        self.scheduler = trainer.lr_scheduler_configs[0].scheduler.state_dict()
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.tally = next(c.batches for c in trainer.callbacks if isinstance(c, Tally))


class Tally(Callback):
    """A callback with state of its own: how many training batches it saw."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches += 1

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches = state["batches"]


def loader() -> StatefulDataLoader:
    x = torch.randn(48, 4, generator=torch.Generator().manual_seed(0))
    return StatefulDataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=True)


def trainer(strategy: Any, steps: int, callbacks: list[Callback]) -> pl.Trainer:
    return pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=steps, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out: Path = args.out
    pl.seed_everything(3)

    files = out / "files"
    t1 = trainer("ddp", 6, [ModelCheckpoint(dirpath=files, filename="{step}", every_n_train_steps=3, save_top_k=-1),
                            Tally()])
    t1.fit(Module(), train_dataloaders=loader())
    rank = t1.global_rank
    saved = torch.load(files / "step=3.ckpt", weights_only=True)

    restored = Restored()
    directories = out / "directories"
    t2 = trainer(SharingStrategy(), 6, [ModelCheckpoint(dirpath=directories, filename="{step}",
                                                        every_n_train_steps=3, save_top_k=-1), Tally(), restored])
    module = Module(declare=True)
    t2.fit(module, train_dataloaders=loader(), ckpt_path=files / "step=3.ckpt")
    result: dict[str, Any] = {
        "restored_step": restored.step, "final_step": t2.global_step,
        "optimizer_equal": same_state(restored.optimizer, saved["optimizer_states"][0]),
        "scheduler_equal": same_state(restored.scheduler, saved["lr_schedulers"][0]),
        "weights_equal": same_state(restored.weights, saved["state_dict"]),
        "callback_restored": restored.tally,
        "saved_callback_keys": sorted(saved["callbacks"]),
        "directories": sorted(p.name for p in directories.iterdir()),
    }

    unsafe = files / "unsafe.ckpt"
    if rank == 0:
        torch.save({**saved, "extra": Unsafe()}, unsafe)
    t2.strategy.barrier()
    try:
        trainer(SharingStrategy(), 6, []).fit(Module(), train_dataloaders=loader(), ckpt_path=unsafe)
        result["unsafe_default"] = None
    except Exception as exc:  # the test checks the type and the text
        result["unsafe_default"] = f"{type(exc).__name__}: {exc}"
    t4 = trainer(SharingStrategy(), 4, [Tally(), restored])
    t4.fit(Module(), train_dataloaders=loader(), ckpt_path=unsafe, weights_only=False)
    result["trusted_step"] = restored.step
    (out / f"result-rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()  # created by Lightning's "ddp" above, which no strategy here owns


if __name__ == "__main__":
    main()

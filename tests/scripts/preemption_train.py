"""Standalone Lightning script driven by tests/test_preemption.py: training that gets a signal, and its resume.

Phases:
    train     fit ``--max-steps`` steps; ``--hold-at K`` writes OUT/reached-step{K}-rank{r} (this process's pid) at
              the start of step K and waits for OUT/go-step{K} (the test sends its signals in between, so every rank has
              received them before step K runs); ``--mark-at K`` only writes the marker; ``--crash-at K
              --crash-rank R`` raises on rank R at step K. With Lightning's own launcher, rank 0 waits for
              its child processes and records their exit statuses in OUT/children.json.
    resume    an uninterrupted reference run (OUT/reference) and then the resumed run from ``--resume``
              (``last``, ``latest`` = find_latest_checkpoint of the checkpoint directory, or ``none``: Lightning
              decides, e.g. SLURM's automatic ``hpc`` resume), and with ``--also-resume PATH`` a second one;
              each writes final-rank{r}.safetensors/.json in its own directory.
Each phase writes OUT/{phase}/result-rank{r}.json. Ranks come from Lightning's launcher, or from the
environment (LOCAL_RANK/WORLD_SIZE/..., or SLURM_* with ``--slurm``) when the test starts them itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from safetensors.torch import save_file
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_sharing import MetricState, SharingPattern, SharingStrategy, StateComponent, find_latest_checkpoint


class Net(pl.LightningModule):
    def __init__(self, max_steps: int, step_sleep: float = 0.0) -> None:
        super().__init__()
        self.max_steps, self.step_sleep = max_steps, step_sleep
        # Dropout: the result depends on every rank's RNG stream, so a resume that replays RNG wrongly shows.
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
        self.loss_sum = torchmetrics.SumMetric()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.step_sleep:
            time.sleep(self.step_sleep)
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.loss_sum.update(loss.detach())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.03)
        total = self.max_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_state_components(self) -> list[StateComponent]:
        return [StateComponent("loss_sum", MetricState(self.loss_sum), SharingPattern.PER_RANK)]


def data(n: int, seed: int, shuffle: bool) -> Any:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    dataset = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g))
    if shuffle:  # 64 samples, batch 4, 2 ranks: 8 steps per epoch
        return StatefulDataLoader(dataset, batch_size=4, shuffle=True)
    return torch.utils.data.DataLoader(dataset, batch_size=4)  # validation: a plain loader (its iterator draws RNG)


class Signals(Callback):
    """Markers for the test's signals, an optional hold, and an optional crash."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def _mark(self, trainer: pl.Trainer) -> None:
        marker = self.args.out / f"reached-step{trainer.global_step}-rank{trainer.global_rank}"
        temp = marker.with_suffix(".tmp")
        temp.write_text(str(os.getpid()))
        temp.rename(marker)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        step, a = trainer.global_step, self.args
        if step == a.mark_at:
            self._mark(trainer)
        if step == a.hold_at:
            self._mark(trainer)
            deadline = time.monotonic() + 60
            while not (a.out / f"go-step{step}").exists() and time.monotonic() < deadline:
                time.sleep(0.01)  # signal handlers run in between
        if step == a.crash_at and trainer.global_rank == a.crash_rank:
            raise RuntimeError(f"injected crash on rank {trainer.global_rank} at step {step}")


def make_trainer(args: argparse.Namespace, root: Path, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    save_last = {"none": None, "copy": True, "link": "link"}[args.save_last]
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=5, save_top_k=-1, save_last=save_last)
    preemption: Any = {"default": True, "off": False}.get(args.preemption, args.preemption)
    plugins = [SLURMEnvironment(auto_requeue=True)] if args.slurm else []
    strategy = SharingStrategy(preemption_checkpoint=preemption, async_save=args.async_save)
    return pl.Trainer(strategy=strategy, accelerator="cpu", devices=2,
                      max_steps=args.max_steps, val_check_interval=4, num_sanity_val_steps=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                      callbacks=[checkpoint, *callbacks], plugins=plugins, deterministic=True, **kwargs)


def fit(args: argparse.Namespace, root: Path, ckpt_path: Any = None, callbacks: list[Callback] | None = None
        ) -> tuple[pl.Trainer, Net]:
    pl.seed_everything(11)
    module = Net(args.max_steps, args.step_sleep)
    trainer = make_trainer(args, root, callbacks or [])
    trainer.fit(module, train_dataloaders=data(64, 0, True), val_dataloaders=data(16, 1, False), ckpt_path=ckpt_path)
    return trainer, module


def dump(trainer: pl.Trainer, module: Net, out: Path, extra: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rank = trainer.global_rank
    tensors = {f"model.{k}": v.contiguous() for k, v in module.state_dict().items()}
    for i, state in trainer.optimizers[0].state_dict()["state"].items():
        tensors.update({f"optimizer.{i}.{k}": v.contiguous() for k, v in state.items()})
    tensors["metric"] = module.loss_sum.compute().clone()
    save_file(tensors, out / f"final-rank{rank}.safetensors")
    scheduler = trainer.lr_scheduler_configs[0].scheduler.state_dict()
    result = {"global_step": trainer.global_step, "epoch": trainer.current_epoch,
              "scheduler": {k: v for k, v in scheduler.items() if k != "lr_lambdas"}, **extra}
    (out / f"final-rank{rank}.json").write_text(json.dumps(result, indent=1, default=str))


def train(args: argparse.Namespace) -> None:
    trainer: pl.Trainer | None = None
    result: dict[str, Any] = {"pid": os.getpid()}
    try:
        pl.seed_everything(11)
        module = Net(args.max_steps, args.step_sleep)
        trainer = make_trainer(args, args.out, [Signals(args)])
        trainer.fit(module, train_dataloaders=data(64, 0, True), val_dataloaders=data(16, 1, False))
        result["outcome"] = "finished"
    except BaseException as exc:
        result["outcome"] = type(exc).__name__
        raise
    finally:
        if trainer is not None:
            result.update(global_step=trainer.global_step, rank=trainer.global_rank,
                          saved=trainer.strategy.preemption.saved_path)
            (args.out / f"result-rank{trainer.global_rank}.json").write_text(json.dumps(result, indent=1))
            children = getattr(trainer.strategy.launcher, "procs", None)
            if trainer.global_rank == 0 and children:  # Lightning's launcher started the other ranks
                codes = [proc.wait(timeout=60) for proc in children]
                (args.out / "children.json").write_text(json.dumps(codes))


def resume(args: argparse.Namespace) -> None:
    trainer, module = fit(args, args.out / "reference")
    dump(trainer, module, args.out / "reference", {})

    ckpt_path: Any = {"last": "last", "none": None}.get(args.resume, args.resume)
    if args.resume == "latest":
        ckpt_path = find_latest_checkpoint(args.out / "ckpt")

    class Start(Callback):
        step: int | None = None

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            Start.step = trainer.global_step

    trainer, module = fit(args, args.out, ckpt_path, [Start()])
    dump(trainer, module, args.out / "resumed", {"ckpt_path": str(trainer.ckpt_path), "start_step": Start.step})
    if args.also_resume:  # a second resume, from another checkpoint (its ModelCheckpoint writes elsewhere)
        trainer, module = fit(args, args.out / "resumed2", args.also_resume, [Start()])
        dump(trainer, module, args.out / "resumed2", {"ckpt_path": str(trainer.ckpt_path), "start_step": Start.step})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["train", "resume"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--hold-at", type=int, default=-1)
    parser.add_argument("--mark-at", type=int, default=-1)
    parser.add_argument("--crash-at", type=int, default=-1)
    parser.add_argument("--crash-rank", type=int, default=1)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--save-last", choices=["none", "copy", "link"], default="copy")
    parser.add_argument("--preemption", default="default", help="default, off, or a path")
    parser.add_argument("--resume", default="last", help="last, latest, none, or a path")
    parser.add_argument("--also-resume", default=None, help="a second checkpoint to resume from")
    parser.add_argument("--slurm", action="store_true")
    parser.add_argument("--async-save", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    {"train": train, "resume": resume}[args.phase](args)


if __name__ == "__main__":
    main()

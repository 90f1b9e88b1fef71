"""Train with PyTorch Lightning on 2 CPU processes, checkpoint with lightning_sharing, get killed, resume.

    python examples/lightning_ddp.py --out runs/demo --devices 2 --max-steps 24
    python examples/lightning_ddp.py --out runs/killed --devices 2 --max-steps 24 --kill-at-step 15
    python examples/lightning_ddp.py --out runs/killed --devices 2 --max-steps 24 --resume

The only checkpoint-specific line is ``strategy=SharingStrategy()``. Everything else is ordinary
Lightning: ``ModelCheckpoint(every_n_train_steps=..., save_last=True)`` and ``fit(ckpt_path="last")``.
By default the strategy saves the model and the optimizer once (REPLICATED, the model checked
identical across ranks), the LR scheduler, each rank's dataloader position and RNG (PER_RANK), and
Lightning's own loop state (GLOBAL). The module adds one component of its own: a torchmetrics
metric accumulating per rank. ``--kill-at-step N`` sends SIGKILL to every process at step N (after
the checkpoint at step N-1 or earlier has been committed); ``--resume`` continues from ``last``.
At the end each rank writes ``OUT/final-rank{r}.safetensors`` (weights, optimizer moments, metric)
and ``OUT/final-rank{r}.json`` (scheduler state, metric value) so runs can be compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import save_file
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_sharing import MetricState, SharingPattern, SharingStrategy, StateComponent

# Upstream deprecation notices on torch 2.13 (torchdata's set_vital, Lightning's pytree helper): not ours, and
# nothing to act on in this example. Silenced here only, in the example; the library itself adds no warnings.
warnings.filterwarnings("ignore", message=r".*'set_vital' is deprecated")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


class TinyRegression(pl.LightningModule):
    def __init__(self, lr: float = 0.05, warmup: int = 4, total: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
        self.loss_mean = torchmetrics.MeanMetric()  # accumulates this rank's losses across steps

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.loss_mean.update(loss.detach())
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        warmup, total = self.hparams.warmup, self.hparams.total

        def warmup_cosine(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_state_components(self) -> list[StateComponent]:
        # The metric's accumulators differ per rank: save every rank's own copy.
        return [StateComponent("loss_mean", MetricState(self.loss_mean), SharingPattern.PER_RANK)]


class KillAtStep(Callback):
    """Simulate a crash: SIGKILL this process when training reaches ``step`` (no cleanup, no save)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def make_dataloader() -> StatefulDataLoader:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(96, 8, generator=generator)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(96, 1, generator=generator)
    # Shuffled and stateful: the position inside the epoch is saved per rank and restored.
    return StatefulDataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)


def dump_final_state(module: TinyRegression, trainer: pl.Trainer, out: Path) -> None:
    rank = trainer.global_rank
    optimizer = trainer.optimizers[0]
    tensors = {f"model.{k}": v.contiguous() for k, v in module.state_dict().items()}
    for i, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer.{i}.{k}": v.contiguous() for k, v in state.items()})
    tensors["metric.mean_value"] = module.loss_mean.mean_value.clone()
    tensors["metric.weight"] = module.loss_mean.weight.clone()
    save_file(tensors, out / f"final-rank{rank}.safetensors")
    scheduler = trainer.lr_scheduler_configs[0].scheduler.state_dict()
    summary = {"global_step": trainer.global_step,
               "scheduler": {k: v for k, v in scheduler.items() if k != "lr_lambdas"},
               "metric_compute": float(module.loss_mean.compute())}
    (out / f"final-rank{rank}.json").write_text(json.dumps(summary, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=5, help="checkpoint every N training steps")
    parser.add_argument("--kill-at-step", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    parser.add_argument("--background-staging", action="store_true",
                        help="with --async-save, copy weights and optimizer state in the background too")
    args = parser.parse_args()

    pl.seed_everything(7, workers=True)
    args.out.mkdir(parents=True, exist_ok=True)
    callbacks: list[Callback] = [ModelCheckpoint(dirpath=args.out / "checkpoints", every_n_train_steps=args.every,
                                                 save_top_k=-1, save_last=True)]
    if args.kill_at_step:
        callbacks.append(KillAtStep(args.kill_at_step))
    trainer = pl.Trainer(
        strategy=SharingStrategy(async_save=args.async_save, background_staging=args.background_staging),
        accelerator="cpu",
        devices=args.devices,
        max_steps=args.max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    module = TinyRegression(total=args.max_steps)
    trainer.fit(module, train_dataloaders=make_dataloader(), ckpt_path="last" if args.resume else None)
    dump_final_state(module, trainer, args.out)
    if trainer.is_global_zero:
        print(f"done: global_step={trainer.global_step}, checkpoints in {args.out / 'checkpoints'}")


if __name__ == "__main__":
    main()

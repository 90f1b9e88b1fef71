"""FSDP2 x tensor parallel with PyTorch Lightning on 4 CPU processes, checkpointed by lightning_sharing; resumed.

    python examples/lightning_model_parallel.py --out runs/mp --dp 2 --tp 2 --max-steps 12
    python examples/lightning_model_parallel.py --out runs/mp-killed --dp 2 --tp 2 --max-steps 12 --kill-at-step 8
    python examples/lightning_model_parallel.py --out runs/mp-killed --dp 2 --tp 2 --max-steps 12 --resume
    cmp runs/mp/final-rank0.safetensors runs/mp-killed/final-rank0.safetensors   # identical

The only checkpoint-specific line is ``strategy=SharingModelParallelStrategy(data_parallel_size,
tensor_parallel_size)``; ``configure_model`` parallelizes the network on ``self.device_mesh`` exactly as for
Lightning's own ``ModelParallelStrategy`` (tensor parallel over "tensor_parallel" when ``--tp`` > 1, then FSDP2
``fully_shard`` over "data_parallel"). By default the strategy saves the model and AdamW's state SHARDED (each rank
writes the chunks it holds, once; they load at any mesh or world size, or into one plain process), the scheduler and
Lightning's loops GLOBAL, each rank's RNG PER_RANK and the dataloader position PER_GROUP over the tensor-parallel
group (its ranks read the same batches). The module adds a per-rank torchmetrics metric. ``--kill-at-step N`` sends
SIGKILL to every process at step N; ``--resume`` continues from ``last``. At the end each rank writes
``OUT/final-rank{r}.safetensors`` (full weights, full optimizer state, its metric) and ``OUT/final-rank{r}.json``.

``--local-every N`` adds ``local_tier=LocalTier(OUT/local/{node}, every_n_steps=N)`` (docs/local_tier.md): a resume
then starts from the newest of the local tier and the persistent checkpoints.

    lightning-sharing inspect runs/mp/checkpoints/last.ckpt                          # who wrote which chunk
    lightning-sharing export runs/mp/checkpoints/last.ckpt runs/mp/hf --component model
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

from lightning_sharing import (
    LocalTier,
    MetricState,
    OptimizerState,
    SharingModelParallelStrategy,
    SharingPattern,
    StateComponent,
)

warnings.filterwarnings("ignore", message=r".*'set_vital' is deprecated")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


class TinyParallelRegression(pl.LightningModule):
    def __init__(self, lr: float = 0.05, warmup: int = 4, total: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, 30), nn.ReLU(), nn.Dropout(0.2), nn.Linear(30, 1))
        self.loss_mean = torchmetrics.MeanMetric()  # accumulates this rank's losses across steps

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = self.device_mesh
        if mesh is None:  # no model-parallel strategy: load_from_checkpoint, SharingStrategy, one device
            return
        if mesh["tensor_parallel"].size() > 1:
            parallelize_module(self.net, mesh["tensor_parallel"], {"0": ColwiseParallel(), "3": RowwiseParallel()})
        fully_shard(self.net, mesh=mesh["data_parallel"])

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
    return StatefulDataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)


def full_state(module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor],
                                                                                     dict[str, object]]:
    """Every weight and optimizer tensor whole (``full_tensor()``: collective, every rank calls it), and the
    optimizer's other values (learning rates, betas, ...)."""
    from torch.distributed.tensor import DTensor

    def whole(value: torch.Tensor) -> torch.Tensor:
        return (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone().contiguous()

    tensors = {f"model.{k}": whole(v) for k, v in module.net.state_dict().items()}
    values: dict[str, object] = {}
    for key, value in sorted(OptimizerState(module.net, optimizer).state_dict().items()):
        if isinstance(value, torch.Tensor):
            tensors[f"optimizer.{key}"] = whole(value)
        else:
            values[key] = value
    return tensors, values


def dump_final_state(module: TinyParallelRegression, trainer: pl.Trainer, out: Path) -> None:
    rank = trainer.global_rank
    tensors, values = full_state(module, trainer.optimizers[0])
    tensors["metric.mean_value"] = module.loss_mean.mean_value.clone()
    tensors["metric.weight"] = module.loss_mean.weight.clone()
    save_file(tensors, out / f"final-rank{rank}.safetensors")
    scheduler = trainer.lr_scheduler_configs[0].scheduler.state_dict()
    summary = {"global_step": trainer.global_step,
               "scheduler": {k: v for k, v in scheduler.items() if k != "lr_lambdas"},
               "optimizer": values, "metric_compute": float(module.loss_mean.compute())}
    (out / f"final-rank{rank}.json").write_text(json.dumps(summary, indent=1))


def make_trainer(args: argparse.Namespace, callbacks: list[Callback]) -> pl.Trainer:
    return pl.Trainer(
        strategy=SharingModelParallelStrategy(data_parallel_size=args.dp, tensor_parallel_size=args.tp,
                                              async_save=args.async_save, local_tier=LocalTier(
                                                  args.out / "local" / "{node}", every_n_steps=args.local_every)
                                              if args.local_every else None),
        accelerator="cpu", devices=args.dp * args.tp, max_steps=args.max_steps, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, deterministic=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dp", type=int, default=2, help="data-parallel size")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3, help="checkpoint every N training steps")
    parser.add_argument("--kill-at-step", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    parser.add_argument("--local-every", type=int, default=0,
                        help="also save into the local tier (docs/local_tier.md) every N steps; resume takes the newer")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    pl.seed_everything(7, workers=True)
    args.out.mkdir(parents=True, exist_ok=True)
    callbacks: list[Callback] = [ModelCheckpoint(dirpath=args.out / "checkpoints", every_n_train_steps=args.every,
                                                 save_top_k=-1, save_last=True)]
    if args.kill_at_step:
        callbacks.append(KillAtStep(args.kill_at_step))
    trainer = make_trainer(args, callbacks)
    module = TinyParallelRegression(total=args.max_steps)
    trainer.fit(module, train_dataloaders=make_dataloader(), ckpt_path="last" if args.resume else None)
    dump_final_state(module, trainer, args.out)
    if trainer.is_global_zero:
        print(f"done: global_step={trainer.global_step}, checkpoints in {args.out / 'checkpoints'}")


if __name__ == "__main__":
    main()

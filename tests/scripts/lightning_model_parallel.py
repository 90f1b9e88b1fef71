"""Loading model-parallel checkpoints elsewhere, for tests/integration/test_lightning_model_parallel.py.

Run under torchrun (or as one plain process for ``--single-device``), with the module of
examples/lightning_model_parallel.py:

- ``--load CKPT --dp D --tp T``: ``SharingModelParallelStrategy(D, T)`` resumes from CKPT, saved under another
  layout: first with the default ``strict=True`` (refused: the per-rank state does not map; the error is recorded),
  then with ``strict=False``; the full weights and optimizer state it loaded are written, no step is taken.
- ``--into ddp``: the same into ``SharingStrategy`` (DDP; one process with ``--single-device``).
- ``--extras``: ``validate(ckpt_path=CKPT)`` at --dp x --tp, ``trainer.save_checkpoint(weights_only=True)``, and a
  short fit with ``async_save=True`` whose ModelCheckpoint keeps the newest of its saves.
- ``--refusals``: Lightning's ``ModelParallelStrategy`` with ``plugins=[SharingCheckpointIO()]``, and a
  ``fully_shard``-ed module under ``SharingStrategy``: the errors are recorded.

Each rank writes OUT/loaded-{mp,ddp}-rank{r}.safetensors and OUT/result-rank{r}.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import save_file

from lightning_sharing import SharingCheckpointIO, SharingModelParallelStrategy, SharingStrategy

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("lightning_model_parallel",
                                               ROOT / "examples" / "lightning_model_parallel.py")
example = importlib.util.module_from_spec(_spec)
sys.modules["lightning_model_parallel"] = example
_spec.loader.exec_module(example)


class ShardedUnderDDP(example.TinyParallelRegression):
    """``fully_shard`` on a mesh of its own, as a user would try under DDP."""

    def configure_model(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.net, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))


def trainer(strategy: Any, devices: int, max_steps: int, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_steps=max_steps, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      enable_checkpointing=False, **kwargs)


def error_of(run: Any) -> str:
    try:
        run()
    except Exception as exc:  # recorded for the test to compare word for word
        return f"{type(exc).__name__}: {exc}"
    return ""


def load(args: argparse.Namespace, into: str, result: dict[str, Any], path: Path | None = None,
         name: str | None = None) -> None:
    """Load ``path`` (``args.load``) into ``into`` ("mp": the example's layout at --dp x --tp; "ddp":
    SharingStrategy); results and tensors go under ``name`` (``into``)."""
    path, name = path or args.load, name or into
    ddp = into == "ddp"
    devices = 1 if args.single_device else (int(os.environ.get("WORLD_SIZE", "1")) if ddp else args.dp * args.tp)

    def fit(strict: bool) -> tuple[pl.Trainer, Any]:
        strategy = SharingStrategy(strict=strict) if ddp else SharingModelParallelStrategy(args.dp, args.tp,
                                                                                           strict=strict)
        run = trainer(strategy, devices, args.max_steps)
        module = example.TinyParallelRegression(total=64)  # under DDP its configure_model does nothing
        run.fit(module, train_dataloaders=example.make_dataloader(), ckpt_path=path)
        return run, module

    mine: dict[str, Any] = {"strict_error": error_of(lambda: fit(True))}
    run, module = fit(False)
    tensors, values = example.full_state(module, run.optimizers[0])
    save_file(tensors, args.out / f"loaded-{name}-rank{run.global_rank}.safetensors")
    if args.save_ddp and ddp:
        run.save_checkpoint(args.out / "ddp.ckpt")  # SharingStrategy's form: the model and optimizer REPLICATED
    mine.update(global_step=run.global_step, optimizer=values,
                scheduler={k: v for k, v in run.lr_scheduler_configs[0].scheduler.state_dict().items()
                           if k != "lr_lambdas"})
    result[name] = mine


def refusals(result: dict[str, Any]) -> None:
    devices = int(os.environ.get("WORLD_SIZE", "1"))
    run = trainer(ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1), devices, 1,
                  plugins=[SharingCheckpointIO()])
    result["model_parallel_with_io"] = error_of(
        lambda: run.fit(example.TinyParallelRegression(), train_dataloaders=example.make_dataloader()))
    run = trainer(SharingStrategy(), devices, 1)
    result["dtensor_under_ddp"] = error_of(
        lambda: run.fit(ShardedUnderDDP(), train_dataloaders=example.make_dataloader()))


class Validated(example.TinyParallelRegression):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)


def extras(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """``validate`` with a checkpoint, ``save_checkpoint(weights_only=True)``, an async ModelCheckpoint save."""
    devices = args.dp * args.tp
    run = trainer(SharingModelParallelStrategy(args.dp, args.tp, strict=False), devices, 1)  # its metric is per rank
    metrics = run.validate(Validated(), dataloaders=example.make_dataloader(), ckpt_path=args.load, verbose=False)
    result["validate"] = {"val_loss": float(metrics[0]["val_loss"]), "ckpt_path": os.fspath(run.ckpt_path)}
    run.save_checkpoint(args.out / "weights.ckpt", weights_only=True)
    # Background staging too: step 5's optimizer.step() runs while step 4's DTensors may still be being copied.
    strategy = SharingModelParallelStrategy(args.dp, args.tp, async_save=True, background_staging=True)
    run = pl.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_steps=5, logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[_DumpAt(4, args.out / "async-step4"),
                                ModelCheckpoint(dirpath=args.out / "async", every_n_train_steps=2, save_top_k=1,
                                                monitor="step", mode="max")])
    run.fit(example.TinyParallelRegression(), train_dataloaders=example.make_dataloader())
    result["async"] = sorted(os.listdir(args.out / "async"))


class _DumpAt(pl.Callback):
    """Dump the full weights and optimizer state after training step ``step`` (before the next one)."""

    def __init__(self, step: int, prefix: Path) -> None:
        self.step, self.prefix = step, prefix

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            tensors, _ = example.full_state(module, trainer.optimizers[0])  # collective: every rank
            save_file(tensors, f"{self.prefix}-rank{trainer.global_rank}.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--load", type=Path)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--into", nargs="*", default=["mp"], choices=["mp", "ddp"])
    parser.add_argument("--single-device", action="store_true")
    parser.add_argument("--max-steps", type=int, required=True, help="the checkpoint's step: load, take no step")
    parser.add_argument("--save-ddp", action="store_true", help="after loading into ddp, save OUT/ddp.ckpt")
    parser.add_argument("--load-ddp", type=Path, help="then load this SharingStrategy checkpoint into mp")
    parser.add_argument("--refusals", action="store_true")
    parser.add_argument("--extras", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(7)
    result: dict[str, Any] = {}
    if args.refusals:
        refusals(result)
    if args.extras:
        extras(args, result)
    for into in args.into if args.load else []:
        load(args, into, result)
    if args.load_ddp:
        load(args, "mp", result, args.load_ddp, "mp-from-ddp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    (args.out / f"result-rank{rank}.json").write_text(json.dumps(result, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

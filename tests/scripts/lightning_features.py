"""Standalone Lightning script driven by tests/test_lightning_*.py (Lightning's DDP launcher re-runs argv).

Modes:
    features         ModelCheckpoint top-k + monitor + save_last="link", save_checkpoint (weights_only too),
                     validate(ckpt_path=...), storage_options for a local path refused, user components,
                     resume from "last".
    bad-declaration  a PER_GROUP component naming a group nobody provides: must fail when fit starts.
    spawn            the spawn launcher: final weights travel back to the parent through the CheckpointIO.
    nodes            run under torchrun --nnodes=2: a PER_NODE component, saved then resumed.
    fallback         a corrupt last.ckpt: an error by default, the previous checkpoint with fallback=True.
    async-retention  async_save=True with keep-last-2 (ModelCheckpoint top-k on "step"), then a resume from an
                     older checkpoint, which retention must not delete.
    incremental      SharingStrategy(incremental=True, async_save=True), a frozen backbone, keep-last-2 retention,
                     then a resume from the newest checkpoint.
Each mode writes OUT/result-rank{r}.json for the test to check.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_sharing import (
    BuiltinState,
    CheckpointManifest,
    MetricState,
    SharingPattern,
    SharingStrategy,
    StateComponent,
    find_latest_checkpoint,
)


class NodeCache:
    """Node-local state: remembers which node built it, refuses another node's copy."""

    def __init__(self) -> None:
        self.node = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")))
        self.loaded_from: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"node": self.node, "entries": torch.full((3,), float(self.node))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded_from = int(state["node"])
        if self.loaded_from != self.node:
            raise ValueError(f"node {self.node} was given node {self.loaded_from}'s cache")


class Module(pl.LightningModule):
    def __init__(self, components: str = "default") -> None:
        super().__init__()
        self.save_hyperparameters()
        # BatchNorm: its running statistics differ between ranks between DDP's buffer broadcasts, so
        # the default model replication check must leave buffers out (and still pass).
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
        self.seen = torchmetrics.SumMetric()
        self.cache = NodeCache()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.seen.update(torch.tensor(float(self.global_rank + 1)))
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_process_groups(self) -> dict[str, Any]:
        import torch.distributed as dist

        return {"everyone": dist.group.WORLD}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def configure_state_components(self) -> list[StateComponent]:
        if self.hparams.components == "bad":
            return [StateComponent("data_shard", NodeCache(), SharingPattern.PER_GROUP, process_group_name="tp")]
        return [
            StateComponent("seen", MetricState(self.seen), SharingPattern.PER_RANK),
            # One copy per instance of the group named in configure_process_groups() (here: all ranks).
            StateComponent("group_state", Counter(), SharingPattern.PER_GROUP, process_group_name="everyone"),
            StateComponent("cache", self.cache, SharingPattern.PER_NODE),
            # Re-declare a built-in: the scheduler-free optimizer is still REPLICATED, now checked at TENSOR level.
            StateComponent("optimizer", BuiltinState(), SharingPattern.REPLICATED, validate_replication=True,
                           validation_level="tensor"),
        ]


class Counter:
    """A tiny stateful: how many times an epoch started."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])


class DataModule(pl.LightningDataModule):
    """Declares state of its own (GLOBAL) next to the module's components."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs_started = Counter()

    def train_dataloader(self) -> StatefulDataLoader:
        self.epochs_started.count += 1
        return loader()

    def configure_state_components(self) -> list[StateComponent]:
        return [StateComponent("dm_epochs", self.epochs_started, SharingPattern.GLOBAL)]


def loader(shuffle: bool = True) -> StatefulDataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return StatefulDataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=shuffle)


def trainer(args: argparse.Namespace, max_steps: int, callbacks: list | None = None, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(strategy=kwargs.pop("strategy", SharingStrategy()), accelerator="cpu",
                      devices=args.devices, num_nodes=args.nodes, max_steps=max_steps,
                      callbacks=callbacks or [], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def write(out: Path, rank: int, result: dict[str, Any]) -> None:
    (out / f"result-rank{rank}.json").write_text(json.dumps(result, indent=1, default=str))


def features(args: argparse.Namespace) -> None:
    ckpt_dir = args.out / "checkpoints"
    callback = ModelCheckpoint(dirpath=ckpt_dir, monitor="train_loss", save_top_k=2, every_n_train_steps=3,
                               save_last="link")
    t = trainer(args, 12, [callback])
    module = Module()
    t.fit(module, datamodule=DataModule())
    result: dict[str, Any] = {"best": callback.best_model_path, "last": callback.last_model_path,
                              "best_k": sorted(callback.best_k_models), "global_step": t.global_step}
    t.save_checkpoint(args.out / "manual.ckpt")
    t.save_checkpoint(args.out / "weights.ckpt", weights_only=True)
    try:  # storage options are for URLs: given for a local path, a mistake (on every rank, before any collective)
        t.save_checkpoint(args.out / "remote.ckpt", storage_options={"bucket": "x"})
        result["storage_options_error"] = None
    except ValueError as exc:
        result["storage_options_error"] = f"{type(exc).__name__}: {exc}"
    # Unshuffled, so that the two validations average the same batches in the same order.
    result["validate_weights"] = t.validate(module, dataloaders=loader(False), ckpt_path=args.out / "weights.ckpt",
                                            verbose=False)[0]["val_loss"]
    result["validate_best"] = t.validate(module, dataloaders=loader(False), ckpt_path="best",
                                         verbose=False)[0]["val_loss"]

    # A new Trainer resumes from "last" (a symlink to the newest step checkpoint) and continues.
    resumed = Module()
    t2 = trainer(args, 15, [ModelCheckpoint(dirpath=ckpt_dir, monitor="train_loss", save_top_k=2,
                                            every_n_train_steps=3, save_last="link")])
    datamodule = DataModule()
    t2.fit(resumed, datamodule=datamodule, ckpt_path="last")
    result.update(resumed_from=str(t2.ckpt_path), resumed_step=t2.global_step,
                  seen_after_resume=float(resumed.seen.compute()), cache_loaded_from=resumed.cache.loaded_from,
                  latest=str(find_latest_checkpoint(ckpt_dir)), dm_epochs_after_resume=datamodule.epochs_started.count)
    write(args.out, t.global_rank, result)


def bad_declaration(args: argparse.Namespace) -> None:
    t = trainer(args, 4, [ModelCheckpoint(dirpath=args.out / "checkpoints", every_n_train_steps=2)])
    try:
        t.fit(Module(components="bad"), train_dataloaders=loader())
        outcome = {"error": None}
    except Exception as exc:  # the test checks the type and the message
        outcome = {"error": f"{type(exc).__name__}: {exc}", "global_step": t.global_step}
    write(args.out, t.global_rank, outcome)


def spawn(args: argparse.Namespace) -> None:
    # Passing tensors to the spawned workers by file descriptor fails in some sandboxes (ours included).
    torch.multiprocessing.set_sharing_strategy("file_system")
    t = trainer(args, 6, [ModelCheckpoint(dirpath=args.out / "checkpoints", every_n_train_steps=6)],
                strategy=SharingStrategy(start_method="spawn"))
    module = Module()
    t.fit(module, train_dataloaders=loader())
    # Back in the parent: the module holds the worker's final weights, read through SharingCheckpointIO.
    from safetensors.torch import load_file

    latest = find_latest_checkpoint(args.out / "checkpoints")
    saved = load_file(latest / "model-00001-of-00001.safetensors")
    equal = all(torch.equal(saved[f"net.{k}"], v) for k, v in module.net.state_dict().items())
    write(args.out, 0, {"parent_weights_equal_saved": equal, "keys": sorted(saved)})


def nodes(args: argparse.Namespace) -> None:
    ckpt_dir = args.out / "checkpoints"
    module = Module()
    t = trainer(args, 4 if not args.resume else 6, [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2,
                                                                    save_top_k=-1)])
    t.fit(module, train_dataloaders=loader(), ckpt_path=find_latest_checkpoint(ckpt_dir) if args.resume else None)
    write(args.out, t.global_rank, {"node": module.cache.node, "loaded_from": module.cache.loaded_from,
                                    "global_step": t.global_step, "world_size": t.world_size})


class StartStep(pl.Callback):
    """Records the global step training (re)starts at."""

    step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = trainer.global_step


def fallback(args: argparse.Namespace) -> None:
    ckpt_dir = args.out / "checkpoints"
    t = trainer(args, 10, [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=5, save_top_k=-1, save_last=True)])
    t.fit(Module(), train_dataloaders=loader())
    if t.is_global_zero:  # damage last.ckpt (a copy of the step-10 checkpoint): one flipped byte
        shard = ckpt_dir / "last.ckpt" / "model-00001-of-00001.safetensors"
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    t.strategy.barrier()
    result: dict[str, Any] = {}
    def callbacks() -> list:  # "last" is looked up in the ModelCheckpoint's directory
        return [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=50, save_top_k=-1)]

    try:
        trainer(args, 12, callbacks()).fit(Module(), train_dataloaders=loader(), ckpt_path="last")
        result["default_error"] = None
    except Exception as exc:  # the test checks type and message
        result["default_error"] = f"{type(exc).__name__}: {exc}"
    start = StartStep()
    t3 = trainer(args, 12, [*callbacks(), start], strategy=SharingStrategy(fallback=True))
    t3.fit(Module(), train_dataloaders=loader(), ckpt_path="last")
    result.update(fallback_start_step=start.step, fallback_step=t3.global_step, fallback_ckpt_path=str(t3.ckpt_path))
    write(args.out, t3.global_rank, result)


def async_retention(args: argparse.Namespace) -> None:
    ckpt_dir = args.out / "checkpoints"

    def keep_last_two() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=2, save_top_k=2,
                               monitor="step", mode="max")

    t = trainer(args, 10, [keep_last_two()], strategy=SharingStrategy(async_save=True))
    t.fit(Module(), train_dataloaders=loader())
    # fit() returned: every save it started is committed, and rank 0's removals behind them are done.
    t.strategy.barrier()
    after_first = sorted(p.name for p in ckpt_dir.iterdir())
    resumed = trainer(args, 14, [keep_last_two(), start := StartStep()], strategy=SharingStrategy(async_save=True))
    resumed.fit(Module(), train_dataloaders=loader(), ckpt_path=ckpt_dir / "step=8.ckpt")
    resumed.strategy.barrier()
    write(args.out, t.global_rank, {
        "after_first": after_first, "after_resume": sorted(p.name for p in ckpt_dir.iterdir()),
        "resumed_at": start.step, "global_step": resumed.global_step,
        "latest": str(find_latest_checkpoint(ckpt_dir)),
    })


class Frozen(pl.LightningModule):
    """A frozen backbone (about 97% of the weights) and a trainable head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(*[nn.Linear(4 if i == 0 else 64, 64) for i in range(4)])
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(64, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.head(self.backbone(x)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.head.parameters(), lr=0.01)


def incremental(args: argparse.Namespace) -> None:
    ckpt_dir = args.out / "checkpoints"

    def keep_last_two() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=2, save_top_k=2,
                               monitor="step", mode="max")

    t = trainer(args, 10, [keep_last_two()], strategy=SharingStrategy(incremental=True, async_save=True))
    t.fit(Frozen(), train_dataloaders=loader())
    t.strategy.barrier()
    kept = sorted(p.name for p in ckpt_dir.iterdir())
    origins = {name: {f.path: f.origin for f in CheckpointManifest.load(ckpt_dir / name).all_files()}
               for name in kept}
    resumed = trainer(args, 12, [start := StartStep()], strategy=SharingStrategy(incremental=True))
    resumed.fit(Frozen(), train_dataloaders=loader(), ckpt_path=ckpt_dir / "step=10.ckpt")
    write(args.out, t.global_rank, {"kept": kept, "origins": origins, "resumed_at": start.step,
                                    "global_step": resumed.global_step})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["features", "bad-declaration", "spawn", "nodes", "fallback",
                                         "async-retention", "incremental"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(3)
    modes = {"features": features, "bad-declaration": bad_declaration, "spawn": spawn, "nodes": nodes,
             "fallback": fallback, "async-retention": async_retention, "incremental": incremental}
    modes[args.mode](args)


if __name__ == "__main__":
    main()

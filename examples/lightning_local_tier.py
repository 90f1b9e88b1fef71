"""The local tier with Lightning: kill every process, wipe a node's disk, resume from a peer's replica.

    python examples/lightning_local_tier.py demo --out runs/local_tier

``demo`` runs the whole sequence on this machine, as two simulated nodes (two ``torchrun --nnodes=2`` agents of one
CPU process each, joined over loopback):

1. train 10 steps uninterrupted (the reference);
2. train again, SIGKILL every process after step 6: the local tier holds step 6 (``every_n_steps=2``) on both
   nodes, each node's files also on the other node, and the persistent ``ModelCheckpoint`` holds step 5;
3. delete node 1's local directory (a node replaced by a machine with an empty disk) and resume with
   ``fit(ckpt_path="last")``: step 6 is restored, node 1's state from node 0's replica, and the run ends bit-exact
   with the reference.

The only lines about the tier are ``SharingStrategy(local_tier=LocalTier(OUT/local/{node}, every_n_steps=2))``:
``{node}`` keeps the simulated nodes' directories apart. ``run`` (what each torchrun agent executes) takes
``--kill-at N`` (SIGKILL after step N's hooks, its local save included), ``--resume`` and ``--async-save`` (the
strategy's ``async_save=True``: local and persistent saves are staged and written behind training; ``--kill-at``
then waits for them first, a crash right after they completed); each rank writes ``OUT/final-rank{r}.pt`` with its
final model, optimizer, RNG and last batches for the comparison.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_sharing import LocalTier, SharingStrategy


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 1))
        self.loss_mean = torchmetrics.MeanMetric()  # this rank's running mean: saved and restored per rank,
        self.loss_mean.persistent(True)  # as a state of the module (torchmetrics' default keeps it out of it)
        self.seen: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen.append(float(x.sum()))
        loss = nn.functional.mse_loss(self.net(x), y)
        self.loss_mean.update(loss.detach())
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5)}


class KillAt(Callback):
    """SIGKILL this process at the start of the batch after step ``step`` (every hook of that step has run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            trainer.strategy.checkpoint_io.wait()  # background saves of step N done (per rank; no-op when sync)
            os.kill(os.getpid(), signal.SIGKILL)


def run(args: argparse.Namespace) -> None:
    """One rank's training (under torchrun)."""
    pl.seed_everything(7)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    loader = StatefulDataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4,
                                shuffle=True)
    callbacks: list[Any] = [ModelCheckpoint(dirpath=args.out / "checkpoints", every_n_train_steps=5, save_top_k=-1,
                                            save_last=True)]
    if args.kill_at is not None:
        callbacks.append(KillAt(args.kill_at))
    strategy = SharingStrategy(local_tier=LocalTier(str(args.out / "local" / "{node}"), every_n_steps=2),
                               async_save=args.async_save)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, num_nodes=2, max_steps=args.max_steps,
                         callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    module = Module()
    trainer.fit(module, train_dataloaders=loader, ckpt_path="last" if args.resume else None)
    optimizer = trainer.optimizers[0]
    torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict(), "step": trainer.global_step,
                "rng": torch.get_rng_state(), "seen": module.seen[-3:], "ckpt_path": str(trainer.ckpt_path),
                "metric": {"mean_value": module.loss_mean.mean_value, "weight": module.loss_mean.weight},
                "lr": optimizer.param_groups[0]["lr"]}, args.out / f"final-rank{trainer.global_rank}.pt")


def launch(out: Path, *extra: str) -> list[int]:
    """Both simulated nodes' torchrun agents (one process each); their exit codes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                                "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", __file__,
                                "run", "--out", str(out), *extra]) for node in (0, 1)]
    return [agent.wait() for agent in agents]


def demo(args: argparse.Namespace) -> None:
    """The kill / wipe / restore sequence (see the module docstring)."""
    reference, run_dir = args.out / "reference", args.out / "killed"
    shutil.rmtree(args.out, ignore_errors=True)
    assert launch(reference) == [0, 0], "the reference run failed"
    print("killing every process after step 6 ...")
    assert all(code != 0 for code in launch(run_dir, "--kill-at", "6")), "the run was expected to be killed"
    shutil.rmtree(run_dir / "local" / "1")
    print("node 1's local directory deleted; resuming with ckpt_path='last' ...")
    assert launch(run_dir, "--resume") == [0, 0], "the resumed run failed"
    for rank in (0, 1):
        want = torch.load(reference / f"final-rank{rank}.pt", weights_only=True)
        got = torch.load(run_dir / f"final-rank{rank}.pt", weights_only=True)
        same = all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])
        print(f"rank {rank}: resumed from {got['ckpt_path']!r}; weights bit-exact with the reference: {same}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["demo", "run"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--max-steps", type=int, default=10)
    args = parser.parse_args()
    (demo if args.mode == "demo" else run)(args)


if __name__ == "__main__":
    main()

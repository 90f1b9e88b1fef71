"""Train, checkpoint and resume a Lightning Fabric DDP run with lightning_sharing (2 processes on CPU, gloo).

The training loop is Fabric's ordinary one: ``fabric.setup_dataloaders(StatefulDataLoader(ds, shuffle=True))``,
``for batch in loader``, ``fabric.save(path, state)`` and ``fabric.load(find_latest_checkpoint(dir), state)``, with
no sampler or generator of its own. Fabric's own launcher starts the second process (it re-runs this script), so
plain ``python`` is enough. Kill a run after step 7 (checkpoints every 3 steps, so the newest is step 6), then
resume it:

    python examples/fabric_ddp.py --out /tmp/fabric-demo --steps 12 --save-every 3 --kill-after 7
    python examples/fabric_ddp.py --out /tmp/fabric-demo --steps 12 --save-every 3 --resume

Each rank prints a FINAL digest of its model, optimizer, scheduler, metric, epoch and RNG; they equal those of one
uninterrupted run (``--out /tmp/fabric-ref --steps 12 --save-every 3``): resuming is bit-exact, across epochs too
(5 batches per epoch here). The script runs unchanged under ``fabric run --accelerator=cpu --devices=2
examples/fabric_ddp.py ...`` and ``torchrun --nproc_per_node=2 examples/fabric_ddp.py ...`` (``fabric.launch()``
then only finishes the setup). It needs torchdata (``pip install torchdata``) for its StatefulDataLoader.

What FabricSharingStrategy makes of the state dict passed to ``fabric.save`` / ``fabric.load``:
    model                REPLICATED, validated  DDP keeps it identical on every rank: one copy, checked first.
    optimizer, scheduler REPLICATED             identical on every rank: one copy.
    loader               PER_RANK               a DataLoader with state_dict(): each rank is at its own position
                                                in its own shard of the data, with Fabric's epoch counter.
    metric               PER_RANK               a torchmetrics Metric accumulates this rank's values only (its raw
                                                state is saved, unsynced, as lightning_sharing.MetricState).
    step, epoch          GLOBAL ("extra")       plain values, equal everywhere: rank 0 writes them.
    rng (automatic)      PER_RANK               each rank's dropout masks come from its own generators.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchmetrics.aggregation import MeanMetric

from lightning_sharing import find_latest_checkpoint
from lightning_sharing.fabric.strategy import FabricSharingStrategy

# Upstream deprecation notices on torch 2.13 (torchdata's set_vital, Lightning's pytree helper): not ours, and
# nothing to act on in this example. Silenced here only, in the example; the library itself adds no warnings.
warnings.filterwarnings("ignore", message=r".*'set_vital' is deprecated")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")

SEED, SAMPLES, FEATURES, BATCH = 1234, 40, 8, 4  # 2 ranks: 5 batches per epoch per rank


def digest(state: dict[str, Any]) -> str:
    """A hash of every tensor and number in ``state``, to compare runs at a glance."""
    h = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                h.update(str(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                feed(item)
        else:
            h.update(repr(value).encode())

    feed(state)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="run directory (checkpoints go to OUT/checkpoints)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--stop-after", type=int, default=None, help="exit after this step, as if the job ended")
    parser.add_argument("--kill-after", type=int, default=None, help="SIGKILL every process after this step")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    args = parser.parse_args()

    # DDPStrategy's arguments plus the sharing options; rng=True (the default) adds each rank's RNG state.
    fabric = Fabric(accelerator="cpu", devices=2, strategy=FabricSharingStrategy(process_group_backend="gloo"))
    fabric.launch()  # under `fabric run` or torchrun the processes exist already: this only finishes the setup
    rank = fabric.global_rank
    fabric.seed_everything(SEED + rank, verbose=False)  # per-rank generators (DDP broadcasts rank 0's weights)

    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)

    data = torch.Generator().manual_seed(SEED)  # the dataset itself is the same on every rank
    inputs = torch.randn(SAMPLES, FEATURES, generator=data)
    dataset = TensorDataset(torch.arange(SAMPLES), inputs, inputs.sum(dim=1, keepdim=True))
    # The ordinary Fabric way: Fabric gives each rank its shard and sets the shuffle's epoch at every iter().
    loader = fabric.setup_dataloaders(StatefulDataLoader(dataset, batch_size=BATCH, shuffle=True))
    metric = MeanMetric()

    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "loader": loader, "metric": metric,
             "step": 0, "epoch": 0}
    ckpt_dir = args.out / "checkpoints"
    if args.resume:
        latest = find_latest_checkpoint(ckpt_dir)  # the same on every rank on a shared filesystem
        if latest is not None:
            fabric.load(latest, state)  # restores everything in place, state["step"] and state["epoch"] too
            fabric.print(f"resumed from {latest} at step {state['step']}")

    model.train()
    seen = hashlib.sha256()  # the samples this rank trained on, in order
    while state["step"] < args.steps:
        for ids, x, y in loader:  # a resumed epoch continues where the checkpoint left it
            seen.update(ids.numpy().tobytes())
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
            scheduler.step()
            metric.update(loss.detach())  # this rank's losses only: different on every rank
            state["step"] += 1
            if state["step"] % args.save_every == 0:
                fabric.save(ckpt_dir / f"step={state['step']}.ckpt", state)  # every rank calls it
                fabric.print(f"saved step={state['step']}.ckpt")
            if state["step"] == args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # a crash: no cleanup at all
            if state["step"] == args.stop_after:
                fabric.print(f"stopping after step {state['step']} (resume with --resume)")
                return
            if state["step"] == args.steps:
                break
        else:
            state["epoch"] += 1  # this rank's shard is done: the next iter(loader) shuffles anew

    final = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "metric": [metric.mean_value, metric.weight, metric.update_count], "epoch": state["epoch"],
             "rng": torch.get_rng_state()}
    # One write per line: the two ranks share the terminal. SEEN hashes the samples since the (re)start.
    sys.stdout.write(f"rank {rank} FINAL {digest(final)}\nrank {rank} SEEN {seen.hexdigest()}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()  # the strategy destroys the process group it created at exit: no destroy_process_group() needed

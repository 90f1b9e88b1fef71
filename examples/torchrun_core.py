"""Checkpoint a plain DDP training run with lightning_sharing (no Lightning), using all five sharing patterns.

Interrupt a run after step 7 (checkpoints every 3 steps, so the newest is step 6), then resume it:

    torchrun --nproc_per_node=2 examples/torchrun_core.py --out /tmp/demo --steps 12 --save-every 3 --stop-after 7
    torchrun --nproc_per_node=2 examples/torchrun_core.py --out /tmp/demo --steps 12 --save-every 3 --resume

The FINAL line equals that of one uninterrupted run (``--out /tmp/demo-ref --steps 12 --save-every 3``): resuming
is bit-exact. Two simulated nodes on one machine (run each line in its own shell, same port):

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=1 --master_addr=127.0.0.1 --master_port=29512 \
        examples/torchrun_core.py --out /tmp/demo-nodes --steps 4 --save-every 2
    torchrun --nnodes=2 --node_rank=1 --nproc_per_node=1 --master_addr=127.0.0.1 --master_port=29512 \
        examples/torchrun_core.py --out /tmp/demo-nodes --steps 4 --save-every 2

What is declared, and why:
    model, optimizer, scheduler  REPLICATED  DDP keeps them identical on every rank, so one copy is written.
    rng                          PER_RANK    each rank draws its own dropout masks and shuffles.
    data                         PER_GROUP   one read position per data replica (group "replica"); a replica is
                                             one rank here, but all the stages of one pipeline in a DP x PP job.
    progress                     GLOBAL      step and loss sum, equal everywhere: rank 0 writes, all read.
    node_cache                   PER_NODE    node-local state: each node's local rank 0 writes its own copy.
"""

import argparse
import datetime
import hashlib
import os
import random
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_sharing import (
    CheckpointCoordinator,
    RNGState,
    SharingPattern,
    StateComponent,
    ValidationLevel,
    find_latest_checkpoint,
)

SEED, DATASET_SIZE, FEATURES, BATCH = 1234, 64, 16, 8  # 2 ranks: 4 batches per epoch per rank


def log(message: str) -> None:
    if dist.get_rank() == 0:  # one voice for the whole job
        print(message, flush=True)


class ShardSampler:
    """This rank's walk over its shard of the data. The shuffle comes from the (per-rank, checkpointed) torch RNG;
    the order and position live here, so a resumed run continues mid-epoch with exactly the next batch."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.shard = torch.arange(rank, DATASET_SIZE, world_size)
        self.epoch, self.offset, self.order = 0, 0, torch.empty(0, dtype=torch.long)

    def next_indices(self) -> torch.Tensor:
        if self.offset + BATCH > len(self.order):  # the epoch is over (or is the first): reshuffle
            if len(self.order):
                self.epoch += 1
            self.order, self.offset = self.shard[torch.randperm(len(self.shard))], 0
        indices = self.order[self.offset:self.offset + BATCH]
        self.offset += BATCH
        return indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset, self.order = int(state["epoch"]), int(state["offset"]), state["order"]


class Progress:
    """Trainer progress: identical on every rank (the loss is all-reduced), so GLOBAL."""

    def __init__(self) -> None:
        self.step, self.loss_sum = 0, 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "loss_sum": self.loss_sum}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.loss_sum = int(state["step"]), float(state["loss_sum"])


class NodeCache:
    """Stands for node-local state (a dataset copy on local disk, a compile cache). It records the node it was made
    on and refuses another node's copy, which proves that PER_NODE hands every node its own file."""

    def __init__(self) -> None:
        self.node = int(os.environ.get("GROUP_RANK", 0))  # torchrun's node rank
        self.host, self.loaded_from = socket.gethostname(), None

    def state_dict(self) -> dict:
        return {"node": self.node, "host": self.host}

    def load_state_dict(self, state: dict) -> None:
        if state["node"] != self.node:  # raised on one rank, reported on all ranks by the coordinator
            raise RuntimeError(f"node {self.node} was given the cache of node {state['node']}")
        self.loaded_from = state["node"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoints go to OUT/checkpoints")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--stop-after", type=int, default=0, help="exit right after this step (a crash)")
    parser.add_argument("--resume", action="store_true", help="resume from the newest complete checkpoint")
    args = parser.parse_args()

    # A timeout turns a hang into an error; gloo runs on CPU.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # new_group is collective: every rank creates every group in the same order, then keeps the one it is in.
    replica_group = [dist.new_group([r]) for r in range(world_size)][rank]

    torch.manual_seed(SEED)  # identical initial weights everywhere (DDP would also broadcast rank 0's)
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    ddp_model = DistributedDataParallel(model)  # averages gradients, so the replicas stay identical
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    # The synthetic dataset comes from its own generator: the same on every rank and in every run.
    data_rng = torch.Generator().manual_seed(SEED)
    inputs = torch.randn(DATASET_SIZE, FEATURES, generator=data_rng)
    teacher = torch.randn(FEATURES, 1, generator=data_rng) / FEATURES**0.5
    targets = inputs @ teacher + 0.1 * torch.randn(DATASET_SIZE, 1, generator=data_rng)
    # From here each rank draws its own random numbers. Seed every generator RNGState saves, so a fresh run is
    # reproducible too (Python's `random` is otherwise seeded from the OS).
    random.seed(SEED + rank)
    np.random.seed(SEED + rank)
    torch.manual_seed(SEED + rank)

    sampler, progress, cache = ShardSampler(rank, world_size), Progress(), NodeCache()
    coordinator = CheckpointCoordinator(
        [
            StateComponent("model", model, SharingPattern.REPLICATED, validate_replication=True,
                           validation_level=ValidationLevel.TENSOR),
            StateComponent("optimizer", optimizer, SharingPattern.REPLICATED),
            StateComponent("scheduler", scheduler, SharingPattern.REPLICATED),
            StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
            StateComponent("data", sampler, SharingPattern.PER_GROUP, process_group_name="replica"),
            StateComponent("progress", progress, SharingPattern.GLOBAL),
            StateComponent("node_cache", cache, SharingPattern.PER_NODE),
        ],
        process_groups={"replica": replica_group},  # this rank's group for each name
    )

    checkpoints = args.out / "checkpoints"
    if args.resume:
        # Rank 0 picks the checkpoint and tells the others, so all ranks load the same one.
        chosen = [str(find_latest_checkpoint(checkpoints) or "") if rank == 0 else None]
        dist.broadcast_object_list(chosen, src=0)
        if chosen[0]:
            coordinator.load_checkpoint(chosen[0])  # collective; loads model weights in place under DDP
            log(f"resumed from {chosen[0]} at step {progress.step} (node caches loaded per node)")
        else:
            log(f"no complete checkpoint in {checkpoints}; starting from scratch")

    while progress.step < args.steps:
        batch = sampler.next_indices()
        loss = nn.functional.mse_loss(ddp_model(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        mean_loss = loss.detach() / world_size
        dist.all_reduce(mean_loss)  # the mean over ranks, the same number everywhere: progress stays GLOBAL
        progress.loss_sum += mean_loss.item()
        progress.step += 1
        if progress.step % args.save_every == 0 or progress.step == args.steps:
            path = coordinator.save_checkpoint(checkpoints / f"step={progress.step}.ckpt", step=progress.step)
            log(f"step {progress.step}: loss {mean_loss.item():.5f}, saved {path}")
        if progress.step == args.stop_after:
            log(f"stopping after step {progress.step} without saving it (simulated interruption)")
            dist.barrier()  # leave together: tearing gloo down while a peer still uses it can hang the exit
            dist.destroy_process_group()
            return

    # Every rank writes its own final weights so a test can compare them; rank 0 prints their digest.
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, str(args.out / f"final-rank{rank}.safetensors"),
              metadata={"node": str(cache.node), "cache_loaded_from_node": str(cache.loaded_from),
                        "loss_sum": repr(progress.loss_sum)})
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in weights.values())).hexdigest()
    log(f"FINAL {digest}")
    dist.barrier()  # leave together: tearing gloo down while a peer still uses it can hang the exit
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

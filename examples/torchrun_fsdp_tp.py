"""FSDP2 x tensor parallel on 4 processes (2 data parallel x 2 tensor parallel), checkpointed as SHARDED state.

Run, kill it (here: SIGKILL of rank 1 in the middle of its second save), resume from the newest complete
checkpoint; the FINAL line equals that of an uninterrupted run (resuming is bit-exact):

    torchrun --nproc_per_node=4 examples/torchrun_fsdp_tp.py --out /tmp/fsdp-tp --steps 6 --save-every 2
    LIGHTNING_SHARING_FAULTS="save:written@1:kill#2" \
        torchrun --nproc_per_node=4 examples/torchrun_fsdp_tp.py --out /tmp/fsdp-tp2 --steps 6 --save-every 2
    torchrun --nproc_per_node=4 examples/torchrun_fsdp_tp.py --out /tmp/fsdp-tp2 --steps 6 --save-every 2 --resume

The last save also writes the full weights as Hugging Face safetensors (``--export-hf``), every rank writing
its share of the files. The checkpoint loads anywhere: another mesh, another world size, one plain process:

    lightning-sharing inspect /tmp/fsdp-tp/checkpoints/step=6.ckpt      # the chunks each rank wrote
    lightning-sharing export /tmp/fsdp-tp/checkpoints/step=6.ckpt /tmp/fsdp-tp/hf-bf16 --dtype bfloat16

What is declared, and why:
    model      SHARDED    its parameters are DTensors: FSDP2 shards them over "dp", tensor parallelism over "tp";
                          each rank writes the chunks it holds, replicas along a mesh dim take turns.
    optimizer  SHARDED    OptimizerState keys AdamW's state by parameter name; its moments are DTensors like the
                          parameters, its step counters plain tensors (stored once).
    rng        PER_RANK   each rank's generators.
    progress   GLOBAL     the step, equal everywhere.
"""

import argparse
import datetime
import hashlib
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from lightning_sharing import (
    CheckpointCoordinator,
    HFExport,
    OptimizerState,
    RNGState,
    SharingPattern,
    StateComponent,
    find_latest_checkpoint,
)

SEED, FEATURES, HIDDEN, BATCH = 1234, 16, 30, 8  # 30 hidden rows over 2 x 2 ranks: uneven FSDP shards


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def build_model(mesh) -> nn.Module:
    """The same initial weights on every rank, then tensor parallel over "tp" and FSDP2 over "dp"."""
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, FEATURES), nn.ReLU(),
                          nn.Linear(FEATURES, 1))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    return model


def batch(step: int, dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This data-parallel rank's batch for ``step`` (both tensor-parallel ranks of a replica get the same)."""
    generator = torch.Generator().manual_seed(SEED * 1000 + step * 10 + dp_rank)
    inputs = torch.randn(BATCH, FEATURES, generator=generator)
    return inputs, inputs.sum(dim=1, keepdim=True).sin()


class Progress:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def full_tensors(state: dict) -> dict[str, torch.Tensor]:
    """Every tensor whole (full_tensor() is a collective: every rank calls it, in the same order)."""
    return {name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()
            for name, value in sorted(state.items()) if isinstance(value, torch.Tensor)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoints go to OUT/checkpoints")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="resume from the newest complete checkpoint")
    parser.add_argument("--export-hf", action="store_true", help="the last save also writes OUT/hf")
    args = parser.parse_args()

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = build_model(mesh)
    # Seed every generator RNGState saves, per rank, so a fresh run is reproducible (and so is its checkpoint).
    random.seed(SEED + dist.get_rank())
    np.random.seed(SEED + dist.get_rank())
    torch.manual_seed(SEED + dist.get_rank())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    progress = Progress()
    coordinator = CheckpointCoordinator([
        StateComponent("model", model, SharingPattern.SHARDED),
        StateComponent("optimizer", OptimizerState(model, optimizer), SharingPattern.SHARDED),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
        StateComponent("progress", progress, SharingPattern.GLOBAL),
    ])

    checkpoints = args.out / "checkpoints"
    if args.resume:
        chosen = [str(find_latest_checkpoint(checkpoints) or "") if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(chosen, src=0)  # every rank loads the same checkpoint
        if chosen[0]:
            coordinator.load_checkpoint(chosen[0])  # collective; reads each rank's pieces into its DTensors
            log(f"resumed from {chosen[0]} at step {progress.step}")

    dp_rank = mesh["dp"].get_local_rank()
    while progress.step < args.steps:
        inputs, targets = batch(progress.step, dp_rank)
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        progress.step += 1
        if progress.step % args.save_every == 0 or progress.step == args.steps:
            last = progress.step == args.steps
            export = HFExport(args.out / "hf", max_shard_size="2KB") if last and args.export_hf else None
            path = coordinator.save_checkpoint(checkpoints / f"step={progress.step}.ckpt", step=progress.step,
                                               export_hf=export)
            log(f"step {progress.step}: loss {loss.item():.6f}, saved {path}")

    weights = full_tensors(model.state_dict())
    state = full_tensors(OptimizerState(model, optimizer).state_dict())
    if dist.get_rank() == 0:
        save_file(weights, str(args.out / "final-model.safetensors"))
        save_file(state, str(args.out / "final-optimizer.safetensors"))
        digest = hashlib.sha256()
        for name, tensor in [*weights.items(), *state.items()]:
            digest.update(name.encode() + tensor.numpy().tobytes())
        print(f"FINAL {digest.hexdigest()}", flush=True)
    dist.barrier()  # leave together: tearing gloo down while a peer still uses it can hang the exit
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

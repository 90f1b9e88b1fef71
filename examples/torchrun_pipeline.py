"""Pipeline parallel (torch.distributed.pipelining) on 4 processes, 2 data parallel x 2 pipeline stages.

Ranks form the mesh [[0, 1], [2, 3]] of ("dp", "pp"): ranks 0 and 2 run stage 0 (layers 0-1), ranks 1 and 3
stage 1 (layers 2-3); each pipeline is fed by a GPipe schedule with 2 microbatches, and the gradients of a
stage are averaged over its "dp" group. Run, kill it with SIGKILL after step 3, resume; the final weights
and optimizer state equal those of an uninterrupted run (resuming is bit-exact):

    torchrun --nproc_per_node=4 examples/torchrun_pipeline.py --out /tmp/pp --steps 6 --save-every 2
    torchrun --nproc_per_node=4 examples/torchrun_pipeline.py --out /tmp/pp2 --steps 6 --save-every 2 --kill-after 3
    torchrun --nproc_per_node=4 examples/torchrun_pipeline.py --out /tmp/pp2 --steps 6 --save-every 2 --resume

The checkpoint's ``model.safetensors.index.json`` covers both stages (every stage tensor is stored whole,
under its own name), and the same checkpoint loads into the unsplit model in one process (``--unsplit``,
no torchrun):

    python examples/torchrun_pipeline.py --out /tmp/pp --unsplit

What is declared, and why:
    model, optimizer  SHARDED with process_group_name="dp": the ranks of one "dp" group hold the same stage
                      (its replicas), the two groups hold different stages whose tensors have different names.
                      Each stage tensor is written once, the writing spread over its replicas, and the state
                      loads under any layout: the same mesh, other stage boundaries, one unsplit process.
                      PER_GROUP would also keep the stages apart, but its leader writes the whole stage and
                      its copies only load into the same groups: not into the unsplit model.
    rng               PER_RANK
    progress          GLOBAL     the step, equal everywhere.
"""

import argparse
import datetime
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from lightning_sharing import (
    CheckpointCoordinator,
    OptimizerState,
    RNGState,
    SharingPattern,
    StateComponent,
    find_latest_checkpoint,
)

SEED, WIDTH, LAYERS, BATCH, MICROBATCHES = 1234, 12, 4, 8, 2


class Net(nn.Module):
    """The whole model; a stage keeps only its layers, under their original names (``layers.2.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): nn.Linear(WIDTH, WIDTH) for i in range(LAYERS)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = torch.tanh(layer(x))
        return x


def stage_module(stage: int, stages: int) -> Net:
    torch.manual_seed(SEED)  # the same full model everywhere, then each stage drops the layers it does not run
    net = Net()
    per_stage = LAYERS // stages
    for i in range(LAYERS):
        if i // per_stage != stage:
            del net.layers[str(i)]
    return net


def batch(step: int, dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED * 1000 + step * 10 + dp_rank)
    inputs = torch.randn(BATCH, WIDTH, generator=generator)
    return inputs, torch.roll(inputs, 1, dims=1).sin()


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)


class Progress:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def declare(model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress, group: str | None):
    return [
        StateComponent("model", model, SharingPattern.SHARDED, process_group_name=group),
        StateComponent("optimizer", OptimizerState(model, optimizer), SharingPattern.SHARDED,
                       process_group_name=group),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
        StateComponent("progress", progress, SharingPattern.GLOBAL),
    ]


def final_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"optimizer.{k}": v for k, v in OptimizerState(model, optimizer).state_dict().items()
                  if isinstance(v, torch.Tensor)})
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def unsplit(args: argparse.Namespace) -> None:
    """One process, no torch.distributed: the newest checkpoint into the whole model and its optimizer."""
    checkpoint = find_latest_checkpoint(args.out / "checkpoints")
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    progress = Progress()
    components = [c for c in declare(model, optimizer, progress, None) if c.key != "rng"]
    result = CheckpointCoordinator(components).load_checkpoint(checkpoint, strict=False)  # rng: PER_RANK, skipped
    save_file(final_state(model, optimizer), str(args.out / "unsplit.safetensors"))
    print(f"loaded {checkpoint} into the unsplit model at step {progress.step}: {result.loaded}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoints go to OUT/checkpoints")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--kill-after", type=int, default=0, help="SIGKILL every rank right after this step")
    parser.add_argument("--resume", action="store_true", help="resume from the newest complete checkpoint")
    parser.add_argument("--unsplit", action="store_true", help="load the newest checkpoint in one process")
    args = parser.parse_args()
    if args.unsplit:
        unsplit(args)
        return

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    stage, stages = mesh["pp"].get_local_rank(), mesh["pp"].size()
    dp_rank, dp_group = mesh["dp"].get_local_rank(), mesh["dp"].get_group()
    model = stage_module(stage, stages)
    # Seed every generator RNGState saves, per rank, so a fresh run is reproducible (and so is its checkpoint).
    random.seed(SEED + dist.get_rank())
    np.random.seed(SEED + dist.get_rank())
    torch.manual_seed(SEED + dist.get_rank())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = ScheduleGPipe(PipelineStage(model, stage, stages, torch.device("cpu"), group=mesh["pp"].get_group()),
                             n_microbatches=MICROBATCHES, loss_fn=loss_fn)
    progress = Progress()
    coordinator = CheckpointCoordinator(declare(model, optimizer, progress, "dp"), process_groups=mesh)

    checkpoints = args.out / "checkpoints"
    if args.resume:
        chosen = [str(find_latest_checkpoint(checkpoints) or "") if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(chosen, src=0)
        if chosen[0]:
            coordinator.load_checkpoint(chosen[0])  # each rank reads its own stage's tensors
            if dist.get_rank() == 0:
                print(f"resumed from {chosen[0]} at step {progress.step}", flush=True)

    while progress.step < args.steps:
        inputs, targets = batch(progress.step, dp_rank)
        if stage == 0:
            schedule.step(inputs)
        else:
            schedule.step(target=targets)
        for parameter in model.parameters():  # average the stage's gradients over its replicas
            dist.all_reduce(parameter.grad, group=dp_group)
            parameter.grad /= mesh["dp"].size()
        optimizer.step()
        optimizer.zero_grad()
        progress.step += 1
        if progress.step % args.save_every == 0 or progress.step == args.steps:
            path = coordinator.save_checkpoint(checkpoints / f"step={progress.step}.ckpt", step=progress.step)
            if dist.get_rank() == 0:
                print(f"step {progress.step}: saved {path}", flush=True)
        if progress.step == args.kill_after:
            dist.barrier()  # every rank has finished the step; now die as a preempted job would
            os.kill(os.getpid(), signal.SIGKILL)

    save_file(final_state(model, optimizer), str(args.out / f"final-rank{dist.get_rank()}.safetensors"))
    dist.barrier()  # leave together: tearing gloo down while a peer still uses it can hang the exit
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

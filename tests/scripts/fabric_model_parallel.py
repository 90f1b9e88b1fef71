"""Fabric with FabricSharingModelParallelStrategy, for tests/integration/test_fabric_model_parallel.py.

``--phase train`` (torchrun, 2 processes, FSDP2 over 2): 6 steps of AdamW on a module with dropout, ``fabric.save``
at step 3 and dumps of the full state at steps 3 and 6; then, in the same processes, a freshly built and differently
initialised module loads the step-3 checkpoint with ``fabric.load`` and trains steps 4-6 again: its full state must
equal the first run's (RNG included: dropout draws the same masks). ``--phase reshard`` (one process): the step-3
checkpoint loads into a one-process mesh; its full state is dumped. ``--phase ddp`` (torchrun, 2 processes,
FabricSharingStrategy) takes 3 steps and saves OUT/ddp.ckpt; ``--phase from-ddp`` loads it into FSDP2 over 2. Each rank
writes OUT/{phase}-rank{r}.json and .safetensors files named after what they hold.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from safetensors.torch import save_file
from torch import nn

from lightning_sharing import (
    CheckpointManifest,
    FabricSharingModelParallelStrategy,
    FabricSharingStrategy,
    OptimizerState,
)


def parallelize(model: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=mesh["data_parallel"])
    return model


def build(fabric: Fabric, seed: int) -> tuple[Any, Any]:
    torch.manual_seed(seed)
    model = fabric.setup_module(nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Dropout(0.3), nn.Linear(10, 2)))
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=0.02))
    return model, optimizer


def full_state(model: Any, optimizer: Any) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    raw_model, raw_optimizer = model.module, optimizer.optimizer
    state = {f"model.{k}": v for k, v in raw_model.state_dict().items()}
    state.update({f"optimizer.{k}": v for k, v in OptimizerState(raw_model, raw_optimizer).state_dict().items()
                  if isinstance(v, torch.Tensor)})
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone().contiguous()
            for k, v in sorted(state.items())}


def plain_state(model: Any, optimizer: Any) -> dict[str, torch.Tensor]:
    """A DDP module's state named as ``full_state`` names it (the optimizer keyed by parameter name)."""
    raw_model = model.module.module if hasattr(model.module, "module") else model.module
    state = {f"model.{k}": v for k, v in raw_model.state_dict().items()}
    state.update({f"optimizer.{k}": v for k, v in OptimizerState(raw_model, optimizer.optimizer).state_dict().items()
                  if isinstance(v, torch.Tensor)})
    return {k: v.detach().clone().contiguous() for k, v in sorted(state.items())}


def step(fabric: Fabric, model: Any, optimizer: Any, number: int) -> None:
    generator = torch.Generator().manual_seed(100 * number + fabric.global_rank)
    loss = model(torch.randn(4, 6, generator=generator)).pow(2).mean()
    fabric.backward(loss)
    optimizer.step()
    optimizer.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phase", choices=["train", "reshard", "ddp", "from-ddp"], required=True)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.phase == "ddp":
        strategy: Any = FabricSharingStrategy()
    else:
        strategy = FabricSharingModelParallelStrategy(parallelize, data_parallel_size=world, tensor_parallel_size=1)
    fabric = Fabric(accelerator="cpu", devices=world, strategy=strategy)
    fabric.launch()
    rank, out = fabric.global_rank, args.out
    ckpt = out / "step=3.ckpt"
    result: dict[str, Any] = {}
    if args.phase == "train":
        model, optimizer = build(fabric, seed=1)
        for number in range(1, 7):
            step(fabric, model, optimizer, number)
            if number == 3:
                fabric.save(ckpt, {"model": model, "optimizer": optimizer, "step": number})
                save_file(full_state(model, optimizer), out / f"step3-rank{rank}.safetensors")
        save_file(full_state(model, optimizer), out / f"step6-rank{rank}.safetensors")
        model, optimizer = build(fabric, seed=2)
        state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}
        result["remainder"] = fabric.load(ckpt, state)
        result["step"] = state["step"]
        for number in range(4, 7):
            step(fabric, model, optimizer, number)
        save_file(full_state(model, optimizer), out / f"resumed6-rank{rank}.safetensors")
        manifest = CheckpointManifest.load(ckpt)
        result["patterns"] = {k: c.sharing_pattern for k, c in manifest.components.items()}
        result["files"] = {k: sorted([f.path, f.rank] for f in c.files) for k, c in manifest.components.items()}
    elif args.phase == "reshard":
        model, optimizer = build(fabric, seed=3)
        state = {"model": model, "optimizer": optimizer}
        result["remainder"] = fabric.load(ckpt, state, strict=False)
        result["skipped"] = sorted(fabric.strategy.last_load_result.skipped)
        save_file(full_state(model, optimizer), out / f"reshard-rank{rank}.safetensors")
    elif args.phase == "ddp":  # FabricSharingStrategy: the module and its optimizer are saved REPLICATED, whole
        model, optimizer = build(fabric, seed=1)
        for number in range(1, 4):
            step(fabric, model, optimizer, number)
        fabric.save(out / "ddp.ckpt", {"model": model, "optimizer": optimizer, "step": 3})
        save_file(plain_state(model, optimizer), out / f"ddp3-rank{rank}.safetensors")
    else:  # from-ddp: that checkpoint into FSDP2 over the same 2 processes
        model, optimizer = build(fabric, seed=2)
        state = {"model": model, "optimizer": optimizer, "step": 0}
        result["remainder"] = fabric.load(out / "ddp.ckpt", state)
        result["step"] = state["step"]
        save_file(full_state(model, optimizer), out / f"from-ddp-rank{rank}.safetensors")
    (out / f"{args.phase}-rank{rank}.json").write_text(json.dumps(result, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

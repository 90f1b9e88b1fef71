"""Tiny models, layouts and helpers for the SHARDED tests (run inside run_distributed workers).

The model has a dim that no mesh divides (7 rows), a 1-row layer (empty shards on most ranks) and,
under FSDP x TP, one layer that tensor parallelism leaves alone (a DTensor on the dp slice only,
held again by the other tp rank).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

BLOCK = 32  # bytes: small, so that reads start and end inside blocks


def make_model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3), torch.nn.ReLU(),
                               torch.nn.Linear(3, 1))


def fsdp_model(world: int, seed: int = 0) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)))
    return model


def fsdp_tp_model(seed: int = 0) -> torch.nn.Module:
    """FSDP over "dp" x tensor parallel over "tp" on 4 ranks: mesh [[0, 1], [2, 3]]."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = make_model(seed)
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    return model


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(1234)
    for _ in range(steps):
        model(torch.randn(4, 5, generator=generator)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def components(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **model_options: Any) -> list:
    """The model and its optimizer, both SHARDED (the optimizer keyed by FQN through OptimizerState)."""
    from lightning_sharing import SharingPattern, StateComponent
    from lightning_sharing.statefuls.optimizer import OptimizerState

    return [StateComponent("model", model, SharingPattern.SHARDED, **model_options),
            StateComponent("optim", OptimizerState(model, optimizer), SharingPattern.SHARDED)]


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every model and optimizer value whole, by name (``full_tensor()``: a collective, call on every rank)."""
    from torch.distributed.tensor import DTensor

    from lightning_sharing.statefuls.optimizer import OptimizerState

    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"optim.{k}": v for k, v in OptimizerState(model, optimizer).state_dict().items()})
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() if isinstance(v, torch.Tensor)
            else v for k, v in sorted(state.items())}


def differences(live: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """Names whose values differ (tensors by torch.equal), or that only one side has."""
    names = sorted(set(live) | set(reference))
    return [n for n in names if n not in live or n not in reference or not (
        torch.equal(live[n], reference[n]) if isinstance(reference[n], torch.Tensor) else live[n] == reference[n])]


def save_state(root: Path, key: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Every rank: write its chunks, gather the parts, merge; rank 0 writes ``{key}/index.json``."""
    from lightning_sharing.sharded import ShardedIndex, merge_indexes, plan_writes, write_chunks

    rank = dist.get_rank()
    plan = plan_writes(tensors)
    part = write_chunks(root, f"{key}/chunks-{rank:05d}.safetensors", plan, tensors, block_size=BLOCK)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part.to_json())
    index = merge_indexes(ShardedIndex.from_json(p, complete=False) for p in parts)
    if rank == 0:
        (root / key / "index.json").write_text(json.dumps(index.to_json()))
    dist.barrier()
    return {"planned": plan.bytes_by_rank(), "mine": [(w.name, w.box.offsets) for w in plan.mine()],
            "file_bytes": sum(f.size for f in part.files.values())}


def load_index(root: Path, key: str):
    from lightning_sharing.sharded import ShardedIndex

    return ShardedIndex.from_json(json.loads((root / key / "index.json").read_text()))


def raw_read(root: Path, key: str, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Read a component's chunks into ``state`` with the phase-1 functions; what was read."""
    from lightning_sharing.sharded import load_sharded

    stats = load_sharded(root, load_index(root, key), state)
    return {"read": stats.bytes_read, "needed": stats.bytes_needed, "pieces": stats.pieces,
            "files": sorted(stats.bytes_by_file)}

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


def flatten(tree: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Tensors of a nested state by dotted name, and the structure with tensors replaced by their names."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, name: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[name] = node
            return {"__tensor__": name}
        if isinstance(node, dict):
            return {k: walk(v, f"{name}.{k}" if name else str(k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v, f"{name}.{i}" if name else str(i)) for i, v in enumerate(node))
        return node

    return tensors, walk(tree, prefix)


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        return {k: unflatten(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(unflatten(v, tensors) for v in skeleton)
    return skeleton


def full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor whole (``full_tensor()`` of a DTensor: a collective, called on every rank)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in sorted(tensors.items())}


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


def model_and_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """The tensors to save or to read into (model under ``model.``, optimizer under ``optim.``) and the
    optimizer structure."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from lightning_sharing.statefuls.optimizer import OptimizerState

    holder = OptimizerState(model, optimizer)
    optim_tensors, skeleton = flatten(holder.state_dict(), "optim")
    # Keyed like the optimizer state: FQNs without DDP's "module." prefix.
    tensors = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    tensors.update(optim_tensors)
    return tensors, skeleton, holder


def load_into(root: Path, key: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              saved_groups: Any) -> dict[str, Any]:
    """Read a saved model + optimizer into live ones (any layout) and restore the optimizer."""
    from lightning_sharing.sharded import load_sharded

    tensors, skeleton, holder = model_and_optimizer_state(model, optimizer)
    stats = load_sharded(root, load_index(root, key), tensors)
    state = unflatten(skeleton, tensors)
    state["param_groups"] = saved_groups
    holder.load_state_dict(state)
    return {"read": stats.bytes_read, "needed": stats.bytes_needed, "pieces": stats.pieces,
            "files": sorted(stats.bytes_by_file)}

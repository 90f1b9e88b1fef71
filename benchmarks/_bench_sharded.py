"""The SHARDED variants: an FSDP2 model + AdamW, saved and loaded by lightning_sharing and by DCP, also resharded.

The model is the replicated benchmark's stack of ``nn.Linear`` layers, each layer and the whole model wrapped by
``fully_shard`` on a 1-D mesh over every rank, so each rank holds 1/world of every tensor (Shard(0)). lightning_sharing
saves it as two SHARDED components (the model, and the optimizer keyed by FQN through ``OptimizerState``); DCP saves
``get_state_dict(model, optimizer)``, fsynced (``FileSystemWriter`` syncs its files by default). Loads read into the
live sharded tensors, checksums verified for lightning_sharing. The resharded variants load, on this launch's world
size, the checkpoints a smaller world size's launch left behind (``spec["reshard_from"]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _bench_context import Ctx, dcp_load_into, dcp_state
from _bench_state import layer_plan, timed, tree_bytes
from torch import nn

from lightning_sharing import CheckpointCoordinator, OptimizerState, SharingPattern, StateComponent


def build_sharded_state(size_gb: float, world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """An FSDP2-sharded model and AdamW with its moments, the same global values whatever the world size."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    width, layers = layer_plan(size_gb)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    model = nn.Sequential()
    for _ in range(layers):  # one layer at a time: a rank never holds more than one unsharded layer
        layer = nn.Linear(width, width)
        fully_shard(layer, mesh=mesh)
        model.append(layer)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for param in model.parameters():  # creates the moments; zero gradients need no communication
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for param in model.parameters():
        param.grad = None
    return model, optimizer


def sharded_state_bytes(size_gb: float) -> int:
    width, layers = layer_plan(size_gb)
    return width * (width + 1) * layers * 4 * 3


def _coordinator(ctx: Ctx) -> Any:
    return ctx.keep.setdefault("coordinator", CheckpointCoordinator([
        StateComponent("model", ctx.model, SharingPattern.SHARDED),
        StateComponent("optimizer", OptimizerState(ctx.model, ctx.optimizer), SharingPattern.SHARDED),
    ]))


def _keep_for_reshard(ctx: Ctx) -> bool:
    """The last round's checkpoints stay for a larger world size's resharded load."""
    return bool(ctx.spec.get("keep_for_reshard")) and ctx.last_round


def run_ls_save(ctx: Ctx) -> None:
    ctx.record("save", timed(lambda: _coordinator(ctx).save_checkpoint(ctx.path, step=ctx.round)))
    if ctx.rank == 0:
        ctx.info.update(ckpt_bytes=tree_bytes(ctx.path))


def run_ls_load(ctx: Ctx) -> None:
    ctx.record("load", timed(lambda: _coordinator(ctx).load_checkpoint(ctx.path)))
    if not _keep_for_reshard(ctx):
        ctx.remove_on_rank0()


def run_dcp_save(ctx: Ctx) -> None:
    ctx.record("save", timed(lambda: dcp.save(dcp_state(ctx), checkpoint_id=ctx.path)))
    if ctx.rank == 0:
        ctx.info.update(ckpt_bytes=tree_bytes(ctx.path))


def run_dcp_load(ctx: Ctx) -> None:
    ctx.record("load", timed(lambda: dcp_load_into(ctx, ctx.path)))
    if not _keep_for_reshard(ctx):
        ctx.remove_on_rank0()


def _source(ctx: Ctx, name: str) -> Path:
    path = Path(ctx.spec["reshard_from"]) / name
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint {path} to reshard from: run the smaller world size first")
    return path


def run_ls_reshard(ctx: Ctx) -> None:
    path = _source(ctx, "sh_ls.ckpt")
    ctx.record("load", timed(lambda: _coordinator(ctx).load_checkpoint(path)))
    ctx.info["from_world"] = ctx.spec["reshard_world"]


def run_dcp_reshard(ctx: Ctx) -> None:
    path = _source(ctx, "sh_dcp")
    ctx.record("load", timed(lambda: dcp_load_into(ctx, path)))
    ctx.info["from_world"] = ctx.spec["reshard_world"]
    dist.barrier()


RUNNERS = {"sh_ls_save": run_ls_save, "sh_ls_load": run_ls_load, "sh_dcp_save": run_dcp_save,
           "sh_dcp_load": run_dcp_load, "sh_ls_reshard": run_ls_reshard, "sh_dcp_reshard": run_dcp_reshard}

"""What a benchmark variant runs with (``Ctx``) and the DCP state both the replicated and the sharded variants use.

Its own module so that ``_bench_worker`` (the variants) and ``_bench_sharded`` (the sharded ones) both build on it
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _bench_state import remove
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

__all__ = ["CHECKPOINTS", "Ctx", "dcp_load_into", "dcp_state"]

# A variant's checkpoint path, relative to the point's root; a save and the load after it share one.
CHECKPOINTS = {"ls_sync": "ls.ckpt", "ls_load": "ls.ckpt", "lightning_save": "lightning.ckpt",
               "lightning_load": "lightning.ckpt", "dcp_save": "dcp", "dcp_load": "dcp", "raw": "raw",
               "dcp_async": "dcp_async", "sh_ls_save": "sh_ls.ckpt", "sh_ls_load": "sh_ls.ckpt",
               "sh_dcp_save": "sh_dcp", "sh_dcp_load": "sh_dcp"}


@dataclass
class Ctx:
    """What one variant needs: who this rank is, the spec, the shared state, and its own results."""

    rank: int
    world: int
    spec: dict[str, Any]
    variant: str
    state: dict[str, Any]  # shared by every variant of the launch: model, optimizer, facts measured once
    round: int = 0
    times: dict[str, list[float | None]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    keep: dict[str, Any] = field(default_factory=dict)
    memory: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model(self) -> Any:
        return self.state["model"]

    @property
    def optimizer(self) -> Any:
        return self.state["optimizer"]

    @property
    def last_round(self) -> bool:
        return self.round == int(self.spec["repeats"]) - 1

    @property
    def path(self) -> Path:
        return Path(self.spec["root"]) / CHECKPOINTS.get(self.variant, f"{self.variant}.ckpt")

    def record(self, name: str, seconds: float | None) -> None:
        self.times.setdefault(name, []).append(seconds)

    def remove_on_rank0(self, path: Path | None = None) -> None:
        """Delete the checkpoint; the next barrier (every timed block starts with one) orders it before reuse."""
        dist.barrier()  # nobody may still be reading it
        if self.rank == 0:
            remove(path or self.path)



def dcp_state(ctx: Ctx) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(ctx.model, ctx.optimizer)
    return {"model": model_state, "optim": optim_state}


def dcp_load_into(ctx: Ctx, path: Path) -> None:
    state = dcp_state(ctx)
    dcp.load(state, checkpoint_id=path)  # in place
    set_state_dict(ctx.model, ctx.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

"""Whole tensors (a DDP or one-process checkpoint) laid out as the live DTensors are, with no communication.

A REPLICATED checkpoint of a model holds every tensor whole, on every rank's reading. Loading it into a module
sharded with FSDP2 or tensor parallelism means keeping, on each rank, only the box its live DTensor holds
(``layout.local_box``) and wrapping it as a DTensor of the same mesh and placements. Every rank already has the
whole tensor, so nothing is sent.

Example:
    >>> shard_like("w", torch.zeros(4, 3), torch.ones(4, 3), rank=0)  # a plain live tensor: unchanged
    tensor([[0., 0., 0.],
            [0., 0., 0.],
            [0., 0., 0.],
            [0., 0., 0.]])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lightning_sharing.errors import CheckpointError
from lightning_sharing.sharded.dtensor_boxes import is_dtensor, local_box

__all__ = ["shard_like", "shard_state_like"]


def shard_like(name: str, whole: torch.Tensor, like: Any, *, rank: int | None = None) -> Any:
    """``whole`` as a DTensor laid out like the live DTensor ``like`` (this rank's piece); else ``whole`` as is.

    ``rank`` is the global rank (by default this process's). Raises ``CheckpointError`` when the whole tensor's
    shape is not ``like``'s global shape.
    """
    if not is_dtensor(like) or not isinstance(whole, torch.Tensor) or is_dtensor(whole):
        return whole
    from torch.distributed.tensor import DTensor

    if tuple(whole.shape) != tuple(like.shape):
        raise CheckpointError(
            f"tensor {name!r}: the checkpoint holds it whole with shape {tuple(whole.shape)}, but the live DTensor's "
            f"global shape is {tuple(like.shape)}; the checkpoint is of another model"
        )
    if rank is None:
        import torch.distributed as dist

        rank = dist.get_rank()
    local = like.to_local()
    piece = whole[local_box(name, like, rank=rank).slices()].to(device=local.device).contiguous()
    return DTensor.from_local(piece, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def shard_state_like(state: Mapping[str, Any], live: Mapping[str, Any], *, rank: int | None = None) -> dict[str, Any]:
    """Every whole tensor in flat ``state`` whose name holds a DTensor in ``live``, laid out like it."""
    return {name: shard_like(name, value, live.get(name), rank=rank) for name, value in state.items()}

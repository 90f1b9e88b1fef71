"""``ShardedModuleState``: a module whose parameters are DTensors (FSDP2, tensor parallel), as a stateful.

``state_dict()`` is the module's sharded state dict (``torch.distributed.checkpoint.state_dict``: wrapper prefixes
taken off, DTensors where they live), so a SHARDED component reads saved chunks straight into the local pieces;
``load_state_dict`` then sets them with ``set_model_state_dict``. A state of whole tensors (a DDP or one-process
checkpoint, REPLICATED) loads too: each rank keeps the piece its DTensors hold.

Example:
    >>> StateComponent("model", ShardedModuleState(fsdp_model), SharingPattern.SHARDED)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_sharing.sharded.dtensor_boxes import has_dtensors, is_dtensor
from lightning_sharing.sharded.redistribute import shard_state_like

__all__ = ["ShardedModuleState", "has_dtensors"]


class ShardedModuleState:
    """A stateful for a (sharded) module, loaded with ``strict`` as ``set_model_state_dict`` does."""

    def __init__(self, model: torch.nn.Module, strict: bool = True) -> None:
        self.model, self.strict = model, strict

    @property
    def source_module(self) -> torch.nn.Module:
        """The module whose state this saves (for the description of a ``transformers`` model at save time)."""
        return self.model

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set ``state``; whole tensors for DTensor parameters (a DDP checkpoint, say) keep this rank's piece."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if any(isinstance(v, torch.Tensor) and not is_dtensor(v) for v in state.values()) and has_dtensors(self.model):
            state = shard_state_like(state, self.state_dict())
        set_model_state_dict(self.model, state, options=StateDictOptions(strict=self.strict))

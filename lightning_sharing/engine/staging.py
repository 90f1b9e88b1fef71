"""Which staged tensors only an optimizer step changes: the ones background staging may copy after a save returns.

Those are the parameters of the modules a checkpoint saves and the state (and parameters) of its optimizers,
found in each component's stateful: a module or an optimizer itself, or a wrapper holding one under a
``model``, ``module``, ``optimizer`` or ``optimizers`` attribute (``OptimizerState``, ``ShardedModuleState``).
A tensor is matched by its storage, so the views a state dict returns match the live tensors. Anything not
matched (buffers, metric states, user tensors) is copied before ``save_checkpoint`` returns.

Example:
    >>> owned = optimizer_owned([StateComponent("model", model, SharingPattern.REPLICATED)])  # doctest: +SKIP
    >>> owned(model.state_dict()["weight"]), owned(model.state_dict()["running_mean"])  # doctest: +SKIP
    (True, False)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.format.codec import is_dtensor

__all__ = ["optimizer_owned"]

_WRAPPED = ("model", "module", "optimizer", "optimizers")


def _storage(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if is_dtensor(tensor) else tensor
    return local.untyped_storage().data_ptr() if local.numel() else 0


def _roots(stateful: Any) -> Iterator[torch.nn.Module | torch.optim.Optimizer]:
    for candidate in (stateful, *(getattr(stateful, name, None) for name in _WRAPPED)):
        for item in candidate if isinstance(candidate, (list, tuple)) else (candidate,):
            if isinstance(item, (torch.nn.Module, torch.optim.Optimizer)):
                yield item


def _tensors(root: torch.nn.Module | torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    if isinstance(root, torch.nn.Module):
        yield from root.parameters()
        return
    for group in root.param_groups:
        yield from group["params"]
    for state in root.state.values():
        yield from (value for value in state.values() if isinstance(value, torch.Tensor))


def optimizer_owned(components: Sequence[StateComponent],
                    roots: Sequence[Any] = ()) -> Callable[[torch.Tensor], bool]:
    """A test of whether a tensor shares storage with a saved module's parameter or a saved optimizer's state.

    ``roots`` adds modules and optimizers (or wrappers of them) whose state reaches the checkpoint through
    other statefuls (Lightning's checkpoint dict).
    """
    statefuls = [component.stateful for component in components] + list(roots)
    storages = {_storage(tensor) for stateful in statefuls for root in _roots(stateful) for tensor in _tensors(root)}
    storages.discard(0)
    return lambda tensor: _storage(tensor) in storages

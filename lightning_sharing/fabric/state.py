"""Stateful adapters and checks behind ``FabricSharingStrategy`` (how Fabric's ``state`` values are saved)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lightning.fabric.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_sharing.distributed.validation import replicated_view

__all__ = ["Filtered", "ModuleState", "check_filter", "filtered", "is_stateful", "metric_kind"]

FilterFn = Callable[[str, Any], bool]


class ModuleState:
    """A module's state dict as the strategy sees it (DDP unwrapped), loaded with the call's ``strict``."""

    def __init__(self, strategy: DDPStrategy, module: nn.Module, strict: bool) -> None:
        self._strategy, self._module, self._strict = strategy, module, strict

    def state_dict(self) -> dict[str, Any]:
        return self._strategy.get_module_state_dict(self._module)

    def replicated_view(self, state: dict[str, Any]) -> dict[str, Any]:
        """The parameters only: buffers (BatchNorm running statistics, counters) are updated from each rank's own
        batch and only made equal by DDP's broadcast at the next forward, so they are saved (rank 0's copy) but not
        compared across ranks."""
        module = self._module.module if isinstance(self._module, DistributedDataParallel) else self._module
        buffers = {name for name, _ in module.named_buffers()}
        return {name: value for name, value in state.items() if name not in buffers}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._strategy.load_module_state_dict(self._module, state_dict, strict=self._strict)


class Filtered:
    """Saves only the top-level items of ``stateful.state_dict()`` that ``keep(name, value)`` accepts."""

    def __init__(self, stateful: Any, keep: FilterFn) -> None:
        self._stateful, self._keep = stateful, keep

    def state_dict(self) -> Any:
        return filtered(self._stateful.state_dict(), self._keep)

    def replicated_view(self, state: Any) -> Any:
        return replicated_view(self._stateful, state)

    def load_state_dict(self, state_dict: Any) -> Any:
        return self._stateful.load_state_dict(state_dict)


def filtered(value: Any, keep: FilterFn | None) -> Any:
    if keep is None or not isinstance(value, Mapping):
        return value
    return {k: v for k, v in value.items() if keep(k, v)}


def check_filter(filter: Any, state: Mapping[str, Any]) -> dict[str, FilterFn]:
    """Fabric's own checks on ``filter`` (repeated for direct calls of ``save_checkpoint``)."""
    if filter is None:
        return {}
    if not isinstance(filter, Mapping):
        raise TypeError(f"Filter should be a dictionary, given {filter!r}")
    unknown = set(filter) - set(state)
    if unknown:
        raise ValueError(f"The filter keys {unknown} are not present in the state keys {set(state)}.")
    for key, fn in filter.items():
        if not callable(fn):
            raise TypeError(f"Expected `fabric.save(filter=...)` for key {key!r} to be a callable, given {fn!r}")
    return dict(filter)


def is_stateful(value: Any) -> bool:
    return (not isinstance(value, type) and callable(getattr(value, "state_dict", None))
            and callable(getattr(value, "load_state_dict", None)))


def metric_kind(module: nn.Module) -> str | None:
    """``"metric"`` for a torchmetrics ``Metric``, ``"collection"`` for a ``MetricCollection``, else None."""
    try:
        from torchmetrics import Metric, MetricCollection
    except ImportError:  # torchmetrics is optional here
        return None
    if isinstance(module, Metric):
        return "metric"
    return "collection" if isinstance(module, MetricCollection) else None

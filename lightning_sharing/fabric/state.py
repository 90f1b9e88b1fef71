"""How Fabric's ``state`` values become components: stateful adapters, filters and the mapping itself."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from lightning.fabric.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from lightning_sharing.core.declarations import SharingPattern, StateComponent, ValidationLevel, check_unique_keys
from lightning_sharing.distributed.validation import replicated_view
from lightning_sharing.errors import ComponentDeclarationError
from lightning_sharing.integration.compat import unwrap_fabric_objects
from lightning_sharing.integration.data import loader_state
from lightning_sharing.statefuls.metrics import MetricState
from lightning_sharing.statefuls.modules import ShardedModuleState, has_dtensors
from lightning_sharing.statefuls.optimizer import OptimizerState

__all__ = [
    "EXTRA_KEY",
    "Filtered",
    "ModuleState",
    "check_filter",
    "component_for",
    "declare_state",
    "filtered",
    "is_stateful",
    "metric_kind",
]

#: The component holding the plain (non-stateful) values of ``state``.
EXTRA_KEY = "extra"

FilterFn = Callable[[str, Any], bool]


class ModuleState:
    """A module's state dict as the strategy sees it (DDP unwrapped), loaded with the call's ``strict``."""

    def __init__(self, strategy: DDPStrategy, module: nn.Module, strict: bool) -> None:
        self._strategy, self._module, self._strict = strategy, module, strict

    @property
    def source_module(self) -> nn.Module:
        """The module whose state this saves (for the description of a ``transformers`` model at save time)."""
        return self._module

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


def _over_dtensors(optimizer: Optimizer) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"])


def _owns(module: nn.Module, optimizer: Optimizer) -> bool:
    held = {id(p) for p in module.parameters()}
    return all(id(p) in held for group in optimizer.param_groups for p in group["params"])


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


def declare_state(strategy: Any, own_components: list[StateComponent], state: Mapping[str, Any],
                  filters: Mapping[str, FilterFn], strict: bool,
                  rng_key: str | None) -> tuple[list[StateComponent], dict[str, Any]]:
    """Map Fabric's ``state`` to components (after the strategy's ``own_components``) and plain values.

    ``rng_key`` is the key of the strategy's own RNG component, if it has one (named in the refusal).
    """
    components = list(own_components)
    own = {c.key for c in components}
    modules = tuple(m for m in (unwrap_fabric_objects(v) for v in state.values()) if isinstance(m, nn.Module))
    plain: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ComponentDeclarationError(f"state keys must be strings, got {key!r}")
        component = component_for(strategy, key, value, strict, modules)
        if component is None:
            plain[key] = filtered(value, filters.get(key))
            continue
        if key == EXTRA_KEY or key in own:
            what = "the plain values of state" if key == EXTRA_KEY else (
                "the RNG state (pass rng=False to save your own)" if key == rng_key
                else "a component passed to FabricSharingStrategy(components=...)")
            raise ComponentDeclarationError(
                f"state[{key!r}] holds a {type(value).__name__}, but the key {key!r} is reserved for {what}; "
                "use another key"
            )
        if key in filters:
            component = dataclasses.replace(component, stateful=Filtered(component.stateful, filters[key]))
        components.append(component)
    return check_unique_keys(components), plain

def component_for(strategy: Any, key: str, value: Any, strict: bool,
                  modules: tuple[nn.Module, ...] = ()) -> StateComponent | None:
    """The component for ``state[key]``, or None for a plain value (``modules``: the state's modules, unwrapped)."""
    if isinstance(value, StateComponent):
        if value.key != key:
            raise ComponentDeclarationError(
                f"state[{key!r}] is a StateComponent with key {value.key!r}; the dict key and the component "
                f"key must be equal: use state[{value.key!r}] = component, or StateComponent({key!r}, ...)"
            )
        stateful = unwrap_fabric_objects(value.stateful)
        if isinstance(stateful, DistributedDataParallel):
            stateful = ModuleState(strategy, stateful, strict)
        return value if stateful is value.stateful else dataclasses.replace(value, stateful=stateful)
    value = unwrap_fabric_objects(value)
    if isinstance(value, nn.Module):
        kind = metric_kind(value)
        if kind == "metric":  # its raw accumulators and update count, whether persistent or not
            return StateComponent(key, MetricState(value), SharingPattern.PER_RANK)
        if kind == "collection":
            return StateComponent(key, value, SharingPattern.PER_RANK)
        if has_dtensors(value):  # FSDP2 / tensor parallel: each rank holds pieces
            return StateComponent(key, ShardedModuleState(value, strict), SharingPattern.SHARDED)
        return StateComponent(key, ModuleState(strategy, value, strict), SharingPattern.REPLICATED,
                              validate_replication=True, validation_level=ValidationLevel.QUICK)
    if isinstance(value, Optimizer) and _over_dtensors(value):
        owner = next((m for m in modules if _owns(m, value)), None)
        if owner is None:
            raise ComponentDeclarationError(
                f"state[{key!r}] is an optimizer over sharded (DTensor) parameters, but no module in the same state "
                "holds all of them; its state is saved keyed by parameter name, so pass the module too, e.g. "
                f"{{'model': model, {key!r}: optimizer}}"
            )
        return StateComponent(key, OptimizerState(owner, value), SharingPattern.SHARDED)
    if isinstance(value, Optimizer):
        if callable(getattr(value, "consolidate_state_dict", None)):
            raise ComponentDeclarationError(
                f"state[{key!r}] is a {type(value).__name__}, whose state is sharded across ranks; "
                "FabricSharingStrategy saves optimizers as REPLICATED. Use a regular optimizer, or wrap this "
                "one in a StateComponent with the pattern that fits its state"
            )
        return StateComponent(key, value, SharingPattern.REPLICATED)
    if is_stateful(value):
        if isinstance(value, DataLoader):  # with its sampler's epoch when it came from setup_dataloaders
            return StateComponent(key, loader_state(value), SharingPattern.PER_RANK)
        return StateComponent(key, value, SharingPattern.REPLICATED)
    return None

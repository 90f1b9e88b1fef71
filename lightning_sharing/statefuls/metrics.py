"""``MetricState``: checkpoint a torchmetrics metric's accumulated state, exactly and without syncing.

A torchmetrics ``Metric``'s own ``state_dict()`` is empty unless ``metric.persistent(True)`` was
called, and under DDP it may sync across ranks. ``MetricState`` saves this rank's raw accumulators
(every registered state, including list states) and the update count, so a resumed run computes
the same value. Declare it PER_RANK: each rank accumulates its own share. A ``Metric`` passed as the
stateful of a ``StateComponent`` is wrapped in ``MetricState`` automatically, whatever its persistence.

Example:
    >>> import torchmetrics
    >>> from lightning_sharing import MetricState, SharingPattern, StateComponent
    >>> metric = torchmetrics.MeanMetric()
    >>> StateComponent("train_loss_mean", MetricState(metric), SharingPattern.PER_RANK).key
    'train_loss_mean'
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from lightning_sharing.core.declarations import register_stateful_adapter
from lightning_sharing.statefuls.holders import ValueHolder

__all__ = ["MetricState", "ModuleMetricsHolder", "is_metric", "module_metrics", "persistent_state_keys"]


def is_metric(value: Any) -> bool:
    """True for a torchmetrics ``Metric`` (found by its class, without importing torchmetrics)."""
    return any(f"{c.__module__}.{c.__qualname__}" == "torchmetrics.metric.Metric" for c in type(value).__mro__)


class MetricState:
    """Stateful view of a torchmetrics ``Metric``'s accumulated (unsynced) state."""

    def __init__(self, metric: Any) -> None:
        if not hasattr(metric, "_defaults") or not hasattr(metric, "_update_count"):
            raise TypeError(f"MetricState expects a torchmetrics Metric, got {type(metric).__name__}")
        self.metric = metric

    def state_dict(self) -> dict[str, Any]:
        states = {}
        for name in self.metric._defaults:
            value = getattr(self.metric, name)
            states[name] = [t.detach().clone() for t in value] if isinstance(value, list) else value.detach().clone()
        return {"states": states, "update_count": int(self.metric._update_count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state["states"]) - set(self.metric._defaults)
        if unknown:
            raise KeyError(f"metric {type(self.metric).__name__} has no states {sorted(unknown)}")
        for name, value in state["states"].items():
            setattr(self.metric, name, self._on_device(name, value))
        self.metric._update_count = int(state["update_count"])
        self.metric._computed = None

    def merge_state(self, state: dict[str, Any]) -> None:
        """Add another rank's saved state to this one (the metric's own reductions: sums add, lists append).

        ``on_resize="merge"`` merges every rank's saved state onto rank 0 so that ``compute()`` covers every sample
        seen, once. Raises the metric's own error for metrics that cannot merge (``full_state_update=True``).
        """
        self.metric.merge_state({name: self._on_device(name, value) for name, value in state["states"].items()})
        self.metric._update_count += int(state["update_count"])
        self.metric._computed = None

    def reset(self) -> None:
        """Empty the metric (the ranks other than 0 after a merge)."""
        self.metric.reset()

    def _on_device(self, name: str, value: Any) -> Any:
        """A saved state (a tensor or a list of them) on the device of the metric's state ``name``."""
        current = getattr(self.metric, name)
        device = current[0].device if isinstance(current, list) and current else getattr(current, "device", None)
        if isinstance(value, list):
            return [torch.as_tensor(v).to(device) if device else v for v in value]
        return value.to(device) if device is not None else value


def module_metrics(module: Any) -> dict[str, Any]:
    """``{name: metric}`` for every torchmetrics ``Metric`` inside ``module`` (``named_modules`` names)."""
    if module is None or not callable(getattr(module, "named_modules", None)):
        return {}
    return {name: sub for name, sub in module.named_modules() if name and is_metric(sub)}


def persistent_state_keys(name: str, metric: Any) -> list[str]:
    """The ``module.state_dict()`` keys of ``metric``'s persistent states (``metric.persistent(True)``)."""
    persistent = getattr(metric, "_persistent", {})
    return [f"{name}.{state}" for state in metric._defaults if persistent.get(state)]


class ModuleMetricsHolder(ValueHolder):
    """The Trainer's ``model_metrics`` built-in on load: ``{"states": {key: state}, "update_counts": {name: n}}``
    of the metrics inside ``module``, mergeable across ranks (``on_resize="merge"``) with each metric's own
    reductions, and resettable to the metrics' defaults (the ranks that start empty)."""

    def __init__(self, module: Any) -> None:
        super().__init__()
        self.module = module

    def merge_state(self, state: dict[str, Any]) -> None:
        states, counts = dict(self.value["states"]), dict(self.value["update_counts"])
        for name, metric in module_metrics(self.module).items():
            prefix = f"{name}."
            keys = [key for key in state["states"] if key.startswith(prefix) and key in states]
            if not keys:
                continue
            scratch = MetricState(copy.deepcopy(metric))
            scratch.load_state_dict({"states": {key[len(prefix):]: states[key] for key in keys},
                                     "update_count": int(counts.get(name, 0))})
            scratch.merge_state({"states": {key[len(prefix):]: state["states"][key] for key in keys},
                                 "update_count": int(state["update_counts"].get(name, 0))})
            merged = scratch.state_dict()
            states.update({key: merged["states"][key[len(prefix):]] for key in keys})
            counts[name] = merged["update_count"]
        self.value = {"states": states, "update_counts": counts}

    def reset(self) -> None:
        states: dict[str, Any] = {}
        for name, metric in module_metrics(self.module).items():
            for key in persistent_state_keys(name, metric):
                default = metric._defaults[key[len(name) + 1:]]
                states[key] = [] if isinstance(default, list) else default.detach().clone()
        self.value = {"states": states, "update_counts": dict.fromkeys(module_metrics(self.module), 0)}
        self.loaded = True


def _wrap_metric(stateful: Any) -> MetricState | None:
    return MetricState(stateful) if is_metric(stateful) else None


register_stateful_adapter(_wrap_metric)

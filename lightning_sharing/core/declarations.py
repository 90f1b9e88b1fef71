"""Declarations: how a piece of training state is shared across ranks.

Example:
    >>> import torch
    >>> from lightning_sharing import SharingPattern, StateComponent
    >>> model = torch.nn.Linear(2, 2)
    >>> StateComponent("model", model, SharingPattern.REPLICATED, validate_replication=True)
    StateComponent(key='model', sharing_pattern=REPLICATED, ...)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from lightning_sharing.core.patterns import ResizePolicy, SharingPattern, ValidationLevel, parse_enum
from lightning_sharing.core.rules import RULES, rule
from lightning_sharing.errors import ComponentDeclarationError

__all__ = [
    "ResizePolicy",
    "SharingPattern",
    "StateComponent",
    "Stateful",
    "ValidationLevel",
    "check_unique_keys",
    "register_stateful_adapter",
]

# Keys become directory and file names inside the checkpoint, so keep them path-safe.
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,127}$")
_RESERVED_KEYS = {"checkpoint_manifest"}


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict(state)``."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


# Adapters registered by higher layers (``statefuls.metrics`` registers ``MetricState`` for torchmetrics metrics):
# a stateful whose own state_dict() does not hold its state is replaced by the adapter's wrapper on declaration.
_ADAPTERS: list[Callable[[Any], Any]] = []


def register_stateful_adapter(adapter: Callable[[Any], Any]) -> None:
    """Register ``adapter(stateful) -> wrapper or None``, applied to every ``StateComponent``'s stateful."""
    if adapter not in _ADAPTERS:
        _ADAPTERS.append(adapter)


@dataclass
class StateComponent:
    """One piece of training state and the way it is shared across ranks.

    Args:
        key: unique name; becomes the file stem inside the checkpoint.
        stateful: any object with ``state_dict()`` and ``load_state_dict()``. A torchmetrics ``Metric`` is
            wrapped in ``MetricState`` (its own ``state_dict()`` is empty unless it is persistent).
        sharing_pattern: a ``SharingPattern`` (or its string value).
        process_group_name: the named group for ``PER_GROUP`` (required there); for ``SHARDED``
            optionally the group whose members hold the same tensors (a pipeline stage's data
            parallel replicas); refused elsewhere.
        required: when False, a checkpoint without this component still loads.
        validate_replication: compare the state across ranks before saving (REPLICATED; for SHARDED
            its plain tensors and other values, within each group instance).
        validation_level: how thoroughly to compare (default ``QUICK``).
        metadata: free-form JSON-serialisable information recorded in the manifest.
        on_resize: what loading this component does when it was saved at another topology (PER_RANK,
            PER_GROUP and PER_NODE only): ``"error"`` (refuse, the default), ``"reseed"`` (the stateful's
            ``reseed(seed)``, e.g. ``RNGState``), ``"merge"`` (rank 0 merges every saved copy with the
            stateful's ``merge_state``, e.g. a torchmetrics metric; the other ranks start empty), ``"drop"``
            (start fresh, logged), or a callable ``merge(states) -> state`` that rank 0 loads (the other ranks
            start empty). See ``ResizePolicy``.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        >>> StateComponent("optimizer", opt, "replicated").sharing_pattern
        REPLICATED
    """

    key: str
    stateful: Any
    sharing_pattern: SharingPattern
    process_group_name: str | None = None
    required: bool = True
    validate_replication: bool = False
    validation_level: ValidationLevel = ValidationLevel.QUICK
    metadata: dict[str, Any] = field(default_factory=dict)
    on_resize: ResizePolicy | str | Callable[[list[Any]], Any] = ResizePolicy.ERROR

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not _KEY_RE.match(self.key):
            raise ComponentDeclarationError(
                f"StateComponent key {self.key!r} is invalid: use 1-128 letters, digits, '_' and '-' "
                "(it becomes a file name inside the checkpoint)"
            )
        if self.key in _RESERVED_KEYS:
            raise ComponentDeclarationError(f"StateComponent key {self.key!r} is reserved")
        self.sharing_pattern = SharingPattern.parse(self.sharing_pattern)
        self.validation_level = ValidationLevel.parse(self.validation_level)
        for adapter in _ADAPTERS:
            wrapped = adapter(self.stateful)
            if wrapped is not None:
                self.stateful = wrapped
                break
        if not (callable(getattr(self.stateful, "state_dict", None))
                and callable(getattr(self.stateful, "load_state_dict", None))):
            raise ComponentDeclarationError(
                f"StateComponent {self.key!r}: stateful of type {type(self.stateful).__name__} has no "
                "state_dict()/load_state_dict(); wrap it in an object that provides both"
            )
        pattern_rule = rule(self.sharing_pattern)
        if pattern_rule.needs_group and not self.process_group_name:
            raise ComponentDeclarationError(
                f"StateComponent {self.key!r} is {self.sharing_pattern.name} but has no process_group_name; "
                "name the group (a key of process_groups or a DeviceMesh dimension name)"
            )
        if pattern_rule.takes_group:
            if self.process_group_name is not None and (
                    not isinstance(self.process_group_name, str) or not _KEY_RE.match(self.process_group_name)):
                raise ComponentDeclarationError(
                    f"StateComponent {self.key!r}: process_group_name {self.process_group_name!r} must be "
                    "1-128 letters, digits, '_' and '-' (it becomes part of a file name)"
                )
        elif self.process_group_name is not None:
            raise ComponentDeclarationError(
                f"StateComponent {self.key!r}: process_group_name={self.process_group_name!r} only "
                f"applies to {_group_patterns()}, not {self.sharing_pattern.name}"
            )
        if self.validate_replication and not pattern_rule.validated:
            raise ComponentDeclarationError(
                f"StateComponent {self.key!r}: validate_replication=True needs sharing_pattern "
                f"{_validated_patterns()}, got {self.sharing_pattern.name}; state that differs across ranks "
                "cannot be checked for equality"
            )
        if not isinstance(self.metadata, dict):
            raise ComponentDeclarationError(f"StateComponent {self.key!r}: metadata must be a dict")
        self._check_resize_policy(pattern_rule.rank_specific)

    def _check_resize_policy(self, rank_specific: bool) -> None:
        merge = self.on_resize if callable(self.on_resize) else None
        policy = ResizePolicy.MERGE if merge is not None else parse_enum(ResizePolicy, self.on_resize, "on_resize")
        if merge is None:
            self.on_resize = policy
        if policy is not ResizePolicy.ERROR and not rank_specific:
            raise ComponentDeclarationError(
                f"StateComponent {self.key!r}: on_resize={policy.value!r} only applies to rank-specific state "
                f"(PER_RANK, PER_GROUP, PER_NODE); {self.sharing_pattern.name} state loads at any topology"
            )
        needed = {ResizePolicy.RESEED: "reseed", ResizePolicy.MERGE: "merge_state"}.get(policy)
        if needed is not None and merge is None and not callable(getattr(self.stateful, needed, None)):
            hint = ("pass on_resize=a callable that merges the saved states into one" if policy is ResizePolicy.MERGE
                    else "use RNGState() for random generators, or another policy")
            raise ComponentDeclarationError(
                f"StateComponent {self.key!r}: on_resize={policy.value!r} needs a stateful with {needed}() "
                f"({type(self.stateful).__name__} has none); {hint}"
            )

    @property
    def resize_policy(self) -> ResizePolicy:
        """``on_resize`` as a ``ResizePolicy`` (a callable merge is ``MERGE``)."""
        return ResizePolicy.MERGE if callable(self.on_resize) else ResizePolicy.parse(self.on_resize)

    @property
    def effective_validation(self) -> ValidationLevel:
        """The level actually applied at save time (``NONE`` unless validation is enabled)."""
        return self.validation_level if self.validate_replication else ValidationLevel.NONE

    def __repr__(self) -> str:
        group = f", process_group_name={self.process_group_name!r}" if self.process_group_name else ""
        return (f"StateComponent(key={self.key!r}, sharing_pattern={self.sharing_pattern!r}{group}, "
                f"required={self.required}, ...)")


def _group_patterns() -> str:
    return " or ".join(p.name for p, r in RULES.items() if r.takes_group)


def _validated_patterns() -> str:
    return " or ".join(p.name for p, r in RULES.items() if r.validated)


def check_unique_keys(components: Iterable[StateComponent]) -> list[StateComponent]:
    """Return the components as a list, refusing duplicate keys and non-``StateComponent`` items."""
    result: list[StateComponent] = []
    seen: set[str] = set()
    for component in components:
        if not isinstance(component, StateComponent):
            raise ComponentDeclarationError(
                f"expected StateComponent, got {type(component).__name__}: {component!r}"
            )
        if component.key in seen:
            raise ComponentDeclarationError(
                f"duplicate StateComponent key {component.key!r}: every component needs its own key"
            )
        seen.add(component.key)
        result.append(component)
    return result

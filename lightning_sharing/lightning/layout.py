"""How a Lightning checkpoint dict maps onto components, and back.

Lightning builds one dict per save (``trainer._checkpoint_connector.dump_checkpoint``). It is split
into built-in components, each with a default sharing pattern:

=============== ======================================================= ============
key             holds                                                   default
=============== ======================================================= ============
``model``       ``checkpoint["state_dict"]``                            REPLICATED, validated (QUICK)
``optimizer``   ``checkpoint["optimizer_states"]`` (one per optimizer)  REPLICATED
``scheduler``   ``checkpoint["lr_schedulers"]``                         REPLICATED
``dataloader``  the fit loop's stateful dataloader states               PER_RANK
``rng``         this process's RNGs (``RNGState``)                      PER_RANK
``trainer``     everything else: loops, callbacks, epoch, global step,  GLOBAL
                hyper-parameters, datamodule and precision state
=============== ======================================================= ============

A user re-declares a built-in (to change its pattern, group or validation) by passing
``BuiltinState()`` as the stateful of a ``StateComponent`` with the built-in's key.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

from lightning_sharing.core.declarations import SharingPattern, StateComponent, ValidationLevel
from lightning_sharing.errors import ComponentDeclarationError, UnsupportedStateError
from lightning_sharing.format.codec import encode_state

__all__ = [
    "BUILTIN_KEYS",
    "BuiltinState",
    "ValueHolder",
    "builtin_components",
    "join_checkpoint",
    "split_checkpoint",
]

log = logging.getLogger(__name__)

BUILTIN_KEYS = ("model", "optimizer", "scheduler", "dataloader", "rng", "trainer")
_SOURCES = {"model": "state_dict", "optimizer": "optimizer_states", "scheduler": "lr_schedulers"}
_HPARAM_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")
_DEFAULT_PATTERNS = {
    "model": SharingPattern.REPLICATED,
    "optimizer": SharingPattern.REPLICATED,
    "scheduler": SharingPattern.REPLICATED,
    "dataloader": SharingPattern.PER_RANK,
    "rng": SharingPattern.PER_RANK,
    "trainer": SharingPattern.GLOBAL,
}


class ValueHolder:
    """A stateful that saves a given value and keeps what it is loaded with.

    ``exempt`` names entries left out of the replication check (see ``replicated_view``).
    """

    def __init__(self, value: Any = None, exempt: frozenset[str] = frozenset()) -> None:
        self.value = value
        self.loaded = False
        self.exempt = exempt

    def replicated_view(self, state: Any) -> Any:
        if not self.exempt or not isinstance(state, Mapping):
            return state
        return {k: v for k, v in state.items() if k not in self.exempt}

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, state: Any) -> None:
        self.value = state
        self.loaded = True


class BuiltinState:
    """Marks a ``StateComponent`` as a re-declaration of a built-in Lightning component.

    Example:
        >>> from lightning_sharing import SharingPattern, StateComponent
        >>> StateComponent("dataloader", BuiltinState(), SharingPattern.PER_GROUP, process_group_name="dp")
        StateComponent(key='dataloader', sharing_pattern=PER_GROUP, ...)
    """

    def state_dict(self) -> Any:
        raise RuntimeError("BuiltinState is a marker: the data of a built-in component comes from Lightning")

    def load_state_dict(self, state: Any) -> None:
        raise RuntimeError("BuiltinState is a marker: the data of a built-in component goes to Lightning")


def _fit_loop_state(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    loops = checkpoint.get("loops")
    if isinstance(loops, Mapping):
        fit_loop = loops.get("fit_loop")
        if isinstance(fit_loop, Mapping) and isinstance(fit_loop.get("state_dict"), Mapping):
            return fit_loop["state_dict"]  # type: ignore[return-value]
    return None


def split_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Split Lightning's checkpoint dict into built-in parts (the input is not modified)."""
    rest = dict(checkpoint)
    parts: dict[str, Any] = {}
    for key, source in _SOURCES.items():
        if source in rest:
            parts[key] = rest.pop(source)
    fit_state = _fit_loop_state(rest)
    if fit_state is not None and "combined_loader" in fit_state:
        # Copy the path down to the loader states so Lightning's own dict stays intact.
        rest["loops"] = copy.copy(rest["loops"])
        rest["loops"]["fit_loop"] = copy.copy(rest["loops"]["fit_loop"])
        fit_state = dict(fit_state)
        parts["dataloader"] = fit_state.pop("combined_loader")
        rest["loops"]["fit_loop"]["state_dict"] = fit_state
    for key in _HPARAM_KEYS:
        if key in rest:
            rest[key] = _storable_hparams(rest[key], key)
    parts["trainer"] = rest
    return parts


def join_checkpoint(parts: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``split_checkpoint`` (``rng`` is not part of Lightning's dict and is ignored)."""
    checkpoint = dict(parts.get("trainer") or {})
    for key, source in _SOURCES.items():
        if key in parts:
            checkpoint[source] = parts[key]
    if "dataloader" in parts:
        fit_state = _fit_loop_state(checkpoint)
        if fit_state is None:
            raise ComponentDeclarationError("the checkpoint has dataloader state but no fit loop state to put it in")
        fit_state["combined_loader"] = parts["dataloader"]
    return checkpoint


def builtin_components(keys: list[str], holders: Mapping[str, Any], overrides: Mapping[str, StateComponent],
                       validation_level: ValidationLevel) -> list[StateComponent]:
    """The built-in components for ``keys``, with their default declarations or the user's overrides."""
    components = []
    for key in keys:
        if key in overrides:
            user = overrides[key]
            components.append(StateComponent(
                key, holders[key], user.sharing_pattern, user.process_group_name, user.required,
                user.validate_replication, user.validation_level, dict(user.metadata)))
        elif key == "model":
            components.append(StateComponent(
                key, holders[key], _DEFAULT_PATTERNS[key], validate_replication=validation_level
                is not ValidationLevel.NONE, validation_level=validation_level))
        else:
            components.append(StateComponent(key, holders[key], _DEFAULT_PATTERNS[key]))
    return components


def check_user_components(components: list[StateComponent]) -> dict[str, StateComponent]:
    """Split user declarations into overrides of built-ins; refuse a built-in key with a real stateful."""
    overrides = {}
    for component in components:
        if component.key in BUILTIN_KEYS:
            if not isinstance(component.stateful, BuiltinState):
                raise ComponentDeclarationError(
                    f"configure_state_components() declared {component.key!r}, which is a built-in component "
                    f"(Lightning's {component.key} state). To change its pattern, pass BuiltinState() as its "
                    "stateful; to save state of your own, use another key"
                )
            overrides[component.key] = component
        elif isinstance(component.stateful, BuiltinState):
            raise ComponentDeclarationError(
                f"BuiltinState() is only for built-in keys {BUILTIN_KEYS}, not {component.key!r}"
            )
    return overrides


def _storable_hparams(value: Any, where: str) -> Any:
    """Hyper-parameters may hold arbitrary objects; store those as their repr (logged), not by pickle."""
    try:
        encode_state(value, where)
        return value
    except UnsupportedStateError:
        pass
    if isinstance(value, Mapping):
        return {k: _storable_hparams(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_storable_hparams(v, f"{where}[{i}]") for i, v in enumerate(value))
    log.warning("hyper-parameter %s of type %s is stored as its repr (it cannot be stored without pickle)",
                where, type(value).__name__)
    return repr(value)

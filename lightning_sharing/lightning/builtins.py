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
``sampler``     each elastic training sampler's position                GLOBAL
                (``{"epoch", "consumed"}``, see ``lightning/elastic.py``)
``rng``         this process's RNGs (``RNGState``)                      PER_RANK
``model_metrics`` the persistent states of torchmetrics metrics inside  PER_RANK
                the module (``model`` keeps rank 0's copy, unchecked),
                and each metric's update count

``trainer``     everything else: loops, callbacks, epoch, global step,  GLOBAL
                hyper-parameters, datamodule and precision state
=============== ======================================================= ============

A user re-declares a built-in (to change its pattern, group, validation or ``on_resize``) by passing
``BuiltinState()`` as the stateful of a ``StateComponent`` with the built-in's key.

Loaded at another topology (``RESIZE_POLICIES``, see docs/patterns.md): ``rng`` is reseeded per rank,
``model_metrics`` merged onto rank 0 (the other ranks start empty), and ``dataloader`` dropped when the
checkpoint holds the ``sampler`` position (the new ranks continue that global order); otherwise refused.

Two values of Lightning's dict are stored in another form and restored on the way back:

- the order of ``state_dict``'s keys (tensor files are written in their own order), so the dict comes
  back in the module's order, as from a single-file checkpoint;
- ``hparams_type``, a class (Lightning stores ``type(hparams)`` for OmegaConf configs): stored by name and
  restored only from an allow-list of hyper-parameter container types, never by unpickling or by
  importing whatever the checkpoint names.
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_sharing.core.declarations import ResizePolicy, SharingPattern, StateComponent, ValidationLevel
from lightning_sharing.core.rules import rule
from lightning_sharing.distributed.collectives import warn_on_rank_zero
from lightning_sharing.errors import ComponentDeclarationError, UnsupportedStateError
from lightning_sharing.format.codec import encode_state

__all__ = [
    "BUILTIN_KEYS",
    "METRIC_COUNTS_KEY",
    "RESIZE_POLICIES",
    "SAMPLER_KEY",
    "BuiltinState",
    "builtin_components",
    "join_checkpoint",
    "split_checkpoint",
]

log = logging.getLogger(__name__)

BUILTIN_KEYS = ("model", "optimizer", "scheduler", "dataloader", "sampler", "rng", "trainer", "model_metrics")
_SOURCES = {"model": "state_dict", "optimizer": "optimizer_states", "scheduler": "lr_schedulers"}
_HPARAM_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")
_HPARAMS_TYPE_KEY = "hparams_type"
_TYPE_MARKER = "lightning_sharing.type"  # {"lightning_sharing.type": "module.QualName"} stands for a class
_ORDER_KEY = "lightning_sharing.state_dict_order"  # state_dict's keys in the module's order
#: The hyper-parameter container classes an ``hparams_type`` may name (anything else loads as None, logged).
HPARAMS_TYPES = (
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "argparse.Namespace",
    "builtins.dict",
    "lightning.fabric.utilities.data.AttributeDict",
)
_DEFAULT_PATTERNS = {
    "model": SharingPattern.REPLICATED,
    "optimizer": SharingPattern.REPLICATED,
    "scheduler": SharingPattern.REPLICATED,
    "dataloader": SharingPattern.PER_RANK,
    "sampler": SharingPattern.GLOBAL,
    "rng": SharingPattern.PER_RANK,
    "trainer": SharingPattern.GLOBAL,
    "model_metrics": SharingPattern.PER_RANK,
}
#: What loading a built-in saved at another topology does (``dataloader``: only when ``sampler`` was saved).
RESIZE_POLICIES = {"rng": ResizePolicy.RESEED, "model_metrics": ResizePolicy.MERGE, "dataloader": ResizePolicy.DROP}
#: Where ``join_checkpoint`` puts the elastic samplers' positions, for the strategy to give its samplers.
SAMPLER_KEY = "lightning_sharing.sampler_positions"
#: Where ``join_checkpoint`` puts the metrics' update counts ({metric name: count}) for the strategy to apply.
METRIC_COUNTS_KEY = "lightning_sharing.metric_update_counts"


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

    # A re-declared built-in may name any on_resize policy: the strategy's own holder of it carries it out.
    def reseed(self, seed: int) -> None:
        raise RuntimeError("BuiltinState is a marker: the built-in's own holder is reseeded")

    def merge_state(self, state: Any) -> None:
        raise RuntimeError("BuiltinState is a marker: the built-in's own holder merges")


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
    if isinstance(parts.get("model"), Mapping):
        rest[_ORDER_KEY] = [str(name) for name in parts["model"]]
    if isinstance(rest.get(_HPARAMS_TYPE_KEY), type):
        kind = rest[_HPARAMS_TYPE_KEY]
        rest[_HPARAMS_TYPE_KEY] = {_TYPE_MARKER: f"{kind.__module__}.{kind.__qualname__}"}
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
    order = checkpoint.pop(_ORDER_KEY, None)
    for key, source in _SOURCES.items():
        if key in parts:
            checkpoint[source] = parts[key]
    model = checkpoint.get("state_dict")
    if isinstance(order, list) and isinstance(model, Mapping) and set(order) == set(model):
        checkpoint["state_dict"] = {name: model[name] for name in order}
    metrics = parts.get("model_metrics")
    if isinstance(metrics, Mapping):
        # This rank's own metric states replace rank 0's copy inside the model's state dict (alone, when the
        # strategy loaded the model in place).
        model_state = checkpoint.get("state_dict")
        checkpoint["state_dict"] = {**(model_state if isinstance(model_state, Mapping) else {}),
                                    **dict(metrics.get("states") or {})}
        checkpoint[METRIC_COUNTS_KEY] = dict(metrics.get("update_counts") or {})
    if "sampler" in parts:
        checkpoint[SAMPLER_KEY] = parts["sampler"]
    kind = checkpoint.get(_HPARAMS_TYPE_KEY)
    if isinstance(kind, Mapping) and set(kind) == {_TYPE_MARKER}:
        checkpoint[_HPARAMS_TYPE_KEY] = _allowed_type(kind[_TYPE_MARKER])
    if "dataloader" in parts:
        fit_state = _fit_loop_state(checkpoint)
        if fit_state is None:
            raise ComponentDeclarationError("the checkpoint has dataloader state but no fit loop state to put it in")
        fit_state["combined_loader"] = parts["dataloader"]
    return checkpoint


def builtin_components(keys: list[str], holders: Mapping[str, Any], overrides: Mapping[str, StateComponent],
                       validation_level: ValidationLevel,
                       resize: Mapping[str, ResizePolicy] | None = None) -> list[StateComponent]:
    """The built-in components for ``keys``, with their default declarations or the user's overrides.

    ``resize``: the ``on_resize`` policies of a load (``RESIZE_POLICIES``, as far as the holders carry them out);
    a user's re-declaration keeps its own.
    """
    components = []
    for key in keys:
        policy = (resize or {}).get(key, ResizePolicy.ERROR)
        if key in overrides:
            user = overrides[key]
            own = user.on_resize if callable(user.on_resize) or user.resize_policy is not ResizePolicy.ERROR \
                else policy
            components.append(StateComponent(
                key, holders[key], user.sharing_pattern, user.process_group_name, user.required,
                user.validate_replication, user.validation_level, dict(user.metadata),
                on_resize=own if rule(user.sharing_pattern).rank_specific else ResizePolicy.ERROR))
        elif key == "model":
            components.append(StateComponent(
                key, holders[key], _DEFAULT_PATTERNS[key], validate_replication=validation_level
                is not ValidationLevel.NONE, validation_level=validation_level))
        else:
            components.append(StateComponent(key, holders[key], _DEFAULT_PATTERNS[key], on_resize=policy))
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
    if isinstance(value, Mapping):  # an OmegaConf DictConfig too: its hparams_type brings the class back
        return {k: _storable_hparams(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_storable_hparams(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):  # a list, an OmegaConf ListConfig
        return [_storable_hparams(v, f"{where}[{i}]") for i, v in enumerate(value)]
    warn_on_rank_zero(log, "hyper-parameter %s of type %s is stored as its repr (it cannot be stored without pickle)",
                           where, type(value).__name__)
    return repr(value)


def _allowed_type(name: Any) -> type | None:
    """The class named ``name`` if it is in ``HPARAMS_TYPES`` and importable, else None (logged)."""
    if name not in HPARAMS_TYPES:
        warn_on_rank_zero(log, "the checkpoint's hparams_type %r is not an allowed hyper-parameter type %s; the "
                               "hyper-parameters load as a plain dict", name, HPARAMS_TYPES)
        return None
    module, _, qualname = str(name).rpartition(".")
    try:
        return getattr(importlib.import_module(module), qualname)  # type: ignore[no-any-return]
    except (ImportError, AttributeError):
        log.info("hparams_type %s is not importable here; the hyper-parameters load as a plain dict", name)
        return None

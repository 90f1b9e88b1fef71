"""Finding the ``transformers`` model a component wraps, at save time, and describing it for the export.

A component's stateful may be the Hugging Face model itself, a module holding it (a LightningModule with
``self.model = GPT2LMHeadModel(config)``), or any stateful that names the module whose ``state_dict()`` it saves in a
``source_module`` attribute (``ShardedModuleState``, Fabric's module state, and the ``ValueHolder`` of Lightning's
model state dict). ``describe_hf_model`` finds the outermost ``transformers.PreTrainedModel`` in it and records its
class (the ``PreTrainedModel`` subclass, not the ``FSDP...`` class ``fully_shard`` makes), its configuration, its
generation configuration, the keys ``transformers`` derives from tied ones, and its prefix in the component's state
dict (``checkpoint.hf_record.HFModelRecord``).

``transformers`` is never imported here: where the user has not imported it (``sys.modules``), no component can hold
one of its models and nothing is looked at.

Example:
    >>> record = describe_hf_model(lightning_module)          # doctest: +SKIP
    >>> record.class_name, record.prefix                       # doctest: +SKIP
    ('GPT2LMHeadModel', 'model.')
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import torch

from lightning_sharing.checkpoint.hf_record import HFModelRecord

__all__ = ["describe_hf_model", "find_hf_model"]

log = logging.getLogger(__name__)

# Wrapper modules whose own name ``Module.state_dict()`` leaves out (their state-dict hooks take it off).
_HIDDEN_PARTS = frozenset({"_checkpoint_wrapped_module", "_fsdp_wrapped_module"})
# Wrappers that a stateful's own state dict leaves out as well (``get_model_state_dict``, Lightning's and Fabric's
# module state dicts): torch.compile's, Fabric's, and the ``module`` of DDP.
_WRAPPER_PARTS = _HIDDEN_PARTS | {"_orig_mod", "_forward_module"}
_DATA_PARALLEL = frozenset({"DistributedDataParallel", "DataParallel"})


def _pretrained_class() -> type | None:
    modeling = sys.modules.get("transformers.modeling_utils")
    base = getattr(modeling, "PreTrainedModel", None) if modeling is not None else None
    return base if isinstance(base, type) else None


def _root_module(stateful: Any) -> tuple[torch.nn.Module, bool] | None:
    """The module whose state dict ``stateful`` saves, and whether it is the stateful itself (raw ``state_dict()``)."""
    if isinstance(stateful, torch.nn.Module):
        return stateful, True
    source = getattr(stateful, "source_module", None)  # the module whose state dict the stateful saves
    return (source, False) if isinstance(source, torch.nn.Module) else None


def _state_dict_prefix(root: torch.nn.Module, path: str, raw: bool) -> str:
    """The prefix of the module at ``path`` in the state dict saved from ``root``: its path, less the wrapper names
    that ``root.state_dict()`` (``raw``) or a stateful's unwrapped state dict leaves out."""
    kept: list[str] = []
    node: Any = root
    for part in path.split(".") if path else []:
        parent, node = node, getattr(node, part)
        if part in _HIDDEN_PARTS or (not raw and (part in _WRAPPER_PARTS or (
                part == "module" and type(parent).__name__ in _DATA_PARALLEL))):
            continue
        kept.append(part)
    return "".join(f"{part}." for part in kept)


def find_hf_model(stateful: Any) -> tuple[torch.nn.Module, str] | None:
    """The outermost ``transformers`` model in ``stateful`` and its prefix in the state dict, or None.

    With several models side by side (a teacher and a student), the first one registered is taken (logged).
    """
    base = _pretrained_class()
    held = _root_module(stateful) if base is not None else None
    if held is None or base is None:
        return None
    root, raw = held
    found: list[tuple[str, torch.nn.Module]] = []
    for path, module in root.named_modules():
        if isinstance(module, base) and not any(path.startswith(f"{p}.") or not p for p, _ in found):
            found.append((path, module))
    if not found:
        return None
    path, model = found[0]
    if len(found) > 1:
        log.warning("several transformers models found (%s); the export describes %r, pass --prefix (and its "
                    "config.json) for another", [p for p, _ in found], path)
    return model, _state_dict_prefix(root, path, raw)


def _hf_class(model: torch.nn.Module, base: type) -> type:
    """The ``PreTrainedModel`` subclass of ``model``, past the classes torch makes around it (``FSDPGPT2...``)."""
    for cls in type(model).__mro__:
        if issubclass(cls, base) and not cls.__module__.startswith("torch."):
            return cls
    return type(model)


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    named: Iterator[tuple[str, torch.Tensor]] = model.named_parameters(remove_duplicate=False)
    return dict(named)


def _tied(model: torch.nn.Module) -> dict[str, str]:
    """Derived key -> kept key, for each tie ``transformers`` declares that holds in the live model."""
    declared = getattr(model, "all_tied_weights_keys", None)  # transformers 5: the expanded, effective ties
    if not isinstance(declared, dict):
        raw = getattr(model, "_tied_weights_keys", None) or []  # a dict in transformers 5, a list before
        declared = dict(raw) if isinstance(raw, dict) else dict.fromkeys(raw)
    parameters = _parameters(model)
    tied: dict[str, str] = {}
    for derived, kept in declared.items():
        value = parameters.get(str(derived))
        if value is None:
            continue
        if kept is None:  # transformers 4 lists only the derived key: the kept one shares its Parameter
            kept = next((n for n, p in parameters.items() if p is value and n != derived and n not in declared), None)
        if kept is not None and parameters.get(str(kept)) is value:
            tied[str(derived)] = str(kept)
    return tied


def _json(config: Any, use_diff: bool) -> dict[str, Any] | None:
    try:
        return json.loads(config.to_json_string(use_diff=use_diff))
    except (AttributeError, TypeError, ValueError) as exc:
        log.warning("cannot record %s (%s); the export will not write it", type(config).__name__, exc)
        return None


def describe_hf_model(stateful: Any) -> HFModelRecord | None:
    """The manifest record of the ``transformers`` model in ``stateful`` (see the module docstring), or None."""
    found = find_hf_model(stateful)
    base = _pretrained_class()
    if found is None or base is None:
        return None
    model, prefix = found
    cls = _hf_class(model, base)
    config = _json(model.config, use_diff=False)
    if config is None:
        return None
    config["architectures"] = [cls.__name__]
    generation = None
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate() and getattr(model, "generation_config", None) is not None:
        generation = _json(model.generation_config, use_diff=True)
    version = getattr(sys.modules.get("transformers"), "__version__", "")
    return HFModelRecord(cls.__name__, cls.__module__, prefix, config, generation, _tied(model), str(version))

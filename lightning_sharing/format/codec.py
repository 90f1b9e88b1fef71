"""Split a state dict into tensors (for safetensors) and a JSON structure, and back, without pickle.

A *flat* state (a non-empty ``dict[str, Tensor]``, e.g. ``module.state_dict()``) is stored as tensors
alone, under its own names. Any other state becomes a JSON tree in which tensors are references
by name. Tensors that are the same view of the same memory (tied weights) are stored once and
restored as one tensor object.

Example:
    >>> import torch
    >>> enc = encode_state({"step": 3, "w": torch.ones(2)})
    >>> sorted(enc.tensors), enc.flat
    (['w'], False)
    >>> decode_state(enc.tree, enc.tensors, enc.ties)["step"]
    3
"""

from __future__ import annotations

import base64
import math
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_sharing.errors import CorruptCheckpointError, UnsupportedStateError

__all__ = ["EncodedState", "decode_state", "encode_state", "is_dtensor", "is_flat_tensor_dict", "tree_entries",
           "tree_from_entries", "tree_tensor_names"]


@dataclass
class EncodedState:
    """The storable form of a state dict."""

    tree: Any
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    ties: dict[str, str] = field(default_factory=dict)  # alias name -> stored name
    flat: bool = False
    #: Shard group of a tensor (an incremental save's ``frozen`` or ``stable``); absent: the default group.
    groups: dict[str, str] = field(default_factory=dict)


def is_flat_tensor_dict(state: Any) -> bool:
    """True for a non-empty mapping of string keys to tensors (a module's state dict)."""
    return (
        isinstance(state, Mapping)
        and len(state) > 0
        and all(isinstance(k, str) for k in state)
        and all(isinstance(v, torch.Tensor) for v in state.values())
    )


def is_dtensor(value: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (False where torch has no distributed support)."""
    if not isinstance(value, torch.Tensor):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no DTensor
        return False
    return isinstance(value, DTensor)


def _describe_dtensor(tensor: Any) -> str:
    return (f"a DTensor of global shape {list(tensor.shape)} with placements {tuple(tensor.placements)} on a "
            f"mesh of shape {tuple(tensor.device_mesh.shape)}")


class _Encoder:
    def __init__(self, component: str, dtensors: bool = False) -> None:
        self.component = component
        self.dtensors = dtensors
        self.tensors: dict[str, torch.Tensor] = {}
        self.ties: dict[str, str] = {}
        self._by_view: dict[tuple[Any, ...], str] = {}
        self._storages: set[int] = set()

    def add_tensor(self, name: str, tensor: torch.Tensor, path: str) -> str:
        if tensor.is_sparse or tensor.layout is not torch.strided:
            raise UnsupportedStateError(
                f"component {self.component!r}: tensor at {path} has layout {tensor.layout}; only dense "
                "tensors can be stored (convert with .to_dense())"
            )
        if tensor.is_complex():
            raise UnsupportedStateError(
                f"component {self.component!r}: tensor at {path} is complex ({tensor.dtype}); store "
                "torch.view_as_real(t) instead"
            )
        name = self._unique(name)
        tensor = tensor.detach()
        # A DTensor has no storage of its own (data_ptr() fails): its local piece has.
        local = tensor
        if is_dtensor(tensor):
            if not self.dtensors:
                raise UnsupportedStateError(
                    f"component {self.component!r}: tensor {name!r} at {path} is {_describe_dtensor(tensor)}: "
                    "its pieces live on different ranks, which only a SHARDED component stores; declare "
                    f"StateComponent({self.component!r}, ..., SharingPattern.SHARDED)"
                )
            local = tensor.to_local()
        storage_ptr = local.untyped_storage().data_ptr() if local.numel() else 0
        view = (storage_ptr, local.storage_offset(), tuple(tensor.shape), tuple(local.stride()),
                tensor.dtype, str(tensor.device), str(getattr(tensor, "placements", "")))
        if storage_ptr and view in self._by_view:
            self.ties[name] = self._by_view[view]
            return name
        if storage_ptr:
            self._by_view[view] = name
            if storage_ptr in self._storages:
                # Overlapping but different views: safetensors refuses shared memory, so copy.
                tensor = tensor.clone()
            self._storages.add(storage_ptr)
        self.tensors[name] = tensor
        return name

    def _unique(self, name: str) -> str:
        name = name or "tensor"
        candidate, n = name, 1
        while candidate in self.tensors or candidate in self.ties:
            candidate, n = f"{name}~{n}", n + 1
        return candidate

    def encode(self, value: Any, path: str, name: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            # float() first: numpy's float64 is a float whose repr is "np.float64(nan)".
            return float(value) if math.isfinite(value) else {"__float__": repr(float(value))}
        if isinstance(value, torch.Tensor):
            return {"__tensor__": self.add_tensor(name, value, path)}
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, torch.Size):
            return {"__size__": list(value)}
        if isinstance(value, torch.device):
            return {"__device__": str(value)}
        if isinstance(value, pathlib.PurePath):
            return {"__path__": str(value)}
        if isinstance(value, (bytes, bytearray)):
            return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
        ndarray = _numpy_array_type()
        if ndarray is not None and isinstance(value, ndarray):
            try:
                tensor = torch.from_numpy(value.astype(value.dtype.newbyteorder("="), copy=True))
            except (TypeError, ValueError) as exc:
                raise UnsupportedStateError(
                    f"component {self.component!r}: numpy array at {path} has dtype {value.dtype}, which "
                    "cannot be stored as a tensor; convert it to a numeric array or a list"
                ) from exc
            return {"__ndarray__": self.add_tensor(name, tensor, path)}
        if _is_numpy_scalar(value):
            return self.encode(value.item(), path, name)
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, f"{path}[{i}]", _join(name, i)) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{path}[{i}]", _join(name, i)) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            return {"__dict__": [
                [self.encode(k, f"{path} key", _join(name, "key")), self.encode(v, f"{path}[{k!r}]", _join(name, k))]
                for k, v in value.items()
            ]}
        raise UnsupportedStateError(
            f"component {self.component!r}: value at {path} has type {type(value).__module__}."
            f"{type(value).__qualname__}, which cannot be stored without pickle; return tensors, numbers, "
            "strings, bytes, paths, lists, tuples or dicts from state_dict()"
        )


def _join(name: str, part: Any) -> str:
    """Tensor names are dotted paths, like a module's parameter names: ``state.0.exp_avg``."""
    return f"{name}.{part}" if name else str(part)


def _numpy_array_type() -> Any:
    try:
        import numpy
    except ImportError:  # numpy is optional for the codec
        return None
    return numpy.ndarray


def _is_numpy_scalar(value: Any) -> bool:
    try:
        import numpy
    except ImportError:
        return False
    return isinstance(value, numpy.generic)


def encode_state(state: Any, component: str = "?", *, dtensors: bool = False) -> EncodedState:
    """Split ``state`` into storable parts; raises ``UnsupportedStateError`` for unpicklable-only values.

    ``dtensors=True`` keeps ``DTensor``s as they are (a SHARDED component writes their local chunks);
    otherwise a DTensor is refused with a message naming the component, the tensor and SHARDED.
    """
    encoder = _Encoder(component, dtensors)
    if is_flat_tensor_dict(state):
        for name, tensor in state.items():
            encoder.add_tensor(name, tensor, f"state[{name!r}]")
        return EncodedState(tree=None, tensors=encoder.tensors, ties=encoder.ties, flat=True)
    tree = encoder.encode(state, "state", "")
    return EncodedState(tree=tree, tensors=encoder.tensors, ties=encoder.ties, flat=False)


def _lookup(tensors: Mapping[str, torch.Tensor], ties: Mapping[str, str], name: Any) -> torch.Tensor:
    if not isinstance(name, str):
        raise CorruptCheckpointError(f"tensor reference {name!r} is not a string")
    stored = ties.get(name, name)
    if stored not in tensors:
        raise CorruptCheckpointError(f"the checkpoint refers to tensor {name!r}, which no tensor file holds")
    return tensors[stored]


def _decode(node: Any, tensors: Mapping[str, torch.Tensor], ties: Mapping[str, str]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors, ties) for v in node]
    if isinstance(node, dict) and len(node) == 1:
        (tag, payload), = node.items()
        if tag == "__tensor__":
            return _lookup(tensors, ties, payload)
        if tag == "__ndarray__":
            return _lookup(tensors, ties, payload).numpy()
        if tag == "__tuple__" and isinstance(payload, list):
            return tuple(_decode(v, tensors, ties) for v in payload)
        if tag == "__dict__" and isinstance(payload, list):
            result = {}
            for pair in payload:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise CorruptCheckpointError(f"malformed dict entry {pair!r} in state structure")
                key = _decode(pair[0], tensors, ties)
                if isinstance(key, list):
                    raise CorruptCheckpointError(f"unhashable dict key {key!r} in state structure")
                result[key] = _decode(pair[1], tensors, ties)
            return result
        if tag == "__float__" and payload in ("nan", "inf", "-inf"):
            return float(payload)
        if tag == "__bytes__" and isinstance(payload, str):
            return base64.b64decode(payload.encode("ascii"), validate=True)
        if tag == "__dtype__" and isinstance(payload, str):
            dtype = getattr(torch, payload, None)
            if not isinstance(dtype, torch.dtype):
                raise CorruptCheckpointError(f"unknown dtype {payload!r} in state structure")
            return dtype
        if tag == "__size__" and isinstance(payload, list):
            return torch.Size(int(v) for v in payload)
        if tag == "__path__" and isinstance(payload, str):
            return pathlib.Path(payload)
        if tag == "__device__" and isinstance(payload, str):
            return torch.device(payload)
    raise CorruptCheckpointError(f"unrecognised node {str(node)[:200]!r} in state structure")


def decode_state(tree: Any, tensors: Mapping[str, torch.Tensor], ties: Mapping[str, str] | None = None,
                 flat: bool = False) -> Any:
    """Rebuild the state dict from ``encode_state``'s parts (tied names share one tensor object)."""
    ties = dict(ties or {})
    if flat:
        state = dict(tensors)
        for alias in ties:
            state[alias] = _lookup(tensors, ties, alias)
        return state
    return _decode(tree, tensors, ties)


def tree_tensor_names(tree: Any) -> set[str]:
    """The stored tensor names an encoded tree refers to (before resolving ties)."""
    names: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict) and len(node) == 1:
            (tag, payload), = node.items()
            if tag in ("__tensor__", "__ndarray__") and isinstance(payload, str):
                names.add(payload)
            elif isinstance(payload, list):
                stack.extend(payload)
    return names


def tree_entries(tree: Any) -> list[tuple[Any, Any, Any]] | None:
    """For an encoded mapping: ``(key, encoded key, encoded value)`` per entry; None for anything else.

    Lets a loader pick the entries of a saved mapping that a live state holds (a pipeline stage's).
    """
    if not (isinstance(tree, dict) and set(tree) == {"__dict__"} and isinstance(tree["__dict__"], list)):
        return None
    entries = []
    for pair in tree["__dict__"]:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise CorruptCheckpointError(f"malformed dict entry {str(pair)[:200]!r} in state structure")
        key = _decode(pair[0], {}, {})
        if isinstance(key, list):
            raise CorruptCheckpointError(f"unhashable dict key {key!r} in state structure")
        entries.append((key, pair[0], pair[1]))
    return entries


def tree_from_entries(entries: list[tuple[Any, Any, Any]]) -> Any:
    """The encoded mapping holding ``entries`` (as ``tree_entries`` returns them)."""
    return {"__dict__": [[key_node, value] for _, key_node, value in entries]}

"""Counting spies on ``torch.distributed``: each call is counted, with the bytes it delivers to this rank, then run.

``install()`` wraps the collectives in a worker process (real process groups, real gloo: a spy only counts and calls
through). Two views are kept:

- ``calls``: the calls the package makes through the ``torch.distributed`` namespace (``all_gather_object`` counts
  once), what a reader of our code sees;
- ``wire``: every tensor collective, including those torch's object collectives run inside (``all_gather_object``
  is an ``all_gather`` of sizes and one of the padded data), and ``received``: the bytes each delivered to this rank
  (an all-reduce's result, a broadcast on a rank other than the source, the other ranks' parts of an all-gather, a
  gather's parts on its destination only, a received message).

Example (in a worker, after ``init_process_group``):
    >>> spy = install()                          # doctest: +SKIP
    >>> coordinator.save_checkpoint(path)        # doctest: +SKIP
    >>> spy.snapshot()                           # doctest: +SKIP
    {'calls': {'all_reduce': 2, ...}, 'wire': {...}, 'received': 176}
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

__all__ = ["CollectiveSpy", "install"]

_TENSOR_OPS = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "gather", "scatter", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv", "isend",
               "irecv", "barrier", "monitored_barrier", "batch_isend_irecv")
_OBJECT_OPS = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
               "send_object_list", "recv_object_list")


def _nbytes(tensor: Any) -> int:
    return int(tensor.numel() * tensor.element_size()) if isinstance(tensor, torch.Tensor) else 0


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _received(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The bytes collective ``name`` delivers to this rank (see the module docstring)."""
    rank = dist.get_rank()
    if name == "all_reduce":
        return _nbytes(_arg(args, kwargs, 0, "tensor"))
    if name == "broadcast":
        return 0 if _arg(args, kwargs, 1, "src", 0) == rank else _nbytes(_arg(args, kwargs, 0, "tensor"))
    if name == "all_gather":
        outputs, own = _arg(args, kwargs, 0, "tensor_list", []), _arg(args, kwargs, 1, "tensor")
        return sum(_nbytes(t) for t in outputs) - _nbytes(own)
    if name == "all_gather_into_tensor":
        return _nbytes(_arg(args, kwargs, 0, "output_tensor")) - _nbytes(_arg(args, kwargs, 1, "input_tensor"))
    if name == "gather":
        if _arg(args, kwargs, 2, "dst", 0) != rank:
            return 0
        return sum(_nbytes(t) for t in _arg(args, kwargs, 1, "gather_list", None) or []) - _nbytes(
            _arg(args, kwargs, 0, "tensor"))
    if name == "scatter":
        return 0 if _arg(args, kwargs, 2, "src", 0) == rank else _nbytes(_arg(args, kwargs, 0, "tensor"))
    if name in ("recv", "irecv"):
        return _nbytes(_arg(args, kwargs, 0, "tensor"))
    return 0


class CollectiveSpy:
    """Counts of the calls made since ``reset()`` (see the module docstring)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.wire: Counter[str] = Counter()
        self.received = 0

    def reset(self) -> None:
        self.calls.clear()
        self.wire.clear()
        self.received = 0

    def snapshot(self) -> dict[str, Any]:
        """The counts so far, as plain data: ``calls``, ``wire`` (by name) and ``received`` (bytes)."""
        return {"calls": dict(self.calls), "wire": dict(self.wire), "received": self.received}

    def _wire(self, name: str, original: Any) -> Any:
        @functools.wraps(original)
        def spy(*args: Any, **kwargs: Any) -> Any:
            self.wire[name] += 1
            self.received += _received(name, args, kwargs)
            return original(*args, **kwargs)

        return spy

    def _api(self, name: str, target: Any) -> Any:
        @functools.wraps(target)
        def spy(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return target(*args, **kwargs)

        return spy


_INSTALLED: CollectiveSpy | None = None


def install() -> CollectiveSpy:
    """Wrap ``torch.distributed``'s collectives in this process (once); return the spy that counts them."""
    global _INSTALLED
    if _INSTALLED is not None:
        return _INSTALLED
    spy = CollectiveSpy()
    for name in _TENSOR_OPS:
        original = getattr(c10d, name, None)
        if original is None:
            continue
        wire = spy._wire(name, original)
        setattr(c10d, name, wire)  # what torch's own object collectives call
        setattr(dist, name, spy._api(name, wire))  # what the package calls
    for name in _OBJECT_OPS:
        original = getattr(dist, name, None)
        if original is not None:
            setattr(dist, name, spy._api(name, original))
    _INSTALLED = spy
    return spy

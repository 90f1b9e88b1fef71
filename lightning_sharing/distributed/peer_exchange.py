"""Point-to-point byte exchanges between pairs of ranks (the local tier's replicas), over a gloo group.

``exchange_bytes(sends, receives)`` is collective over the pairs it names: every rank passes what it sends to whom
and from whom it receives, and every pair must be named alike on both ends (the caller derives them from the same
plan on every rank). A rank that has nothing valid to send still sends a failure notice (``None``), so that no
receiver waits for bytes that never come: a failure is an answer, never a hang. The lengths travel first, then the
bytes, each as non-blocking sends and receives waited on together (no ordering deadlock).

Example (rank 0 sends to rank 2, rank 2 receives from rank 0):
    >>> got = exchange_bytes({2: b"abc"} if rank == 0 else {}, [0] if rank == 2 else [], group)  # doctest: +SKIP
    >>> got                                              # on rank 2                             # doctest: +SKIP
    {0: b'abc'}
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from lightning_sharing.distributed.basics import peer_failures

__all__ = ["exchange_bytes"]

_LENGTH_TAG, _DATA_TAG = 7301, 7302


def exchange_bytes(sends: Mapping[int, bytes | bytearray | memoryview | None], receives: Sequence[int], group: Any,
                   phase: str = "sending local checkpoint files to peer nodes") -> dict[int, memoryview | None]:
    """Send ``sends[dst]`` (any bytes-like object, sent without a copy) to each ``dst`` and receive one message from
    each rank of ``receives``; returns the received bytes by source (None: the source sent a failure notice).
    ``group`` spans every rank (a gloo group: the tensors stay on the CPU whatever the default backend); ranks are
    global ranks."""
    with peer_failures(phase):
        views = {dst: None if data is None else memoryview(data).cast("B") for dst, data in sends.items()}
        lengths = {dst: torch.tensor([-1 if view is None else len(view)], dtype=torch.int64)
                   for dst, view in views.items()}
        incoming = {src: torch.zeros(1, dtype=torch.int64) for src in receives}
        _wait([dist.isend(lengths[dst], dst, group=group, tag=_LENGTH_TAG) for dst in lengths]
              + [dist.irecv(incoming[src], src, group=group, tag=_LENGTH_TAG) for src in incoming])
        # Not zero-filled first (a bytearray would be): the receive writes every byte.
        buffers = {src: torch.empty(int(length.item()), dtype=torch.uint8) for src, length in incoming.items()
                   if length.item() > 0}
        requests = [dist.isend(_tensor_of(view), dst, group=group, tag=_DATA_TAG)
                    for dst, view in views.items() if view is not None and len(view)]
        requests += [dist.irecv(buffer, src, group=group, tag=_DATA_TAG) for src, buffer in buffers.items()]
        _wait(requests)
    empty = memoryview(b"")
    return {src: (None if length.item() < 0 else memoryview(buffers[src].numpy()) if src in buffers else empty)
            for src, length in incoming.items()}


def _tensor_of(view: memoryview) -> torch.Tensor:
    """A uint8 tensor over ``view``'s memory (no copy; a read-only buffer is only read, by the send)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=torch.uint8)


def _wait(requests: list[Any]) -> None:
    for request in requests:
        request.wait()

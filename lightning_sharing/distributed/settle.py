"""The commit step: every rank's report goes to rank 0 alone, rank 0 decides, every rank hears the verdict.

A commit needs what every rank wrote, on rank 0 only, and every rank needs rank 0's verdict. ``settle_on_rank_zero``
does it in two collectives whose size on a rank other than 0 does not depend on the world size: a ``gather`` to
rank 0 of each rank's report (padded to a capacity the ranks agreed on beforehand, e.g. in a ``Ballot``), and a
broadcast of rank 0's verdict (a few bytes when it is "done"). A report longer than the capacity makes rank 0 ask
for every report again with room for it (one more gather and verdict); an error that does not fit in the verdict
follows in one broadcast more.

The verdict keeps the agreement's guarantees: when some rank failed its ``phase``, every rank raises the error
``agreement(phase)`` would (same message, same class); when rank 0's ``decide`` fails, every rank raises it as a
failure of ``decide_phase`` on rank 0. Rank 0 receives every report: O(N) there, O(1) on every other rank.

Example (every rank):
    >>> settle_on_rank_zero("writing checkpoint files", error, written, "committing checkpoint",
    ...                     lambda reports: commit(reports), capacity=4096)           # doctest: +SKIP
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lightning_sharing.distributed.basics import (
    agreed_error,
    broadcast_object,
    collective_device,
    get_rank,
    group_size,
    outcome_of,
    peer_failures,
)
from lightning_sharing.format.gc_pause import collection_paused

__all__ = ["VERDICT_BYTES", "report_size", "settle_on_rank_zero"]

T = TypeVar("T")

#: Bytes of a verdict sent inline (more: one broadcast follows); a successful commit's verdict takes about 20.
VERDICT_BYTES = 120
_HEADER = 8  # a report's or verdict's length, little-endian, before its bytes


def _pickle(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def report_size(payload: Any, error: BaseException | None = None) -> int:
    """The bytes ``payload`` (with ``error``) takes in ``settle_on_rank_zero``: what its capacity must hold."""
    return len(_pickle((outcome_of(error), payload)))


def _framed(data: bytes, room: int) -> torch.Tensor:
    """``data``'s length, then ``data`` itself when it fits in ``room`` bytes, zero-padded to ``room``."""
    frame = bytearray(_HEADER + room)
    frame[:_HEADER] = len(data).to_bytes(_HEADER, "little")
    if len(data) <= room:
        frame[_HEADER:_HEADER + len(data)] = data
    return torch.frombuffer(frame, dtype=torch.uint8).clone()


def _unframed(frame: torch.Tensor) -> tuple[int, bytes]:
    raw = frame.cpu().numpy().tobytes()
    return int.from_bytes(raw[:_HEADER], "little"), raw[_HEADER:]


def _gather(data: bytes, capacity: int, group: Any, phase: str) -> list[bytes | int] | None:
    """Rank 0: every rank's report (its bytes, or its length where it did not fit); None elsewhere."""
    device = collective_device(group)
    frame = _framed(data, capacity).to(device)
    rank = get_rank()
    slots = [torch.empty(_HEADER + capacity, dtype=torch.uint8, device=device)
             for _ in range(group_size(group))] if rank == 0 else None
    with peer_failures(phase):
        dist.gather(frame, slots, dst=0, group=group)
    if slots is None:
        return None
    parts: list[bytes | int] = []
    for source, slot in enumerate(slots):
        length, raw = (len(data), data) if source == 0 else _unframed(slot)
        parts.append(raw[:length] if length <= capacity or source == 0 else length)
    return parts


def _verdict_from_zero(verdict: Any, group: Any, phase: str) -> Any:
    """Rank 0's ``verdict`` on every rank: one broadcast of ``VERDICT_BYTES`` (and one more when it is longer)."""
    device = collective_device(group)
    data = _pickle(verdict) if get_rank() == 0 else b""
    frame = _framed(data, VERDICT_BYTES).to(device)
    with peer_failures(phase):
        dist.broadcast(frame, src=0, group=group)
    length, raw = _unframed(frame)
    if length <= VERDICT_BYTES:
        return pickle.loads(raw[:length])
    return broadcast_object(verdict, group=group, phase=phase)


def _decide(parts: list[bytes | int], phase: str, decide_phase: str,
            decide: Callable[[list[Any]], Any]) -> tuple[tuple[Any, ...], BaseException | None]:
    """Rank 0: the verdict on every rank's report, and ``decide``'s own exception (to chain on rank 0)."""
    missing = [part for part in parts if isinstance(part, int)]
    if missing:
        return ("resend", max(missing)), None
    # Unpickling N reports (a sharded model's index parts: millions of objects on thousands of ranks) and committing
    # them without the cyclic collector: at 64 ranks of a 70B model it was 6 of the 7 seconds (format/gc_pause.py).
    with collection_paused():
        reports = [pickle.loads(part) for part in parts]  # type: ignore[arg-type]
        failed = {rank: outcome for rank, (outcome, _) in enumerate(reports) if outcome is not None}
        if failed:
            return ("fail", phase, {r: text for r, (_, text) in failed.items()}, [k for k, _ in failed.values()]), None
        try:
            return ("done", decide([payload for _, payload in reports])), None
        except Exception as exc:  # raised on every rank below, as rank 0's failure of decide_phase
            kind, text = outcome_of(exc)  # type: ignore[misc]
            return ("fail", decide_phase, {0: text}, [kind]), exc


def settle_on_rank_zero(phase: str, error: BaseException | None, payload: Any, decide_phase: str,
                        decide: Callable[[list[Any]], T], *, capacity: int, group: Any = None) -> T:
    """Collective: ``payload`` (this rank's result of ``phase``, or its ``error``) reaches rank 0, which runs
    ``decide(payloads by rank)`` once no rank failed; every rank returns its result or raises the same error.

    ``capacity``: the largest report (``report_size``) of any rank but 0, the same on every rank: reports are padded
    to it. ``decide`` runs on rank 0 only and must not run collectives; its result should be small (it is sent to
    every rank). ``group``: as for ``agreement``.
    """
    data = _pickle((outcome_of(error), payload))
    cause: BaseException | None = None
    if group_size(group) == 1:
        verdict, cause = _decide([data], phase, decide_phase, decide)
    else:
        while True:
            parts = _gather(data, capacity, group, phase)
            verdict = None
            if parts is not None:
                verdict, cause = _decide(parts, phase, decide_phase, decide)
            verdict = _verdict_from_zero(verdict, group, decide_phase)
            if verdict[0] != "resend":
                break
            capacity = verdict[1]
    if verdict[0] == "done":
        return verdict[1]
    _, failed_phase, failures, kinds = verdict
    raise agreed_error(failed_phase, failures, kinds) from (error if failed_phase == phase else cause)

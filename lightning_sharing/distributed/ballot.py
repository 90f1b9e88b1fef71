"""One agreement step for several phases and checks at once: in the success path, one all-reduce of a few integers.

An agreement step turns a failure on any rank into the same error on every rank. A save has several phases before
anything is committed (collecting the state, checking replicas, encoding, rank 0 beginning the write), values every
rank must hold alike (the declarations, the path, the replicated state's digests) and values rank 0 gives the others
(where to write). A ``Ballot`` agrees on all of them with a single all-reduce (max) whose size does not depend on the
world size:

- ``run(phase, work)`` / ``record(phase, error)``: work whose exception becomes, on every rank, the error
  ``agreement`` raises for that phase (``basics.agreed_error``: same message, same class); on a rank where a phase
  failed, the later phases' work is skipped;
- ``equal(value, judge)``: a value every rank must hold alike, compared by a 62-bit hash (the max of ``h`` and of
  ``-h`` are equal only when every rank's ``h`` is); ``judge(values by rank)`` returns the error to raise when they
  differ; ``hashed(value)`` is a hash-only field whose differences ``judge(name, value, judge)`` items explain;
- ``from_rank_zero(capacity)``: bytes rank 0 gives every rank (a longer value costs one broadcast more);
- ``maximum()``: the largest of the ranks' values.

The fields are reserved in the same order on every rank, whatever the rank's own data, so that the all-reduce
always matches. Only when a phase failed or a check differs are the outcomes gathered (``all_gather_object``, every
rank's report), to name the failing ranks and causes; every rank then raises the error of the first failed item, in
the order the items were added.

Example (every rank):
    >>> ballot = Ballot("preparing the checkpoint")                                    # doctest: +SKIP
    >>> ballot.equal(declaration, judge=lambda decls: None if len(set(decls)) == 1 else ValueError(decls))
    >>> states = ballot.run("collecting state dicts", collect)
    >>> root = ballot.from_rank_zero(capacity=96)
    >>> root.set(write_root.encode() if rank == 0 else None)
    >>> ballot.agree()                                  # raises the same error everywhere, or returns
    >>> root.value                                      # rank 0's bytes, on every rank
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist
import xxhash

from lightning_sharing.distributed.basics import (
    agreed_error,
    all_gather_object,
    broadcast_object,
    get_rank,
    group_size,
    outcome_of,
    reduce_ints,
)
from lightning_sharing.errors import DistributedCheckpointError

__all__ = ["ABSENT", "Ballot", "Field", "judge_equal", "stable_hash"]

_HASH_BITS = (1 << 62) - 1
_WORD = 7  # bytes per int64 word of rank 0's data: non-negative, so the max over the ranks is rank 0's word
_NONE = -1  # what ranks other than 0 (and rank 0 without data) contribute to rank 0's fields
_LOWEST = -(1 << 63)  # what a rank outside a check contributes to it: never the max
#: ``Field.set(ABSENT)``: this rank takes no part in a hash check (it holds another instance's state).
ABSENT = object()

Judge = Callable[[list[Any]], BaseException | None]


def stable_hash(value: Any) -> int:
    """A 62-bit hash of plain data (bytes, str, or JSON-able with sorted keys), the same in every process.

    Example:
        >>> stable_hash(["model", "replicated"]) == stable_hash(["model", "replicated"])
        True
    """
    if isinstance(value, str):
        value = value.encode("utf-8")
    elif not isinstance(value, (bytes, bytearray)):
        value = json.dumps(value, sort_keys=True, default=repr).encode("utf-8")
    return xxhash.xxh3_64_intdigest(bytes(value)) & _HASH_BITS


class Field:
    """A reserved place in a ballot's all-reduce: ``set`` this rank's value before ``agree``; ``value`` after it."""

    def __init__(self, kind: str, size: int, capacity: int = 0) -> None:
        self.kind, self.size, self.capacity = kind, size, capacity
        self._mine: Any = None
        self.value: Any = None
        self.overflowed = False  # rank 0's bytes did not fit: they follow in a broadcast

    def set(self, value: Any) -> None:
        """This rank's value: any plain data (``equal``, ``hashed``), bytes on rank 0 (``from_rank_zero``), an int."""
        self._mine = value

    def _contribution(self, rank: int) -> list[int]:
        if self.kind == "hash":
            if self._mine is ABSENT:
                return [_LOWEST, _LOWEST]
            digest = stable_hash(self._mine)
            return [digest, -digest]
        if self.kind == "max":
            return [int(self._mine or 0)]
        data = self._mine if rank == 0 else None
        if data is None:
            return [_NONE] * self.size
        words = [int.from_bytes(data[i:i + _WORD], "little") for i in range(0, len(data), _WORD)]
        fits = len(data) <= self.capacity
        return [len(data)] + (words if fits else []) + [0] * (self.size - 1 - (len(words) if fits else 0))

    def _read(self, values: list[int]) -> bool:
        """Take the result; False when it needs more (rank 0's bytes did not fit)."""
        if self.kind == "hash":
            self.value = values[0] == -values[1]
        elif self.kind == "max":
            self.value = values[0]
        elif values[0] == _NONE:
            self.value = None
        elif values[0] > self.capacity:
            self.value, self.overflowed = None, True
            return False
        else:
            length = values[0]
            raw = b"".join(word.to_bytes(_WORD, "little") for word in values[1:1 + math.ceil(length / _WORD)])
            self.value = raw[:length]
        return True


class Ballot:
    """One agreement step over phases, checks and shared values (see the module docstring).

    ``name`` says what the step is about in the error raised when the ranks cannot communicate; ``group`` spans
    every rank (the background saver's own gloo group), None is the default group.
    """

    def __init__(self, name: str, group: Any = None) -> None:
        self.name, self.group = name, group
        self._fields: list[Field] = []
        self._items: list[tuple[str, str, Callable[[], Any] | None, Judge | None]] = []  # kind, name, value, judge
        self._errors: dict[str, BaseException] = {}
        self.first_error: BaseException | None = None

    # ------------------------------------------------------------------ phases
    def record(self, phase: str, error: BaseException | None = None) -> None:
        """Add ``phase``, failed here with ``error`` (None: it succeeded, or did not run here)."""
        self._items.append(("phase", phase, None, None))
        if error is not None:
            self._errors[phase] = error
            self.first_error = self.first_error or error

    def run(self, phase: str, work: Callable[[], Any] | None) -> Any:
        """Add ``phase`` and run ``work`` (None: nothing to do on this rank); its exception is kept for ``agree``.

        Skipped (returns None) on a rank where an earlier phase failed.
        """
        if work is None or self.first_error is not None:
            self.record(phase)
            return None
        try:
            result = work()
        except Exception as exc:  # raised on every rank by agree()
            self.record(phase, exc)
            return None
        self.record(phase)
        return result

    @property
    def ok(self) -> bool:
        """No phase failed on this rank so far."""
        return self.first_error is None

    # ------------------------------------------------------------------ fields
    def equal(self, value: Any, judge: Judge, name: str = "") -> Field:
        """A value every rank must hold alike; ``judge(values by rank)`` is the error when they differ."""
        field = self.hashed(value)
        self.judge(name or f"check {len(self._items)}", lambda: field._mine, judge)
        return field

    def hashed(self, value: Any = None) -> Field:
        """A hash-only check (set the value later with ``set``); the ``judge`` items after it explain a difference."""
        field = self._add(Field("hash", 2))
        field.set(value)
        return field

    def judge(self, name: str, value: Callable[[], Any], judge: Judge) -> None:
        """Add an item evaluated only when the ballot failed: ``judge(every rank's value())`` or None."""
        self._items.append(("judge", name, value, judge))

    def from_rank_zero(self, capacity: int) -> Field:
        """Bytes rank 0 ``set``s, for every rank (None when rank 0 sets none); longer than ``capacity``: broadcast."""
        return self._add(Field("zero", 1 + math.ceil(capacity / _WORD), capacity))

    def maximum(self, value: int = 0) -> Field:
        """The largest of the ranks' values."""
        field = self._add(Field("max", 1))
        field.set(value)
        return field

    def _add(self, field: Field) -> Field:
        self._fields.append(field)
        return field

    # ------------------------------------------------------------------ the step
    def agree(self) -> None:
        """Collective: raise the first failed item's error on every rank, or fill every field's ``value``."""
        rank = get_rank()
        vector = [0 if self.first_error is None else 1]
        for field in self._fields:
            vector += field._contribution(rank)
        if group_size(self.group) == 1:
            reduced = vector
        else:
            reduced = reduce_ints(vector, dist.ReduceOp.MAX, self.group, phase=self.name)
        position, complete = 1, True
        for field in self._fields:
            complete = field._read(reduced[position:position + field.size]) and complete
            position += field.size
        if reduced[0] or not all(f.value for f in self._fields if f.kind == "hash"):
            self._fail()
        if not complete:  # rank 0's bytes did not fit: one broadcast (every rank saw the same lengths)
            for field in self._fields:
                if field.overflowed:
                    field.value = broadcast_object(field._mine if rank == 0 else None, group=self.group,
                                                   phase=self.name)

    def _fail(self) -> None:
        """Every rank's report, then the first failed item's error, raised on every rank."""
        report = {"errors": {phase: outcome_of(error) for phase, error in self._errors.items()},
                  "values": {name: value() for kind, name, value, _ in self._items if kind == "judge" and value}}
        reports = all_gather_object(report, self.group, phase=self.name)
        for kind, name, _, judge in self._items:
            if kind == "phase":
                failed = {r: rep["errors"][name] for r, rep in enumerate(reports) if name in rep["errors"]}
                if failed:
                    raise agreed_error(name, {r: text for r, (_, text) in failed.items()},
                                       [k for k, _ in failed.values()]) from self._errors.get(name, self.first_error)
            elif judge is not None:
                error = judge([rep["values"].get(name) for rep in reports])
                if error is not None:
                    raise error
        raise DistributedCheckpointError(f"{self.name}: the ranks hold different values where they must agree "
                                         f"(checks {[name for kind, name, _, _ in self._items if kind == 'judge']})")


def judge_equal(describe: Callable[[list[Any]], BaseException]) -> Judge:
    """A judge that calls ``describe(values)`` when the values are not all equal."""
    def judge(values: Sequence[Any]) -> BaseException | None:
        return None if all(v == values[0] for v in values) else describe(list(values))
    return judge

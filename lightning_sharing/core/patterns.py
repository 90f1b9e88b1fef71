"""The vocabulary: how a piece of state is shared (``SharingPattern``) and how replicas are checked
(``ValidationLevel``).

Example:
    >>> SharingPattern.parse("per_rank"), ValidationLevel.parse("QUICK")
    (PER_RANK, QUICK)
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from lightning_sharing.errors import ComponentDeclarationError

__all__ = ["Choice", "ResizePolicy", "SharingPattern", "ValidationLevel", "parse_enum"]


class Choice(str, Enum):
    """An enum parsed from a member, its value or its name (any case); its ``repr`` is its name."""

    def __repr__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, value: Any) -> Any:
        """Accept an enum member, its value (``"per_rank"``) or its name (``"PER_RANK"``)."""
        return parse_enum(cls, value, _snake_case(cls.__name__))


def _snake_case(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


class SharingPattern(Choice):
    """How one piece of state is distributed across ranks (see the rule table in docs/patterns.md)."""

    GLOBAL = "global"
    PER_RANK = "per_rank"
    REPLICATED = "replicated"
    PER_GROUP = "per_group"
    PER_NODE = "per_node"
    SHARDED = "sharded"


class ValidationLevel(Choice):
    """How thoroughly REPLICATED state is compared across ranks before it is saved.

    - ``NONE``: no comparison.
    - ``QUICK``: structure, dtypes, shapes and a strided sample of every tensor's bytes.
    - ``TENSOR``: a full-content hash of every tensor and every non-tensor value.
    - ``FULL``: byte-for-byte comparison of every tensor against the writing rank's copy.
    """

    NONE = "none"
    QUICK = "quick"
    TENSOR = "tensor"
    FULL = "full"


class ResizePolicy(Choice):
    """What loading rank-specific state (PER_RANK, PER_GROUP, PER_NODE) saved at another topology does.

    - ``ERROR``: refuse, naming the component and both topologies (the default).
    - ``RESEED``: every rank gets a fresh, deterministic state from its stateful's ``reseed(seed)``, the seed
      derived from the saved copies' checksums and the rank (RNG state: the streams differ per rank, are
      reproducible, and depend on what was saved).
    - ``MERGE``: rank 0 loads the first saved copy and merges every other one into it (the stateful's
      ``merge_state``, or the callable given as ``on_resize``); the other ranks start empty (``reset()``),
      so a metric's ``compute()`` covers every sample seen, once.
    - ``DROP``: every rank starts fresh (its current value), logged once.
    """

    ERROR = "error"
    RESEED = "reseed"
    MERGE = "merge"
    DROP = "drop"


def parse_enum(cls: Any, value: Any, what: str) -> Any:
    """``value`` as a member of enum ``cls``: a member, its value or its name (any case)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        for member in cls:
            if value.lower() in (member.value, member.name.lower()):
                return member
    choices = ", ".join(m.name for m in cls)
    raise ComponentDeclarationError(f"{what}={value!r} is not one of {choices}")

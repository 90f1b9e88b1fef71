"""Failures named by the component they happened to: what every step of a save or a load wraps its work in.

Example:
    >>> with_context("model", "writing", lambda: 1)
    1
    >>> with_context("model", "writing", lambda: 1 / 0)
    Traceback (most recent call last):
    ...
    lightning_sharing.errors.CheckpointError: component 'model': writing failed: ZeroDivisionError: division by zero
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from lightning_sharing.errors import CheckpointError, DistributedCheckpointError

__all__ = ["with_context"]

T = TypeVar("T")


def with_context(key: str, action: str, fn: Callable[[], T]) -> T:
    """Run ``fn``; re-raise any failure as a ``CheckpointError`` (of the same kind) that names the component."""
    try:
        return fn()
    except DistributedCheckpointError:
        raise
    except CheckpointError as exc:
        if f"component {key!r}" in str(exc):
            raise
        raise type(exc)(f"component {key!r}: {action} failed: {exc}") from exc
    except Exception as exc:
        raise CheckpointError(f"component {key!r}: {action} failed: {type(exc).__name__}: {exc}") from exc

"""Which copy format a pattern uses: the rule's ``files`` record picks its implementation, once.

The rule table says, as data, how a pattern's copies are laid out in files (``WholeTensorFiles`` or
``ChunkFiles``); this module maps each kind of record to its ``CopyFormat`` implementation. A new copy
format adds a record in ``core/rules.py``, an implementation in the engine, and one entry to
``_IMPLEMENTATIONS`` below.

Example:
    >>> from lightning_sharing.core.patterns import SharingPattern
    >>> type(format_for(SharingPattern.SHARDED)).__name__, type(format_for("per_rank")).__name__
    ('ChunkFormat', 'WholeTensorFormat')
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from lightning_sharing.core.patterns import SharingPattern
from lightning_sharing.core.rules import RULES, ChunkFiles, CopyFiles, WholeTensorFiles, rule
from lightning_sharing.engine.chunk_format import ChunkFormat
from lightning_sharing.engine.copy_format import CopyFormat
from lightning_sharing.engine.whole_format import WholeTensorFormat

__all__ = ["all_formats", "format_for"]

_IMPLEMENTATIONS: dict[type, Callable[[Any], CopyFormat]] = {
    WholeTensorFiles: WholeTensorFormat,
    ChunkFiles: ChunkFormat,
}


@cache
def _format_of(files: CopyFiles) -> CopyFormat:
    return _IMPLEMENTATIONS[type(files)](files)


def format_for(pattern: SharingPattern | str) -> CopyFormat:
    """The copy format of ``pattern``'s copies, from its rule's ``files`` record."""
    return _format_of(rule(pattern).files)


def all_formats() -> list[CopyFormat]:
    """Every copy format the rule table uses, each once, in the table's order."""
    formats: list[CopyFormat] = []
    for pattern_rule in RULES.values():
        fmt = _format_of(pattern_rule.files)
        if fmt not in formats:
            formats.append(fmt)
    return formats

"""``collection_paused()``: Python's cyclic garbage collector off while a block builds millions of objects.

Each collection that the allocations trigger walks every tracked object still alive, so building a structure of
millions of objects (a sharded model's chunk index on thousands of ranks, parsed from JSON or unpickled from every
rank's report) spends most of its time collecting nothing: at 64 ranks of a 70B model, ``json.loads`` of a chunk
index took 2.0 s with the collector on and 0.18 s with it off (``benchmarks/scale_sim.py``). The objects built
hold no reference cycles; the collector runs again when the block ends.

Example:
    >>> import json
    >>> with collection_paused():
    ...     data = json.loads("[1, 2, 3]")
    >>> data
    [1, 2, 3]
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["collection_paused"]


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """The cyclic garbage collector disabled inside the block (left as it was found when the block ends)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()

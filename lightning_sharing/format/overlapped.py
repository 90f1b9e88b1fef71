"""Work done on a helper thread, in order, while the caller produces the next item (hashing beside file I/O).

Writing a file and hashing it are both long GIL-free calls (``os.write``, xxhash), so on a machine with
a spare core the hash of the piece just written costs almost nothing if a helper thread computes it
while the caller writes the next one. ``Overlapped`` is that helper: ``submit`` hands it an item, the
helper runs ``work(item)`` on each in submission order, and ``finish`` waits for all of them and
raises the first error ``work`` raised. A thread per use, not a pool: it must also work in processes
forked from this one. With ``threaded=False`` the work runs inline in ``submit`` (small files: a
thread would cost more than it saves).

Example:
    >>> import xxhash
    >>> digest = xxhash.xxh3_128()
    >>> with Overlapped(digest.update, threaded=True) as hashing:
    ...     hashing.submit(b"piece one")
    ...     hashing.submit(b"piece two")
    ...     hashing.finish()
    >>> digest.hexdigest() == xxhash.xxh3_128(b"piece onepiece two").hexdigest()
    True
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Overlapped"]

Item = TypeVar("Item")
_STOP = object()


class Overlapped(Generic[Item]):
    """Runs ``work(item)`` for every submitted item, in order, on one helper thread (or inline).

    ``bound`` > 0 makes ``submit`` wait while that many items are queued, for items that hold memory
    (a temporary copy of a GPU or strided tensor) until they are processed. After ``work`` fails, the
    remaining items are dropped unprocessed, so ``submit`` never blocks for ever, and ``finish``
    raises the error. Leaving the ``with`` block stops the thread without raising (the caller is
    already unwinding or has called ``finish``).
    """

    def __init__(self, work: Callable[[Item], object], *, threaded: bool, bound: int = 0) -> None:
        self._work = work
        self._error: BaseException | None = None
        self._queue: queue.Queue[object] | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._queue = queue.Queue(maxsize=bound)
            self._thread = threading.Thread(target=self._run, name="lightning_sharing-hash", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self._queue is not None
        while (item := self._queue.get()) is not _STOP:
            if self._error is None:
                try:
                    self._work(item)  # type: ignore[arg-type]
                except BaseException as exc:  # handed to finish() on the caller's thread
                    self._error = exc

    def submit(self, item: Item) -> None:
        """Process ``item`` after every item submitted before it."""
        if self._queue is None:
            self._work(item)
        else:
            self._queue.put(item)

    def _stop(self) -> None:
        if self._queue is not None and self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._queue = None

    def finish(self) -> None:
        """Wait until every submitted item is processed (and stop the thread); raise ``work``'s first error."""
        self._stop()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> Overlapped[Item]:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

"""The one retry layer of object-store calls: transient failures retried with backoff, bounded in attempts and time.

A call is retried only when the store (or the network) said "not now": throttling (``SlowDown``, HTTP 429/503),
a server error (HTTP 500/502/504), a dropped, reset or timed-out connection, or a conflicting concurrent
conditional write (``ConditionalRequestConflict``, which S3 asks callers to retry). A definite answer (403, 404, 412, 400) never is.
Each retry is logged at WARNING; once ``attempts`` are spent or the next try would start after ``deadline``
seconds, ``TransientStoreError`` names the operation, the object, the attempts and the last cause. The
libraries' own retries are off (set up by the clients); only a streamed multipart upload's parts, which cannot
be sent again from here, are retried by the library, under the same attempts, deadline and timeout.

Example:
    >>> policy = RetryPolicy.of({"attempts": 4, "deadline": 30})
    >>> policy.call("put s3://bucket/key", lambda: 42)
    42
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from lightning_sharing.errors import TransientStoreError

__all__ = ["RetryPolicy", "describe", "http_status", "is_transient"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequestsException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "ServiceUnavailable", "InternalError", "RequestTimeout",
    "OperationAborted", "ConditionalRequestConflict",
})
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
# Connection failures, by class name where the class lives in an optional package (botocore, aiohttp, fsspec).
_TRANSIENT_CLASSES = frozenset({
    "HTTPClientError", "ConnectionClosedError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "ResponseStreamingError", "IncompleteReadError", "ClientConnectionError", "ClientPayloadError",
    "ServerDisconnectedError", "ClientOSError", "FSTimeoutError", "FileExpired",
})
# obstore reports HTTP failures as text: "... non-2xx status code: 503 Service Unavailable: <Error><Code>SlowDown..."
_STATUS_RE = re.compile(r"non-2xx status code: (\d{3})")
_CODE_RE = re.compile(r"<Code>(\w+)</Code>")
_NETWORK_TEXT = ("error sending request", "response body error", "connection", "timed out", "broken pipe")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a transient failure is retried, and when a silent connection counts as failed.

    ``attempts`` counts the first try (1: never retry); no retry starts later than ``deadline`` seconds after
    the first try. The delay before retry ``n`` is ``min(max_delay, initial_delay * 2 ** (n - 1))`` times a
    random factor in ``[0.5, 1]``. ``timeout``: seconds a connection may take to open, or stay silent while an
    answer is awaited, before the attempt fails (and is retried). Set it in ``storage_options={"retry": {...}}``.
    """

    attempts: int = 6
    deadline: float = 120.0
    initial_delay: float = 0.2
    max_delay: float = 10.0
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or min(self.deadline, self.initial_delay, self.max_delay) < 0 or self.timeout <= 0:
            raise ValueError(f"invalid retry policy {self}: attempts >= 1, delays >= 0 and timeout > 0 are required")

    @classmethod
    def of(cls, value: RetryPolicy | dict[str, Any] | None) -> RetryPolicy:
        """The policy ``value`` names: itself, one built from a dict of its fields, or the default (None)."""
        return value if isinstance(value, RetryPolicy) else cls(**(value or {}))

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        return min(self.max_delay, self.initial_delay * 2 ** (retry - 1)) * random.uniform(0.5, 1.0)

    def call(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, retried while it fails transiently; ``what`` (operation and URL) names it in logs and errors."""
        started = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            try:
                return call()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                pause = self.delay(attempt)
                if attempt == self.attempts or time.monotonic() + pause - started > self.deadline:
                    raise TransientStoreError(
                        f"{what} failed {attempt} time(s) in {time.monotonic() - started:.1f} s with transient errors, "
                        f"the last one {describe(exc)}; the store is throttling or unreachable: retry later, or lower "
                        "the load (fewer ranks writing at once, larger parts)"
                    ) from exc
                log.warning("%s: %s; retry %d of %d in %.2f s", what, describe(exc), attempt, self.attempts - 1, pause)
                time.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 8:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _answer(exc: BaseException) -> tuple[str | None, int | None] | None:
    """``(code, status)`` of the store's error answer carried by ``exc`` (botocore's, or obstore's text)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        return response["Error"].get("Code"), response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    status, code = _STATUS_RE.search(str(exc)), _CODE_RE.search(str(exc))
    return (code[1] if code else None, int(status[1])) if status else None


def _from_obstore(exc: BaseException) -> bool:  # its errors, or an OSError its writer made of one
    return type(exc).__module__.startswith("obstore") or "Error performing " in str(exc) or "HTTP error: " in str(exc)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of the first store answer in ``exc``'s cause chain (None: no answer came)."""
    return next((answer[1] for answer in map(_answer, _chain(exc)) if answer), None)


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` is worth retrying: throttling, a server-side error or a network failure."""
    for link in _chain(exc):
        answer = _answer(link)
        if answer is not None:
            return answer[0] in _TRANSIENT_CODES or answer[1] in _TRANSIENT_STATUS
        if isinstance(link, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return True
        if any(cls.__name__ in _TRANSIENT_CLASSES for cls in type(link).__mro__):
            return True
        if _from_obstore(link) and any(text in str(link).lower() for text in _NETWORK_TEXT):
            return True
    return False


def describe(exc: BaseException) -> str:
    """A one-line cause: ``SlowDown (HTTP 503)`` for a store's answer, else the error's type and first line."""
    answer = next(filter(None, map(_answer, _chain(exc))), None)
    if answer is not None:
        return f"{answer[0] or 'error'} (HTTP {answer[1]})"
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"

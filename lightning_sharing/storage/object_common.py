"""What every object-store path shares: its errors, ``ObjectInfo``, and bounded retries of transient failures.

A call is retried only when the store (or the network) said "not now": throttling (``SlowDown``,
HTTP 429/503), a server error (HTTP 500/502/504, ``InternalError``), a dropped or timed-out connection,
or a conflicting concurrent conditional write (``ConditionalRequestConflict``, HTTP 409, which S3 asks
callers to retry). A definite answer from the store (404, 403, 412, 400) is never retried. Each retry is
logged at WARNING with the operation, the error and the delay; after the last attempt the call raises
``TransientStoreError`` naming the operation and how often it was tried.

Below this layer botocore and s3fs have retries of their own (botocore's ``retries`` config, s3fs's
``retries`` attribute); these attempts are counted on top of theirs.

Example:
    >>> policy = RetryPolicy(attempts=4, initial_delay=0.1)
    >>> with_retries("put s3://bucket/key", lambda: 42, policy)
    42
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from lightning_sharing.errors import ObjectChangedError, ObjectExistsError, ObjectStoreError, TransientStoreError

__all__ = [
    "DEFAULT_RETRY",
    "ObjectChangedError",
    "ObjectExistsError",
    "ObjectInfo",
    "ObjectStoreError",
    "RetryPolicy",
    "TransientStoreError",
    "error_code",
    "is_transient",
    "with_retries",
    "with_retries_async",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeoutException", "OperationAborted",
    "ConditionalRequestConflict",
})
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
# Connection-level failures, by class name where the class lives in an optional package (botocore,
# aiohttp, fsspec) so that this module imports none of them.
_TRANSIENT_CLASSES = frozenset({
    "HTTPClientError", "ConnectionClosedError", "EndpointConnectionError", "ConnectTimeoutError",
    "ReadTimeoutError", "AioReadTimeoutError", "ResponseStreamingError", "IncompleteReadError",
    "ClientConnectionError", "ClientPayloadError", "ServerDisconnectedError", "ClientOSError",
    "FSTimeoutError",
})




@dataclass(frozen=True)
class ObjectInfo:
    """One object: its path as the filesystem names it (no protocol), size, modification time, version.

    ``mtime`` is seconds since the epoch by the store's clock (None where the store keeps none);
    ``version`` is the S3 ETag, None elsewhere.
    """

    path: str
    size: int
    mtime: float | None = field(default=None, compare=False)
    version: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient failure is retried.

    ``attempts`` counts the first try: ``attempts=1`` never retries. The delay before retry ``n``
    (1-based) is ``min(max_delay, initial_delay * 2 ** (n - 1))``, scaled by a random factor in
    ``[0.5, 1]`` so that ranks throttled together do not retry in lockstep.
    """

    attempts: int = 6
    initial_delay: float = 0.2
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial_delay < 0 or self.max_delay < 0:
            raise ValueError(f"invalid retry policy {self}: attempts >= 1 and non-negative delays are required")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        return min(self.max_delay, self.initial_delay * 2 ** (retry - 1)) * random.uniform(0.5, 1.0)


DEFAULT_RETRY = RetryPolicy()


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 8:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _response(exc: BaseException) -> dict | None:
    response = getattr(exc, "response", None)
    return response if isinstance(response, dict) and "Error" in response else None


def error_code(exc: BaseException) -> tuple[str | None, int | None, str | None]:
    """``(code, http_status, condition)`` of the first S3 error response in ``exc``'s cause chain.

    s3fs translates botocore's ``ClientError`` into ``OSError`` subclasses but keeps it as ``__cause__``;
    ``condition`` is the ``If-Match`` / ``If-None-Match`` header a 412 names.
    """
    for link in _chain(exc):
        response = _response(link)
        if response is not None:
            error = response.get("Error", {})
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return error.get("Code"), status, error.get("Condition")
    return None, None, None


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` is worth retrying: throttling, a server-side error or a network failure."""
    for link in _chain(exc):
        response = _response(link)
        if response is not None:
            code, status, _ = error_code(link)
            return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
        if isinstance(link, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return True
        if any(cls.__name__ in _TRANSIENT_CLASSES for cls in type(link).__mro__):
            return True
    return False


def _describe(exc: BaseException) -> str:
    code, status, _ = error_code(exc)
    if code is not None:
        return f"{code} (HTTP {status})"
    return f"{type(exc).__name__}: {exc}"


def _give_up(what: str, attempts: int, exc: BaseException) -> TransientStoreError:
    return TransientStoreError(
        f"{what} failed {attempts} time(s) with transient errors, the last one {_describe(exc)}; the store is "
        "throttling or unreachable: retry later, or lower the load (fewer ranks writing at once, larger parts)"
    )


def _retrying(what: str, attempt: int, policy: RetryPolicy, exc: BaseException) -> float:
    pause = policy.delay(attempt)
    log.warning("%s: %s; retry %d of %d in %.2f s", what, _describe(exc), attempt, policy.attempts - 1, pause)
    return pause


def with_retries(what: str, call: Callable[[], T], policy: RetryPolicy = DEFAULT_RETRY) -> T:
    """``call()``, retried with backoff while it fails transiently; ``what`` names it in logs and errors."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == policy.attempts:
                raise _give_up(what, attempt, exc) from exc
            time.sleep(_retrying(what, attempt, policy, exc))
    raise AssertionError("unreachable")  # pragma: no cover


async def with_retries_async(what: str, call: Callable[[], Awaitable[T]], policy: RetryPolicy = DEFAULT_RETRY) -> T:
    """The coroutine version of ``with_retries``: ``call`` makes a fresh awaitable for every attempt."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return await call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == policy.attempts:
                raise _give_up(what, attempt, exc) from exc
            await asyncio.sleep(_retrying(what, attempt, policy, exc))
    raise AssertionError("unreachable")  # pragma: no cover


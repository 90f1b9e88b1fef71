"""The one retry layer of object-store calls: transient failures (``is_transient``) retried with backoff, bounded in
attempts and time; definite answers (403, 404, 412, 400) never. The libraries' own retries are off, but for a streamed
upload's parts, which only the library can send again, under the same bounds (docs/storage.md, "Retries").

Example:
    >>> RetryPolicy.of({"attempts": 4, "deadline": 30}).call("put s3://bucket/key", lambda: 42)
    42
    >>> from lightning_sharing.storage.object_store import open_client
    >>> RetryingClient(*open_client("memory://bucket")[::2]).head("nothing/here") is None
    True
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from lightning_sharing.errors import CheckpointError, ObjectStoreError, TransientStoreError

__all__ = ["RetryPolicy", "RetryingClient", "describe", "http_status", "is_transient"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequestsException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "ServiceUnavailable", "InternalError", "RequestTimeout",
    "OperationAborted", "ConditionalRequestConflict"})
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_TRANSIENT_CLASSES = frozenset({  # connection failures of botocore, aiohttp and fsspec, by class name
    "HTTPClientError", "ConnectionClosedError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "ResponseStreamingError", "IncompleteReadError", "ClientConnectionError", "ClientPayloadError",
    "ServerDisconnectedError", "ClientOSError", "FSTimeoutError", "FileExpired"})
# obstore reports HTTP failures as text: "... non-2xx status code: 503 Service Unavailable: <Error><Code>SlowDown..."
_STATUS_RE, _CODE_RE = re.compile(r"non-2xx status code: (\d{3})"), re.compile(r"<Code>(\w+)</Code>")
_NETWORK_TEXT = ("error sending request", "response body error", "connection", "timed out", "broken pipe")
_OBSTORE_TEXT = ("Error performing ", "HTTP error: ")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long transient failures are retried, and when a silent connection has failed.

    ``attempts`` counts the first try (1: never retry); no retry starts later than ``deadline`` seconds after the
    first try; the pause before retry ``n`` is ``min(max_delay, initial_delay * 2 ** (n - 1))`` times a random factor
    in ``[0.5, 1]``. ``timeout``: seconds a connection may take to open, or stay silent while an answer is due,
    before the attempt fails. Set in ``storage_options={"retry": {...}}``.
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
        """``value`` itself, a policy of a dict of its fields, or the default (None)."""
        return value if isinstance(value, RetryPolicy) else cls(**(value or {}))

    def call(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, retried while it fails transiently; ``what`` (operation and URL) names it in logs and errors."""
        started = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            try:
                return call()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                pause = min(self.max_delay, self.initial_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                if attempt == self.attempts or time.monotonic() + pause - started > self.deadline:
                    raise TransientStoreError(
                        f"{what} failed {attempt} time(s) in {time.monotonic() - started:.1f} s with transient errors, "
                        f"the last one {describe(exc)}; the store is throttling or unreachable: retry later, or lower "
                        "the load (fewer ranks writing at once, larger parts)") from exc
                log.warning("%s: %s; retry %d of %d in %.2f s", what, describe(exc), attempt, self.attempts - 1, pause)
                time.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover


class RetryingClient:
    """An ``ObjectClient`` whose calls are retried under ``policy``, raising errors that name the operation and the
    object: ``FileNotFoundError`` (no such object), ``ObjectStoreError`` (a refusal, or a failure the library retried:
    ``TransientStoreError`` once transient), ours unchanged."""

    def __init__(self, client: Any, policy: RetryPolicy) -> None:
        self.client, self.policy, self.url, self.max_concurrency = client, policy, client.url, client.max_concurrency

    def run(self, what: str, call: Callable[[], T], retried: bool = True) -> T:
        """``call()``, retried unless ``retried`` is False (the library retried it); ``what``: operation and URL."""
        try:
            return self.policy.call(what, call) if retried else call()
        except FileNotFoundError as exc:  # the library's message may not say which object
            raise FileNotFoundError(errno.ENOENT, "no such object", what.split(" ", 1)[1]) from exc
        except CheckpointError:
            raise
        except Exception as exc:
            if not retried and is_transient(exc):
                raise TransientStoreError(f"{what} failed after {self.policy.attempts} attempt(s) with transient "
                                          f"errors, the last one {describe(exc)}") from exc
            raise ObjectStoreError(f"{what} failed: {describe(exc)}") from exc

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)

        def call(key: Any, *args: Any, **kwargs: Any) -> Any:
            where = f"{self.url}/{key}" if isinstance(key, str) else f"{len(key)} object(s) in {self.url}"
            return self.run(f"{name.replace('_into', '')} {where}", lambda: method(key, *args, **kwargs))

        return call


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 8:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


def _answer(exc: BaseException) -> tuple[str | None, int | None] | None:
    """``(code, status)`` of the store's error answer ``exc`` carries (botocore's, or in obstore's text)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        return response["Error"].get("Code"), response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    status, code = _STATUS_RE.search(str(exc)), _CODE_RE.search(str(exc))
    return (code[1] if code else None, int(status[1])) if status else None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of the first store answer in ``exc``'s cause chain (None: no answer came)."""
    return next((answer[1] for answer in map(_answer, _chain(exc)) if answer), None)


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` is worth retrying: throttling, a server-side error or a network failure."""
    for link in _chain(exc):
        answer = _answer(link)
        if answer is not None:
            return answer[0] in _TRANSIENT_CODES or answer[1] in _TRANSIENT_STATUS
        if isinstance(link, (ConnectionError, TimeoutError, asyncio.TimeoutError)) or any(
                cls.__name__ in _TRANSIENT_CLASSES for cls in type(link).__mro__):
            return True
        obstore = type(link).__module__.startswith("obstore") or any(t in str(link) for t in _OBSTORE_TEXT)
        if obstore and any(text in str(link).lower() for text in _NETWORK_TEXT):  # its errors, or its writer's
            return True
    return False


def describe(exc: BaseException) -> str:
    """A one-line cause: ``SlowDown (HTTP 503)`` for a store's answer, else the error's type and first line."""
    answer = next(filter(None, map(_answer, _chain(exc))), None)
    if answer is not None:
        return f"{answer[0] or 'error'} (HTTP {answer[1]})"
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"

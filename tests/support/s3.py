"""A real S3 API for tests: moto's server on loopback, and a proxy in front of it that injects faults.

``moto_server`` (session fixture) starts ``python -m moto.server`` on 127.0.0.1 (port 0: the server
picks a free one and prints it), waits until it answers, points the AWS environment variables at it
(for this process and every process the tests start), creates ``BUCKET``, and stops the server at the
end. Nothing of boto or fsspec is mocked: clients talk HTTP to the server.

``FaultProxy`` forwards HTTP to moto, except for the requests a ``Rule`` matches, which get a real
fault: a 503 ``SlowDown`` (throttling), another S3 error, a reset connection, an answer dropped after
moto carried the request out (the client never hears of its success), an answer reset mid-body, a
stall past the client's timeout, or a hold until several matching requests are in flight at once
(proving concurrency without timing). It also counts the body bytes it answers (``bytes_sent``): the traffic a
client really fetched, and the request body bytes it receives (``bytes_received``): what a client really uploaded.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

BUCKET = "lightning-sharing-tests"
_START_TIMEOUT_S = 90


def s3_environment(endpoint_url: str) -> dict[str, str]:
    """Environment for clients of the test server; no profile, config file or instance metadata is consulted."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1, its output in ``log``."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.endpoint_url = ""
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "w") as handle:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self.endpoint_url:
            self._check_alive()
            found = re.search(r"Running on (http://127\.0\.0\.1:\d+)", self.log.read_text())
            if found:
                self.endpoint_url = found.group(1)
            elif time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto server printed no address in {_START_TIMEOUT_S} s:\n{self.log.read_text()}")
            else:
                time.sleep(0.1)
        while True:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto server at {self.endpoint_url} did not answer:\n{self.log.read_text()}")
            time.sleep(0.1)

    def _check_alive(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {self._proc.returncode}:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=15)
        self._proc = None


@dataclass
class Rule:
    """Which requests get which fault: ``action`` for the first ``times`` requests that match.

    ``action``: ``"slowdown"`` (503 SlowDown), ``"error"`` (``status`` with S3 error ``code``), ``"reset"``
    (the connection is reset before anything is forwarded), ``"drop_answer"`` (forwarded, carried out by
    moto, then the connection is closed without an answer), ``"reset_body"`` (forwarded, then the answer's
    status, headers and half its body are sent and the connection is reset), ``"stall"`` (nothing is
    forwarded or answered for ``stall`` seconds, then the connection is reset: a client whose timeout is
    shorter gives up first) or ``"hold"`` (kept until ``times`` matching requests are waiting at once, then
    all forwarded; ``hold_timeout`` later they go on regardless, and ``timed_out`` says so). A request
    matches when its method is ``method`` (any if None) and its path with query contains every string in
    ``contains``; the first ``after`` matching requests are let through untouched.
    """

    action: str
    times: int = 1
    method: str | None = None
    contains: tuple[str, ...] = ()
    status: int = 403
    code: str = "AccessDenied"
    hold_timeout: float = 30.0
    after: int = 0
    stall: float = 30.0
    hits: int = 0
    passed: int = 0
    timed_out: bool = False
    _arrived: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def matches(self, method: str, path: str) -> bool:
        return (self.method in (None, method)) and all(text in path for text in self.contains)


def _error_body(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>{uuid.uuid4().hex}</RequestId></Error>").encode()


_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream`` (moto), applying ``rules`` in order."""

    def __init__(self, upstream: str) -> None:
        match = re.fullmatch(r"http://([^:/]+):(\d+)/?", upstream)
        assert match, upstream
        self._upstream = (match.group(1), int(match.group(2)))
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str]] = []
        self.answered: list[tuple[str, str, int]] = []  # (method, path, body bytes sent back): real traffic
        self.received: list[tuple[str, str, int]] = []  # (method, path, request body bytes): what clients uploaded
        self.in_flight = 0
        self.max_in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._server.handle_error = self._handle_error  # type: ignore[method-assign]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def _handle_error(self, request: object, address: object) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client that went away (a timeout, an abort) is no error
            ThreadingHTTPServer.handle_error(self._server, request, address)

    def add(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        return rule

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def count(self, method: str, *contains: str) -> int:
        """How many requests with this method and these substrings arrived."""
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and all(text in p for text in contains))

    def bytes_sent(self, method: str, *contains: str) -> int:
        """The body bytes answered to requests with this method and these substrings (e.g. what GETs fetched)."""
        with self._lock:
            return sum(n for m, p, n in self.answered if m == method and all(text in p for text in contains))

    def bytes_received(self, method: str, *contains: str) -> int:
        """The request body bytes of requests with this method and these substrings (e.g. what PUTs uploaded)."""
        with self._lock:
            return sum(n for m, p, n in self.received if m == method and all(text in p for text in contains))

    def _decide(self, method: str, path: str) -> Rule | None:
        with self._lock:
            self.requests.append((method, path))
            for rule in self.rules:
                if rule.hits < rule.times and rule.matches(method, path):
                    if rule.passed < rule.after:
                        rule.passed += 1
                        continue
                    rule.hits += 1
                    return rule
        return None

    def _track(self, kind: str, delta: int) -> None:
        with self._lock:
            self.in_flight += delta
            if delta > 0:
                self.max_in_flight[kind] = max(self.max_in_flight.get(kind, 0), self.in_flight)

    def _forward(self, method: str, path: str, headers: dict[str, str],
                 body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self._upstream, timeout=120)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def finish(self) -> None:
                with contextlib.suppress(OSError, ValueError):  # a connection we reset on purpose
                    super().finish()

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes, length: str | None) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", length if length is not None else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                    with proxy._lock:
                        proxy.answered.append((self.command, self.path, len(body)))

            def _handle(self) -> None:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    raise RuntimeError("the fault proxy does not handle chunked request bodies")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.received.append((self.command, self.path, len(body)))
                kind = f"{self.command} {'part' if 'partNumber=' in self.path else 'other'}"
                proxy._track(kind, +1)  # from arrival to answer: what the client has in flight at once
                try:
                    self._serve(proxy._decide(self.command, self.path), body)
                finally:
                    proxy._track(kind, -1)

            def _serve(self, rule: Rule | None, body: bytes) -> None:
                action = rule.action if rule else "forward"
                if rule is not None and action == "slowdown":
                    self._reply(503, [("Content-Type", "application/xml")],
                                _error_body("SlowDown", "Please reduce your request rate."), None)
                    return
                if rule is not None and action == "error":
                    self._reply(rule.status, [("Content-Type", "application/xml")],
                                _error_body(rule.code, "injected by the test proxy"), None)
                    return
                if action == "reset":
                    self._reset()
                    return
                if rule is not None and action == "stall":
                    time.sleep(rule.stall)
                    self._reset()
                    return
                if rule is not None and action == "hold":
                    with rule._arrived:
                        rule._arrived.notify_all()
                        if not rule._arrived.wait_for(lambda: rule.hits >= rule.times, timeout=rule.hold_timeout):
                            rule.timed_out = True
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                status, answer_headers, data = proxy._forward(self.command, self.path, headers, body)
                if action == "drop_answer":
                    self._reset()
                    return
                if action == "reset_body":  # the status and headers arrive, then half the body, then a reset
                    self.send_response(status)
                    for name, value in answer_headers:
                        if name.lower() not in _HOP_HEADERS:
                            self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self._reset()
                    return
                kept = [(k, v) for k, v in answer_headers if k.lower() not in _HOP_HEADERS | {"content-length"}]
                length = next((v for k, v in answer_headers if k.lower() == "content-length"), None)
                self._reply(status, kept, data, length if self.command == "HEAD" else None)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """The session's moto server, with the AWS environment pointed at it and ``BUCKET`` created."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN"):
            patch.delenv(name, raising=False)
        for name, value in s3_environment(server.endpoint_url).items():
            patch.setenv(name, value)
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3(moto_server: MotoServer):
    """A fresh ``S3FileSystem`` for the test server, configured from the environment as a user's would be."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture
def s3_prefix(s3) -> Iterator[str]:
    """A prefix of its own in ``BUCKET`` for one test (``bucket/t-<hex>``), emptied afterwards."""
    prefix = f"{BUCKET}/t-{uuid.uuid4().hex[:12]}"
    yield prefix
    s3.invalidate_cache()
    if s3.find(prefix):
        s3.rm(prefix, recursive=True)


@pytest.fixture
def fault_proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    """A ``FaultProxy`` in front of the test server, for one test."""
    proxy = FaultProxy(moto_server.endpoint_url)
    try:
        yield proxy
    finally:
        proxy.close()


def proxied_s3(proxy: FaultProxy):
    """An ``S3FileSystem`` talking through ``proxy``, with botocore's and s3fs's own retries turned off, so a
    fault reaches lightning_sharing's retry layer (the one under test) at its first occurrence."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=proxy.url, skip_instance_cache=True,
                           config_kwargs={"retries": {"total_max_attempts": 1, "mode": "standard"}})
    fs.retries = 1
    return fs

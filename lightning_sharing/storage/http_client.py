"""A read-only ``ObjectClient`` for ``http://`` and ``https://``: a checkpoint directory served by any web server.

Files are read with GET (``Range`` for parts; a server that ignores ranges answers the whole file, and the part is
cut from it) and HEAD; listings come from the server's directory pages (the links of an HTML index, as Python's
``http.server``, nginx's ``autoindex`` or Apache serve them). Nothing is written: saving to such a URL is refused.
Only the standard library is used (no fsspec event loop or thread is left behind). ``storage_options["headers"]``
are sent with every request (an ``Authorization`` header, say).

Example:
    >>> HttpClient.open("http", "127.0.0.1:8000", {}, RetryPolicy()).url
    'http://127.0.0.1:8000'
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from typing import Any

from lightning_sharing.errors import ObjectStoreError
from lightning_sharing.format.safetensors_io import bytes_checksum
from lightning_sharing.storage.client import ObjectInfo
from lightning_sharing.storage.retry import RetryPolicy

__all__ = ["HttpClient"]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href") if tag == "a" else None
        if href and not href.startswith(("?", "#", "/", "../")) and "://" not in href:
            self.links.append(urllib.parse.unquote(href))


class HttpClient:
    """Reads ``scheme://host[:port]/key`` (see the module docstring); every write raises ``ObjectStoreError``."""

    max_concurrency = 4
    read_only = True  # ObjectStore.begin_save refuses a save before anything is attempted

    def __init__(self, url: str, headers: dict[str, str], timeout: float) -> None:
        self.url, self._headers, self._timeout = url, headers, timeout

    @classmethod
    def open(cls, scheme: str, host: str, options: dict[str, Any], policy: RetryPolicy) -> HttpClient:
        """The client for ``scheme://host``; only ``headers`` of ``options`` apply."""
        unknown = sorted(set(options) - {"headers"})
        if unknown:
            raise ValueError(f"storage_options {unknown} do not apply to {scheme}:// (only 'headers')")
        return cls(f"{scheme}://{host}", dict(options.get("headers") or {}), policy.timeout)

    def _open(self, key: str, method: str = "GET", headers: dict[str, str] | None = None) -> Any:
        url = f"{self.url}/{urllib.parse.quote(key)}"
        request = urllib.request.Request(url, method=method, headers={**self._headers, **(headers or {})})
        try:
            return urllib.request.urlopen(request, timeout=self._timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(f"{url}: no such file (HTTP 404)") from exc
            # The retry layer reads the status from this text, as from obstore's errors.
            raise ObjectStoreError(f"{method} {url}: non-2xx status code: {exc.code} {exc.reason}") from exc
        except urllib.error.URLError as exc:  # refused, reset, timed out: worth another try
            raise ConnectionError(f"{method} {url}: {exc.reason}") from exc

    def get(self, key: str) -> tuple[bytes, str]:
        with self._open(key) as response:
            data = response.read()
            return data, response.headers.get("ETag") or bytes_checksum(data)

    def read_into(self, key: str, start: int, view: memoryview) -> int:
        try:
            response = self._open(key, headers={"Range": f"bytes={start}-{start + len(view) - 1}"})
        except ObjectStoreError as exc:
            if "status code: 416" in str(exc):  # the range starts past the end
                return 0
            raise
        with response:
            data = response.read()
            if response.status == 200:  # the server ignored the range: the whole file came
                data = data[start:start + len(view)]
        view[:len(data)] = data
        return len(data)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            with self._open(key, "HEAD") as response:
                # A directory's URL is redirected to its index page ("key/"): not a file.
                if response.geturl().endswith("/") and not key.endswith("/"):
                    return None
                return ObjectInfo(key, int(response.headers.get("Content-Length") or 0))
        except FileNotFoundError:
            return None

    def list(self, prefix: str, *, delimiter: bool) -> tuple[list[str], list[ObjectInfo]]:
        try:
            with self._open(prefix if prefix.endswith("/") or not prefix else f"{prefix}/") as response:
                parser = _Links()
                parser.feed(response.read().decode("utf-8", "replace"))
        except FileNotFoundError:
            return [], []
        base = prefix if prefix.endswith("/") or not prefix else f"{prefix}/"
        dirs = sorted(f"{base}{link.rstrip('/')}" for link in set(parser.links) if link.endswith("/"))
        files = [info for link in sorted(set(parser.links)) if not link.endswith("/")
                 if (info := self.head(f"{base}{link}")) is not None]
        if delimiter:
            return dirs, files
        for sub in dirs:
            files += self.list(f"{sub}/", delimiter=False)[1]
        return [], sorted(files)

    def _read_only(self, *_: Any, **__: Any) -> Any:
        raise ObjectStoreError(f"{self.url} is read-only: lightning_sharing reads checkpoints over http(s) but "
                               "cannot save there; save to a local path or an object store (s3://, ...)")

    put = delete = copy = open_writer = abort_upload = _read_only

    def uploads(self, prefix: str) -> list[tuple[str, str]]:
        return []  # nothing was ever uploaded here

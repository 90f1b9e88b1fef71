"""``ObjectClient`` on ``obstore`` (Rust, ``object_store``) for ``s3://``: conditional puts, ranged GETs, multipart.

Puts are ``obstore.put`` with ``mode="create"`` (``If-None-Match: *``) or ``{"e_tag": ...}`` (``If-Match``); streamed
writes ``open_writer`` (parts uploaded concurrently; leaving it with an error aborts the upload). s3fs-style
``storage_options`` are translated into obstore's configuration (``endpoint_url`` -> ``endpoint``, ``key`` /
``secret`` / ``token``, ``anon``, ``client_kwargs``' region and credentials, ``config_kwargs``' timeouts and
addressing style, server-side encryption, ``requester_pays``); credentials otherwise come from the environment as
obstore reads them (variables, web identity, instance metadata; not AWS profiles). When an option has no
obstore equivalent (or a profile would be needed) ``open`` returns None and logs why: the fsspec client is used.
obstore cannot list unfinished multipart uploads: those two calls go to s3fs, when it is installed.

Example:
    >>> client = ObstoreClient.open("s3", "bucket", {"endpoint_url": "http://127.0.0.1:9000"}, RetryPolicy())
    >>> client.put("run/x.json", b"{}", create=True)                              # doctest: +SKIP
    '"99914b932bd37a50b983c5e7c90ae93b"'
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

from lightning_sharing.format.safetensors_io import bytes_checksum
from lightning_sharing.storage.client import ObjectInfo, refused
from lightning_sharing.storage.retry import RetryPolicy, http_status

__all__ = ["ObstoreClient", "s3_config"]

log = logging.getLogger(__name__)

_SIMPLE = {"endpoint_url": "endpoint", "key": "access_key_id", "secret": "secret_access_key", "token": "session_token",
           "anon": "skip_signature", "requester_pays": "request_payer", "region_name": "region",
           "aws_access_key_id": "access_key_id", "aws_secret_access_key": "secret_access_key",
           "aws_session_token": "session_token", "ServerSideEncryption": "server_side_encryption",
           "SSEKMSKeyId": "sse_kms_key_id"}
# Options of fsspec itself (caching, block sizes) or of a connection obstore sets up its own way: nothing to carry.
_IGNORED = {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths", "default_block_size",
            "default_fill_cache", "default_cache_type", "use_ssl", "max_concurrency", "asynchronous", "loop",
            "retries", "connect_timeout", "read_timeout", "fixed_upload_size"}


def s3_config(options: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """obstore's ``S3Config`` for s3fs-style ``options``, and why they cannot be translated (None: they can).

    Example:
        >>> s3_config({"endpoint_url": "http://minio:9000", "client_kwargs": {"region_name": "eu-west-1"}})
        ({'endpoint': 'http://minio:9000', 'region': 'eu-west-1'}, None)
        >>> s3_config({"profile": "dev"})[1]
        "storage option(s) ['profile'] have no obstore equivalent"
    """
    config: dict[str, Any] = {}
    untranslated: list[str] = []
    nested = ("client_kwargs", "config_kwargs", "s3_additional_kwargs")
    flat = [(k, v) for k, v in options.items() if k not in nested]
    flat += [(k, v) for name in nested for k, v in (options.get(name) or {}).items()]
    for name, value in flat:
        if name in _SIMPLE:
            config[_SIMPLE[name]] = value
        elif name == "s3" and set(value) <= {"addressing_style"}:
            config["virtual_hosted_style_request"] = value.get("addressing_style") == "virtual"
        elif name not in _IGNORED:
            untranslated.append(name)
    if not untranslated and os.environ.get("AWS_PROFILE") and not (
            config.get("access_key_id") or os.environ.get("AWS_ACCESS_KEY_ID")):
        untranslated.append("AWS_PROFILE (from the environment)")
    return config, (f"storage option(s) {sorted(untranslated)} have no obstore equivalent" if untranslated else None)


class ObstoreClient:
    """An ``ObjectClient`` on obstore for one S3 bucket (see the module docstring)."""

    max_concurrency = 8

    def __init__(self, store: Any, stream_store: Any, url: str, uploads: Any = None) -> None:
        self._store, self._stream_store, self.url = store, stream_store, url
        self._uploads_client = uploads

    @classmethod
    def open(cls, scheme: str, bucket: str, options: dict[str, Any], policy: RetryPolicy) -> ObstoreClient | None:
        """The client for ``scheme://bucket``, or None (logged) where obstore cannot serve it."""
        config, reason = s3_config(options) if scheme in ("s3", "s3a") else ({}, f"obstore is not used for {scheme}://")
        try:
            from obstore.store import S3Store
        except ImportError:
            reason = reason or "obstore is not installed (pip install 'lightning_sharing[s3]')"
        if reason:
            log.info("%s://%s: using the fsspec client: %s", scheme, bucket, reason)
            return None
        given = options.get("config_kwargs") or {}  # botocore's timeouts, if the options set them
        timeouts = {name: timedelta(seconds=given.get(name, policy.timeout)) for name in ("connect_timeout",
                                                                                       "read_timeout")}
        timeouts.update(timeout=timedelta(seconds=max(policy.deadline, policy.timeout)), allow_http=True)
        backoff = {"init_backoff": timedelta(seconds=policy.initial_delay), "base": 2.0,
                   "max_backoff": timedelta(seconds=policy.max_delay)}

        def store(retries: int) -> Any:
            return S3Store(bucket, config=config, client_options=timeouts, retry_config={
                "max_retries": retries, "backoff": backoff, "retry_timeout": timedelta(seconds=policy.deadline)})

        return cls(store(0), store(policy.attempts - 1), f"{scheme}://{bucket}", _S3Uploads(scheme, bucket, options))

    def put(self, key: str, data: bytes, *, create: bool = False, if_match: str | None = None) -> str:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        mode: Any = "create" if create else ({"e_tag": if_match} if if_match else "overwrite")
        try:
            result = obstore.put(self._store, key, data, mode=mode, use_multipart=False)
        except AlreadyExistsError as exc:
            raise refused(f"{self.url}/{key}", None) from exc
        except (PreconditionError, FileNotFoundError) as exc:
            if if_match is None:
                raise
            raise refused(f"{self.url}/{key}", if_match, gone=http_status(exc) == 404) from exc
        return result["e_tag"] or bytes_checksum(data)

    def get(self, key: str) -> tuple[bytes, str]:
        import obstore

        result = obstore.get(self._store, key)
        data = bytes(result.bytes())
        return data, result.meta["e_tag"] or bytes_checksum(data)

    def read_into(self, key: str, start: int, view: memoryview) -> int:
        import obstore

        try:
            data = obstore.get_range(self._store, key, start=start, length=len(view))
        except Exception as exc:
            if http_status(exc) == 416:  # the range starts past the end
                return 0
            raise
        view[:len(data)] = memoryview(data)
        return len(data)

    def head(self, key: str) -> ObjectInfo | None:
        import obstore

        try:
            return ObjectInfo(key, obstore.head(self._store, key)["size"])
        except FileNotFoundError:
            return None

    def list(self, prefix: str, *, delimiter: bool) -> tuple[list[str], list[ObjectInfo]]:
        import obstore

        if delimiter:
            found = obstore.list_with_delimiter(self._store, prefix.rstrip("/") or None)
            objects, dirs = found["objects"], sorted(found["common_prefixes"])
        else:
            objects, dirs = [meta for batch in obstore.list(self._store, prefix.rstrip("/") or None) for meta in batch], []
        return dirs, sorted((ObjectInfo(meta["path"], meta["size"]) for meta in objects), key=lambda info: info.key)

    def delete(self, keys: list[str]) -> None:
        import obstore

        if keys:
            obstore.delete(self._store, keys)

    def copy(self, source: str, target: str) -> None:
        import obstore

        obstore.copy(self._store, source, target)

    def open_writer(self, key: str, part_size: int) -> _Writer:
        return _Writer(self._stream_store, key, part_size)

    def uploads(self, prefix: str) -> list[tuple[str, str]]:
        return self._uploads_client.uploads(prefix) if self._uploads_client else []

    def abort_upload(self, key: str, upload_id: str) -> None:
        if self._uploads_client:
            self._uploads_client.abort_upload(key, upload_id)


class _S3Uploads:
    """Listing and aborting unfinished multipart uploads (obstore has no call for them), through s3fs if installed."""

    def __init__(self, scheme: str, bucket: str, options: dict[str, Any]) -> None:
        self._args, self._client = (scheme, bucket, options), None

    def _fsspec(self) -> Any:
        if self._client is None:
            from lightning_sharing.storage.fsspec_client import FsspecClient

            try:
                self._client = FsspecClient.open(*self._args, RetryPolicy(attempts=1))
            except ImportError:
                log.warning("s3fs is not installed: unfinished multipart uploads of killed writers are not found and "
                            "aborted (give the bucket a lifecycle rule that aborts them)")
                self._client = False
        return self._client

    def uploads(self, prefix: str) -> list[tuple[str, str]]:
        return self._fsspec().uploads(prefix) if self._fsspec() else []

    def abort_upload(self, key: str, upload_id: str) -> None:
        if self._fsspec():
            self._fsspec().abort_upload(key, upload_id)


class _Writer:
    """``obstore.open_writer``: ``commit`` completes the upload; ``abort`` leaves it with an error, which aborts it."""

    def __init__(self, store: Any, key: str, part_size: int) -> None:
        import obstore

        self._file = obstore.open_writer(store, key, buffer_size=part_size, max_concurrency=8)

    def write(self, data: memoryview) -> None:
        self._file.write(data)

    def commit(self) -> None:
        self._file.close()

    def abort(self) -> None:
        error = InterruptedError("upload aborted")
        self._file.__exit__(type(error), error, None)

"""The object-client interface the object store is built on, and ``open_client``, which picks an implementation.

An ``ObjectClient`` is bound to one bucket (``url``, e.g. ``s3://bucket``) and addresses objects by key. It does
one request's worth of work per call and no retries (``RetryPolicy`` retries the calls); its errors are the
library's, except the two answers a commit needs: ``ObjectExistsError`` (a create-only put found the object) and
``ObjectChangedError`` (a conditional put found another version, or none). Two implementations:
``FsspecClient`` (any fsspec filesystem: ``s3://``, ``gs://``, ``az://``, ``memory://``; public fsspec API) and
``ObstoreClient`` (``obstore``: S3, GCS, Azure). ``storage_options`` choose and configure them: ``"client"``
(``"obstore"`` or ``"fsspec"``) and ``"retry"`` (a ``RetryPolicy`` or a dict of its fields) are taken out first;
the rest are s3fs-style options (``endpoint_url``, ``key``, ``secret``, ``client_kwargs``, ...), translated for
obstore where they can be (else the fsspec client is used, and the log says why).

Example:
    >>> client, key, policy = open_client("memory://bucket/run/step=1.ckpt")
    >>> client.url, key, policy.attempts
    ('memory://bucket', 'run/step=1.ckpt', 6)
    >>> client.put(key + "/x.json", b"{}", create=True) == client.get(key + "/x.json")[1]
    True
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol

from lightning_sharing.errors import ObjectChangedError, ObjectExistsError, ObjectStoreError
from lightning_sharing.storage.retry import RetryPolicy

__all__ = ["ObjectClient", "ObjectInfo", "ObjectWriter", "open_client", "refused"]

log = logging.getLogger(__name__)

#: The client each scheme gets when ``storage_options`` name none (measured: docs/storage.md, "Clients").
DEFAULT_CLIENT = {"s3": "obstore", "s3a": "obstore"}
_OPEN: dict[tuple[Any, ...], ObjectClient] = {}


@dataclass(frozen=True)
class ObjectInfo:
    """One object: its key (relative to the client's bucket) and size."""

    key: str
    size: int


class ObjectWriter(Protocol):
    """A streamed (multipart) upload: nothing is visible until ``commit``; after ``abort`` nothing is left."""

    def write(self, data: memoryview) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class ObjectClient(Protocol):
    """The operations the object store needs (see the module docstring); keys are relative to ``url``."""

    url: str
    #: How many calls may usefully run at once from threads (1 for a store in this process's memory).
    max_concurrency: int

    def put(self, key: str, data: bytes, *, create: bool = False, if_match: str | None = None) -> str:
        """Store ``data`` in one request (create-only, or only over version ``if_match``); returns its version."""

    def get(self, key: str) -> tuple[bytes, str]:
        """The whole object and its version; ``FileNotFoundError`` when there is none."""

    def read_into(self, key: str, start: int, view: memoryview) -> int:
        """Fill ``view`` from byte ``start`` on with one ranged GET; returns the byte count (less at the end)."""

    def head(self, key: str) -> ObjectInfo | None:
        """The object at ``key``, or None."""

    def list(self, prefix: str, *, delimiter: bool) -> tuple[list[str], list[ObjectInfo]]:
        """``(child prefixes, objects)`` directly below ``prefix`` (``"a/b/"``, or ``""`` for the bucket), fresh;
        without ``delimiter``, no child prefixes and every object at any depth."""

    def delete(self, keys: list[str]) -> None:
        """Delete these objects (missing ones are fine), in as few requests as the store allows."""

    def copy(self, source: str, target: str) -> None:
        """Copy an object inside the store (server-side)."""

    def open_writer(self, key: str, part_size: int) -> ObjectWriter:
        """A multipart upload of parts of about ``part_size`` bytes, several in flight where the library can."""

    def uploads(self, prefix: str) -> list[tuple[str, str]]:
        """``(key, upload id)`` of the unfinished multipart uploads below ``prefix`` (invisible to ``list``)."""

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort one unfinished upload (its parts stop being stored and billed); one already gone is fine."""


def refused(where: str, if_match: str | None, gone: bool = False) -> ObjectStoreError:
    """What a refused conditional put raises: ``ObjectExistsError`` (create-only) or ``ObjectChangedError``."""
    if if_match is None:
        return ObjectExistsError(f"{where} already exists: another writer created it first")
    return ObjectChangedError(f"{where} {'was deleted' if gone else 'was changed by another writer'} since version "
                              f"{if_match} was read")


def open_client(url: str, storage_options: dict[str, Any] | None = None) -> tuple[ObjectClient, str, RetryPolicy]:
    """``(client, key, retry policy)`` for ``url`` (``scheme://bucket/key``); clients are reused within a process."""
    options = dict(storage_options or {})
    choice, policy = options.pop("client", None), RetryPolicy.of(options.pop("retry", None))
    scheme, _, rest = url.partition("://")
    bucket, _, key = rest.strip("/").partition("/")
    choice = choice or DEFAULT_CLIENT.get(scheme, "fsspec")
    if choice not in ("fsspec", "obstore"):
        raise ValueError(f"storage_options['client'] must be 'fsspec' or 'obstore', not {choice!r}")
    cache_key = (os.getpid(), scheme, bucket, choice, policy, json.dumps(options, sort_keys=True, default=repr))
    if cache_key not in _OPEN:
        client: ObjectClient | None = None
        if choice == "obstore":
            from lightning_sharing.storage.obstore_client import ObstoreClient

            client = ObstoreClient.open(scheme, bucket, options, policy)
        if client is None:
            from lightning_sharing.storage.fsspec_client import FsspecClient

            client = FsspecClient.open(scheme, bucket, options, policy)
        _OPEN[cache_key] = client
    return _OPEN[cache_key], key.rstrip("/"), policy

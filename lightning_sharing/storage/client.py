"""The object-client interface the object store runs on (``object_store.open_client`` picks an implementation).

An ``ObjectClient`` serves one bucket (``url``: ``s3://bucket``) and names objects by key. Each call is one request's
work, not retried (``retry.RetryingClient`` retries them); its errors are the library's, but for the two answers a
commit needs: ``ObjectExistsError`` (a create-only put found the object) and ``ObjectChangedError`` (a conditional
put found another version, or none). Implementations: ``obstore_client.ObstoreClient``, ``fsspec_client.FsspecClient``.

Example:
    >>> from lightning_sharing.storage.object_store import open_client
    >>> client, key, policy = open_client("memory://bucket/run/step=1.ckpt", {"retry": {"attempts": 3}})
    >>> client.url, key, policy.attempts
    ('memory://bucket', 'run/step=1.ckpt', 3)
    >>> client.put(key + "/x.json", b"{}", create=True) == client.get(key + "/x.json")[1]
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from lightning_sharing.errors import ObjectChangedError, ObjectExistsError, ObjectStoreError

__all__ = ["OWN_OPTIONS", "ObjectClient", "ObjectInfo", "ObjectWriter", "refused"]

#: The ``storage_options`` keys lightning_sharing takes for itself (the client, retries); the rest are the library's.
OWN_OPTIONS = frozenset({"client", "retry"})


@dataclass(frozen=True, order=True)
class ObjectInfo:
    """One object: its key (relative to the client's bucket), size and, from ``head``, its version (the ETag; None
    where the client does not know it)."""

    key: str
    size: int
    version: str | None = field(default=None, compare=False)


class ObjectWriter(Protocol):
    """A streamed (multipart) upload: nothing is visible before ``commit``; after ``abort`` nothing is left."""

    def write(self, data: memoryview) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class ObjectClient(Protocol):
    """The operations the object store needs; keys are relative to ``url``."""

    url: str
    max_concurrency: int  # how many calls may usefully run at once on threads (1: a store in this process)

    def put(self, key: str, data: bytes, *, create: bool = False, if_match: str | None = None) -> str:
        """Store ``data`` (only if absent, or only over version ``if_match``); returns its version."""

    def get(self, key: str) -> tuple[bytes, str]:
        """The whole object and its version (its ETag, or a checksum); ``FileNotFoundError`` if absent."""

    def read_into(self, key: str, start: int, view: memoryview) -> int:
        """One ranged GET into ``view`` from byte ``start``: the byte count (fewer at the object's end; a range
        starting past the end is the library's error, HTTP 416)."""

    def head(self, key: str) -> ObjectInfo | None:
        """The object at ``key`` (with its version), or None."""

    def list(self, prefix: str, *, delimiter: bool) -> tuple[list[str], list[ObjectInfo]]:
        """Sorted ``(child prefixes, objects)`` right below ``prefix`` (``"a/b/"``; ``""``: the bucket), fresh
        from the store; without ``delimiter``, every object below it and no prefixes."""

    def delete(self, keys: list[str]) -> None:
        """Delete these objects (absent ones are fine), in as few requests as the store allows."""

    def copy(self, source: str, target: str) -> None:
        """Copy an object inside the store (server-side)."""

    def open_writer(self, key: str, part_size: int) -> ObjectWriter:
        """A multipart upload of parts of about ``part_size`` bytes."""

    def uploads(self, prefix: str) -> list[tuple[str, str]]:
        """``(key, upload id)`` of the unfinished multipart uploads below ``prefix`` (``list`` does not show them)."""

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort an unfinished upload (its parts stop being stored and billed); one gone already is fine."""


def refused(where: str, if_match: str | None, gone: bool = False) -> ObjectStoreError:
    """What a refused conditional put raises: ``ObjectExistsError`` (create-only) or ``ObjectChangedError``."""
    if if_match is None:
        return ObjectExistsError(f"{where} already exists: another writer created it first")
    return ObjectChangedError(f"{where} {'was deleted' if gone else 'was changed by another writer'} since version "
                              f"{if_match} was read")

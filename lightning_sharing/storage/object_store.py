"""``ObjectStore``: checkpoints on an object store (``s3://``, ``memory://``, ...), committed without rename.

A save writes its files into a fresh generation of the checkpoint's prefix (``generations``) and commits by putting
the manifest last, conditionally (``If-None-Match: *``, or ``If-Match`` the version it replaces): a reader sees one
save's files, never a mix. Calls go to an ``ObjectClient`` through a ``RetryingClient``. More: docs/storage.md.

Example:
    >>> store = ObjectStore.for_url("memory://runs/demo")
    >>> target = store.normalize("memory://runs/demo/step=1.ckpt")
    >>> root = store.begin_save(target, "0" * 32)
    >>> with store.open_write(store.join(root, "x.json")) as sink:
    ...     _ = sink.write(b"{}")
    >>> store.commit(root, target, "0" * 32, b'{"data_prefix": "%s"}' % store.data_prefix(root, target).encode())
    >>> store.list_files(root)
    ['x.json']
"""

from __future__ import annotations

import errno
import json
import logging
import os
import uuid
from typing import Any, NamedTuple

from lightning_sharing._faults import fault_point
from lightning_sharing.errors import (
    CheckpointError,
    ComponentDeclarationError,
    ObjectChangedError,
    ObjectExistsError,
    ObjectStoreError,
)
from lightning_sharing.storage import generations as gen
from lightning_sharing.storage.base import MANIFEST_NAME, CheckpointStore
from lightning_sharing.storage.client import OWN_OPTIONS, ObjectClient
from lightning_sharing.storage.fsspec_client import FsspecClient
from lightning_sharing.storage.http_client import HttpClient
from lightning_sharing.storage.object_files import ObjectFileWriter, RangedReader
from lightning_sharing.storage.obstore_client import ObstoreClient
from lightning_sharing.storage.retry import RetryingClient, RetryPolicy

__all__ = ["DEFAULT_CLIENT", "ConditionalSupport", "ObjectStore", "open_client", "probe_conditional_writes"]

log = logging.getLogger(__name__)

#: The client a scheme gets when ``storage_options`` name none (measured: docs/storage.md, "Clients").
DEFAULT_CLIENT = {"s3": "obstore", "s3a": "obstore"}
_OPEN: dict[tuple[Any, ...], ObjectClient] = {}


def open_client(url: str, storage_options: dict[str, Any] | None = None) -> tuple[ObjectClient, str, RetryPolicy]:
    """``(client, key, retry policy)`` for ``url`` (``scheme://bucket/key``); clients are reused in a process.

    ``storage_options`` choose the client with ``"client"`` (``"obstore"`` or ``"fsspec"``; default:
    ``DEFAULT_CLIENT``) and the retries with ``"retry"`` (a ``RetryPolicy`` or a dict of its fields); both are taken
    out, the rest (s3fs-style) configure the library.
    """
    options = dict(storage_options or {})
    choice, policy = options.pop("client", None), RetryPolicy.of(options.pop("retry", None))
    scheme, _, rest = url.partition("://")
    bucket, _, key = rest.strip("/").partition("/")
    choice = choice or DEFAULT_CLIENT.get(scheme, "fsspec")
    if choice not in ("fsspec", "obstore"):
        raise ValueError(f"storage_options['client'] must be 'fsspec' or 'obstore', not {choice!r}")
    cache_key = (os.getpid(), scheme, bucket, choice, policy, json.dumps(options, sort_keys=True, default=repr))
    if cache_key not in _OPEN and scheme in ("http", "https"):  # read-only, on the standard library
        _OPEN[cache_key] = HttpClient.open(scheme, bucket, options, policy)
    if cache_key not in _OPEN:
        opened = ObstoreClient.open(scheme, bucket, options, policy) if choice == "obstore" else None
        _OPEN[cache_key] = opened or FsspecClient.open(scheme, bucket, options, policy)
    return _OPEN[cache_key], key.rstrip("/"), policy


class ObjectStore(CheckpointStore):
    """Checkpoints as prefixes of one bucket (see the module docstring); locations are URLs. Use ``for_url``."""

    def __init__(self, client: ObjectClient, policy: RetryPolicy | None = None,
                 fsspec_options: dict[str, Any] | None = None) -> None:
        self.client, self._fsspec_options = client, fsspec_options
        self._calls = RetryingClient(client, policy or RetryPolicy())
        self._expected: dict[str, str | None] = {}  # write root -> manifest version the save replaces
        self._replaced_files: dict[str, list[str]] = {}  # write root -> files of a replaced filesystem-layout copy
        self._sizes: dict[str, int] = {}  # sizes just looked up: opening the file needs no second HEAD
        self._listed: dict[str, int] = {}  # sizes from listings (objects are never rewritten in place)
        self._writers: dict[str, ObjectFileWriter] = {}  # the last writer of each location, until ``stamp`` asks

    @classmethod
    def for_url(cls, url: str, storage_options: dict[str, Any] | None = None) -> ObjectStore:
        """The store holding ``url``; ``storage_options`` choose the client and retries, and configure the library."""
        try:
            client, _, policy = open_client(url, storage_options)
        except ImportError as exc:
            extra = " (pip install 'lightning_sharing[s3]')" if url.startswith(("s3://", "s3a://")) else ""
            raise ComponentDeclarationError(f"{url!r} needs a package that is not installed{extra}: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise ComponentDeclarationError(f"{url!r} is not a location fsspec knows: {exc}") from exc
        return cls(client, policy, {k: v for k, v in (storage_options or {}).items() if k not in OWN_OPTIONS})

    # ------------------------------------------------------------------ locations
    def _key(self, location: str) -> str:
        url = self.normalize(location)
        if not (url + "/").startswith(self.client.url + "/"):
            raise ValueError(f"{location} is not in {self.client.url}")
        return url[len(self.client.url) + 1:]

    def _url(self, key: str) -> str:
        return f"{self.client.url}/{key}".rstrip("/")

    def normalize(self, location: str) -> str:
        scheme, _, rest = os.fspath(location).partition("://")
        return f"{scheme}://{rest.strip('/')}"

    def data_prefix(self, write_root: str, target: str) -> str | None:
        return self.basename(write_root)

    def _forget(self, key: str) -> None:
        """Drop fsspec's cached listings of ``key`` in the filesystem users (and Lightning) get for these options."""
        import fsspec

        scheme, bucket = self.client.url.split("://", 1)
        if fsspec.registry.get(scheme) is not None:  # only an imported implementation can have cached anything
            try:
                fsspec.registry[scheme](**(self._fsspec_options or {})).invalidate_cache(f"{bucket}/{key}")
            except Exception as exc:  # only a cache
                log.debug("could not invalidate fsspec's listings of %s: %s", key, exc)

    # ------------------------------------------------------------------ reading
    def open_read(self, location: str) -> Any:
        size = self._sizes.pop(location, None)
        if size is None and (size := self.size(location)) is not None:
            self._sizes.pop(location, None)
        if size is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", location)
        return RangedReader(self._calls, self._key(location), size, location)

    def size(self, location: str) -> int | None:
        if location in self._listed:
            return self._listed[location]
        info = self._calls.head(self._key(location))
        if info is not None:
            self._sizes[location] = info.size
        return None if info is None else info.size

    def sizes(self, root: str, rels: list[str]) -> dict[str, int | None]:
        self.list_files(root)  # one listing (1000 objects a request) instead of a HEAD per object
        return {rel: self._listed.get(self.join(root, rel)) for rel in rels}

    def read_bytes(self, location: str) -> bytes:
        return self._calls.get(self._key(location))[0]

    def is_dir(self, location: str) -> bool:
        return any(self._calls.list(gen.below(self._key(location)), delimiter=True))

    def list_files(self, root: str) -> list[str]:
        base = gen.below(self._key(root))
        found = {info.key[len(base):]: info.size for info in self._calls.list(base, delimiter=False)[1]
                 if not (info.key.endswith("/") and info.size == 0)}  # a "folder/" marker some tools make
        self._listed.update({self.join(root, rel): size for rel, size in found.items()})
        # Generations are other saves' files, not part of a checkpoint kept in the filesystem layout at ``root``.
        return sorted(rel for rel in found if rel != MANIFEST_NAME and not gen.parse_generation(rel.split("/")[0]))

    def list_checkpoint_candidates(self, directory: str) -> list[str]:
        dirs = self._calls.list(gen.below(self._key(directory)), delimiter=True)[0]
        return [self._url(key) for key in dirs if not key.rsplit("/", 1)[-1].startswith(".")]

    # ------------------------------------------------------------------ incremental saves
    reuse_kind = "copied"

    def stamp(self, location: str) -> str | None:
        writer = self._writers.pop(location, None)
        if writer is not None and writer.version is not None:  # the PUT's answer: no request more
            return writer.version
        info = self._calls.head(self._key(location))
        return None if info is None else info.version

    def reuse_file(self, source: str, size: int, stamp: str, location: str) -> str | None:
        """A server-side copy of ``source`` (no bytes through this process), made only when its size and ETag are
        still what its manifest recorded; the copy's size is checked, and its ETag returned."""
        try:
            info = self._calls.head(self._key(source))
            if info is None or info.size != size or info.version != stamp:
                log.info("not copying %s: it changed since it was saved, or is gone; writing the file again", source)
                return None
            self._calls.copy(self._key(source), self._key(location))
            copied = self._calls.head(self._key(location))
        except (ObjectStoreError, FileNotFoundError) as exc:  # gone meanwhile, or no server-side copies: write it
            log.info("not copying %s (%s); writing the file again", source, exc)
            return None
        if copied is None or copied.size != size or copied.version is None:
            return None  # the caller writes it over
        return copied.version

    # ------------------------------------------------------------------ writing and committing
    def open_write(self, location: str) -> ObjectFileWriter:
        writer = self._writers[location] = ObjectFileWriter(self._calls, self._key(location), location)
        return writer

    def begin_save(self, target: str, token: str) -> str:
        key = self._key(target)
        if getattr(self.client, "read_only", False):
            raise CheckpointError(f"refusing to save to {target}: {self.client.url} is read-only here (checkpoints are "
                                  "read over http(s), not saved); save to a local path or an object store (s3://, ...)")
        if self._calls.head(key) is not None:
            raise CheckpointError(f"refusing to save to {target}: an object (a file) of that name exists, not a "
                                  "lightning_sharing checkpoint (e.g. one written by torch.save); remove it or save to "
                                  "another path")
        state = gen.scan(self._calls, key)
        if state.foreign and not state.has_manifest:
            raise CheckpointError(f"refusing to save to {target}: it holds objects lightning_sharing did not write "
                                  f"({', '.join(sorted(state.foreign)[:5])}); remove them or save to another path")
        try:
            raw, version = self._calls.get(f"{key}/{MANIFEST_NAME}") if state.has_manifest else (b"", None)
        except FileNotFoundError:
            raw, version = b"", None
        gen.clean_directory(self._calls, key.rsplit("/", 1)[0] if "/" in key else "", key, self._url)
        write_root = f"{target}/{gen.generation_name(token, version)}"
        self._expected[write_root] = version
        self._replaced_files[write_root] = _files_in_place(raw) if state.foreign else []
        return write_root

    def check_write_root(self, write_root: str, rank: int) -> None:
        return None  # there is no directory to see; a rank that cannot reach the store fails its first write

    def commit(self, write_root: str, target: str, token: str, manifest: bytes) -> None:
        if write_root not in self._expected:
            raise CheckpointError(f"commit of {write_root} without begin_save on this store")
        expected, key = self._expected.pop(write_root), self._key(target)
        self._writers.clear()  # stamps are asked for right after each write: none is pending now
        fault_point("commit:manifest")
        fault_point("commit:rename")  # the conditional put of the manifest is this store's rename
        try:
            version = self._put_manifest(f"{key}/{MANIFEST_NAME}", manifest, expected)
        except (ObjectExistsError, ObjectChangedError) as exc:
            what = (f"another job committed a checkpoint at {target} while this save was being written (its manifest "
                    "appeared first)" if isinstance(exc, ObjectExistsError) else f"the checkpoint at {target} was "
                    "replaced or removed by another job while this save was being written")
            raise type(exc)(f"{what}; this save was discarded. Two jobs must not save to the same path") from exc
        finally:
            self._forget(key)  # a cached listing (Lightning's own calls) must show the change
        fault_point("commit:renamed")
        try:
            removed = gen.clean_after_commit(self._calls, gen.scan(self._calls, key), self.basename(write_root),
                                             version)
            if in_place := self._replaced_files.pop(write_root, []):  # a replaced filesystem-layout copy's files
                self._calls.delete([f"{key}/{rel}" for rel in in_place])
                removed.append(f"{len(in_place)} files of the replaced checkpoint")
        except Exception as exc:  # committed already: a leftover is removed by a later save
            log.warning("%s is committed, but removing replaced files failed (%s); a later save removes them", target,
                        exc)
            return
        if removed:
            log.info("%s: removed the files of earlier saves (%s)", target, ", ".join(removed))

    def _put_manifest(self, key: str, data: bytes, expected: str | None) -> str:
        try:
            return self._calls.put(key, data, create=expected is None, if_match=expected)
        except (ObjectExistsError, ObjectChangedError):
            try:  # a retried PUT whose first answer was lost is refused: the manifest is ours if it holds our bytes
                current, version = self._calls.get(key)
            except FileNotFoundError:
                current, version = None, ""
            if current != data:
                raise
            log.info("%s: the manifest put's answer was lost; the manifest holds this save's bytes", self._url(key))
            return version

    def abort(self, write_root: str, target: str) -> None:
        self._expected.pop(write_root, None)
        self._writers.clear()
        self._replaced_files.pop(write_root, None)
        try:
            if gen.manifest_data_prefix(self.read_bytes(f"{target}/{MANIFEST_NAME}")) == self.basename(write_root):
                return  # the put went through although the save reports a failure: the files are committed
        except FileNotFoundError:
            pass
        except Exception as exc:
            log.warning("could not check whether %s was committed (%s); leaving it for a later save", write_root, exc)
            return
        try:
            gen.delete_prefix(self._calls, self._key(write_root))
        except Exception as exc:  # the save's own error is the one to report
            log.warning("could not delete %s after a failed save (%s); a later save removes it", write_root, exc)

    def remove_checkpoint(self, location: str) -> None:
        key = self._key(location)
        if self._calls.head(key) is not None:  # a plain object of that name (e.g. a torch.save file)
            self._calls.delete([key])
            return self._forget(key)
        state = gen.scan(self._calls, key)
        if state.foreign and not state.has_manifest:
            raise CheckpointError(f"refusing to remove {location}: it is not a lightning_sharing checkpoint (it holds "
                                  f"{', '.join(sorted(state.foreign)[:5])}); delete it yourself if it really is to go")
        if state.ours:  # the manifest first: from then on it is no checkpoint; a later save finishes a removal
            self._calls.delete([f"{key}/{MANIFEST_NAME}"])
            self._forget(key)
            gen.delete_prefix(self._calls, key)


def _files_in_place(raw: bytes) -> list[str]:
    """The files of a manifest without ``data_prefix`` (a checkpoint in the filesystem layout, copied to the store)."""
    data = gen.manifest_json(raw)
    try:
        return [] if data.get("data_prefix") else [
            entry["path"] for component in data["components"].values() for entry in component["files"]
            if isinstance(entry["path"], str) and ".." not in entry["path"].split("/")]
    except (KeyError, TypeError, AttributeError):
        return []  # unreadable: delete nothing of it


class ConditionalSupport(NamedTuple):
    """What a store was seen to enforce: refusing a second create-only put, refusing a stale ``If-Match``."""

    create_only: bool
    if_match: bool


def probe_conditional_writes(url: str, storage_options: dict[str, Any] | None = None) -> ConditionalSupport:
    """Try both conditions on a scratch object below ``url`` (deleted after): some S3-compatible stores accept the
    headers and ignore them, and there the commit is not race-safe.

    Example:
        >>> probe_conditional_writes("memory://scratch/probe")
        ConditionalSupport(create_only=True, if_match=True)
    """
    client, key, policy = open_client(url, storage_options)
    calls, scratch = RetryingClient(client, policy), f"{key}/.probe-{uuid.uuid4().hex}".lstrip("/")
    try:
        first = calls.put(scratch, b"first", create=True)
        refusals = []
        for attempt in (lambda: calls.put(scratch, b"second", create=True),
                        lambda: [calls.put(scratch, data, if_match=first) for data in (b"third", b"fourth")]):
            try:
                attempt()  # the second put over ``first`` is over a stale version
                refusals.append(False)
            except (ObjectExistsError, ObjectChangedError):
                refusals.append(True)
            except ObjectStoreError as exc:  # a store with no conditional overwrite at all
                log.info("%s: %s", url, exc)
                refusals.append(False)
    finally:
        calls.delete([scratch])
    return ConditionalSupport(*refusals)

"""``ObjectStore``: checkpoints on an object store (``s3://``, ``memory://``, ...), committed without rename.

A save writes every file into a fresh generation of the checkpoint's prefix (``generations``) and commits by
writing the manifest last, with one conditional put (``If-None-Match: *`` for a new checkpoint, ``If-Match`` with
the version read when the save began for a replaced one). Whoever reads the manifest reads exactly one save's
files; a save whose put is refused (another job committed first) deletes its generation and every rank raises
``ObjectExistsError`` / ``ObjectChangedError``. The store runs on an ``ObjectClient`` (``client``); every call is
retried under the ``RetryPolicy`` (``retry``). Guarantees, costs and credentials: docs/storage.md.

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
import io
import json
import logging
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from lightning_sharing._faults import fault_point
from lightning_sharing.errors import (
    CheckpointError,
    ComponentDeclarationError,
    ObjectChangedError,
    ObjectExistsError,
    ObjectStoreError,
    TransientStoreError,
)
from lightning_sharing.storage.base import MANIFEST_NAME, CheckpointStore
from lightning_sharing.storage.client import ObjectClient, open_client
from lightning_sharing.storage.generations import (
    below,
    clean_after_commit,
    clean_directory,
    delete_prefix,
    generation_name,
    manifest_data_prefix,
    parse_generation,
    scan,
)
from lightning_sharing.storage.retry import RetryPolicy, describe, is_transient

__all__ = ["ConditionalSupport", "ObjectStore", "probe_conditional_writes"]

log = logging.getLogger(__name__)
T = TypeVar("T")

PART_SIZE = 16 * 1024 * 1024  # a file larger than this is a multipart upload of parts this size
# A reader fetches at least _READAHEAD_MIN bytes per request (safetensors headers and small tensors come in one GET),
# doubling up to _READAHEAD_MAX while reading sequentially and falling back after a seek; as ranged GETs of
# _READ_CHUNK bytes, the client's max_concurrency at once.
_READAHEAD_MIN, _READAHEAD_MAX, _READ_CHUNK = 1024 * 1024, 64 * 1024 * 1024, 8 * 1024 * 1024


class _Calls:
    """The client's calls, each retried under ``policy``, with errors that name the object and the operation."""

    def __init__(self, client: ObjectClient, policy: RetryPolicy) -> None:
        self.client, self.policy, self.url, self.max_concurrency = client, policy, client.url, client.max_concurrency

    def run(self, what: str, call: Callable[[], T], retried: bool = True) -> T:
        """``call()`` (retried unless ``retried`` is False: the library retried it); ``what``: operation and URL."""
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


class ObjectStore(CheckpointStore):
    """Checkpoints as prefixes of one bucket of an object store (see the module docstring); locations are URLs.

    Use ``for_url``: ``storage_options`` choose the client (``"client"``), the retries (``"retry"``) and configure
    the library (credentials, endpoint, ...).
    """

    atomic_rename = False

    def __init__(self, client: ObjectClient, policy: RetryPolicy | None = None,
                 fsspec_options: dict[str, Any] | None = None) -> None:
        self.client, self.retry = client, policy or RetryPolicy()
        self._calls = _Calls(client, self.retry)
        self._fsspec_options = fsspec_options or {}
        self._expected: dict[str, str | None] = {}  # write root -> manifest version the save replaces
        self._sizes: dict[str, int] = {}  # sizes just looked up, so that opening a file needs no second HEAD
        self._listed: dict[str, int] = {}  # sizes from this store's listings (a store serves one save or load)
        self._replaced_files: dict[str, list[str]] = {}  # write root -> files a replaced in-place checkpoint lists

    @classmethod
    def for_url(cls, url: str, storage_options: dict[str, Any] | None = None) -> ObjectStore:
        """The store holding ``url`` (see the class docstring)."""
        scheme = url.split("://", 1)[0]
        try:
            client, _, policy = open_client(url, storage_options)
        except ImportError as exc:
            extra = " (pip install 'lightning_sharing[s3]')" if scheme in ("s3", "s3a") else ""
            raise ComponentDeclarationError(f"{url!r} needs a package that is not installed{extra}: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise ComponentDeclarationError(f"{url!r} is not a location fsspec knows: {exc}") from exc
        options = {k: v for k, v in (storage_options or {}).items() if k not in ("client", "retry")}
        return cls(client, policy, options)

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
        """Drop fsspec's cached listings of ``key`` in the filesystem a user (or Lightning) has for these options."""
        import fsspec

        implementation = fsspec.registry.get(self.client.url.split("://", 1)[0])  # imported implementations only
        if implementation is not None:
            try:
                implementation(**self._fsspec_options).invalidate_cache(f"{self.client.url.split('://', 1)[1]}/{key}")
            except Exception as exc:  # only a cache: a user's stale listing is fsspec's business
                log.debug("could not invalidate fsspec's listing cache of %s: %s", key, exc)

    # ------------------------------------------------------------------ reading
    def open_read(self, location: str) -> Any:
        size = self._sizes.pop(location, None)
        size = self._listed.get(location) if size is None else size
        if size is None:
            size = self.size(location)
            self._sizes.pop(location, None)
        if size is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", location)
        return _RangedReader(self._calls, self._key(location), size, location)

    def size(self, location: str) -> int | None:
        if location in self._listed:  # objects are never rewritten in place: a listing's size holds
            return self._listed[location]
        info = self._calls.head(self._key(location))
        if info is None:
            return None
        self._sizes[location] = info.size
        return info.size

    def sizes(self, root: str, rels: list[str]) -> dict[str, int | None]:
        self.list_files(root)  # one listing (1000 objects a request) instead of a HEAD per object
        return {rel: self._listed.get(self.join(root, rel)) for rel in rels}

    def read_bytes(self, location: str) -> bytes:
        return self._calls.get(self._key(location))[0]

    def is_dir(self, location: str) -> bool:
        dirs, objects = self._calls.list(below(self._key(location)), delimiter=True)
        return bool(dirs or objects)

    def list_files(self, root: str) -> list[str]:
        base = below(self._key(root))
        found = {info.key[len(base):]: info.size for info in self._calls.list(base, delimiter=False)[1]
                 if not (info.key.endswith("/") and info.size == 0)}
        self._listed.update({self.join(root, rel): size for rel, size in found.items()})
        # Generations are other saves' files, not part of a checkpoint kept in the filesystem layout at ``root``.
        return sorted(rel for rel in found if rel != MANIFEST_NAME and not parse_generation(rel.split("/", 1)[0]))

    def list_checkpoint_candidates(self, directory: str) -> list[str]:
        dirs = self._calls.list(below(self._key(directory)), delimiter=True)[0]
        return [self._url(key) for key in dirs if not key.rsplit("/", 1)[-1].startswith(".")]

    # ------------------------------------------------------------------ writing
    def open_write(self, location: str) -> _Writer:
        return _Writer(self._calls, self._key(location), location)

    # ------------------------------------------------------------------ committing a save
    def begin_save(self, target: str, token: str) -> str:
        key = self._key(target)
        if self._calls.head(key) is not None:
            raise CheckpointError(
                f"refusing to save to {target}: an object (a file) of that name exists, not a lightning_sharing "
                "checkpoint (e.g. one written by torch.save); remove it or save to another path"
            )
        state = scan(self._calls, key)
        if state.foreign and not state.has_manifest:
            raise CheckpointError(
                f"refusing to save to {target}: it holds objects lightning_sharing did not write "
                f"({', '.join(sorted(state.foreign)[:5])}); remove them or save to another path"
            )
        try:
            raw, version = self._calls.get(f"{key}/{MANIFEST_NAME}") if state.has_manifest else (b"", None)
        except FileNotFoundError:
            raw, version = b"", None
        clean_directory(self._calls, key.rsplit("/", 1)[0] if "/" in key else "", key, self._url)
        write_root = f"{target}/{generation_name(token, version)}"
        self._expected[write_root] = version
        self._replaced_files[write_root] = _files_in_place(raw) if state.foreign else []
        return write_root

    def check_write_root(self, write_root: str, rank: int) -> None:
        return None  # there is no directory to see; a rank that cannot reach the store fails its first write

    def commit(self, write_root: str, target: str, token: str, manifest: bytes) -> None:
        if write_root not in self._expected:
            raise CheckpointError(f"commit of {write_root} without begin_save on this store")
        expected, key = self._expected.pop(write_root), self._key(target)
        fault_point("commit:manifest")
        fault_point("commit:rename")  # the conditional put of the manifest is this store's rename
        try:
            version = self._put_manifest(f"{key}/{MANIFEST_NAME}", manifest, expected)
        except ObjectExistsError as exc:
            raise ObjectExistsError(
                f"another job committed a checkpoint at {target} while this save was being written (its manifest "
                "appeared first); this save was discarded. Two jobs must not save to the same path"
            ) from exc
        except ObjectChangedError as exc:
            raise ObjectChangedError(
                f"the checkpoint at {target} was replaced or removed by another job while this save was being "
                "written; this save was discarded. Two jobs must not save to the same path"
            ) from exc
        finally:
            self._forget(key)  # a cached listing (Lightning's own calls) must show the change
        fault_point("commit:renamed")
        try:
            removed = clean_after_commit(self._calls, scan(self._calls, key), self.basename(write_root), version)
            in_place = self._replaced_files.pop(write_root, [])
            if in_place:  # the replaced checkpoint had a filesystem layout (e.g. one copied here): its files go too
                self._calls.delete([f"{key}/{rel}" for rel in in_place])
                removed.append(f"{len(in_place)} files of the replaced checkpoint")
        except Exception as exc:  # committed already: a leftover is removed by a later save
            log.warning("%s is committed, but removing its replaced files failed (%s); a later save removes them",
                        target, exc)
            return
        if removed:
            log.info("%s: removed the files of earlier saves (%s)", target, ", ".join(removed))

    def _put_manifest(self, key: str, data: bytes, expected: str | None) -> str:
        try:
            return self._calls.put(key, data, create=expected is None, if_match=expected)
        except (ObjectExistsError, ObjectChangedError):
            # A retried PUT whose first answer was lost is refused: the manifest is ours if it holds these bytes.
            try:
                current, version = self._calls.get(key)
            except FileNotFoundError:
                current, version = None, ""
            if current != data:
                raise
            log.info("%s: the manifest put's answer was lost; the manifest holds this save's bytes", self._url(key))
            return version

    def abort(self, write_root: str, target: str) -> None:
        self._expected.pop(write_root, None)
        self._replaced_files.pop(write_root, None)
        try:
            if manifest_data_prefix(self.read_bytes(f"{target}/{MANIFEST_NAME}")) == self.basename(write_root):
                return  # the put went through although the save reports a failure: the files are committed
        except FileNotFoundError:
            pass
        except Exception as exc:
            log.warning("could not check whether %s was committed (%s); leaving it for a later save", write_root, exc)
            return
        try:
            delete_prefix(self._calls, self._key(write_root))
        except Exception as exc:  # the save's own error is the one to report
            log.warning("could not delete %s after a failed save (%s); a later save removes it", write_root, exc)

    def remove_checkpoint(self, location: str) -> None:
        key = self._key(location)
        if self._calls.head(key) is not None:  # a plain object of that name (e.g. a torch.save file)
            self._calls.delete([key])
            self._forget(key)
            return
        state = scan(self._calls, key)
        if state.foreign and not state.has_manifest:
            raise CheckpointError(
                f"refusing to remove {location}: it is not a lightning_sharing checkpoint (it holds "
                f"{', '.join(sorted(state.foreign)[:5])}); delete it yourself if it really is to go"
            )
        if state.ours:  # the manifest first: from then on it is no checkpoint; a later save finishes a removal
            self._calls.delete([f"{key}/{MANIFEST_NAME}"])
            self._forget(key)
            delete_prefix(self._calls, key)


def _files_in_place(raw: bytes) -> list[str]:
    """The files of a manifest without ``data_prefix`` (a checkpoint in the filesystem layout, copied to the store)."""
    try:
        data = json.loads(raw.decode("utf-8"))
        if data.get("data_prefix"):
            return []
        return [entry["path"] for component in data["components"].values() for entry in component["files"]
                if isinstance(entry["path"], str) and ".." not in entry["path"].split("/")]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return []  # unreadable: delete nothing of it


class _Writer:
    """One file: a small one is one (retried) PUT at the end; a larger one goes up as the client's multipart upload
    (its parts retried by the library). Nothing is visible before a normal exit; an error leaves nothing. The fault
    point ``save:write`` fires once the first part (or the single PUT) is handed to the store."""

    def __init__(self, calls: _Calls, key: str, location: str) -> None:
        self._calls, self._key, self._location = calls, key, location
        self._buffer, self._stream, self._fired, self._open = bytearray(), None, False, True

    def __enter__(self) -> _Writer:
        return self

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if not self._open:
            raise ObjectStoreError(f"{self._location}: the writer is closed")
        try:
            if self._stream is None and len(self._buffer) + len(view) < PART_SIZE:
                self._buffer += view
                return len(view)
            if self._stream is None:
                self._stream = self._calls.run(f"start writing {self._location}", lambda: self._calls.client.open_writer(
                    self._key, PART_SIZE), retried=False)
                self._send(memoryview(self._buffer))
                self._buffer = bytearray()
            self._send(view)
            self._fault()
        except BaseException:
            self._abort()
            raise
        return len(view)

    def _send(self, view: memoryview) -> None:
        for start in range(0, len(view), PART_SIZE):
            self._calls.run(f"write {self._location}", lambda s=start: self._stream.write(view[s:s + PART_SIZE]),
                            retried=False)

    def _fault(self) -> None:
        if not self._fired:
            self._fired = True
            fault_point("save:write")

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self._fault()
            if self._stream is None:
                self._calls.put(self._key, bytes(self._buffer))
            else:
                self._calls.run(f"complete {self._location}", self._stream.commit, retried=False)
            self._open = False
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        # The error that made us abort is the one to report; an upload left behind is aborted by the next save.
        stream, self._stream, self._open, self._buffer = self._stream, None, False, bytearray()
        if stream is not None:
            try:
                stream.abort()
            except Exception as exc:
                log.warning("%s: aborting the upload failed (%s); a later save of its checkpoint removes it",
                            self._location, exc)


class _RangedReader(io.RawIOBase):
    """A read-only file over one object, read by ranged GETs with an adaptive readahead (see ``_READAHEAD_MIN``)."""

    def __init__(self, calls: _Calls, key: str, size: int, location: str) -> None:
        super().__init__()
        self._calls, self._key, self._size, self._pos, self._location = calls, key, size, 0, location
        self._buffer, self._buffer_start = bytearray(), 0
        self._ahead, self._next = _READAHEAD_MIN, -1  # readahead now; where a sequential read would go on

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def _fetch(self, start: int, view: memoryview) -> None:
        def one(low: int) -> None:
            high = min(low + _READ_CHUNK, len(view))
            if self._calls.read_into(self._key, start + low, view[low:high]) != high - low:
                raise ObjectStoreError(f"{self._location} has fewer than {start + high} bytes: bytes {start + low}-"
                                       f"{start + high - 1} were asked for")

        lows = range(0, len(view), _READ_CHUNK)
        with ThreadPoolExecutor(max(1, min(self._calls.max_concurrency, len(lows)))) as pool:
            futures = [pool.submit(one, low) for low in lows]
            try:
                for future in futures:
                    future.result()
            finally:  # nothing may write into the caller's buffer once this returns
                for future in futures:
                    future.cancel()

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self._size - self._pos))
        done = 0
        offset = self._pos - self._buffer_start
        if want and 0 <= offset < len(self._buffer):
            done = min(want, len(self._buffer) - offset)
            view[:done] = self._buffer[offset:offset + done]
        if done < want:
            at, rest = self._pos + done, want - done
            sequential = at == self._next or (done and at == self._buffer_start + len(self._buffer))
            self._ahead = min(2 * self._ahead, _READAHEAD_MAX) if sequential else _READAHEAD_MIN
            if rest >= self._ahead:
                self._fetch(at, view[done:want])
            else:
                block = bytearray(min(self._size, at + self._ahead) - at)
                self._fetch(at, memoryview(block))
                self._buffer, self._buffer_start = block, at
                view[done:want] = block[:rest]
        self._pos += want
        self._next = self._pos
        return want


@dataclass(frozen=True)
class ConditionalSupport:
    """What a store was seen to enforce: refusing a second create-only put, refusing a stale ``If-Match``."""

    create_only: bool
    if_match: bool


def probe_conditional_writes(url: str, storage_options: dict[str, Any] | None = None) -> ConditionalSupport:
    """Try both conditions on a scratch object below ``url`` (then deleted): some S3-compatible stores accept the
    headers and ignore them, and there the commit is not race-safe.

    Example:
        >>> probe_conditional_writes("memory://scratch/probe")
        ConditionalSupport(create_only=True, if_match=True)
    """
    client, key, policy = open_client(url, storage_options)
    calls, scratch = _Calls(client, policy), f"{key}/.probe-{uuid.uuid4().hex}".lstrip("/")
    try:
        first = calls.put(scratch, b"first", create=True)
        try:
            calls.put(scratch, b"second", create=True)
            create_only = False
        except ObjectExistsError:
            create_only = True
        try:
            calls.put(scratch, b"third", if_match=first)
            calls.put(scratch, b"fourth", if_match=first)  # ``first`` is stale now
            if_match = False
        except ObjectChangedError:
            if_match = True
        except ObjectStoreError as exc:  # a store with no conditional overwrite at all
            log.info("%s: %s", url, exc)
            if_match = False
    finally:
        calls.delete([scratch])
    return ConditionalSupport(create_only=create_only, if_match=if_match)

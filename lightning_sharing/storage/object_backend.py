"""The object-store backend: checkpoints on ``s3://``, ``memory://`` and other fsspec stores, committed without rename.

A save writes every file into a fresh generation of the checkpoint's prefix and commits by writing the
manifest last, with one conditional put (``If-None-Match: *`` for a new checkpoint, ``If-Match`` with the
version read when the save began for a replaced one). Whoever reads the manifest reads exactly one save's
files; a save whose put is refused (another job committed first) deletes its generation and every rank
raises ``ObjectExistsError`` / ``ObjectChangedError``. The layout, and which leftovers are deleted when,
is in ``object_layout``; what the store must guarantee, costs and credentials are in docs/storage.md.

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

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

from lightning_sharing._faults import fault_point
from lightning_sharing.errors import (
    CheckpointError,
    ComponentDeclarationError,
    ObjectChangedError,
    ObjectExistsError,
    ObjectStoreError,
)
from lightning_sharing.storage import object_generic as _generic
from lightning_sharing.storage import object_s3 as _s3
from lightning_sharing.storage.base import MANIFEST_NAME, CheckpointStore
from lightning_sharing.storage.object_layout import (
    clean_after_commit,
    clean_directory,
    generation_name,
    manifest_data_prefix,
    parse_generation,
    scan,
)
from lightning_sharing.storage.object_store import (
    ObjectWriter,
    delete_objects,
    delete_prefix,
    find_objects,
    list_dir,
    object_info,
    open_store,
    put_create_only,
    put_if_match,
    read_range_into,
    read_versioned,
)

__all__ = ["ObjectStore"]

log = logging.getLogger(__name__)

# A reader fetches at least _READAHEAD_MIN bytes per request (safetensors headers and small tensors come from one
# GET), doubling up to _READAHEAD_MAX while the caller reads sequentially (a whole file: few, large, parallel
# fetches) and falling back after a seek (a SHARDED load's scattered blocks: little read that is not needed).
# Fetches are ranged GETs of _READ_CHUNK bytes, several at once.
_READAHEAD_MIN = 1024 * 1024
_READAHEAD_MAX = 64 * 1024 * 1024
_READ_CHUNK = 8 * 1024 * 1024


@contextlib.contextmanager
def _naming(action: str, location: str) -> Iterator[None]:
    """Errors of the store's client (s3fs says "Access Denied", not which object) become ``ObjectStoreError``s
    that name the object; ours, and a missing object's ``FileNotFoundError``, pass unchanged."""
    try:
        yield
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception as exc:
        raise ObjectStoreError(f"{action} {location} failed: {type(exc).__name__}: {exc}") from exc


class ObjectStore(CheckpointStore):
    """Checkpoints as prefixes of an fsspec object store (see the module docstring).

    ``fs`` is the fsspec filesystem and ``scheme`` the URL scheme locations are spelled with. Use
    ``for_url`` (``storage_options`` go to fsspec: credentials, endpoint, ...). Locations are URLs.
    """

    atomic_rename = False

    def __init__(self, fs: Any, scheme: str) -> None:
        self.fs = fs
        self.scheme = scheme
        self._expected: dict[str, str | None] = {}  # write root -> manifest version the save replaces
        self._sizes: dict[str, int] = {}  # sizes just looked up, so that opening a file needs no second HEAD
        self._listed: dict[str, int] = {}  # sizes from this store's listings (a store serves one save or load)
        self._replaced_files: dict[str, list[str]] = {}  # write root -> files a replaced in-place checkpoint lists

    @classmethod
    def for_url(cls, url: str, storage_options: dict[str, Any] | None = None) -> ObjectStore:
        """The store holding ``url``; ``storage_options`` are passed to the fsspec filesystem."""
        scheme = url.split("://", 1)[0]
        try:
            fs, _ = open_store(url, storage_options)
        except ImportError as exc:
            extra = " (pip install 'lightning_sharing[s3]')" if scheme in ("s3", "s3a") else ""
            raise ComponentDeclarationError(f"{url!r} needs a package that is not installed{extra}: {exc}") from exc
        except ValueError as exc:
            raise ComponentDeclarationError(f"{url!r} is not a location fsspec knows: {exc}") from exc
        if _generic.is_local(fs):
            raise ComponentDeclarationError(f"{url!r} is a local path: use LocalStore (store_for picks it)")
        return cls(fs, scheme)

    # ------------------------------------------------------------------ locations
    def _path(self, location: str) -> str:
        return self.fs._strip_protocol(location).rstrip("/")

    def _url(self, path: str) -> str:
        return f"{self.scheme}://{path.lstrip('/')}"

    def normalize(self, location: str) -> str:
        return self._url(self._path(location))

    def data_prefix(self, write_root: str, target: str) -> str | None:
        return self.basename(write_root)

    # ------------------------------------------------------------------ reading
    def open_read(self, location: str) -> Any:
        path = self._path(location)
        if not _s3.is_s3(self.fs):
            with _naming("opening", location):
                return self.fs.open(path, "rb")
        size = self._sizes.pop(location, None)
        if size is None:
            size = self._listed.get(location)
        if size is None:
            size = self.size(location)
            self._sizes.pop(location, None)
        if size is None:
            raise FileNotFoundError(f"no such object: {location}")
        return _RangedReader(self.fs, path, size, location)

    def size(self, location: str) -> int | None:
        if location in self._listed:  # objects are never rewritten in place: a listing's size holds
            return self._listed[location]
        with _naming("looking up", location):
            info = object_info(self.fs, self._path(location))
        if info is None:
            return None
        self._sizes[location] = info.size
        return info.size

    def sizes(self, root: str, rels: list[str]) -> dict[str, int | None]:
        self.list_files(root)  # one listing (1000 objects a request) instead of a HEAD per object
        return {rel: self._listed.get(self.join(root, rel)) for rel in rels}

    def read_bytes(self, location: str) -> bytes:
        with _naming("reading", location):
            return read_versioned(self.fs, self._path(location))[0]

    def is_dir(self, location: str) -> bool:
        with _naming("listing", location):
            dirs, objects = list_dir(self.fs, self._path(location))
        return bool(dirs or objects)

    def list_files(self, root: str) -> list[str]:
        base = self._path(root) + "/"
        with _naming("listing", root):
            found = {info.path[len(base):]: info.size for info in find_objects(self.fs, self._path(root))
                     if info.path.startswith(base) and not (info.path.endswith("/") and info.size == 0)}
        # Remembered for size() and open_read(): a load lists the files once, then needs no HEAD per file.
        self._listed.update({self.join(root, rel): size for rel, size in found.items()})
        # Generations are other saves' files, not part of a checkpoint kept in the filesystem layout at ``root``.
        return sorted(rel for rel in found if rel != MANIFEST_NAME and not parse_generation(rel.split("/", 1)[0]))

    def list_checkpoint_candidates(self, directory: str) -> list[str]:
        with _naming("listing", directory):
            dirs, _ = list_dir(self.fs, self._path(directory))
        return [self._url(path.rstrip("/")) for path in sorted(dirs) if not self.basename(path).startswith(".")]

    # ------------------------------------------------------------------ writing
    def open_write(self, location: str) -> _NamedWriter:
        with _naming("starting to write", location):
            return _NamedWriter(ObjectWriter(self.fs, self._path(location)), location)

    # ------------------------------------------------------------------ committing a save
    def begin_save(self, target: str, token: str) -> str:
        with _naming("preparing a save to", target):
            return self._begin_save(target, token)

    def _begin_save(self, target: str, token: str) -> str:
        path = self._path(target)
        parent = path.rsplit("/", 1)[0] if "/" in path.strip("/") else ""
        if object_info(self.fs, path) is not None:
            raise CheckpointError(
                f"refusing to save to {target}: an object (a file) of that name exists, not a lightning_sharing "
                "checkpoint (e.g. one written by torch.save); remove it or save to another path"
            )
        state = scan(self.fs, path)
        if state.foreign and not state.has_manifest:
            raise CheckpointError(
                f"refusing to save to {target}: it holds objects lightning_sharing did not write "
                f"({', '.join(sorted(state.foreign)[:5])}); remove them or save to another path"
            )
        try:
            raw, version = read_versioned(self.fs, f"{path}/{MANIFEST_NAME}")
        except FileNotFoundError:
            raw, version = b"", None
        if parent:
            clean_directory(self.fs, parent, path, self._url)
        write_root = f"{target}/{generation_name(token, version)}"
        self._expected[write_root] = version
        self._replaced_files[write_root] = _files_in_place(raw, target) if state.foreign else []
        return write_root

    def check_write_root(self, write_root: str, rank: int) -> None:
        return None  # there is no directory to see; a rank that cannot reach the store fails its first write

    def commit(self, write_root: str, target: str, token: str, manifest: bytes) -> None:
        if write_root not in self._expected:
            raise CheckpointError(f"commit of {write_root} without begin_save on this store")
        expected = self._expected.pop(write_root)
        self._replaced_files.setdefault(write_root, [])
        path = self._path(target)
        manifest_path = f"{path}/{MANIFEST_NAME}"
        fault_point("commit:manifest")
        fault_point("commit:rename")  # the conditional put of the manifest is this store's rename
        try:
            with _naming("writing the manifest", f"{target}/{MANIFEST_NAME}"):
                if expected is None:
                    version = put_create_only(self.fs, manifest_path, manifest)
                else:
                    version = put_if_match(self.fs, manifest_path, manifest, expected)
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
            self.fs.invalidate_cache(path)  # a cached listing (Lightning's own calls) must show the change
        fault_point("commit:renamed")
        try:
            removed = clean_after_commit(self.fs, scan(self.fs, path), self.basename(write_root), version)
            in_place = self._replaced_files.pop(write_root, [])
            if in_place:  # the replaced checkpoint had a filesystem layout (e.g. one copied here): its files go too
                delete_objects(self.fs, [f"{path}/{rel}" for rel in in_place])
                removed.append(f"{len(in_place)} files of the replaced checkpoint")
        except Exception as exc:  # committed already: a leftover is removed by a later save
            log.warning("%s is committed, but removing its replaced files failed (%s); a later save removes them",
                        target, exc)
            return
        if removed:
            log.info("%s: removed the files of earlier saves (%s)", target, ", ".join(removed))

    def abort(self, write_root: str, target: str) -> None:
        self._expected.pop(write_root, None)
        self._replaced_files.pop(write_root, None)
        generation = self.basename(write_root)
        try:
            raw, _ = read_versioned(self.fs, f"{self._path(target)}/{MANIFEST_NAME}")
            if manifest_data_prefix(raw) == generation:
                return  # the put went through although the save reports a failure: the files are committed
        except FileNotFoundError:
            pass
        except Exception as exc:
            log.warning("could not check whether %s was committed (%s); leaving it for a later save", write_root, exc)
            return
        try:
            delete_prefix(self.fs, self._path(write_root))
        except Exception as exc:  # the save's own error is the one to report
            log.warning("could not delete %s after a failed save (%s); a later save removes it", write_root, exc)

    def remove_checkpoint(self, location: str) -> None:
        with _naming("removing", location):
            self._remove(location)

    def _remove(self, location: str) -> None:
        path = self._path(location)
        if object_info(self.fs, path) is not None:  # a plain object of that name (e.g. a torch.save file)
            delete_objects(self.fs, [path])
            self.fs.invalidate_cache(path)
            return
        state = scan(self.fs, path)
        if state.foreign and not state.has_manifest:
            raise CheckpointError(
                f"refusing to remove {location}: it is not a lightning_sharing checkpoint (it holds "
                f"{', '.join(sorted(state.foreign)[:5])}); delete it yourself if it really is to go"
            )
        if not state.ours:
            return
        # The manifest first: from then on the prefix is no checkpoint, and a later save deletes what an
        # interrupted removal leaves.
        delete_objects(self.fs, [f"{path}/{MANIFEST_NAME}"])
        self.fs.invalidate_cache(path)
        delete_prefix(self.fs, path)


def _files_in_place(raw: bytes, target: str) -> list[str]:
    """The files of a manifest without ``data_prefix`` (a checkpoint in the filesystem layout, copied to the store)."""
    try:
        data = json.loads(raw.decode("utf-8"))
        if data.get("data_prefix"):
            return []
        return [entry["path"] for component in data["components"].values() for entry in component["files"]
                if isinstance(entry["path"], str) and ".." not in entry["path"].split("/")]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return []  # unreadable: delete nothing of it


class _NamedWriter:
    """An ``ObjectWriter`` whose client errors name the object (see ``_naming``)."""

    def __init__(self, writer: ObjectWriter, location: str) -> None:
        self._writer, self._location = writer, location

    def __enter__(self) -> _NamedWriter:
        return self

    def write(self, data: Any) -> int:
        with _naming("writing", self._location):
            return self._writer.write(data)

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        with _naming("writing", self._location):
            self._writer.__exit__(exc_type, exc, traceback)


class _RangedReader(io.RawIOBase):
    """A read-only file over one S3 object, read by ranged GETs with an adaptive readahead (see ``_READAHEAD_MIN``)."""

    def __init__(self, fs: Any, path: str, size: int, location: str) -> None:
        super().__init__()
        self._fs, self._path, self._size, self._pos, self._location = fs, path, size, 0, location
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
        with _naming("reading", self._location):
            read_range_into(self._fs, self._path, start, view, chunk=_READ_CHUNK)

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

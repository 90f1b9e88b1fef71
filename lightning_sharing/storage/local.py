"""The local (or shared, mounted) filesystem store: durable writes, a staging directory and an atomic rename.

A checkpoint is built in a hidden staging directory beside its target and renamed into place once its manifest is
written, so the target path only ever names a complete checkpoint. Replacing one swaps the two directories
atomically where the OS can (Linux ``renameat2(RENAME_EXCHANGE)``); elsewhere the old one is moved aside first, and
a crash between the two renames is repaired by the next save. Inside ``write_batch()`` a rank's files are made
durable together (``DurableBatch``).

Example:
    >>> store = LocalStore()
    >>> root = store.begin_save("/tmp/ckpts/step=1.ckpt", "0" * 32)  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import stat
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from lightning_sharing._faults import fault_point
from lightning_sharing.errors import CheckpointError
from lightning_sharing.format.safetensors_io import DescriptorSink
from lightning_sharing.storage.base import MANIFEST_NAME, CheckpointStore

__all__ = ["DurableBatch", "LocalStore", "fsync_dir", "remove_checkpoint", "remove_stale_staging",
           "rmtree_missing_ok", "staging_path", "start_writeback"]

log = logging.getLogger(__name__)

# Staging and removal directories carry no checkpoint name (".staging-<hex>", ".removing-<hex>"): Lightning reads
# version numbers out of any name containing "hpc_ckpt_", so a leftover named after one would mislead its SLURM
# auto-resume. Only ".NAME.replaced-<hex>" needs its name, to be moved back. Older versions named all three
# ".NAME.KIND-<hex>"; those are recognised too.
_TEMP_RE = re.compile(r"^\.(?:(?P<name>.+)\.)?(?P<kind>staging|replaced|removing)-[0-9a-f]{32}$")
_SYNC_THREADS, _BATCH_OPEN_FILES = 8, 64  # a batch holding that many open files makes them durable before more


def _libc(name: str, *argtypes: Any) -> Any:
    """The C library's function ``name``, or None where there is none."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = list(argtypes)
    return function


_renameat2 = _libc("renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_sync_file_range = sys.platform.startswith("linux") and _libc("sync_file_range", ctypes.c_int, ctypes.c_int64,
                                                              ctypes.c_int64, ctypes.c_uint)


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages now, without waiting (Linux ``sync_file_range``), so the
    disk works while the next file is written. A refusal is harmless: the final fsync then does all the work, and
    write-back errors are reported by that fsync either way."""
    if _sync_file_range:
        _sync_file_range(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE


class DurableBatch:
    """The files of one ``LocalStore.write_batch()`` block, fsynced together when it ends.

    Each file stays open until it is fsynced: an fsync reports write-back errors to the descriptors that were open
    when they happened, so syncing a descriptor opened later could miss one. One concurrent round of fsyncs lets the
    filesystem join them into a few journal commits, where an fsync per file, in order, waits for one commit each.
    """

    def __init__(self) -> None:
        self.files: list[tuple[int, Path]] = []

    def add(self, fd: int, path: Path) -> None:
        """Take ownership of ``fd`` (``path``, fully written); ``sync`` or ``close`` closes it."""
        self.files.append((fd, path))
        if len(self.files) >= _BATCH_OPEN_FILES:
            self.sync()

    def sync(self) -> None:
        """fsync and close every file taken so far; raises the first failure (after all were tried)."""
        try:
            with ThreadPoolExecutor(min(_SYNC_THREADS, len(self.files) or 1), "lightning_sharing-fsync") as pool:
                for future in [pool.submit(_fsync, fd, path) for fd, path in self.files]:
                    future.result()
        finally:
            self.close()

    def close(self) -> None:
        """Close the files not synced yet (the block failed: they need not be durable)."""
        files, self.files = self.files, []
        for fd, _ in files:
            try:
                os.close(fd)
            except OSError as exc:  # closing only releases the descriptor; a failed write was reported by fsync
                log.debug("closing descriptor %d: %s", fd, exc)


def _fsync(fd: int, path: Path) -> None:
    try:
        fault_point("save:sync")
        os.fsync(fd)
    except OSError as exc:
        raise CheckpointError(f"making {path} durable (fsync) failed: {exc}") from exc


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (new names, renames) to stable storage."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:  # some platforms cannot open directories
        log.debug("cannot open directory %s for fsync: %s", path, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def rmtree_missing_ok(path: Path) -> None:
    """Delete a directory tree; entries that vanish meanwhile (another cleanup got them) are fine."""

    def ignore_missing(_function: object, _path: str, error: Any) -> None:
        error = error[1] if isinstance(error, tuple) else error  # onerror passes sys.exc_info(), onexc the error
        if not isinstance(error, FileNotFoundError):
            raise error

    shutil.rmtree(path, **{"onexc" if sys.version_info >= (3, 12) else "onerror": ignore_missing})


def staging_path(target: Path, token: str) -> Path:
    """The hidden staging directory for ``target``, beside it (``token`` is 32 hex digits)."""
    return target.parent / f".staging-{token}"


def remove_stale_staging(parent: Path) -> list[Path]:
    """Delete leftovers of interrupted saves in ``parent`` (no other save to it is running); returns them.

    A ``.replaced-`` directory whose target is missing is the previous checkpoint caught between the two renames of
    a non-atomic replace: it is moved back rather than deleted.
    """
    removed: list[Path] = []
    for entry in sorted(parent.iterdir()) if parent.is_dir() else []:
        match = _TEMP_RE.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink():
            continue
        if match["kind"] == "replaced" and match["name"] and not os.path.lexists(parent / match["name"]):
            log.warning("restoring %s from %s (a replace was interrupted)", parent / match["name"], entry)
            os.rename(entry, parent / match["name"])
            continue
        log.info("removing stale checkpoint staging directory %s", entry)
        rmtree_missing_ok(entry)
        removed.append(entry)
    return removed


def _rename_exchange(source: Path, target: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    if _renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2 exchange of {source} and {target} failed: {os.strerror(err)}")


def _rename(source: Path, target: Path, swap: bool = False) -> bool:
    """``os.rename`` (``swap``: the atomic exchange; False where unsupported); a mount point or a cross-filesystem
    rename (EBUSY, EXDEV) becomes an error that names both paths and what to do instead."""
    try:
        if swap:
            return _rename_exchange(source, target)
        os.rename(source, target)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EBUSY):
            raise
        raise CheckpointError(
            f"cannot rename {source} to {target}: {os.strerror(exc.errno)} ({errno.errorcode[exc.errno]}). A "
            "checkpoint is committed (and removed) by renaming directories beside it, so the checkpoint and its "
            "parent directory must be on one filesystem and the checkpoint must not be a mount point itself: save to "
            "a path inside the mounted directory (e.g. /mnt/ckpt/run/step=5.ckpt, not the mount point /mnt/ckpt)"
        ) from exc


def _commit_directory(staging: Path, target: Path, token: str) -> None:
    """Move the finished ``staging`` directory to ``target``, replacing an old checkpoint safely."""
    if target.exists() and not target.is_symlink() and not (
            target.is_dir() and ((target / MANIFEST_NAME).is_file() or not any(target.iterdir()))):
        raise CheckpointError(f"refusing to replace {target}: it exists and is not a lightning_sharing checkpoint "
                              "directory; remove it or save to another path")
    if target.is_symlink():  # e.g. ModelCheckpoint(save_last="link")'s last.ckpt: the link is what is replaced
        target.unlink()
    if not os.path.lexists(target):
        _rename(staging, target)
        return fsync_dir(target.parent)
    previous = staging  # holds the previous checkpoint after the exchange
    if not _rename(staging, target, swap=True):
        previous = target.parent / f".{target.name}.replaced-{token}"
        _rename(target, previous)
        _rename(staging, target)
    fsync_dir(target.parent)
    try:  # committed: failing to delete the old one must not fail the save; its hidden name gets it cleaned later
        rmtree_missing_ok(previous)
    except OSError as exc:
        log.warning("could not remove the replaced checkpoint %s (%s); the next save removes it", previous, exc)


def _stamp(status: os.stat_result) -> str:
    return f"{status.st_ino}:{status.st_mtime_ns}"


def _unchanged(status: os.stat_result, size: int, stamp: str) -> bool:
    return stat.S_ISREG(status.st_mode) and status.st_size == size and _stamp(status) == stamp


def remove_checkpoint(path: str | os.PathLike[str]) -> None:
    """Delete a checkpoint so that it is never seen half-deleted.

    A directory is first renamed to a hidden name (one atomic step: it stops being a checkpoint), then deleted; an
    interrupted deletion is finished by the next save's cleanup. A symbolic link is removed, not what it points to.
    """
    target = Path(path)
    if target.is_symlink() or target.is_file():
        return target.unlink()
    if target.is_dir():
        doomed = target.parent / f".removing-{uuid.uuid4().hex}"
        _rename(target, doomed)
        fsync_dir(target.parent)
        rmtree_missing_ok(doomed)


class LocalStore(CheckpointStore):
    """Checkpoints as directories on a filesystem every rank can see (local, or a shared mount)."""

    def __init__(self) -> None:
        self._batches = threading.local()

    def normalize(self, location: str) -> str:
        text = os.fspath(location)
        return os.path.abspath(text[len("file://"):] if text.startswith("file://") else text)

    def open_read(self, location: str) -> BinaryIO:
        return open(location, "rb", buffering=0)

    def size(self, location: str) -> int | None:
        path = Path(location)
        return path.stat().st_size if path.is_file() else None

    def is_dir(self, location: str) -> bool:
        return Path(location).is_dir()

    def list_files(self, root: str) -> list[str]:
        found: list[str] = []  # files and symbolic links (also to directories), the manifest excluded
        for dirpath, dirnames, filenames in os.walk(root):
            base = Path(dirpath).relative_to(root)
            found += [(base / name).as_posix() for name in filenames + dirnames
                      if name in filenames or (Path(dirpath) / name).is_symlink()]
        return sorted(rel for rel in found if rel != MANIFEST_NAME)

    def list_checkpoint_candidates(self, directory: str) -> list[str]:
        root = Path(directory)
        return [str(entry) for entry in sorted(root.iterdir()) if not entry.name.startswith(".")
                and not entry.is_symlink() and entry.is_dir()] if root.is_dir() else []

    def check_inside(self, root: str, rel: str) -> str | None:
        path = Path(root) / rel
        if path.is_symlink():
            return "is a symbolic link; checkpoint files must be regular files"
        if not os.path.realpath(path).startswith(os.path.realpath(root) + os.sep):
            return "resolves outside the checkpoint directory"
        return None

    reuse_kind = "linked"

    def stamp(self, location: str) -> str | None:
        return _stamp(os.lstat(location))

    def reuse_file(self, source: str, size: int, stamp: str, location: str) -> str | None:
        """A hard link to ``source`` (same filesystem: the staging directory is beside the checkpoints), made only
        when ``source`` still has ``size`` and ``stamp`` (inode, modification time): a file replaced or changed
        in place since its save is never linked. Checked again on the new name, which names the inode linked."""
        try:
            if not _unchanged(os.lstat(source), size, stamp):
                log.info("not linking %s: it changed since it was saved; writing the file again", source)
                return None
            os.makedirs(os.path.dirname(location), exist_ok=True)
            os.link(source, location, follow_symlinks=False)
        except OSError as exc:  # gone (retention removed it), no hard links here (EPERM, EXDEV), too many links
            log.info("not linking %s (%s); writing the file again", source, exc)
            return None
        if _unchanged(os.lstat(location), size, stamp):
            return stamp
        os.unlink(location)  # replaced between the check and the link
        return None

    @contextmanager
    def write_batch(self) -> Iterator[None]:
        if getattr(self._batches, "current", None) is not None:  # nested: the outer block syncs
            yield
            return
        batch = self._batches.current = DurableBatch()
        try:
            yield
            batch.sync()
        finally:
            batch.close()
            self._batches.current = None

    @contextmanager
    def open_write(self, location: str) -> Iterator[DescriptorSink]:
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        batch: DurableBatch | None = getattr(self._batches, "current", None)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            yield DescriptorSink(fd)
            if batch is None:
                os.fsync(fd)
            else:
                start_writeback(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        if batch is None:
            os.close(fd)
        else:
            batch.add(fd, path)  # the batch owns it now: it closes it, even if this add's sync fails

    def begin_save(self, target: str, token: str) -> str:
        staging = staging_path(Path(target), token)
        staging.parent.mkdir(parents=True, exist_ok=True)
        # Saves run one at a time (background ones in order): any other staging directory here is a leftover.
        remove_stale_staging(staging.parent)
        staging.mkdir()
        return str(staging)

    def check_write_root(self, write_root: str, rank: int) -> None:
        if not Path(write_root).is_dir():
            raise CheckpointError(f"rank {rank} cannot see the staging directory {write_root} that rank 0 created: "
                                  "the checkpoint directory must be on a filesystem shared by all ranks")

    def commit(self, write_root: str, target: str, token: str, manifest: bytes) -> None:
        staging = Path(write_root)
        fault_point("commit:manifest")
        with self.open_write(str(staging / MANIFEST_NAME)) as sink:
            sink.write(manifest)
        # Every file is durable (its writer fsynced it); now every directory's entries, each directory once, the
        # manifest's included, before the rename makes the checkpoint visible.
        for dirpath, _, _ in os.walk(staging):
            fsync_dir(dirpath)
        fault_point("commit:rename")
        _commit_directory(staging, Path(target), token)
        fault_point("commit:renamed")

    def abort(self, write_root: str, target: str) -> None:
        shutil.rmtree(write_root, ignore_errors=True)

    def remove_checkpoint(self, location: str) -> None:
        remove_checkpoint(location)

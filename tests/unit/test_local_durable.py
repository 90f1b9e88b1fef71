"""LocalStore.write_batch(): every file of the batch is fsynced, on the descriptor that wrote it, before the block
ends; a failing fsync is raised, naming the file; no descriptor outlives the block; other stores are unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent, _faults
from lightning_sharing.errors import CheckpointError
from lightning_sharing.format.safetensors_io import write_tensors
from lightning_sharing.storage import local
from lightning_sharing.storage.base import CheckpointStore
from lightning_sharing.storage.local import LocalStore
from lightning_sharing.storage.object_store import ObjectStore

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The real os.fsync, recording which file each call flushed (the path its descriptor is open on)."""
    calls: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return calls


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch):
    _faults._hits.clear()
    yield lambda spec: monkeypatch.setenv(_faults.FAULTS_ENV, spec)
    _faults._hits.clear()


def _write(store: LocalStore, path: Path, payload: bytes) -> None:
    with store.open_write(str(path)) as sink:
        sink.write(payload)


def test_batch_fsyncs_every_file_once_at_the_end_on_its_own_descriptor(tmp_path: Path, fsyncs: list[str]) -> None:
    store = LocalStore()
    paths = [tmp_path / "a" / f"f{i}.bin" for i in range(5)]
    before = _open_fds()
    with store.write_batch():
        for i, path in enumerate(paths):
            _write(store, path, bytes([i]) * (1000 + i))
        assert fsyncs == []  # deferred: nothing flushed while the batch is open
        assert len(_open_fds() - before) == len(paths)  # each file's writer descriptor is kept for its fsync
    assert sorted(fsyncs) == sorted(str(p) for p in paths)  # each once, on a descriptor open on that file
    assert _open_fds() == before
    assert [p.read_bytes() for p in paths] == [bytes([i]) * (1000 + i) for i in range(5)]


def test_without_a_batch_each_file_is_fsynced_when_closed(tmp_path: Path, fsyncs: list[str]) -> None:
    store = LocalStore()
    _write(store, tmp_path / "one.bin", b"x")
    assert fsyncs == [str(tmp_path / "one.bin")]
    with store.write_batch():
        with store.write_batch():  # nested: the outer block makes it durable
            _write(store, tmp_path / "two.bin", b"y")
        assert fsyncs == [str(tmp_path / "one.bin")]
    assert fsyncs == [str(tmp_path / "one.bin"), str(tmp_path / "two.bin")]


def test_a_failing_deferred_fsync_is_raised_naming_the_file(tmp_path: Path, faults) -> None:
    store = LocalStore()
    faults("save:sync@*:eio#2")  # the second file's fsync fails (they run concurrently; the others still finish)
    before = _open_fds()
    with pytest.raises(CheckpointError) as caught, store.write_batch():
        for name in ("a.safetensors", "b.safetensors", "c.safetensors"):
            with store.open_write(str(tmp_path / name)) as sink:
                write_tensors(sink, {"t": torch.arange(4.0)})
    message = str(caught.value)
    assert message.startswith(f"making {tmp_path}/") and ".safetensors durable (fsync) failed: " in message
    assert "[Errno 5] Input/output error " in message
    assert "(injected at save:sync on rank 0)" in message
    assert _open_fds() == before  # every descriptor closed, the failed one too


def test_a_failing_block_closes_its_files_without_fsync(tmp_path: Path, fsyncs: list[str]) -> None:
    store = LocalStore()
    before = _open_fds()
    with pytest.raises(ValueError, match="boom"), store.write_batch():
        _write(store, tmp_path / "kept-open.bin", b"z")
        raise ValueError("boom")
    assert fsyncs == [] and _open_fds() == before


def test_a_large_batch_keeps_a_bounded_number_of_files_open(tmp_path: Path, fsyncs: list[str]) -> None:
    store = LocalStore()
    count = 2 * local._BATCH_OPEN_FILES + 5
    before = _open_fds()
    most_open = 0
    with store.write_batch():
        for i in range(count):
            _write(store, tmp_path / f"{i}.bin", b"w")
            most_open = max(most_open, len(_open_fds() - before))
    assert most_open <= local._BATCH_OPEN_FILES
    assert sorted(fsyncs) == sorted(str(tmp_path / f"{i}.bin") for i in range(count))
    assert _open_fds() == before


def test_other_stores_keep_the_default_batch(tmp_path: Path) -> None:
    # An object store's files are durable when each upload completes: the batch is the base class's no-op.
    assert ObjectStore.write_batch is CheckpointStore.write_batch
    assert LocalStore.write_batch is not CheckpointStore.write_batch


def _mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "none", str(path)], capture_output=True).returncode == 0


def test_a_mount_point_as_the_checkpoint_is_refused_naming_both_paths(tmp_path: Path) -> None:
    # Docker volumes and bind mounts at the checkpoint path itself: the commit's rename cannot replace a mount point.
    target = tmp_path / "ckpts" / "last.ckpt"
    if not _mount_tmpfs(target):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN) here")
    try:
        model = torch.nn.Linear(2, 2)
        coordinator = CheckpointCoordinator([StateComponent("model", model, SharingPattern.REPLICATED)])
        with pytest.raises(CheckpointError) as info:
            coordinator.save_checkpoint(target)
        message = str(info.value)
        assert f"cannot rename {tmp_path / 'ckpts'}/.staging-" in message and f"to {target}" in message
        assert "Device or resource busy (EBUSY)" in message and "save to a path inside the mounted directory" in message
        assert list((tmp_path / "ckpts").iterdir()) == [target]  # the failed save left no staging directory behind
        assert list(target.iterdir()) == []  # and wrote nothing into the mount
    finally:
        subprocess.run(["umount", str(target)], check=True)

"""The object-store API behaves the same on memory://, file:// and s3:// (moto's real server on loopback)."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import torch

from lightning_sharing import _faults
from lightning_sharing.format.safetensors_io import bytes_checksum
from lightning_sharing.storage.object_store import (
    ObjectChangedError,
    ObjectExistsError,
    ObjectStoreError,
    ObjectWriter,
    delete_objects,
    delete_prefix,
    find_objects,
    list_dir,
    object_info,
    open_store,
    probe_conditional_writes,
    put_create_only,
    put_if_match,
    read_range_into,
    read_versioned,
    write_object,
)

MIB = 1024 * 1024
STORES = ["memory", "file", "s3"]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path):
    """``(fs, root, url)``: a fresh, empty prefix on each kind of store, and the URL users would write."""
    if request.param == "s3":
        fs, root = request.getfixturevalue("s3"), request.getfixturevalue("s3_prefix")
        yield fs, root, f"s3://{root}"
        return
    url = f"memory://t-{uuid.uuid4().hex[:12]}" if request.param == "memory" else f"file://{tmp_path}/store"
    fs, root = open_store(url)
    yield fs, root, url
    if request.param == "memory" and fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch):
    """Set ``LIGHTNING_SHARING_FAULTS`` for this test, with the per-process hit counts starting afresh."""
    _faults._hits.clear()

    def arm(spec: str) -> None:
        monkeypatch.setenv(_faults.FAULTS_ENV, spec)

    yield arm
    _faults._hits.clear()


def _chunks(data: bytes) -> list[object]:
    """The same bytes as every kind of buffer a writer gets: bytes, bytearray, memoryview, NumPy, torch."""
    floats = np.frombuffer(data[:4 * MIB], dtype=np.float32)
    tensor = torch.frombuffer(bytearray(data[4 * MIB:7 * MIB]), dtype=torch.int16)
    return [floats, tensor.numpy(), memoryview(data[7 * MIB:9 * MIB]), bytearray(data[9 * MIB:9 * MIB + 17]),
            data[9 * MIB + 17:]]


def _rel(root: str, paths: list[str]) -> list[str]:
    return sorted(path[len(root.rstrip("/")) + 1:] for path in paths)


def test_streamed_write_returns_the_local_checksum_and_the_bytes_arrive(store) -> None:
    fs, root, _ = store
    data = os.urandom(12 * MIB + 5)
    size, checksum = write_object(fs, f"{root}/g-1/model.safetensors", _chunks(data), part_size=5 * MIB,
                                  max_in_flight=2)
    assert (size, checksum) == (len(data), bytes_checksum(data))
    assert fs.cat_file(f"{root}/g-1/model.safetensors") == data
    assert object_info(fs, f"{root}/g-1/model.safetensors").size == len(data)


def test_empty_and_tiny_objects(store) -> None:
    fs, root, _ = store
    assert write_object(fs, f"{root}/empty", []) == (0, bytes_checksum(b""))
    assert write_object(fs, f"{root}/tiny", [b"x"]) == (1, bytes_checksum(b"x"))
    assert fs.cat_file(f"{root}/empty") == b"" and fs.cat_file(f"{root}/tiny") == b"x"


def test_an_error_inside_the_writer_leaves_no_object(store) -> None:
    fs, root, _ = store
    with pytest.raises(KeyError, match="the caller's own error"), \
            ObjectWriter(fs, f"{root}/doomed", part_size=5 * MIB, max_in_flight=2) as writer:
        writer.write(os.urandom(11 * MIB))
        raise KeyError("the caller's own error")
    assert object_info(fs, f"{root}/doomed") is None
    assert find_objects(fs, root) == []
    with pytest.raises(ObjectStoreError, match="the writer is aborted"):
        writer.write(b"more")


def test_injected_write_fault_leaves_no_object(store, faults) -> None:
    fs, root, _ = store
    faults("save:write@*:enospc")
    with pytest.raises(OSError, match=r"No space left on device \(injected at save:write on rank 0\)"):
        write_object(fs, f"{root}/faulty", [os.urandom(6 * MIB), os.urandom(6 * MIB)], part_size=5 * MIB)
    assert find_objects(fs, root) == []


def test_create_only_put_refuses_the_second_writer(store) -> None:
    fs, root, url = store
    put_create_only(fs, f"{root}/checkpoint_manifest.json", b'{"writer": 1}')
    with pytest.raises(ObjectExistsError) as refused:
        put_create_only(fs, f"{root}/checkpoint_manifest.json", b'{"writer": 2}')
    shown = url if not url.startswith("file://") else url[len("file://"):]
    assert str(refused.value) == f"{shown}/checkpoint_manifest.json already exists: another writer created it first"
    assert read_versioned(fs, f"{root}/checkpoint_manifest.json")[0] == b'{"writer": 1}'
    assert [os.path.basename(i.path) for i in find_objects(fs, root)] == ["checkpoint_manifest.json"]


def test_conditional_overwrite_needs_the_version_that_was_read(store) -> None:
    fs, root, url = store
    path = f"{root}/checkpoint_manifest.json"
    first = put_create_only(fs, path, b"generation 1")
    data, version = read_versioned(fs, path)
    assert (data, version) == (b"generation 1", first)
    second = put_if_match(fs, path, b"generation 2", version)
    assert read_versioned(fs, path) == (b"generation 2", second)
    shown = url if not url.startswith("file://") else url[len("file://"):]
    with pytest.raises(ObjectChangedError) as stale:
        put_if_match(fs, path, b"generation 3 from a stale reader", version)
    assert str(stale.value) == (f"{shown}/checkpoint_manifest.json was changed by another writer since version "
                                f"{version} was read")
    assert read_versioned(fs, path)[0] == b"generation 2"
    delete_objects(fs, [path])
    with pytest.raises(ObjectChangedError, match=r"checkpoint_manifest.json was deleted since version"):
        put_if_match(fs, path, b"generation 3", second)
    with pytest.raises(FileNotFoundError):
        read_versioned(fs, path)


@pytest.mark.parametrize("start, length", [(0, 10), (3 * MIB - 7, 2 * MIB + 11), (5 * MIB - 1, 1), (0, 6 * MIB)])
def test_ranged_reads_fill_the_callers_buffer(store, start: int, length: int) -> None:
    fs, root, _ = store
    data = os.urandom(6 * MIB)
    write_object(fs, f"{root}/blob", [data], part_size=5 * MIB)
    into_bytes = bytearray(length)
    read_range_into(fs, f"{root}/blob", start, into_bytes, chunk=MIB, max_concurrency=3)
    assert bytes(into_bytes) == data[start:start + length]
    if length % 4 == 0:
        tensor = torch.empty(length // 4, dtype=torch.int32)
        read_range_into(fs, f"{root}/blob", start, tensor.numpy(), chunk=MIB)
        assert torch.equal(tensor, torch.frombuffer(bytearray(data[start:start + length]), dtype=torch.int32))


def test_ranged_read_errors(store) -> None:
    fs, root, url = store
    write_object(fs, f"{root}/blob", [b"0123456789"])
    with pytest.raises(ObjectStoreError, match=r"blob has fewer than 12 bytes: bytes 4-11 were asked for"):
        read_range_into(fs, f"{root}/blob", 4, bytearray(8))
    fs_url = url if not url.startswith("file://") else url[len("file://"):]
    with pytest.raises(FileNotFoundError) as missing:
        read_range_into(fs, f"{root}/missing", 0, bytearray(4))
    assert str(missing.value) == f"[Errno 2] no such object: '{fs_url}/missing'"
    with pytest.raises(ValueError, match="needs a writable buffer"):
        read_range_into(fs, f"{root}/blob", 0, b"read-only")
    read_range_into(fs, f"{root}/blob", 3, bytearray())  # nothing asked, nothing read


def test_listing_and_prefix_deletion_stay_inside_the_prefix(store) -> None:
    fs, root, _ = store
    for name in ["step=5.ckpt/checkpoint_manifest.json", "step=5.ckpt/g-1/model.safetensors",
                 "step=5.ckpt/g-1/rng/rank-00001", "step=5.ckpt.bak/keep", "step=50.ckpt/keep", "top"]:
        write_object(fs, f"{root}/{name}", [name.encode()])
    dirs, files = list_dir(fs, root)
    assert _rel(root, dirs) == ["step=5.ckpt", "step=5.ckpt.bak", "step=50.ckpt"]
    assert _rel(root, [f.path for f in files]) == ["top"] and files[0].size == 3
    dirs, files = list_dir(fs, f"{root}/step=5.ckpt")
    assert _rel(root, dirs) == ["step=5.ckpt/g-1"]
    assert _rel(root, [f.path for f in files]) == ["step=5.ckpt/checkpoint_manifest.json"]
    found = find_objects(fs, f"{root}/step=5.ckpt")
    assert _rel(root, [f.path for f in found]) == [
        "step=5.ckpt/checkpoint_manifest.json", "step=5.ckpt/g-1/model.safetensors", "step=5.ckpt/g-1/rng/rank-00001"]
    assert all(f.mtime is not None for f in found)
    assert delete_prefix(fs, f"{root}/step=5.ckpt") == 3
    assert find_objects(fs, f"{root}/step=5.ckpt") == [] and list_dir(fs, f"{root}/step=5.ckpt") == ([], [])
    assert _rel(root, [f.path for f in find_objects(fs, root)]) == ["step=5.ckpt.bak/keep", "step=50.ckpt/keep", "top"]
    assert delete_prefix(fs, f"{root}/never-written") == 0
    assert object_info(fs, f"{root}/step=5.ckpt/checkpoint_manifest.json") is None


def test_the_store_is_seen_to_enforce_both_conditions(store) -> None:
    fs, root, _ = store
    support = probe_conditional_writes(fs, root)
    assert (support.create_only, support.if_match) == (True, True)
    assert find_objects(fs, root) == []

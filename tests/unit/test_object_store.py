"""The object store's files behave the same on memory:// and on s3:// through both clients (fsspec, obstore), the
latter against moto's real server on loopback: streamed writes, conditional puts, ranged reads, listings, deletion."""

from __future__ import annotations

import os
import uuid

import fsspec
import numpy as np
import pytest
import torch

from lightning_sharing import _faults
from lightning_sharing.errors import ObjectChangedError, ObjectExistsError, ObjectStoreError
from lightning_sharing.storage import object_files, object_store
from lightning_sharing.storage.generations import delete_prefix
from lightning_sharing.storage.object_store import ObjectStore, open_client, probe_conditional_writes

MIB = 1024 * 1024
KINDS = ["memory", "s3-fsspec", "s3-obstore"]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def root(kind: str, request: pytest.FixtureRequest):
    """``(url, storage_options)``: a fresh, empty prefix on each kind of store, with the options choosing the client."""
    if kind == "memory":
        bucket = f"memory://t-{uuid.uuid4().hex[:12]}"
        yield f"{bucket}/run", None
        fs = fsspec.filesystem("memory")
        if fs.exists(bucket):
            fs.rm(bucket, recursive=True)
        return
    yield f"s3://{request.getfixturevalue('s3_prefix')}", {"client": kind.split("-")[1]}


@pytest.fixture(autouse=True)
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(object_files, "PART_SIZE", 5 * MIB)  # multipart uploads of a few MiB


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch):
    """Set ``LIGHTNING_SHARING_FAULTS`` for this test, with the per-process hit counts starting afresh."""
    _faults._hits.clear()
    yield lambda spec: monkeypatch.setenv(_faults.FAULTS_ENV, spec)
    _faults._hits.clear()


def _chunks(data: bytes) -> list[object]:
    """The same bytes as every kind of buffer a writer gets: bytes, bytearray, memoryview, NumPy, torch."""
    floats = np.frombuffer(data[:4 * MIB], dtype=np.float32)
    tensor = torch.frombuffer(bytearray(data[4 * MIB:7 * MIB]), dtype=torch.int16)
    return [floats, tensor.numpy(), memoryview(data[7 * MIB:9 * MIB]), bytearray(data[9 * MIB:9 * MIB + 17]),
            data[9 * MIB + 17:]]


def _write(store: ObjectStore, url: str, chunks: list[object]) -> None:
    with store.open_write(url) as sink:
        for chunk in chunks:
            sink.write(chunk)


def _read(store: ObjectStore, url: str, start: int, length: int) -> bytes:
    with store.open_read(url) as handle:
        handle.seek(start)
        buffer = bytearray(length)
        assert handle.readinto(buffer) == length
    return bytes(buffer)


def test_streamed_writes_arrive_whole_and_read_back_exactly(root) -> None:
    url, options = root
    store = ObjectStore.for_url(url, options)
    data = os.urandom(12 * MIB + 5)  # three parts of 5 MiB (the last smaller)
    _write(store, f"{url}/g-1/model.safetensors", _chunks(data))
    _write(store, f"{url}/empty", [])
    _write(store, f"{url}/tiny", [b"x"])
    assert store.size(f"{url}/g-1/model.safetensors") == len(data)
    assert store.read_bytes(f"{url}/g-1/model.safetensors") == data
    assert store.read_bytes(f"{url}/empty") == b"" and store.read_bytes(f"{url}/tiny") == b"x"
    for start, length in [(0, 10), (3 * MIB - 7, 2 * MIB + 11), (5 * MIB - 1, 1), (0, len(data))]:
        assert _read(store, f"{url}/g-1/model.safetensors", start, length) == data[start:start + length]
    tensor = torch.empty(MIB, dtype=torch.int32)
    with store.open_read(f"{url}/g-1/model.safetensors") as handle:
        handle.seek(4)
        handle.readinto(tensor.numpy())
    assert torch.equal(tensor, torch.frombuffer(bytearray(data[4:4 + 4 * MIB]), dtype=torch.int32))


@pytest.mark.parametrize("size", [100, 11 * MIB], ids=["one-put", "multipart"])
def test_an_error_inside_the_writer_leaves_no_object(root, size: int) -> None:
    url, options = root
    store = ObjectStore.for_url(url, options)
    with pytest.raises(KeyError, match="the caller's own error"), store.open_write(f"{url}/g-1/doomed") as sink:
        sink.write(os.urandom(size))
        raise KeyError("the caller's own error")
    assert store.size(f"{url}/g-1/doomed") is None and store.list_files(url) == []
    with pytest.raises(ObjectStoreError, match="the writer is closed"):
        sink.write(b"more")
    client, key, _ = open_client(url, options)
    assert client.uploads(f"{key}/") == []


def test_an_injected_write_fault_leaves_no_object(root, faults) -> None:
    url, options = root
    store = ObjectStore.for_url(url, options)
    faults("save:write@*:enospc")
    with pytest.raises(OSError, match=r"No space left on device \(injected at save:write on rank 0\)"):
        _write(store, f"{url}/faulty", [os.urandom(6 * MIB), os.urandom(6 * MIB)])
    assert store.list_files(url) == []


def test_create_only_puts_refuse_the_second_writer(root) -> None:
    url, options = root
    client, key, _ = open_client(url, options)
    client.put(f"{key}/checkpoint_manifest.json", b'{"writer": 1}', create=True)
    with pytest.raises(ObjectExistsError) as refused:
        client.put(f"{key}/checkpoint_manifest.json", b'{"writer": 2}', create=True)
    assert str(refused.value) == f"{url}/checkpoint_manifest.json already exists: another writer created it first"
    assert client.get(f"{key}/checkpoint_manifest.json")[0] == b'{"writer": 1}'
    assert [info.key for info in client.list(f"{key}/", delimiter=False)[1]] == [f"{key}/checkpoint_manifest.json"]


def test_conditional_overwrites_need_the_version_that_was_read(root) -> None:
    url, options = root
    client, key, _ = open_client(url, options)
    path = f"{key}/checkpoint_manifest.json"
    first = client.put(path, b"generation 1", create=True)
    data, version = client.get(path)
    assert (data, version) == (b"generation 1", first)
    second = client.put(path, b"generation 2", if_match=version)
    assert client.get(path) == (b"generation 2", second)
    with pytest.raises(ObjectChangedError) as stale:
        client.put(path, b"generation 3 from a stale reader", if_match=version)
    assert str(stale.value) == (f"{url}/checkpoint_manifest.json was changed by another writer since version "
                                f"{version} was read")
    assert client.get(path)[0] == b"generation 2"
    client.delete([path])
    with pytest.raises(ObjectChangedError, match=r"checkpoint_manifest.json was deleted since version"):
        client.put(path, b"generation 3", if_match=second)
    with pytest.raises(FileNotFoundError):
        client.get(path)


def test_ranged_read_errors_name_the_object(root) -> None:
    url, options = root
    store = ObjectStore.for_url(url, options)
    _write(store, f"{url}/g-1/blob", [b"0123456789ab"])
    assert store.list_files(f"{url}/g-1") == ["blob"]  # the listing's size (12) is what reads go by
    client, key, _ = open_client(url, options)
    client.put(f"{key}/g-1/blob", b"0123456789")  # replaced since (another job): shorter
    with pytest.raises(ObjectStoreError, match=r"/g-1/blob has fewer than 12 bytes: bytes 4-11 were asked for"):
        _read(store, f"{url}/g-1/blob", 4, 8)
    with pytest.raises(ObjectStoreError, match=r"/g-1/blob has fewer than 12 bytes: bytes 10-11 were asked for"):
        _read(store, f"{url}/g-1/blob", 10, 2)  # a range past the end: S3 answers 416
    with pytest.raises(FileNotFoundError) as missing:
        store.open_read(f"{url}/missing")
    assert str(missing.value) == f"[Errno 2] no such object: '{url}/missing'"
    with pytest.raises(FileNotFoundError) as missing:
        store.read_bytes(f"{url}/missing")
    assert str(missing.value) == f"[Errno 2] no such object: '{url}/missing'"


def test_listings_and_prefix_deletion_stay_inside_the_prefix(root) -> None:
    url, options = root
    store = ObjectStore.for_url(url, options)
    client, key, _ = open_client(url, options)
    for name in ["step=5.ckpt/checkpoint_manifest.json", "step=5.ckpt/g-1/model.safetensors",
                 "step=5.ckpt/g-1/rng/rank-00001", "step=5.ckpt.bak/keep", "step=50.ckpt/keep", "top"]:
        _write(store, f"{url}/{name}", [name.encode()])
    dirs, objects = client.list(f"{key}/", delimiter=True)
    assert dirs == [f"{key}/step=5.ckpt", f"{key}/step=5.ckpt.bak", f"{key}/step=50.ckpt"]
    assert [(o.key, o.size) for o in objects] == [(f"{key}/top", 3)]
    assert client.list(f"{key}/step=5.ckpt/", delimiter=True) == (
        [f"{key}/step=5.ckpt/g-1"], [client.head(f"{key}/step=5.ckpt/checkpoint_manifest.json")])
    assert store.list_checkpoint_candidates(url) == [f"{url}/step=5.ckpt", f"{url}/step=5.ckpt.bak",
                                                     f"{url}/step=50.ckpt"]
    assert store.list_files(f"{url}/step=5.ckpt/g-1") == ["model.safetensors", "rng/rank-00001"]
    assert delete_prefix(client, f"{key}/step=5.ckpt") == 3
    assert client.list(f"{key}/step=5.ckpt/", delimiter=True) == ([], [])
    assert [o.key for o in client.list(f"{key}/", delimiter=False)[1]] == [
        f"{key}/step=5.ckpt.bak/keep", f"{key}/step=50.ckpt/keep", f"{key}/top"]
    assert delete_prefix(client, f"{key}/never-written") == 0 and client.head(f"{key}/never-written") is None
    with pytest.raises(ValueError, match="refusing to delete everything in"):
        delete_prefix(client, "")


def test_a_server_side_copy_holds_the_same_bytes(root) -> None:
    url, options = root
    client, key, _ = open_client(url, options)
    client.put(f"{key}/a/model.safetensors", b"weights")
    client.copy(f"{key}/a/model.safetensors", f"{key}/b/model.safetensors")
    assert client.get(f"{key}/b/model.safetensors")[0] == b"weights"


def test_the_store_is_seen_to_enforce_both_conditions(root) -> None:
    url, options = root
    assert probe_conditional_writes(url, options) == object_store.ConditionalSupport(create_only=True, if_match=True)
    client, key, _ = open_client(url, options)
    assert client.list(f"{key}/", delimiter=False) == ([], [])

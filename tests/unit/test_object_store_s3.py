"""S3 behaviour of the object store on both clients (fsspec, obstore) against moto's real server, with real faults
from a loopback proxy (tests/support/s3.py): multipart semantics, bounded retries of transient faults only, resets
mid-body and stalls past the timeout, a lost answer to the manifest's put; how the client is chosen.

Through the proxy the store runs with a fast retry policy; the proxy's request counts show exactly what was sent,
retried and not retried.
"""

from __future__ import annotations

import logging
import os
import re

import pytest
from support.s3 import Rule

from lightning_sharing import _faults
from lightning_sharing.errors import ObjectStoreError, TransientStoreError
from lightning_sharing.storage import library_options, object_files
from lightning_sharing.storage.fsspec_client import FsspecClient
from lightning_sharing.storage.generations import delete_prefix, manifest_data_prefix
from lightning_sharing.storage.object_store import ObjectStore, open_client
from lightning_sharing.storage.obstore_client import ObstoreClient, s3_config
from lightning_sharing.storage.retry import RetryPolicy

MIB = 1024 * 1024
FAST = {"attempts": 4, "initial_delay": 0.01, "max_delay": 0.05, "timeout": 2}


@pytest.fixture(params=["fsspec", "obstore"])
def client_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(autouse=True)
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(object_files, "PART_SIZE", 5 * MIB)


def _proxied(proxy, prefix: str, kind: str, **retry) -> tuple[ObjectStore, str]:
    url = f"s3://{prefix}"
    return ObjectStore.for_url(url, {"endpoint_url": proxy.url, "client": kind, "retry": {**FAST, **retry}}), url


def _uploads(s3, prefix: str) -> list[str]:
    bucket, key, _ = s3.split_path(prefix)
    return [u["Key"] for u in s3.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key + "/").get("Uploads", [])]


def _write(store: ObjectStore, url: str, data: bytes) -> None:
    with store.open_write(url) as sink:
        for start in range(0, len(data), MIB):
            sink.write(data[start:start + MIB])


def _retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "; retry " in r.getMessage()]


def test_the_obstore_client_sends_several_parts_at_once(s3, s3_prefix, fault_proxy) -> None:
    store, url = _proxied(fault_proxy, s3_prefix, "obstore")
    # The first three part uploads are held at the proxy until all three are there: a writer that sent one part at
    # a time would never get them there together, and the hold would time out.
    held = fault_proxy.add(Rule("hold", times=3, method="PUT", contains=("partNumber=",), hold_timeout=60))
    data = os.urandom(4 * 5 * MIB + 123)
    _write(store, f"{url}/big", data)
    assert not held.timed_out and fault_proxy.max_in_flight["PUT part"] >= 3
    assert fault_proxy.count("PUT", "partNumber=") == 5
    assert s3.cat_file(f"{s3_prefix}/big") == data


def test_an_object_smaller_than_a_part_is_one_put(s3, s3_prefix, fault_proxy, client_kind) -> None:
    store, url = _proxied(fault_proxy, s3_prefix, client_kind)
    _write(store, f"{url}/small", b"a" * 1000 + b"b" * 1000)
    assert fault_proxy.requests == [("PUT", f"/{s3_prefix}/small")]
    assert s3.cat_file(f"{s3_prefix}/small") == b"a" * 1000 + b"b" * 1000


def test_an_aborted_upload_leaves_no_object_and_no_upload(s3, s3_prefix, fault_proxy, client_kind) -> None:
    store, url = _proxied(fault_proxy, s3_prefix, client_kind)
    with pytest.raises(RuntimeError, match="stop"), store.open_write(f"{url}/big") as sink:
        sink.write(os.urandom(16 * MIB))
        raise RuntimeError("stop")
    assert fault_proxy.count("POST", "uploads") == 1 and fault_proxy.count("DELETE", "uploadId=") >= 1
    assert not s3.exists(f"{s3_prefix}/big") and _uploads(s3, s3_prefix) == []


def test_a_write_fault_fires_once_the_first_part_is_handed_over(s3, s3_prefix, fault_proxy, client_kind,
                                                                  monkeypatch) -> None:
    _faults._hits.clear()
    monkeypatch.setenv(_faults.FAULTS_ENV, "save:write@0:raise")
    store, url = _proxied(fault_proxy, s3_prefix, client_kind)
    with pytest.raises(RuntimeError, match="injected fault at save:write on rank 0"):
        with store.open_write(f"{url}/big") as sink:
            sink.write(os.urandom(6 * MIB))
            sink.write(os.urandom(6 * MIB))
    _faults._hits.clear()
    assert fault_proxy.count("POST", "uploads") == 1  # the upload had begun, its first part handed over
    assert fault_proxy.count("PUT", "partNumber=2") == 0
    assert not s3.exists(f"{s3_prefix}/big") and _uploads(s3, s3_prefix) == []


def test_a_refused_part_is_not_retried_and_aborts_the_upload(s3, s3_prefix, fault_proxy, client_kind) -> None:
    store, url = _proxied(fault_proxy, s3_prefix, client_kind)
    fault_proxy.add(Rule("error", method="PUT", contains=("partNumber=2",), status=403, code="AccessDenied"))
    with pytest.raises(ObjectStoreError, match=rf"{url}/big failed: AccessDenied \(HTTP 403\)"):
        _write(store, f"{url}/big", os.urandom(16 * MIB))
    assert fault_proxy.count("PUT", "partNumber=2") == 1
    assert not s3.exists(f"{s3_prefix}/big") and _uploads(s3, s3_prefix) == []


def test_throttled_parts_are_retried_by_the_library(s3, s3_prefix, fault_proxy, client_kind) -> None:
    store, url = _proxied(fault_proxy, s3_prefix, client_kind)
    slowdown = fault_proxy.add(Rule("slowdown", times=3, method="PUT", contains=("partNumber=",)))
    data = os.urandom(11 * MIB)
    _write(store, f"{url}/big", data)
    assert slowdown.hits == 3 and fault_proxy.count("PUT", "partNumber=") == 3 + 3
    assert s3.cat_file(f"{s3_prefix}/big") == data


def test_retries_are_bounded_in_attempts_and_the_error_says_what_failed(s3_prefix, fault_proxy, client_kind,
                                                                      caplog) -> None:
    store, url = _proxied(fault_proxy, s3_prefix, client_kind)
    fault_proxy.add(Rule("slowdown", times=1000, method="PUT"))
    with caplog.at_level(logging.WARNING, logger="lightning_sharing"), \
            pytest.raises(TransientStoreError) as gave_up:
        _write(store, f"{url}/g-1/rng.json", b"{}")
    assert re.fullmatch(
        rf"put {url}/g-1/rng\.json failed 4 time\(s\) in [0-9.]+ s with transient errors, the last one SlowDown "
        r"\(HTTP 503\); the store is throttling or unreachable: retry later, or lower the load \(fewer ranks "
        r"writing at once, larger parts\)", str(gave_up.value)), str(gave_up.value)
    assert fault_proxy.count("PUT") == 4 and len(_retry_warnings(caplog)) == 3


def test_retries_are_bounded_in_time(s3_prefix, fault_proxy, client_kind) -> None:
    store, url = _proxied(fault_proxy, s3_prefix, client_kind, attempts=1000, deadline=1.0, initial_delay=0.2,
                          max_delay=0.4)
    fault_proxy.add(Rule("slowdown", times=10**6, method="PUT"))
    with pytest.raises(TransientStoreError, match=r"failed (\d+) time\(s\)") as gave_up:
        _write(store, f"{url}/x.json", b"{}")
    tries = int(re.search(r"failed (\d+) time", str(gave_up.value))[1])
    assert 1 < tries < 1000 and fault_proxy.count("PUT") == tries


def test_client_errors_are_not_retried(s3_prefix, fault_proxy, client_kind, caplog) -> None:
    store, url = _proxied(fault_proxy, s3_prefix, client_kind)
    fault_proxy.add(Rule("error", times=1000, method="PUT", status=403, code="AccessDenied"))
    with caplog.at_level(logging.WARNING, logger="lightning_sharing"), \
            pytest.raises(ObjectStoreError, match=rf"^put {url}/x.json failed: AccessDenied \(HTTP 403\)$"):
        _write(store, f"{url}/x.json", b"{}")
    assert fault_proxy.count("PUT") == 1 and _retry_warnings(caplog) == []


@pytest.mark.parametrize("fault", ["reset", "reset_body", "stall"])
def test_a_broken_or_stalled_read_is_retried(s3, s3_prefix, fault_proxy, client_kind, fault: str) -> None:
    data = os.urandom(3 * MIB)
    s3.pipe_file(f"{s3_prefix}/blob", data)
    store, url = _proxied(fault_proxy, s3_prefix, client_kind, timeout=1)
    rule = fault_proxy.add(Rule(fault, times=2, method="GET", stall=4))
    with store.open_read(f"{url}/blob") as handle:
        handle.seek(5)
        buffer = bytearray(3 * MIB - 10)
        handle.readinto(buffer)
    assert bytes(buffer) == data[5:5 + len(buffer)]
    assert rule.hits == 2 and fault_proxy.count("GET") == 1 + 2


def test_a_read_that_keeps_stalling_fails_naming_the_object_and_the_attempts(s3, s3_prefix, fault_proxy,
                                                                             client_kind) -> None:
    s3.pipe_file(f"{s3_prefix}/blob", b"x" * 1000)
    store, url = _proxied(fault_proxy, s3_prefix, client_kind, attempts=2, timeout=1)
    fault_proxy.add(Rule("stall", times=1000, method="GET", stall=3))
    with pytest.raises(TransientStoreError, match=rf"^read {url}/blob failed 2 time\(s\) in [0-9.]+ s with "
                                                  r"transient errors, the last one "):
        store.open_read(f"{url}/blob").read()
    assert fault_proxy.count("GET") == 2


def test_a_lost_answer_to_the_manifest_put_is_recognised_as_ours(s3, s3_prefix, fault_proxy, client_kind) -> None:
    store, url = _proxied(fault_proxy, s3_prefix, client_kind)
    target = f"{url}/step=1.ckpt"
    root = store.begin_save(target, "0" * 32)
    _write(store, f"{root}/x.json", b"{}")
    fault_proxy.add(Rule("drop_answer", method="PUT", contains=("checkpoint_manifest.json",)))
    manifest = b'{"data_prefix": "%s"}' % store.data_prefix(root, target).encode()
    store.commit(root, target, "0" * 32, manifest)  # moto stored it; the answer was lost; the retry is refused
    assert fault_proxy.count("PUT", "checkpoint_manifest.json") == 2
    assert fault_proxy.count("GET", "checkpoint_manifest.json") == 1  # read back: these bytes, so committed
    stored = s3.cat_file(f"{s3_prefix}/step=1.ckpt/checkpoint_manifest.json")
    assert stored == manifest and manifest_data_prefix(stored) == f"g-{'0' * 32}-new"


def test_listings_and_lookups_see_other_clients_at_once(s3, s3_prefix, client_kind) -> None:
    client, key, _ = open_client(f"s3://{s3_prefix}", {"client": client_kind})
    client.put(f"{key}/a", b"1")
    assert [info.key for info in client.list(f"{key}/", delimiter=False)[1]] == [f"{key}/a"]
    s3.pipe_file(f"{s3_prefix}/b", b"2")
    assert [info.key for info in client.list(f"{key}/", delimiter=True)[1]] == [f"{key}/a", f"{key}/b"]
    s3.rm_file(f"{s3_prefix}/a")
    assert client.head(f"{key}/a") is None and client.head(f"{key}/b").size == 1
    assert [info.key for info in client.list(f"{key}/", delimiter=False)[1]] == [f"{key}/b"]


def test_deleting_a_prefix_aborts_its_unfinished_uploads(s3, s3_prefix, client_kind) -> None:
    bucket, key, _ = s3.split_path(s3_prefix)
    for name in ("ckpt/g-1/model.safetensors", "ckpt-other/model.safetensors"):  # as a rank killed mid-upload
        s3.call_s3("create_multipart_upload", Bucket=bucket, Key=f"{key}/{name}")
    client, prefix_key, _ = open_client(f"s3://{s3_prefix}", {"client": client_kind})
    client.put(f"{prefix_key}/ckpt/g-1/rng", b"x")
    assert delete_prefix(client, f"{prefix_key}/ckpt") == 1
    assert _uploads(s3, s3_prefix) == [f"{key}/ckpt-other/model.safetensors"]
    assert s3.find(s3_prefix) == []


# --------------------------------------------------------------------------- choosing and configuring the client


def test_the_default_client_is_obstore_for_s3_and_fsspec_elsewhere(moto_server) -> None:
    assert isinstance(open_client("s3://bucket/run")[0], ObstoreClient)
    assert isinstance(open_client("s3://bucket/run", {"client": "fsspec"})[0], FsspecClient)
    assert isinstance(open_client("memory://bucket/run")[0], FsspecClient)
    with pytest.raises(ValueError, match="must be 'fsspec' or 'obstore', not 'boto'"):
        open_client("s3://bucket/run", {"client": "boto"})


def test_s3fs_options_are_translated_for_obstore_or_the_fsspec_client_is_used(moto_server, caplog) -> None:
    options = {"endpoint_url": "http://127.0.0.1:1", "key": "k", "secret": "s", "token": "t", "anon": False,
               "requester_pays": True, "client_kwargs": {"region_name": "eu-west-1"},
               "config_kwargs": {"s3": {"addressing_style": "virtual"}, "read_timeout": 5, "retries": {}},
               "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "kms-1"}}
    assert s3_config(options) == ({
        "endpoint": "http://127.0.0.1:1", "access_key_id": "k", "secret_access_key": "s", "session_token": "t",
        "skip_signature": False, "request_payer": True, "region": "eu-west-1", "virtual_hosted_style_request": True,
        "server_side_encryption": "aws:kms", "sse_kms_key_id": "kms-1"}, None)
    with caplog.at_level(logging.INFO, logger="lightning_sharing"):
        client = open_client("s3://bucket/run", {"client": "obstore", "profile": "dev"})[0]
    assert isinstance(client, FsspecClient)
    assert "s3://bucket: using the fsspec client: storage option(s) ['profile'] have no obstore equivalent" in [
        r.getMessage() for r in caplog.records]


def test_retry_policies_come_from_storage_options() -> None:
    assert open_client("memory://b/k", {"retry": {"attempts": 3, "deadline": 9}})[2] == RetryPolicy(attempts=3,
                                                                                                       deadline=9)
    assert open_client("memory://b/k", {"retry": RetryPolicy(attempts=2)})[2].attempts == 2
    with pytest.raises(ValueError, match="invalid retry policy"):
        RetryPolicy(attempts=0)
    # What code handing storage_options to fsspec itself (Lightning's ModelCheckpoint) must pass on.
    assert library_options({"client": "fsspec", "retry": {"attempts": 2}, "anon": True}) == {"anon": True}
    assert library_options(None) is None

"""S3 behaviour of the object-store API against moto's real server, with real faults from a loopback proxy.

The proxy tests use an ``S3FileSystem`` whose botocore and s3fs retries are off (``proxied_s3``), so each
injected fault reaches lightning_sharing's own retry layer, and the proxy's request counts show exactly
what was retried and what was not.
"""

from __future__ import annotations

import logging
import os

import pytest
from support.s3 import Rule, proxied_s3

from lightning_sharing import _faults
from lightning_sharing.format.safetensors_io import bytes_checksum
from lightning_sharing.storage.object_store import (
    ObjectWriter,
    RetryPolicy,
    TransientStoreError,
    delete_prefix,
    find_objects,
    object_info,
    put_create_only,
    read_range_into,
    write_object,
)

MIB = 1024 * 1024
FAST_RETRY = RetryPolicy(attempts=4, initial_delay=0.01, max_delay=0.05)


def _uploads(s3, prefix: str) -> list[str]:
    bucket, key, _ = s3.split_path(prefix)
    answer = s3.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key + "/")
    return [upload["Key"] for upload in answer.get("Uploads", [])]


def _retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "; retry " in r.getMessage()]


def test_parts_go_up_several_at_once_and_no_more_than_allowed(s3, s3_prefix, fault_proxy) -> None:
    fs = proxied_s3(fault_proxy)
    # The first three part uploads are held at the proxy until all three are there: a writer that sent one
    # part at a time would never get them there together, and the hold would time out.
    held = fault_proxy.add(Rule("hold", times=3, method="PUT", contains=("partNumber=",), hold_timeout=60))
    data = os.urandom(4 * 5 * MIB + 123)
    size, checksum = write_object(fs, f"{s3_prefix}/big", [data[i:i + MIB] for i in range(0, len(data), MIB)],
                                  part_size=5 * MIB, max_in_flight=3, retry=FAST_RETRY)
    assert (size, checksum) == (len(data), bytes_checksum(data))
    assert not held.timed_out
    assert fault_proxy.max_in_flight["PUT part"] == 3
    assert fault_proxy.count("PUT", "partNumber=") == 5
    info = object_info(s3, f"{s3_prefix}/big")
    assert info is not None and info.version.endswith('-5"')  # S3's ETag of a 5-part upload
    assert s3.cat_file(f"{s3_prefix}/big") == data


def test_an_object_smaller_than_a_part_is_one_put(s3, s3_prefix, fault_proxy) -> None:
    fs = proxied_s3(fault_proxy)
    write_object(fs, f"{s3_prefix}/small", [b"a" * 1000, b"b" * 1000], part_size=5 * MIB)
    assert fault_proxy.requests == [("PUT", f"/{s3_prefix}/small")]
    assert s3.cat_file(f"{s3_prefix}/small") == b"a" * 1000 + b"b" * 1000


def test_an_aborted_upload_leaves_no_object_and_no_upload(s3, s3_prefix, fault_proxy) -> None:
    fs = proxied_s3(fault_proxy)
    with pytest.raises(RuntimeError, match="stop"), ObjectWriter(fs, f"{s3_prefix}/big", part_size=5 * MIB) as writer:
        writer.write(os.urandom(16 * MIB))
        raise RuntimeError("stop")
    assert fault_proxy.count("POST", "uploads") == 1
    assert fault_proxy.count("PUT", "partNumber=") <= 3  # parts not sent yet when the error came never are
    assert fault_proxy.count("DELETE", "uploadId=") == 1
    assert object_info(s3, f"{s3_prefix}/big") is None
    assert _uploads(s3, s3_prefix) == []


def test_a_write_fault_fires_mid_upload(s3, s3_prefix, fault_proxy, monkeypatch) -> None:
    _faults._hits.clear()
    monkeypatch.setenv(_faults.FAULTS_ENV, "save:write@0:raise")
    fs = proxied_s3(fault_proxy)
    with pytest.raises(RuntimeError, match="injected fault at save:write on rank 0"):
        write_object(fs, f"{s3_prefix}/big", [os.urandom(6 * MIB), os.urandom(6 * MIB)], part_size=5 * MIB)
    _faults._hits.clear()
    assert fault_proxy.count("POST", "uploads") == 1  # the upload had begun, its first part handed over
    assert fault_proxy.count("PUT", "partNumber=2") == 0
    assert fault_proxy.count("DELETE", "uploadId=") == 1
    assert find_objects(s3, s3_prefix) == [] and _uploads(s3, s3_prefix) == []


def test_a_refused_part_is_not_retried_and_aborts_the_upload(s3, s3_prefix, fault_proxy, caplog) -> None:
    fs = proxied_s3(fault_proxy)
    fault_proxy.add(Rule("error", method="PUT", contains=("partNumber=2",), status=403, code="AccessDenied"))
    with caplog.at_level(logging.WARNING, logger="lightning_sharing"), \
            pytest.raises(PermissionError, match="injected by the test proxy"):
        write_object(fs, f"{s3_prefix}/big", [os.urandom(16 * MIB)], part_size=5 * MIB, retry=FAST_RETRY)
    assert fault_proxy.count("PUT", "partNumber=2") == 1
    # A part the server is still storing when the abort arrives can make the abort fail with a transient error
    # (moto answers 500, S3 documents the same race): it is retried, and only then. Exactly one abort succeeds.
    abort_retries = [w for w in _retry_warnings(caplog) if w.startswith("abort the multipart upload of")]
    assert fault_proxy.count("DELETE", "uploadId=") == 1 + len(abort_retries), abort_retries
    assert object_info(s3, f"{s3_prefix}/big") is None and _uploads(s3, s3_prefix) == []


def test_throttled_parts_are_retried_with_backoff(s3, s3_prefix, fault_proxy, caplog) -> None:
    fs = proxied_s3(fault_proxy)
    slowdown = fault_proxy.add(Rule("slowdown", times=3, method="PUT", contains=("partNumber=",)))
    data = os.urandom(11 * MIB)
    with caplog.at_level(logging.WARNING, logger="lightning_sharing"):
        assert write_object(fs, f"{s3_prefix}/big", [data], part_size=5 * MIB, retry=FAST_RETRY)[0] == len(data)
    assert slowdown.hits == 3
    assert fault_proxy.count("PUT", "partNumber=") == 3 + 3
    warnings = _retry_warnings(caplog)
    assert len(warnings) == 3 and all("SlowDown (HTTP 503); retry " in w for w in warnings), warnings
    assert s3.cat_file(f"{s3_prefix}/big") == data


def test_retries_are_bounded(s3, s3_prefix, fault_proxy, caplog) -> None:
    fs = proxied_s3(fault_proxy)
    fault_proxy.add(Rule("slowdown", times=1000, method="PUT"))
    with caplog.at_level(logging.WARNING, logger="lightning_sharing"), \
            pytest.raises(TransientStoreError) as gave_up:
        put_create_only(fs, f"{s3_prefix}/checkpoint_manifest.json", b"{}", retry=FAST_RETRY)
    assert str(gave_up.value) == (
        f"create s3://{s3_prefix}/checkpoint_manifest.json failed 4 time(s) with transient errors, the last one "
        "SlowDown (HTTP 503); the store is throttling or unreachable: retry later, or lower the load (fewer ranks "
        "writing at once, larger parts)"
    )
    assert fault_proxy.count("PUT") == 4 and len(_retry_warnings(caplog)) == 3
    assert object_info(s3, f"{s3_prefix}/checkpoint_manifest.json") is None


def test_client_errors_are_not_retried(s3, s3_prefix, fault_proxy, caplog) -> None:
    fs = proxied_s3(fault_proxy)
    fault_proxy.add(Rule("error", times=1000, method="PUT", status=403, code="AccessDenied"))
    with caplog.at_level(logging.WARNING, logger="lightning_sharing"), pytest.raises(PermissionError):
        put_create_only(fs, f"{s3_prefix}/checkpoint_manifest.json", b"{}", retry=FAST_RETRY)
    assert fault_proxy.count("PUT") == 1 and _retry_warnings(caplog) == []


def test_a_reset_connection_during_a_ranged_read_is_retried(s3, s3_prefix, fault_proxy) -> None:
    data = os.urandom(3 * MIB)
    write_object(s3, f"{s3_prefix}/blob", [data])
    fs = proxied_s3(fault_proxy)
    reset = fault_proxy.add(Rule("reset", times=2, method="GET"))
    buffer = bytearray(3 * MIB - 10)
    read_range_into(fs, f"{s3_prefix}/blob", 5, buffer, chunk=MIB, max_concurrency=2, retry=FAST_RETRY)
    assert bytes(buffer) == data[5:5 + len(buffer)]
    assert reset.hits == 2 and fault_proxy.count("GET") == 3 + 2


def test_a_lost_answer_to_a_create_only_put_is_recognised_as_ours(s3, s3_prefix, fault_proxy) -> None:
    fs = proxied_s3(fault_proxy)
    # moto stores the manifest but the answer is lost; the PUT is sent again (aiohttp itself resends an
    # idempotent request whose reused connection broke), gets 412, and the read-back finds our own bytes.
    fault_proxy.add(Rule("drop_answer", method="PUT"))
    put_create_only(fs, f"{s3_prefix}/checkpoint_manifest.json", b'{"mine": true}', retry=FAST_RETRY)
    assert fault_proxy.count("PUT") == 2 and fault_proxy.count("GET") == 1
    assert s3.cat_file(f"{s3_prefix}/checkpoint_manifest.json") == b'{"mine": true}'


def test_a_lost_answer_to_completing_an_upload_is_retried(s3, s3_prefix, fault_proxy) -> None:
    fs = proxied_s3(fault_proxy)
    fault_proxy.add(Rule("drop_answer", method="POST", contains=("uploadId=",)))  # moto answers a repeat with 200
    data = os.urandom(11 * MIB)
    assert write_object(fs, f"{s3_prefix}/big", [data], part_size=5 * MIB, retry=FAST_RETRY)[0] == len(data)
    assert fault_proxy.count("POST", "uploadId=") == 2
    assert s3.cat_file(f"{s3_prefix}/big") == data


def test_a_completed_upload_whose_repeat_finds_no_upload_is_recognised_by_its_etag(s3, s3_prefix, fault_proxy,
                                                                                   caplog) -> None:
    fs = proxied_s3(fault_proxy)
    # As S3 may answer a repeated complete once the first one went through: 404 NoSuchUpload.
    fault_proxy.add(Rule("drop_answer", method="POST", contains=("uploadId=",)))
    fault_proxy.add(Rule("error", method="POST", contains=("uploadId=",), status=404, code="NoSuchUpload"))
    data = os.urandom(11 * MIB)
    with caplog.at_level(logging.INFO, logger="lightning_sharing"):
        assert write_object(fs, f"{s3_prefix}/big", [data], part_size=5 * MIB, retry=FAST_RETRY)[0] == len(data)
    assert fault_proxy.count("HEAD") == 1
    assert any("the completed upload's answer was lost" in r.getMessage() for r in caplog.records)
    assert s3.cat_file(f"{s3_prefix}/big") == data


def test_listings_see_other_clients_at_once(s3, s3_prefix, moto_server) -> None:
    import s3fs

    other = s3fs.S3FileSystem(skip_instance_cache=True)
    write_object(s3, f"{s3_prefix}/a", [b"1"])
    assert [i.path for i in find_objects(s3, s3_prefix)] == [f"{s3_prefix}/a"]
    s3.ls(s3_prefix)  # fills s3fs's listing cache, which our listings must not read
    other.pipe_file(f"{s3_prefix}/b", b"2")
    assert [i.path for i in find_objects(s3, s3_prefix)] == [f"{s3_prefix}/a", f"{s3_prefix}/b"]
    other.rm_file(f"{s3_prefix}/a")
    assert object_info(s3, f"{s3_prefix}/a") is None
    assert [i.path for i in find_objects(s3, s3_prefix)] == [f"{s3_prefix}/b"]


def test_deleting_a_prefix_aborts_its_unfinished_uploads(s3, s3_prefix) -> None:
    bucket, key, _ = s3.split_path(s3_prefix)
    for name in ("ckpt/g-1/model.safetensors", "ckpt-other/model.safetensors"):  # as a rank killed mid-upload
        s3.call_s3("create_multipart_upload", Bucket=bucket, Key=f"{key}/{name}")
    write_object(s3, f"{s3_prefix}/ckpt/g-1/rng", [b"x"])
    assert delete_prefix(s3, f"{s3_prefix}/ckpt") == 1
    assert _uploads(s3, s3_prefix) == [f"{key}/ckpt-other/model.safetensors"]
    assert find_objects(s3, s3_prefix) == []
    with pytest.raises(ValueError, match="refusing to delete everything in bucket"):
        delete_prefix(s3, bucket)

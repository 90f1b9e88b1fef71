"""Processes sharing an object store: two jobs racing for the same manifests (exactly one wins each), and a
writer SIGKILLed mid-upload (no object appears; the unfinished upload is removed by cleaning the prefix).

Real processes (tests/scripts/object_store_race.py, tests/scripts/object_store_killed_writer.py) against moto's
server on loopback, through each object client (fsspec and obstore).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from support.launch import ROOT, start, wait

from lightning_sharing._faults import FAULTS_ENV
from lightning_sharing.storage.generations import delete_prefix
from lightning_sharing.storage.object_store import open_client

RACE = str(ROOT / "tests" / "scripts" / "object_store_race.py")
KILLED = str(ROOT / "tests" / "scripts" / "object_store_killed_writer.py")
KEYS = 20


@pytest.fixture(params=["fsspec", "obstore"])
def client_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def race_url(s3_prefix: str) -> str:
    return f"s3://{s3_prefix}"


def _race(url: str, client_kind: str, mode: str, tmp_path: Path) -> dict[str, list[str]]:
    """Run both contenders; returns, per object, the two outcomes (contender A's, then B's)."""
    tags = ["A", "B"]
    ready = [tmp_path / f"ready-{tag}" for tag in tags]
    go, logs = tmp_path / "go", [tmp_path / f"race-{tag}.log" for tag in tags]
    procs = [start([RACE, url, client_kind, mode, str(KEYS), tag, str(flag), str(go)], log)
             for tag, flag, log in zip(tags, ready, logs, strict=True)]
    deadline = time.monotonic() + 120
    while not all(flag.exists() for flag in ready):
        if any(proc.poll() is not None for proc in procs) or time.monotonic() > deadline:
            break  # wait() below reports the exit codes and logs
        time.sleep(0.01)
    go.touch()
    codes = wait(procs, logs, timeout=180)
    assert codes == [0, 0], "\n".join(f"--- {log}\n{log.read_text()[-4000:]}" for log in logs)
    results = [json.loads(log.read_text().strip().splitlines()[-1]) for log in logs]
    return {name: [results[0][name], results[1][name]] for name in results[0]}


def test_two_jobs_racing_to_create_a_manifest_exactly_one_wins_each(race_url: str, client_kind: str,
                                                                     tmp_path: Path) -> None:
    client = open_client(race_url, {"client": client_kind})[0]
    outcomes = _race(race_url, client_kind, "create", tmp_path)
    assert len(outcomes) == KEYS
    for name, (a, b) in outcomes.items():
        assert sorted([a, b])[1] == "won", (name, a, b)
        lost = a if a != "won" else b
        assert lost == f"{client.url}/{name} already exists: another writer created it first"
        winner = "A" if a == "won" else "B"
        assert client.get(name)[0] == f"written by {winner}".encode()


def test_two_jobs_racing_to_replace_a_manifest_exactly_one_wins_each(race_url: str, client_kind: str,
                                                                      tmp_path: Path) -> None:
    client, root, _ = open_client(race_url, {"client": client_kind})
    for i in range(KEYS):
        client.put(f"{root}/k{i:03d}/checkpoint_manifest.json", b"generation 0", create=True)
    outcomes = _race(race_url, client_kind, "replace", tmp_path)
    for name, (a, b) in outcomes.items():
        assert sorted([a, b])[1] == "won", (name, a, b)
        lost = a if a != "won" else b
        assert lost.startswith(f"{client.url}/{name} was changed by another writer since version ")
        winner = "A" if a == "won" else "B"
        assert client.get(name)[0] == f"written by {winner}".encode()


def test_a_writer_killed_mid_upload_leaves_no_object(s3, s3_prefix: str, client_kind: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, "save:write@0:kill")
    target = f"{s3_prefix}/step=5.ckpt/g-1/model.safetensors"
    log = tmp_path / "killed.log"
    (code,) = wait([start([KILLED, f"s3://{target}", client_kind], log)], [log], timeout=120)
    assert code == -9, log.read_text()
    assert "written" not in log.read_text()
    bucket, key, _ = s3.split_path(target)
    uploads = s3.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", [])
    assert [upload["Key"] for upload in uploads] == [key]  # invisible to listings, but there (and billed)
    assert s3.find(s3_prefix) == []
    client, root, _ = open_client(f"s3://{s3_prefix}", {"client": client_kind})
    assert delete_prefix(client, f"{root}/step=5.ckpt") == 0
    assert s3.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", []) == []

"""Processes sharing an object store: two jobs racing for the same manifests (exactly one wins each), and a
writer SIGKILLed mid-upload (no object appears; the unfinished upload is removed by cleaning the prefix).

Real processes (tests/scripts/object_store_race.py, tests/scripts/object_store_killed_writer.py) against moto's
server on loopback, or a local directory for file://.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from support.launch import ROOT, start, wait

from lightning_sharing._faults import FAULTS_ENV
from lightning_sharing.storage.object_store import delete_prefix, find_objects, open_store, put_create_only

RACE = str(ROOT / "tests" / "scripts" / "object_store_race.py")
KILLED = str(ROOT / "tests" / "scripts" / "object_store_killed_writer.py")
KEYS = 20


@pytest.fixture(params=["s3", "file"])
def race_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3_prefix')}"
    return f"file://{tmp_path}/race"


def _race(url: str, mode: str, tmp_path: Path) -> dict[str, list[str]]:
    """Run both contenders; returns, per object, the two outcomes (contender A's, then B's)."""
    tags = ["A", "B"]
    ready = [tmp_path / f"ready-{tag}" for tag in tags]
    go, logs = tmp_path / "go", [tmp_path / f"race-{tag}.log" for tag in tags]
    procs = [start([RACE, url, mode, str(KEYS), tag, str(flag), str(go)], log)
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


def _shown(url: str, name: str, root: str) -> str:
    base = url[len("file://"):] if url.startswith("file://") else url
    return base + name[len(root):]


def test_two_jobs_racing_to_create_a_manifest_exactly_one_wins_each(race_url: str, tmp_path: Path) -> None:
    fs, root = open_store(race_url)
    outcomes = _race(race_url, "create", tmp_path)
    assert len(outcomes) == KEYS
    for name, (a, b) in outcomes.items():
        assert sorted([a, b])[1] == "won", (name, a, b)
        lost = a if a != "won" else b
        assert lost == f"{_shown(race_url, name, root)} already exists: another writer created it first"
        winner = "A" if a == "won" else "B"
        assert fs.cat_file(name) == f"written by {winner}".encode()


def test_two_jobs_racing_to_replace_a_manifest_exactly_one_wins_each(race_url: str, tmp_path: Path) -> None:
    fs, root = open_store(race_url)
    for i in range(KEYS):
        put_create_only(fs, f"{root}/k{i:03d}/checkpoint_manifest.json", b"generation 0")
    outcomes = _race(race_url, "replace", tmp_path)
    for name, (a, b) in outcomes.items():
        assert sorted([a, b])[1] == "won", (name, a, b)
        lost = a if a != "won" else b
        assert lost.startswith(f"{_shown(race_url, name, root)} was changed by another writer since version ")
        winner = "A" if a == "won" else "B"
        assert fs.cat_file(name) == f"written by {winner}".encode()


def test_a_writer_killed_mid_upload_leaves_no_object(s3, s3_prefix: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, "save:write@0:kill")
    target = f"{s3_prefix}/step=5.ckpt/g-1/model.safetensors"
    log = tmp_path / "killed.log"
    (code,) = wait([start([KILLED, f"s3://{target}"], log)], [log], timeout=120)
    assert code == -9, log.read_text()
    assert "written" not in log.read_text()
    bucket, key, _ = s3.split_path(target)
    uploads = s3.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", [])
    assert [upload["Key"] for upload in uploads] == [key]  # invisible to listings, but there (and billed)
    assert find_objects(s3, s3_prefix) == []
    assert delete_prefix(s3, f"{s3_prefix}/step=5.ckpt") == 0
    assert s3.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", []) == []

"""Two-rank gloo jobs on S3 (moto's server on loopback): the core round trip, refused loads, store faults, races.

Driven by tests/scripts/s3_jobs.py on ``fault_trials.run_ranks``. The ``jobs`` suite (one process, seven jobs):

- round trip: steps 1 and 2, ``last.ckpt`` replaced twice (once by a background save), ``find_latest_checkpoint``,
  loads on both ranks compared with ``torch.equal``, the objects as stored, ``lightning-sharing verify``;
- refused loads: an object deleted, a byte flipped: every rank raises, naming the object; verify's exit codes;
- through a fault proxy, with each object client (fsspec, obstore): throttled, reset and stalled writes retried and
  committed; throttling that does not stop bounded (six attempts) and a refused PUT (403) not retried, failing the
  save on every rank with the previous checkpoint the newest and loadable exactly; a manifest PUT whose answer was
  lost recognised as committed; throttled reads, answers reset mid-body and reads stalled past the timeout retried,
  loading exactly; a read reset every time failing the load on every rank, naming the object, the operation and the
  attempts. Every rank process's exit is checked (none hangs) and the next save leaves nothing behind.

The races start two jobs saving to the same path at once (their manifest PUTs are held by the proxy until both
have arrived): exactly one commits, every rank of the other raises, and both then load the winner's checkpoint.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from support.launch import ROOT, run, start, wait
from support.s3 import BUCKET, FaultProxy, Rule
from support.statefuls import Holder

from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent

SCRIPT = str(ROOT / "tests" / "scripts" / "s3_jobs.py")


@pytest.fixture(scope="module")
def jobs(moto_server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("s3-jobs")
    url = f"s3://{BUCKET}/jobs-{uuid.uuid4().hex[:12]}"
    run([SCRIPT, "jobs", "--url", url, "--out", str(work / "report.json"), "--workdir", str(work / "runs")],
        work / "jobs.log", timeout=1200)
    report = json.loads((work / "report.json").read_text())
    report["url"] = url
    return report


def _results(outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for outcome in outcomes:
        assert outcome["status"] == "ok", outcome.get("traceback") or outcome
    return [outcome["result"] for outcome in outcomes]


def test_round_trip_save_find_latest_load_verify(jobs) -> None:
    root = f"{jobs['url']}/roundtrip"
    for result in _results(jobs["roundtrip"]):
        assert result["latest"] == f"{root}/last.ckpt"
        assert result["loads"] == {"step=1.ckpt": {"step": 1, "mismatch": []},
                                   "step=2.ckpt": {"step": 2, "mismatch": []},
                                   "last.ckpt": {"step": 3, "mismatch": []}}
    rank0 = _results(jobs["roundtrip"])[0]
    assert rank0["verify_exit"] == 0 and rank0["leftovers"] == []
    for name, layout in rank0["layout"].items():
        # One generation per checkpoint (the replaced ones of last.ckpt are gone), named by the manifest, holding
        # exactly the listed files; nothing else under the prefix.
        assert layout["generations"] == [layout["data_prefix"]] and layout["foreign"] == [], (name, layout)
        assert layout["stored"] == layout["listed"], (name, layout)
        for rank in (0, 1):
            assert layout["writers"][f"rng/rank-0000{rank}.json"] == rank
            assert layout["writers"][f"stage/rank-0000{rank}-00001-of-00001.safetensors"] == rank
        assert layout["writers"]["counter.json"] == 0


def test_a_rank_failing_to_read_from_s3_fails_the_load_on_every_rank(jobs) -> None:
    for result in _results(jobs["roundtrip"]):
        error = result["load_read_fault"]["error"]
        assert "DistributedCheckpointError" in error["types"]
        assert error["message"].startswith(f"loading checkpoint {jobs['url']}/roundtrip/step=2.ckpt failed on rank 1: ")
        assert "injected fault at load:read on rank 1" in error["message"]


@pytest.mark.parametrize("case", ["missing", "flipped"])
def test_a_missing_or_damaged_object_is_refused_on_every_rank_naming_it(jobs, case: str) -> None:
    for result in _results(jobs["refusals"]):
        error = result[case]["error"]
        assert "CorruptCheckpointError" in error["types"], error
        if case == "missing":
            url = result["damaged"]["step=1.ckpt"]
            folder, _, name = url.rpartition("/rng/")
            assert (f"component 'rng', file rng/{name} (written by rank 1) is missing from {folder}"
                    in error["message"]), error
        else:
            assert ("component 'model', file model-00001-of-00001.safetensors (written by rank 0)" in error["message"]
                    and "the file is corrupt (altered after the save)" in error["message"]), error


def test_verify_exit_codes_on_s3(jobs) -> None:
    assert _results(jobs["refusals"])[0]["verify_exit"] == {"step=1.ckpt": 1, "step=2.ckpt": 1, "no-checkpoint": 2}


CLIENTS = ["fsspec", "obstore"]


def _fault(jobs: dict[str, Any], name: str, client: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    return _results(jobs[f"{name}-{client}"]["outcomes"]), jobs[f"{name}-{client}"]


TRANSIENT = {"throttled-writes": 4, "reset-writes": 3, "stalled-write": 1, "manifest-answer-lost": 1,
             "throttled-reads": 3, "reads-reset-mid-body": 3, "stalled-reads": 2}  # name: faults injected


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("name", sorted(TRANSIENT))
def test_transient_store_faults_are_retried_and_the_save_and_load_succeed(jobs, name: str, client: str) -> None:
    results, scenario = _fault(jobs, name, client)
    assert scenario["hits"] == [TRANSIENT[name]]
    root = f"{jobs['url']}/{name}-{client}"
    for result in results:
        assert result["error"] is None
        assert result["latest"] == f"{root}/step=2.ckpt"
        assert result["load"] == {"step": 2, "mismatch": []}  # torch.equal, every tensor of every rank
    assert results[0]["leftovers"] == [] and results[0]["incomplete"] == []
    if name == "manifest-answer-lost":
        # The PUT landed and its answer was lost: the retry is refused (the object exists) and recognised as ours.
        puts = [path for method, path in scenario["requests"]
                if method == "PUT" and path.endswith("step%3D2.ckpt/checkpoint_manifest.json")]
        assert len(puts) == 2


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("name", ["throttled-for-good", "access-denied"])
def test_a_put_that_keeps_failing_fails_the_save_on_every_rank_and_keeps_the_previous_checkpoint(jobs, name: str,
                                                                                                   client: str) -> None:
    results, scenario = _fault(jobs, name, client)
    attempts = 6 if name == "throttled-for-good" else 1  # the retry policy's bound; a 403 is never retried
    puts = [path for method, path in scenario["requests"]
            if method == "PUT" and "step%3D2.ckpt/g-" in path and "rng/rank-00001" in path]
    assert len(puts) == attempts, puts
    root = f"{jobs['url']}/{name}-{client}"
    failed = puts[0].split("/step%3D2.ckpt/", 1)[1]
    for result in results:
        error = result["error"]
        kind = "TransientStoreError" if name == "throttled-for-good" else "ObjectStoreError"
        assert kind in error["types"] and "DistributedCheckpointError" in error["types"], error
        assert error["message"].startswith("writing checkpoint files failed on rank 1: "), error
        # The URL may be shortened in the middle (the engine keeps messages readable), never its ends.
        assert "put s3://" in error["message"] and f"/step=2.ckpt/{failed} failed" in error["message"], error
        assert ("failed 6 time(s) in " if attempts == 6 else "failed: AccessDenied (HTTP 403)") in error["message"]
        if attempts == 6:
            assert "s with transient errors, the last one SlowDown (HTTP 503)" in error["message"], error
        assert result["latest"] == f"{root}/step=1.ckpt"
        assert result["load"] == {"step": 1, "mismatch": []}
    # Rank 0 deleted the failed save's generation at once; the next save committed cleanly.
    assert results[0]["leftovers"] == [] and results[0]["incomplete"] == []


@pytest.mark.parametrize("client", CLIENTS)
def test_a_read_that_keeps_failing_fails_the_load_on_every_rank_naming_the_object(jobs, client: str) -> None:
    results, scenario = _fault(jobs, "reads-reset-for-good", client)
    root = f"{jobs['url']}/reads-reset-for-good-{client}"
    gets = [path for method, path in scenario["requests"] if method == "GET" and "model-00001" in path]
    for result in results:
        assert result["error"] is None and result["latest"] == f"{root}/step=2.ckpt"  # the save was not touched
        error = result["load"]["error"]
        assert "DistributedCheckpointError" in error["types"] and "TransientStoreError" in error["types"], error
        assert error["message"].startswith(f"loading checkpoint {root}/step=2.ckpt failed on rank"), error
        # "read" (streamed ranged GETs) or, with read_once (auto on S3), "get": the one rank that fetches a file
        # every rank reads takes it whole.
        assert re.search(rf"(read|get) {re.escape(root)}/step=2\.ckpt/g-", error["message"]) and \
               "/model-00001-of-00001.safetensors failed 6 time(s) in " in error["message"], error
    assert len(gets) % 6 == 0 and gets, gets  # six attempts for each rank that read it, then no more
    assert results[0]["leftovers"] == [] and results[0]["incomplete"] == []


# --------------------------------------------------------------------------- two jobs, one path


def _race(proxy: FaultProxy, url: str, client: str, tmp_path: Path) -> dict[str, list[dict[str, Any]]]:
    hold = proxy.add(Rule("hold", times=2, method="PUT", contains=("race.ckpt/checkpoint_manifest.json",),
                          hold_timeout=150))
    done = tmp_path / "done"
    done.mkdir()
    jobs = {"A": 1, "B": 2}
    logs = {tag: tmp_path / f"race-{tag}.log" for tag in jobs}
    procs = [start([SCRIPT, "race", "--url", url, "--endpoint", proxy.url, "--tag", tag, "--step", str(step),
                    "--done", str(done), "--out", str(tmp_path / f"{tag}.json"), "--workdir", str(tmp_path / tag),
                    "--client", client],
                   logs[tag]) for tag, step in jobs.items()]
    codes = wait(procs, list(logs.values()), timeout=300)
    assert codes == [0, 0], "\n".join(f"--- {log}\n{log.read_text()[-4000:]}" for log in logs.values())
    assert hold.hits == 2 and not hold.timed_out  # both manifest PUTs were in flight at once
    return {tag: _results(json.loads((tmp_path / f"{tag}.json").read_text())) for tag in jobs}


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("replace", [False, True], ids=["new-path", "replacing-a-checkpoint"])
def test_two_jobs_racing_for_one_path_exactly_one_commits(moto_server, fault_proxy: FaultProxy, tmp_path: Path,
                                                          replace: bool, client: str) -> None:
    url = f"s3://{BUCKET}/race-{uuid.uuid4().hex[:12]}/race.ckpt"
    if replace:  # a committed checkpoint both jobs set out to replace
        coordinator = CheckpointCoordinator([StateComponent("x", Holder({"t": torch.ones(3)}), SharingPattern.GLOBAL)])
        coordinator.save_checkpoint(url, step=0)
    results = _race(fault_proxy, url, client, tmp_path)
    winners = [tag for tag, ranks in results.items() if all(r["error"] is None for r in ranks)]
    assert len(winners) == 1, results
    winner, loser = winners[0], "B" if winners[0] == "A" else "A"
    kind, text = (("ObjectChangedError", f"the checkpoint at {url} was replaced or removed by another job") if replace
                  else ("ObjectExistsError", f"another job committed a checkpoint at {url} while this save"))
    for rank in results[loser]:
        assert kind in rank["error"]["types"] and "DistributedCheckpointError" in rank["error"]["types"], rank
        assert text in rank["error"]["message"] and "this save was discarded" in rank["error"]["message"], rank
    step = {"A": 1, "B": 2}[winner]
    for tag in results:  # both jobs load the winner's checkpoint, exactly
        for rank in results[tag]:
            assert rank["load"] == {"step": step, "mismatch": []}, (tag, rank)
    layout = results[winner][0]["layout"]
    assert layout["generations"] == [layout["data_prefix"]] and layout["stored"] == layout["listed"], layout

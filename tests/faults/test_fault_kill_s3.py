"""Killed during a save to S3 (moto's server on loopback): SIGKILL one or both ranks at each point of a save, then
resume in a new run.

Real two-rank gloo runs driven by tests/scripts/fault_trials_s3.py (the machinery of fault_trials.py): the
interrupted run saves steps 1, 2, 3 to ``s3://...`` and is killed during the second save, mid multipart upload,
before the manifest's conditional put (``commit:manifest``, ``commit:rename``), right after it
(``commit:renamed``), or at a timed instant; steps mode (``step={s}.ckpt``) and replacing ``last.ckpt``. The next
run resumes from ``find_latest_checkpoint``, checks the loaded state is exactly the one saved at that step
(``torch.equal``, every rank), checks that every committed checkpoint verifies, and saves once more, after which
no generation without a manifest naming it, no manifest-less prefix and no unfinished multipart upload remains.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from support.launch import ROOT, run
from support.s3 import BUCKET

SCRIPT = str(ROOT / "tests" / "scripts" / "fault_trials_s3.py")

# name: (ranks killed, step resumed from)
EXPECTED = {
    "write-rank1-multipart": ([1], 1),
    "write-rank0-multipart-last": ([0], 1),
    "start-rank0-last": ([0], 1),
    "written-all": ([0, 1], 1),
    "before-manifest-rank0-last": ([0], 1),
    "before-put-rank0": ([0], 1),
    "before-put-rank0-last": ([0], 1),
    "after-put-rank0": ([0], 2),
    "after-put-rank0-last": ([0], 2),
    "before-put-rank0-async-last": ([0], 1),
}


@pytest.fixture(scope="module")
def trials(moto_server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    work = tmp_path_factory.mktemp("kill-s3")
    url = f"s3://{BUCKET}/kill-{uuid.uuid4().hex[:12]}"
    run([SCRIPT, "kill", "--url", url, "--out", str(work / "report.json"), "--workdir", str(work / "runs")],
        work / "kill.log", timeout=420)
    report = json.loads((work / "report.json").read_text())
    return {trial["trial"]["name"]: trial for trial in report["trials"]}


def _explain(trial: dict[str, Any]) -> str:
    return json.dumps(trial, indent=1)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_kill_at_a_save_point_on_s3_resumes_from_the_newest_committed_checkpoint(trials, name: str) -> None:
    trial = trials[name]
    killed, step = EXPECTED[name]
    assert trial["problems"] == [], _explain(trial)
    if killed == [0, 1]:
        assert trial["died"] and set(trial["died"]) <= {0, 1}, _explain(trial)  # one may find its peer gone first
        killed = trial["died"]
    assert trial["died"] == killed, _explain(trial)
    for rank, outcome in trial["interrupted_run"].items():
        assert outcome == "killed (-9)" if int(rank) in killed else outcome.startswith("error "), _explain(trial)
    assert trial["resumed_step"] == step, _explain(trial)
    mode = trial["trial"]["mode"]
    assert trial["resumed_from"] == ("last.ckpt" if mode == "last" else f"step={step}.ckpt"), _explain(trial)
    assert trial["leftovers_after"] == [], _explain(trial)


def test_a_rank0_killed_mid_multipart_upload_leaves_an_upload_that_the_next_save_aborts(trials) -> None:
    trial = trials["write-rank0-multipart-last"]
    before = trial["leftovers_before"]
    # The generation rank 1 finished writing into, and rank 0's unfinished upload of its 17 MiB object in it.
    assert len(before) == 2 and before[0].startswith("last.ckpt/g-"), _explain(trial)
    assert before[1] == f"unfinished upload {before[0]}/big/rank-00000-00001-of-00001.safetensors", _explain(trial)
    assert trial["leftovers_after"] == []


def test_a_rank1_killed_mid_multipart_upload_is_cleaned_up_by_rank_0_at_once(trials) -> None:
    # Rank 0 survives, learns of the failure in the agreement step and deletes the save's generation, aborting
    # rank 1's unfinished upload in it.
    assert trials["write-rank1-multipart"]["leftovers_before"] == []


def test_kill_after_the_manifest_put_leaves_the_replaced_generation_for_the_next_save(trials) -> None:
    trial = trials["after-put-rank0-last"]
    assert len(trial["leftovers_before"]) == 1 and trial["leftovers_before"][0].endswith("-new"), _explain(trial)
    assert trial["leftovers_after"] == []


def test_timer_kill_on_s3_never_hangs_and_resumes_a_committed_checkpoint(trials) -> None:
    trial = trials["timer-all"]
    assert trial["problems"] == [], _explain(trial)
    assert trial["resumed_step"] in trial["expected_steps"]

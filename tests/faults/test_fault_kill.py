"""Killed during save: SIGKILL one rank or all ranks at each point of a save, then resume in a new run.

Real two-rank gloo runs of a plain PyTorch script (``CheckpointCoordinator`` only), driven by
tests/scripts/fault_trials.py: the interrupted run saves the state at steps 1, 2, 3 and is killed during
the second save (``LIGHTNING_SHARING_FAULTS=POINT@RANK:kill#N``, or a timer SIGKILL sent from outside),
synchronously or with ``async_save=True`` (written and committed by a background thread);
the next run resumes from ``find_latest_checkpoint``, checks that what it loaded is exactly the state saved
at that checkpoint's step (``torch.equal``), checks every visible checkpoint with ``verify``, and saves
once more, after which no staging leftovers may remain. Every rank process has a time limit and is killed
with its process group when it runs over: a hang fails the test, it never blocks it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support.launch import ROOT, run

SCRIPT = str(ROOT / "tests" / "scripts" / "fault_trials.py")
RANDOM_SEEDS = 4  # seeded random trials (the soak, benchmarks/soak_kill.py, runs many more)

# name: (ranks killed, the step resumed from). Each fault fires during the second save (see named_trials).
NAMED = {
    "write-rank1": ([1], 1),  # rank 1 killed halfway through writing a file
    "write-all": ([0, 1], 1),  # both ranks killed while writing
    "manifest-write-rank0": ([0], 1),  # rank 0 killed halfway through writing the manifest (last.ckpt)
    "start-rank0": ([0], 1),  # rank 0 killed right after creating the staging directory
    "written-rank1": ([1], 1),  # rank 1 killed after writing its files, before the ranks agree (last.ckpt)
    "written-all": ([0, 1], 1),
    "before-manifest-rank0": ([0], 1),  # between the barrier and the manifest
    "before-rename-rank0": ([0], 1),  # the manifest is written in staging, not renamed (last.ckpt)
    "before-rename-rank0-steps": ([0], 1),
    "after-rename-rank0": ([0], 2),  # renamed into place, the ranks not told yet: the new one is complete
    "after-rename-rank0-steps": ([0], 2),
    # CheckpointCoordinator(async_save=True): the same points, reached in the background writer thread
    "write-rank1-async": ([1], 1),
    "before-rename-rank0-async": ([0], 1),  # (last.ckpt)
    "after-rename-rank0-async": ([0], 2),
}
TIMERS = ("timer-rank0", "timer-rank1", "timer-all")


@pytest.fixture(scope="module")
def trials(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    work = tmp_path_factory.mktemp("kill")
    out = work / "report.json"
    run([SCRIPT, "kill", "--out", str(out), "--random", str(RANDOM_SEEDS), "--seed", "1000",
         "--workdir", str(work / "runs")], work / "kill.log", timeout=420)
    report = json.loads(out.read_text())
    return {trial["trial"]["name"]: trial for trial in report["trials"]}


def _explain(trial: dict[str, Any]) -> str:
    return json.dumps(trial, indent=1)


@pytest.mark.parametrize("name", sorted(NAMED))
def test_kill_at_a_save_point_resumes_from_the_newest_complete_checkpoint(trials, name: str) -> None:
    trial = trials[name]
    killed, step = NAMED[name]
    assert trial["verdict"] == "resumed correctly" and trial["problems"] == [], _explain(trial)
    if killed == [0, 1]:
        # Both ranks are told to die at their own fault point; one may instead find its peer gone first
        # (its last collective before the point fails), and must then have raised.
        assert trial["died"] and set(trial["died"]) <= {0, 1}, _explain(trial)
        killed = trial["died"]
    else:
        assert trial["died"] == killed, _explain(trial)
    # Every rank that was not killed raised (none finished the save, none hung).
    for rank, outcome in trial["interrupted_run"].items():
        assert outcome == "killed (-9)" if int(rank) in killed else outcome.startswith("error "), _explain(trial)
    # The newest *complete* checkpoint, holding exactly the state of its step (checked on every rank).
    assert trial["resumed_step"] == step, _explain(trial)
    mode = trial["trial"]["mode"]
    assert trial["resumed_from"] == ("last.ckpt" if mode == "last" else f"step={step}.ckpt"), _explain(trial)
    # A rank 0 killed before the rename leaves its staging directory; the next save removes it.
    leftovers = trial["leftovers_after_interruption"]
    if 0 in killed and step == 1:
        assert leftovers and all(".staging-" in name for name in leftovers), _explain(trial)
    assert trial["temps_before_next_save"] == leftovers
    assert trial["temps_after_next_save"] == [], _explain(trial)


@pytest.mark.parametrize("name", TIMERS)
def test_timer_kill_never_hangs_and_resumes_a_complete_checkpoint(trials, name: str) -> None:
    # A SIGKILL at an arbitrary instant of the saves: the resumed step is the last save some rank saw
    # complete, or the one in flight if it was already renamed into place; its state must match exactly.
    trial = trials[name]
    assert trial["verdict"] == "resumed correctly" and trial["problems"] == [], _explain(trial)
    assert trial["resumed_step"] in trial["expected_steps"]
    assert trial["temps_after_next_save"] == []


@pytest.mark.parametrize("seed", range(1000, 1000 + RANDOM_SEEDS))
def test_seeded_random_kill(trials, seed: int) -> None:
    trial = trials[f"seed{seed}"]
    assert trial["verdict"] == "resumed correctly" and trial["problems"] == [], _explain(trial)
    assert trial["temps_after_next_save"] == []


def test_every_save_point_was_exercised(trials) -> None:
    faults = " ".join(t["trial"]["fault"] or "" for t in trials.values())
    for point in ("save:start", "save:write", "save:written", "commit:manifest", "commit:rename", "commit:renamed"):
        assert point in faults, point
    assert any(Path(t["resumed_from"] or "").name == "last.ckpt" for t in trials.values())

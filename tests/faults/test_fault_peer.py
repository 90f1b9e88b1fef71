"""One rank fails during a save or a load: the others raise, within the process-group timeout, never hang.

Three kinds of failure, on real two-rank gloo runs (tests/scripts/fault_trials.py, ``peer_worker``):

- the rank raises (``load:read@1:raise``): the agreement step makes every rank raise the same
  ``DistributedCheckpointError`` naming the failing rank, the component and the cause;
- the rank dies (``exit`` / ``kill``): its sockets close, and the survivors' next collective fails at once;
- the rank is stuck (``hang``: alive, sockets open, e.g. a read from a dead NFS server): nothing but the
  process group's timeout can tell the survivors, so they raise after exactly that timeout, which is the
  user's ``dist.init_process_group(timeout=...)`` for the core, and ``SharingStrategy(timeout=...)`` for
  Lightning (``test_lightning_strategy_timeout_reaches_the_process_group``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.launch import ROOT, env, free_port, run

SCRIPT = str(ROOT / "tests" / "scripts" / "fault_trials.py")
LIGHTNING_SCRIPT = str(ROOT / "tests" / "scripts" / "fault_lightning.py")


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    work = tmp_path_factory.mktemp("peer")
    run([SCRIPT, "peer", "--out", str(work / "report.json"), "--workdir", str(work / "runs")],
        work / "peer.log", timeout=300)
    return json.loads((work / "report.json").read_text())


def _by_rank(scenario: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {o["rank"]: o for o in scenario["outcomes"]}


def test_a_rank_raising_during_load_makes_every_rank_raise_the_same_error(scenarios) -> None:
    scenario = scenarios["load-raise-rank1"]
    messages = set()
    for outcome in scenario["outcomes"]:
        assert outcome["status"] == "error"
        assert "DistributedCheckpointError" in outcome["error_types"]
        assert outcome["error"].startswith("loading checkpoint ") and "failed on rank 1: " in outcome["error"]
        assert "component '" in outcome["error"] and "injected fault at load:read on rank 1" in outcome["error"]
        messages.add(outcome["error"])
    assert len(messages) == 1
    assert scenario["checkpoint_problems"] == []  # a failed load leaves the checkpoint as it was


@pytest.mark.parametrize(("name", "victim", "how"), [
    ("load-exit-rank1", 1, ("exited", 3)),
    ("load-kill-rank1", 1, ("killed", -signal.SIGKILL)),
    ("load-kill-rank0", 0, ("killed", -signal.SIGKILL)),
    ("save-exit-rank1", 1, ("exited", 3)),
])
def test_a_dead_peer_makes_the_survivor_raise_at_once(scenarios, name: str, victim: int, how: tuple) -> None:
    scenario = scenarios[name]
    ranks = _by_rank(scenario)
    assert (ranks[victim]["status"], ranks[victim]["code"]) == how
    survivor = ranks[1 - victim]
    assert survivor["status"] == "error", survivor
    # The lost connection is noticed by the next collective: well before the 10 s process-group timeout.
    assert survivor["since_mark"] < scenario["pg_timeout"], survivor
    assert survivor["error"]
    assert scenario["checkpoint_problems"] == []


@pytest.mark.parametrize("name", ["load-hang-rank1-timeout2", "load-hang-rank1-timeout5", "save-hang-rank1-timeout2"])
def test_a_stuck_peer_makes_the_survivor_raise_after_the_process_group_timeout(scenarios, name: str) -> None:
    scenario = scenarios[name]
    ranks = _by_rank(scenario)
    timeout = scenario["pg_timeout"]
    assert ranks[1]["status"] == "hung"  # still blocked at the fault when rank 0 had finished: killed then
    survivor = ranks[0]
    assert survivor["status"] == "error", survivor
    assert f"Timed out waiting {int(timeout * 1000)}ms" in survivor["error"], survivor["error"]
    assert 0.9 * timeout <= survivor["since_mark"] <= timeout + 15, survivor["since_mark"]
    assert scenario["checkpoint_problems"] == []


def test_the_timeout_is_the_one_the_user_configured(scenarios) -> None:
    short = _by_rank(scenarios["load-hang-rank1-timeout2"])[0]["since_mark"]
    longer = _by_rank(scenarios["load-hang-rank1-timeout5"])[0]["since_mark"]
    assert longer - short > 2.0, (short, longer)


def test_lightning_strategy_timeout_reaches_the_process_group(tmp_path: Path) -> None:
    """``SharingStrategy(timeout=timedelta(seconds=3))``: DDPStrategy passes it to init_process_group, so a
    rank stuck while the others resume makes them fail after 3 s instead of Lightning's default 30 minutes."""
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    procs, logs = [], []
    for rank in (0, 1):
        logs.append(tmp_path / f"rank{rank}.log")
        with open(logs[-1], "w") as handle:
            procs.append(subprocess.Popen(
                [sys.executable, LIGHTNING_SCRIPT, "--rank", str(rank), "--port", str(port), "--out", str(out),
                 "--timeout", "3"], cwd=ROOT, env=env(), stdout=handle, stderr=subprocess.STDOUT,
                start_new_session=True))
    try:
        try:
            procs[0].wait(timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail("rank 0 did not finish within 240 s (hang):\n" + logs[0].read_text()[-4000:])
        time.sleep(0.5)
        rank1_stuck = procs[1].poll() is None
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    result_file = out / "result-rank0.json"
    assert result_file.exists(), logs[0].read_text()[-4000:]
    result = json.loads(result_file.read_text())
    assert result["strategy_timeout"] == 3.0 and result["process_group_timeout"] == 3.0
    assert result["resume_from"].endswith("epoch=0-step=2.ckpt")
    assert result["error"] is not None and "Timed out waiting 3000ms" in result["error"], result
    assert result["global_step"] == 0  # it failed while restoring, before training went on
    assert 2.7 <= result["seconds"] <= 3 + 30, result["seconds"]  # the 3 s timeout plus Trainer setup
    assert rank1_stuck and not (out / "result-rank1.json").exists()  # rank 1 was blocked at load:read

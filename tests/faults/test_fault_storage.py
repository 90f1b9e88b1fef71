"""Storage failures mid-save: a full disk (ENOSPC) or a failing device (EIO) on one rank, or on rank 0 while
it writes the manifest or renames the checkpoint into place.

Real two-rank gloo runs driven by tests/scripts/fault_trials.py (``storage_worker``): save step 1, save
step 2 with the fault injected (``LIGHTNING_SHARING_FAULTS=save:write@1:enospc`` ...), then check on every
rank that the save raised a clear error naming the failing rank and the errno, that nothing was left
behind (no target, no staging directory), that the previous checkpoint is intact and loads bit-exactly,
and that the next save succeeds cleanly. The process group stays usable: the failure is agreed on, not a
lost peer.

The injected faults are the portable mechanism. Where the machine allows a private mount namespace
(``unshare -rm``), ``test_a_really_full_filesystem`` also fills a real, tiny tmpfs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.launch import ROOT, env, run

SCRIPT = str(ROOT / "tests" / "scripts" / "fault_trials.py")

ERRNO_TEXT = {"enospc": "No space left on device", "eio": "Input/output error"}
# name: (the message's first words, the failing ranks, the target that was saved before and after)
EXPECTED = {
    "enospc-rank1-write": ("writing checkpoint files failed on rank 1: ", [1], "step=1.ckpt"),
    "eio-rank1-write": ("writing checkpoint files failed on rank 1: ", [1], "step=1.ckpt"),
    "eio-rank1-fsync": ("writing checkpoint files failed on rank 1: ", [1], "step=1.ckpt"),
    "enospc-all-ranks-write": ("writing checkpoint files failed on ranks [0, 1]: ", [0, 1], "step=1.ckpt"),
    "enospc-rank1-write-replacing-last": ("writing checkpoint files failed on rank 1: ", [1], "last.ckpt"),
    "enospc-rank0-manifest-write": ("committing checkpoint ", [0], "step=1.ckpt"),
    "eio-rank0-manifest-write": ("committing checkpoint ", [0], "last.ckpt"),
    "eio-rank0-before-manifest": ("committing checkpoint ", [0], "step=1.ckpt"),
    "eio-rank0-rename": ("committing checkpoint ", [0], "last.ckpt"),
}


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    work = tmp_path_factory.mktemp("storage")
    run([SCRIPT, "storage", "--out", str(work / "report.json"), "--workdir", str(work / "runs")],
        work / "storage.log", timeout=300)
    return json.loads((work / "report.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_storage_failure_raises_everywhere_and_keeps_the_previous_checkpoint(scenarios, name: str) -> None:
    start, failing, kept = EXPECTED[name]
    action = "enospc" if name.startswith("enospc") else "eio"
    outcomes = scenarios[name]
    for outcome in outcomes:
        assert outcome["status"] == "ok", outcome["traceback"]
        report = outcome["result"]
        error = report["error"]
        # Every rank raised the same clear error: which phase, which rank(s), the errno's text.
        assert error is not None, f"rank {outcome['rank']} did not raise"
        assert "DistributedCheckpointError" in error["types"] and "CheckpointError" in error["types"]
        message = error["message"]
        assert message.startswith(start), message
        assert f"[Errno {28 if action == 'enospc' else 5}] {ERRNO_TEXT[action]}" in message, message
        for rank in failing:
            assert "injected at " in message and f" on rank {rank})" in message, message
        if name.endswith("-fsync"):  # the deferred fsync of a written file: which file could not be made durable
            assert " durable (fsync) failed: " in message, message
        elif message.startswith("writing"):
            assert "component '" in message, message  # which component's file could not be written
        assert error["seconds"] < 30  # raised, not hung (the process group timeout is 10 s)
        # Nothing of the failed save is left: no target, no staging directory.
        assert report["entries_after_failure"] == [kept], report
        assert report["failed_target_exists"] is False
        # The previous checkpoint is the newest, intact, and loads bit-exactly on every rank.
        assert report["latest_step"] == 1 and report["mismatch"] == []
        # The next save works and leaves nothing behind.
        assert report["temps_after_next_save"] == []
        assert report["entries_after_next_save"] == (["last.ckpt"] if kept == "last.ckpt"
                                                     else ["step=1.ckpt", "step=3.ckpt"])
    assert outcomes[0]["result"]["problems"] == []  # `lightning-sharing verify` finds the kept one intact
    assert outcomes[0]["result"]["error"]["message"] == outcomes[1]["result"]["error"]["message"]


def test_manifest_write_failure_is_the_manifest(scenarios) -> None:
    # "{manifest}" in the spec is the number of writes rank 0 makes in a clean save: the last is the manifest.
    for name in ("enospc-rank0-manifest-write", "eio-rank0-manifest-write"):
        spec = scenarios[name][0]["result"]["spec"]
        assert spec.startswith("save:write@0:") and "#" in spec
        assert "injected at save:write on rank 0" in scenarios[name][0]["result"]["error"]["message"]


def _can_mount_tmpfs(tmp: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp}"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def test_a_really_full_filesystem(tmp_path: Path) -> None:
    """A genuinely full filesystem (a 2 MiB tmpfs filled up by a file) instead of an injected errno."""
    probe = tmp_path / "probe"
    probe.mkdir()
    if not _can_mount_tmpfs(probe):
        pytest.skip("no private mount namespace here (unshare -rm + mount tmpfs); the injected faults cover ENOSPC")
    out = tmp_path / "report.json"
    result = subprocess.run(["unshare", "-rm", sys.executable, SCRIPT, "small-fs",
                             "--out", str(out), "--workdir", str(tmp_path / "runs")],
                            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outcomes = json.loads(out.read_text())["outcomes"]
    messages = set()
    for outcome in outcomes:
        assert outcome["status"] == "ok", outcome["traceback"]
        report = outcome["result"]
        error = report["error"]
        assert error is not None and "DistributedCheckpointError" in error["types"]
        assert "failed on rank" in error["message"] and "No space left on device" in error["message"]
        messages.add(error["message"])
        assert report["entries_after_failure"] == ["step=1.ckpt"], report
        assert report["failed_target_exists"] is False
        assert report["latest_step"] == 1 and report["mismatch"] == []
        assert report["temps_after_next_save"] == [] and report["entries_after_next_save"] == ["step=1.ckpt",
                                                                                                "step=3.ckpt"]
    assert len(messages) == 1  # the same verdict on every rank

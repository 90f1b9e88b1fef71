"""The local tier under the Trainer (examples/lightning_local_tier.py, two nodes x one rank under torchrun):
every process SIGKILLed after local step 6 > persistent step 5; ``fit(ckpt_path="last")`` resumes from step 6, from
each node's own copy or, with node 1's directory wiped, from node 0's replica, and ends bit-exact with an
uninterrupted run."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from support.compare import same_state
from support.launch import ROOT, free_port, start, wait

SCRIPT = str(ROOT / "examples" / "lightning_local_tier.py")


def _launch(tmp_path: Path, name: str, out: Path, *extra: str,
            env: dict[str, str] | None = None) -> tuple[list[int], str]:
    port = free_port()
    procs, logs = [], []
    for node in (0, 1):
        logs.append(tmp_path / f"{name}-node{node}.log")
        procs.append(start(["-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                            "--master_addr=127.0.0.1", f"--master_port={port}", SCRIPT, "run", "--out", str(out),
                            *extra], logs[-1], extra_env=env))
    codes = wait(procs, logs, timeout=240)
    return codes, "\n".join(log.read_text() for log in logs)


def test_killed_run_resumes_from_the_local_tier_bit_exact(tmp_path: Path) -> None:
    full, run = tmp_path / "full", tmp_path / "run"
    codes, output = _launch(tmp_path, "full", full)
    assert codes == [0, 0], output[-6000:]
    # The interrupted run saves in the background (async_save=True: local and persistent saves on one saver), the
    # reference synchronously: the resumed run must still end bit-exact with it. Rank 1's local disk is full at the
    # local save of step 4 (its sixth local file: per save, a node of one rank writes its rank file, its part of the
    # shared copy and the other node's three files): that save fails on both ranks, in the background, and is
    # logged; training goes on unchanged, and the local save of step 6 and the persistent ones are unaffected.
    codes, output = _launch(tmp_path, "killed", run, "--kill-at", "6", "--async-save",
                            env={"LIGHTNING_SHARING_FAULTS": "local:write@1:enospc#6"})
    assert all(code != 0 for code in codes), (codes, output[-6000:])  # SIGKILLed workers: torchrun fails
    assert output.count("the local save of step 4 failed on every rank (written in the background); training "
                        "continues") == 2, output[-6000:]
    assert "No space left on device" in output
    assert not (run / "local" / "0" / "own" / "step_4").exists()
    for node in (0, 1):
        assert (run / "local" / str(node) / "own" / "step_6" / "COMPLETE.json").is_file()
        assert (run / "local" / str(node) / f"replica_of_{1 - node}" / "step_6" / "COMPLETE.json").is_file()
    assert (run / "checkpoints" / "epoch=0-step=5.ckpt").is_dir()
    wiped = tmp_path / "wiped"
    shutil.copytree(run, wiped, symlinks=True)
    shutil.rmtree(wiped / "local" / "1")

    for name, out, expected in (("own", run, "own copies"), ("wiped", wiped, "with peer replicas")):
        codes, output = _launch(tmp_path, name, out, "--resume")
        assert codes == [0, 0], output[-6000:]
        assert f"restored step 6 from the local tier ({expected})" in output, output[-6000:]
        for rank in (0, 1):
            want = torch.load(full / f"final-rank{rank}.pt", weights_only=True)
            got = torch.load(out / f"final-rank{rank}.pt", weights_only=True)
            assert got["ckpt_path"].startswith("lightning_sharing local tier"), got["ckpt_path"]
            for key in ("model", "optimizer", "step", "rng", "seen", "lr", "metric"):
                assert same_state(got[key], want[key]), (name, rank, key, got[key], want[key])
    assert "from the replica on rank 0 (node 0)" in output


def test_a_node_that_lost_its_disk_before_any_persistent_checkpoint_resumes_with_the_others(tmp_path: Path) -> None:
    """Killed after local step 4, before the first persistent checkpoint (step 5), node 1's directory wiped: node 1
    alone finds nothing to resume from (its node's directory is all a rank looks at before the process group
    exists); the ranks agree once it exists, and node 1 restores from node 0's replica instead of starting afresh
    beside a rank that restores. Bit-exact with an uninterrupted run."""
    full, run = tmp_path / "full", tmp_path / "run"
    codes, output = _launch(tmp_path, "full", full)
    assert codes == [0, 0], output[-6000:]
    codes, output = _launch(tmp_path, "killed", run, "--kill-at", "4")
    assert all(code != 0 for code in codes), (codes, output[-6000:])
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    shutil.rmtree(run / "local" / "1")
    codes, output = _launch(tmp_path, "resumed", run, "--resume")
    assert codes == [0, 0], output[-6000:]
    assert "this node holds no local step and no persistent checkpoint exists" in output, output[-6000:]
    assert "restored step 4 from the local tier (with peer replicas)" in output, output[-6000:]
    for rank in (0, 1):
        want = torch.load(full / f"final-rank{rank}.pt", weights_only=True)
        got = torch.load(run / f"final-rank{rank}.pt", weights_only=True)
        for key in ("model", "optimizer", "step", "rng", "seen", "lr", "metric"):
            assert same_state(got[key], want[key]), (rank, key, got[key], want[key])

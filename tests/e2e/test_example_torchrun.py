"""End-to-end test of examples/torchrun_core.py under real torchrun launches (gloo, CPU).

(a) an uninterrupted 12-step run; (b) the same run interrupted after step 7 and resumed from the newest complete
checkpoint: both must end bit-identical. (c) two simulated nodes (two torchrun agents joined through
``--master_addr/--master_port``): PER_NODE state gets one file per node and each node resumes from its own.
Every launch has a timeout, so a hang fails the test instead of blocking it.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from support import launch

from lightning_sharing import CheckpointManifest, find_latest_checkpoint

EXAMPLE = launch.ROOT / "examples" / "torchrun_core.py"
TIMEOUT_S = 120
STEPS, SAVE_EVERY, STOP_AFTER = 12, 3, 7


def _launch(log: Path, launcher_args: list[str], example_args: list[str]) -> subprocess.Popen:
    """Start one torchrun agent (its workers are its children, in its session); output goes to ``log``."""
    return launch.start(["-m", "torch.distributed.run", *launcher_args, str(EXAMPLE), *example_args], log)


def _wait(procs: list[subprocess.Popen], logs: list[Path]) -> list[str]:
    """Wait for every agent (killing them all on timeout) and require exit code 0 from each."""
    codes = launch.wait(procs, logs, TIMEOUT_S)
    outputs = [log.read_text() for log in logs]
    for code, log, output in zip(codes, logs, outputs, strict=True):
        assert code == 0, f"torchrun failed with exit code {code} ({log}):\n{output[-6000:]}"
    return outputs


def _run(out: Path, tag: str, *extra: str) -> str:
    """One single-node launch with two processes; returns its output (also kept in ``{out}-{tag}.log``)."""
    log = out.parent / f"{out.name}-{tag}.log"
    launcher = ["--nproc_per_node=2", f"--master_port={launch.free_port()}"]
    args = ["--out", str(out), "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), *extra]
    return _wait([_launch(log, launcher, args)], [log])[0]


def _final_digest(output: str) -> str:
    found = re.findall(r"^FINAL ([0-9a-f]{64})$", output, flags=re.MULTILINE)
    assert len(found) == 1, f"expected one FINAL line from rank 0, got {found}:\n{output}"
    return found[0]


def _checkpoint_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("torchrun_example")
    reference, resumed = root / "reference", root / "resumed"
    result: dict[str, object] = {"reference": reference, "resumed": resumed}
    result["reference_output"] = _run(reference, "full")
    result["interrupted_output"] = _run(resumed, "interrupted", "--stop-after", str(STOP_AFTER))
    result["names_after_interruption"] = _checkpoint_names(resumed)
    result["latest_after_interruption"] = find_latest_checkpoint(resumed / "checkpoints")
    result["resumed_output"] = _run(resumed, "resume", "--resume")
    return result


def test_resumed_run_is_bit_identical_to_uninterrupted_run(runs: dict) -> None:
    reference, resumed = runs["reference"], runs["resumed"]
    assert "FINAL" not in runs["interrupted_output"]
    assert f"resumed from {resumed / 'checkpoints' / 'step=6.ckpt'} at step 6" in runs["resumed_output"]
    assert _final_digest(runs["resumed_output"]) == _final_digest(runs["reference_output"])
    for rank in (0, 1):
        expected = load_file(reference / f"final-rank{rank}.safetensors")
        actual = load_file(resumed / f"final-rank{rank}.safetensors")
        assert expected.keys() == actual.keys()
        for name in expected:
            assert torch.equal(expected[name], actual[name]), f"rank {rank}: {name} differs after resume"
    # Not only the weights: optimizer, scheduler, RNG, data positions and progress at step 12 match too.
    ref_ckpt, res_ckpt = reference / "checkpoints" / "step=12.ckpt", resumed / "checkpoints" / "step=12.ckpt"
    ref_files = sorted(p.relative_to(ref_ckpt).as_posix() for p in ref_ckpt.rglob("*") if p.is_file())
    res_files = sorted(p.relative_to(res_ckpt).as_posix() for p in res_ckpt.rglob("*") if p.is_file())
    assert ref_files == res_files
    for rel in ref_files:
        if rel.endswith(".safetensors"):
            expected, actual = load_file(ref_ckpt / rel), load_file(res_ckpt / rel)
            assert expected.keys() == actual.keys(), rel
            assert all(torch.equal(expected[k], actual[k]) for k in expected), f"{rel} differs after resume"
        elif rel != "checkpoint_manifest.json":  # the manifest holds a creation time
            assert json.loads((ref_ckpt / rel).read_text()) == json.loads((res_ckpt / rel).read_text()), rel


def test_checkpoint_layout_follows_the_rule_table(runs: dict) -> None:
    ckpt = runs["reference"] / "checkpoints" / "step=12.ckpt"
    for rel in ["checkpoint_manifest.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors",
                "optimizer.json", "scheduler.json", "progress.json", "rng/rank-00000.json", "rng/rank-00001.json",
                "data/replica-00000.json", "data/replica-00001.json", "node_cache/node-00000.json"]:
        assert (ckpt / rel).is_file(), f"{rel} missing; found {sorted(p.name for p in ckpt.rglob('*'))}"
    assert not (ckpt / "node_cache" / "node-00001.json").exists(), "one node: one PER_NODE copy"
    manifest = CheckpointManifest.load(ckpt)
    assert manifest.step == 12 and manifest.world_size == 2
    assert manifest.topology["nodes"] == [[0, 1]]
    assert manifest.topology["groups"] == {"replica": [[0], [1]]}
    writers = {key: (c.sharing_pattern, c.ranks) for key, c in manifest.components.items()}
    assert writers == {
        "model": ("replicated", [0]), "optimizer": ("replicated", [0]), "scheduler": ("replicated", [0]),
        "rng": ("per_rank", [0, 1]), "data": ("per_group", [0, 1]), "progress": ("global", [0]),
        "node_cache": ("per_node", [0]),
    }
    assert manifest.components["model"].validation == "tensor"
    # The model file is plain safetensors: readable without lightning_sharing, equal to the final weights.
    final = load_file(runs["reference"] / "final-rank0.safetensors")
    saved = load_file(ckpt / "model-00001-of-00001.safetensors")
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in final)


def test_find_latest_checkpoint_picks_the_newest_complete_step(runs: dict) -> None:
    assert runs["names_after_interruption"] == ["step=3.ckpt", "step=6.ckpt"]  # step 7 was never saved
    assert runs["latest_after_interruption"].name == "step=6.ckpt"
    for out in (runs["reference"], runs["resumed"]):
        assert _checkpoint_names(out) == ["step=12.ckpt", "step=3.ckpt", "step=6.ckpt", "step=9.ckpt"]  # no staging
        assert find_latest_checkpoint(out / "checkpoints").name == "step=12.ckpt"


def test_two_simulated_nodes_each_resume_their_own_per_node_copy(tmp_path: Path) -> None:
    out = tmp_path / "nodes"

    def launch_both(tag: str, *extra: str) -> list[str]:
        port = launch.free_port()  # node 0's agent serves the rendezvous store on it; node 1 connects to it
        logs = [tmp_path / f"{tag}-node{k}.log" for k in (0, 1)]
        procs = [
            _launch(logs[k], ["--nnodes=2", f"--node_rank={k}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                              f"--master_port={port}"],
                    ["--out", str(out), "--steps", "4", "--save-every", "2", *extra])
            for k in (0, 1)
        ]
        return _wait(procs, logs)

    launch_both("first", "--stop-after", "2")  # one save, at step 2
    ckpt = out / "checkpoints" / "step=2.ckpt"
    assert sorted(p.name for p in (ckpt / "node_cache").iterdir()) == ["node-00000.json", "node-00001.json"]
    manifest = CheckpointManifest.load(ckpt)
    assert manifest.topology["nodes"] == [[0], [1]]
    assert manifest.components["node_cache"].ranks == [0, 1]  # local rank 0 of each node writes

    outputs = launch_both("resume", "--resume")
    assert f"resumed from {ckpt} at step 2" in outputs[0]
    for rank in (0, 1):
        with safe_open(str(out / f"final-rank{rank}.safetensors"), "pt") as handle:
            meta = handle.metadata()
        # The example's node cache refuses another node's copy; here we also see which copy each rank got.
        assert meta["node"] == str(rank) and meta["cache_loaded_from_node"] == str(rank), meta
    assert find_latest_checkpoint(out / "checkpoints").name == "step=4.ckpt"

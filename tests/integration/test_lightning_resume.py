"""Bit-exact resume through Lightning: SIGKILL mid-epoch after a checkpoint, resume from "last".

Runs examples/lightning_ddp.py (dropout, AdamW + warm-up/cosine schedule, shuffled StatefulDataLoader,
a torchmetrics metric declared PER_RANK) as real processes: once uninterrupted, once killed at step 17
(checkpoints every 5 steps, so 2 steps of work are lost), then resumed. Final weights, optimizer moments,
scheduler state and metric state must be torch.equal to the uninterrupted run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.launch import ROOT, run

from lightning_sharing import CheckpointManifest

EXAMPLE = str(ROOT / "examples" / "lightning_ddp.py")
STEPS, KILL_AT = 26, 17


def _train(out: Path, devices: int, *extra: str, expect: int = 0) -> str:
    args = [EXAMPLE, "--out", str(out), "--devices", str(devices), "--max-steps", str(STEPS), *extra]
    return run(args, out.parent / f"{out.name}-{'-'.join(extra) or 'full'}.log", expect=expect)


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The uninterrupted run per device count, trained once: how checkpoints are saved does not change training."""
    return {}


_MODES = {"sync": [], "async": ["--async-save"], "background": ["--async-save", "--background-staging"]}


@pytest.mark.parametrize(("devices", "mode"), [(1, "sync"), (2, "sync"), (2, "async"), (2, "background")],
                         ids=["single-device", "ddp-2-processes", "ddp-2-processes-async-save",
                              "ddp-2-processes-async-save-background-staging"])
def test_killed_and_resumed_run_matches_uninterrupted_run(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                                                          reference_runs: dict[int, Path], devices: int,
                                                          mode: str) -> None:
    flags = _MODES[mode]
    if devices not in reference_runs:
        reference_runs[devices] = tmp_path_factory.mktemp(f"reference-{devices}") / "reference"
        _train(reference_runs[devices], devices, *flags)
    reference, killed = reference_runs[devices], tmp_path / "killed"
    _train(killed, devices, "--kill-at-step", str(KILL_AT), *flags, expect=-9)

    checkpoints = killed / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith("."))
    steps = sorted(int(n.split("step=")[1][:-5]) for n in names[:-1])
    manifest = CheckpointManifest.load(checkpoints / "last.ckpt")
    if mode == "sync":
        assert names[-1] == "last.ckpt" and steps == [5, 10, 15]
        assert manifest.step == 15
    else:
        # The SIGKILL may land while the step-15 saves are still being written in the background:
        # then last.ckpt is still the complete step-10 checkpoint, and the resume starts there.
        assert names[-1] == "last.ckpt" and steps in ([5, 10], [5, 10, 15]) and manifest.step in (10, 15)
    assert manifest.world_size == devices
    patterns = {key: c.sharing_pattern for key, c in manifest.components.items()}
    assert patterns == {"model": "replicated", "optimizer": "replicated", "scheduler": "replicated",
                        "dataloader": "per_rank", "sampler": "global", "rng": "per_rank", "trainer": "global",
                        "loss_mean": "per_rank"}
    assert [f.rank for f in manifest.components["sampler"].files] == [0]  # the elastic sampler's position, once
    assert manifest.components["model"].validation == "quick"
    # Every rank saved its own dataloader position, RNG and metric; Lightning's own DDP save keeps rank 0's only.
    for key in ("dataloader", "rng", "loss_mean"):
        writers = sorted({f.rank for f in manifest.components[key].files})
        assert writers == list(range(devices)), key
    if devices == 2:
        # The metric accumulated different data on each rank: two copies that really differ.
        metric0, metric1 = (load_file(checkpoints / "last.ckpt" / f"loss_mean/rank-0000{r}-00001-of-00001.safetensors")
                            for r in (0, 1))
        assert not torch.equal(metric0["states.mean_value"], metric1["states.mean_value"])

    output = _train(killed, devices, "--resume", *flags)
    assert "Restored all states from the checkpoint" in output

    for rank in range(devices):
        expected = load_file(reference / f"final-rank{rank}.safetensors")
        actual = load_file(killed / f"final-rank{rank}.safetensors")
        assert expected.keys() == actual.keys()
        assert any(k.startswith("optimizer.") for k in expected) and "metric.mean_value" in expected
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"rank {rank}: {key} differs after resume"
        summary = json.loads((killed / f"final-rank{rank}.json").read_text())
        assert summary == json.loads((reference / f"final-rank{rank}.json").read_text())
        assert summary["global_step"] == STEPS and summary["scheduler"]["last_epoch"] == STEPS


def test_single_device_example_runs_and_resumes(tmp_path: Path) -> None:
    script = str(ROOT / "examples" / "lightning_single_device.py")
    first = run([script, "--out", str(tmp_path), "--max-steps", "10"], tmp_path / "first.log")
    assert "global_step=10; last.ckpt holds step 10:" in first
    second = run([script, "--out", str(tmp_path), "--max-steps", "15", "--resume"], tmp_path / "second.log")
    assert "Restored all states from the checkpoint" in second
    assert "global_step=15; last.ckpt holds step 15:" in second
    assert "  rng        per_rank" in second and "  model      replicated" in second

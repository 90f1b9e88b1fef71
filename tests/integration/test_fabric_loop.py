"""The ordinary Fabric loop resumes bit-exact, launched with plain python, `fabric run` and torchrun.

examples/fabric_ddp.py is Fabric's usual loop: ``fabric.setup_dataloaders(StatefulDataLoader(ds, shuffle=True))``,
``for batch in loader``, ``fabric.save`` every few steps, ``fabric.load(find_latest_checkpoint(dir), state)``;
no sampler or generator of its own, and ``fabric.launch()`` in the script (which ``fabric run`` used to refuse).
Runs are SIGKILLed after step 7 and resumed; each rank's FINAL digest (model, optimizer, scheduler, metric, epoch,
RNG) must equal the uninterrupted run's. 12 steps are 2.4 epochs of 5 batches, so the resumes cross epochs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from support.launch import ROOT, free_port, run

EXAMPLE = str(ROOT / "examples" / "fabric_ddp.py")
FABRIC = str(Path(sys.executable).parent / "fabric")
TORCHRUN = ["-m", "torch.distributed.run", "--nproc_per_node=2"]


def _finals(output: str) -> dict[str, str]:
    found = dict(re.findall(r"rank (\d) FINAL ([0-9a-f]{64})", output))  # the ranks' lines may interleave
    assert sorted(found) == ["0", "1"], output[-4000:]
    return found


def _example(out: Path, *extra: str) -> list[str]:
    return [EXAMPLE, "--out", str(out), "--steps", "12", *extra]


def _fabric_run(*args: str) -> list[str]:
    return [FABRIC, "run", "--accelerator=cpu", "--devices=2", f"--main-port={free_port()}", *args]


def test_killed_fabric_loop_resumes_bit_exact_under_each_launcher(tmp_path: Path) -> None:
    reference = _finals(run(_example(tmp_path / "reference"), tmp_path / "reference.log"))

    # Fabric's own launcher (plain python), killed after step 7: the newest checkpoint is step 6, in epoch 1;
    # resumed under torchrun, unchanged.
    killed = tmp_path / "python"
    run(_example(killed, "--save-every", "3", "--kill-after", "7"), tmp_path / "python-killed.log", expect=-9)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step=3.ckpt", "step=6.ckpt"]
    resumed = run([*TORCHRUN, f"--master_port={free_port()}", *_example(killed, "--save-every", "3", "--resume")],
                  tmp_path / "torchrun-resumed.log")
    assert f"resumed from {killed / 'checkpoints' / 'step=6.ckpt'} at step 6" in resumed
    assert _finals(resumed) == reference

    # `fabric run`: the script's fabric.launch() is allowed; the checkpoint is the last batch of epoch 0.
    cli = tmp_path / "cli"
    killed_log = run(_fabric_run(*_example(cli, "--save-every", "5", "--kill-after", "7")),
                     tmp_path / "cli-killed.log", expect=1)  # torchrun reports the SIGKILLed workers
    assert "Signal 9 (SIGKILL)" in killed_log and "Calling  `.launch()` again is not allowed" not in killed_log
    resumed = run(_fabric_run(*_example(cli, "--save-every", "5", "--resume")), tmp_path / "cli-resumed.log")
    assert f"resumed from {cli / 'checkpoints' / 'step=5.ckpt'} at step 5" in resumed
    assert _finals(resumed) == reference

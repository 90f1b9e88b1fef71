"""Preemption: SIGTERM and SLURM's requeue signal end in an agreed checkpoint, a clean exit, and a bit-exact resume.

The multi-process tests drive tests/scripts/preemption_train.py (2 ranks, gloo): a training run gets its
signal(s) when a marker file says a step is reached (``--hold-at`` keeps the ranks there until the signals
are sent, so the step is deterministic; ``--mark-at`` does not wait: the signal lands wherever the ranks are),
then a second launch runs an uninterrupted reference and the resumed run, and both must end ``torch.equal``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from safetensors.torch import load_file
from support.launch import ROOT, free_port, start, wait
from support.launch import env as launch_env

from lightning_sharing import CheckpointManifest, SharingStrategy, find_latest_checkpoint
from lightning_sharing.lightning.preemption import PreemptionHandler, _point_link, hpc_checkpoint_path

SCRIPT = str(ROOT / "tests" / "scripts" / "preemption_train.py")
TIMEOUT = 90  # seconds for one launch; a hang fails the test with the logs


# ---------------------------------------------------------------------------------------------- helpers
def _start_ranks(args: list[str], logs: list[Path], slurm: bool = False) -> list[subprocess.Popen]:
    """Start both ranks ourselves (as torchrun or srun would), so that each rank's exit status is ours to see."""
    port = str(free_port())
    procs = []
    for rank, log in enumerate(logs):
        if slurm:  # what srun --ntasks-per-node=2 sets, as far as Lightning's SLURMEnvironment reads it
            extra = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
                     "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_JOB_ID": "4242",
                     "SLURM_JOB_NAME": "preemption-test"}
        else:
            extra = {"LOCAL_RANK": str(rank), "NODE_RANK": "0", "WORLD_SIZE": "2"}
        environment = {**launch_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **extra}
        with open(log, "w") as handle:
            procs.append(subprocess.Popen([sys.executable, SCRIPT, *args], cwd=ROOT, env=environment, stdout=handle,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _pids_at(out: Path, step: int, ranks: list[int], procs: list[subprocess.Popen], logs: list[Path]) -> list[int]:
    """Wait until ``ranks`` wrote their marker for ``step``; their pids."""
    markers = [out / f"reached-step{step}-rank{r}" for r in ranks]
    deadline = time.monotonic() + TIMEOUT
    while not all(m.exists() for m in markers):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            tails = "\n".join(log.read_text()[-3000:] for log in logs)
            raise AssertionError(f"the run ended or stalled before reaching step {step}:\n{tails}")
        time.sleep(0.01)
    return [int(m.read_text()) for m in markers]


def _signal(out: Path, step: int, sig: signal.Signals, ranks: list[int], procs: list[subprocess.Popen],
            logs: list[Path], release: bool = True) -> None:
    """When ``ranks`` reach ``step``: send them ``sig``, then let held ranks go on."""
    for pid in _pids_at(out, step, ranks, procs, logs):
        os.kill(pid, sig)
    if release:
        (out / f"go-step{step}").touch()


def _results(out: Path) -> list[dict[str, Any]]:
    return [json.loads((out / f"result-rank{r}.json").read_text()) for r in (0, 1)]


def _resume(tmp_path: Path, out: Path, *args: str, slurm: bool = False) -> list[dict[str, Any]]:
    """Launch the reference and the resumed run(s); check the resumed run ends bit-exactly like the reference."""
    logs = [tmp_path / f"resume-rank{r}.log" for r in (0, 1)]
    codes = wait(_start_ranks(["resume", "--out", str(out), *args], logs, slurm=slurm), logs, TIMEOUT)
    assert codes == [0, 0], "\n".join(log.read_text()[-4000:] for log in logs)
    summaries = []
    for name in ["resumed"] + (["resumed2"] if "--also-resume" in args else []):
        for rank in (0, 1):
            reference = load_file(out / "reference" / f"final-rank{rank}.safetensors")
            resumed = load_file(out / name / f"final-rank{rank}.safetensors")
            assert reference.keys() == resumed.keys()
            differing = [k for k in reference if not torch.equal(reference[k], resumed[k])]
            assert not differing, f"{name}, rank {rank}: {differing} differ from the uninterrupted run"
            ref_json = json.loads((out / "reference" / f"final-rank{rank}.json").read_text())
            summary = json.loads((out / name / f"final-rank{rank}.json").read_text())
            assert summary["scheduler"] == ref_json["scheduler"] and summary["global_step"] == ref_json["global_step"]
            summaries.append(summary)
    return summaries


def _no_leftovers(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".")], "staging or link leftovers"


# ---------------------------------------------------------------------------------------------- processes
def test_sigterm_to_every_rank_writes_last_ckpt_exits_0_and_resumes_bit_exact(tmp_path: Path) -> None:
    """Lightning's own launcher; SIGTERM to both ranks during the last step of epoch 0 (step 8 of 8 per epoch).

    At an epoch's end the stop moves one step into the next epoch (Lightning's epoch-end SIGTERM state does
    not resume exactly). ModelCheckpoint(save_last=True): the final checkpoint *is* last.ckpt.
    """
    out = tmp_path / "run"
    out.mkdir()
    log = tmp_path / "train.log"
    proc = start([SCRIPT, "train", "--out", str(out), "--hold-at", "7"], log)
    _signal(out, 7, signal.SIGTERM, [0, 1], [proc], [log])
    assert wait([proc], [log], TIMEOUT) == [0], log.read_text()[-4000:]
    assert json.loads((out / "children.json").read_text()) == [0]  # rank 1, started by Lightning's launcher

    ckpts = out / "ckpt"
    results = _results(out)
    assert [(r["outcome"], r["global_step"], r["saved"]) for r in results] == [
        ("SIGTERMException", 9, str(ckpts / "last.ckpt"))] * 2
    assert CheckpointManifest.load(ckpts / "last.ckpt").step == 9
    assert find_latest_checkpoint(ckpts) == ckpts / "last.ckpt"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=5.ckpt", "last.ckpt"]
    _no_leftovers(ckpts)
    assert "SIGTERM: every rank stops after step 9; writing the final checkpoint" in log.read_text()

    for summary in _resume(tmp_path, out, "--resume", "last"):
        assert summary["start_step"] == 9 and summary["ckpt_path"] == str(ckpts / "last.ckpt")


def test_sigterm_to_one_rank_at_an_arbitrary_moment_stops_all_ranks_together(tmp_path: Path) -> None:
    """SIGTERM to rank 1 only, while the ranks run freely (plain Lightning hangs here: its handler broadcasts).

    ModelCheckpoint(save_last="link"): the final checkpoint is preempted-step=N.ckpt and last.ckpt links to it.
    With async_save: the final checkpoint is committed before the link points at it and the processes exit.
    """
    out = tmp_path / "run"
    out.mkdir()
    logs = [tmp_path / f"train-rank{r}.log" for r in (0, 1)]
    procs = _start_ranks(["train", "--out", str(out), "--mark-at", "5", "--step-sleep", "0.05", "--save-last", "link",
                          "--async-save"], logs)
    _signal(out, 5, signal.SIGTERM, [1], procs, logs, release=False)
    assert wait(procs, logs, TIMEOUT) == [0, 0], "\n".join(log.read_text()[-4000:] for log in logs)

    results = _results(out)
    step = results[0]["global_step"]
    assert 6 <= step < 20 and results[1]["global_step"] == step  # the same step on every rank
    ckpts = out / "ckpt"
    final = ckpts / f"preempted-step={step}.ckpt"
    assert [(r["outcome"], r["saved"]) for r in results] == [("SIGTERMException", str(final))] * 2
    assert (ckpts / "last.ckpt").is_symlink() and (ckpts / "last.ckpt").resolve() == final
    assert CheckpointManifest.load(final).step == step and find_latest_checkpoint(ckpts) == final
    _no_leftovers(ckpts)

    for summary in _resume(tmp_path, out, "--resume", "last", "--save-last", "link"):
        assert summary["start_step"] == step and summary["ckpt_path"] == str(ckpts / "last.ckpt")


def test_slurm_requeue_signal_saves_hpc_checkpoint_at_a_step_boundary_then_sigterm_and_automatic_resume(
        tmp_path: Path) -> None:
    """SLURMEnvironment(auto_requeue=True), ranks started as srun would (no scontrol on this machine).

    The requeue signal reaches both ranks before step 3 (which Lightning follows with validation): every
    rank saves hpc_ckpt_1.ckpt after that validation, and training goes on (rank 0 tries scontrol requeue).
    Then SIGTERM reaches rank 0 alone, mid-run: the final checkpoint is hpc_ckpt_2.ckpt, which the next job
    resumes from automatically (ckpt_path=None under SLURM). Both checkpoints resume bit-exactly.
    """
    out = tmp_path / "run"
    out.mkdir()
    logs = [tmp_path / f"train-rank{r}.log" for r in (0, 1)]
    procs = _start_ranks(["train", "--out", str(out), "--hold-at", "3", "--mark-at", "10", "--step-sleep", "0.05",
                          "--slurm"], logs, slurm=True)
    _signal(out, 3, signal.SIGUSR1, [0, 1], procs, logs)
    _signal(out, 10, signal.SIGTERM, [0], procs, logs, release=False)
    assert wait(procs, logs, TIMEOUT) == [0, 0], "\n".join(log.read_text()[-4000:] for log in logs)

    results = _results(out)
    step = results[0]["global_step"]
    assert 11 <= step < 20 and results[1]["global_step"] == step
    assert [(r["outcome"], r["saved"]) for r in results] == [("SIGTERMException", str(out / "hpc_ckpt_2.ckpt"))] * 2
    assert CheckpointManifest.load(out / "hpc_ckpt_1.ckpt").step == 4
    assert CheckpointManifest.load(out / "hpc_ckpt_2.ckpt").step == step
    _no_leftovers(out)
    rank0 = logs[0].read_text()
    assert "requeue: saved checkpoint" in rank0 and "requeuing SLURM job 4242 failed" in rank0
    assert rank0.count("requeue: saved checkpoint") == 1  # one request, however late it reached the ranks

    summaries = _resume(tmp_path, out, "--resume", "none", "--also-resume", str(out / "hpc_ckpt_1.ckpt"),
                        slurm=True)
    assert [(s["start_step"], Path(s["ckpt_path"]).name) for s in summaries] == [
        (step, "hpc_ckpt_2.ckpt")] * 2 + [(4, "hpc_ckpt_1.ckpt")] * 2


def test_preemption_checkpoint_off_still_stops_every_rank_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    logs = [tmp_path / f"train-rank{r}.log" for r in (0, 1)]
    procs = _start_ranks(["train", "--out", str(out), "--hold-at", "5", "--preemption", "off"], logs)
    _signal(out, 5, signal.SIGTERM, [0, 1], procs, logs)
    assert wait(procs, logs, TIMEOUT) == [0, 0], "\n".join(log.read_text()[-4000:] for log in logs)
    assert [(r["outcome"], r["global_step"], r["saved"]) for r in _results(out)] == [("SIGTERMException", 6, None)] * 2
    ckpts = out / "ckpt"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=5.ckpt", "last.ckpt"]
    assert CheckpointManifest.load(ckpts / "last.ckpt").step == 5


def test_a_crash_is_not_a_preemption_and_leaves_the_checkpoints_alone(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    logs = [tmp_path / f"train-rank{r}.log" for r in (0, 1)]
    procs = _start_ranks(["train", "--out", str(out), "--crash-at", "7", "--crash-rank", "1"], logs)
    codes = wait(procs, logs, TIMEOUT)
    assert codes[0] != 0 and codes[1] != 0, codes
    assert "injected crash on rank 1 at step 7" in logs[1].read_text()
    assert [r["saved"] for r in _results(out)] == [None, None]
    ckpts = out / "ckpt"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=5.ckpt", "last.ckpt"]
    assert CheckpointManifest.load(ckpts / "last.ckpt").step == 5 and find_latest_checkpoint(ckpts) is not None


# ---------------------------------------------------------------------------------------------- in process
def test_preemption_checkpoint_keyword_is_checked() -> None:
    assert SharingStrategy().preemption.enabled
    assert not SharingStrategy(preemption_checkpoint=False).preemption.enabled
    assert not PreemptionHandler(None).enabled
    with pytest.raises(TypeError, match="preemption_checkpoint must be True, False, or a path, not int"):
        SharingStrategy(preemption_checkpoint=3)
    with pytest.raises(ValueError, match=r"may only use the fields \{step\} and \{epoch\}"):
        PreemptionHandler("ckpts/{global_step}.ckpt")
    with pytest.raises(ValueError, match="pass False to write no final checkpoint"):
        PreemptionHandler("")


def _fake_trainer(tmp_path: Path, callback: Any = None, slurm: bool = False) -> Any:
    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    environment = SLURMEnvironment(auto_requeue=True) if slurm else LightningEnvironment()
    return SimpleNamespace(global_step=17, current_epoch=2, default_root_dir=str(tmp_path), is_global_zero=True,
                           global_rank=0, checkpoint_callback=callback, callback_metrics={},
                           _accelerator_connector=SimpleNamespace(cluster_environment=environment))


@pytest.mark.parametrize(("setting", "save_last", "expected"), [
    (True, True, ("ckpt/last.ckpt", "ckpt/last.ckpt", False)),
    (True, "link", ("ckpt/preempted-step=17.ckpt", "ckpt/last.ckpt", True)),
    (True, None, ("ckpt/preempted-step=17.ckpt", None, False)),
    (True, "no callback", ("checkpoints/preempted-step=17.ckpt", None, False)),
    (True, "slurm", ("hpc_ckpt_3.ckpt", None, False)),
    ("custom/pre-{epoch}-{step}.ckpt", True, ("custom/pre-2-17.ckpt", None, False)),
    ("custom", True, ("custom/preempted-step=17.ckpt", None, False)),
])
def test_where_the_final_checkpoint_goes(tmp_path: Path, setting: Any, save_last: Any, expected: tuple) -> None:
    callback = None
    if save_last not in ("no callback", "slurm"):
        callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=save_last)
    (tmp_path / "hpc_ckpt_2.ckpt").mkdir()
    trainer = _fake_trainer(tmp_path, callback, slurm=save_last == "slurm")
    if isinstance(setting, str):
        setting = str(tmp_path / setting)
    path, last, link = PreemptionHandler(setting)._final_path(trainer)
    assert (os.path.relpath(path, tmp_path), last and os.path.relpath(last, tmp_path), link) == expected


def test_hpc_numbering_ignores_staging_directories(tmp_path: Path) -> None:
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    (tmp_path / "hpc_ckpt_1.ckpt").mkdir()
    (tmp_path / ".hpc_ckpt_2.ckpt.staging-0123456789abcdef0123456789abcdef").mkdir()  # an interrupted save
    assert hpc_checkpoint_path(tmp_path) == str(tmp_path / "hpc_ckpt_2.ckpt")
    # Lightning's own numbering takes every digit of the staging directory's name (a surprise worth pinning).
    assert _CheckpointConnector.hpc_save_path(tmp_path) != str(tmp_path / "hpc_ckpt_2.ckpt")


def test_only_an_agreed_sigterm_writes_a_checkpoint(tmp_path: Path) -> None:
    saved: list[str] = []
    callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _fake_trainer(tmp_path, callback)
    trainer.save_checkpoint = lambda path, weights_only=None: saved.append(path)
    # With async_save the final checkpoint must be committed before the process goes on to exit.
    trainer.strategy = SimpleNamespace(checkpoint_io=SimpleNamespace(wait=lambda: saved.append("waited")))
    handler = PreemptionHandler()
    handler._trainer = trainer

    handler.on_exception(SIGTERMException())  # raised, but not through an agreed SIGTERM: nothing
    handler.stopping = True
    handler.on_exception(RuntimeError("a crash"))  # a crash never saves, even while stopping
    handler.on_exception(KeyboardInterrupt())
    assert saved == []
    handler.on_exception(SIGTERMException())
    assert saved == [str(tmp_path / "ckpt" / "last.ckpt"), "waited"] and handler.saved_path == saved[0]
    assert callback.last_model_path == saved[0]  # recorded in the checkpoint: the resumed callback keeps it


def test_point_link_replaces_a_copied_last_checkpoint_with_a_link(tmp_path: Path) -> None:
    (tmp_path / "last.ckpt").mkdir()
    (tmp_path / "last.ckpt" / "checkpoint_manifest.json").write_text("{}")
    (tmp_path / "preempted-step=4.ckpt").mkdir()
    _point_link(tmp_path / "last.ckpt", tmp_path / "preempted-step=4.ckpt")
    assert os.readlink(tmp_path / "last.ckpt") == "preempted-step=4.ckpt"
    _point_link(tmp_path / "last.ckpt", tmp_path / "preempted-step=4.ckpt")  # again: a link replaced by a link
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "preempted-step=4.ckpt"]

"""Lightning's machinery keeps working with SharingStrategy (driven through tests/scripts/lightning_features.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from support.launch import ROOT, free_port, start, wait
from support.launch import run as run_process

from lightning_sharing import CheckpointManifest
from lightning_sharing.cli import main

SCRIPT = str(ROOT / "tests" / "scripts" / "lightning_features.py")


def _results(out: Path, ranks: int) -> list[dict]:
    return [json.loads((out / f"result-rank{r}.json").read_text()) for r in range(ranks)]


def test_model_checkpoint_save_validate_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "features"
    run_process([SCRIPT, "features", "--out", str(out)], tmp_path / "features.log")
    results = _results(out, 2)
    assert results[0] == results[1]  # every rank saw the same paths and values
    result = results[0]
    ckpts = out / "checkpoints"

    # save_top_k=2 + monitor: rotation removed the worse checkpoints; save_last="link" is a symlink.
    assert sorted(Path(p).name for p in result["best_k"]) == ["epoch=0-step=6.ckpt", "epoch=1-step=12.ckpt"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=1-step=12.ckpt", "epoch=1-step=15.ckpt", "last.ckpt"]
    assert (ckpts / "last.ckpt").is_symlink() and (ckpts / "last.ckpt").resolve() == ckpts / "epoch=1-step=15.ckpt"
    assert not [p for p in ckpts.parent.rglob(".*")]  # no staging or half-removed leftovers anywhere

    # The resumed fit started from "last" and continued, restoring the metric and the node cache.
    assert result["resumed_from"].endswith("last.ckpt") and result["resumed_step"] == 15
    assert result["seen_after_resume"] == 15 * (1 + 2)
    assert result["cache_loaded_from"] == 0
    assert Path(result["latest"]).name == "epoch=1-step=15.ckpt"

    # trainer.save_checkpoint: full, and weights_only (no optimizer, scheduler or RNG state).
    full = CheckpointManifest.load(out / "manual.ckpt")
    weights = CheckpointManifest.load(out / "weights.ckpt")
    assert {"model", "optimizer", "rng", "dataloader", "trainer", "seen", "cache"} <= set(full.components)
    assert "optimizer" not in weights.components and "model" in weights.components
    assert full.components["optimizer"].validation == "tensor"  # re-declared through BuiltinState
    assert full.components["cache"].sharing_pattern == "per_node"
    # From the datamodule's configure_state_components(), and a group from configure_process_groups().
    assert full.components["dm_epochs"].sharing_pattern == "global"
    assert full.components["group_state"].group_name == "everyone"
    assert full.topology["groups"] == {"everyone": [[0, 1]]}
    # The datamodule's counter (1 at the save) was restored, then its train_dataloader() ran once more.
    assert result["dm_epochs_after_resume"] == 2
    saved = load_file(out / "weights.ckpt" / "model-00001-of-00001.safetensors")
    same = load_file(out / "manual.ckpt" / "model-00001-of-00001.safetensors")
    assert saved.keys() == same.keys() and all(torch.equal(saved[k], same[k]) for k in saved)

    assert result["validate_weights"] == result["validate_best"]  # both load the step-12 weights
    assert result["storage_options_error"].startswith(
        "ComponentDeclarationError: storage_options={'bucket': 'x'} were given for the local path ")
    assert not (out / "remote.ckpt").exists()


def test_wrong_declaration_fails_when_fit_starts(tmp_path: Path) -> None:
    out = tmp_path / "bad"
    run_process([SCRIPT, "bad-declaration", "--out", str(out)], tmp_path / "bad.log")
    for result in _results(out, 2):
        assert result["global_step"] == 0
        assert result["error"].startswith("ComponentDeclarationError: component 'data_shard' uses process group "
                                          "'tp', which no one provided")
    assert not (out / "checkpoints").exists()


def test_spawn_launcher_returns_final_weights_through_the_checkpoint_io(tmp_path: Path) -> None:
    out = tmp_path / "spawn"
    run_process([SCRIPT, "spawn", "--out", str(out)], tmp_path / "spawn.log")
    (result,) = _results(out, 1)
    assert result == {"parent_weights_equal_saved": True,
                      "keys": ["net.0.bias", "net.0.weight", "net.1.bias", "net.1.num_batches_tracked",
                               "net.1.running_mean", "net.1.running_var", "net.1.weight", "net.3.bias",
                               "net.3.weight"]}


def test_two_nodes_under_torchrun_save_and_resume_per_node_state(tmp_path: Path) -> None:
    out = tmp_path / "nodes"
    for phase in ([], ["--resume"]):
        port = free_port()
        procs, logs = [], []
        for node in (0, 1):
            logs.append(tmp_path / f"node{node}{''.join(phase)}.log")
            procs.append(start(["-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                                "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                                SCRIPT, "nodes", "--out", str(out), "--devices", "1", "--nodes", "2", *phase],
                               logs[-1]))
        assert wait(procs, logs, timeout=150) == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    results = _results(out, 2)
    assert [(r["node"], r["loaded_from"], r["global_step"], r["world_size"]) for r in results] == [
        (0, 0, 6, 2), (1, 1, 6, 2)]
    manifest = CheckpointManifest.load(out / "checkpoints" / "epoch=0-step=4.ckpt")
    assert manifest.topology["nodes"] == [[0], [1]]
    cache = {(f.path, f.rank) for f in manifest.components["cache"].files}
    assert {rank for path, rank in cache if path.startswith("cache/node-00000")} == {0}
    assert {rank for path, rank in cache if path.startswith("cache/node-00001")} == {1}


def test_corrupt_last_checkpoint_is_an_error_unless_fallback_is_chosen(tmp_path: Path) -> None:
    out = tmp_path / "fallback"
    log = tmp_path / "fallback.log"
    run_process([SCRIPT, "fallback", "--out", str(out)], log)
    for result in _results(out, 2):
        error = result["default_error"]
        assert error.startswith("DistributedCorruptCheckpointError: loading checkpoint ")
        assert "last.ckpt failed on ranks [0, 1]" in error
        assert "component 'model', file model-00001-of-00001.safetensors (written by rank 0)" in error
        # With SharingStrategy(fallback=True): resumed from the intact step-10 checkpoint, not from scratch.
        assert result["fallback_start_step"] == 10 and result["fallback_step"] == 12
        # trainer.ckpt_path and Lightning's own log line name the checkpoint actually loaded.
        assert result["fallback_ckpt_path"] == str(out / "checkpoints" / "epoch=1-step=10.ckpt")
    output = log.read_text()
    assert "SharingStrategy(fallback=True) would resume from the previous complete checkpoint" in output
    assert "FALLING BACK:" in output and "resuming from" in output and "step=10.ckpt instead" in output
    restored = [line for line in output.splitlines() if line.startswith("Restored all states from the checkpoint")]
    assert restored == [f"Restored all states from the checkpoint at {out / 'checkpoints' / 'epoch=1-step=10.ckpt'}"]


def test_async_save_with_keep_last_k_retention_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "async"
    run_process([SCRIPT, "async-retention", "--out", str(out)], tmp_path / "async.log")
    results = _results(out, 2)
    assert results[0] == results[1]
    result = results[0]
    ckpts = out / "checkpoints"
    # keep-last-2 under async_save: older checkpoints were removed only after newer ones committed,
    # and fit() returned with everything committed.
    assert result["after_first"] == ["step=10.ckpt", "step=8.ckpt"]
    # The resume from step=8 kept it (never delete what training resumed from); the resumed run's own
    # step-10 save (step=10-v1) was rotated out; the first run's step=10 is not this run's to delete.
    assert result["resumed_at"] == 8 and result["global_step"] == 14
    assert result["after_resume"] == ["step=10.ckpt", "step=12.ckpt", "step=14.ckpt", "step=8.ckpt"]
    assert Path(result["latest"]).name == "step=14.ckpt"
    for name in result["after_resume"]:
        assert CheckpointManifest.load(ckpts / name).world_size == 2
    assert not [p for p in out.rglob(".*")]  # no staging or half-removed leftovers


def test_incremental_saves_under_the_trainer_with_async_retention_and_resume(tmp_path: Path) -> None:
    """SharingStrategy(incremental=True, async_save=True): the frozen backbone (found through the model state's
    module) gets files of its own from the first save, linked by every later one; retention deletes older
    checkpoints and what is kept verifies alone; training resumes from the newest."""
    out = tmp_path / "incremental"
    run_process([SCRIPT, "incremental", "--out", str(out)], tmp_path / "incremental.log")
    results = _results(out, 2)
    assert results[0] == results[1]
    result = results[0]
    assert result["kept"] == ["step=10.ckpt", "step=8.ckpt"]
    for name in result["kept"]:
        frozen = {path: origin for path, origin in result["origins"][name].items() if "-frozen-" in path}
        assert frozen and all(origin["kind"] == "linked" for origin in frozen.values()), result["origins"][name]
        assert main(["verify", str(out / "checkpoints" / name)]) == 0
    assert result["origins"]["step=10.ckpt"]["model-00001-of-00001.safetensors"]["kind"] == "written"
    assert result["resumed_at"] == 10 and result["global_step"] == 12

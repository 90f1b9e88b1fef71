"""SharingModelParallelStrategy: bit-exact resume after SIGKILL, what each rank writes, changing the layout.

examples/lightning_model_parallel.py (FSDP2 ``fully_shard`` in ``configure_model``, tensor parallel with 2x2, dropout,
AdamW + warm-up, a shuffled StatefulDataLoader, a per-rank torchmetrics metric) runs as real processes, for
2 processes (FSDP2 over 2) and 4 (2 data parallel x 2 tensor parallel): uninterrupted, killed at step 8 (checkpoints
every 3 steps), resumed from "last"; the full weights, optimizer state, scheduler and metric must be equal. The
killed runs' step-6 checkpoints are then loaded elsewhere by tests/scripts/lightning_model_parallel.py: 2 -> 4 and
4 -> 2 processes, into SharingStrategy (DDP, 2 processes) and one device, and by load_from_checkpoint; the one-device
DDP run saves SharingStrategy's (REPLICATED) checkpoint of that state, which then loads into FSDP2 over 2; what each
loaded must equal the checkpoint's full tensors as SharingCheckpointIO reads them in this process. The same launch
validates with a checkpoint, saves weights only and saves asynchronously (with background staging: the step-4
checkpoint must equal a dump taken after step 4, though step 5 followed at once), and checks the refusals of point 4.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from support.launch import ROOT, free_port, run

from lightning_sharing import CheckpointManifest, ComponentDeclarationError, SharingCheckpointIO

EXAMPLE = str(ROOT / "examples" / "lightning_model_parallel.py")
SCRIPT = str(ROOT / "tests" / "scripts" / "lightning_model_parallel.py")
STEPS, KILL_AT = 12, 8
LAYOUTS = {"fsdp-2": (2, 1), "fsdp-tp-2x2": (2, 2)}


def _example(out: Path, dp: int, tp: int, *extra: str, expect: int = 0) -> str:
    args = [EXAMPLE, "--out", str(out), "--dp", str(dp), "--tp", str(tp), "--max-steps", str(STEPS), *extra]
    return run(args, out.parent / f"{out.name}-{'-'.join(extra) or 'full'}.log", expect=expect, timeout=240)


def _torchrun(procs: int, log: Path, *args: str) -> str:
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={procs}", f"--master_port={free_port()}"]
    return run([*launcher, SCRIPT, *args], log, timeout=240)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """For each layout: the uninterrupted run, and the run killed at step KILL_AT and resumed."""
    root = tmp_path_factory.mktemp("model-parallel")
    result = {}
    for name, (dp, tp) in LAYOUTS.items():
        reference, killed = root / f"{name}-reference", root / f"{name}-killed"
        _example(reference, dp, tp)
        _example(killed, dp, tp, "--kill-at-step", str(KILL_AT), expect=-9)
        (killed / "names-after-kill.json").write_text(json.dumps(sorted(os.listdir(killed / "checkpoints"))))
        output = _example(killed, dp, tp, "--resume")
        assert "Restored all states from the checkpoint" in output
        result[name], result[f"{name}-reference"] = killed, reference
    return result


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_killed_and_resumed_run_matches_uninterrupted_run(runs: dict[str, Path], name: str) -> None:
    dp, tp = LAYOUTS[name]
    killed, reference = runs[name], runs[f"{name}-reference"]
    assert json.loads((killed / "names-after-kill.json").read_text()) == [
        "epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    for rank in range(dp * tp):
        expected = load_file(reference / f"final-rank{rank}.safetensors")
        actual = load_file(killed / f"final-rank{rank}.safetensors")
        assert expected.keys() == actual.keys()
        assert {"model.0.weight", "optimizer.state.0.weight.exp_avg", "metric.mean_value"} <= set(expected)
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"rank {rank}: {key} differs after resume"
        summary = json.loads((killed / f"final-rank{rank}.json").read_text())
        assert summary == json.loads((reference / f"final-rank{rank}.json").read_text())
        assert summary["global_step"] == STEPS and summary["scheduler"]["last_epoch"] == STEPS
    # Data parallel replicas saw different batches: their metrics differ (tensor-parallel peers' are equal).
    metrics = [load_file(reference / f"final-rank{r}.safetensors")["metric.mean_value"] for r in range(dp * tp)]
    assert not torch.equal(metrics[0], metrics[tp])
    assert all(torch.equal(metrics[r], metrics[r - r % tp]) for r in range(dp * tp))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_what_each_rank_wrote(runs: dict[str, Path], name: str) -> None:
    dp, tp = LAYOUTS[name]
    world = dp * tp
    manifest = CheckpointManifest.load(runs[name] / "checkpoints" / "epoch=0-step=6.ckpt")
    assert manifest.world_size == world and manifest.step == 6
    patterns = {key: (c.sharing_pattern, c.group_name) for key, c in manifest.components.items()}
    assert patterns == {"model": ("sharded", None), "optimizer": ("sharded", None), "scheduler": ("global", None),
                        "dataloader": ("per_group", "tensor_parallel"), "sampler": ("global", None),
                        "rng": ("per_rank", None), "trainer": ("global", None), "loss_mean": ("per_rank", None)}
    files = {key: sorted((f.path, f.rank) for f in c.files) for key, c in manifest.components.items()}
    chunks = [(f"model/chunks-{r:05d}.safetensors", r) for r in range(world)]
    assert files["model"] == [*chunks, ("model/index.json", 0)]
    assert files["optimizer"] == [("optimizer.json", 0), *[(f"optimizer/chunks-{r:05d}.safetensors", r)
                                                            for r in range(world)], ("optimizer/index.json", 0)]
    # One dataloader position per tensor-parallel group, written by its lowest rank.
    assert files["dataloader"] == [(f"dataloader/tensor_parallel-{g:05d}.json", g * tp) for g in range(dp)]
    assert files["scheduler"] == [("scheduler.json", 0)]
    assert sorted({rank for _, rank in files["rng"]}) == list(range(world))
    assert manifest.topology["groups"] == {"tensor_parallel": [list(range(g * tp, g * tp + tp)) for g in range(dp)],
                                           "data_parallel": [list(range(t, world, tp)) for t in range(tp)]}


def _checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's full model and optimizer tensors, named as the scripts' dumps name them."""
    checkpoint = SharingCheckpointIO().load_checkpoint(path)
    tensors = {f"model.{k[len('net.'):]}": v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    ((optimizer, ), ) = [checkpoint["optimizer_states"]]
    tensors.update({f"optimizer.{k.replace('.net.', '.', 1)}": v for k, v in optimizer.items()
                    if isinstance(v, torch.Tensor)})
    return tensors


def _assert_loaded(dump: Path, expected: dict[str, torch.Tensor]) -> None:
    loaded = load_file(dump)
    assert loaded.keys() == expected.keys(), dump
    for key in expected:
        assert torch.equal(loaded[key], expected[key]), f"{dump.name}: {key}"


def _results(out: Path, ranks: int) -> list[dict[str, Any]]:
    return [json.loads((out / f"result-rank{r}.json").read_text()) for r in range(ranks)]


def test_layout_changes_ddp_one_device_and_load_from_checkpoint(runs: dict[str, Path], tmp_path: Path) -> None:
    from_2 = runs["fsdp-2"] / "checkpoints" / "epoch=0-step=6.ckpt"
    from_4 = runs["fsdp-tp-2x2"] / "checkpoints" / "epoch=0-step=6.ckpt"
    common = ["--max-steps", "6"]
    _torchrun(4, tmp_path / "to-4.log", "--out", str(tmp_path / "to-4"), "--load", str(from_2), "--dp", "2",
              "--tp", "2", *common)
    run([SCRIPT, "--out", str(tmp_path / "to-1"), "--load", str(from_4), "--into", "ddp", "--single-device",
         "--save-ddp", *common], tmp_path / "to-1.log", timeout=240)
    # The one-device DDP run saved SharingStrategy's checkpoint of the same state: it loads into FSDP2 over 2.
    _torchrun(2, tmp_path / "to-2.log", "--out", str(tmp_path / "to-2"), "--load", str(from_4), "--dp", "2",
              "--into", "mp", "ddp", "--load-ddp", str(tmp_path / "to-1" / "ddp.ckpt"), "--refusals", "--extras",
              *common)

    expected_2, expected_4 = _checkpoint_tensors(from_2), _checkpoint_tensors(from_4)
    for rank in range(4):
        _assert_loaded(tmp_path / "to-4" / f"loaded-mp-rank{rank}.safetensors", expected_2)
    for rank in range(2):
        for into in ("mp", "ddp", "mp-from-ddp"):
            _assert_loaded(tmp_path / "to-2" / f"loaded-{into}-rank{rank}.safetensors", expected_4)
    _assert_loaded(tmp_path / "to-1" / "loaded-ddp-rank0.safetensors", expected_4)

    to_4, to_2, (to_1,) = _results(tmp_path / "to-4", 4), _results(tmp_path / "to-2", 2), _results(tmp_path / "to-1", 1)
    from_ddp = CheckpointManifest.load(tmp_path / "to-1" / "ddp.ckpt").components
    assert (from_ddp["model"].sharing_pattern, from_ddp["optimizer"].sharing_pattern) == ("replicated", "replicated")
    loads = [r["mp"] for r in to_4 + to_2] + [r["ddp"] for r in [*to_2, to_1]] + [r["mp-from-ddp"] for r in to_2]
    for result in loads:
        assert result["global_step"] == 6 and result["scheduler"]["last_epoch"] == 6
        assert result["optimizer"]["param_groups.0.weight.lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(
            math.pi * 2 / 8)))
    # strict (the default): per-rank state without an on_resize policy (the module's own loss_mean) does not map
    # onto another layout; the error says so. The built-ins resize (the data position is the GLOBAL sampler's).
    assert "component 'loss_mean' is PER_RANK and it was saved at world_size=2; this run has world_size=4" \
        in to_4[0]["mp"]["strict_error"]
    assert "load with strict=False to skip it" in to_4[0]["mp"]["strict_error"]
    for result in (to_2[1]["ddp"], to_1["ddp"]):
        assert (f"{from_4}: component 'dataloader' was saved PER_GROUP over the process group 'tensor_parallel', "
                "which this run does not have (its groups: none); load with strict=False to skip it (it keeps its "
                "current value), or provide that group in configure_process_groups()") in result["strict_error"]

    # The silent-ignore trap, word for word.
    assert to_2[0]["model_parallel_with_io"] == to_2[1]["model_parallel_with_io"] == (
        "ComponentDeclarationError: SharingCheckpointIO was passed to ModelParallelStrategy, whose save_checkpoint "
        "writes its own distributed checkpoint without calling the CheckpointIO plugin: none of your checkpoints "
        "would be lightning_sharing ones. Use strategy=SharingModelParallelStrategy(data_parallel_size=..., "
        "tensor_parallel_size=...) (or strategy=\"sharing_model_parallel\") with fully_shard / tensor parallelism "
        "in configure_model(), and drop SharingCheckpointIO from plugins")
    assert to_2[0]["dtensor_under_ddp"] == (
        "ComponentDeclarationError: SharingStrategy is DDP and cannot train a module whose parameters are DTensors "
        "(FSDP2 fully_shard or tensor parallelism, e.g. ['net.0.weight', 'net.0.bias', 'net.3.weight']): use "
        "strategy=SharingModelParallelStrategy(data_parallel_size=..., tensor_parallel_size=...) (or "
        "strategy=\"sharing_model_parallel\") and parallelize the model in configure_model() on self.device_mesh")

    # load_from_checkpoint: a plain module with the full weights (this process; no process group).
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from lightning_model_parallel import TinyParallelRegression, make_dataloader
    finally:
        sys.path.remove(str(ROOT / "examples"))
    module = TinyParallelRegression.load_from_checkpoint(from_4)
    assert dict(module.hparams) == {"lr": 0.05, "warmup": 4, "total": STEPS}
    weights = {f"model.{k}": v for k, v in module.net.state_dict().items()}
    assert weights.keys() == {k for k in expected_4 if k.startswith("model.")}
    assert all(torch.equal(weights[k], expected_4[k]) for k in weights)

    # validate(ckpt_path=...) at 2 processes evaluated the checkpoint's model: the mean squared error of all batches.
    x, y = make_dataloader().dataset.tensors
    module.eval()
    with torch.no_grad():
        mse = float(torch.nn.functional.mse_loss(module.net(x), y))
    assert to_2[0]["validate"] == {"val_loss": pytest.approx(mse, rel=1e-5), "ckpt_path": str(from_4)}
    # trainer.save_checkpoint(weights_only=True): no optimizer, scheduler or loader position.
    assert sorted(CheckpointManifest.load(tmp_path / "to-2" / "weights.ckpt").components) == [
        "loss_mean", "model", "rng", "trainer"]
    # async_save with background staging and top-1 retention: step 2 removed once step 4 had committed; the step-4
    # checkpoint holds the state after step 4, though step 5's optimizer step followed it at once.
    assert to_2[0]["async"] == ["epoch=0-step=4.ckpt"]
    async_step4 = tmp_path / "to-2" / "async" / "epoch=0-step=4.ckpt"
    assert CheckpointManifest.load(async_step4).step == 4
    for rank in range(2):
        _assert_loaded(tmp_path / "to-2" / f"async-step4-rank{rank}.safetensors", _checkpoint_tensors(async_step4))


@pytest.mark.parametrize("name", ["ModelParallelStrategy", "FSDPStrategy"])
def test_sharing_checkpoint_io_is_refused_where_it_would_be_ignored(name: str) -> None:
    """The check runs first in the strategy's setup_environment (before any process group or GPU check), so it is
    exercised here in this process; the Trainer path of ModelParallelStrategy is checked word for word above.
    (FSDPStrategy needs a GPU for a Trainer to build it: Lightning refuses it on CPU before our check.)"""
    import lightning.pytorch.strategies as strategies

    strategy = getattr(strategies, name)()
    strategy.checkpoint_io = SharingCheckpointIO()  # what the Trainer does with plugins=[SharingCheckpointIO()]
    expected = (rf"^SharingCheckpointIO was passed to {name}, whose save_checkpoint writes its own distributed "
                r"checkpoint without calling the CheckpointIO plugin")
    with pytest.raises(ComponentDeclarationError, match=expected):
        strategy.setup_environment()


def test_killed_run_resumes_from_the_local_tier_bit_exact(runs: dict[str, Path], tmp_path: Path) -> None:
    """With ``local_tier=LocalTier(..., every_n_steps=2)``, the run killed at step 8 resumes from local step 8 (newer
    than the persistent step 6): each rank gets its SHARDED pieces back as DTensors and ends equal to the reference."""
    dp, tp = LAYOUTS["fsdp-tp-2x2"]
    killed = tmp_path / "local-tier"
    _example(killed, dp, tp, "--kill-at-step", str(KILL_AT), "--local-every", "2", expect=-9)
    output = _example(killed, dp, tp, "--resume", "--local-every", "2")
    assert "restored step 8 from the local tier (own copies)" in output, output[-4000:]
    reference = runs["fsdp-tp-2x2-reference"]
    for rank in range(dp * tp):
        expected = load_file(reference / f"final-rank{rank}.safetensors")
        actual = load_file(killed / f"final-rank{rank}.safetensors")
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"rank {rank}: {key} differs after the local resume"
        assert json.loads((killed / f"final-rank{rank}.json").read_text()) == json.loads(
            (reference / f"final-rank{rank}.json").read_text())

"""End-to-end tests of examples/torchrun_fsdp_tp.py and examples/torchrun_pipeline.py under real torchrun launches.

Each example runs three times on 4 processes (gloo, CPU): uninterrupted; killed (FSDP x TP: SIGKILL of rank 1
in the middle of its second save; pipeline: SIGKILL of every rank after step 3); resumed from the newest complete
checkpoint. The resumed run must end bit-identical to the uninterrupted one. The uninterrupted run's
checkpoint is then checked several ways in this process: the files each rank wrote, a load into the unsplit
model in one process, the Hugging Face index and exports. Every launch has a timeout and its exit status is checked.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import launch

from lightning_sharing import (
    CheckpointCoordinator,
    CheckpointManifest,
    OptimizerState,
    SharingPattern,
    StateComponent,
    find_latest_checkpoint,
)
from lightning_sharing.cli import main

TIMEOUT_S = 180
STEPS, SAVE_EVERY = 6, 2


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, launch.ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchrun(example: str, out: Path, tag: str, *extra: str, env: dict[str, str] | None = None,
              expect_success: bool = True) -> str:
    log = out.parent / f"{out.name}-{tag}.log"
    args = ["-m", "torch.distributed.run", "--nproc_per_node=4", f"--master_port={launch.free_port()}",
            str(launch.ROOT / "examples" / f"{example}.py"), "--out", str(out), "--steps", str(STEPS),
            "--save-every", str(SAVE_EVERY), *extra]
    proc = launch.start(args, log, env)
    (code,) = launch.wait([proc], [log], TIMEOUT_S)
    launch.kill_tree(proc.pid)
    output = log.read_text()
    if expect_success:
        assert code == 0, f"torchrun exited with {code} ({log}):\n{output[-6000:]}"
    else:
        assert code != 0, f"torchrun was expected to fail but exited with 0 ({log}):\n{output[-6000:]}"
    return output


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def _equal_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    return sorted(set(actual) ^ set(expected)) + [k for k in sorted(set(actual) & set(expected))
                                                  if not torch.equal(actual[k], expected[k])]


def _read_hf(directory: Path, index_name: str = "model.safetensors.index.json") -> dict[str, torch.Tensor]:
    index = json.loads((directory / index_name).read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update({k: v for k, v in load_file(directory / file).items() if k in index["weight_map"]})
    assert sorted(tensors) == sorted(index["weight_map"])
    return tensors


def _bytes_per_rank(checkpoint: Path) -> dict[int, int]:
    totals: dict[int, int] = {}
    for entry in CheckpointManifest.load(checkpoint).all_files():
        totals[entry.rank] = totals.get(entry.rank, 0) + entry.size
    return dict(sorted(totals.items()))


def _same_checkpoint_files(a: Path, b: Path) -> None:
    assert _files(a) == _files(b)
    for rel in _files(a):
        if rel != "checkpoint_manifest.json":  # the manifest records the time of the save
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs after resume"


# --------------------------------------------------------------------------- FSDP2 x TP


@pytest.fixture(scope="module")
def fsdp_tp(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("fsdp_tp")
    reference, resumed = root / "reference", root / "resumed"
    runs = {"reference": reference, "resumed": resumed}
    runs["reference_output"] = _torchrun("torchrun_fsdp_tp", reference, "full", "--export-hf")
    _torchrun("torchrun_fsdp_tp", resumed, "killed", env={"LIGHTNING_SHARING_FAULTS": "save:written@1:kill#2"},
              expect_success=False)
    runs["after_kill"] = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    runs["latest_after_kill"] = find_latest_checkpoint(resumed / "checkpoints")
    runs["resumed_output"] = _torchrun("torchrun_fsdp_tp", resumed, "resume", "--resume")
    return runs


def _final(output: str) -> str:
    found = re.findall(r"^FINAL ([0-9a-f]{64})$", output, flags=re.MULTILINE)
    assert len(found) == 1, output[-3000:]
    return found[0]


def test_fsdp_tp_killed_mid_save_keeps_the_previous_checkpoint_and_resumes_bit_exact(fsdp_tp: dict) -> None:
    # Rank 1 died after writing its files of the step-4 save, before the commit: step 4 never appeared,
    # only the staging directory is left (removed by the next save).
    names = fsdp_tp["after_kill"]
    assert [n for n in names if not n.startswith(".")] == ["step=2.ckpt"]
    assert all(n.startswith(".staging-") for n in names if n.startswith("."))
    assert fsdp_tp["latest_after_kill"].name == "step=2.ckpt"
    resumed, reference = fsdp_tp["resumed"], fsdp_tp["reference"]
    assert f"resumed from {resumed / 'checkpoints' / 'step=2.ckpt'} at step 2" in fsdp_tp["resumed_output"]
    assert _final(fsdp_tp["resumed_output"]) == _final(fsdp_tp["reference_output"])
    for name in ("final-model.safetensors", "final-optimizer.safetensors"):
        assert _equal_tensors(load_file(resumed / name), load_file(reference / name)) == [], name
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step=2.ckpt", "step=4.ckpt",
                                                                            "step=6.ckpt"]
    _same_checkpoint_files(reference / "checkpoints" / "step=6.ckpt", resumed / "checkpoints" / "step=6.ckpt")


def test_fsdp_tp_checkpoint_files_per_rank(fsdp_tp: dict) -> None:
    checkpoint = fsdp_tp["reference"] / "checkpoints" / "step=6.ckpt"
    manifest = CheckpointManifest.load(checkpoint)
    writers = {f.path: f.rank for f in manifest.all_files()}
    for key in ("model", "optimizer"):
        assert {r: writers[f"{key}/chunks-{r:05d}.safetensors"] for r in range(4)} == {r: r for r in range(4)}
        assert writers[f"{key}/index.json"] == 0
    print("FSDP x TP step=6 bytes written per rank:", _bytes_per_rank(checkpoint))
    assert main(["verify", str(checkpoint)]) == 0


def test_fsdp_tp_checkpoint_into_one_plain_process_and_the_hf_export(fsdp_tp: dict) -> None:
    example = _example("torchrun_fsdp_tp")
    reference = fsdp_tp["reference"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(example.FEATURES, example.HIDDEN), torch.nn.ReLU(),
                                torch.nn.Linear(example.HIDDEN, example.FEATURES), torch.nn.ReLU(),
                                torch.nn.Linear(example.FEATURES, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    CheckpointCoordinator([
        StateComponent("model", model, SharingPattern.SHARDED),
        StateComponent("optimizer", OptimizerState(model, optimizer), SharingPattern.SHARDED),
    ]).load_checkpoint(reference / "checkpoints" / "step=6.ckpt", strict=False)
    final_model = load_file(reference / "final-model.safetensors")
    assert _equal_tensors(model.state_dict(), final_model) == []
    state = {k: v for k, v in OptimizerState(model, optimizer).state_dict().items() if isinstance(v, torch.Tensor)}
    assert _equal_tensors(state, load_file(reference / "final-optimizer.safetensors")) == []
    assert optimizer.param_groups[0]["lr"] == 1e-2
    # The export written at the last save, its files shared among the 4 ranks.
    exported = _read_hf(reference / "hf")
    assert _equal_tensors(exported, final_model) == []
    assert len(list((reference / "hf").glob("model-*.safetensors"))) >= 2


# --------------------------------------------------------------------------- pipeline parallel


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("pipeline")
    reference, resumed = root / "reference", root / "resumed"
    runs = {"reference": reference, "resumed": resumed}
    _torchrun("torchrun_pipeline", reference, "full")
    _torchrun("torchrun_pipeline", resumed, "killed", "--kill-after", "3", expect_success=False)
    runs["after_kill"] = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    runs["resumed_output"] = _torchrun("torchrun_pipeline", resumed, "resume", "--resume")
    return runs


def _stage_finals(out: Path) -> dict[int, dict[str, torch.Tensor]]:
    return {rank: load_file(out / f"final-rank{rank}.safetensors") for rank in range(4)}


def test_pipeline_resumes_bit_exact_after_sigkill(pipeline: dict) -> None:
    assert pipeline["after_kill"] == ["step=2.ckpt"]  # killed after step 3: step 2 is the newest
    resumed = pipeline["resumed"]
    assert f"resumed from {resumed / 'checkpoints' / 'step=2.ckpt'} at step 2" in pipeline["resumed_output"]
    expected, actual = _stage_finals(pipeline["reference"]), _stage_finals(resumed)
    for rank in range(4):
        assert _equal_tensors(actual[rank], expected[rank]) == [], f"rank {rank} differs after resume"
    # The two replicas of a stage stayed identical; the two stages hold different tensors.
    assert _equal_tensors(expected[0], expected[2]) == [] and _equal_tensors(expected[1], expected[3]) == []
    assert not set(expected[0]) & set(expected[1])
    _same_checkpoint_files(pipeline["reference"] / "checkpoints" / "step=6.ckpt",
                           resumed / "checkpoints" / "step=6.ckpt")


def test_pipeline_stages_written_once_spread_over_their_replicas(pipeline: dict) -> None:
    checkpoint = pipeline["reference"] / "checkpoints" / "step=6.ckpt"
    index = json.loads((checkpoint / "model" / "index.json").read_text())
    writers = {name: [c["writer"] for c in t["chunks"]] for name, t in index["tensors"].items()}
    # Stage 0 (layers 0-1) is held by ranks 0 and 2, stage 1 by ranks 1 and 3: each tensor once, by a holder,
    # and both replicas of a stage write.
    assert {w for n, ws in writers.items() for w in ws if n.split(".")[1] in "01"} == {0, 2}
    assert {w for n, ws in writers.items() for w in ws if n.split(".")[1] in "23"} == {1, 3}
    assert all(len(ws) == 1 for ws in writers.values())
    manifest = CheckpointManifest.load(checkpoint)
    assert manifest.components["model"].group_name == "dp"
    assert {f.path for f in manifest.components["optimizer"].files} >= {"optimizer/dp-00000.json",
                                                                        "optimizer/dp-00001.json"}
    print("pipeline step=6 bytes written per rank:", _bytes_per_rank(checkpoint))


def test_pipeline_hf_index_covers_every_stage_and_the_unsplit_model_loads(pipeline: dict, tmp_path: Path) -> None:
    reference = pipeline["reference"]
    checkpoint = reference / "checkpoints" / "step=6.ckpt"
    finals = _stage_finals(reference)
    weights = {k.removeprefix("model."): v for rank in (0, 1) for k, v in finals[rank].items()
               if k.startswith("model.")}
    assert sorted(weights) == sorted(f"layers.{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert _equal_tensors(_read_hf(checkpoint), weights) == []  # with plain safetensors, no lightning_sharing
    assert main(["export", str(checkpoint), str(tmp_path / "hf")]) == 0
    assert _equal_tensors(_read_hf(tmp_path / "hf"), weights) == []

    example = _example("torchrun_pipeline")
    torch.manual_seed(99)
    model = example.Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    progress = example.Progress()
    components = [c for c in example.declare(model, optimizer, progress, None) if c.key != "rng"]
    result = CheckpointCoordinator(components).load_checkpoint(checkpoint, strict=False)
    assert result.loaded == ["model", "optimizer", "progress"] and list(result.skipped) == ["rng"]
    assert progress.step == STEPS
    unsplit = example.final_state(model, optimizer)
    assert _equal_tensors(unsplit, {**finals[0], **finals[1]}) == []

"""FabricSharingModelParallelStrategy: fabric.save/fabric.load of an FSDP2 module and its AdamW, as SHARDED state.

tests/scripts/fabric_model_parallel.py on 2 processes saves at step 3 of 6, then a differently initialised module
loads that checkpoint and takes steps 4-6 again: weights and optimizer state (full tensors) equal the first run's.
Then one process loads the same checkpoint (another world size): it holds the step-3 state. Last, a
FabricSharingStrategy (DDP) checkpoint loads into FSDP2 over 2 processes: equal to the state it saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from support.launch import ROOT, free_port, run

from lightning_sharing import CheckpointManifest

SCRIPT = str(ROOT / "tests" / "scripts" / "fabric_model_parallel.py")


def _assert_equal(expected: Path, actual: Path) -> None:
    left, right = load_file(expected), load_file(actual)
    assert left.keys() == right.keys() and {"model.0.weight", "optimizer.state.0.weight.exp_avg"} <= set(left)
    for key in left:
        assert torch.equal(left[key], right[key]), f"{actual.name}: {key}"


def test_fabric_round_trip_and_resharded_load(tmp_path: Path) -> None:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    run([*launcher, SCRIPT, "--out", str(tmp_path), "--phase", "train"], tmp_path / "train.log", timeout=240)
    run([SCRIPT, "--out", str(tmp_path), "--phase", "reshard"], tmp_path / "reshard.log", timeout=240)

    results = [json.loads((tmp_path / f"train-rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(results):
        assert result["remainder"] == {} and result["step"] == 3
        _assert_equal(tmp_path / f"step6-rank{rank}.safetensors", tmp_path / f"resumed6-rank{rank}.safetensors")
    assert not torch.equal(load_file(tmp_path / "step3-rank0.safetensors")["model.0.weight"],
                           load_file(tmp_path / "step6-rank0.safetensors")["model.0.weight"])
    assert results[0]["patterns"] == {"rng": "per_rank", "model": "sharded", "optimizer": "sharded", "extra": "global"}
    files = results[0]["files"]
    assert files["model"] == [["model/chunks-00000.safetensors", 0], ["model/chunks-00001.safetensors", 1],
                              ["model/index.json", 0]]
    assert [path for path, _ in files["optimizer"]] == ["optimizer.json", "optimizer/chunks-00000.safetensors",
                                                        "optimizer/chunks-00001.safetensors", "optimizer/index.json"]

    # FabricSharingStrategy's checkpoint (model and optimizer REPLICATED, whole) into FSDP2 over the same 2 processes.
    for phase in ("ddp", "from-ddp"):
        run([*launcher[:-1], f"--master_port={free_port()}", SCRIPT, "--out", str(tmp_path), "--phase", phase],
            tmp_path / f"{phase}.log", timeout=240)
    patterns = {k: c.sharing_pattern for k, c in CheckpointManifest.load(tmp_path / "ddp.ckpt").components.items()}
    assert patterns["model"] == patterns["optimizer"] == "replicated"
    for rank in range(2):
        assert json.loads((tmp_path / f"from-ddp-rank{rank}.json").read_text()) == {"remainder": {}, "step": 3}
        _assert_equal(tmp_path / f"ddp3-rank{rank}.safetensors", tmp_path / f"from-ddp-rank{rank}.safetensors")

    resharded = json.loads((tmp_path / "reshard-rank0.json").read_text())
    # One process: the per-rank RNG of two does not map (strict=False skips it); model and optimizer reshard.
    assert resharded == {"remainder": {"step": 3}, "skipped": ["rng"]}
    _assert_equal(tmp_path / "step3-rank0.safetensors", tmp_path / "reshard-rank0.safetensors")

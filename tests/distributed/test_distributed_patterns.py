"""The five sharing patterns on real gloo process groups: who writes which file, who reads what."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from support.dist_harness import WorkerFailed, run_distributed
from support.statefuls import Box

# 4 ranks laid out as mesh[dp][pp] = dp * 2 + pp: dp groups {0,2},{1,3}; pp groups {0,1},{2,3}.
DP_INSTANCES = [[0, 2], [1, 3]]
PP_INSTANCES = [[0, 1], [2, 3]]


def _stem(path: str) -> str:
    return re.fullmatch(r"(.*?)(\.json|\.safetensors\.index\.json|-\d{5}-of-\d{5}\.safetensors)", path).group(1)


def _instance(rank: int, instances: list[list[int]]) -> int:
    return next(i for i, members in enumerate(instances) if rank in members)


def _components(rank: int):
    from lightning_sharing import SharingPattern, StateComponent

    dp, pp = _instance(rank, DP_INSTANCES), _instance(rank, PP_INSTANCES)
    boxes = {
        # GLOBAL state may differ per rank before the save: rank 0's copy is the one that counts.
        "progress": Box(f"rank{rank}", torch.full((3,), float(rank))),
        "weights": Box("same", torch.arange(3.0)),
        "rng": Box(f"rank{rank}", torch.full((3,), 10.0 + rank)),
        "data": Box(f"dp{dp}", torch.full((3,), 100.0 + dp)),
        "stage": Box(f"pp{pp}", torch.full((3,), 200.0 + pp)),
    }
    components = [
        StateComponent("progress", boxes["progress"], SharingPattern.GLOBAL),
        StateComponent("weights", boxes["weights"], SharingPattern.REPLICATED, validate_replication=True,
                       validation_level="tensor"),
        StateComponent("rng", boxes["rng"], SharingPattern.PER_RANK),
        StateComponent("data", boxes["data"], SharingPattern.PER_GROUP, process_group_name="dp"),
        StateComponent("stage", boxes["stage"], SharingPattern.PER_GROUP, process_group_name="pp"),
    ]
    return components, boxes


def _record_writes(formats, log: list[str]):
    """Wrap every copy format's writer, which the save calls, so each rank records the stems it wrote files of."""
    for fmt in formats:
        def recording(store, root, plan, rank, original=fmt.write):
            if plan.jobs:
                log.append(plan.stem)
            return original(store, root, plan, rank)

        fmt.write = recording


def _dp_pp_worker(rank: int, world_size: int, root: str, use_mesh: bool):
    import torch.distributed as dist

    from lightning_sharing import CheckpointCoordinator
    from lightning_sharing.engine.formats import all_formats

    if use_mesh:
        from torch.distributed.device_mesh import init_device_mesh

        groups = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    else:
        # new_group is collective: every rank creates every group, then keeps its own.
        dp_groups = [dist.new_group(members) for members in DP_INSTANCES]
        pp_groups = [dist.new_group(members) for members in PP_INSTANCES]
        groups = {"dp": dp_groups[_instance(rank, DP_INSTANCES)], "pp": pp_groups[_instance(rank, PP_INSTANCES)]}
    components, boxes = _components(rank)
    written: list[str] = []
    _record_writes(all_formats(), written)
    coordinator = CheckpointCoordinator(components, process_groups=groups)
    path = Path(root) / "step=1.ckpt"
    coordinator.save_checkpoint(path, step=1)

    originals = {key: (box.label, box.values.clone()) for key, box in boxes.items()}
    for box in boxes.values():
        box.label, box.values = "wiped", torch.zeros(3)
    result = coordinator.load_checkpoint(path)
    loaded = {key: (box.label, box.values) for key, box in boxes.items()}
    return {"written": sorted(written), "loaded": loaded, "originals": originals, "result": result.loaded}


@pytest.mark.parametrize("use_mesh", [False, True], ids=["dict-of-groups", "device-mesh"])
def test_dp_x_pp_writes_and_reads(tmp_path: Path, use_mesh: bool) -> None:
    results = run_distributed(_dp_pp_worker, 4, str(tmp_path), use_mesh)

    expected_writes = {
        0: ["data/dp-00000", "progress", "rng/rank-00000", "stage/pp-00000", "weights"],
        1: ["data/dp-00001", "rng/rank-00001"],
        2: ["rng/rank-00002", "stage/pp-00001"],
        3: ["rng/rank-00003"],
    }
    assert {r: res["written"] for r, res in enumerate(results)} == expected_writes

    # Each copy's files in the manifest carry the rank that wrote them, matching the above.
    manifest = json.loads((tmp_path / "step=1.ckpt" / "checkpoint_manifest.json").read_text())
    assert manifest["topology"]["groups"] == {"dp": DP_INSTANCES, "pp": PP_INSTANCES}
    for comp in manifest["components"].values():
        for entry in comp["files"]:
            assert _stem(entry["path"]) in expected_writes[entry["rank"]], entry
    assert manifest["components"]["data"]["ranks"] == [0, 1]
    assert manifest["components"]["stage"]["ranks"] == [0, 2]
    assert manifest["components"]["rng"]["ranks"] == [0, 1, 2, 3]

    for rank, res in enumerate(results):
        loaded, originals = res["loaded"], res["originals"]
        assert res["result"] == ["progress", "weights", "rng", "data", "stage"]
        # GLOBAL: rank 0's copy, on every rank.
        assert loaded["progress"][0] == "rank0"
        assert torch.equal(loaded["progress"][1], torch.zeros(3))
        # REPLICATED, PER_RANK, PER_GROUP: exactly this rank's own state.
        for key in ("weights", "rng", "data", "stage"):
            assert loaded[key][0] == originals[key][0], (rank, key)
            assert torch.equal(loaded[key][1], originals[key][1]), (rank, key)
        assert loaded["data"][0] == f"dp{_instance(rank, DP_INSTANCES)}"
        assert loaded["stage"][0] == f"pp{_instance(rank, PP_INSTANCES)}"


def _per_node_worker(rank: int, world_size: int, root: str, mode: str):
    import os

    from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent

    node = int(os.environ["GROUP_RANK"])
    cache = Box(f"node{node}", torch.full((2,), float(node)))
    coordinator = CheckpointCoordinator([StateComponent("cache", cache, SharingPattern.PER_NODE)])
    path = Path(root) / "nodes.ckpt"
    if mode == "save":
        coordinator.save_checkpoint(path)
        cache.label, cache.values = "wiped", torch.zeros(2)
    coordinator.load_checkpoint(path)
    return node, cache.label, cache.values


def test_per_node_one_file_per_node_read_by_that_node(tmp_path: Path) -> None:
    results = run_distributed(_per_node_worker, 4, str(tmp_path), "save", node_of_rank=[0, 0, 1, 1])
    assert [(n, label) for n, label, _ in results] == [(0, "node0"), (0, "node0"), (1, "node1"), (1, "node1")]
    for node, _, values in results:
        assert torch.equal(values, torch.full((2,), float(node)))
    manifest = json.loads((tmp_path / "nodes.ckpt" / "checkpoint_manifest.json").read_text())
    files = {(e["path"], e["rank"]) for e in manifest["components"]["cache"]["files"]}
    assert {_stem(p) for p, _ in files} == {"cache/node-00000", "cache/node-00001"}
    assert {r for p, r in files if p.startswith("cache/node-00000")} == {0}
    assert {r for p, r in files if p.startswith("cache/node-00001")} == {2}
    assert manifest["topology"]["nodes"] == [[0, 1], [2, 3]]

    # The same 4 ranks on one node is another topology: every rank refuses, naming both layouts.
    with pytest.raises(WorkerFailed) as failure:
        run_distributed(_per_node_worker, 4, str(tmp_path), "load")
    assert sorted(failure.value.errors) == [0, 1, 2, 3]
    for kind, message, _ in failure.value.errors.values():
        assert kind == "DistributedTopologyMismatchError"  # catchable as TopologyMismatchError
        assert "'cache'" in message
        assert "[[0, 1], [2, 3]]" in message and "[[0, 1, 2, 3]]" in message


def _resize_worker(rank: int, world_size: int, root: str, phase: str):
    from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent

    weights = Box("w", torch.arange(4.0) * 3)
    progress = Box(f"progress-from-{rank}", torch.tensor([float(rank)]))
    rng = Box(f"rng{rank}", torch.tensor([float(rank)]))
    components = [StateComponent("weights", weights, SharingPattern.REPLICATED),
                  StateComponent("progress", progress, SharingPattern.GLOBAL),
                  StateComponent("rng", rng, SharingPattern.PER_RANK)]
    path = Path(root) / "resize.ckpt"
    if phase == "save":
        CheckpointCoordinator(components).save_checkpoint(path)
        return None
    weights.values, progress.label = torch.zeros(4), "fresh"
    if phase == "strict":
        CheckpointCoordinator(components).load_checkpoint(path)
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("lightning_sharing").addHandler(handler)
    result = CheckpointCoordinator(components).load_checkpoint(path, strict=False)
    return result.loaded, result.skipped, weights.values, progress.label, rng.label, warnings


def test_global_and_replicated_load_at_another_world_size(tmp_path: Path) -> None:
    run_distributed(_resize_worker, 4, str(tmp_path), "save")

    with pytest.raises(WorkerFailed) as failure:
        run_distributed(_resize_worker, 2, str(tmp_path), "strict")
    for _, message, _ in failure.value.errors.values():
        assert "'rng' is PER_RANK" in message and "world_size=4" in message and "world_size=2" in message
    assert sorted(failure.value.errors) == [0, 1]

    results = run_distributed(_resize_worker, 2, str(tmp_path), "lenient")
    # The skip is the same on every rank: it is logged once, by rank 0.
    assert [[w for w in result[-1] if "skipped component 'rng'" in w] for result in results] == [
        [f"checkpoint {tmp_path / 'resize.ckpt'}: skipped component 'rng' (topology changed: it was saved at "
         "world_size=4; this run has world_size=2)"], []]
    for rank, (loaded, skipped, weights, progress_label, rng_label, _) in enumerate(results):
        assert loaded == ["weights", "progress"]
        assert list(skipped) == ["rng"] and "topology changed" in skipped["rng"]
        assert torch.equal(weights, torch.arange(4.0) * 3)
        assert progress_label == "progress-from-0"
        assert rng_label == f"rng{rank}"  # untouched: not loaded from another rank's file


def _pipeline_worker(rank: int, world_size: int, root: str):
    from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent

    torch.manual_seed(rank)
    # Each rank holds one pipeline stage; parameter names are disjoint across ranks.
    stage = torch.nn.ModuleDict({f"layers_{rank}": torch.nn.Linear(4, 4)})
    CheckpointCoordinator([StateComponent("model", stage, SharingPattern.PER_RANK)]).save_checkpoint(
        Path(root) / "pipe.ckpt")
    return {k: v.clone() for k, v in stage.state_dict().items()}


def test_pipeline_stages_merge_into_one_hugging_face_index(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    stages = run_distributed(_pipeline_worker, 2, str(tmp_path))
    root = tmp_path / "pipe.ckpt"
    index = json.loads((root / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "layers_0.weight": "model/rank-00000-00001-of-00001.safetensors",
        "layers_0.bias": "model/rank-00000-00001-of-00001.safetensors",
        "layers_1.weight": "model/rank-00001-00001-of-00001.safetensors",
        "layers_1.bias": "model/rank-00001-00001-of-00001.safetensors",
    }
    # The whole model loads from the index alone, with plain safetensors.
    whole = {}
    for file in sorted(set(index["weight_map"].values())):
        whole.update(load_file(root / file))
    expected = {**stages[0], **stages[1]}
    assert whole.keys() == expected.keys() and all(torch.equal(whole[k], expected[k]) for k in expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())

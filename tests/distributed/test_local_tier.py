"""The local tier on real processes: two simulated nodes x two ranks (gloo), one job checked several ways.

Every scenario restores into live objects whose state was changed after the save, and compares every component
bit for bit (``torch.equal``) with a snapshot taken when the chosen step was saved.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from support.compare import same_state
from support.dist_harness import run_distributed
from support.statefuls import Box

NODES = [0, 0, 1, 1]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _capture() -> _Capture:
    handler = _Capture()
    logger = logging.getLogger("lightning_sharing")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def _setup(rank: int, on_resize: str = "error"):
    from lightning_sharing import RNGState, SharingPattern, StateComponent

    torch.manual_seed(1234)  # the same model and optimizer on every rank (REPLICATED)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # a different random stream on every rank (PER_RANK)
    node = int(os.environ["GROUP_RANK"])
    progress, noise, cache = Box("progress"), Box(f"rank{rank}"), Box(f"node{node}", torch.full((3,), float(node)))
    components = [
        StateComponent("progress", progress, SharingPattern.GLOBAL),
        StateComponent("model", model, SharingPattern.REPLICATED),
        StateComponent("optimizer", optimizer, SharingPattern.REPLICATED),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK, on_resize="reseed" if on_resize != "error"
                       else "error"),
        StateComponent("noise", noise, SharingPattern.PER_RANK, on_resize=on_resize),
        StateComponent("cache", cache, SharingPattern.PER_NODE, on_resize=on_resize),
    ]

    def train(step: int) -> None:
        data = torch.arange(8.0).reshape(2, 4) / (step + 1)  # the same on every rank: replicas stay equal
        optimizer.zero_grad()
        model(data).pow(2).sum().backward()
        optimizer.step()
        progress.values = torch.full((3,), float(step))
        noise.values = noise.values + torch.rand(3)  # consumes this rank's torch RNG
        cache.values = cache.values + 1

    return components, train


def _snapshot(components) -> dict[str, Any]:
    import copy

    return {c.key: copy.deepcopy(c.stateful.state_dict()) for c in components}


def _worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    import torch.distributed as dist

    from lightning_sharing import CheckpointCoordinator, DistributedCheckpointError, LocalTier

    logs = _capture()
    root_path = Path(root)
    local, ckpts = root_path / "local", root_path / "ckpts"
    components, train = _setup(rank)
    coordinator = CheckpointCoordinator(components, local_tier=LocalTier(str(local / "{node}"), replicas=1, keep=2))
    checks: dict[str, Any] = {}

    def restore_and_compare(expected: dict[str, Any], name: str) -> int | None:
        train(99)  # the live state moves on (the "crash" happens later)
        start = len(logs.lines)
        step = coordinator.restore(ckpts)
        checks[name] = (step, {k: same_state(v, expected[k]) for k, v in _snapshot(components).items()},
                        logs.lines[start:])
        return step

    for step in (1, 2):
        train(step)
    coordinator.save_checkpoint(ckpts / "step=2.ckpt", step=2)
    persistent_2 = _snapshot(components)
    snaps = {}
    for step in (3, 4, 5):
        train(step)
        coordinator.save_local(step)
        snaps[step] = _snapshot(components)
    checks["files"] = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    checks["parts"] = [set(load_file(local / "0" / "own" / "step_5" / f"shared-0000{j}.safetensors")) for j in (0, 1)]

    # 1. every rank's own copy (the newest of both tiers: local 5 > persistent 2)
    restore_and_compare(snaps[5], "own")
    # 2. node 1's disk is gone: its ranks get their files from node 0's replicas
    dist.barrier()
    if rank == 0:
        shutil.rmtree(local / "1")
    dist.barrier()
    restore_and_compare(snaps[5], "wiped node 1")
    # 3. corrupt files: rank 1's own copy of step 6 fails its checksum, node 1's replica of it is used; node 1's
    # own copy of the shared part rank 3 wrote (which rank 2 reads too) fails, node 0's replica of it is used
    coordinator.save_local(6)
    snaps[6] = _snapshot(components)
    dist.barrier()
    if rank == 0:
        for target in (local / "0" / "own" / "step_6" / "rank-00001.safetensors",
                       local / "1" / "own" / "step_6" / "shared-00001.safetensors"):
            data = bytearray(target.read_bytes())
            data[-1] ^= 0xFF
            target.write_bytes(bytes(data))
    dist.barrier()
    restore_and_compare(snaps[6], "corrupt own")
    # 4. both nodes wiped: the persistent checkpoint of step 2
    dist.barrier()
    if rank == 0:
        shutil.rmtree(local)
    dist.barrier()
    restore_and_compare(persistent_2, "wiped both")
    # 5. a newer persistent checkpoint wins over an older local one; a newer local one over an older persistent one
    train(7)
    coordinator.save_local(7)
    train(8)
    coordinator.save_checkpoint(ckpts / "step=8.ckpt", step=8)
    snaps[8] = _snapshot(components)
    restore_and_compare(snaps[8], "persistent newer")
    coordinator.save_local(9)
    snaps[9] = _snapshot(components)
    restore_and_compare(snaps[9], "local newer")
    # 6. a full disk on node 1 (rank 2): the local save fails on every rank; the next persistent save is unaffected
    from lightning_sharing import _faults

    if rank == 2:
        os.environ[_faults.FAULTS_ENV] = f"local:write@2:enospc#{_faults._hits['local:write'] + 1}"
    try:
        coordinator.save_local(10)
        checks["disk full"] = "no error"
    except DistributedCheckpointError as exc:
        checks["disk full"] = str(exc)
    os.environ.pop(_faults.FAULTS_ENV, None)
    checks["step 10 dirs"] = sorted(str(p.relative_to(local)) for p in local.rglob("step_10"))
    train(11)
    coordinator.save_checkpoint(ckpts / "step=11.ckpt", step=11)
    snaps[11] = _snapshot(components)
    restore_and_compare(snaps[11], "after disk full")
    checks["model 11"] = snaps[11]["model"]
    # 7. async_save: save_local returns once the state is staged; training changes it meanwhile; wait() completes it
    background = CheckpointCoordinator(components, async_save=True,
                                       local_tier=LocalTier(str(local / "{node}"), replicas=1, keep=2))
    train(12)
    background.save_local(12)
    snaps[12] = _snapshot(components)
    train(13)
    background.wait()
    restore_and_compare(snaps[12], "async")
    # 8. REPLICATED state whose shape differs between ranks (a misdeclaration): the split is refused alike on every
    # rank, each node's first rank writes the node's whole copy, and a restore gives each node that rank's state
    from lightning_sharing import SharingPattern, StateComponent

    odd = Box("odd", torch.arange(float(2 + rank % 2)))  # 2 values on ranks 0 and 2, 3 on ranks 1 and 3
    start = len(logs.lines)
    odd_tier = LocalTier(str(root_path / "odd" / "{node}"), replicas=1)
    odd_coordinator = CheckpointCoordinator([StateComponent("odd", odd, SharingPattern.REPLICATED)],
                                            local_tier=odd_tier)
    odd_coordinator.save_local(1)
    own_1 = root_path / "odd" / str(int(os.environ["GROUP_RANK"])) / "own" / "step_1"
    checks["odd parts"] = [sorted(load_file(own_1 / f"shared-0000{j}.safetensors")) for j in (0, 1)]
    odd.values = torch.zeros(1)
    checks["odd"] = (odd_coordinator.restore(root_path / "no checkpoints"), odd.values, logs.lines[start:])
    return checks


def _resized_worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    from lightning_sharing import CheckpointCoordinator, LocalTier

    logs = _capture()
    components, _ = _setup(rank, on_resize="drop")
    coordinator = CheckpointCoordinator(components, local_tier=LocalTier(str(Path(root) / "local" / "{node}")))
    step = coordinator.restore(Path(root) / "ckpts")
    return {"step": step, "model": components[1].stateful.state_dict(), "logs": logs.lines}


def test_local_tier_restores_from_own_copies_replicas_and_the_persistent_tier(tmp_path: Path) -> None:
    results = run_distributed(_worker, 4, str(tmp_path), node_of_rank=NODES, timeout=180)
    files = results[0]["files"]
    for node, other in ((0, 1), (1, 0)):
        for step in (4, 5):  # keep=2: step 3 is gone
            own, replica = f"{node}/own/step_{step}", f"{node}/replica_of_{other}/step_{step}"
            expected = [f"{own}/rank-{r:05d}.safetensors" for r in (2 * node, 2 * node + 1)]
            expected += [f"{replica}/rank-{r:05d}.safetensors" for r in (2 * other, 2 * other + 1)]
            expected += [f"{where}/{name}" for where in (own, replica)
                         for name in ("shared-00000.safetensors", "shared-00001.safetensors", "COMPLETE.json")]
            for name in expected:
                assert name in files, (name, files)
        assert not [f for f in files if "step_3" in f]
    # The node's copy of the REPLICATED state is spread over its two ranks: disjoint parts, both holding some of it;
    # the GLOBAL state and the structures are in part 0 (the node's first rank's).
    parts = results[0]["parts"]
    assert "__trees__" in parts[0] and "0/values" in parts[0], parts  # "progress" (GLOBAL) is component 0
    assert parts[1] and not parts[0] & parts[1] and all(name[:2] in ("1/", "2/") for name in parts[1]), parts
    assert {name[:2] for name in parts[0] | parts[1]} == {"0/", "1/", "2/", "__"}, parts
    expected_steps = {"own": 5, "wiped node 1": 5, "corrupt own": 6, "wiped both": 2, "persistent newer": 8,
                      "local newer": 9, "after disk full": 11, "async": 12}
    for rank, checks in enumerate(results):
        for name, step in expected_steps.items():
            got, same, _ = checks[name]
            assert got == step, (rank, name, got)
            assert all(same.values()), (rank, name, same)
        assert "rank 2" in checks["disk full"] and "No space left on device" in checks["disk full"], checks["disk full"]
        assert checks["step 10 dirs"] == [], checks["step 10 dirs"]
    logs = {name: "\n".join(results[0][name][2]) for name in expected_steps}
    assert "from the replica on rank 0 (node 0)" in logs["wiped node 1"], logs["wiped node 1"]
    assert "from the replica on rank 1 (node 0)" in logs["wiped node 1"], logs["wiped node 1"]
    rank1 = "\n".join(results[1]["corrupt own"][2])
    assert "step_6: rank-00001.safetensors has checksum" in rank1 and "the file is corrupt" in rank1, rank1
    assert "step 6 for rank 1 refused" in logs["corrupt own"], logs["corrupt own"]
    assert "rank 1 (node 0) takes step 6 from the replica on rank 3 (node 1)" in logs["corrupt own"]
    rank2 = "\n".join(results[2]["corrupt own"][2])
    assert "step_6: shared-00001.safetensors has checksum" in rank2, rank2  # a node-mate's part, read by rank 2
    assert "step 6 for rank 3 refused" in logs["corrupt own"], logs["corrupt own"]
    assert "rank 3 (node 1) takes step 6 from the replica on rank 1 (node 0)" in logs["corrupt own"]
    assert "restoring step 2 from the persistent checkpoint" in logs["wiped both"], logs["wiped both"]
    assert "restoring step 8 from the persistent checkpoint" in logs["persistent newer"]
    assert "restored step 9 from the local tier" in logs["local newer"]
    for rank, checks in enumerate(results):
        step, values, _ = checks["odd"]
        assert step == 1 and torch.equal(values, torch.arange(2.0)), (rank, step, values)  # the node's first rank's
        assert checks["odd parts"] == [["0/values", "__trees__"], []], checks["odd parts"]
    assert "hold REPLICATED tensors of different names, shapes or dtypes" in "\n".join(results[0]["odd"][2])

    # The same directories at another world size (one rank on each of two nodes): the tier is skipped, said once,
    # and the persistent checkpoint loads as load_checkpoint would (PER_RANK and PER_NODE state dropped, as declared).
    resized = run_distributed(_resized_worker, 2, str(tmp_path), node_of_rank=[0, 1], timeout=120)
    assert [r["step"] for r in resized] == [11, 11]  # the newest persistent checkpoint
    text = "\n".join(resized[0]["logs"])
    assert "local tier skipped: the local checkpoint" in text and "was saved at world_size=4" in text, text
    assert "restoring step 11 from the persistent checkpoint" in text, text
    for result in resized:
        assert same_state(result["model"], results[0]["model 11"])

"""The local tier with CUDA state under an NCCL default group: 1 rank, and 2 ranks on two simulated nodes where two
GPUs exist (each node's files copied to the other over the tier's own gloo group). Skipped without CUDA."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from support.compare import same_state
from support.dist_harness import run_distributed
from support.gpu import requires_cuda, requires_gpus

pytestmark = [requires_cuda, pytest.mark.skipif(not dist.is_nccl_available(), reason="this torch has no NCCL")]


def _job(rank: int, world: int, root: str, async_save: bool) -> dict[str, Any]:
    from lightning_sharing import CheckpointCoordinator, LocalTier, RNGState, SharingPattern, StateComponent

    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 16).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for param in model.parameters():  # elementwise updates only: bit-identical replicas whatever the kernels
        param.grad = torch.ones_like(param)
    optimizer.step()
    torch.cuda.manual_seed(100 + rank)
    components = [StateComponent("model", model, SharingPattern.REPLICATED),
                  StateComponent("optimizer", optimizer, SharingPattern.REPLICATED),
                  StateComponent("rng", RNGState(), SharingPattern.PER_RANK)]
    coordinator = CheckpointCoordinator(components, async_save=async_save,
                                        local_tier=LocalTier(str(Path(root) / "{node}"), replicas=1))
    coordinator.save_local(3)
    expected = {c.key: copy.deepcopy(c.stateful.state_dict()) for c in components}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    torch.rand(8, device=device)  # moves this rank's CUDA generator
    coordinator.wait()
    if world > 1 and rank == 0:
        import shutil

        shutil.rmtree(Path(root) / "1")  # node 1 restores from node 0's replica
    dist.barrier()
    step = coordinator.restore(Path(root) / "no-persistent-checkpoints")
    return {"step": step, "device": str(next(model.parameters()).device),
            "same": {c.key: same_state(c.stateful.state_dict(), expected[c.key]) for c in components}}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("world", [pytest.param(1, id="1rank"), pytest.param(2, id="2nodes", marks=requires_gpus(2))])
def test_local_tier_round_trip_on_cuda(tmp_path: Path, world: int, async_save: bool) -> None:
    results = run_distributed(_job, world, str(tmp_path), async_save, node_of_rank=list(range(world)),
                              backend="nccl", timeout=180)
    for rank, result in enumerate(results):
        assert result["step"] == 3, (rank, result)
        assert result["device"].startswith("cuda"), result
        assert all(result["same"].values()), (rank, result["same"])

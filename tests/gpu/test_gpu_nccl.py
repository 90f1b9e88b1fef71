"""The coordinator under an NCCL process group: 1 rank, and 2 ranks where two GPUs exist (rank r on cuda:r).

With 1 rank every collective of the package short-circuits (world size 1), so that case proves the package runs
under an NCCL default group; the 2-rank case sends the replication check's digests and bytes, the failure
agreement and FSDP2's gathers through NCCL, on CUDA tensors. Skipped without CUDA; the 2-rank cases without two
GPUs (``bash scripts/gpu_check.sh`` runs them on a GPU machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from support.dist_harness import run_distributed
from support.gpu import requires_cuda, requires_gpus
from support.sharded import differences, full_state

pytestmark = [requires_cuda, pytest.mark.skipif(not dist.is_nccl_available(), reason="this torch has no NCCL")]

WORLDS = [pytest.param(1, id="1rank"), pytest.param(2, id="2ranks", marks=requires_gpus(2))]
TIMEOUT_S = 180


def _replicated_model(device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The same model and AdamW state on every rank, built without a matmul on the GPU (elementwise updates only),
    so the replicas are bit-identical whatever the GPUs' kernels."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=generator).to(device)
        optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def _replicated_job(rank: int, world: int, root: Path) -> dict[str, Any]:
    from lightning_sharing import (
        CheckpointCoordinator,
        OptimizerState,
        ReplicationMismatchError,
        RNGState,
        SharingPattern,
        StateComponent,
    )
    from lightning_sharing.distributed.collectives import _collective_device

    device = torch.device("cuda", torch.cuda.current_device())
    out: dict[str, Any] = {"backend": dist.get_backend(), "device": str(device),
                           "collective_device": str(_collective_device())}
    model, optimizer = _replicated_model(device)
    torch.cuda.manual_seed(100 + rank)  # each rank its own CUDA stream of random numbers (PER_RANK)
    torch.rand(rank + 1, device=device)

    def components(net: torch.nn.Module, opt: torch.optim.Optimizer) -> list[StateComponent]:
        # FULL broadcasts the writer's bytes (CUDA tensors under NCCL); TENSOR gathers digests of every tensor.
        return [StateComponent("model", net, SharingPattern.REPLICATED, validate_replication=True,
                               validation_level="full"),
                StateComponent("optimizer", OptimizerState(net, opt), SharingPattern.REPLICATED,
                               validate_replication=True, validation_level="tensor"),
                StateComponent("rng", RNGState(), SharingPattern.PER_RANK)]

    expected = full_state(model, optimizer)
    CheckpointCoordinator(components(model, optimizer)).save_checkpoint(root / "sync.ckpt", step=1)
    draw = torch.rand(8, device=device).cpu()
    out["draw"] = draw

    # Everything elsewhere: the weights and moments zeroed on the GPU, the generator reseeded.
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
            for value in optimizer.state[param].values():
                value.zero_()
    torch.cuda.manual_seed(12345)
    live = {name: param.data_ptr() for name, param in model.named_parameters()}
    CheckpointCoordinator(components(model, optimizer)).load_checkpoint(root / "sync.ckpt")
    out["sync_differences"] = differences(full_state(model, optimizer), expected)
    out["in_place"] = all(p.device == device and p.data_ptr() == live[n] for n, p in model.named_parameters())
    out["draw_after_load"] = torch.rand(8, device=device).cpu()

    # An asynchronous save: its thread talks over a gloo group of its own beside the NCCL default group.
    background = CheckpointCoordinator(components(model, optimizer), async_save=True)
    background.save_checkpoint(root / "async.ckpt", step=2)
    background.wait()
    fresh, fresh_optimizer = _replicated_model(device)
    with torch.no_grad():
        for param in fresh.parameters():
            param.add_(1.0)
    CheckpointCoordinator(components(fresh, fresh_optimizer)).load_checkpoint(root / "async.ckpt")
    out["async_differences"] = differences(full_state(fresh, fresh_optimizer), expected)

    # A replica that diverged on the last rank: every rank refuses the save with the same verdict.
    with torch.no_grad():
        if rank == world - 1:
            model[2].bias[3] += 1.0
    try:
        CheckpointCoordinator(components(model, optimizer)).save_checkpoint(root / "diverged.ckpt", step=3)
        out["diverged"] = "saved"
    except ReplicationMismatchError as exc:
        out["diverged"] = str(exc)
    dist.barrier()
    out["committed"] = sorted(p.name for p in root.iterdir() if p.name.endswith(".ckpt"))
    return out


def _sharded_job(rank: int, world: int, root: Path) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_sharing import CheckpointCoordinator, OptimizerState, SharingPattern, StateComponent

    device = torch.device("cuda", torch.cuda.current_device())

    def sharded(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16)).to(device)
        mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("dp",))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def components(net: torch.nn.Module, opt: torch.optim.Optimizer) -> list[StateComponent]:
        return [StateComponent("model", net, SharingPattern.SHARDED),
                StateComponent("optimizer", OptimizerState(net, opt), SharingPattern.SHARDED)]

    model, optimizer = sharded(seed=0)
    generator = torch.Generator().manual_seed(2)
    for _ in range(2):
        model(torch.randn(8, 64, generator=generator).to(device)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    out: dict[str, Any] = {"local_devices": sorted({str(p.to_local().device) for p in model.parameters()})}
    expected = full_state(model, optimizer)
    CheckpointCoordinator(components(model, optimizer)).save_checkpoint(root / "sharded.ckpt", step=2)
    fresh, fresh_optimizer = sharded(seed=5)
    CheckpointCoordinator(components(fresh, fresh_optimizer)).load_checkpoint(root / "sharded.ckpt")
    out["differences"] = differences(full_state(fresh, fresh_optimizer), expected)
    out["fresh_local_devices"] = sorted({str(p.to_local().device) for p in fresh.parameters()})
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_replicated_and_per_rank_state_under_nccl(tmp_path: Path, world: int) -> None:
    results = run_distributed(_replicated_job, world, tmp_path, backend="nccl", timeout=TIMEOUT_S)
    for rank, out in enumerate(results):
        assert "nccl" in out["backend"], out["backend"]
        assert out["device"] == f"cuda:{rank}" and out["collective_device"] == f"cuda:{rank}", out
        assert out["sync_differences"] == [], f"rank {rank}: after the load {out['sync_differences']} differ"
        assert out["in_place"], f"rank {rank}: the parameters were not loaded in place on their GPU"
        assert torch.equal(out["draw_after_load"], out["draw"]), f"rank {rank}: CUDA generator not restored"
        assert out["async_differences"] == [], f"rank {rank}: after the async load {out['async_differences']} differ"
        # One rank has nothing to compare with, so its "diverged" save goes through.
        assert out["committed"] == sorted(["async.ckpt", "sync.ckpt"] + (["diverged.ckpt"] if world == 1 else [])), \
            out["committed"]
    if world > 1:
        assert not torch.equal(results[0]["draw"], results[1]["draw"]), "PER_RANK generators should differ by rank"
        verdicts = {out["diverged"] for out in results}
        assert len(verdicts) == 1, f"the ranks disagree: {verdicts}"
        verdict = verdicts.pop()
        assert f"rank {world - 1}" in verdict or f"ranks [{world - 1}]" in verdict, verdict
        assert "2.bias" in verdict, verdict
    else:
        assert results[0]["diverged"] == "saved"


@pytest.mark.parametrize("world", WORLDS)
def test_fsdp2_sharded_state_under_nccl(tmp_path: Path, world: int) -> None:
    results = run_distributed(_sharded_job, world, tmp_path, backend="nccl", timeout=TIMEOUT_S)
    for rank, out in enumerate(results):
        assert out["local_devices"] == [f"cuda:{rank}"] == out["fresh_local_devices"], out
        assert out["differences"] == [], f"rank {rank}: after the load {out['differences']} differ"

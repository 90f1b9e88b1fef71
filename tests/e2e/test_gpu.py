"""CUDA checks (skipped without a GPU; CI has none). Not yet run on a GPU: see the closing notes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_sharing import CheckpointCoordinator, RNGState, SharingPattern, StateComponent

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_model_optimizer_and_rng_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 16, device="cuda")).sum().backward()
    optimizer.step()
    rng = RNGState()
    components = [StateComponent("model", model, SharingPattern.REPLICATED),
                  StateComponent("optimizer", optimizer, SharingPattern.REPLICATED),
                  StateComponent("rng", rng, SharingPattern.PER_RANK)]
    CheckpointCoordinator(components).save_checkpoint(tmp_path / "gpu.ckpt")
    expected_draw = torch.rand(8, device="cuda")

    fresh = torch.nn.Linear(16, 16).cuda()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    restored = [StateComponent("model", fresh, SharingPattern.REPLICATED),
                StateComponent("optimizer", fresh_optimizer, SharingPattern.REPLICATED),
                StateComponent("rng", RNGState(), SharingPattern.PER_RANK)]
    CheckpointCoordinator(restored).load_checkpoint(tmp_path / "gpu.ckpt")
    assert all(p.is_cuda for p in fresh.parameters())
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    state, fresh_state = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(state[i]["exp_avg"], fresh_state[i]["exp_avg"].to(state[i]["exp_avg"].device))
               for i in state)
    assert torch.equal(torch.rand(8, device="cuda"), expected_draw)  # CUDA generator restored too


def test_async_save_stages_cuda_tensors_in_pinned_memory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).cuda()
    coordinator = CheckpointCoordinator([StateComponent("model", model, SharingPattern.REPLICATED)], async_save=True)
    coordinator.save_checkpoint(tmp_path / "a.ckpt")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.zero_()  # training goes on: the staged copy is what gets written
    coordinator.wait()
    fresh = torch.nn.Linear(64, 64).cuda()
    CheckpointCoordinator([StateComponent("model", fresh, SharingPattern.REPLICATED)]).load_checkpoint(
        tmp_path / "a.ckpt")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())

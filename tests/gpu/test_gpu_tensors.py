"""CUDA tensors saved and loaded on their device: weights, a buffer and AdamW state, bit-exact, in place.

Skipped without CUDA (``bash scripts/gpu_check.sh`` runs these on a GPU and fails where there is none).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.gpu import devices, requires_cuda
from torch import nn

from lightning_sharing import CheckpointCoordinator, OptimizerState, SharingPattern, StateComponent, ValidationLevel
from lightning_sharing.distributed.validation import state_digests

pytestmark = requires_cuda


def _model(device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # BatchNorm1d: buffers (running_mean, running_var, num_batches_tracked) that training changes.
    return nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 8)).to(device)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(16, 32, device=device)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the optimizer's state, by parameter position and name (``3.exp_avg``), cloned."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {f"{i}.{name}": value.detach().clone() for i, p in enumerate(params)
            for name, value in optimizer.state[p].items() if isinstance(value, torch.Tensor)}


def _components(model: nn.Module, optimizer: torch.optim.Optimizer, form: str) -> list[StateComponent]:
    stateful = optimizer if form == "torch" else OptimizerState(model, optimizer)
    return [StateComponent("model", model, SharingPattern.REPLICATED),
            StateComponent("optimizer", stateful, SharingPattern.REPLICATED)]


@pytest.mark.parametrize("form", ["torch", "fqn"])
@pytest.mark.parametrize("device", devices(), ids=str)
def test_cuda_state_round_trips_on_its_device_in_place(tmp_path: Path, device: torch.device, form: str) -> None:
    model = _model(device, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer, device, steps=2)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moments = _optimizer_tensors(optimizer)
    assert any(v.is_cuda for v in moments.values()), "AdamW's moments should live on the GPU"
    CheckpointCoordinator(_components(model, optimizer, form)).save_checkpoint(tmp_path / "gpu.ckpt", step=2)

    # Training goes on: every value changes, so only a load can bring the saved ones back.
    _train(model, optimizer, device, steps=1)
    assert not torch.equal(model[0].weight, weights["0.weight"])
    assert not torch.equal(model[1].running_mean, weights["1.running_mean"])
    live = {name: (tensor, tensor.data_ptr()) for name, tensor in model.state_dict(keep_vars=True).items()}
    CheckpointCoordinator(_components(model, optimizer, form)).load_checkpoint(tmp_path / "gpu.ckpt")

    # Same tensor objects, same device memory, saved values: loaded in place, not swapped for copies elsewhere.
    after = model.state_dict(keep_vars=True)
    for name, (tensor, pointer) in live.items():
        assert after[name] is tensor, f"{name}: load_state_dict replaced the tensor"
        assert tensor.device == device and tensor.data_ptr() == pointer, f"{name} moved to {tensor.device}"
        assert torch.equal(tensor.detach(), weights[name]), f"{name} does not hold the saved value"
    restored = _optimizer_tensors(optimizer)
    assert restored.keys() == moments.keys()
    for name, value in moments.items():
        assert restored[name].device == value.device, f"optimizer {name} on {restored[name].device}, not {value.device}"
        assert torch.equal(restored[name], value), f"optimizer {name} does not hold the saved value"

    # A fresh model and optimizer (other seed, no optimizer state yet) on the same device get the same values.
    fresh = _model(device, seed=1)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    CheckpointCoordinator(_components(fresh, fresh_optimizer, form)).load_checkpoint(tmp_path / "gpu.ckpt")
    for name, value in fresh.state_dict().items():
        assert value.device == device and torch.equal(value, weights[name]), name
    fresh_moments = _optimizer_tensors(fresh_optimizer)
    assert fresh_moments.keys() == moments.keys()
    for name, value in moments.items():
        assert fresh_moments[name].device == value.device and torch.equal(fresh_moments[name], value), name


@pytest.mark.parametrize("level", [ValidationLevel.QUICK, ValidationLevel.TENSOR], ids=lambda level: level.name)
def test_replication_digests_of_cuda_tensors_equal_those_of_their_cpu_copies(level: ValidationLevel) -> None:
    """The replication check hashes CUDA tensors as it hashes CPU ones; QUICK samples stay inside a tensor past
    2**24 elements (its float32 sample positions once ran past the end: a device-side assert on a GPU)."""
    generator = torch.Generator().manual_seed(3)
    state = {"wte": torch.randint(0, 255, (50257 * 768,), dtype=torch.uint8, generator=generator),
             "w": torch.randn(64, 64, generator=generator), "b": torch.randn(8, generator=generator).bfloat16()}
    on_gpu = {name: tensor.cuda() for name, tensor in state.items()}
    assert state_digests(on_gpu, level) == state_digests(state, level)
    torch.cuda.synchronize()  # a device-side assert would surface here at the latest

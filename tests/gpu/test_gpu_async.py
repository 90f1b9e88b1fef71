"""Async saves from the GPU: staged into pinned CPU memory, in stream order, without holding up the GPU.

Each test holds the background write at its first bytes (``support.gpu.held_writes``), so "the save is still
being written" is a fact, not a race: whatever the test does on the GPU meanwhile provably ran during the write.
No timing is asserted. Skipped without CUDA (``bash scripts/gpu_check.sh`` runs these on a GPU).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support.gpu import devices, held_writes, requires_cuda
from torch import nn

from lightning_sharing import CheckpointCoordinator, OptimizerState, SharingPattern, StateComponent
from lightning_sharing.distributed.async_save import BackgroundSaver

pytestmark = requires_cuda

WAIT_S = 60  # upper bound on any single wait below; reached only when something is broken


class RecordingSaver(BackgroundSaver):
    """A ``BackgroundSaver`` that keeps (source, staging buffer) of every tensor it stages."""

    def __init__(self, background_staging: bool) -> None:
        super().__init__(background_staging=background_staging)
        self.staged: list[tuple[torch.Tensor, torch.Tensor]] = []

    def stage(self, tensors: dict[str, torch.Tensor],
              optimizer_owned: Callable[[torch.Tensor], bool] | None = None) -> dict[str, torch.Tensor]:
        buffers = super().stage(tensors, optimizer_owned)
        self.staged += [(tensors[name], buffers[name]) for name in tensors]
        return buffers

    def close_quietly(self) -> None:
        """Stop the thread and remove the optimizer step hook even after a failed test (its error is the test's)."""
        with contextlib.suppress(Exception):
            self.close()


def _model(device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # About 12 MiB of weights plus twice that of AdamW moments, and BatchNorm buffers (copied before the save
    # returns, also with background staging, which defers only what an optimizer step changes).
    return nn.Sequential(nn.Linear(1024, 1024), nn.BatchNorm1d(1024), nn.Linear(1024, 1024),
                         nn.Linear(1024, 1024)).to(device)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    model(torch.randn(32, 1024, device=device)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _wait_for(event: torch.cuda.Event, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not event.query():
        assert time.monotonic() < deadline, f"{what} did not finish within {WAIT_S}s"
        time.sleep(0.001)


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Clones of the model's and the optimizer's tensors (queued on the stream, like everything else)."""
    values = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, param in enumerate(model.parameters()):
        values.update({f"optimizer.{i}.{k}": v.clone() for k, v in optimizer.state[param].items()})
    return values


@pytest.mark.parametrize("background_staging", [False, True], ids=["staging", "background_staging"])
@pytest.mark.parametrize("device", devices(), ids=str)
def test_async_save_from_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
                             device: torch.device, background_staging: bool) -> None:
    model = _model(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    _step(model, optimizer, device)
    saver = RecordingSaver(background_staging)
    request.addfinalizer(saver.close_quietly)
    target = tmp_path / "async.ckpt"
    coordinator = CheckpointCoordinator([StateComponent("model", model, SharingPattern.REPLICATED),
                                         StateComponent("optimizer", OptimizerState(model, optimizer),
                                                        SharingPattern.REPLICATED)], async_save=saver)
    with held_writes(monkeypatch) as write:
        # Stream order: the weights change on the GPU behind a long kernel, queued and not waited for; the staged
        # copy must hold the changed values (a copy on another stream, or of the memory before the kernel, would not).
        with torch.no_grad(), torch.cuda.device(device):
            torch.cuda._sleep(100_000_000)  # tens of milliseconds of GPU time in front of the change, on its stream
            for param in model.parameters():
                param.mul_(1.5)
        expected = _snapshot(model, optimizer)
        coordinator.save_checkpoint(target, step=1)

        # Staging: every CUDA tensor went to its own pinned CPU buffer (page-locked: a real asynchronous copy).
        cuda_sources = [(s, b) for s, b in saver.staged if s.is_cuda]
        assert cuda_sources, "nothing was staged from the GPU"
        for source, buffer in cuda_sources:
            assert buffer.device.type == "cpu" and buffer.is_pinned(), (source.shape, buffer.device)
            assert buffer.data_ptr() != source.data_ptr()

        # Training goes on at once: a step changes every weight and moment (with background staging it first
        # waits until they are copied), while the write has not even started its bytes yet or is held in them.
        _step(model, optimizer, device)
        assert write.started.wait(WAIT_S), "the background write never started"
        assert not target.exists(), "the checkpoint was committed while its write was held"

        # The default stream is free while the write is pending: GPU work queued now, another training step included,
        # completes while the write is still held (a save that kept the stream or the step waiting would hang here).
        end = torch.cuda.Event()
        x = torch.randn(2048, 2048, device=device)
        for _ in range(8):
            x = torch.tanh(x @ x)
        _step(model, optimizer, device)
        end.record(torch.cuda.current_stream(device))
        _wait_for(end, "GPU work queued while a save was being written")
        write.release()
        coordinator.wait()
    assert target.exists()

    # The checkpoint holds the values at save time (after the queued change), not the ones of the steps after.
    assert not torch.equal(model[0].weight, expected["model.0.weight"])
    fresh = _model(device, seed=1)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    CheckpointCoordinator([StateComponent("model", fresh, SharingPattern.REPLICATED),
                           StateComponent("optimizer", OptimizerState(fresh, fresh_optimizer),
                                          SharingPattern.REPLICATED)]).load_checkpoint(target)
    loaded = _snapshot(fresh, fresh_optimizer)
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        assert loaded[name].device == value.device, f"{name} loaded on {loaded[name].device}, saved from {value.device}"
        assert torch.equal(loaded[name], value), f"{name} differs from its value when save_checkpoint was called"

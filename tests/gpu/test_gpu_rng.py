"""Per-device CUDA RNG: ``RNGState`` saves and restores every visible device's generator, each its own.

Skipped without CUDA (``bash scripts/gpu_check.sh`` runs these on a GPU and fails where there is none).
"""

from __future__ import annotations

from pathlib import Path

import torch
from support.gpu import requires_cuda

from lightning_sharing import CheckpointCoordinator, RNGState, SharingPattern, StateComponent
from lightning_sharing.statefuls.holders import ValueHolder

pytestmark = requires_cuda


def _draws() -> list[torch.Tensor]:
    """A few numbers from every CUDA device's generator (and the CPU's, last), copied to the CPU."""
    count = torch.cuda.device_count()
    return [torch.rand(6, device=f"cuda:{d}").cpu() for d in range(count)] + [torch.rand(6)]


def test_every_cuda_generator_is_saved_and_restored(tmp_path: Path) -> None:
    count = torch.cuda.device_count()
    for d in range(count):  # each device its own seed, and its offset moved on by some draws
        with torch.cuda.device(d):
            torch.cuda.manual_seed(1000 + d)
        torch.rand(3 + d, device=f"cuda:{d}")
    states = [state.clone() for state in torch.cuda.get_rng_state_all()]
    CheckpointCoordinator([StateComponent("rng", RNGState(), SharingPattern.PER_RANK)]).save_checkpoint(
        tmp_path / "rng.ckpt")
    expected = _draws()
    if count > 1:
        assert not torch.equal(expected[0], expected[1]), "devices 0 and 1 were seeded apart; their draws must differ"

    torch.cuda.manual_seed_all(7)  # every generator elsewhere
    torch.manual_seed(7)
    assert not torch.equal(_draws()[0], expected[0])

    # What the checkpoint holds: one state per device, each the one that device had at the save.
    raw = ValueHolder()
    CheckpointCoordinator([StateComponent("rng", raw, SharingPattern.PER_RANK)]).load_checkpoint(tmp_path / "rng.ckpt")
    saved = raw.value["cuda"]
    assert len(saved) == count, f"the checkpoint holds {len(saved)} CUDA generator states for {count} devices"
    for d, (got, want) in enumerate(zip(saved, states, strict=True)):
        assert got.device.type == "cpu" and got.dtype == torch.uint8, (got.device, got.dtype)
        assert torch.equal(got, want), f"device {d}: saved generator state differs from the live one at save time"

    CheckpointCoordinator([StateComponent("rng", RNGState(), SharingPattern.PER_RANK)]).load_checkpoint(
        tmp_path / "rng.ckpt")
    after = _draws()
    for d, (got, want) in enumerate(zip(after, expected, strict=True)):
        where = f"cuda:{d}" if d < count else "cpu"
        assert torch.equal(got, want), f"{where}: the draw after the load differs from the draw after the save"

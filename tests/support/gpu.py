"""What the GPU tests (``tests/gpu/``) share: the skip without CUDA, and a way to run code while a save is held.

Without CUDA every GPU test is skipped with ``NO_CUDA_REASON``; ``scripts/gpu_check.sh`` refuses to run at all
there, so a GPU run can never pass by skipping everything.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
import torch

from lightning_sharing.format import safetensors_io


def _no_cuda_reason() -> str:
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"needs a CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, {build}); "
            "run `bash scripts/gpu_check.sh` on a machine with a GPU")


NO_CUDA_REASON = _no_cuda_reason() if not torch.cuda.is_available() else ""
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_REASON or "needs CUDA")


def requires_gpus(count: int) -> pytest.MarkDecorator:
    """Skip unless ``count`` CUDA devices are visible (a 2-rank NCCL test needs one GPU per rank)."""
    if not torch.cuda.is_available():
        return requires_cuda
    have = torch.cuda.device_count()
    return pytest.mark.skipif(have < count, reason=f"needs {count} CUDA devices, {have} visible")


def devices() -> list[torch.device]:
    """The current CUDA device and, where there are several, the last one (a tensor off the current device must
    stay on its own device). Without CUDA: ``cuda:0``, for test ids only (those tests are skipped)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        return [torch.device("cuda", 0)]
    return [torch.device("cuda", i) for i in sorted({torch.cuda.current_device(), count - 1})]


class HeldWrite:
    """Holds every checkpoint file write at its first ``save:write`` point until ``release()``.

    ``started`` is set once a write (on any thread) reached the point: the save is then provably unfinished,
    whatever the machine's speed, so what the test does meanwhile ran while the write was pending.
    """

    def __init__(self) -> None:
        self.started = threading.Event()
        self.released = threading.Event()

    def __call__(self, point: str) -> None:
        if point == "save:write" and not self.released.is_set():
            self.started.set()
            if not self.released.wait(120):
                raise RuntimeError("the test never released the held checkpoint write")

    def release(self) -> None:
        self.released.set()


@contextlib.contextmanager
def held_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldWrite]:
    """Within the block, checkpoint file writes stop at their first bytes until ``release()`` (always released at
    the end, so a failing test cannot leave the saver's thread blocked)."""
    hold = HeldWrite()
    original = safetensors_io.fault_point

    def point(name: str) -> None:
        hold(name)
        original(name)

    monkeypatch.setattr(safetensors_io, "fault_point", point)
    try:
        yield hold
    finally:
        hold.release()

"""What the benchmark workers share: the training state of a chosen size, timers, memory probes and raw file I/O.

The state is a stack of ``nn.Linear`` layers plus populated AdamW moments, built deterministically (same seed on
every rank), so each rank holds an identical replica as under DDP and REPLICATED validation passes.
"""

from __future__ import annotations

import ctypes
import math
import os
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

GB = 1e9  # sizes are decimal gigabytes of weights + exp_avg + exp_avg_sq
WIDTH = 1024  # 4 MiB weight matrices: a transformer-like mix of tensor sizes
FLOAT32_COPIES = 3  # weights, exp_avg, exp_avg_sq
RAW_CHUNK = 16 * 1024 * 1024  # one reused buffer: the raw baseline measures the disk path, not allocation
PAGE = os.sysconf("SC_PAGE_SIZE")


class InPlaceTensors:
    """A stateful whose tensors are loaded in place (so a load allocates nothing of its own for them)."""

    def __init__(self, tensors: dict[str, Any]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, Any]:
        return dict(self.tensors)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, tensor in state.items():
            self.tensors[name].copy_(tensor)


def layer_plan(size_gb: float) -> tuple[int, int]:
    """(width, layers) whose weights + two AdamW moments in float32 take about ``size_gb`` GB."""
    params = size_gb * GB / (4 * FLOAT32_COPIES)
    width = WIDTH if params >= WIDTH * (WIDTH + 1) else max(8, int(math.sqrt(params)))
    return width, max(1, round(params / (width * (width + 1))))


def build_state(size_gb: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and an AdamW optimizer whose moments exist, identical on every rank that calls this."""
    width, layers = layer_plan(size_gb)
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # One step per parameter (AdamW skips parameters without a gradient) creates the moments while only one
    # gradient is alive at a time: a step over all parameters would need a full gradient copy (a third of the state
    # more per rank, while 4 ranks of 1.5 GB already share the machine's memory).
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
        optimizer.step()
        param.grad = None
    return model, optimizer


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the weights and the AdamW moments (the step counters are a few bytes and not counted)."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for state in optimizer.state.values():
        total += sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
    return total


def lightning_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    """The dict Lightning's ``Trainer.save_checkpoint`` hands to its CheckpointIO, reduced to what we hold."""
    import lightning

    return {"epoch": 0, "global_step": step, "pytorch-lightning_version": lightning.__version__,
            "state_dict": model.state_dict(), "loops": {}, "callbacks": {},
            "optimizer_states": [optimizer.state_dict()], "lr_schedulers": []}


# ---------------------------------------------------------------------------------------------- timing and memory
def timed(fn: Callable[[], Any]) -> float:
    """Seconds from a barrier to a barrier around ``fn``: what the slowest rank (the job) waits."""
    dist.barrier()
    started = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - started


def current_rss() -> int:
    """Resident bytes now (statm's second field, in pages)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


def peak_rss() -> int:
    """The process's resident high-water mark in bytes: VmHWM, else ru_maxrss (in KiB on Linux).

    Both are the same peak, but only VmHWM follows a reset: ru_maxrss also keeps the high-water mark that exiting
    threads (some are started and ended while torch and Lightning import) leave in the signal struct.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_memory() -> None:
    """Hand memory the allocator keeps after frees back to the OS (glibc's malloc_trim).

    glibc serves later allocations from that kept memory without raising the RSS, so a save right after building the
    state (whose temporaries were freed) could allocate a lot and still show no extra RSS.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim, and RSS then says what it says
        pass


def reset_peak_rss() -> bool:
    """Lower the high-water mark to the current RSS (Linux >= 4.0); False where the kernel refuses.

    Importing torch and Lightning peaks about 100 MiB above where it settles; without the reset that import peak would
    hide the peak of any save or load smaller than it.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


class MemoryProbe:
    """Peak extra resident memory of a block: the high-water mark after it minus the RSS right before it.

    ``masked`` is True when the high-water mark could not be reset and did not move: the block then used no more than
    what the process had already peaked at before it, so ``extra`` is an upper bound, not a measurement.
    """

    def __enter__(self) -> MemoryProbe:
        release_free_memory()
        self.reset = reset_peak_rss()
        self.before, self.peak_before = current_rss(), peak_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_after = peak_rss()

    def as_dict(self) -> dict[str, Any]:
        return {"rss_before": self.before, "peak_before": self.peak_before, "peak_after": self.peak_after,
                "extra": max(0, self.peak_after - self.before), "peak_reset": self.reset,
                "masked": not self.reset and self.peak_after <= self.peak_before}


# ---------------------------------------------------------------------------------------------- files
def tree_bytes(path: Path) -> int:
    """Bytes of every file below ``path`` (or of the file itself)."""
    if path.is_file():
        return path.stat().st_size
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def fsync_path(path: Path) -> None:
    """Make a file (or a directory entry) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_write(path: Path, nbytes: int) -> None:
    """Sequentially write ``nbytes`` from one reused buffer, then fdatasync: the durable-write limit."""
    buffer = memoryview(os.urandom(min(RAW_CHUNK, max(nbytes, 1))))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left:
            left -= os.write(fd, buffer[:min(left, len(buffer))])
        os.fdatasync(fd)
    finally:
        os.close(fd)


def raw_write_early(path: Path, nbytes: int) -> None:
    """``raw_write``, asking the kernel to start writing back every 64 MiB written (Linux ``sync_file_range``), so
    the disk works while the next bytes are copied and the final fdatasync waits for less: the fastest plain
    sequential durable write this benchmark knows (lightning_sharing's writes start write-back as each file closes).
    """
    from lightning_sharing.storage.local import start_writeback

    buffer = memoryview(os.urandom(min(RAW_CHUNK, max(nbytes, 1))))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left, pending = nbytes, 0
        while left:
            count = os.write(fd, buffer[:min(left, len(buffer))])
            left, pending = left - count, pending + count
            if pending >= 4 * RAW_CHUNK:
                start_writeback(fd)
                pending = 0
        os.fdatasync(fd)
    finally:
        os.close(fd)


def raw_read(paths: list[Path]) -> int:
    """Read the files sequentially into one reused buffer; returns the bytes read."""
    buffer = bytearray(RAW_CHUNK)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
    return total


def raw_read_fresh(paths: list[Path]) -> int:
    """Read the files into newly allocated memory, kept until all are read, as a loader that allocates its tensors
    must: on top of ``raw_read`` this pays the page faults of fresh memory. Returns the bytes read."""
    kept, total = [], 0
    for path in paths:
        size = path.stat().st_size
        target = memoryview(torch.empty(size, dtype=torch.uint8).numpy())
        with open(path, "rb", buffering=0) as handle:
            done = 0
            while done < size and (count := handle.readinto(target[done:done + RAW_CHUNK])):
                done += count
        kept.append(target)
        total += done
    return total


# ---------------------------------------------------------------------------------------------- GIL probe
def matmul_rate(seconds: float) -> tuple[float, float]:
    """(iterations per second, seconds run) of small matmuls in a Python loop.

    64x64 matmuls are dominated by interpreter and dispatcher overhead, which needs the GIL: a background save that
    holds the GIL shows up as a lower rate.
    """
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    started = time.perf_counter()
    count, elapsed = 0, 0.0
    while elapsed < seconds:
        for _ in range(50):
            a = torch.mm(a, b).tanh_()
        count += 50
        elapsed = time.perf_counter() - started
    return count / max(elapsed, 1e-9), elapsed

"""Run a function on N real processes joined by a gloo (or NCCL) process group.

``run_distributed(worker, world_size, *args)`` spawns ``world_size`` processes; each initialises
``torch.distributed`` (gloo, loopback) and calls ``worker(rank, world_size, *args)``. It returns the
workers' return values by rank, or raises ``WorkerFailed`` listing every rank's exception. A run
that outlives ``timeout`` is killed and reported as a hang.

``backend="nccl"`` (the GPU tests) gives rank ``r`` the CUDA device ``r`` (``torch.cuda.set_device``, and
``device_id`` so NCCL binds it at once) before the group is created; one GPU per rank, so the caller checks
``torch.cuda.device_count() >= world_size``. Return plain data (CPU tensors) from an NCCL worker.

``node_of_rank`` simulates several nodes on one machine by setting ``GROUP_RANK``, ``LOCAL_RANK``
and ``LOCAL_WORLD_SIZE`` as torchrun would on each node.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch.multiprocessing as mp

PG_TIMEOUT_S = 30


class WorkerFailed(AssertionError):
    """One or more workers raised (``errors`` maps rank -> (exception type name, message, traceback))."""

    def __init__(self, errors: dict[int, tuple[str, str, str]], results: dict[int, Any]) -> None:
        self.errors = errors
        self.results = results
        detail = "\n".join(f"--- rank {r}: {t}: {m}\n{tb}" for r, (t, m, tb) in sorted(errors.items()))
        super().__init__(f"workers failed on ranks {sorted(errors)}:\n{detail}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(worker: Callable[..., Any], rank: int, world_size: int, port: int, env: dict[str, str],
           results: Any, args: tuple[Any, ...], backend: str = "gloo") -> None:
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size)})
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        timeout = datetime.timedelta(seconds=PG_TIMEOUT_S)
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", rank=rank, world_size=world_size, timeout=timeout, device_id=device)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        value = worker(rank, world_size, *args)
        # Plain pickle: torch's queue would move tensors to shared memory that dies with this process.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException as exc:  # reported to the parent, which fails the test
        results.put((rank, "error", (type(exc).__name__, str(exc), traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(worker: Callable[..., Any], world_size: int, *args: Any,
                    node_of_rank: Sequence[int] | None = None, timeout: float = 120,
                    backend: str = "gloo") -> list[Any]:
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` processes; return values by rank.

    ``backend``: ``"gloo"`` (CPU, the default) or ``"nccl"`` (rank ``r`` on CUDA device ``r``).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {"LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0"}
        if node_of_rank is not None:
            node = node_of_rank[rank]
            local = [r for r in range(world_size) if node_of_rank[r] == node]
            env = {"LOCAL_RANK": str(local.index(rank)), "LOCAL_WORLD_SIZE": str(len(local)),
                   "GROUP_RANK": str(node)}
        proc = ctx.Process(target=_entry, args=(worker, rank, world_size, port, env, results, args, backend))
        proc.start()
        processes.append(proc)
    deadline = time.monotonic() + timeout
    collected: dict[int, tuple[str, Any]] = {}
    while len(collected) < world_size and time.monotonic() < deadline:
        try:
            rank, status, value = results.get(timeout=0.5)
            collected[rank] = (status, value)
        except queue.Empty:
            if all(not p.is_alive() for p in processes) and results.empty():
                break
    for proc in processes:
        proc.join(timeout=max(0.1, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(processes) if p.is_alive()]
    for proc in processes:
        if proc.is_alive():
            proc.kill()
            proc.join()
    if hung:
        raise AssertionError(f"ranks {hung} did not finish within {timeout}s (hang); results so far: {collected}")
    collected = {r: (s, pickle.loads(v) if s == "ok" else v) for r, (s, v) in collected.items()}
    errors = {r: v for r, (s, v) in collected.items() if s == "error"}
    missing = [r for r in range(world_size) if r not in collected]
    for r in missing:
        errors[r] = ("ProcessDied", f"exit code {processes[r].exitcode}", "")
    if errors:
        raise WorkerFailed(errors, {r: v for r, (s, v) in collected.items() if s == "ok"})
    return [collected[r][1] for r in range(world_size)]

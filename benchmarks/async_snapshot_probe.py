"""Async saves: the staging copy lightning_sharing makes today against a fork (copy-on-write) snapshot.

    torchrun --nproc_per_node=2 benchmarks/async_snapshot_probe.py [--size 0.5] [--rounds 3]

Per round, on every rank, with gloo's threads running: an AdamW step with no save (``step_plain``); an async save
(``copy_blocked``: until ``save_checkpoint`` returns, the staging copy) followed at once by a step
(``copy_step_after``); then a fork: the child writes this rank's share of the same tensors as safetensors, fsyncs and
``os._exit``s, while the parent returns at once (``fork_blocked``) and takes a step (``fork_step_after``), paying the
copy-on-write faults of every page the step changes while the child still maps it. What training loses is the
blocked time plus the step's slowdown. Only an experiment: the child is not a complete save (no manifest, commit or
agreement).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_state import build_state

from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent
from lightning_sharing.format.safetensors_io import DescriptorSink, write_tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=0.5, help="state GB (weights + AdamW moments)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent / ".scratch" / "snapshot")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model, optimizer = build_state(args.size)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    args.dir.mkdir(parents=True, exist_ok=True)
    coordinator = CheckpointCoordinator([StateComponent("model", model, SharingPattern.REPLICATED),
                                         StateComponent("optimizer", optimizer, SharingPattern.REPLICATED)],
                                        async_save=True)
    tensors = {f"p{i}": p.detach() for i, p in enumerate(model.parameters())}
    for i, state in enumerate(optimizer.state.values()):
        tensors.update({f"m{i}": state["exp_avg"], f"v{i}": state["exp_avg_sq"]})
    mine = {k: v for n, (k, v) in enumerate(sorted(tensors.items())) if n % world == rank}

    def step() -> float:
        dist.barrier()
        started = time.perf_counter()
        optimizer.step()
        dist.barrier()
        return time.perf_counter() - started

    results: dict[str, list[float]] = {}
    step()
    for i in range(args.rounds):
        results.setdefault("step_plain", []).append(step())
        dist.barrier()
        started = time.perf_counter()
        coordinator.save_checkpoint(args.dir / f"copy-{i}.ckpt", step=i)
        results.setdefault("copy_blocked", []).append(time.perf_counter() - started)
        results.setdefault("copy_step_after", []).append(step())
        coordinator.wait()
        dist.barrier()
        if rank == 0:
            shutil.rmtree(args.dir / f"copy-{i}.ckpt")
        target = args.dir / f"fork-{i}-{rank}.safetensors"
        dist.barrier()
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: no collectives, no locks another thread may hold; write, fsync, leave
            code = 1
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                write_tensors(DescriptorSink(fd), mine)
                os.fsync(fd)
                os.close(fd)
                code = 0
            finally:
                os._exit(code)
        results.setdefault("fork_blocked", []).append(time.perf_counter() - started)
        results.setdefault("fork_step_after", []).append(step())
        _, status = os.waitpid(pid, 0)
        results.setdefault("fork_written", []).append(time.perf_counter() - started)
        if status != 0:
            raise RuntimeError(f"the snapshot child exited with status {status}")
        target.unlink()
    dist.barrier()
    if rank == 0:
        print(f"{args.size:g} GB, world size {world}, {args.rounds} rounds: median [min-max] seconds (rank 0)")
        for name, values in results.items():
            print(f"  {name}: {statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]")
        shutil.rmtree(args.dir, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

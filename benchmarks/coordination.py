"""Coordination cost of a save and a load: lightning_sharing vs torch.distributed.checkpoint (DCP), and what the
collectives of each deliver to a rank.

    python benchmarks/coordination.py [--world 8] [--tensors 1000] [--rounds 5] [--counts 2 4 8] [--dir D] [--json F]

Two parts, each in fresh gloo processes on this machine (loopback), every process's exit status checked:

1. **timings** (``--world`` ranks): every rank holds the same state of ``--tensors`` tiny float32 tensors (16 values
   each, so the bytes do not matter and what is timed is coordination: planning, collectives, the commit). Each round
   runs, interleaved (order reversed every other round): a lightning_sharing save (``CheckpointCoordinator`` with
   one REPLICATED component, the same coordinator every round, as a training job keeps it) and its load, DCP's
   ``dcp.save`` and ``dcp.load`` (default planners), and DCP with ``enable_plan_caching=True``. Each operation is
   preceded by a barrier; its time is the slowest rank's; the median over rounds is reported, with the ratios to
   DCP's and the collectives each ran (counted by spies on ``torch.distributed`` that call through).
2. **counts** (each of ``--counts`` world sizes): a coordinator with a REPLICATED model validated at QUICK (as the
   Lightning strategies declare it), a REPLICATED optimizer-like state and PER_RANK RNG; the collectives of its first
   save, of a repeat save (same state, new path) and of a load, and the bytes they delivered to rank 1 and rank 0.

Prints tables; ``--json`` also writes every number. No targets are asserted (this is a measurement).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# ------------------------------------------------------------------------------------------------ the launcher
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(mode: str, world: int, workdir: Path, args: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """Run this script's worker ``mode`` on ``world`` processes; every exit status is checked; results by rank."""
    port = _free_port()
    spec = workdir / f"{mode}-{world}.json"
    spec.write_text(json.dumps({"mode": mode, "workdir": str(workdir), **args}))
    procs, logs = [], []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", OMP_NUM_THREADS="1")
        log = workdir / f"{mode}-{world}-rank{rank}.log"
        logs.append(log)
        with open(log, "w") as handle:
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(spec)], env=env, stdout=handle,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise RuntimeError(f"{mode} on {world} ranks timed out; logs in {workdir}") from None
    failed = [(rank, proc.returncode) for rank, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        tails = "\n".join(f"--- rank {r} (exit {code})\n{logs[r].read_text()[-3000:]}" for r, code in failed)
        raise RuntimeError(f"{mode} on {world} ranks failed:\n{tails}")
    return [json.loads((workdir / f"{mode}-{world}-rank{rank}.result.json").read_text()) for rank in range(world)]


# ------------------------------------------------------------------------------------------------ the workers
def _worker(spec_path: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT / "tests"))
    from support.collective_spy import install

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    spy = install()
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        result = (_timings if spec["mode"] == "timings" else _counts)(spec, spy, rank)
        out = Path(spec["workdir"]) / f"{spec['mode']}-{world}-rank{rank}.result.json"
        out.write_text(json.dumps(result))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _tiny_state(count: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    return {f"layer{i // 4}.p{i % 4}": torch.randn(16) for i in range(count)}


class _Holder:
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, tensor in state.items():
            self.state[name].copy_(tensor)


def _timed(spy: Any, work: Any) -> tuple[float, dict[str, Any]]:
    import torch.distributed as dist

    dist.barrier()
    spy.reset()
    started = time.perf_counter()
    work()
    elapsed = time.perf_counter() - started
    counts = spy.snapshot()
    return elapsed, counts


def _timings(spec: dict[str, Any], spy: Any, rank: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner

    from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent

    state = _tiny_state(spec["tensors"])
    coordinator = CheckpointCoordinator([StateComponent("model", _Holder(state), SharingPattern.REPLICATED)])
    cached = DefaultSavePlanner(enable_plan_caching=True)
    root = Path(spec["dir"])
    variants = {
        "ls_save": lambda r: coordinator.save_checkpoint(root / f"ls-{r}.ckpt", step=r),
        "ls_load": lambda r: coordinator.load_checkpoint(root / f"ls-{r}.ckpt"),
        "dcp_save": lambda r: dcp.save(state, checkpoint_id=root / f"dcp-{r}", planner=DefaultSavePlanner()),
        "dcp_load": lambda r: dcp.load(state, checkpoint_id=root / f"dcp-{r}", planner=DefaultLoadPlanner()),
        "dcp_cached_save": lambda r: dcp.save(state, checkpoint_id=root / f"dcpc-{r}", planner=cached),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    counts: dict[str, dict[str, Any]] = {}
    saves, loads = ["ls_save", "dcp_save", "dcp_cached_save"], ["ls_load", "dcp_load"]
    for round_ in range(-1, spec["rounds"]):  # round -1 warms up (first collectives, lazy imports, the first plan)
        flip = round_ % 2 == 1
        for name in (saves[::-1] if flip else saves) + (loads[::-1] if flip else loads):
            elapsed, used = _timed(spy, lambda n=name, r=round_: variants[n](r))
            if round_ >= 0:
                times[name].append(elapsed)
                counts[name] = used
    return {"times": times, "counts": counts}


def _counts(spec: dict[str, Any], spy: Any, rank: int) -> dict[str, Any]:
    import torch

    from lightning_sharing import CheckpointCoordinator, RNGState, SharingPattern, StateComponent

    torch.manual_seed(0)
    model = _Holder(_tiny_state(32))
    optimizer = _Holder({f"m{i}": torch.zeros(8) for i in range(8)})
    coordinator = CheckpointCoordinator([
        StateComponent("model", model, SharingPattern.REPLICATED, validate_replication=True),
        StateComponent("optimizer", optimizer, SharingPattern.REPLICATED),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
    ])
    root = Path(spec["dir"])
    steps = {
        "first save": lambda: coordinator.save_checkpoint(root / "a.ckpt", step=1),
        "repeat save": lambda: coordinator.save_checkpoint(root / "b.ckpt", step=2),
        "load": lambda: coordinator.load_checkpoint(root / "b.ckpt"),
    }
    return {name: _timed(spy, work)[1] for name, work in steps.items()}


# ------------------------------------------------------------------------------------------------ the report
def _total(counts: dict[str, int]) -> int:
    return sum(v for k, v in counts.items() if k != "barrier")


def _described(calls: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(calls.items()) if k != "barrier") or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=8, help="ranks of the timing run (0: skip it)")
    parser.add_argument("--tensors", type=int, default=1000, help="tiny tensors in the timed state")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--counts", type=int, nargs="*", default=[2, 4, 8], help="world sizes of the counting runs")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="coordination-", dir=args.dir))
    report: dict[str, Any] = {"load_before": os.getloadavg(), "counts": {}, "timings": None}
    try:
        for world in args.counts:
            scratch = workdir / f"counts-{world}"
            scratch.mkdir()
            per_rank = _launch("counts", world, workdir, {"dir": str(scratch)}, args.timeout)
            report["counts"][world] = per_rank
            _print_counts(world, per_rank)
        if args.world:
            scratch = workdir / "timings"
            scratch.mkdir()
            per_rank = _launch("timings", args.world, workdir,
                               {"dir": str(scratch), "tensors": args.tensors, "rounds": args.rounds}, args.timeout)
            report["timings"] = _print_timings(args.world, args.tensors, per_rank)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["load_after"] = os.getloadavg()
    print(f"load average (1, 5, 15 min) before: {report['load_before']}, after: {report['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def _print_counts(world: int, per_rank: list[dict[str, Any]]) -> None:
    print(f"\n{world} ranks: collectives per operation (calls the package makes | tensor collectives on the wire) "
          "and metadata bytes delivered")
    print("| operation | calls | wire ops | bytes to rank 1 | bytes to rank 0 |")
    print("|---|---|---|---:|---:|")
    for name in per_rank[0]:
        one, zero = per_rank[1][name], per_rank[0][name]
        print(f"| {name} | {_total(one['calls'])}: {_described(one['calls'])} | {_total(one['wire'])}: "
              f"{_described(one['wire'])} | {one['received']} | {zero['received']} |")


def _print_timings(world: int, tensors: int, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    names = list(per_rank[0]["times"])
    slowest = {name: [max(col) for col in zip(*(r["times"][name] for r in per_rank), strict=True)] for name in names}
    median = {name: statistics.median(values) for name, values in slowest.items()}
    print(f"\n{world} ranks, {tensors} tiny tensors: median of {len(slowest[names[0]])} rounds (slowest rank), "
          "and the collectives rank 1 ran")
    print("| operation | median ms | min-max ms | calls | wire ops | bytes to rank 1 |")
    print("|---|---:|---|---|---|---:|")
    for name in names:
        used = per_rank[1]["counts"][name]
        print(f"| {name} | {median[name] * 1e3:.1f} | {min(slowest[name]) * 1e3:.1f}-{max(slowest[name]) * 1e3:.1f} "
              f"| {_total(used['calls'])}: {_described(used['calls'])} | {_total(used['wire'])} | "
              f"{used['received']} |")
    ratios = {"save": median["ls_save"] / median["dcp_save"], "load": median["ls_load"] / median["dcp_load"],
              "save_vs_cached_dcp": median["ls_save"] / median["dcp_cached_save"]}
    print(f"ratios: save {ratios['save']:.2f}x of DCP's, load {ratios['load']:.2f}x of DCP's, save "
          f"{ratios['save_vs_cached_dcp']:.2f}x of DCP's with plan caching")
    return {"median_s": median, "rounds_s": slowest, "ratios": ratios,
            "counts_rank1": {name: per_rank[1]["counts"][name] for name in names}}


if __name__ == "__main__":
    sys.exit(main())

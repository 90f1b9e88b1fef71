"""Start one launch (variants sharing one state) on ``world`` fresh worker processes (gloo on loopback), collect
what each rank reported.

Each worker runs in its own session so that a hang ends by killing its whole process group; when one rank fails, the
others (likely stuck in a collective) get a short grace period and are then killed too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("_bench_worker.py")
GRACE_S = 20.0


class VariantFailed(RuntimeError):
    """A variant did not complete on every rank; the message holds each failing rank's error and log tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
               LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", PYTHONUNBUFFERED="1")
    # One thread per rank, as torchrun sets for multi-process jobs: 4 ranks on 2 cores are already oversubscribed.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    env.pop("LIGHTNING_SHARING_FAULTS", None)  # a fault-injection setting left in the shell would break the saves
    return env


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def _wait(procs: list[subprocess.Popen], timeout: float) -> str | None:
    """Wait for every worker; returns why they were killed, or None when all exited on their own."""
    deadline = time.monotonic() + timeout
    failed_at: float | None = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = now
        if failed_at is not None and now - failed_at > GRACE_S:
            _kill(procs)
            return "a rank failed and the others did not exit"
        if now > deadline:
            _kill(procs)
            return f"timed out after {timeout:.0f}s"
        time.sleep(0.1)
    return None


def run_launch(spec: dict[str, Any], world: int, workdir: Path, timeout: float) -> dict[str, list[dict[str, Any]]]:
    """Run one launch (``spec["units"]``) on ``world`` processes; returns each variant's per-rank results, or raises
    ``VariantFailed`` naming every variant of the launch."""
    name = spec["name"]
    results = workdir / f"results-{name}"
    results.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "result_dir": str(results)}
    spec_path = workdir / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    for stale in results.glob("rank*.json"):
        stale.unlink()
    port, procs, logs = free_port(), [], []
    for rank in range(world):
        log = workdir / f"{name}-rank{rank}.log"
        logs.append(log)
        with open(log, "w") as handle:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(spec_path)],
                                          env=worker_env(rank, world, port), stdout=handle,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    killed = _wait(procs, timeout)
    per_rank, problems = [], []
    for rank, log in enumerate(logs):
        path = results / f"rank{rank}.json"
        result = json.loads(path.read_text()) if path.is_file() else None
        if result is not None and result.get("ok"):
            per_rank.append(result["variants"])
            continue
        error = result["error"] if result else f"no result (exit code {procs[rank].returncode})"
        problems.append(f"rank {rank}: {error}\n--- {log} (tail)\n{log.read_text()[-3000:]}")
    if problems:
        variants = [v for unit in spec["units"] for v in unit]
        raise VariantFailed(f"{', '.join(variants)} failed ({killed or 'a rank raised'}):\n" + "\n".join(problems))
    return {variant: [ranks[variant] for ranks in per_rank] for variant in per_rank[0]}


def aggregate(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Per repeat, the slowest rank's time (the job waits for it); then the median over repeats.

    Memory: the largest per-rank peak extra RSS. Info: rank 0's description of the checkpoint, plus the GIL probe's
    worst rank.
    """
    names = sorted({name for result in per_rank for name in result["times"]})
    per_repeat: dict[str, list[float]] = {}
    for name in names:
        columns = zip(*(result["times"].get(name, []) for result in per_rank), strict=False)
        per_repeat[name] = [max(v for v in column if v is not None) for column in columns
                            if any(v is not None for v in column)]
    medians = {name: statistics.median(values) for name, values in per_repeat.items() if values}
    memory = [result["info"]["memory"] for result in per_rank]
    info = dict(per_rank[0]["info"])
    info.pop("memory", None)
    ratios = [r["info"]["gil_ratio"] for r in per_rank if "gil_ratio" in r["info"]]
    if ratios:
        info["gil_ratio"] = min(ratios)
    spread = {name: [min(values), max(values)] for name, values in per_repeat.items() if values}
    return {"per_repeat": per_repeat, "median": medians, "spread": spread, "memory_per_rank": memory,
            "times_per_rank": [result["times"] for result in per_rank],
            "info_per_rank": [{k: v for k, v in result["info"].items() if k != "memory"} for result in per_rank],
            "mem_extra": max(m["extra"] for m in memory), "mem_masked": any(m["masked"] for m in memory),
            "info": info}

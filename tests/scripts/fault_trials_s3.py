"""Killed during a save to S3: the kill trials of fault_trials.py, against moto's server, on the same machinery.

Ranks are forked and joined by gloo by ``fault_trials.run_ranks``; the state is ``fault_trials.state_at`` (plus,
for trials marked ``big``, a 17 MiB PER_RANK tensor written first by each rank, so that a kill at ``save:write``
lands in the middle of a multipart upload). The interrupted run saves steps 1..3 to ``s3://.../ckpts`` and is
killed during the second save; the next run resumes from ``find_latest_checkpoint``, checks the state it loaded
(``torch.equal``), checks that every committed checkpoint verifies, lists the leftovers (generations no manifest
names, prefixes without a manifest, unfinished multipart uploads), saves once more and lists them again.

The S3 endpoint and credentials come from the environment (``AWS_ENDPOINT_URL``, ...), as for any user.

    python tests/scripts/fault_trials_s3.py kill --url s3://bucket/prefix --out report.json --workdir DIR
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_trials import (
    NEVER,
    PATTERNS,
    WORLD,
    RankOutcome,
    _progress,
    _short,
    broadcast,
    mismatches,
    ready,
    run_ranks,
    same,
    state_at,
)
from support.statefuls import Holder

from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent, find_latest_checkpoint
from lightning_sharing.checkpoint.manifest import MANIFEST_NAME
from lightning_sharing.cli import verify_checkpoint
from lightning_sharing.storage import store_for
from lightning_sharing.storage.generations import manifest_data_prefix, scan
from lightning_sharing.storage.object_store import open_client

BIG_ELEMENTS = 17 * 1024 * 1024 // 4  # float32: just over one 16 MiB part


# --------------------------------------------------------------------------- state and checks


def big_tensor(step: int, rank: int) -> torch.Tensor:
    return torch.arange(BIG_ELEMENTS, dtype=torch.float32) + (1000 * step + rank)


def make_s3_coordinator(step: int, rank: int, big: bool = False,
                        **kwargs: Any) -> tuple[CheckpointCoordinator, dict[str, Holder]]:
    """``fault_trials.make_coordinator``, with the big PER_RANK component first when ``big``."""
    holders = {"big": Holder({"w": big_tensor(step, rank)})} if big else {}
    holders.update({key: Holder(value) for key, value in state_at(step, rank).items()})
    patterns = {"big": SharingPattern.PER_RANK, **PATTERNS}
    components = [StateComponent(key, holders[key], patterns[key], validate_replication=key == "model")
                  for key in holders]
    return CheckpointCoordinator(components, **kwargs), holders


def set_s3_state(holders: dict[str, Holder], step: int, rank: int) -> None:
    for key, value in state_at(step, rank).items():
        holders[key].state = value
    if "big" in holders:
        holders["big"].state = {"w": big_tensor(step, rank)}


def s3_mismatches(holders: dict[str, Holder], step: int, rank: int) -> list[str]:
    bad = mismatches(holders, step, rank)
    if "big" in holders and not same(holders["big"].state, {"w": big_tensor(step, rank)}):
        bad.append("big")
    return bad


def target(root: str, mode: str, step: int) -> str:
    return f"{root}/{'last.ckpt' if mode == 'last' else f'step={step}.ckpt'}"


def leftovers(root: str) -> list[str]:
    """What interrupted saves left below ``root``: unnamed generations, manifest-less prefixes, unfinished uploads."""
    client, base, _ = open_client(root, {"client": "fsspec"})  # s3fs sees unfinished uploads itself
    found: list[str] = []
    for prefix in client.list(f"{base}/", delimiter=True)[0]:
        name, state = posixpath.basename(prefix), scan(client, prefix)
        if not state.has_manifest:
            found.append(f"{name} (no manifest: {sorted(state.generations + state.foreign)})")
            continue
        named = manifest_data_prefix(client.get(f"{prefix}/{MANIFEST_NAME}")[0])
        found += [f"{name}/{generation}" for generation in state.generations if generation != named]
    found += [f"unfinished upload {key[len(base) + 1:]}" for key, _ in client.uploads(f"{base}/")]
    return sorted(found)


def audit(root: str) -> list[str]:
    """Every committed checkpoint below ``root`` that does not verify (with the problems)."""
    store = store_for(root)
    client = open_client(root)[0]
    bad = []
    for location in store.list_checkpoint_candidates(store.normalize(root)):
        if not scan(client, open_client(location)[1]).has_manifest:
            continue  # not a checkpoint; leftovers() reports it
        try:
            problems = [p.message for p in verify_checkpoint(location)[1]]
        except Exception as exc:  # reported, the caller decides
            problems = [f"{type(exc).__name__}: {exc}"]
        bad += [f"{posixpath.basename(location)}: {p}" for p in problems]
    return bad


# --------------------------------------------------------------------------- the two runs


def train_worker(rank: int, world: int, root: str, mode: str, saves: int, async_save: bool, big: bool,
                 progress: str) -> dict[str, Any]:
    """Save the state at steps 1..saves; note each committed save in ``progress``-``rank``."""
    coordinator, holders = make_s3_coordinator(0, rank, big, async_save=async_save)
    dist.barrier()
    ready()
    started = time.monotonic()

    def committed(step: int) -> None:
        with open(f"{progress}-{rank}", "a") as handle:
            handle.write(f"{step}\n")

    for step in range(1, saves + 1):
        set_s3_state(holders, step, rank)
        coordinator.save_checkpoint(target(root, mode, step), step=step)
        if not async_save:
            committed(step)
        elif step > 1:
            committed(step - 1)
    if async_save:
        coordinator.wait()
        committed(saves)
    return {"seconds": time.monotonic() - started}


def resume_worker(rank: int, world: int, root: str, mode: str, big: bool) -> dict[str, Any]:
    """Resume from the newest complete checkpoint, check it exactly, save once more; rank 0 audits the store."""
    report: dict[str, Any] = {"step": 0, "mismatch": [], "resumed_from": None}
    if rank == 0:
        report["leftovers_before"], report["incomplete"] = leftovers(root), audit(root)
    latest = broadcast(find_latest_checkpoint(root) if rank == 0 else None)
    coordinator, holders = make_s3_coordinator(10**6, rank, big)
    if latest:
        loaded = coordinator.load_checkpoint(latest)
        report.update(resumed_from=posixpath.basename(latest), step=loaded.manifest.step,
                      mismatch=s3_mismatches(holders, loaded.manifest.step, rank))
    dist.barrier()
    step = report["step"] + 1
    set_s3_state(holders, step, rank)
    coordinator.save_checkpoint(target(root, mode, step), step=step)
    dist.barrier()
    if rank == 0:
        report["leftovers_after"], report["incomplete_after"] = leftovers(root), audit(root)
    return report


@dataclass
class S3Trial:
    name: str
    mode: str = "steps"  # steps: step={s}.ckpt; last: every save replaces last.ckpt
    fault: str | None = None  # LIGHTNING_SHARING_FAULTS; {big0} / {big1}: rank 0's / 1's big object of save 2
    kill_delay: float | None = None  # or: SIGKILL ``victims`` this long (x the calibrated duration) after ready()
    victims: tuple[int, ...] = ()
    big: bool = False
    async_save: bool = False
    saves: int = 3


TRIALS = [
    S3Trial("write-rank1-multipart", fault="save:write@1:kill#{big1}", big=True),
    S3Trial("write-rank0-multipart-last", mode="last", fault="save:write@0:kill#{big0}", big=True),
    S3Trial("start-rank0-last", mode="last", fault="save:start@0:kill#2"),
    S3Trial("written-all", fault="save:written@*:kill#2"),
    S3Trial("before-manifest-rank0-last", mode="last", fault="commit:manifest@0:kill#2"),
    S3Trial("before-put-rank0", fault="commit:rename@0:kill#2"),
    S3Trial("before-put-rank0-last", mode="last", fault="commit:rename@0:kill#2"),
    S3Trial("after-put-rank0", fault="commit:renamed@0:kill#2"),
    S3Trial("after-put-rank0-last", mode="last", fault="commit:renamed@0:kill#2"),
    S3Trial("before-put-rank0-async-last", mode="last", fault="commit:rename@0:kill#2", async_save=True),
    S3Trial("timer-all", kill_delay=0.6, victims=(0, 1), big=True),
]


def calibrate(root: str, workdir: Path) -> dict[str, Any]:
    """A fault-free big run: objects each rank writes per save (big first), and how long the saves take."""
    outcomes = run_ranks(train_worker, f"{root}/calibration", "steps", 3, False, True, str(workdir / "progress"),
                         workdir=workdir, faults=NEVER, timeout=120)
    if any(o.status != "ok" for o in outcomes):
        raise RuntimeError(f"calibration failed: {[_short(o) for o in outcomes]}")
    per_save = [o.hits.get("save:write", 0) // 3 for o in outcomes]
    return {"per_save": per_save, "duration": max(o.result["seconds"] for o in outcomes)}


def run_trial(trial: S3Trial, root: str, workdir: Path, calibration: dict[str, Any]) -> dict[str, Any]:
    base = workdir / trial.name
    base.mkdir(parents=True)
    per_save = calibration["per_save"]
    # save:write fires twice per object on an object store: once the safetensors header is in the writer's buffer,
    # and once the object's first part has been handed to the uploader. With ``big`` the big object is each save's
    # first, so hit per_save + 2 is the second save's big object, mid multipart upload.
    fault = trial.fault.format(big0=per_save[0] + 2, big1=per_save[1] + 2) if trial.fault else None
    kill_at = (round(trial.kill_delay * calibration["duration"], 3), trial.victims) if trial.kill_delay else None
    url = f"{root}/{trial.name}/ckpts"
    started = time.monotonic()
    first = run_ranks(train_worker, url, trial.mode, trial.saves, trial.async_save, trial.big, str(base / "progress"),
                      workdir=base, faults=fault, kill_at=kill_at, timeout=90)
    completed = _progress(base)
    second = run_ranks(resume_worker, url, trial.mode, trial.big, workdir=base, timeout=90)
    return judge(trial, fault, first, second, completed, time.monotonic() - started)


def judge(trial: S3Trial, fault: str | None, first: list[RankOutcome], second: list[RankOutcome], completed: int,
          seconds: float) -> dict[str, Any]:
    """No hang; survivors raised; resumed exactly the newest committed checkpoint; every committed one intact;
    no leftovers after the next save."""
    died = [o.rank for o in first if o.status == "killed"]
    point = fault.split("@")[0] if fault else None
    if trial.kill_delay is not None:
        expected = sorted({completed, min(completed + 1, trial.saves)})
    else:
        expected = [completed + 1] if died and point == "commit:renamed" else [completed]
    problems = [f"run {i} rank {o.rank} hung" for i, run in enumerate((first, second), 1) for o in run
                if o.status == "hung"]
    if trial.kill_delay is None:
        problems += [f"rank {o.rank} {_short(o)} after {died} were killed (expected an error)" for o in first
                     if o.status not in ("killed", "error")]
        if not died:
            problems.append("no rank was killed")
    problems += [f"resume rank {o.rank}: {_short(o)}" for o in second if o.status != "ok"]
    report = second[0].result if second[0].status == "ok" else {}
    if not problems:
        results = [o.result for o in second]
        if any(r["mismatch"] for r in results):
            problems.append(f"loaded state differs from step {report['step']}: {[r['mismatch'] for r in results]}")
        if report["incomplete"] or report["incomplete_after"]:
            problems.append(f"damaged committed checkpoints: {report['incomplete'] + report['incomplete_after']}")
        if {r["step"] for r in results} != {report["step"]} or report["step"] not in expected:
            problems.append(f"resumed from step {report['step']}, expected one of {expected}")
        if report["leftovers_after"]:
            problems.append(f"leftovers after the next save: {report['leftovers_after']}")
    return {"trial": asdict(trial), "fault": fault, "problems": problems, "died": died, "expected_steps": expected,
            "interrupted_run": {o.rank: _short(o) for o in first}, "resumed_from": report.get("resumed_from"),
            "resumed_step": report.get("step"), "leftovers_before": report.get("leftovers_before"),
            "leftovers_after": report.get("leftovers_after"), "seconds": round(seconds, 2)}


def kill_suite(root: str, workdir: Path) -> dict[str, Any]:
    calibration = calibrate(root, workdir / "calibration")
    return {"calibration": calibration, "world": WORLD,
            "trials": [run_trial(trial, root, workdir, calibration) for trial in TRIALS]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=["kill"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.write_text(json.dumps(kill_suite(args.url.rstrip("/"), args.workdir), indent=1, default=str))


if __name__ == "__main__":
    main()

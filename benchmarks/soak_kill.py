"""Soak test: many seeded random "killed during save" trials on real two-rank gloo runs.

Each trial (tests/scripts/fault_trials.py) runs a plain PyTorch script that saves the state at steps 1..3
with ``CheckpointCoordinator``, killed by SIGKILL at a random fault point of a save (``save:start``,
``save:write``, ``save:written``, ``commit:manifest``, ``commit:rename``, ``commit:renamed``), on a random
victim (rank 0, rank 1 or every rank), at a random occurrence #N, or -- one trial in five -- by a timer
SIGKILL at a random delay during the saves. One trial in four saves with ``async_save=True`` (the files
are written and committed by a background thread while the script goes on). A new run then resumes from
``find_latest_checkpoint``, checks that the loaded state equals exactly the state saved at that
checkpoint's step on every rank, checks every visible checkpoint with ``verify``, saves again and checks
that no staging leftovers remain.

    python benchmarks/soak_kill.py [--trials 60] [--seed 0] [--json soak.json] [--workdir DIR]

Prints one line per trial and the totals: trials, resumed correctly, corrupt resumes, hangs (a rank
over its time limit, killed with its process group), other failures. Exit code 1 unless every trial
resumed correctly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from fault_trials import calibrate, random_trial, run_kill_trial  # noqa: E402

VERDICTS = ("resumed correctly", "corrupt resume", "hang", "failed")


def _what(trial: dict) -> str:
    spec = trial["trial"]
    if spec["kill_delay"] is not None:
        return f"timer {spec['kill_delay']:.3f}s kill {list(spec['victims'])}"
    return spec["fault"]


def _resumed(trial: dict) -> str:
    if trial["resumed_step"] is None:
        return "-"
    if not trial["resumed_from"]:
        return "nothing (fresh start)"
    return f"{trial['resumed_from']} (step {trial['resumed_step']})"


def _relation(trial: dict) -> str:
    """How the checkpoint resumed from relates to the interrupted run's last completed save."""
    step, done = trial["resumed_step"], trial["completed_saves"]
    if step is None:
        return "no resume"
    if step == 0:
        return "fresh start (no save had completed)"
    if step == done:
        return "newest save the run saw complete"
    if step == done + 1:
        return "the save in flight (already renamed into place)"
    return f"other (step {step}, {done} completed)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0, help="trial i uses seed SEED+i")
    parser.add_argument("--json", type=Path, default=None, help="write every trial's full record here")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="soak-kill-"))
    started = time.monotonic()
    try:
        calibration = calibrate(work)
        print(f"calibration: per-save fault-point hits by rank {calibration['per_save']}, "
              f"saves take {calibration['duration']:.3f}s", flush=True)
        header = f"{'seed':>5}  {'mode':11}  {'fault':44}  {'killed':7}  {'done':4}  {'resumed from':24}  verdict"
        print(header)
        print("-" * len(header))
        results = []
        for index in range(args.trials):
            seed = args.seed + index
            result = run_kill_trial(random_trial(seed, calibration), work)
            results.append(result)
            mode = result["trial"]["mode"] + ("/async" if result["trial"]["async_save"] else "")
            print(f"{seed:>5}  {mode:11}  {_what(result):44}  {result['died']!s:7}  "
                  f"{result['completed_saves']:>4}  {_resumed(result):24}  {result['verdict']}"
                  + (f"  {result['problems']}" if result["problems"] else ""), flush=True)
            shutil.rmtree(work / result["trial"]["name"], ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    verdicts = Counter(r["verdict"] for r in results)
    relations = Counter(_relation(r) for r in results)
    timers = sum(r["trial"]["kill_delay"] is not None for r in results)
    asynchronous = sum(r["trial"]["async_save"] for r in results)
    print()
    print(f"trials:             {len(results)} ({len(results) - timers} at fault points, {timers} timer kills; "
          f"{asynchronous} with async_save; {time.monotonic() - started:.0f}s)")
    for verdict in VERDICTS:
        print(f"{verdict + ':':19} {verdicts.get(verdict, 0)}")
    print("resumed from:")
    for relation, count in relations.most_common():
        print(f"  {count:>3}  {relation}")
    if args.json:
        args.json.write_text(json.dumps({"calibration": calibration, "trials": results}, indent=1))
    return 0 if verdicts.get("resumed correctly", 0) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

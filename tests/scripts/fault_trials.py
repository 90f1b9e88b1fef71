"""Fault-injection runs on real two-rank gloo process groups, for tests/test_fault_*.py and benchmarks/soak_kill.py.

This process imports torch and lightning_sharing once and then *forks* one process per rank for every run
(a fresh interpreter per rank would cost seconds each). Each rank process gets its own session, joins a new
gloo process group, runs a plain-PyTorch worker (``CheckpointCoordinator`` only, no Lightning) and reports
a JSON record; a rank that is still alive after the run's time limit is killed with its process group and
reported as ``hung``. Faults come from ``LIGHTNING_SHARING_FAULTS`` (see ``lightning_sharing/_faults.py``),
set in the rank processes only; timer kills are sent from here.

The checkpointed state is a pure function of the step (``state_at``), so a resumed run can check that what
it loaded is exactly what was saved at the step its checkpoint records. The state covers every kind of
file a checkpoint has: a flat tensor dict (safetensors shard + index), a tree (JSON + shard + index), per-rank
trees and tensors (with a merged index), and a JSON-only GLOBAL value.

Command line (each suite writes a JSON report to ``--out``):
    python tests/scripts/fault_trials.py kill --out report.json [--random N --seed S]
    python tests/scripts/fault_trials.py storage|peer|corruption --out report.json
    unshare -rm python tests/scripts/fault_trials.py small-fs --out report.json   # a real, full tmpfs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from lightning_sharing import (
    CheckpointCoordinator,
    CheckpointManifest,
    SharingPattern,
    StateComponent,
    _faults,
    find_latest_checkpoint,
)
from lightning_sharing.cli import verify_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared support package
from support.statefuls import Holder

WORLD = 2
SAVE_POINTS = ("save:start", "save:write", "save:written", "commit:manifest", "commit:rename", "commit:renamed")
RANK0_ONLY = frozenset({"commit:manifest", "commit:rename", "commit:renamed"})
TEMP_RE = re.compile(r"^\.(?:.+\.)?(staging|replaced|removing)-[0-9a-f]{32}$")
NEVER = "load:read@99:raise"  # a valid fault spec that never fires: makes _faults count the points it passes

# --------------------------------------------------------------------------- deterministic state


def state_at(step: int, rank: int) -> dict[str, Any]:
    """Every component's state at ``step`` on ``rank`` (REPLICATED/GLOBAL parts do not depend on the rank)."""
    shared = torch.Generator().manual_seed(1000 * step + 1)
    own = torch.Generator().manual_seed(1000 * step + 17 + rank)
    return {
        # flat tensor dict: model-00001-of-00001.safetensors + model.safetensors.index.json
        "model": {"layer.weight": torch.randn(3, 4, generator=shared), "layer.bias": torch.randn(3, generator=shared)},
        # tree: optim.json + optim-00001-of-00001.safetensors + optim.safetensors.index.json
        "optim": {"step": step, "lr": 0.5 / (step + 1), "betas": (0.9, 0.99),
                  "exp_avg": torch.randn(3, 4, generator=shared)},
        # GLOBAL, JSON only: counter.json
        "counter": {"step": step, "name": f"step-{step}"},
        # PER_RANK tree: rng/rank-0000r.json + shard + index
        "rng": {"rank": rank, "step": step, "draws": torch.randint(0, 2**31, (5,), generator=own)},
        # PER_RANK flat: stage/rank-0000r-00001-of-00001.safetensors + index, and the merged stage index
        "stage": {f"stage{rank}.weight": torch.randn(2, 2, generator=own)},
    }



PATTERNS = {"model": SharingPattern.REPLICATED, "optim": SharingPattern.REPLICATED, "counter": SharingPattern.GLOBAL,
            "rng": SharingPattern.PER_RANK, "stage": SharingPattern.PER_RANK}


def make_coordinator(step: int, rank: int, **kwargs: Any) -> tuple[CheckpointCoordinator, dict[str, Holder]]:
    holders = {key: Holder(value) for key, value in state_at(step, rank).items()}
    components = [StateComponent(key, holders[key], PATTERNS[key], validate_replication=key == "model")
                  for key in holders]
    return CheckpointCoordinator(components, **kwargs), holders


def set_state(holders: dict[str, Holder], step: int, rank: int) -> None:
    for key, value in state_at(step, rank).items():
        holders[key].state = value


def same(a: Any, b: Any) -> bool:
    """Exact equality: tensors by ``torch.equal`` (and dtype), containers and scalars by type and value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and torch.equal(a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def mismatches(holders: dict[str, Holder], step: int, rank: int) -> list[str]:
    expected = state_at(step, rank)
    return [key for key in expected if not same(holders[key].state, expected[key])]


def temps(root: Path) -> list[str]:
    """Leftovers of interrupted saves (staging, replaced or half-removed directories) in ``root``."""
    return sorted(p.name for p in root.iterdir() if TEMP_RE.match(p.name)) if root.is_dir() else []


def audit(root: Path) -> list[str]:
    """Every visible entry of ``root`` that is not a complete, intact checkpoint (with the reason)."""
    bad = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        try:
            _, problems = verify_checkpoint(entry)
        except Exception as exc:  # reported, the caller decides
            bad.append(f"{entry.name}: {type(exc).__name__}: {exc}")
            continue
        bad.extend(f"{entry.name}: {p.message}" for p in problems)
    return bad


def broadcast(value: Any) -> Any:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- forked ranks

_MARK: list[float] = []
_READY: list[Path] = []


def ready() -> None:
    """Tell the parent this rank is about to do what a timer kill should hit (the timer starts once all are)."""
    _READY[0].touch()


def mark() -> None:
    """Start the clock for ``since_mark`` in this rank's record (e.g. right before the operation under test)."""
    _MARK[:] = [time.monotonic()]


@dataclass
class RankOutcome:
    """How one rank process ended."""

    rank: int
    status: str  # ok | error | killed | exited | hung
    code: int | None = None  # exit status, or minus the signal number
    result: Any = None
    error_type: str | None = None
    error_types: list[str] = field(default_factory=list)  # the exception's class and its bases
    error: str | None = None
    elapsed: float | None = None  # seconds from the start of the worker to its return or raise
    since_mark: float | None = None  # seconds from mark() to the return or raise
    hits: dict[str, int] = field(default_factory=dict)  # fault points passed while a fault spec was set
    traceback: str | None = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill(pid: int) -> None:
    for send in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            send()
        except (ProcessLookupError, PermissionError):
            pass


def _rank_main(worker: Callable[..., Any], args: tuple[Any, ...], rank: int, world: int, port: int,
               faults: str | None, pg_timeout: float, out: Path) -> NoReturn:
    code = 1
    try:
        os.setsid()  # its own process group: a hang is ended by killing the group
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                           "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)})
        if faults:
            os.environ[_faults.FAULTS_ENV] = faults
        else:
            os.environ.pop(_faults.FAULTS_ENV, None)
        _faults._hits.clear()
        _MARK.clear()
        _READY[:] = [out / f"ready-{rank}"]
        record: dict[str, Any] = {"rank": rank}
        started = time.monotonic()
        try:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=pg_timeout))
            record.update(status="ok", result=worker(rank, world, *args))
            code = 0
        except BaseException as exc:  # the record carries it to the parent
            record.update(status="error", error_type=type(exc).__name__,
                          error_types=[c.__name__ for c in type(exc).__mro__], error=str(exc),
                          traceback=traceback.format_exc())
        now = time.monotonic()
        record.update(elapsed=now - started, since_mark=now - _MARK[0] if _MARK else None, hits=dict(_faults._hits))
        tmp = out / f".rank-{rank}.json"
        tmp.write_text(json.dumps(record, default=str))
        os.replace(tmp, out / f"rank-{rank}.json")
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)  # no interpreter teardown: the parent's state must not run twice


def run_ranks(worker: Callable[..., Any], *args: Any, workdir: Path, faults: str | None = None,
              pg_timeout: float = 10.0, timeout: float = 40.0, kill_at: tuple[float, tuple[int, ...]] | None = None,
              expect_hung: tuple[int, ...] = ()) -> list[RankOutcome]:
    """Run ``worker(rank, world, *args)`` on ``WORLD`` forked ranks joined by a gloo process group.

    ``faults`` is set as LIGHTNING_SHARING_FAULTS in the ranks. ``kill_at=(delay, ranks)`` SIGKILLs those
    ranks ``delay`` seconds after every rank has called ``ready()``. Ranks still running after ``timeout``
    seconds are killed and reported as ``hung``; ranks in ``expect_hung`` are killed as soon as every other
    rank has finished.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="ranks-", dir=workdir))
    port = free_port()
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for rank in range(WORLD):
        pid = os.fork()
        if pid == 0:
            _rank_main(worker, args, rank, WORLD, port, faults, pg_timeout, out)
        pids.append(pid)
    started = time.monotonic()
    statuses: dict[int, int] = {}
    timer_pending = kill_at is not None
    timer_start: float | None = None
    hung: list[int] = []
    while len(statuses) < WORLD:
        now = time.monotonic()
        elapsed = now - started
        if timer_pending and timer_start is None and all((out / f"ready-{r}").exists() for r in range(WORLD)):
            timer_start = now
        if timer_pending and timer_start is not None and now - timer_start >= kill_at[0]:
            for rank in kill_at[1]:
                if rank not in statuses:
                    _kill(pids[rank])
            timer_pending = False
        for rank, pid in enumerate(pids):
            if rank not in statuses:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    statuses[rank] = status
        others_done = all(r in statuses for r in range(WORLD) if r not in expect_hung)
        if elapsed > timeout or (expect_hung and others_done):
            hung = [r for r in range(WORLD) if r not in statuses]
            for rank in hung:
                _kill(pids[rank])
                statuses[rank] = os.waitpid(pids[rank], 0)[1]
            break
        time.sleep(0.005)
    outcomes = []
    for rank in range(WORLD):
        status = statuses[rank]
        record_path = out / f"rank-{rank}.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else None
        if rank in hung:
            outcomes.append(RankOutcome(rank, "hung", -signal.SIGKILL))
        elif os.WIFSIGNALED(status):
            outcomes.append(RankOutcome(rank, "killed", -os.WTERMSIG(status)))
        elif record is None:
            outcomes.append(RankOutcome(rank, "exited", os.WEXITSTATUS(status)))
        else:
            outcomes.append(RankOutcome(code=os.WEXITSTATUS(status), **record))
    shutil.rmtree(out, ignore_errors=True)
    return outcomes


# --------------------------------------------------------------------------- killed during save


def target(root: Path, mode: str, step: int) -> Path:
    return root / ("last.ckpt" if mode == "last" else f"step={step}.ckpt")


def train_worker(rank: int, world: int, root: str, mode: str, saves: int, async_save: bool) -> dict[str, Any]:
    """Save ``saves`` checkpoints of the state at steps 1..saves; note each committed save in a progress file.

    With ``async_save`` a save returns once the state is staged and is written in the background; the
    next save first waits for it (one pending save at most), so when save s returns, save s-1 is committed.
    """
    coordinator, holders = make_coordinator(0, rank, async_save=async_save)
    dist.barrier()
    ready()
    started = time.monotonic()

    def committed(step: int) -> None:
        with open(Path(root).parent / f"progress-{rank}", "a") as handle:
            handle.write(f"{step}\n")

    for step in range(1, saves + 1):
        set_state(holders, step, rank)
        coordinator.save_checkpoint(target(Path(root), mode, step), step=step)
        if async_save and step > 1:
            committed(step - 1)
        elif not async_save:
            committed(step)
    if async_save:
        coordinator.wait()
        committed(saves)
    return {"saved": saves, "seconds": time.monotonic() - started}


def resume_worker(rank: int, world: int, root: str, mode: str) -> dict[str, Any]:
    """The next run: resume from the newest complete checkpoint, check the state, save once more."""
    base = Path(root)
    latest = broadcast(str(find_latest_checkpoint(base) or "") if rank == 0 else None)
    coordinator, holders = make_coordinator(10**6, rank)  # fresh objects whose state differs from any save
    report: dict[str, Any] = {"resumed_from": Path(latest).name if latest else None, "step": 0, "mismatch": []}
    if latest:
        loaded = coordinator.load_checkpoint(latest)
        report["step"] = loaded.manifest.step
        report["mismatch"] = mismatches(holders, loaded.manifest.step, rank)
    if rank == 0:
        report["incomplete"] = audit(base)
        report["temps_before"] = temps(base)
    dist.barrier()
    step = report["step"] + 1
    set_state(holders, step, rank)
    report["next_save_error"] = None
    try:
        coordinator.save_checkpoint(target(base, mode, step), step=step)
    except Exception as exc:  # reported with what was found before it
        report["next_save_error"] = f"{type(exc).__name__}: {exc}"
    if rank == 0:
        report["temps_after"] = temps(base)
        report["new_intact"] = audit(base) == []
    return report


@dataclass
class Trial:
    """One interrupted run and the run that resumes it."""

    name: str
    mode: str = "steps"  # steps: every save to step={s}.ckpt; last: every save replaces last.ckpt
    saves: int = 3
    fault: str | None = None  # LIGHTNING_SHARING_FAULTS for the interrupted run
    kill_delay: float | None = None  # or: SIGKILL `victims` this many seconds after the interrupted run started
    victims: tuple[int, ...] = ()
    async_save: bool = False  # CheckpointCoordinator(async_save=True): writes and commits in a background thread


def _progress(base: Path) -> int:
    steps = [int(line) for rank in range(WORLD) if (base / f"progress-{rank}").exists()
             for line in (base / f"progress-{rank}").read_text().split()]
    return max(steps, default=0)


def _short(outcome: RankOutcome) -> str:
    if outcome.status == "error":
        return f"error {outcome.error_type}: {(outcome.error or '')[:160]}"
    if outcome.status in ("killed", "exited"):
        return f"{outcome.status} ({outcome.code})"
    return outcome.status


def run_kill_trial(trial: Trial, workdir: Path) -> dict[str, Any]:
    """Run ``trial`` and judge it: no hang, survivors raised, resumed exactly the newest complete checkpoint."""
    base = workdir / trial.name
    root = base / "ckpts"
    root.mkdir(parents=True)
    kill_at = (trial.kill_delay, trial.victims) if trial.kill_delay is not None else None
    started = time.monotonic()
    first = run_ranks(train_worker, str(root), trial.mode, trial.saves, trial.async_save, workdir=base,
                      faults=trial.fault, kill_at=kill_at)
    completed = _progress(base)
    leftovers = temps(root)
    second = run_ranks(resume_worker, str(root), trial.mode, workdir=base)
    died = [o.rank for o in first if o.status == "killed"]
    point = trial.fault.split("@")[0] if trial.fault else None
    if trial.kill_delay is not None:
        expected = sorted({completed, min(completed + 1, trial.saves)})
    elif died and point == "commit:renamed":
        expected = [completed + 1]
    else:
        expected = [completed]
    problems: list[str] = []
    verdict = "resumed correctly"
    if any(o.status == "hung" for o in first + second):
        verdict = "hang"
        problems.append("a rank hung: " + "; ".join(f"run {i} rank {o.rank}: {o.status}"
                                                   for i, run in enumerate((first, second), 1) for o in run))
    else:
        if died and trial.kill_delay is None:
            problems += [f"rank {o.rank} {_short(o)} after rank(s) {died} were killed (expected an error)"
                         for o in first if o.status not in ("killed", "error")]
        elif not died:
            problems += [f"rank {o.rank}: {_short(o)}" for o in first if o.status != "ok"]
        failed = [o for o in second if o.status != "ok"]
        if failed:
            corrupt = any({"CorruptCheckpointError", "ManifestError"} & set(o.error_types) for o in failed)
            verdict = "corrupt resume" if corrupt else "failed"
            problems += [f"resume rank {o.rank}: {_short(o)}" for o in failed]
        else:
            results = [o.result for o in second]
            report0 = results[0]
            if any(r["mismatch"] for r in results):
                verdict = "corrupt resume"
                problems.append(f"loaded state differs from the state saved at step {report0['step']}: "
                                f"{[r['mismatch'] for r in results]}")
            if report0["incomplete"]:
                verdict = "corrupt resume"
                problems.append(f"incomplete or damaged checkpoints visible: {report0['incomplete']}")
            if {r["step"] for r in results} != {report0["step"]} or report0["step"] not in expected:
                problems.append(f"resumed from step {report0['step']}, expected one of {expected}")
            if any(r["next_save_error"] for r in results):
                problems.append(f"the next save failed: {[r['next_save_error'] for r in results]}")
            if report0["temps_after"]:
                problems.append(f"leftovers after the next save: {report0['temps_after']}")
            if not report0["new_intact"]:
                problems.append("a checkpoint is not intact after the next save")
        if problems and verdict == "resumed correctly":
            verdict = "failed"
    resumed = second[0].result if second[0].status == "ok" else {}
    return {
        "trial": asdict(trial),
        "verdict": verdict,
        "problems": problems,
        "interrupted_run": {o.rank: _short(o) for o in first},
        "survivor_errors": {o.rank: {"types": o.error_types, "message": o.error, "elapsed": o.elapsed}
                            for o in first if o.status == "error"},
        "died": died,
        "completed_saves": completed,
        "expected_steps": expected,
        "resumed_from": resumed.get("resumed_from"),
        "resumed_step": resumed.get("step"),
        "leftovers_after_interruption": leftovers,
        "temps_before_next_save": resumed.get("temps_before"),
        "temps_after_next_save": resumed.get("temps_after"),
        "seconds": round(time.monotonic() - started, 2),
    }


def calibrate(workdir: Path, saves: int = 3, runs: int = 3) -> dict[str, Any]:
    """Fault-free twins of the interrupted run: how often each rank passes each point per save, how long it takes.

    ``per_save`` and ``duration`` are for synchronous saves, ``per_save_async`` for ``async_save=True``.
    """
    durations = []
    per_save: dict[bool, dict[str, list[int]]] = {}
    for run in range(runs):
        for async_save in (False, True) if run == 0 else (False,):
            root = workdir / f"calibration-{run}-{int(async_save)}" / "ckpts"
            root.mkdir(parents=True)
            outcomes = run_ranks(train_worker, str(root), "steps", saves, async_save, workdir=root.parent,
                                 faults=NEVER)
            bad = [_short(o) for o in outcomes if o.status != "ok"]
            if bad:
                raise RuntimeError(f"calibration run failed: {bad}")
            per_save[async_save] = {point: [o.hits.get(point, 0) // saves for o in outcomes]
                                    for point in SAVE_POINTS}
            if not async_save:
                # How long the saves take (from every rank's ready() to its last save): the window for timer kills.
                durations.append(max(o.result["seconds"] for o in outcomes))
            shutil.rmtree(root.parent, ignore_errors=True)
    return {"per_save": per_save[False], "per_save_async": per_save[True], "duration": min(durations),
            "saves": saves}


def random_trial(seed: int, calibration: dict[str, Any]) -> Trial:
    """A seeded random trial: a kill at a random point, victim and occurrence, or (1 in 5) at a random time.

    One trial in four saves asynchronously (``async_save=True``).
    """
    rng = random.Random(seed)
    mode = rng.choice(["steps", "last"])
    saves = calibration["saves"]
    async_save = rng.random() < 0.25
    if rng.random() < 0.2:
        victims = rng.choice([(0,), (1,), (0, 1)])
        delay = round(rng.uniform(0.0, 0.9) * calibration["duration"], 3)
        return Trial(f"seed{seed}", mode, saves, kill_delay=delay, victims=victims, async_save=async_save)
    point = rng.choice(SAVE_POINTS)
    who = rng.choice(["0", "*"] if point in RANK0_ONLY else ["0", "1", "*"])
    hits = calibration["per_save_async" if async_save else "per_save"][point]
    per_save = max(hits) if who == "*" else hits[int(who)]
    occurrence = rng.randint(1, max(1, per_save * saves))
    return Trial(f"seed{seed}", mode, saves, fault=f"{point}@{who}:kill#{occurrence}", async_save=async_save)


# Named scenarios for CI: each fault fires during the second of three saves (occurrences from calibration).
def named_trials(calibration: dict[str, Any]) -> list[Trial]:
    write0, write1 = calibration["per_save"]["save:write"]
    window = calibration["duration"]
    return [
        Trial("write-rank1", fault=f"save:write@1:kill#{write1 + 1}"),
        Trial("write-all", fault=f"save:write@0:kill#{write0 + 1},save:write@1:kill#{write1 + 1}"),
        Trial("manifest-write-rank0", mode="last", fault=f"save:write@0:kill#{2 * write0}"),
        Trial("start-rank0", fault="save:start@0:kill#2"),
        Trial("written-rank1", mode="last", fault="save:written@1:kill#2"),
        Trial("written-all", fault="save:written@*:kill#2"),
        Trial("before-manifest-rank0", fault="commit:manifest@0:kill#2"),
        Trial("before-rename-rank0", mode="last", fault="commit:rename@0:kill#2"),
        Trial("before-rename-rank0-steps", fault="commit:rename@0:kill#2"),
        Trial("after-rename-rank0", mode="last", fault="commit:renamed@0:kill#2"),
        Trial("after-rename-rank0-steps", fault="commit:renamed@0:kill#2"),
        Trial("write-rank1-async", fault=f"save:write@1:kill#{calibration['per_save_async']['save:write'][1] + 1}",
              async_save=True),
        Trial("before-rename-rank0-async", mode="last", fault="commit:rename@0:kill#2", async_save=True),
        Trial("after-rename-rank0-async", fault="commit:renamed@0:kill#2", async_save=True),
        Trial("timer-rank0", mode="last", kill_delay=round(0.5 * window, 3), victims=(0,)),
        Trial("timer-rank1", kill_delay=round(0.4 * window, 3), victims=(1,)),
        Trial("timer-all", mode="last", kill_delay=round(0.6 * window, 3), victims=(0, 1)),
    ]


def kill_suite(workdir: Path, random_seeds: list[int], named: bool = True) -> dict[str, Any]:
    calibration = calibrate(workdir)
    trials = (named_trials(calibration) if named else []) + [random_trial(s, calibration) for s in random_seeds]
    return {"calibration": calibration, "trials": [run_kill_trial(t, workdir) for t in trials]}


# --------------------------------------------------------------------------- storage failures


def storage_worker(rank: int, world: int, root: str, spec: str, mode: str) -> dict[str, Any]:
    """Save step 1; save step 2 under ``spec`` (it must fail); check step 1; save step 3 cleanly."""
    base = Path(root)
    coordinator, holders = make_coordinator(1, rank)
    os.environ[_faults.FAULTS_ENV] = NEVER  # count the fault points one clean save passes
    coordinator.save_checkpoint(target(base, mode, 1), step=1)
    clean_hits = broadcast(dict(_faults._hits) if rank == 0 else None)
    _faults._hits.clear()
    os.environ[_faults.FAULTS_ENV] = spec.format(manifest=clean_hits["save:write"])
    set_state(holders, 2, rank)
    report: dict[str, Any] = {"spec": os.environ[_faults.FAULTS_ENV], "error": None}
    mark()
    try:
        coordinator.save_checkpoint(target(base, mode, 2), step=2)
    except Exception as exc:  # the test checks the type and the message
        report["error"] = {"types": [c.__name__ for c in type(exc).__mro__], "message": str(exc),
                           "seconds": time.monotonic() - _MARK[0]}
    os.environ.pop(_faults.FAULTS_ENV)
    dist.barrier()  # the failure was agreed on, not a lost peer: the process group still works
    report["entries_after_failure"] = sorted(p.name for p in base.iterdir())
    report["failed_target_exists"] = mode == "steps" and target(base, mode, 2).exists()
    fresh, fresh_holders = make_coordinator(10**6, rank)
    loaded = fresh.load_checkpoint(find_latest_checkpoint(base))
    report["latest_step"] = loaded.manifest.step
    report["mismatch"] = mismatches(fresh_holders, loaded.manifest.step, rank)
    if rank == 0:
        report["problems"] = [p.message for p in verify_checkpoint(target(base, mode, 1))[1]]
    dist.barrier()
    set_state(holders, 3, rank)
    coordinator.save_checkpoint(target(base, mode, 3), step=3)
    report["temps_after_next_save"] = temps(base)
    report["entries_after_next_save"] = sorted(p.name for p in base.iterdir())
    return report


STORAGE_SCENARIOS = {
    "enospc-rank1-write": ("save:write@1:enospc", "steps"),
    "eio-rank1-write": ("save:write@1:eio", "steps"),
    "eio-rank1-fsync": ("save:sync@1:eio", "steps"),
    "enospc-all-ranks-write": ("save:write@*:enospc", "steps"),
    "enospc-rank1-write-replacing-last": ("save:write@1:enospc", "last"),
    "enospc-rank0-manifest-write": ("save:write@0:enospc#{manifest}", "steps"),
    "eio-rank0-manifest-write": ("save:write@0:eio#{manifest}", "last"),
    "eio-rank0-before-manifest": ("commit:manifest@0:eio", "steps"),
    "eio-rank0-rename": ("commit:rename@0:eio", "last"),
}


def storage_suite(workdir: Path) -> dict[str, Any]:
    report = {}
    for name, (spec, mode) in STORAGE_SCENARIOS.items():
        root = workdir / name / "ckpts"
        root.mkdir(parents=True)
        outcomes = run_ranks(storage_worker, str(root), spec, mode, workdir=root.parent)
        report[name] = [asdict(o) for o in outcomes]
    return report


def _fill(path: Path, leave: int) -> int:
    """Fill the filesystem holding ``path`` with one file, then free ``leave`` bytes; returns the file's size."""
    chunk = b"\0" * 4096
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while os.write(fd, chunk) == len(chunk):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    size = max(0, path.stat().st_size - leave)
    os.truncate(path, size)
    return size


def small_fs_worker(rank: int, world: int, root: str, filler: str, leave: int) -> dict[str, Any]:
    """Like ``storage_worker``, but the second save meets a filesystem that is really full."""
    base = Path(root)
    coordinator, holders = make_coordinator(1, rank)
    coordinator.save_checkpoint(base / "step=1.ckpt", step=1)
    if rank == 0:
        _fill(Path(filler), leave)
    dist.barrier()
    set_state(holders, 2, rank)
    report: dict[str, Any] = {"error": None}
    mark()
    try:
        coordinator.save_checkpoint(base / "step=2.ckpt", step=2)
    except Exception as exc:  # the test checks the type and the message
        report["error"] = {"types": [c.__name__ for c in type(exc).__mro__], "message": str(exc),
                           "seconds": time.monotonic() - _MARK[0]}
    dist.barrier()
    report["entries_after_failure"] = sorted(p.name for p in base.iterdir())
    report["failed_target_exists"] = (base / "step=2.ckpt").exists()
    if rank == 0:
        os.remove(filler)  # the operator frees space
    dist.barrier()
    fresh, fresh_holders = make_coordinator(10**6, rank)
    loaded = fresh.load_checkpoint(find_latest_checkpoint(base))
    report["latest_step"] = loaded.manifest.step
    report["mismatch"] = mismatches(fresh_holders, loaded.manifest.step, rank)
    set_state(holders, 3, rank)
    coordinator.save_checkpoint(base / "step=3.ckpt", step=3)
    report["temps_after_next_save"] = temps(base)
    report["entries_after_next_save"] = sorted(p.name for p in base.iterdir())
    return report


def small_fs_suite(workdir: Path, size: str = "2m", leave: int = 8192) -> dict[str, Any]:
    """Needs a private mount namespace (run under ``unshare -rm``): a real, tiny tmpfs that fills up."""
    import subprocess

    mount = workdir / "smallfs"
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        root = mount / "ckpts"
        root.mkdir()
        outcomes = run_ranks(small_fs_worker, str(root), str(mount / "filler"), leave, workdir=workdir / "ranks")
        return {"outcomes": [asdict(o) for o in outcomes]}
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# --------------------------------------------------------------------------- a peer fails or hangs


def peer_worker(rank: int, world: int, root: str, spec: str, during: str) -> dict[str, Any]:
    """Save a checkpoint, then save again or load it with ``spec`` set; the operation must raise."""
    base = Path(root)
    coordinator, holders = make_coordinator(1, rank)
    coordinator.save_checkpoint(base / "step=1.ckpt", step=1)
    dist.barrier()
    os.environ[_faults.FAULTS_ENV] = spec
    mark()
    if during == "load":
        coordinator.load_checkpoint(base / "step=1.ckpt")
    else:
        set_state(holders, 2, rank)
        coordinator.save_checkpoint(base / "step=2.ckpt", step=2)
    return {"finished": True}


PEER_SCENARIOS = {  # name: (spec, during, process-group timeout in seconds, ranks expected to stay stuck)
    "load-raise-rank1": ("load:read@1:raise", "load", 10.0, ()),
    "load-exit-rank1": ("load:read@1:exit", "load", 10.0, ()),
    "load-kill-rank1": ("load:read@1:kill", "load", 10.0, ()),
    "load-kill-rank0": ("load:read@0:kill", "load", 10.0, ()),
    "save-exit-rank1": ("save:written@1:exit", "save", 10.0, ()),
    "load-hang-rank1-timeout2": ("load:read@1:hang", "load", 2.0, (1,)),
    "load-hang-rank1-timeout5": ("load:read@1:hang", "load", 5.0, (1,)),
    "save-hang-rank1-timeout2": ("save:written@1:hang", "save", 2.0, (1,)),
}


def peer_suite(workdir: Path) -> dict[str, Any]:
    report = {}
    for name, (spec, during, pg_timeout, stuck) in PEER_SCENARIOS.items():
        root = workdir / name / "ckpts"
        root.mkdir(parents=True)
        started = time.monotonic()
        outcomes = run_ranks(peer_worker, str(root), spec, during, workdir=root.parent, pg_timeout=pg_timeout,
                             timeout=pg_timeout + 30, expect_hung=stuck)
        report[name] = {"outcomes": [asdict(o) for o in outcomes], "pg_timeout": pg_timeout,
                        "seconds": time.monotonic() - started, "checkpoint_problems":
                        [p.message for p in verify_checkpoint(root / "step=1.ckpt")[1]]}
    return report


# --------------------------------------------------------------------------- corruption


def corrupt_copies(pristine: Path, dest: Path, seed: int) -> dict[str, dict[str, Any]]:
    """Copies of ``pristine`` with one file damaged each: seeded random byte flips and truncations."""
    rng = random.Random(seed)
    manifest = CheckpointManifest.load(pristine)
    cases: dict[str, dict[str, Any]] = {}
    for key, component in manifest.components.items():
        for entry in component.files:
            for kind in ("flip", "flip", "truncate"):
                name = f"case{len(cases):03d}.ckpt"
                shutil.copytree(pristine, dest / name)
                path = dest / name / entry.path
                data = bytearray(path.read_bytes())
                if kind == "flip":
                    offset = rng.randrange(len(data))
                    data[offset] ^= rng.randrange(1, 256)
                    detail = f"byte {offset} of {len(data)} flipped"
                else:
                    size = rng.randrange(len(data))
                    data = data[:size]
                    detail = f"truncated to {size} of {entry.size} bytes"
                path.write_bytes(bytes(data))
                cases[name] = {"component": key, "file": entry.path, "rank": entry.rank, "damage": detail}
    return cases


def corruption_worker(rank: int, world: int, root: str, names: list[str]) -> dict[str, Any]:
    """Save the pristine checkpoint (first call) or load every damaged copy, recording each refusal."""
    base = Path(root)
    if not names:
        coordinator, _ = make_coordinator(7, rank)
        coordinator.save_checkpoint(base / "pristine.ckpt", step=7)
        return {}
    refusals: dict[str, Any] = {}
    for name in names:
        coordinator, holders = make_coordinator(10**6, rank)
        try:
            coordinator.load_checkpoint(base / name)
            refusals[name] = {"loaded": True, "mismatch": mismatches(holders, 7, rank)}
        except Exception as exc:  # the agreed refusal; the process group stays usable
            refusals[name] = {"loaded": False, "types": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}
    return refusals


def corruption_suite(workdir: Path, seed: int = 0) -> dict[str, Any]:
    root = workdir / "corruption"
    root.mkdir(parents=True)
    saved = run_ranks(corruption_worker, str(root), [], workdir=root)
    if any(o.status != "ok" for o in saved):
        raise RuntimeError(f"saving the pristine checkpoint failed: {[_short(o) for o in saved]}")
    cases = corrupt_copies(root / "pristine.ckpt", root, seed)
    outcomes = run_ranks(corruption_worker, str(root), sorted(cases), workdir=root, timeout=120)
    verified = {}
    for name in cases:
        _, problems = verify_checkpoint(root / name)
        verified[name] = [asdict(p) for p in problems]
    return {"cases": cases, "outcomes": [asdict(o) for o in outcomes], "verify": verified}


# --------------------------------------------------------------------------- command line

SUITES: dict[str, Callable[[Path, argparse.Namespace], Any]] = {
    "kill": lambda work, args: kill_suite(work, list(range(args.seed, args.seed + args.random)),
                                          named=not args.no_named),
    "storage": lambda work, args: storage_suite(work),
    "small-fs": lambda work, args: small_fs_suite(work),
    "peer": lambda work, args: peer_suite(work),
    "corruption": lambda work, args: corruption_suite(work, args.seed),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--random", type=int, default=0, help="kill suite: this many seeded random trials too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-named", action="store_true", help="kill suite: skip the named scenarios")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = args.workdir or Path(tempfile.mkdtemp(prefix=f"fault-{args.suite}-"))
    try:
        report = SUITES[args.suite](work, args)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()

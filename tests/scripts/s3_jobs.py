"""Two-rank jobs on S3 (moto's server): the core round trip, refused loads, store faults, and one side of a race.

Ranks are forked by ``fault_trials.run_ranks``; the endpoint and credentials come from the environment.

    python tests/scripts/s3_jobs.py jobs --url s3://bucket/prefix --out report.json --workdir DIR
    python tests/scripts/s3_jobs.py race --url s3://bucket/p/ckpt --endpoint http://proxy --tag A --step 1 \\
        --done DIR --out result.json --workdir DIR

``jobs`` runs every scenario below in turn and writes one JSON report. For the store faults it starts a
``FaultProxy`` (tests/support/s3.py) in this process in front of moto and runs each fault with each object client
(fsspec, obstore); the ranks talk through the proxy, so each injected fault reaches lightning_sharing's retry layer
(the libraries' own retries are off) as it happens. ``race`` is one of two jobs saving to the same path at once
(tests/distributed/test_s3_jobs.py starts both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_trials import _faults, broadcast, run_ranks
from fault_trials_s3 import audit, leftovers, make_s3_coordinator, s3_mismatches, set_s3_state
from support.s3 import FaultProxy, Rule

from lightning_sharing import CheckpointManifest, find_latest_checkpoint
from lightning_sharing.cli import main as cli_main
from lightning_sharing.storage import store_for
from lightning_sharing.storage.generations import scan
from lightning_sharing.storage.object_store import open_client


def _error(exc: BaseException) -> dict[str, Any]:
    return {"types": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}


def _layout(url: str) -> dict[str, Any]:
    """A committed checkpoint as stored: its generations, the one the manifest names, the files there."""
    store = store_for(url)
    state = scan(*open_client(url)[:2])
    manifest = CheckpointManifest.load(url)
    root = f"{url}/{manifest.data_prefix}"
    return {"generations": state.generations, "foreign": state.foreign, "data_prefix": manifest.data_prefix,
            "stored": store.list_files(root), "listed": sorted(f.path for f in manifest.all_files()),
            "writers": {f.path: f.rank for f in manifest.all_files()}}


def _load(url: str, step: int, rank: int, **options: Any) -> dict[str, Any]:
    coordinator, holders = make_s3_coordinator(10**6, rank, **options)
    try:
        loaded = coordinator.load_checkpoint(url)
    except Exception as exc:  # the test checks the agreed refusal
        return {"error": _error(exc)}
    return {"step": loaded.manifest.step, "mismatch": s3_mismatches(holders, step, rank)}


# --------------------------------------------------------------------------- scenarios


def roundtrip_worker(rank: int, world: int, root: str) -> dict[str, Any]:
    """Save steps 1 and 2, replace last.ckpt twice (once in the background), find the latest, load, verify."""
    report: dict[str, Any] = {}
    coordinator, holders = make_s3_coordinator(1, rank)
    coordinator.save_checkpoint(f"{root}/step=1.ckpt", step=1)
    coordinator.save_checkpoint(f"{root}/last.ckpt", step=1)
    set_s3_state(holders, 2, rank)
    coordinator.save_checkpoint(f"{root}/step=2.ckpt", step=2)
    background, _ = make_s3_coordinator(3, rank, async_save=True)
    background.save_checkpoint(f"{root}/last.ckpt", step=3)
    background.wait()
    report["latest"] = find_latest_checkpoint(root)
    report["loads"] = {name: _load(f"{root}/{name}", step, rank)
                       for name, step in (("step=1.ckpt", 1), ("step=2.ckpt", 2), ("last.ckpt", 3))}
    if rank == 0:
        report["layout"] = {name: _layout(f"{root}/{name}") for name in ("step=1.ckpt", "step=2.ckpt", "last.ckpt")}
        report["verify_exit"] = cli_main(["verify", f"{root}/last.ckpt"])
        report["leftovers"] = leftovers(root)
    dist.barrier()
    os.environ[_faults.FAULTS_ENV] = "load:read@1:raise"  # rank 1 fails while reading: every rank must raise
    report["load_read_fault"] = _load(f"{root}/step=2.ckpt", 2, rank)
    os.environ.pop(_faults.FAULTS_ENV)
    return report


def refusal_worker(rank: int, world: int, root: str) -> dict[str, Any]:
    """Save two checkpoints; rank 0 deletes one object of the first and flips a byte of one of the second."""
    coordinator, holders = make_s3_coordinator(1, rank)
    coordinator.save_checkpoint(f"{root}/step=1.ckpt", step=1)
    set_s3_state(holders, 2, rank)
    coordinator.save_checkpoint(f"{root}/step=2.ckpt", step=2)
    damaged: dict[str, str] = {}
    if rank == 0:
        client, _, _ = open_client(root)
        for name, rel in (("step=1.ckpt", "rng/rank-00001-00001-of-00001.safetensors"),
                          ("step=2.ckpt", "model-00001-of-00001.safetensors")):
            url = f"{root}/{name}/{CheckpointManifest.load(f'{root}/{name}').data_prefix}/{rel}"
            key = url[len(client.url) + 1:]
            if name == "step=1.ckpt":
                client.delete([key])
            else:
                data = bytearray(client.get(key)[0])
                data[-1] ^= 0xFF
                client.put(key, bytes(data))
            damaged[name] = url
    damaged = broadcast(damaged)
    report: dict[str, Any] = {"damaged": damaged}
    report["missing"] = _load(f"{root}/step=1.ckpt", 1, rank)
    report["flipped"] = _load(f"{root}/step=2.ckpt", 2, rank)
    if rank == 0:
        report["verify_exit"] = {name: cli_main(["verify", f"{root}/{name}"])
                                 for name in ("step=1.ckpt", "step=2.ckpt")}
        report["verify_exit"]["no-checkpoint"] = cli_main(["verify", f"{root}/nothing-here.ckpt"])
    return report


#: The retry policy of the fault jobs: the default attempts (6), short pauses, a short silence counts as a failure.
FAULT_RETRY = {"initial_delay": 0.05, "max_delay": 0.2, "timeout": 2}


def fault_worker(rank: int, world: int, root: str, endpoint: str, client: str) -> dict[str, Any]:
    """Through the fault proxy, with the object client ``client``: save step 1, save step 2 (the proxy's rules
    target it and the load of it), load what is latest, save step 3 cleanly."""
    options = {"endpoint_url": endpoint, "client": client, "retry": FAULT_RETRY}
    coordinator, holders = make_s3_coordinator(1, rank, storage_options=options)
    coordinator.save_checkpoint(f"{root}/step=1.ckpt", step=1)
    set_s3_state(holders, 2, rank)
    report: dict[str, Any] = {"error": None}
    started = time.monotonic()
    try:
        coordinator.save_checkpoint(f"{root}/step=2.ckpt", step=2)
    except Exception as exc:  # the test checks the agreed error
        report["error"] = _error(exc)
    report["save_seconds"] = time.monotonic() - started
    dist.barrier()
    latest = find_latest_checkpoint(root, options)
    report["latest"] = latest
    report["load"] = _load(latest, int(latest.rsplit("=", 1)[1].split(".")[0]), rank, storage_options=options)
    set_s3_state(holders, 3, rank)
    coordinator.save_checkpoint(f"{root}/step=3.ckpt", step=3)
    dist.barrier()
    if rank == 0:
        report["leftovers"], report["incomplete"] = leftovers(root), audit(root)
    return report


WRITES, READS = ("step%3D2.ckpt/g-",), ("step%3D2.ckpt/g-",)  # the second save's files (URL-encoded: "=" is %3D)
RANK1_RNG = ("step%3D2.ckpt/g-", "rng/rank-00001")
FAULTS: dict[str, list[dict[str, Any]]] = {  # name: the proxy's rules (Rule's fields), aimed at the second save
    "throttled-writes": [{"action": "slowdown", "times": 4, "method": "PUT", "contains": WRITES}],
    "reset-writes": [{"action": "reset", "times": 3, "method": "PUT", "contains": WRITES}],
    "stalled-write": [{"action": "stall", "times": 1, "method": "PUT", "contains": WRITES, "stall": 6}],
    "throttled-for-good": [{"action": "slowdown", "times": 10**6, "method": "PUT", "contains": RANK1_RNG}],
    "access-denied": [{"action": "error", "status": 403, "code": "AccessDenied", "method": "PUT",
                       "contains": RANK1_RNG}],
    "manifest-answer-lost": [{"action": "drop_answer", "method": "PUT",
                              "contains": ("step%3D2.ckpt/checkpoint_manifest.json",)}],
    "throttled-reads": [{"action": "slowdown", "times": 3, "method": "GET", "contains": READS}],
    "reads-reset-mid-body": [{"action": "reset_body", "times": 3, "method": "GET", "contains": READS}],
    "stalled-reads": [{"action": "stall", "times": 2, "method": "GET", "contains": READS, "stall": 6}],
    "reads-reset-for-good": [{"action": "reset_body", "times": 10**6, "method": "GET",
                              "contains": ("step%3D2.ckpt/g-", "model-00001")}],
}
CLIENTS = ("fsspec", "obstore")


def jobs_suite(root: str, workdir: Path) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for name, worker in (("roundtrip", roundtrip_worker), ("refusals", refusal_worker)):
        outcomes = run_ranks(worker, f"{root}/{name}", workdir=workdir / name, timeout=120, pg_timeout=30)
        report[name] = [asdict(o) for o in outcomes]
    proxy = FaultProxy(os.environ["AWS_ENDPOINT_URL"])
    try:
        for name, rules in FAULTS.items():
            for client in CLIENTS:
                proxy.rules = [Rule(**rule) for rule in rules]
                before = len(proxy.requests)
                outcomes = run_ranks(fault_worker, f"{root}/{name}-{client}", proxy.url, client,
                                     workdir=workdir / f"{name}-{client}", timeout=150, pg_timeout=60)
                report[f"{name}-{client}"] = {"outcomes": [asdict(o) for o in outcomes],
                                              "hits": [rule.hits for rule in proxy.rules],
                                              "requests": proxy.requests[before:]}
    finally:
        proxy.close()
    return report


# --------------------------------------------------------------------------- one side of a race


def race_worker(rank: int, world: int, url: str, endpoint: str, step: int, tag: str, done: str,
                client: str) -> dict[str, Any]:
    """Save the state of ``step`` to ``url`` (the other job saves another step there at the same time); once both
    jobs are done, load what ``url`` holds."""
    options = {"endpoint_url": endpoint, "client": client}
    coordinator, _ = make_s3_coordinator(step, rank, storage_options=options)
    report: dict[str, Any] = {"error": None}
    try:
        coordinator.save_checkpoint(url, step=step)
    except Exception as exc:  # the test checks which job won
        report["error"] = _error(exc)
    if rank == 0:
        Path(done, tag).touch()
        deadline = time.monotonic() + 150
        while len(os.listdir(done)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    dist.barrier()
    saved = CheckpointManifest.load(url, options).step
    report["load"] = _load(url, saved, rank, storage_options=options)
    if rank == 0:
        report["layout"] = _layout(url)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=["jobs", "race"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--endpoint")
    parser.add_argument("--tag")
    parser.add_argument("--step", type=int)
    parser.add_argument("--done")
    parser.add_argument("--client", default="obstore")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.suite == "jobs":
        result: Any = jobs_suite(args.url.rstrip("/"), args.workdir)
    else:
        outcomes = run_ranks(race_worker, args.url, args.endpoint, args.step, args.tag, args.done, args.client,
                             workdir=args.workdir, timeout=240, pg_timeout=180)
        result = [asdict(o) for o in outcomes]
    args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()

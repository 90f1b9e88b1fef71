"""A scale simulation: the rule table, the planners and the manifest builder at 8 to 4,096 ranks, in one process.

    .venv/bin/python benchmarks/scale_sim.py [--worlds 8 64 512 4096] [--jobs 70b 7b] [--plot docs/benchmarks/scale.png]

For each job (``_scale_state``: a 70B Llama-like model on FSDP x TP 8, a 7B one on DDP, with AdamW state, RNG and
trainer counters) and world size N, on one core, with meta tensors (no bytes) under torch's fake process group:

- **measured** (the package's own code): a rank's save planning (``engine.save.plan_save`` for rank 0 and rank 1:
  the rule table, encoding, every copy format's ``plan``, the agreement's ``Ballot``), the ``Ballot``'s all-reduce
  size (every ``dist.all_reduce`` is counted), every rank's commit report (the ``WrittenCopy`` list the write returns,
  ``_scale_state.simulated_write``; pickled as ``settle`` does), rank 0's assembly of N reports (unpickling, every
  format's ``merge``: the chunk index; ``build_manifest``; ``dumps``), and a rank's load planning (the chunk index
  parsed, ``sharded.load.plan_reads`` against rank 1's live state).
- **modelled** (``_model.py`` states the rules): the bytes each collective delivers (the ballot's all-reduce on every
  rank; the gather brings rank 0 N-1 reports padded to the agreed capacity; the verdict broadcast), object-store
  requests and the bytes read from storage per load, with and without read-once.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _scale_model import load_traffic, save_requests
from _scale_state import (
    CHECKSUM,
    LLAMA_7B,
    LLAMA_70B,
    Job,
    Stateful,
    close_fake,
    init_fake,
    job_state,
    simulated_write,
)

from lightning_sharing.checkpoint.manifest import FileEntry
from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.options import CheckpointOptions
from lightning_sharing.core.rules import ChunkFiles, placements
from lightning_sharing.core.topology import Topology
from lightning_sharing.distributed.settle import VERDICT_BYTES, _decide, report_size
from lightning_sharing.engine.commit import CheckpointTarget
from lightning_sharing.engine.formats import format_for
from lightning_sharing.engine.manifest_builder import build_manifest
from lightning_sharing.engine.plan_cache import PlanCache
from lightning_sharing.engine.save import PlannedSave, plan_save
from lightning_sharing.errors import CorruptCheckpointError
from lightning_sharing.format.copy_files import parse_json
from lightning_sharing.sharded.index import ShardedIndex
from lightning_sharing.sharded.load import plan_reads
from lightning_sharing.storage.local import LocalStore

JOBS = {"70b": Job(LLAMA_70B, "fsdp_tp"), "7b": Job(LLAMA_7B, "ddp")}
HEADER = 8  # settle's frame header: a report's length before its bytes
OPTIONS = CheckpointOptions()
# Above this many chunks (a 70B model on FSDP x TP at 4,096 ranks has 7 million) rank 0's assembly and the load are
# not simulated by default: one process holding every rank's report needs tens of GB (--commit-limit to try).
COMMIT_LIMIT = 2_000_000


class _AllReduceSpy:
    """Counts the bytes of every ``torch.distributed.all_reduce`` (the fake group's are no-ops)."""

    def __init__(self) -> None:
        self.bytes = self.calls = 0
        self._original = torch.distributed.all_reduce

    def __enter__(self) -> _AllReduceSpy:
        def spy(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.bytes += tensor.numel() * tensor.element_size()
            return self._original(tensor, *args, **kwargs)

        torch.distributed.all_reduce = spy
        return self

    def __exit__(self, *exc: object) -> None:
        torch.distributed.all_reduce = self._original


def _components(job: Job, rank: int, world: int) -> list[StateComponent]:
    state = job_state(job, rank, world)
    return [StateComponent(key, Stateful(value), pattern) for key, (pattern, value) in state.items()]


def _plan_rank(job: Job, rank: int, world: int, topology: Topology, root: str
               ) -> tuple[PlannedSave, float, float, int, list[StateComponent]]:
    """``plan_save`` as ``rank``, a first save (nothing cached) then a repeat one (the plan cache refilled):
    (first plan, its seconds, the repeat's seconds, the ballot's bytes, components)."""
    init_fake(rank, world)
    components = _components(job, rank, world)
    keys = tuple(c.key for c in components)
    cache = PlanCache()
    timings, planned_saves, ballots = [], [], []
    for attempt in ("first", "repeat"):
        target = CheckpointTarget(LocalStore(), str(Path(root) / f"w{world}-r{rank}-{attempt}" / "step.ckpt"),
                                  f"w{world}r{rank}{attempt}")

        def checks(ballot: Any, target: CheckpointTarget = target) -> None:  # the coordinator's checks
            ballot.equal(keys, lambda values: None, name="declarations")
            ballot.equal((target.target, None), lambda values: None, name="path")

        with _AllReduceSpy() as spy:
            start = time.perf_counter()
            planned_saves.append(plan_save(target, components, topology, OPTIONS, saver=None, cache=cache,
                                           checks=checks))
            timings.append(time.perf_counter() - start)
        ballots.append(spy.bytes)
        if attempt == "first":  # what the commit would tell the cache: the size of this rank's report
            cache.report_size = report_size([simulated_write(c.plan, rank, c.format.holds_dtensors)
                                             for c in planned_saves[0].copies])
    if len(set(ballots)) != 1:
        raise AssertionError(f"the agreement's size changed between saves: {ballots}")
    return planned_saves[0], timings[0], timings[1], ballots[0], components


def _reports(components: list[StateComponent], topology: Topology, planned: PlannedSave,
             chunk_ranks: set[int] | None = None) -> dict[int, list[Any]]:
    """Every rank's commit report: rank 0's chunk plans stand for every rank's (``plan_writes`` is the same on every
    rank); whole-tensor copies are planned for each of their writers (``plan_encoded``, the state encoded once).
    ``chunk_ranks``: the only ranks whose chunk index parts are made (None: all)."""
    world = topology.world_size
    reports: dict[int, list[Any]] = {r: [] for r in range(world)}
    chunk_plans = {copy.component.key: copy.plan for copy in planned.copies if copy.format.holds_dtensors}
    for component in components:
        fmt = format_for(component.sharing_pattern)
        encoded = None
        for placement in placements(component.key, component.sharing_pattern, topology):
            for rank in placement.writers:
                if fmt.holds_dtensors:
                    if chunk_ranks is None or rank in chunk_ranks:
                        reports[rank].append(simulated_write(chunk_plans[component.key], rank, True, own=rank == 0))
                    continue
                encoded = encoded or fmt.encode(component.stateful.state_dict(), component.key)
                plan = fmt.plan_encoded(component.key, placement, encoded, rank, OPTIONS)
                if plan.jobs:
                    reports[rank].append(simulated_write(plan, rank, False))
    return reports


def _assemble(components: list[StateComponent], topology: Topology, frames: list[bytes]
              ) -> tuple[float, bytes, dict[str, bytes], list[Any]]:
    """Rank 0's commit work on the gathered reports, timed: ``settle``'s decision (unpickling every report, then the
    commit's own work: every format's ``merge``, ``build_manifest``, ``dumps``), less the store's calls: (seconds,
    manifest, merged files by name, every rank's ``WrittenCopy``)."""
    merged: dict[str, bytes] = {}
    seen: list[Any] = []

    def commit(reports: list[list[Any]]) -> bytes:
        copies = [copy for per_rank in reports for copy in per_rank]
        seen.extend(copies)
        extra: dict[str, list[FileEntry]] = {}
        for component in components:
            mine = [copy for copy in copies if copy.key == component.key]
            for job in format_for(component.sharing_pattern).merge(component, mine):
                merged[job.rel] = job.data or b""
                extra.setdefault(component.key, []).append(FileEntry(job.rel, len(merged[job.rel]), CHECKSUM, 0))
        return build_manifest(components, topology, copies, extra, 100_000, {}).dumps().encode("utf-8")

    start = time.perf_counter()
    verdict, error = _decide(list(frames), "writing checkpoint files", "committing", commit)
    seconds = time.perf_counter() - start
    if error is not None:
        raise error
    return seconds, verdict[1], merged, seen


def _load_plan(components: list[StateComponent], merged: dict[str, bytes]) -> tuple[float, dict[str, Any], str]:
    """Rank 1's load planning of its chunked components (the index parsed as ``chunk_load.read_index`` does, then
    ``plan_reads``): (seconds, plans by key, the refusal of an index the load would not read, or "")."""
    start = time.perf_counter()
    plans = {}
    for component in components:
        fmt = format_for(component.sharing_pattern)
        rel = ChunkFiles().index_for(component.key)
        if fmt.holds_dtensors and rel in merged:
            try:
                index = ShardedIndex.from_json(parse_json(merged[rel], "chunk index", rel))
            except CorruptCheckpointError as exc:  # the load's own limit on a JSON file's size
                return time.perf_counter() - start, {}, str(exc)
            encoded = fmt.encode(component.stateful.state_dict(), component.key)
            plans[component.key] = plan_reads(index, encoded.tensors, strict=False)
    return time.perf_counter() - start, plans, ""


def simulate(job: Job, world: int, root: str, commit_limit: int = COMMIT_LIMIT) -> dict[str, Any]:
    """One job at one world size: the table's row (see the module docstring); the fake process group is closed
    when it returns (nothing else in the process sees it)."""
    try:
        return _simulate(job, world, root, commit_limit)
    finally:
        close_fake()


def _simulate(job: Job, world: int, root: str, commit_limit: int) -> dict[str, Any]:
    topology = Topology.build(world, node_of_rank=[r // 8 for r in range(world)])
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(dir=root)  # this simulation's own staging directories
    planned, plan_s0, _, ballot_bytes, components = _plan_rank(job, 0, world, topology, root)
    sample = 1 if world > 1 else 0
    _, plan_s1, repeat_s1, _, live1 = _plan_rank(job, sample, world, topology, root)
    chunk_writes = {copy.component.key: copy.plan.detail.writes for copy in planned.copies
                    if copy.format.holds_dtensors}
    chunks = sum(len(writes.writes) for writes in chunk_writes.values())
    whole = chunks <= commit_limit  # else rank 0's part and the load are not run (module docstring)
    reports = _reports(components, topology, planned, None if whole else {0, sample})
    sizes = {rank: report_size(report) for rank, report in reports.items()}
    largest = max((s for r, s in sizes.items() if r != 0), default=0)  # not whole: rank 1's stands for the largest
    capacity = largest + largest // 8 + 256  # a repeat save's gather capacity (engine/save.py)
    row: dict[str, Any] = {
        "job": job.label, "world": world, "chunks": chunks,
        "plan_s_rank0": plan_s0, "plan_s_rank1": plan_s1, "repeat_s_rank1": repeat_s1,
        "report_bytes_max": largest, "report_bytes_rank0": sizes[0], "ballot_bytes": ballot_bytes,
        "sent_rank": ballot_bytes + HEADER + capacity,  # a rank other than 0: its share of the all-reduce, its report
        "received_rank": ballot_bytes + HEADER + VERDICT_BYTES,  # a rank other than 0: the all-reduce, the verdict
        "received_rank0": ballot_bytes + (world - 1) * (HEADER + capacity),
    }
    if not whole:
        return row
    frames = [pickle.dumps((None, reports[r]), protocol=pickle.HIGHEST_PROTOCOL) for r in range(world)]
    del reports  # what rank 0 holds from here on is what settle gives it: the frames
    assemble_s, manifest, merged, copies = _assemble(components, topology, frames)
    del frames
    load_s, read_plans, refused = _load_plan(live1, merged)
    sizes_by_file = {e.path: e.size for copy in copies for e in copy.files} | {r: len(d) for r, d in merged.items()}
    row.update({
        "assemble_s_rank0": assemble_s, "load_plan_s_rank1": load_s,
        "manifest_bytes": len(manifest), "index_bytes": sum(len(d) for d in merged.values()),
        "index_largest": max((len(d) for d in merged.values()), default=0), "load_refused": refused,
        "files_written": len(sizes_by_file) + 1,  # + the manifest
        "checkpoint_bytes": sum(sizes_by_file.values()) + len(manifest), "paths": sorted(sizes_by_file),
    })
    row.update(save_requests(sizes_by_file, len(manifest)))
    files_by_stem: dict[str, dict[str, int]] = {}
    chunk_meta: dict[str, list[str]] = {key: [rel for rel in merged if rel.startswith(key + "/")]
                                        for key in chunk_writes}
    for copy in copies:
        if copy.key in chunk_writes:
            chunk_meta[copy.key].extend(e.path for e in copy.files if e.path.endswith(".json"))
        else:
            files_by_stem.setdefault(copy.stem, {}).update({e.path: e.size for e in copy.files})
    row.update(load_traffic(components, topology, files_by_stem, chunk_writes, sizes_by_file, len(manifest),
                            chunk_meta))
    planned_rank1 = sum(plan.bytes_needed for plan in read_plans.values())
    if refused:
        return row
    modelled_rank1 = sum(w.nbytes for writes in chunk_writes.values() for w in writes.writes if sample in w.holders)
    if planned_rank1 != modelled_rank1:  # the model of what a rank reads must be what the load planner plans
        raise AssertionError(f"rank {sample}: plan_reads needs {planned_rank1} bytes, the model says {modelled_rank1}")
    return row


def _pattern(components: list[StateComponent], key: str) -> Any:
    return next(c.sharing_pattern for c in components if c.key == key)


COLUMNS = [("world", "N", "{}"), ("plan_s_rank1", "plan s (rank 1)", "{:.2f}"),
           ("repeat_s_rank1", "repeat plan s", "{:.2f}"),
           ("plan_s_rank0", "plan s (rank 0)", "{:.2f}"), ("assemble_s_rank0", "assemble s (rank 0)", "{:.2f}"),
           ("load_plan_s_rank1", "load plan s", "{:.2f}"), ("manifest_bytes", "manifest", "B"),
           ("index_bytes", "chunk indexes", "B"), ("files_written", "files", "{}"),
           ("sent_rank", "sent/rank", "B"), ("received_rank", "recv/rank", "B"), ("received_rank0", "recv rank 0", "B"),
           ("save_requests", "save reqs", "{}"), ("load_requests", "load reqs", "{}"),
           ("load_requests_once", "load reqs (read-once)", "{}"), ("load_read_bytes", "read/load", "B"),
           ("load_read_bytes_once", "read/load (read-once)", "B"), ("load_meta_bytes_rank", "meta read/rank", "B")]


def human(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table per job."""
    out = []
    for label in dict.fromkeys(r["job"] for r in rows):
        out.append(f"\n**{label}**\n")
        out.append("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
        out.append("|" + "---:|" * len(COLUMNS))
        for row in (r for r in rows if r["job"] == label):
            cells = ["not run" if key not in row else human(row[key]) if spec == "B" else spec.format(row[key])
                     for key, _, spec in COLUMNS]
            out.append("| " + " | ".join(cells) + " |")
        for row in (r for r in rows if r["job"] == label and r.get("load_refused")):
            out.append(f"\nAt {row['world']} ranks the load refuses the checkpoint: {row['load_refused']}")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    panels = [("Planning time (s, one core)", ["plan_s_rank0", "plan_s_rank1", "repeat_s_rank1", "assemble_s_rank0",
                                                "load_plan_s_rank1"]),
              ("Checkpoint metadata (bytes)", ["manifest_bytes", "index_bytes"]),
              ("Collective metadata per save (bytes)", ["received_rank", "received_rank0", "sent_rank"]),
              ("Bytes read from storage per load", ["load_read_bytes", "load_read_bytes_once",
                                                    "load_meta_bytes_rank"])]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for ax, (title, keys) in zip(axes.flat, panels, strict=True):
        for label in dict.fromkeys(r["job"] for r in rows):
            for key in keys:
                points = [r for r in rows if r["job"] == label and r.get(key)]  # a zero has no place on a log axis
                if points:
                    ax.plot([r["world"] for r in points], [r[key] for r in points], marker="o",
                            label=f"{label}: {key}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 512, 4096])
    parser.add_argument("--jobs", nargs="+", choices=sorted(JOBS), default=["70b", "7b"])
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here too")
    parser.add_argument("--commit-limit", type=int, default=COMMIT_LIMIT,
                        help="simulate rank 0's commit and the load up to this many chunks (default %(default)s)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.jobs:
            for world in args.worlds:
                start = time.perf_counter()
                rows.append(simulate(JOBS[name], world, root, args.commit_limit))
                print(f"{JOBS[name].label} at {world} ranks: simulated in {time.perf_counter() - start:.1f} s",
                      file=sys.stderr, flush=True)
                print(table(rows[-1:]), file=sys.stderr, flush=True)  # a long run keeps what it has so far
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "paths"} for r in rows], indent=1))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

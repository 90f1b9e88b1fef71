"""One rank of one benchmark variant: ``python benchmarks/_bench_worker.py SPEC.json`` (RANK etc. in the environment).

Every variant runs in fresh processes so that ``ru_maxrss`` belongs to it alone. A variant times ``repeats``
operations, each bracketed by barriers (the job waits for its slowest rank), records the peak extra resident memory
over all of them, and writes ``{result_dir}/{variant}-rank{r}.json``. Checkpoints a later variant loads (the last one
written by a save variant) are kept; the loading variant deletes them.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _bench_state import (
    MemoryProbe,
    build_state,
    fsync_path,
    lightning_checkpoint,
    matmul_rate,
    raw_read,
    raw_read_fresh,
    raw_write,
    remove,
    state_bytes,
    timed,
    tree_bytes,
)
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

# Imported here, not inside the variants: an import inside the measured block would count its ~50-90 MiB as memory the
# save or load needs.
from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent, ValidationLevel

CHECKPOINTS = {"ls_sync": "ls.ckpt", "ls_load": "ls.ckpt", "lightning_save": "lightning.ckpt",
               "lightning_load": "lightning.ckpt", "dcp_save": "dcp", "dcp_load": "dcp", "raw": "raw"}


@dataclass
class Ctx:
    """What a variant needs: who this rank is, the spec, the state, and where to record results."""

    rank: int
    world: int
    spec: dict[str, Any]
    model: Any = None
    optimizer: Any = None
    times: dict[str, list[float | None]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    keep: dict[str, Any] = field(default_factory=dict)

    @property
    def repeats(self) -> int:
        return int(self.spec["repeats"])

    @property
    def path(self) -> Path:
        variant = self.spec["variant"]
        return Path(self.spec["root"]) / CHECKPOINTS.get(variant, f"{variant}.ckpt")

    def record(self, name: str, seconds: float | None) -> None:
        self.times.setdefault(name, []).append(seconds)

    def remove_on_rank0(self) -> None:
        """Delete the checkpoint; the next barrier (every timed block starts with one) orders it before reuse."""
        if self.rank == 0:
            remove(self.path)


# ---------------------------------------------------------------------------------------------- physical limit
def run_raw(ctx: Ctx) -> None:
    """Each rank writes its share of the checkpoint's bytes in parallel (the fastest use of these processes), then
    every rank reads all of them back, as every rank reads the whole replicated state on resume: into one reused
    buffer (the limit, reachable by reading into the existing parameters) and into new memory (what allocating
    fresh tensors costs)."""
    folder, total = ctx.path, int(ctx.spec["raw_bytes"])
    share = total // ctx.world + (ctx.rank < total % ctx.world)
    files = [folder / f"rank-{r:05d}.bin" for r in range(ctx.world)]
    for _ in range(ctx.repeats):
        folder.mkdir(parents=True, exist_ok=True)
        ctx.record("write", timed(lambda: raw_write(files[ctx.rank], share)))
        ctx.record("read", timed(lambda: raw_read(files)))
        ctx.record("read_fresh", timed(lambda: raw_read_fresh(files)))
        ctx.info["bytes"] = total
        dist.barrier()  # nobody may still be reading when rank 0 deletes
        ctx.remove_on_rank0()


# ---------------------------------------------------------------------------------------------- Lightning
def run_lightning_save(ctx: Ctx) -> None:
    """DDPStrategy.save_checkpoint: rank 0 alone calls TorchCheckpointIO, then Trainer.save_checkpoint barriers."""
    io = TorchCheckpointIO()
    for step in range(ctx.repeats):
        own: dict[str, float] = {}

        def save(step: int = step, own: dict[str, float] = own) -> None:
            if ctx.rank == 0:
                started = time.perf_counter()
                io.save_checkpoint(lightning_checkpoint(ctx.model, ctx.optimizer, step), ctx.path)
                own["save"] = time.perf_counter() - started
                # Lightning stops here: its bytes may still sit in the page cache. Durable means fsynced, with the
                # directory entry of the renamed file too.
                fsync_path(ctx.path)
                fsync_path(ctx.path.parent)

        ctx.record("durable", timed(save))
        ctx.record("save", own.get("save"))
        if step < ctx.repeats - 1:
            ctx.remove_on_rank0()
    if ctx.rank == 0:
        ctx.info.update(ckpt_bytes=tree_bytes(ctx.path), writer_ranks=1)


def run_lightning_load(ctx: Ctx) -> None:
    """What resuming does on every rank: CheckpointIO.load_checkpoint (torch.load), then load the state dicts."""
    io = TorchCheckpointIO()

    def load() -> None:
        checkpoint = io.load_checkpoint(ctx.path)
        ctx.model.load_state_dict(checkpoint["state_dict"])
        ctx.optimizer.load_state_dict(checkpoint["optimizer_states"][0])

    for _ in range(ctx.repeats):
        ctx.record("load", timed(load))
    ctx.remove_on_rank0()


# ---------------------------------------------------------------------------------------------- DCP
def run_dcp_save(ctx: Ctx) -> None:
    """dcp.save of the model and optimizer state dicts; its planner de-duplicates replicated tensors across ranks and
    FileSystemWriter fsyncs every file (sync_files=True), so the save is durable when it returns."""
    def save() -> None:
        model_state, optim_state = get_state_dict(ctx.model, ctx.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=ctx.path)

    for step in range(ctx.repeats):
        ctx.record("save", timed(save))
        if step < ctx.repeats - 1:
            ctx.remove_on_rank0()
    if ctx.rank == 0:
        data = [p for p in ctx.path.glob("*.distcp") if p.stat().st_size > 0]
        ctx.info.update(ckpt_bytes=tree_bytes(ctx.path), writer_ranks=len(data))


def run_dcp_load(ctx: Ctx) -> None:
    def load() -> None:
        model_state, optim_state = get_state_dict(ctx.model, ctx.optimizer)
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=ctx.path)  # in place
        set_state_dict(ctx.model, ctx.optimizer, model_state_dict=model_state, optim_state_dict=optim_state)

    for _ in range(ctx.repeats):
        ctx.record("load", timed(load))
    ctx.remove_on_rank0()


# ---------------------------------------------------------------------------------------------- lightning_sharing
def coordinator(ctx: Ctx, level: str | None = None, **kwargs: Any) -> Any:
    checks = {} if level is None else {"validate_replication": True, "validation_level": ValidationLevel.parse(level)}
    return CheckpointCoordinator([
        StateComponent("model", ctx.model, SharingPattern.REPLICATED, **checks),
        StateComponent("optimizer", ctx.optimizer, SharingPattern.REPLICATED),
    ], **kwargs)


def describe_ls_checkpoint(ctx: Ctx) -> None:
    """Total bytes on disk and the ranks that wrote files, from the manifest's per-file writer rank."""
    manifest = json.loads((ctx.path / "checkpoint_manifest.json").read_text())
    ranks = {entry["rank"] for record in manifest["components"].values() for entry in record["files"]}
    ctx.info.update(ckpt_bytes=tree_bytes(ctx.path), writer_ranks=len(ranks), writer_rank_ids=sorted(ranks))


def run_ls_save(ctx: Ctx, keep_last: bool = False) -> None:
    coord = coordinator(ctx)
    for step in range(ctx.repeats):
        ctx.record("save", timed(lambda step=step: coord.save_checkpoint(ctx.path, step=step)))
        last = step == ctx.repeats - 1
        if last and ctx.rank == 0:
            describe_ls_checkpoint(ctx)
        if not (last and keep_last):
            ctx.remove_on_rank0()


def run_ls_validated(ctx: Ctx, level: str) -> None:
    """Validated saves paired with unvalidated ones in the same processes, in alternating order.

    A 5% overhead is smaller than the drift between two process groups on a shared machine, so each validated save
    is compared with a reference save taken right next to it (``save_none``). One unmeasured save first takes the
    one-time costs (first collectives, lazy imports) out of the first pair.
    """
    plain, checked = coordinator(ctx), coordinator(ctx, level)

    def save(coord: Any, name: str | None, step: int) -> None:
        seconds = timed(lambda: coord.save_checkpoint(ctx.path, step=step))
        if name:
            ctx.record(name, seconds)
        if ctx.rank == 0 and name == "save" and len(ctx.times[name]) == ctx.repeats:
            describe_ls_checkpoint(ctx)
        ctx.remove_on_rank0()

    save(plain, None, 0)
    for step in range(ctx.repeats):
        pair = [(plain, "save_none"), (checked, "save")]
        for coord, name in pair if step % 2 == 0 else reversed(pair):
            save(coord, name, step)


def run_ls_load(ctx: Ctx) -> None:
    coord = coordinator(ctx)
    for _ in range(ctx.repeats):
        ctx.record("load", timed(lambda: coord.load_checkpoint(ctx.path)))
    ctx.remove_on_rank0()


def run_ls_async(ctx: Ctx) -> None:
    """blocked: until save_checkpoint returns (training could go on); committed: until wait() returns."""
    coord = ctx.keep["coordinator"] = coordinator(ctx, async_save=True)
    for step in range(ctx.repeats):
        dist.barrier()
        started = time.perf_counter()
        coord.save_checkpoint(ctx.path, step=step)
        ctx.record("blocked", time.perf_counter() - started)
        coord.wait()
        ctx.record("committed", time.perf_counter() - started)
        dist.barrier()
        ctx.remove_on_rank0()


def gil_probe(ctx: Ctx) -> None:
    """Python-loop matmul rate while an async save is pending, relative to the same loop with no save.

    There is no "is it done" query, so the loop runs for the median committed time measured above; ``gil_wait_after``
    (seconds wait() still blocked after the loop) > 0 shows the save really was pending for the whole loop. The
    baseline runs on all ranks at once, so contention between ranks for the cores is in both numbers.
    """
    coord = ctx.keep["coordinator"]
    window = statistics.median(t for t in ctx.times["committed"] if t is not None)
    dist.barrier()
    base_rate, _ = matmul_rate(max(window, 0.5))
    dist.barrier()
    started = time.perf_counter()
    coord.save_checkpoint(ctx.path, step=ctx.repeats)
    blocked = time.perf_counter() - started
    rate, _ = matmul_rate(max(window - blocked, 0.05))
    waited = time.perf_counter()
    coord.wait()
    ctx.info.update(gil_ratio=rate / base_rate, gil_base_rate=base_rate, gil_rate=rate,
                    gil_wait_after=time.perf_counter() - waited, gil_committed=time.perf_counter() - started)
    dist.barrier()
    ctx.remove_on_rank0()


RUNNERS: dict[str, Callable[[Ctx], None]] = {
    "raw": run_raw,
    "lightning_save": run_lightning_save,
    "lightning_load": run_lightning_load,
    "dcp_save": run_dcp_save,
    "dcp_load": run_dcp_load,
    "ls_sync": lambda ctx: run_ls_save(ctx, keep_last=True),
    "ls_quick": lambda ctx: run_ls_validated(ctx, "quick"),
    "ls_tensor": lambda ctx: run_ls_validated(ctx, "tensor"),
    "ls_load": run_ls_load,
    "ls_async": run_ls_async,
}


def run(ctx: Ctx) -> None:
    variant = ctx.spec["variant"]
    Path(ctx.spec["root"]).mkdir(parents=True, exist_ok=True)
    if variant != "raw":  # the raw baseline needs no tensors
        ctx.model, ctx.optimizer = build_state(float(ctx.spec["size_gb"]))
        ctx.info["state_bytes"] = state_bytes(ctx.model, ctx.optimizer)
    gc.collect()  # free what building left behind, so the RSS before the measurement is the state alone
    with MemoryProbe() as probe:
        RUNNERS[variant](ctx)
    ctx.info["memory"] = probe.as_dict()
    if variant == "ls_async" and ctx.spec.get("gil_probe"):
        gil_probe(ctx)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(spec["result_dir"]) / f"{spec['variant']}-rank{rank}.json"
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(spec["pg_timeout_s"])))
    ctx = Ctx(rank, world, spec)
    try:
        run(ctx)
    except BaseException as exc:
        out.write_text(json.dumps({"rank": rank, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                                   "traceback": traceback.format_exc()}))
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # the other ranks may be stuck in a collective: do not wait for a clean shutdown
    out.write_text(json.dumps({"rank": rank, "ok": True, "times": ctx.times, "info": ctx.info}))
    dist.barrier()  # leave together: tearing gloo down while a peer still uses it can hang the exit
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""One rank of one benchmark launch: ``python benchmarks/_bench_worker.py SPEC.json`` (RANK etc. in the environment).

A launch builds the state once (``kind``: the replicated DDP-like state, or the FSDP2-sharded one) and then runs
``repeats`` rounds of its *units* (a save and the load that reads it, or one variant alone), interleaved: forward
order in even rounds, reversed in odd ones, so that drift of the shared machine spreads over every variant alike
instead of landing on whichever ran last. Every timed operation is bracketed by barriers (the job waits for its
slowest rank). Each variant's peak extra resident memory is measured around each of its runs (the high-water mark
reset before it) and the largest kept. Writes ``{result_dir}/rank{r}.json`` with every variant's times and info.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _bench_context import Ctx, dcp_load_into, dcp_state
from _bench_state import (
    MemoryProbe,
    build_state,
    fsync_path,
    lightning_checkpoint,
    matmul_rate,
    raw_read,
    raw_read_fresh,
    raw_write,
    raw_write_early,
    state_bytes,
    timed,
    tree_bytes,
)
from lightning.pytorch.plugins.io import TorchCheckpointIO

# Imported here, not inside the variants: an import inside the measured block would count its ~50-90 MiB as memory the
# save or load needs.
from lightning_sharing import BackgroundSaver, CheckpointCoordinator, SharingPattern, StateComponent, ValidationLevel


# ---------------------------------------------------------------------------------------------- physical limit
def run_raw(ctx: Ctx) -> None:
    """Each rank writes its share of the LS checkpoint's bytes in parallel (the fastest use of these processes), then
    every rank reads all of them back, as every rank reads the whole replicated state on resume: into one reused
    buffer (the limit, reachable by reading into the existing parameters) and into new memory (what allocating
    fresh tensors costs)."""
    folder, total = ctx.path, int(ctx.state.get("ckpt_bytes", ctx.spec["raw_bytes"]))
    share = total // ctx.world + (ctx.rank < total % ctx.world)
    files = [folder / f"rank-{r:05d}.bin" for r in range(ctx.world)]
    folder.mkdir(parents=True, exist_ok=True)
    early = folder / f"early-{ctx.rank:05d}.bin"
    writes = [("write", lambda: raw_write(files[ctx.rank], share)),
              ("write_early", lambda: raw_write_early(early, share))]
    for name, write in writes if ctx.round % 2 == 0 else writes[::-1]:  # neither always writes into a fuller disk
        ctx.record(name, timed(write))
    early.unlink()
    ctx.record("read", timed(lambda: raw_read(files)))
    ctx.record("read_fresh", timed(lambda: raw_read_fresh(files)))
    ctx.info["bytes"] = total
    ctx.remove_on_rank0()


# ---------------------------------------------------------------------------------------------- Lightning
def run_lightning_save(ctx: Ctx) -> None:
    """DDPStrategy.save_checkpoint: rank 0 alone calls TorchCheckpointIO, then Trainer.save_checkpoint barriers."""
    io, own = TorchCheckpointIO(), {}

    def save() -> None:
        if ctx.rank == 0:
            started = time.perf_counter()
            io.save_checkpoint(lightning_checkpoint(ctx.model, ctx.optimizer, ctx.round), ctx.path)
            own["save"] = time.perf_counter() - started
            # Lightning stops here: its bytes may still sit in the page cache. Durable means fsynced, with the
            # directory entry of the renamed file too.
            fsync_path(ctx.path)
            fsync_path(ctx.path.parent)

    ctx.record("durable", timed(save))
    ctx.record("save", own.get("save"))
    if ctx.rank == 0:
        ctx.info.update(ckpt_bytes=tree_bytes(ctx.path), writer_ranks=1)


def run_lightning_load(ctx: Ctx) -> None:
    """What resuming does on every rank: CheckpointIO.load_checkpoint (torch.load), then load the state dicts."""
    def load() -> None:
        checkpoint = TorchCheckpointIO().load_checkpoint(ctx.path)
        ctx.model.load_state_dict(checkpoint["state_dict"])
        ctx.optimizer.load_state_dict(checkpoint["optimizer_states"][0])

    ctx.record("load", timed(load))
    ctx.remove_on_rank0()


# ---------------------------------------------------------------------------------------------- DCP
def run_dcp_save(ctx: Ctx) -> None:
    """dcp.save of the model and optimizer state dicts; its planner de-duplicates replicated tensors across ranks and
    FileSystemWriter fsyncs every file (sync_files=True), so the save is durable when it returns."""
    ctx.record("save", timed(lambda: dcp.save(dcp_state(ctx), checkpoint_id=ctx.path)))
    if ctx.rank == 0:
        data = [p for p in ctx.path.glob("*.distcp") if p.stat().st_size > 0]
        ctx.info.update(ckpt_bytes=tree_bytes(ctx.path), writer_ranks=len(data))


def run_dcp_load(ctx: Ctx) -> None:
    ctx.record("load", timed(lambda: dcp_load_into(ctx, ctx.path)))
    ctx.remove_on_rank0()


def run_dcp_async(ctx: Ctx) -> None:
    """dcp.async_save (its default thread checkpointer): blocked until it returns, committed until its future is done.

    DCP runs the background save's collectives on the group it is given; a group of its own keeps them apart from
    the training's, as its documentation advises."""
    group = ctx.keep.setdefault("group", dist.new_group(backend="gloo"))
    dist.barrier()
    started = time.perf_counter()
    future = dcp.async_save(dcp_state(ctx), checkpoint_id=ctx.path, process_group=group)
    ctx.record("blocked", time.perf_counter() - started)
    result = getattr(future, "upload_completion", future)
    result.result()
    ctx.record("committed", time.perf_counter() - started)
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


def run_ls_save(ctx: Ctx) -> None:
    coord = ctx.keep.setdefault("coordinator", coordinator(ctx))
    ctx.record("save", timed(lambda: coord.save_checkpoint(ctx.path, step=ctx.round)))
    size = [tree_bytes(ctx.path) if ctx.rank == 0 else 0]
    dist.broadcast_object_list(size, src=0)
    ctx.state["ckpt_bytes"] = size[0]  # what the raw baseline writes and reads
    if ctx.rank == 0:
        describe_ls_checkpoint(ctx)


def run_ls_validated(ctx: Ctx, level: str) -> None:
    """A validated save paired with an unvalidated one in the same processes, in alternating order.

    A 5% overhead is smaller than the drift between two process groups on a shared machine, so each validated save
    is compared with a reference save taken right next to it (``save_none``). One unmeasured save first takes the
    one-time costs (first collectives, lazy imports) out of the first pair.
    """
    if "plain" not in ctx.keep:
        ctx.keep.update(plain=coordinator(ctx), checked=coordinator(ctx, level))
        ctx.keep["plain"].save_checkpoint(ctx.path, step=0)
        ctx.remove_on_rank0()
    pair = [(ctx.keep["plain"], "save_none"), (ctx.keep["checked"], "save")]
    for coord, name in pair if ctx.round % 2 == 0 else reversed(pair):
        ctx.record(name, timed(lambda c=coord: c.save_checkpoint(ctx.path, step=ctx.round)))
        if ctx.rank == 0 and name == "save" and ctx.last_round:
            describe_ls_checkpoint(ctx)
        ctx.remove_on_rank0()


def run_ls_load(ctx: Ctx) -> None:
    coord = ctx.keep.setdefault("coordinator", coordinator(ctx))
    ctx.record("load", timed(lambda: coord.load_checkpoint(ctx.path)))
    ctx.remove_on_rank0()


def _shared_saver(ctx: Ctx) -> BackgroundSaver:
    """One saver for both async variants: its staging buffers (a copy of the state, kept between saves) exist once
    per process, not once per variant (two kept copies of a 4 GB state on 2 ranks did not fit in 24 GiB)."""
    return ctx.state.setdefault("saver", BackgroundSaver())


def run_ls_async(ctx: Ctx, background_staging: bool = False) -> None:
    """blocked: until save_checkpoint returns (training could go on); committed: until wait() returns.

    With background staging (``ls_async_bg``) also staged: until ``wait_staged()`` returns, what an optimizer step
    right after the save would wait for at most.
    """
    coord = ctx.keep.setdefault("coordinator", coordinator(ctx, async_save=_shared_saver(ctx)))
    coord._saver.background_staging = background_staging
    dist.barrier()
    started = time.perf_counter()
    coord.save_checkpoint(ctx.path, step=ctx.round)
    ctx.record("blocked", time.perf_counter() - started)
    if background_staging:
        coord._saver.wait_staged()
        ctx.record("staged", time.perf_counter() - started)
    coord.wait()
    ctx.record("committed", time.perf_counter() - started)
    ctx.remove_on_rank0()


def gil_probe(ctx: Ctx) -> None:
    """Python-loop matmul rate while an async save is pending, relative to the same loop with no save.

    There is no "is it done" query, so the loop runs for the median committed time measured above; ``gil_wait_after``
    (seconds wait() still blocked after the loop) > 0 shows the save really was pending for the whole loop. The
    baseline runs on all ranks at once, so contention between ranks for the cores is in both numbers.
    """
    import statistics

    coord = ctx.keep["coordinator"]
    window = statistics.median(t for t in ctx.times["committed"] if t is not None)
    dist.barrier()
    base_rate, _ = matmul_rate(max(window, 0.5))
    dist.barrier()
    started = time.perf_counter()
    coord.save_checkpoint(ctx.path, step=10**6)
    blocked = time.perf_counter() - started
    rate, _ = matmul_rate(max(window - blocked, 0.05))
    waited = time.perf_counter()
    coord.wait()
    ctx.info.update(gil_ratio=rate / base_rate, gil_base_rate=base_rate, gil_rate=rate,
                    gil_wait_after=time.perf_counter() - waited, gil_committed=time.perf_counter() - started)
    ctx.remove_on_rank0()


RUNNERS: dict[str, Callable[[Ctx], None]] = {
    "raw": run_raw, "lightning_save": run_lightning_save, "lightning_load": run_lightning_load,
    "dcp_save": run_dcp_save, "dcp_load": run_dcp_load, "dcp_async": run_dcp_async,
    "ls_sync": run_ls_save, "ls_load": run_ls_load, "ls_async": run_ls_async,
    "ls_async_bg": lambda ctx: run_ls_async(ctx, background_staging=True),
    "ls_quick": lambda ctx: run_ls_validated(ctx, "quick"), "ls_tensor": lambda ctx: run_ls_validated(ctx, "tensor"),
}


def run(spec: dict[str, Any], rank: int, world: int) -> dict[str, Ctx]:
    Path(spec["root"]).mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {}
    if spec["kind"] == "sharded":
        from _bench_sharded import RUNNERS as SHARDED_RUNNERS
        from _bench_sharded import build_sharded_state

        RUNNERS.update(SHARDED_RUNNERS)
        state["model"], state["optimizer"] = build_sharded_state(float(spec["size_gb"]), world)
        state["state_bytes"] = spec["state_bytes"]
    else:
        state["model"], state["optimizer"] = build_state(float(spec["size_gb"]))
        state["state_bytes"] = state_bytes(state["model"], state["optimizer"])
    units: list[list[str]] = spec["units"]
    ctxs = {v: Ctx(rank, world, spec, v, state) for unit in units for v in unit}
    gc.collect()  # free what building left behind, so the RSS before the measurement is the state alone
    for round_ in range(int(spec["repeats"])):
        for unit in units if round_ % 2 == 0 else units[::-1]:
            for variant in unit:
                ctx = ctxs[variant]
                ctx.round = round_
                with MemoryProbe() as probe:
                    RUNNERS[variant](ctx)
                ctx.memory.append(probe.as_dict())
    if "ls_async" in ctxs and spec.get("gil_probe"):
        gil_probe(ctxs["ls_async"])
    for ctx in ctxs.values():
        ctx.info["state_bytes"] = state["state_bytes"]
    return ctxs


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(spec["result_dir"]) / f"rank{rank}.json"
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(spec["pg_timeout_s"])))
    try:
        ctxs = run(spec, rank, world)
    except BaseException as exc:
        out.write_text(json.dumps({"rank": rank, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                                   "traceback": traceback.format_exc()}))
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # the other ranks may be stuck in a collective: do not wait for a clean shutdown
    variants = {v: {"times": c.times, "info": {**c.info, "memory": _worst(c.memory)}} for v, c in ctxs.items()}
    out.write_text(json.dumps({"rank": rank, "ok": True, "variants": variants}))
    dist.barrier()  # leave together: tearing gloo down while a peer still uses it can hang the exit
    dist.destroy_process_group()


def _worst(probes: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the largest peak extra RSS; masked if any run's measurement was."""
    worst = dict(max(probes, key=lambda p: p["extra"]))
    worst["masked"] = any(p["masked"] for p in probes)
    return worst


if __name__ == "__main__":
    main()

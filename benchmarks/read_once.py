"""Read-once loads: load time with ``read_once`` on and off, on a local disk and on S3 (moto), and bytes fetched.

    python benchmarks/read_once.py [--size-mib 192] [--world 4] [--repeats 3] [--shard-mib 32] [--pattern sharded]

Starts moto's S3 server on 127.0.0.1 (as the tests do) and a counting proxy in front of it (``FaultProxy`` of the
tests, with no fault rules: it counts the body bytes it answers). ``--world`` gloo processes (one node) each hold
the same REPLICATED state of ``--size-mib`` MiB (float32 tensors, safetensors shards of at most ``--shard-mib``
MiB) and a small GLOBAL one; rank 0's copy is saved once to a local directory and once to S3. Then, in rounds
(the order of the modes alternating between rounds), every rank loads each checkpoint into zeroed tensors, every
checksum verified, with ``read_once=True`` (the files handed over through shared memory, ``on``, the default on one
node, or broadcast over the process group, ``on-group``, as between nodes) and ``read_once=False``; a load's time is
the slowest rank's (barriers around it), the figure the median over ``--repeats``; every load is checked
``torch.equal`` to what was saved. Timed S3 loads talk to moto directly; one more load of each kind goes through the
proxy, which gives the bytes fetched from the store per load divided by the checkpoint's bytes (the objects' total
size). ``--pattern sharded`` declares the same tensors SHARDED instead (plain tensors, so every rank loads every chunk
whole): read-once then reads each chunk piece on one rank and sends it point-to-point (``engine/shared_pieces.py``;
there is no shared-memory mode, so ``on-group`` is not run).

moto runs on the same machine and shares its cores with the ranks: the S3 numbers measure client, server and
broadcast on loopback, not a network. On a local disk the page cache already shares the reads of one node, so
read-once there costs the broadcast and saves little; it is off by default there (``read_once=None``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pickle
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _bench_state import InPlaceTensors  # noqa: E402
from support.dist_harness import free_port  # noqa: E402
from support.s3 import BUCKET, FaultProxy, MotoServer, s3_environment  # noqa: E402

MIB = 1024 * 1024
#: read_once on, its files handed over through shared memory (the default on one node) / over the process group
#: (gloo broadcasts, as between nodes); read_once off.
MODES = ("on", "on-group", "off")
PATTERN = {"sharded": False}  # set in each process from --pattern


def _state(size_mib: int) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    count = max(1, size_mib // 8)  # 8 MiB tensors
    return {f"layer{i}.weight": torch.randn(1024, 2048, generator=generator) for i in range(count)}


def _coordinator(state: dict[str, Any], progress: dict[str, Any], read_once: bool | None, shard_mib: int,
                 storage_options: dict[str, Any] | None) -> Any:
    from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent
    from lightning_sharing.statefuls.holders import ValueHolder

    pattern = SharingPattern.SHARDED if PATTERN["sharded"] else SharingPattern.REPLICATED
    components = [StateComponent("model", InPlaceTensors(state), pattern),
                  StateComponent("progress", ValueHolder(progress), SharingPattern.GLOBAL)]
    return CheckpointCoordinator(components, max_shard_size=shard_mib * MIB, read_once=read_once,
                                 storage_options=storage_options)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, paths: dict[str, str],
            direct: dict[str, Any], proxied: dict[str, Any], results: Any) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                       "GROUP_RANK": "0"})
    import torch
    import torch.distributed as dist

    import lightning_sharing.engine.read_once as read_once_module

    torch.set_num_threads(1)
    PATTERN["sharded"] = args.pattern == "sharded"
    modes = _modes(args)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=900))
    try:
        saved = _state(args.size_mib)
        progress = {"step": 100, "loss": torch.tensor([0.5])}
        _coordinator(saved, progress, None, args.shard_mib, None).save_checkpoint(paths["local"])
        _coordinator(saved, progress, None, args.shard_mib, direct).save_checkpoint(paths["s3"])
        live = {name: torch.zeros_like(t) for name, t in saved.items()}
        times: dict[str, list[float]] = {}
        fetched: dict[str, int] = {}

        def load(where: str, mode: str, options: dict[str, Any] | None) -> float:
            read_once_module.USE_SHARED_MEMORY = mode != "on-group"
            for tensor in live.values():
                tensor.zero_()
            coordinator = _coordinator(live, {}, mode != "off", args.shard_mib, options)
            dist.barrier()
            start = time.perf_counter()
            result = coordinator.load_checkpoint(paths[where])
            dist.barrier()
            elapsed = time.perf_counter() - start
            assert all(torch.equal(live[n], saved[n]) for n in saved), f"{where} {mode}: not bit-exact"
            fetched[f"{where}/{mode}"] = result.shared_bytes_fetched + result.sent_piece_bytes
            return elapsed

        for round_ in range(args.repeats):
            order = modes if round_ % 2 == 0 else modes[::-1]
            for where in ("local", "s3"):
                for mode in order:
                    times.setdefault(f"{where}/{mode}", []).append(load(where, mode, direct if where == "s3" else None))
        dist.barrier()
        if rank == 0:
            results.put(("marker", ""))
        for mode in ("on", "off"):  # through the counting proxy
            load("s3", mode, proxied)
            dist.barrier()
            if rank == 0:
                results.put(("counted", mode))
            dist.barrier()
        results.put((rank, pickle.dumps({"times": times, "fetched": fetched})))
    finally:
        dist.destroy_process_group()


def _modes(args: argparse.Namespace) -> tuple[str, ...]:
    return ("on", "off") if args.pattern == "sharded" else MODES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=192)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-mib", type=int, default=32)
    parser.add_argument("--pattern", choices=("replicated", "sharded"), default="replicated")
    args = parser.parse_args()
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="read-once-") as scratch:
        server = MotoServer(Path(scratch) / "moto.log")
        server.start()
        os.environ.update(s3_environment(server.endpoint_url))
        proxy = FaultProxy(server.endpoint_url)
        try:
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir(BUCKET)
            prefix = f"{BUCKET}/read-once-{uuid.uuid4().hex[:8]}"
            paths = {"local": str(Path(scratch) / "step=1.ckpt"), "s3": f"s3://{prefix}/step=1.ckpt"}
            direct, proxied = {"endpoint_url": server.endpoint_url}, {"endpoint_url": proxy.url}
            ctx = mp.get_context("spawn")
            results = ctx.Queue()
            port = free_port()
            started = time.perf_counter()
            procs = [ctx.Process(target=_worker, args=(r, args.world, port, args, paths, direct, proxied, results))
                     for r in range(args.world)]
            for proc in procs:
                proc.start()
            per_rank: dict[int, dict[str, Any]] = {}
            counted: dict[str, int] = {}
            mark = 0
            while len(per_rank) < args.world:
                key, value = results.get(timeout=3600)
                if key == "marker":
                    mark = proxy.bytes_sent("GET", prefix)
                elif key == "counted":
                    now = proxy.bytes_sent("GET", prefix)
                    counted[value], mark = now - mark, now
                else:
                    per_rank[key] = pickle.loads(value)
            for proc in procs:
                proc.join(timeout=120)
            if any(proc.exitcode != 0 for proc in procs):
                print(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
                return 1
            checkpoint_bytes = fs.du(f"{prefix}/step=1.ckpt")
        finally:
            proxy.close()
            server.stop()
    print(f"read_once benchmark: {args.world} ranks (gloo, one node, {os.cpu_count()} cores), "
          f"{args.pattern.upper()} state of "
          f"{args.size_mib} MiB in shards of <= {args.shard_mib} MiB + a GLOBAL one; checkpoint {checkpoint_bytes} "
          f"bytes; {args.repeats} rounds, median (min-max) of the slowest rank; "
          f"total {time.perf_counter() - started:.0f}s")
    print(f"{'load':<12} {'read_once':<10} {'time s':>8}  {'min-max':>13}  {'shared MiB fetched per rank':>28}")
    for where in ("local", "s3"):
        for mode in _modes(args):
            key = f"{where}/{mode}"
            runs = [max(per_rank[r]["times"][key][i] for r in per_rank) for i in range(args.repeats)]
            shares = [per_rank[r]["fetched"][key] / MIB for r in sorted(per_rank)]
            print(f"{where:<12} {mode:<10} {statistics.median(runs):>8.2f}  {min(runs):>6.2f}-{max(runs):<6.2f}  "
                  f"{' '.join(f'{s:.0f}' for s in shares):>28}")
    for mode in ("on", "off"):
        print(f"s3 read_once {mode}: bytes fetched from the store per load / checkpoint bytes = "
              f"{counted[mode] / checkpoint_bytes:.3f} ({counted[mode]} / {checkpoint_bytes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The local tier against the persistent tier: save_local's blocked time, restore's time, and replica traffic.

    python benchmarks/local_tier.py [--size-mib 256] [--nodes 2] [--ranks-per-node 2] [--repeats 5]

``--nodes`` x ``--ranks-per-node`` gloo processes on this machine, simulated nodes (``GROUP_RANK`` as torchrun sets
it, each node's local tier in a directory of its own, ``{node}``), hold the same REPLICATED model and AdamW state of
about ``--size-mib`` MiB (weights and both moments, float32, as under DDP; ``_bench_state.build_state``) and a small
PER_RANK one. In interleaved rounds (the order reversed every other round) it times, as the slowest rank's time
between barriers:

- ``persistent sync save``: ``save_checkpoint`` to a local directory, synchronous (what a job blocks for without
  async saves);
- ``persistent async (blocked)``: the same with ``async_save=True``, until it returns (for comparison: the issue asks
  save_local's blocked time to be as for persistent async saves);
- ``save_local sync``: ``save_local`` written, committed and copied to ``replicas=1`` peer node;
- ``save_local async (blocked)``: ``save_local`` with ``async_save=True``: the time until it returns (the node's copy
  staged, spread over its ranks); the background write is then waited for, untimed;
- ``save_local async, background staging (blocked)``: the same with ``background_staging=True`` (the weights and
  optimizer state are copied on the saver's thread; the next ``optimizer.step()`` would wait for that copy);
- ``restore from local``: ``restore(directory)`` choosing the local step (every file read and verified);
- ``load from S3 (moto)``: ``load_checkpoint`` of the same state saved to moto's S3 server on 127.0.0.1.

Then it prints the target ratios of issue 22 (async blocked <= 0.1 x persistent sync save; local restore <= 0.3 x S3
load) and the replica traffic: the bytes a node received into ``replica_of_*`` per save against ``replicas x`` the
node's own bytes. Every restore and load is checked ``torch.equal`` to what was saved. moto shares the machine's
cores with the ranks: the S3 numbers measure client, server and loopback, not a network.
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

from _bench_state import InPlaceTensors, build_state, state_bytes  # noqa: E402
from support.dist_harness import free_port  # noqa: E402
from support.s3 import BUCKET, MotoServer, s3_environment  # noqa: E402

MIB = 1024 * 1024
UNITS = ("persistent sync save", "persistent async (blocked)", "save_local sync", "save_local async (blocked)",
         "save_local async, background staging (blocked)", "restore from local", "load from S3 (moto)")


def _worker(rank: int, args: argparse.Namespace, port: int, scratch: str, s3: str, options: dict[str, Any],
            results: Any) -> None:
    world = args.nodes * args.ranks_per_node
    node = rank // args.ranks_per_node
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % args.ranks_per_node),
                       "LOCAL_WORLD_SIZE": str(args.ranks_per_node), "GROUP_RANK": str(node)})
    import torch
    import torch.distributed as dist

    from lightning_sharing import CheckpointCoordinator, LocalTier, SharingPattern, StateComponent
    from lightning_sharing.distributed.async_save import BackgroundSaver

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=900))
    try:
        model, optimizer = build_state(args.size_mib * MIB / 1e9)
        mine = {"noise": torch.full((256,), float(rank))}
        live_mine = {n: t.clone() for n, t in mine.items()}
        tier = LocalTier(str(Path(scratch) / "local" / "{node}"), replicas=1, keep=1)
        ckpts = Path(scratch) / "ckpts"

        def coordinator(**kwargs: Any) -> Any:
            return CheckpointCoordinator([StateComponent("model", model, SharingPattern.REPLICATED),
                                          StateComponent("optimizer", optimizer, SharingPattern.REPLICATED),
                                          StateComponent("mine", InPlaceTensors(live_mine), SharingPattern.PER_RANK)],
                                         local_tier=tier, **kwargs)

        def tensors() -> list[Any]:
            state = optimizer.state_dict()["state"]
            return [*model.state_dict().values(), *(t for s in state.values() for t in s.values())]

        saved = [t.clone() for t in tensors()]
        sync, background, remote = coordinator(), coordinator(async_save=True), coordinator(storage_options=options)
        late = coordinator(async_save=BackgroundSaver(background_staging=True))
        remote.save_checkpoint(s3, step=0)
        times: dict[str, list[float]] = {}
        step = 0

        def timed(unit: str, work: Any, after: Any = None) -> None:
            dist.barrier()
            start = time.perf_counter()
            work()
            dist.barrier()
            times.setdefault(unit, []).append(time.perf_counter() - start)
            if after is not None:
                after()
            dist.barrier()

        def scramble() -> None:
            with torch.no_grad():
                for tensor in (*tensors(), *live_mine.values()):
                    tensor.zero_()

        def check() -> None:
            assert all(torch.equal(a, b) for a, b in zip(tensors(), saved, strict=True)), "not bit-exact"
            assert all(torch.equal(live_mine[n], mine[n]) for n in mine), "not bit-exact (PER_RANK)"

        def restore_local() -> None:
            assert sync.restore(ckpts) == step

        def units() -> dict[str, tuple[Any, Any]]:
            nonlocal step
            step += 1
            at = step
            return {
                "persistent sync save": (lambda: sync.save_checkpoint(ckpts / "step=0.ckpt", step=0), None),
                "persistent async (blocked)": (lambda: background.save_checkpoint(ckpts / "step=0.ckpt", step=0),
                                               background.wait),
                "save_local sync": (lambda: sync.save_local(at), None),
                "save_local async (blocked)": (lambda: background.save_local(at), background.wait),
                "save_local async, background staging (blocked)": (lambda: late.save_local(at), late.wait),
                "restore from local": (lambda: (scramble(), restore_local()), check),
                "load from S3 (moto)": (lambda: (scramble(), remote.load_checkpoint(s3)), check),
            }

        for round_ in range(args.repeats):
            work = units()
            order = list(UNITS) if round_ % 2 == 0 else list(UNITS)[::-1]
            if "restore from local" in order:  # a local step must exist before it is restored
                order.remove("restore from local")
                order.append("restore from local")
            for unit in order:
                timed(unit, *work[unit])
        node_dir = Path(scratch) / "local" / str(node)
        own = sum(p.stat().st_size for p in (node_dir / "own").rglob("*") if p.is_file())
        replica = sum(p.stat().st_size for d in node_dir.glob("replica_of_*") for p in d.rglob("*") if p.is_file())
        results.put((rank, pickle.dumps({"times": times, "own": own, "replica": replica,
                                         "state": state_bytes(model, optimizer)})))
    finally:
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch.multiprocessing as mp

    world = args.nodes * args.ranks_per_node
    replicas = min(1, args.nodes - 1)  # what LocalTier(replicas=1) gives: no peer on one node
    with tempfile.TemporaryDirectory(prefix="local-tier-") as scratch:
        server = MotoServer(Path(scratch) / "moto.log")
        server.start()
        os.environ.update(s3_environment(server.endpoint_url))
        try:
            import s3fs

            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
            s3 = f"s3://{BUCKET}/local-tier-{uuid.uuid4().hex[:8]}/step=0.ckpt"
            ctx = mp.get_context("spawn")
            results = ctx.Queue()
            port = free_port()
            started = time.perf_counter()
            procs = [ctx.Process(target=_worker, args=(r, args, port, scratch, s3,
                                                       {"endpoint_url": server.endpoint_url}, results))
                     for r in range(world)]
            for proc in procs:
                proc.start()
            per_rank = {}
            while len(per_rank) < world:
                rank, value = results.get(timeout=3600)
                per_rank[rank] = pickle.loads(value)
            for proc in procs:
                proc.join(timeout=120)
            if any(proc.exitcode != 0 for proc in procs):
                print(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
                return 1
        finally:
            server.stop()
    print(f"local tier benchmark: {args.nodes} simulated nodes x {args.ranks_per_node} ranks (gloo, {os.cpu_count()} "
          f"cores), REPLICATED model + AdamW of {per_rank[0]['state'] / MIB:.0f} MiB + a small PER_RANK state, "
          f"replicas={replicas}; {args.repeats} rounds, median (min-max) of the slowest rank; total "
          f"{time.perf_counter() - started:.0f}s")
    medians = {}
    for unit in UNITS:
        runs = [max(per_rank[r]["times"][unit][i] for r in per_rank) for i in range(args.repeats)]
        medians[unit] = statistics.median(runs)
        print(f"  {unit:<48} {medians[unit]:>7.3f} s  ({min(runs):.3f}-{max(runs):.3f})")
    sync_save = medians["persistent sync save"]
    for unit in ("save_local async (blocked)", "save_local async, background staging (blocked)",
                 "persistent async (blocked)"):
        ratio = medians[unit] / sync_save
        print(f"{unit} / persistent sync save = {ratio:.3f} (target <= 0.1: {'met' if ratio <= 0.1 else 'NOT met'})")
    restore = medians["restore from local"] / medians["load from S3 (moto)"]
    print(f"restore from local / load from S3 = {restore:.3f} (target <= 0.3: "
          f"{'met' if restore <= 0.3 else 'NOT met'})")
    for node in range(args.nodes):
        ranks = range(node * args.ranks_per_node, (node + 1) * args.ranks_per_node)
        own, replica = per_rank[ranks[0]]["own"], per_rank[ranks[0]]["replica"]
        print(f"node {node}: own step {own} bytes, received replicas {replica} bytes per save "
              f"({replica / own:.3f} x its own; replicas={replicas}, nodes of equal state)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

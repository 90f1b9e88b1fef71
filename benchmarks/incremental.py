"""Incremental saves: bytes written and save time of ``incremental=True`` against plain saves of the same state.

    python benchmarks/incremental.py [--backbone-mib 1024] [--world 2] [--rounds 5] [--full] [--dir DIR]

``--world`` gloo processes hold the same model: a frozen backbone of ``--backbone-mib`` MiB (float32 linear layers,
``requires_grad=False``) and a trainable adapter of about 1% of its parameters, with AdamW on the adapter and an EMA
of it, all REPLICATED (the shards spread over the ranks). Each round trains one step, then saves the same state twice,
the order alternating between rounds: incrementally (one coordinator, ``incremental=True``, into ``DIR/inc``) and
plainly (another coordinator, into ``DIR/plain``; only its newest two checkpoints are kept). A save's time is the
slowest rank's (barriers around it). The bytes a save wrote come from its manifest (``inspect``'s written vs
reused). Printed: the first save's bytes and time, then for the later rounds the largest bytes ratio
(incremental / first save) and the median time ratio (incremental / plain, same round).

``--full`` trains every parameter (full fine-tuning: nothing is unchanged): the time ratio is then what
incremental costs when it can reuse nothing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.dist_harness import run_distributed  # noqa: E402

MIB = 1024 * 1024
WIDTH = 2048  # a 2048 x 2048 float32 layer is 16 MiB


def _run(backbone_mib: int, full: bool) -> tuple[Any, Any, Any, list[Any]]:
    import torch

    torch.manual_seed(0)
    layers = max(1, backbone_mib // 16)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])
    adapter = torch.nn.Linear(WIDTH, max(1, layers * WIDTH // 100))  # about 1% of the backbone's parameters
    if not full:
        model.requires_grad_(False)
    trainable = list(adapter.parameters()) + (list(model.parameters()) if full else [])
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ema = {k: v.detach().clone() for k, v in adapter.state_dict().items()}
    return model, adapter, optimizer, [ema]


def _worker(rank: int, world: int, args: argparse.Namespace, base: str) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist

    from lightning_sharing import CheckpointCoordinator, OptimizerState, SharingPattern, StateComponent
    from lightning_sharing.checkpoint.manifest import CheckpointManifest
    from lightning_sharing.cli.inspect import reuse_summary
    from lightning_sharing.statefuls.holders import ValueHolder

    torch.set_num_threads(1)
    model, adapter, optimizer, (ema,) = _run(args.backbone_mib, args.full)
    both = torch.nn.ModuleDict({"backbone": model, "adapter": adapter})
    components = [StateComponent("model", both, SharingPattern.REPLICATED),
                  StateComponent("optimizer", OptimizerState(both, optimizer), SharingPattern.REPLICATED),
                  StateComponent("ema", ValueHolder(ema), SharingPattern.REPLICATED)]  # only saved here
    savers = {"inc": CheckpointCoordinator(components, incremental=True),
              "plain": CheckpointCoordinator(components, incremental=False)}
    rows = []
    for step in range(1, args.rounds + 1):
        data = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(step))
        adapter(model(data)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for name, value in adapter.state_dict().items():
                ema[name].lerp_(value, 0.1)
        row: dict[str, Any] = {"step": step}
        for kind in (("inc", "plain") if step % 2 else ("plain", "inc")):
            path = Path(base) / kind / f"step={step}.ckpt"
            dist.barrier()
            started = time.perf_counter()
            savers[kind].save_checkpoint(path, step=step)
            elapsed = torch.tensor([time.perf_counter() - started])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            row[kind] = elapsed.item()
            if rank == 0:
                row[f"{kind}_bytes"] = reuse_summary(CheckpointManifest.load(path))
        if rank == 0 and step > 2:  # the plain checkpoints are only timed: keep the disk small
            shutil.rmtree(Path(base) / "plain" / f"step={step - 2}.ckpt")
        dist.barrier()
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone-mib", type=int, default=1024)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--full", action="store_true", help="train everything (full fine-tuning)")
    parser.add_argument("--dir", default=None, help="where to save (default: a temporary directory)")
    args = parser.parse_args()
    base = args.dir or tempfile.mkdtemp(prefix="incremental-bench-")
    try:
        rows = run_distributed(_worker, args.world, args, base, timeout=3600)[0]
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    first = rows[0]["inc_bytes"]["written"]
    print(f"backbone {args.backbone_mib} MiB, world {args.world}, {'full fine-tuning' if args.full else 'frozen'}")
    print("step  inc s  plain s  inc/plain  written MiB  reused MiB  written/first")
    for row in rows:
        written, reused = row["inc_bytes"]["written"], row["inc_bytes"]["reused"]
        print(f"{row['step']:>4}  {row['inc']:5.2f}  {row['plain']:7.2f}  {row['inc'] / row['plain']:9.3f}  "
              f"{written / MIB:11.1f}  {reused / MIB:10.1f}  {written / first:13.4f}")
    later = rows[1:]
    if later:
        most = max(r["inc_bytes"]["written"] for r in later) / first
        print(f"later saves: bytes written / first save <= {most:.4f}; "
              f"time incremental / plain (median) = {statistics.median(r['inc'] / r['plain'] for r in later):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

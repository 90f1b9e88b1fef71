"""Peak memory of ``lightning-sharing export``: it must stay about one output shard, never the model.

Builds a SHARDED checkpoint with 2 gloo ranks (FSDP2 over a stack of ``--width`` x ``--width`` float32 layers)
and a REPLICATED one (one process, shards of ``--shard`` bytes), then runs ``lightning-sharing export`` on each
in a fresh process and reads that process's peak resident set size from the kernel (``VmHWM`` of its own
address space, read as it exits), next to the peak of a process that only imports the same modules and
touches torch and DTensor (the baseline). Nothing is timed.

    python benchmarks/export_memory.py [--layers 8] [--width 4096] [--shard 256MB] [--dir D] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _model(layers: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def _save_sharded(rank: int, world: int, port: int, path: str, layers: int, width: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    model = _model(layers, width)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    CheckpointCoordinator([StateComponent("model", model, SharingPattern.SHARDED)]).save_checkpoint(path, step=1)
    dist.barrier()
    dist.destroy_process_group()


_REPORT = ("import atexit, runpy, sys\n"
           "where = sys.argv[1]\n"
           "def report():\n"
           "    fields = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
           "    open(where, 'w').write(fields['VmHWM'].split()[0])\n"
           "atexit.register(report)\n"
           "code = sys.argv[2]\n"
           "sys.argv = ['lightning-sharing', *sys.argv[3:]]\n"
           "exec(code) if code else runpy.run_module('lightning_sharing.cli', run_name='__main__')\n")


def _peak_rss_mib(code: str, argv: list[str], report: Path) -> tuple[int, float]:
    """Run ``code`` (or, if empty, the ``lightning-sharing`` command line with ``argv``) in a fresh Python;
    its exit status and its peak resident set size (MiB): the kernel's high-water mark of that process's own
    address space (``VmHWM``), read as it exits, so nothing the parent held is counted."""
    proc = subprocess.run([sys.executable, "-c", _REPORT, str(report), code, *argv], cwd=ROOT,
                          stdout=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"), check=False)
    return proc.returncode, int(report.read_text()) / 1024  # kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--shard", default="256MB", help="--max-shard-size of the export")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    import torch.multiprocessing as mp

    from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent
    from lightning_sharing.engine.export import parse_size

    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        model_bytes = args.layers * (args.width * args.width + args.width) * 4
        sharded = work / "sharded.ckpt"
        mp.start_processes(_save_sharded, args=(2, _free_port(), str(sharded), args.layers, args.width), nprocs=2,
                           start_method="spawn")
        replicated = work / "replicated.ckpt"
        CheckpointCoordinator([StateComponent("model", _model(args.layers, args.width), SharingPattern.REPLICATED)],
                              max_shard_size=parse_size(args.shard)).save_checkpoint(replicated, step=1)
        report = work / "vmhwm"
        imports = "import lightning_sharing.cli, torch, torch.distributed.tensor; torch.ones(1).sum()"
        code, baseline = _peak_rss_mib(imports, [], report)
        assert code == 0
        rows = []
        for name, checkpoint, extra in (("SHARDED (2-rank FSDP2 chunks)", sharded, []),
                                        ("SHARDED -> bfloat16", sharded, ["--dtype", "bfloat16"]),
                                        ("REPLICATED (whole-tensor shards)", replicated, [])):
            out = work / f"hf-{len(rows)}"
            code, peak = _peak_rss_mib("", ["export", str(checkpoint), str(out), "--max-shard-size", args.shard,
                                            *extra], report)
            assert code == 0, f"export of {checkpoint} failed with {code}"
            files = sorted(out.glob("*.safetensors"))
            rows.append({"case": name, "peak_rss_mib": round(peak, 1), "above_baseline_mib": round(peak - baseline, 1),
                         "output_files": len(files), "largest_output_mib": round(max(f.stat().st_size for f in files)
                                                                                  / 2**20, 1)})
            shutil.rmtree(out)
        result = {"model_mib": round(model_bytes / 2**20, 1),
                  "largest_tensor_mib": round(args.width ** 2 * 4 / 2**20, 1), "max_shard_size": args.shard,
                  "baseline_rss_mib": round(baseline, 1), "cases": rows, "torch": torch.__version__}
        print(json.dumps(result, indent=2))
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()

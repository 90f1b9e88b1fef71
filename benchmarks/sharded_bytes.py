"""Bytes each rank writes for a SHARDED model + AdamW state under FSDP2 x tensor parallel, through the coordinator.

4 gloo ranks as a ("dp", "tp") = (2, 2) mesh; tensor parallelism splits two layers (colwise, rowwise), FSDP2
shards everything over "dp", and one layer is left to FSDP alone (a DTensor on the dp slice, held again by the
other tp rank, so those two replicas share its writing). Prints, per rank, the bytes of the files it wrote
(from the manifest) and the tensor bytes of its chunks, against the total state.

    python benchmarks/sharded_bytes.py [--width 1000]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch


def _worker(rank: int, world: int, port: int, path: str, width: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lightning_sharing import CheckpointCoordinator, OptimizerState, SharingPattern, StateComponent

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.ReLU(), torch.nn.Linear(2 * width, width),
                                torch.nn.ReLU(), torch.nn.Linear(width, width))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).sum().backward()
    optimizer.step()
    CheckpointCoordinator([StateComponent("model", model, SharingPattern.SHARDED),
                           StateComponent("optimizer", OptimizerState(model, optimizer), SharingPattern.SHARDED)]
                          ).save_checkpoint(path, step=1)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1000, help="layer width (1000: uneven over 2 and 4)")
    args = parser.parse_args()
    import torch.multiprocessing as mp

    from lightning_sharing import CheckpointManifest
    from lightning_sharing.sharded import ShardedIndex

    work = Path(tempfile.mkdtemp())
    try:
        path = work / "step=1.ckpt"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.start_processes(_worker, args=(4, port, str(path), args.width), nprocs=4, start_method="spawn")
        files: dict[int, int] = {}
        for entry in CheckpointManifest.load(path).all_files():
            files[entry.rank] = files.get(entry.rank, 0) + entry.size
        chunks: dict[int, int] = {}
        for key in ("model", "optimizer"):
            index = ShardedIndex.from_json(json.loads((path / key / "index.json").read_text()))
            for rank, size in index.bytes_by_writer().items():
                chunks[rank] = chunks.get(rank, 0) + size
        width = args.width
        params = (width * 2 * width + 2 * width) + (2 * width * width + width) + (width * width + width)
        print(json.dumps({"width": width, "state_bytes": 3 * 4 * params + 6 * 4,
                          "file_bytes_by_rank": dict(sorted(files.items())),
                          "chunk_bytes_by_rank": dict(sorted(chunks.items())),
                          "total_chunk_bytes": sum(chunks.values())}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

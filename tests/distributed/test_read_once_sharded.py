"""Read-once for SHARDED state on 4 real gloo ranks: chunk pieces several ranks load are fetched by one of them.

One job saves an FSDP2 model (4 ranks) and its AdamW state to moto's S3 server, then loads it back through a proxy
that counts the bytes it answers, into layouts that hold parts of the state on several ranks:
- a plain module and optimizer on every rank (every rank loads every byte): with ``read_once`` the chunk files are
  fetched about once (<= 1.05x their bytes), without it about 4 times;
- tensor parallel over 2 ranks x 2 data-parallel replicas (each replica loads the same shards) plus FSDP on a
  sub-mesh for one layer: each piece once (the files are fetched less than 0.6x as often as without read-once:
  pieces of one small file held by different pairs are read by different ranks, each fetching the file whole);
every result ``torch.equal`` to what was saved. A chunk file corrupted on disk fails the read-once load on every
rank with the same error, raised by the one rank that read the piece.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from support.dist_harness import run_distributed
from support.s3 import FaultProxy

from lightning_sharing.engine.shared_pieces import PieceRoutes, plan_routes

WORLD = 4
CHUNKS = "/chunks-"


def _model(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, 16))


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    generator = torch.Generator().manual_seed(99)
    for _ in range(2):
        model(torch.randn(8, 128, generator=generator)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def _fsdp(seed: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model(seed)
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",)))
    return model


def _tensor_parallel(seed: int) -> torch.nn.Module:
    """Layers 0 and 2 split by rows over "tp" and held again by the other "dp" replica; layer 4 FSDP-sharded over
    "dp" only, so each "tp" pair holds the same piece of it. (Rows: a column split reads whole saved rows, whatever
    read-once does, see docs/storage.md.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = _model(seed)
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(output_layouts=Replicate()),
                                           "2": ColwiseParallel(output_layouts=Replicate())})
    fully_shard(model[4], mesh=mesh["dp"])
    return model


def _load(layout: str, url: str, read_once: bool, storage_options: dict[str, Any], reference: dict) -> dict:
    from support.sharded import components, differences, full_state

    from lightning_sharing import CheckpointCoordinator

    model = _model(7) if layout == "plain" else _tensor_parallel(7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, foreach=False)
    _train(model, optimizer)  # other values everywhere, so a piece that did not arrive shows
    result = CheckpointCoordinator(components(model, optimizer), read_once=read_once,
                                   storage_options=storage_options).load_checkpoint(url)
    return {"differences": differences(full_state(model, optimizer), reference), "read_once": result.read_once,
            "received": result.received_pieces, "sent": result.sent_piece_bytes}


def _worker(rank: int, world: int, urls: dict[str, str], direct: dict, proxied: dict, local: str) -> dict:
    import torch.distributed as dist
    from support.sharded import components, full_state

    from lightning_sharing import CheckpointCoordinator

    model = _fsdp(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    _train(model, optimizer)
    reference = full_state(model, optimizer)
    for url in urls.values():
        CheckpointCoordinator(components(model, optimizer), storage_options=direct).save_checkpoint(url)
    CheckpointCoordinator(components(model, optimizer)).save_checkpoint(local)
    out = {"plain_on": _load("plain", urls["plain_on"], True, proxied, reference),
           "plain_off": _load("plain", urls["plain_off"], False, proxied, reference),
           "tp_on": _load("tp", urls["tp_on"], True, proxied, reference),
           "tp_off": _load("tp", urls["tp_off"], False, proxied, reference)}
    if rank == 0:  # flip one byte of the first chunk file, keeping its size
        chunk = sorted((Path(local) / "model").glob("chunks-*.safetensors"))[0]
        data = bytearray(chunk.read_bytes())
        data[-3] ^= 0xFF
        chunk.write_bytes(bytes(data))
    dist.barrier()
    try:
        _load("plain", local, True, {}, reference)
        out["corrupt"] = "loaded"
    except Exception as exc:  # the error each rank sees, compared across ranks below
        out["corrupt"] = f"{type(exc).__name__}: {exc}"
    return out


def test_chunk_pieces_several_ranks_load_are_fetched_once_bit_exact(moto_server, s3, s3_prefix: str,
                                                                     fault_proxy: FaultProxy, tmp_path: Path) -> None:
    urls = {kind: f"s3://{s3_prefix}/{kind}.ckpt" for kind in ("plain_on", "plain_off", "tp_on", "tp_off")}
    reports = run_distributed(_worker, WORLD, urls, {"endpoint_url": moto_server.endpoint_url},
                              {"endpoint_url": fault_proxy.url}, str(tmp_path / "local.ckpt"), timeout=400)
    for rank, report in enumerate(reports):
        for kind in urls:
            assert report[kind]["differences"] == [], (rank, kind, report[kind])
        assert report["plain_on"]["read_once"] and not report["plain_off"]["read_once"]
        assert report["plain_off"]["received"] == 0 and report["plain_off"]["sent"] == 0
    # Every rank loads every piece whole: each is read by one rank, the readers split the bytes, the rest receive.
    assert all(r["plain_on"]["received"] > 0 and r["plain_on"]["sent"] > 0 for r in reports), reports
    assert sum(r["tp_on"]["received"] for r in reports) > 0

    def ratio(kind: str) -> float:
        stored = sum(size for name, size in s3.du(f"{s3_prefix}/{kind}.ckpt", total=False).items() if CHUNKS in name)
        assert stored > 100_000
        return fault_proxy.bytes_sent("GET", f"/{kind}.ckpt/", CHUNKS) / stored

    assert ratio("plain_on") <= 1.05, ratio("plain_on")
    assert ratio("plain_off") >= 3.5, ratio("plain_off")  # the test tells the two apart
    # Tensor parallel: each piece is read by one rank of the pair holding it, but pairs holding different pieces of one
    # small file both fetch it whole (an object reader fetches at least 1 MiB, storage/object_files.py).
    assert ratio("tp_on") <= 0.6 * ratio("tp_off"), (ratio("tp_on"), ratio("tp_off"))

    errors = {report["corrupt"] for report in reports}
    assert len(errors) == 1, errors
    error = errors.pop()
    assert error.startswith("DistributedCorruptCheckpointError: loading checkpoint"), error
    assert " failed on rank " in error and "chunks-00000.safetensors" in error, error


def test_routes_send_each_shared_piece_from_one_reader_grouped_by_file_and_balanced_by_bytes() -> None:
    reports = [
        [(b"big", 100, 1), (b"mine0", 10, 1), (b"x", 20, 2)],
        [(b"big", 100, 1), (b"x", 20, 2)],
        [(b"big", 100, 1), (b"x", 20, 2), (b"y", 5, 2)],
        [(b"y", 5, 2)],
    ]
    routes = plan_routes(reports)
    # "big" (largest first) goes to rank 1 (rank 0 already reads its own 10 bytes), "x" to rank 2, "y" to rank 3.
    assert routes[1].sends == ((0, (b"big",)), (2, (b"big",)))
    assert routes[2].sends == ((0, (b"x",)), (1, (b"x",)))
    assert routes[3].sends == ((2, (b"y",)),)
    assert routes[0] == PieceRoutes(frozenset({b"big", b"x"}), (), ((1, (b"big",)), (2, (b"x",))))
    assert routes[2].received == frozenset({b"big", b"y"})
    assert routes[2].receives == ((1, (b"big",)), (3, (b"y",)))
    # The pieces of one file held by the same ranks go to one reader, even when splitting them would balance better.
    same_file = plan_routes([[(b"p", 10, 7), (b"q", 10, 7)], [(b"p", 10, 7), (b"q", 10, 7)]])
    assert same_file[0].sends == ((1, (b"p", b"q")),) and same_file[1].sends == ()
    # What one rank holds alone stays its own, and nothing is routed when nothing is held twice.
    assert plan_routes([[(b"a", 1, 1)], [(b"b", 1, 1)]]) == [PieceRoutes(), PieceRoutes()]

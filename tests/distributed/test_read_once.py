"""Read-once loads on real gloo process groups: each file every rank reads is fetched from storage by one rank.

- On moto's S3 server, through a proxy that counts the bytes it answers: 4 ranks load GLOBAL + REPLICATED state
  (a module read into its live parameters, a flat tensor dict, an optimizer-like tree) and PER_RANK state; with
  ``read_once`` on, the bytes fetched per load are about the checkpoint's bytes (<= 1.05x), with it off about 4x;
  every result is ``torch.equal`` to what was saved either way; with it, the manifest is read and the objects
  listed by rank 0 alone, without it by every rank.
- A reader that fails (the proxy refuses one shared file's GET; a shared file corrupted on disk) fails the load on
  every rank with the same error, naming the file once, and no rank hangs.
- ``read_once=None`` resolves to on for S3 and for a job on several nodes, off for one node on a local disk.
- On one node the files go through shared memory (nothing left there afterwards); a file shared memory cannot take
  is broadcast instead; across (simulated) nodes they are broadcast over the process group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from support.dist_harness import run_distributed
from support.s3 import FaultProxy, Rule
from support.statefuls import Holder

from lightning_sharing.core.topology import Topology

WORLD = 4
REFUSED = "model-00002-of-00004.safetensors"


def _saved_state(rank: int) -> dict[str, Any]:
    """What each rank saves: shared state identical on every rank, per-rank state of its own."""
    generator = torch.Generator().manual_seed(1234)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    for parameter in net.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator)
    return {
        "net": net.state_dict(),
        "model": {f"layer{i}.weight": torch.randn(256, 256, generator=generator) for i in range(16)},  # 4 MiB
        "optimizer": {"state": {"exp_avg": torch.randn(128, 128, generator=generator).to(torch.bfloat16),
                                "step": torch.tensor(7)}, "param_groups": [{"lr": 0.25, "betas": [0.9, 0.99]}]},
        "progress": {"step": 5, "loss": torch.tensor([0.5, 0.25], dtype=torch.float64)},
        "rng": {"rank": rank, "seed": torch.full((16,), rank, dtype=torch.int64)},
    }


def _coordinator(state: dict[str, Any] | None, read_once: bool | None, storage_options: dict[str, Any] | None):
    from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent

    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    if state is not None:
        net.load_state_dict(state["net"])
    holders = {key: Holder(state[key] if state is not None else None)
               for key in ("model", "optimizer", "progress", "rng")}
    components = [
        StateComponent("net", net, SharingPattern.REPLICATED),
        StateComponent("model", holders["model"], SharingPattern.REPLICATED),
        StateComponent("optimizer", holders["optimizer"], SharingPattern.REPLICATED),
        StateComponent("progress", holders["progress"], SharingPattern.GLOBAL),
        StateComponent("rng", holders["rng"], SharingPattern.PER_RANK),
    ]
    coordinator = CheckpointCoordinator(components, max_shard_size=1 << 20, read_once=read_once,
                                        storage_options=storage_options)
    return coordinator, net, holders


def _mismatches(expected: Any, actual: Any, where: str = "") -> list[str]:
    if isinstance(expected, torch.Tensor):
        same = isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype and torch.equal(actual, expected)
        return [] if same else [where]
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            return [where]
        return [m for key in expected for m in _mismatches(expected[key], actual[key], f"{where}/{key}")]
    if isinstance(expected, (list, tuple)):
        if len(actual) != len(expected):
            return [where]
        pairs = enumerate(zip(expected, actual, strict=True))
        return [m for i, (e, a) in pairs for m in _mismatches(e, a, f"{where}/{i}")]
    return [] if expected == actual else [where]


def _load(rank: int, path: str, read_once: bool | None, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    coordinator, net, holders = _coordinator(None, read_once, storage_options)
    result = coordinator.load_checkpoint(path)
    loaded = {"net": net.state_dict(), **{key: holder.state for key, holder in holders.items()}}
    return {"mismatch": _mismatches(_saved_state(rank), loaded), "read_once": result.read_once,
            "shared_files": result.shared_files, "fetched": result.shared_bytes_fetched}


def _error_of(call: Any) -> dict[str, str]:
    try:
        call()
    except Exception as exc:
        return {"type": type(exc).__name__, "kinds": [t.__name__ for t in type(exc).__mro__], "message": str(exc)}
    return {"type": "none", "kinds": [], "message": ""}


def _s3_worker(rank: int, world_size: int, urls: dict[str, str], direct: dict[str, Any], proxied: dict[str, Any],
               local: str) -> dict[str, Any]:
    coordinator, _, _ = _coordinator(_saved_state(rank), None, direct)
    for url in urls.values():
        coordinator.save_checkpoint(url)
    local_coordinator, _, _ = _coordinator(_saved_state(rank), None, None)
    local_coordinator.save_checkpoint(local)
    report = {"on": _load(rank, urls["on"], True, proxied), "off": _load(rank, urls["off"], False, proxied),
              "auto_s3": _load(rank, urls["auto"], None, direct), "auto_local": _load(rank, local, None, None)}
    faulty, _, _ = _coordinator(None, True, proxied)
    report["refused"] = _error_of(lambda: faulty.load_checkpoint(urls["refused"]))
    return report


def test_read_once_on_s3_fetches_each_file_once_bit_exact_and_a_refused_read_fails_every_rank(
        moto_server, s3, s3_prefix: str, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    names = {"on": "ckpt-on", "off": "ckpt-off", "auto": "ckpt-auto", "refused": "ckpt-refused"}
    urls = {kind: f"s3://{s3_prefix}/{name}.ckpt" for kind, name in names.items()}
    refused = fault_proxy.add(Rule("error", times=100, method="GET", contains=(names["refused"], REFUSED)))
    direct = {"endpoint_url": moto_server.endpoint_url}
    proxied = {"endpoint_url": fault_proxy.url}
    reports = run_distributed(_s3_worker, WORLD, urls, direct, proxied, str(tmp_path / "local.ckpt"), timeout=400)

    for rank, report in enumerate(reports):
        for kind in ("on", "off", "auto_s3", "auto_local"):
            assert report[kind]["mismatch"] == [], (rank, kind, report[kind])
        assert report["on"]["read_once"] and report["auto_s3"]["read_once"]
        assert not report["off"]["read_once"] and not report["auto_local"]["read_once"]
        assert report["on"]["shared_files"] > WORLD  # the shards are split between the ranks
    # The ranks split the reading: each fetched a share of the shared files.
    assert all(report["on"]["fetched"] > 0 for report in reports)

    checkpoint_bytes = s3.du(f"{s3_prefix}/{names['on']}.ckpt")
    assert checkpoint_bytes > 4 << 20
    on = fault_proxy.bytes_sent("GET", names["on"]) / checkpoint_bytes
    off = fault_proxy.bytes_sent("GET", names["off"]) / s3.du(f"{s3_prefix}/{names['off']}.ckpt")
    assert on <= 1.05, on
    # Rank 0 alone reads the manifest and lists the checkpoint's objects; without read-once every rank does.
    manifest_gets = {kind: fault_proxy.count("GET", f"/{names[kind]}.ckpt/checkpoint_manifest.json")
                     for kind in ("on", "off")}
    listings = {kind: fault_proxy.count("GET", "list-type", names[kind]) for kind in ("on", "off")}
    assert manifest_gets == {"on": 1, "off": WORLD}, manifest_gets
    assert listings["on"] > 0 and listings["off"] == WORLD * listings["on"], listings
    assert off >= 3.8, off  # what every rank reading every shared file costs: the test can tell the two apart

    # One rank was refused one shared file: every rank raises the same error, naming that rank and the file once.
    errors = [report["refused"] for report in reports]
    assert refused.hits >= 1
    assert all(error == errors[0] for error in errors), errors
    message = errors[0]["message"]
    assert "DistributedCheckpointError" in errors[0]["kinds"], errors[0]
    assert message.startswith(f"loading checkpoint {urls['refused']} failed on rank "), message
    assert " failed on ranks " not in message and message.count(REFUSED) == 1, message
    assert _shared_memory_files() == []  # one node: the files went through shared memory, removed after the load


def _corrupt_worker(rank: int, world_size: int, path: str) -> dict[str, Any]:
    import torch.distributed as dist

    coordinator, _, _ = _coordinator(_saved_state(rank), None, None)
    coordinator.save_checkpoint(path)
    report = {"auto_nodes": _load(rank, path, None, None)}  # two simulated nodes: auto is on
    if rank == 0:  # flip one byte of a shared shard, keeping its size
        shard = Path(path) / REFUSED
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    dist.barrier()
    loader, _, _ = _coordinator(None, True, None)
    report["corrupt"] = _error_of(lambda: loader.load_checkpoint(path))
    return report


def test_a_corrupt_shared_file_is_refused_once_on_every_rank_and_auto_is_on_across_nodes(tmp_path: Path) -> None:
    path = str(tmp_path / "step=1.ckpt")
    reports = run_distributed(_corrupt_worker, WORLD, path, node_of_rank=[0, 0, 1, 1], timeout=240)
    for rank, report in enumerate(reports):
        assert report["auto_nodes"]["read_once"] and report["auto_nodes"]["mismatch"] == [], (rank, report)
    errors = [report["corrupt"] for report in reports]
    assert all(error == errors[0] for error in errors), errors
    message = errors[0]["message"]
    assert "CorruptCheckpointError" in errors[0]["kinds"], errors[0]
    assert message.startswith(f"loading checkpoint {path} failed on rank "), message
    assert " failed on ranks " not in message, message  # read and refused by one rank only
    assert message.count(REFUSED) == 1 and "checksum" in message, message


def test_read_once_resolution_and_the_readers_are_pure_functions() -> None:
    from lightning_sharing.engine.read_once import resolve_read_once

    one_node, two_nodes = Topology.build(4), Topology.build(4, node_of_rank=[0, 0, 1, 1])
    assert resolve_read_once(None, "s3://bucket/a.ckpt", one_node)
    assert not resolve_read_once(None, "/tmp/a.ckpt", one_node)
    assert not resolve_read_once(None, "file:///tmp/a.ckpt", one_node)
    assert resolve_read_once(None, "/tmp/a.ckpt", two_nodes)
    assert resolve_read_once(True, "/tmp/a.ckpt", one_node)
    assert not resolve_read_once(False, "s3://bucket/a.ckpt", two_nodes)
    assert not resolve_read_once(True, "s3://bucket/a.ckpt", Topology.single())  # nobody to share with


def test_read_once_must_be_a_bool_or_none() -> None:
    from lightning_sharing import CheckpointOptions
    from lightning_sharing.errors import ComponentDeclarationError

    assert CheckpointOptions().read_once is None
    with pytest.raises(ComponentDeclarationError, match="read_once must be True, False or None"):
        CheckpointOptions(read_once="yes")  # type: ignore[arg-type]


class _PlannedLoad:
    """A prepared load as ``plan_shared_files`` sees it: the files each rank reads, the manifest's sizes."""

    def __init__(self, sizes: dict[str, int], per_rank: dict[int, tuple[str, ...]] | None = None) -> None:
        from types import SimpleNamespace

        self.saved = SimpleNamespace(files=[SimpleNamespace(path=p, size=s) for p, s in sizes.items()])
        self.context, self.given = None, {}
        self.entries, self.held = (), ()
        self._all, self._per_rank = tuple(sizes), per_rank or {}

    def files_read_by(self, rank: int) -> tuple[str, ...]:
        return self._per_rank.get(rank, self._all)

    def finish(self, store: Any, root: str) -> None:
        raise AssertionError("not loaded here")


def test_the_readers_split_the_shared_files_by_bytes_and_only_files_every_rank_reads_are_shared() -> None:
    from lightning_sharing.engine.read_once import SharedFile, plan_shared_files

    model = _PlannedLoad({"model-00001-of-00003.safetensors": 30, "model-00002-of-00003.safetensors": 20,
                          "model-00003-of-00003.safetensors": 10, "model.safetensors.index.json": 1})
    per_rank = _PlannedLoad({"rng/rank-00000.json": 5, "rng/rank-00001.json": 5},
                            {0: ("rng/rank-00000.json",), 1: ("rng/rank-00001.json",)})
    progress = _PlannedLoad({"progress.json": 3})
    plan = plan_shared_files([model, per_rank, progress], world_size=2)
    assert plan == {
        0: [SharedFile("model-00001-of-00003.safetensors", 30, 0),
            SharedFile("model-00002-of-00003.safetensors", 20, 1),
            SharedFile("model-00003-of-00003.safetensors", 10, 1),
            SharedFile("model.safetensors.index.json", 1, 1)],
        2: [SharedFile("progress.json", 3, 0)],
    }
    assert plan_shared_files([per_rank], world_size=2) == {}


def _full_memory_worker(rank: int, world_size: int, path: str) -> dict[str, Any]:
    from lightning_sharing.distributed import node_files

    coordinator, _, _ = _coordinator(_saved_state(rank), None, None)
    coordinator.save_checkpoint(path)
    if rank == 1:  # this rank's shared memory is full: what it reads must reach the others over the process group
        node_files.NodeFiles.put = lambda self, writer, name, data: False
    return _load(rank, path, True, None)


def test_files_shared_memory_cannot_take_are_broadcast_instead(tmp_path: Path) -> None:
    reports = run_distributed(_full_memory_worker, WORLD, str(tmp_path / "step=1.ckpt"), timeout=240)
    for rank, report in enumerate(reports):
        assert report["read_once"] and report["mismatch"] == [], (rank, report)
    assert reports[1]["fetched"] > 0  # rank 1 did read shared files, which went over the process group
    assert _shared_memory_files() == []  # the readers removed what they wrote


def _shared_memory_files() -> list[str]:
    from lightning_sharing.distributed.node_files import SHARED_MEMORY

    return sorted(p.name for p in Path(SHARED_MEMORY).glob("lightning-sharing-*"))


def test_every_entry_point_takes_read_once_into_its_options() -> None:
    from lightning_sharing import (
        CheckpointCoordinator,
        FabricSharingModelParallelStrategy,
        FabricSharingStrategy,
        SharingCheckpointIO,
        SharingModelParallelStrategy,
        SharingStrategy,
    )

    assert CheckpointCoordinator([], read_once=True).options.read_once is True
    assert SharingCheckpointIO(read_once=False).options.read_once is False
    assert SharingStrategy(read_once=True).checkpoint_io.options.read_once is True
    assert SharingModelParallelStrategy(1, 1, read_once=False).checkpoint_io.options.read_once is False
    assert FabricSharingStrategy(read_once=True)._host.options.read_once is True
    assert FabricSharingModelParallelStrategy(lambda module, mesh: module, read_once=True)._host.options.read_once
    assert SharingStrategy().checkpoint_io.options.read_once is None  # auto by default

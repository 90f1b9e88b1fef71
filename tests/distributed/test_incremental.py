"""Incremental saves on a real 2-rank gloo job (issue 24): what did not change is hard-linked, not written again.

One job, checked several ways: a frozen backbone (about 99% of the weights) with a small trainable adapter, AdamW on
the adapter and an EMA of it, all REPLICATED (the shards spread over both ranks), and a constant buffer whose version
counter moves on rank 1 only (as DDP's buffer broadcast does): the ranks must still plan the same files.

- the second and later saves write <= 5% of the first save's bytes, counted twice: from the manifests' ``origin``
  and from the files themselves (bytes of files whose inode no earlier checkpoint holds);
- a partial checkpoint (no manifest) newer than every complete one is never linked from;
- a previous file damaged in place (same size) or replaced (new inode, same size and mtime) is written afresh;
- after every older checkpoint is deleted, the newest verifies (``lightning-sharing verify``) and loads, and a run
  resumed from it is bit-exact with the run that went on;
- a fresh coordinator (no memory of earlier saves: a restart) still links the frozen shard, by checksum;
- full fine-tuning (everything trains) writes every tensor file;
- on moto's S3 server the unchanged shard is copied server-side: no byte of it is uploaded (counted by a proxy).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from support.dist_harness import run_distributed
from support.s3 import FaultProxy

from lightning_sharing import CheckpointCoordinator, OptimizerState, SharingPattern, StateComponent
from lightning_sharing.checkpoint.manifest import MANIFEST_NAME, CheckpointManifest
from lightning_sharing.cli import main
from lightning_sharing.cli.inspect import reuse_summary
from lightning_sharing.cli.verify import human_size

FROZEN = "model-frozen-00001-of-00001.safetensors"


class _Ema:
    """An exponential moving average of the adapter's weights (updated in place)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def update(self) -> None:
        with torch.no_grad():
            for name, value in self.module.state_dict().items():
                self.shadow[name].lerp_(value, 0.25)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.shadow[name].copy_(value)


class _Run:
    """Model, optimizer and EMA; ``train(step)`` is deterministic in ``step``."""

    def __init__(self, frozen: bool = True, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(16)], torch.nn.Linear(128, 8))
        trainable = self.model[16] if frozen else self.model
        if frozen:
            self.model[:16].requires_grad_(False)
        self.optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-2)
        self.ema = _Ema(self.model[16])
        self.model.register_buffer("constant", torch.arange(8.0))  # never changes, but see ``train``

    def components(self) -> list[StateComponent]:
        return [StateComponent("model", self.model, SharingPattern.REPLICATED),
                StateComponent("optimizer", OptimizerState(self.model, self.optimizer), SharingPattern.REPLICATED),
                StateComponent("ema", self.ema, SharingPattern.REPLICATED)]

    def train(self, step: int) -> None:
        data = torch.randn(4, 128, generator=torch.Generator().manual_seed(step))
        self.model(data).square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.ema.update()
        if torch.distributed.get_rank() == 1:  # as DDP's buffer broadcast: rank 1's counter moves, rank 0's not
            with torch.no_grad():
                self.model.constant.copy_(self.model.constant)

    def state(self) -> list[torch.Tensor]:
        tensors = list(self.model.state_dict().values()) + list(self.ema.shadow.values())
        for group in self.optimizer.state_dict()["state"].values():
            tensors += [v for v in group.values() if isinstance(v, torch.Tensor)]
        return [t.detach().clone() for t in tensors]


def _files(path: Path) -> dict[str, os.stat_result]:
    """Every data file of a checkpoint (the manifest, which is never reused, left out)."""
    return {p.relative_to(path).as_posix(): p.stat() for p in path.rglob("*")
            if p.is_file() and p.name != MANIFEST_NAME}


def _fresh_bytes(path: Path, earlier: list[Path]) -> int:
    """Bytes of the files of ``path`` whose inode no ``earlier`` checkpoint holds (what its save really wrote)."""
    seen = {(s.st_dev, s.st_ino) for old in earlier if old.exists() for s in _files(old).values()}
    return sum(s.st_size for s in _files(path).values() if (s.st_dev, s.st_ino) not in seen)


def _record(path: Path, earlier: list[Path]) -> dict[str, Any]:
    manifest = CheckpointManifest.load(path)
    origins = {f.path: (f.origin or {}).get("kind") for f in manifest.all_files()}
    return {"summary": reuse_summary(manifest), "fresh": _fresh_bytes(path, earlier), "origins": origins,
            "sources": {f.path: (f.origin or {}).get("from") for f in manifest.all_files()}}


def _worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    import torch.distributed as dist

    base = Path(root)
    run = _Run()
    coordinator = CheckpointCoordinator(run.components(), incremental=True)
    saved: list[Path] = []
    records: dict[str, Any] = {}

    def save(step: int, co: CheckpointCoordinator = coordinator) -> Path:
        path = base / f"step={step}.ckpt"
        co.save_checkpoint(path, step=step)
        if rank == 0:
            records[path.name] = _record(path, saved)
        saved.append(path)
        return path

    for step in (1, 2, 3):
        run.train(step)
        save(step)
    if rank == 0:  # a newer save that never completed (no manifest): never a source
        partial = base / "step=99.ckpt"
        partial.mkdir()
        shutil.copy(saved[-1] / FROZEN, partial / FROZEN)
        (partial / "model.safetensors.index.json").write_bytes((saved[-1] / "model.safetensors.index.json")
                                                               .read_bytes())
    dist.barrier()
    run.train(4)
    save(4)
    if rank == 0:  # damage step=4's frozen shard in place: same size, same inode (and so every earlier one's)
        target = saved[-1] / FROZEN
        before = target.stat()
        with open(target, "r+b") as handle:
            handle.seek(before.st_size // 2)
            byte = handle.read(1)
            handle.seek(before.st_size // 2)
            handle.write(bytes([byte[0] ^ 0xFF]))
        # A write moves the mtime; set it apart explicitly so the test does not depend on the clock's granularity.
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    dist.barrier()
    run.train(5)
    save(5)
    run.train(6)
    save(6)
    if rank == 0:  # replace step=6's frozen shard: a new inode with the same size and mtime
        target = saved[-1] / FROZEN
        before = target.stat()
        shutil.copy(target, target.with_suffix(".tmp"))
        os.replace(target.with_suffix(".tmp"), target)
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    dist.barrier()
    run.train(7)
    newest = save(7)
    kept = run.state()
    run.train(8)
    run.train(9)
    went_on = run.state()
    if rank == 0:  # retention: every older checkpoint goes
        for path in saved[:-1]:
            shutil.rmtree(path)
        shutil.rmtree(base / "step=99.ckpt")
    dist.barrier()

    resumed = _Run(seed=1)  # other initial weights: the load must bring everything back
    restarted = CheckpointCoordinator(resumed.components(), incremental=True)  # no memory of the saves above
    restarted.load_checkpoint(newest)
    loaded = resumed.state()
    restart_path = save(10, restarted)  # the same state, saved by a coordinator without memory: by checksum
    resumed.train(8)
    resumed.train(9)
    result = {"loaded": all(torch.equal(a, b) for a, b in zip(loaded, kept, strict=True)),
              "resumed": all(torch.equal(a, b) for a, b in zip(resumed.state(), went_on, strict=True))}

    full = _Run(frozen=False)  # full fine-tuning: everything changes between saves
    everything = CheckpointCoordinator(full.components(), incremental=True)
    full_dir = base / "full"
    for step in (1, 2):
        full.train(step)
        everything.save_checkpoint(full_dir / f"step={step}.ckpt", step=step)
    dist.barrier()
    if rank == 0:
        result["full"] = _record(full_dir / "step=2.ckpt", [full_dir / "step=1.ckpt"])
        result["restart"] = records.pop(restart_path.name)
    result["records"] = records
    return result


def test_incremental_saves_link_what_did_not_change(tmp_path: Path, capsys: Any) -> None:
    result = run_distributed(_worker, 2, str(tmp_path), timeout=120)[0]
    records = result["records"]
    first = records["step=1.ckpt"]["summary"]["written"]
    assert first > 1_000_000  # the frozen backbone, written once
    for name in ("step=2.ckpt", "step=3.ckpt", "step=4.ckpt", "step=6.ckpt"):
        record = records[name]
        assert record["origins"][FROZEN] == "linked", (name, record)
        assert record["summary"]["written"] <= 0.05 * first, (name, record["summary"])
        assert record["fresh"] == record["summary"]["written"], (name, record)  # the inodes agree
    assert records["step=4.ckpt"]["sources"][FROZEN] == "step=3.ckpt"  # not the partial step=99.ckpt
    # Damaged in place since step=4 (and replaced since step=6): written afresh, then linked again.
    for damaged in ("step=5.ckpt", "step=7.ckpt"):
        assert records[damaged]["origins"][FROZEN] == "written", records[damaged]
        assert records[damaged]["fresh"] >= 0.95 * first, records[damaged]
    # Everything older deleted: the newest loads bit-exact and the run resumed from it equals the run that went on.
    assert result["loaded"] and result["resumed"]
    newest = tmp_path / "step=7.ckpt"
    assert main(["verify", str(newest)]) == 0, capsys.readouterr().out
    # A coordinator without memory (a restart) links the frozen shard after comparing checksums, writes the rest.
    restart = result["restart"]
    assert restart["origins"][FROZEN] == "linked" and restart["sources"][FROZEN] == "step=7.ckpt"
    assert restart["summary"]["written"] <= 0.05 * first
    assert main(["verify", str(tmp_path / "step=10.ckpt")]) == 0
    # Full fine-tuning: every tensor file is written again.
    full = result["full"]
    assert set(full["origins"].values()) == {"written"}, full
    assert full["fresh"] == full["summary"]["written"] > 1_000_000
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "step=10.ckpt")]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    summary = restart["summary"]
    assert summary["from"] == {"step=7.ckpt": summary["reused"]}
    assert (f"bytes written {human_size(summary['written'])}, reused {human_size(summary['reused'])} "
            "(linked or copied from step=7.ckpt)") in shown, shown


def _s3_worker(rank: int, world_size: int, base: str, options: dict[str, Any]) -> list[torch.Tensor]:
    run = _Run()
    coordinator = CheckpointCoordinator(run.components(), incremental=True, storage_options=options)
    for step in (1, 2, 3):
        run.train(step)
        coordinator.save_checkpoint(f"{base}/step={step}.ckpt", step=step)
    return run.state()


def test_incremental_saves_on_s3_copy_server_side(moto_server: Any, s3: Any, s3_prefix: str,
                                                  fault_proxy: FaultProxy, capsys: Any) -> None:
    """On moto's S3 server, through a proxy counting what the clients upload: the frozen shard of the second and
    third saves is a server-side copy (a PUT with no body), and those saves upload <= 5% of the first one's bytes."""
    base = f"s3://{s3_prefix}/run"
    state = run_distributed(_s3_worker, 2, base, {"endpoint_url": fault_proxy.url}, timeout=120)[0]
    uploaded = {step: fault_proxy.bytes_received("PUT", f"step%3D{step}.ckpt/") for step in (1, 2, 3)}
    assert uploaded[1] > 1_000_000, uploaded
    for step in (2, 3):
        assert uploaded[step] <= 0.05 * uploaded[1], uploaded
        assert fault_proxy.count("PUT", f"step%3D{step}.ckpt/", FROZEN) == 1  # one CopyObject ...
        assert fault_proxy.bytes_received("PUT", f"step%3D{step}.ckpt/", FROZEN) == 0  # ... with no bytes
        manifest = CheckpointManifest.load(f"{base}/step={step}.ckpt")
        frozen = next(f for f in manifest.all_files() if f.path == FROZEN)
        assert frozen.origin == {"kind": "copied", "from": f"step={step - 1}.ckpt"}
    # Self-contained: with the older checkpoints gone, the newest verifies and loads what was saved.
    s3.rm(f"{s3_prefix}/run/step=1.ckpt", recursive=True)
    s3.rm(f"{s3_prefix}/run/step=2.ckpt", recursive=True)
    assert main(["verify", f"{base}/step=3.ckpt"]) == 0, capsys.readouterr().out
    resumed = _Run(seed=1)
    CheckpointCoordinator(resumed.components()).load_checkpoint(f"{base}/step=3.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(resumed.state(), state, strict=True))


def _sharded_run(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)], torch.nn.Linear(64, 4))
    model[:8].requires_grad_(False)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model[8].parameters(), lr=1e-2)


def _sharded_worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    import torch.distributed as dist

    def components(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[StateComponent]:
        return [StateComponent("model", model, SharingPattern.SHARDED),
                StateComponent("optimizer", OptimizerState(model, optimizer), SharingPattern.SHARDED)]

    model, optimizer = _sharded_run(0)
    coordinator = CheckpointCoordinator(components(model, optimizer), incremental=True)
    base, records = Path(root), {}
    for step in (1, 2, 3):
        model(torch.randn(4, 64, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        coordinator.save_checkpoint(base / f"step={step}.ckpt", step=step)
        if rank == 0:
            records[step] = _record(base / f"step={step}.ckpt", [base / f"step={s}.ckpt" for s in range(1, step)])
    saved = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        for step in (1, 2):
            shutil.rmtree(base / f"step={step}.ckpt")
    dist.barrier()
    other, other_optimizer = _sharded_run(1)
    CheckpointCoordinator(components(other, other_optimizer)).load_checkpoint(base / "step=3.ckpt")
    loaded = {k: v.full_tensor() for k, v in other.state_dict().items()}
    return {"records": records, "equal": all(torch.equal(saved[k], loaded[k]) for k in saved)}


def test_incremental_sharded_state_links_unchanged_chunk_files(tmp_path: Path) -> None:
    """FSDP2 (``fully_shard``) with a frozen backbone: each rank's chunks of the frozen tensors go to a chunk file of
    their own, linked by the later saves; the newest alone loads exactly."""
    results = run_distributed(_sharded_worker, 2, str(tmp_path), timeout=120)
    records = results[0]["records"]
    frozen = [f"model/chunks-frozen-{rank:05d}.safetensors" for rank in (0, 1)]
    first = records[1]["summary"]["written"]
    assert all(records[1]["origins"][f] == "written" for f in frozen), records[1]
    for step in (2, 3):
        assert all(records[step]["origins"][f] == "linked" for f in frozen), records[step]
        assert records[step]["summary"]["written"] <= 0.15 * first, records[step]["summary"]
        assert records[step]["fresh"] == records[step]["summary"]["written"]
    assert all(result["equal"] for result in results)
    assert main(["verify", str(tmp_path / "step=3.ckpt")]) == 0

"""``FabricSharingStrategy`` under real Fabric DDP processes (torchrun, gloo, CPU), plus in-process checks.

The multi-process tests share two torchrun launches of this very file (run as a script, see ``_worker``):

- ``first``: (a) a reference run trains ``STEPS`` steps uninterrupted; (b) a fresh run (same seeds) trains
  ``SAVE_AT`` steps and calls ``fabric.save``; both write each rank's final state to files.
- ``resume``: new processes ``fabric.load`` the checkpoint, train to ``STEPS``, write their final state, then try
  the other ``fabric.load`` forms (``state=None``, ``strict=False``, plain values in ``state``, strict refusals)
  and a ``fabric.save`` that fails on rank 1 only.

The strategy also carries a constructor component (``PER_GROUP`` over groups that a callable creates lazily).

The model has dropout and every rank draws its own batches, so a resume is only bit-exact if each rank's RNG
is restored; the ``MeanMetric`` accumulates rank-specific values, so it only matches if it is saved PER_RANK.
Every launch has a timeout, so a hang fails the test instead of blocking it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lightning_sharing import (
    CheckpointError,
    CheckpointManifest,
    ComponentDeclarationError,
    ReplicationMismatchError,
    SharingPattern,
    StateComponent,
)
from lightning_sharing.fabric.strategy import FabricSharingStrategy

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
STEPS, SAVE_AT, SEED = 6, 3, 1234


# ---------------------------------------------------------------------- the worker (runs under torchrun)
def _build(rank: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    from torchmetrics.aggregation import MeanMetric

    torch.manual_seed(SEED + rank)  # per-rank generators: DDP broadcasts rank 0's initial weights
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    metric = MeanMetric()
    metric.persistent(True)  # metric states are left out of state_dict() unless persistent
    return model, optimizer, metric


def _train(fabric: Any, model: nn.Module, optimizer: Any, metric: Any, start: int, stop: int) -> None:
    model.train()
    for _ in range(start, stop):
        x = torch.randn(4, 8)  # this rank's batch, from this rank's generator
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        metric.update(loss.detach() * (fabric.global_rank + 1))


class _Tag:
    """A constructor component: which rank wrote it, saved PER_GROUP over one single-rank group per rank."""

    def __init__(self) -> None:
        self.state: dict[str, int] = {}

    def state_dict(self) -> dict[str, int]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = dict(state)


class _FailsOnRank1:
    """A stateful whose ``state_dict()`` fails on rank 1 only: a rank-local failure in the middle of a save."""

    def state_dict(self) -> dict[str, int]:
        import torch.distributed as dist

        if dist.get_rank() == 1:
            raise RuntimeError("injected failure on rank 1")
        return {"ok": 1}

    def load_state_dict(self, state: dict[str, int]) -> None:
        raise AssertionError("never loaded")


def _replica_groups() -> dict[str, Any]:
    """Called by the strategy at its first save or load, on every rank, once the default group exists."""
    import torch.distributed as dist

    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]  # every rank creates every group
    return {"replica": groups[dist.get_rank()]}


def _final_state(model: Any, optimizer: Any, metric: Any) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in model.module.state_dict().items()},
        "optimizer": optimizer.optimizer.state_dict(),
        "metric": {"mean_value": metric.mean_value.clone(), "weight": metric.weight.clone()},
    }


def _worker(argv: list[str]) -> None:
    from lightning.fabric import Fabric

    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["first", "resume"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    tag = _Tag()
    strategy = FabricSharingStrategy(
        components=[StateComponent("tag", tag, SharingPattern.PER_GROUP, process_group_name="replica")],
        process_groups=_replica_groups,
    )
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    rank, ckpt, results = fabric.global_rank, args.out / "run.ckpt", {}

    def setup() -> tuple[Any, Any, Any, StateComponent]:
        model, optimizer, metric = _build(rank)
        model, optimizer = fabric.setup(model, optimizer)
        return model, optimizer, metric, StateComponent("metric", metric, SharingPattern.PER_RANK)

    if args.phase == "first":
        model, optimizer, metric, _ = setup()
        _train(fabric, model, optimizer, metric, 0, STEPS)
        torch.save(_final_state(model, optimizer, metric), args.out / f"reference-rank{rank}.pt")

        model, optimizer, metric, metric_component = setup()
        _train(fabric, model, optimizer, metric, 0, SAVE_AT)
        state = {"model": model, "optimizer": optimizer, "metric": metric_component, "step": SAVE_AT, "note": "hi"}
        tag.state = {"rank": rank, "steps": SAVE_AT}
        fabric.save(ckpt, state)
        torch.save(_final_state(model, optimizer, metric), args.out / f"saved-rank{rank}.pt")
    else:
        model, optimizer, metric, metric_component = setup()
        remainder = fabric.load(ckpt, {"model": model, "optimizer": optimizer, "metric": metric_component})
        results["remainder"], results["tag"] = remainder, tag.state
        _train(fabric, model, optimizer, metric, remainder["step"], STEPS)
        torch.save(_final_state(model, optimizer, metric), args.out / f"resumed-rank{rank}.pt")

        # The other forms of fabric.load (after the final state is written: they restore the RNG again).
        full = fabric.load(ckpt)
        results["full"] = {key: sorted(value) if isinstance(value, dict) else value for key, value in full.items()}
        plain_in_state = {"model": model, "optimizer": optimizer, "metric": metric_component, "step": -1}
        results["plain_in_state"] = [fabric.load(ckpt, plain_in_state), plain_in_state["step"]]
        results["partial"] = fabric.load(ckpt, {"model": _build(rank)[0]}, strict=False)
        results["partial_skipped"] = sorted(fabric.strategy.last_load_result.skipped)
        for name, request in [("strict_undeclared", {"model": model}),
                              ("strict_missing", {"model": model, "optimizer": optimizer, "metric": metric_component,
                                                  "epoch": 0})]:
            try:
                fabric.load(ckpt, request)
                results[name] = None
            except (CheckpointError, KeyError) as exc:  # raised on every rank alike
                results[name] = f"{type(exc).__name__}: {exc}"
        # BatchNorm running statistics differ across ranks under DDP: saved (rank 0's), but left out of the check.
        bn_model = fabric.setup_module(nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4)))
        with torch.no_grad():
            bn_model(torch.randn(4, 8))  # training mode: each rank's running stats now hold its own batch
        fabric.save(args.out / "bn.ckpt", {"bn": bn_model})
        # ... while parameters that differ across ranks are refused on every rank.
        try:
            fabric.save(args.out / "diverged.ckpt", {"net": nn.Linear(2, 2)})  # per-rank seeds: different weights
            results["diverged"] = None
        except ReplicationMismatchError as exc:
            results["diverged"] = str(exc)
        # A failure on one rank during fabric.save is an error on every rank (no hang), and nothing is committed.
        try:
            fabric.save(args.out / "failed.ckpt", {"model": model, "bad": StateComponent("bad", _FailsOnRank1(),
                                                                                         SharingPattern.PER_RANK)})
            results["failed_save"] = None
        except CheckpointError as exc:
            results["failed_save"] = str(exc)
    (args.out / f"{args.phase}-rank{rank}.json").write_text(json.dumps(results))
    fabric.barrier()
    torch.distributed.destroy_process_group()  # exiting with a live gloo group can abort the process


# ---------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(out: Path, phase: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           __file__, "--phase", phase, "--out", str(out)]
    log = out / f"{phase}.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # torchrun stops its workers
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        pytest.fail(f"torchrun ({phase}) did not finish within {TIMEOUT_S}s (hang?):\n{log.read_text()[-6000:]}")
    assert proc.returncode == 0, f"torchrun ({phase}) exited with {proc.returncode}:\n{log.read_text()[-8000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fabric")
    started = time.monotonic()
    _torchrun(out, "first")
    _torchrun(out, "resume")
    print(f"two torchrun launches took {time.monotonic() - started:.1f}s")
    return out


def _load(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def _assert_same(expected: Any, actual: Any, where: str) -> None:
    """Recursive ``torch.equal`` (tensors) / ``==`` (everything else)."""
    assert type(expected) is type(actual), f"{where}: {type(expected).__name__} != {type(actual).__name__}"
    if isinstance(expected, torch.Tensor):
        assert expected.dtype == actual.dtype and torch.equal(expected, actual), f"{where} differs"
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), f"{where}: keys {expected.keys()} != {actual.keys()}"
        for key in expected:
            _assert_same(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), f"{where}: lengths differ"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            _assert_same(e, a, f"{where}[{i}]")
    else:
        assert expected == actual, f"{where}: {expected!r} != {actual!r}"


# ---------------------------------------------------------------------- multi-process tests
def test_fabric_save_writes_the_sharing_layout(runs: Path) -> None:
    ckpt = runs / "run.ckpt"
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    # A Metric given as a component's stateful is saved as MetricState: its tensors and a JSON structure (with the
    # update count), like the RNG state.
    per_rank = [f"{key}/rank-0000{r}{suffix}" for key in ("metric", "rng") for r in (0, 1)
                for suffix in ("-00001-of-00001.safetensors", ".safetensors.index.json", ".json")]
    assert files == sorted([
        "checkpoint_manifest.json", "extra.json", "tag/replica-00000.json", "tag/replica-00001.json",
        "model-00001-of-00001.safetensors", "model.safetensors.index.json",
        "optimizer-00001-of-00001.safetensors", "optimizer.json", "optimizer.safetensors.index.json",
        *per_rank,
    ])
    manifest = CheckpointManifest.load(ckpt)
    assert manifest.step == SAVE_AT and manifest.world_size == 2
    writers = {key: (c.sharing_pattern, c.ranks, c.validation) for key, c in manifest.components.items()}
    assert writers == {
        "model": ("replicated", [0], "quick"), "optimizer": ("replicated", [0], "none"),
        "metric": ("per_rank", [0, 1], "none"), "rng": ("per_rank", [0, 1], "none"),
        "extra": ("global", [0], "none"), "tag": ("per_group", [0, 1], "none"),
    }
    assert manifest.topology["groups"] == {"replica": [[0], [1]]}
    # The weights are plain safetensors under the module's own names (no "module."/"_forward_module." prefix).
    weights = load_file(ckpt / "model-00001-of-00001.safetensors")
    expected = _load(runs / "saved-rank0.pt")["model"]
    assert sorted(weights) == ["0.bias", "0.weight", "3.bias", "3.weight"]
    _assert_same(expected, weights, "model.safetensors")
    _assert_same(expected, _load(runs / "saved-rank1.pt")["model"], "rank 1 weights")  # DDP kept them equal
    assert json.loads((ckpt / "extra.json").read_text())["tree"] == {"__dict__": [["step", SAVE_AT], ["note", "hi"]]}


def test_resume_is_bit_exact_per_rank(runs: Path) -> None:
    for rank in (0, 1):
        reference, resumed = _load(runs / f"reference-rank{rank}.pt"), _load(runs / f"resumed-rank{rank}.pt")
        _assert_same(reference["model"], resumed["model"], f"rank {rank} model")
        _assert_same(reference["optimizer"], resumed["optimizer"], f"rank {rank} optimizer")
    # The per-rank RNG mattered: the two ranks drew different random numbers.
    rng = [load_file(runs / "run.ckpt" / f"rng/rank-0000{r}-00001-of-00001.safetensors") for r in (0, 1)]
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])


def test_per_rank_metric_component_round_trips(runs: Path) -> None:
    saved = [_load(runs / f"saved-rank{r}.pt")["metric"] for r in (0, 1)]
    assert not torch.equal(saved[0]["mean_value"], saved[1]["mean_value"]), "ranks must accumulate different values"
    for rank in (0, 1):
        on_disk = load_file(runs / "run.ckpt" / f"metric/rank-0000{rank}-00001-of-00001.safetensors")
        _assert_same({f"states.{k}": v for k, v in saved[rank].items()}, on_disk, f"metric file of rank {rank}")
        reference, resumed = _load(runs / f"reference-rank{rank}.pt"), _load(runs / f"resumed-rank{rank}.pt")
        _assert_same(reference["metric"], resumed["metric"], f"rank {rank} metric")


def test_fabric_load_contract(runs: Path) -> None:
    for rank in (0, 1):
        results = json.loads((runs / f"resume-rank{rank}.json").read_text())
        # Plain values that state did not ask for come back; the rest was restored in place.
        assert results["remainder"] == {"step": SAVE_AT, "note": "hi"}
        # The strategy's own PER_GROUP component (groups from a callable) came back to the rank that wrote it.
        assert results["tag"] == {"rank": rank, "steps": SAVE_AT}
        # state=None: every component's state dict and the plain values; the strategy's "rng" is restored.
        assert results["full"] == {"model": ["0.bias", "0.weight", "3.bias", "3.weight"],
                                   "optimizer": ["param_groups", "state"], "metric": ["states", "update_count"],
                                   "step": SAVE_AT, "note": "hi"}
        # A plain value named in state is replaced there (and fabric.load copies it back), not returned.
        assert results["plain_in_state"] == [{"note": "hi"}, SAVE_AT]
        # strict=False: components that state does not name are skipped (and logged).
        assert results["partial"] == {"step": SAVE_AT, "note": "hi"}
        assert results["partial_skipped"] == ["metric", "optimizer"]
        assert "the checkpoint holds components ['metric', 'optimizer'] that are not declared here" in \
            results["strict_undeclared"]
        assert results["strict_missing"].startswith("KeyError") and "['epoch']" in results["strict_missing"]
        assert "failed on rank 1" in results["failed_save"] and "injected failure on rank 1" in results["failed_save"]
        assert "REPLICATED component 'net' differs across ranks" in results["diverged"]
    assert not (runs / "failed.ckpt").exists() and not (runs / "diverged.ckpt").exists()
    assert CheckpointManifest.load(runs / "bn.ckpt").components["bn"].validation == "quick"
    assert "1.running_mean" in load_file(runs / "bn.ckpt" / "bn-00001-of-00001.safetensors")
    assert not [p.name for p in runs.iterdir() if ".staging-" in p.name]


# ---------------------------------------------------------------------- in-process tests (no process group)
def test_storage_options_for_a_local_path_or_of_the_wrong_type_are_refused(tmp_path: Path) -> None:
    strategy = FabricSharingStrategy(storage_options={"anon": True})  # for URLs only: a local save does not use them
    assert strategy.storage_options == {"anon": True}
    with pytest.raises(ComponentDeclarationError, match=r"storage_options=\{'a': 1\} were given for the local path "):
        strategy.save_checkpoint(tmp_path / "x.ckpt", {"model": nn.Linear(2, 2)}, storage_options={"a": 1})
    assert not (tmp_path / "x.ckpt").exists()
    with pytest.raises(TypeError, match=r"storage_options must be a dict of fsspec filesystem arguments"):
        FabricSharingStrategy(storage_options="anon")


def test_registered_in_fabrics_registry() -> None:
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import STRATEGY_REGISTRY

    assert STRATEGY_REGISTRY["sharing"]["strategy"] is FabricSharingStrategy
    assert STRATEGY_REGISTRY.get("ddp").__class__.__name__ == "DDPStrategy"  # the ddp names are untouched
    fabric = Fabric(strategy="sharing", accelerator="cpu", devices=2)
    assert type(fabric.strategy) is FabricSharingStrategy


def test_declaration_errors(tmp_path: Path) -> None:
    strategy = FabricSharingStrategy()
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="the dict key and the component key must be equal"):
        strategy.save_checkpoint(tmp_path / "a.ckpt", {"net": StateComponent("model", model, "replicated")})
    with pytest.raises(ValueError, match="reserved for the RNG state"):
        strategy.save_checkpoint(tmp_path / "a.ckpt", {"rng": model})
    with pytest.raises(ValueError, match="reserved for the plain values"):
        strategy.save_checkpoint(tmp_path / "a.ckpt", {"extra": model})
    with pytest.raises(ValueError, match="reserved by the strategy"):
        FabricSharingStrategy(components=[StateComponent("rng", model, "per_rank")])
    assert not (tmp_path / "a.ckpt").exists()


def test_single_process_round_trip_filter_and_raw_files(tmp_path: Path) -> None:
    strategy = FabricSharingStrategy()
    model, other = nn.Linear(3, 2), nn.Linear(3, 2)
    strategy.save_checkpoint(tmp_path / "f.ckpt", {"model": model, "step": 1},
                             filter={"model": lambda name, _: name != "bias"})
    assert sorted(load_file(tmp_path / "f.ckpt" / "model-00001-of-00001.safetensors")) == ["weight"]
    assert strategy.load_checkpoint(tmp_path / "f.ckpt", {"model": other}, strict=False) == {"step": 1}
    assert torch.equal(other.weight, model.weight) and not torch.equal(other.bias, model.bias)
    # How values are declared: modules validated, metrics per rank, other statefuls replicated.
    from torchmetrics.aggregation import SumMetric

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy.save_checkpoint(tmp_path / "kinds.ckpt", {
        "model": model, "bn": nn.BatchNorm1d(2), "optimizer": optimizer, "metric": SumMetric(),
        "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2), "step": 3})
    manifest = CheckpointManifest.load(tmp_path / "kinds.ckpt")
    assert {key: (c.sharing_pattern, c.validation) for key, c in manifest.components.items()} == {
        "model": ("replicated", "quick"), "bn": ("replicated", "quick"), "optimizer": ("replicated", "none"),
        "metric": ("per_rank", "none"), "scheduler": ("replicated", "none"), "rng": ("per_rank", "none"),
        "extra": ("global", "none")}
    assert manifest.step == 3
    # fabric.load_raw(path, module): a single state-dict file is loaded as DDPStrategy does ...
    torch.save(model.state_dict(), tmp_path / "raw.pt")
    assert strategy.load_checkpoint(tmp_path / "raw.pt", other) == {}
    assert torch.equal(other.bias, model.bias)
    # ... but a checkpoint directory needs named objects.
    with pytest.raises(TypeError, match="lightning_sharing checkpoint directory"):
        strategy.load_checkpoint(tmp_path / "f.ckpt", other)


if __name__ == "__main__":
    _worker(sys.argv[1:])

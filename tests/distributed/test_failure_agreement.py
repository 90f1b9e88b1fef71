"""A failure on one rank becomes an error on every rank, never a hang, and never costs the last checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from support.dist_harness import WorkerFailed, run_distributed
from support.statefuls import Box, FailingState


def _model_components(rank: int, seed: int):
    from lightning_sharing import RNGState, SharingPattern, StateComponent

    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    rng_box = Box(f"rank{rank}", torch.full((2,), float(rank + seed)))
    return model, rng_box, [
        StateComponent("model", model, SharingPattern.REPLICATED, validate_replication=True),
        StateComponent("extra", rng_box, SharingPattern.PER_RANK),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
    ]


def _mid_write_worker(rank: int, world_size: int, root: str):
    import lightning_sharing.engine.copy_format as write_plan
    from lightning_sharing import CheckpointCoordinator, DistributedCheckpointError

    target = Path(root) / "last.ckpt"
    model, box, components = _model_components(rank, seed=1)
    CheckpointCoordinator(components).save_checkpoint(target, step=1)
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}

    # Train a little, then fail halfway through writing a shard on rank 1.
    with torch.no_grad():
        model.weight.add_(1.0)
    box.values += 5
    if rank == 1:
        original = write_plan.write_tensors

        class HalfFull:
            """A disk that fills up halfway through the file."""

            def __init__(self, sink, limit):
                self.sink, self.room = sink, limit

            def write(self, data):
                data = memoryview(data)
                self.sink.write(data[:self.room])
                self.room -= min(self.room, len(data))
                if self.room == 0:
                    raise OSError(28, "No space left on device (injected)")

        def half_then_fail(sink, tensors, metadata=None):
            size, _ = original(HalfFull(type("Null", (), {"write": lambda self, d: None})(), 1 << 62), tensors)
            return original(HalfFull(sink, size // 2), tensors, metadata)

        write_plan.write_tensors = half_then_fail
    started = time.monotonic()
    try:
        CheckpointCoordinator(components).save_checkpoint(target, step=2)
    except DistributedCheckpointError as exc:
        error = (str(exc), sorted(exc.failures), time.monotonic() - started)
    else:
        error = None

    # The previous checkpoint is intact and still loads, on every rank.
    fresh_model, fresh_box, fresh_components = _model_components(rank, seed=99)
    CheckpointCoordinator(fresh_components).load_checkpoint(target)
    # Rank 0 removed the staging directory before it joined the load's collectives.
    leftovers = sorted(p.name for p in Path(root).iterdir())
    same = all(torch.equal(fresh_model.state_dict()[k], v) for k, v in saved_weights.items())
    return error, leftovers, same, fresh_box.label, fresh_box.values


def test_rank_failing_mid_write_raises_everywhere_and_keeps_previous(tmp_path: Path) -> None:
    results = run_distributed(_mid_write_worker, 2, str(tmp_path), timeout=90)
    for rank, (error, leftovers, same, label, values) in enumerate(results):
        assert error is not None, f"rank {rank} did not raise"
        message, failing, _elapsed = error
        assert failing == [1]
        assert "writing checkpoint files failed on rank 1" in message
        assert "No space left on device (injected)" in message and "component 'extra'" in message
        assert leftovers == ["last.ckpt"]  # the staging directory is gone, the old checkpoint stays
        assert same
        assert label == f"rank{rank}" and torch.equal(values, torch.full((2,), float(rank + 1)))


def _state_dict_failure_worker(rank: int, world_size: int, root: str):
    from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent

    stateful = FailingState() if rank == 2 else Box()
    components = [StateComponent("flaky", stateful, SharingPattern.PER_RANK)]
    CheckpointCoordinator(components).save_checkpoint(Path(root) / "never.ckpt")


def test_state_dict_failure_on_one_rank_raises_on_all(tmp_path: Path) -> None:
    with pytest.raises(WorkerFailed) as failure:
        run_distributed(_state_dict_failure_worker, 3, str(tmp_path), timeout=90)
    assert sorted(failure.value.errors) == [0, 1, 2]
    for kind, message, _ in failure.value.errors.values():
        assert kind == "DistributedCheckpointError"
        assert "preparing the checkpoint (collecting, encoding and staging state) failed on rank 2" in message
        assert "injected state_dict failure" in message and "'flaky'" in message
    assert list(tmp_path.iterdir()) == []


def _load_failure_worker(rank: int, world_size: int, root: str):
    from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent

    box = Box("x", torch.ones(2))
    coordinator = CheckpointCoordinator([StateComponent("box", box, SharingPattern.REPLICATED)])
    coordinator.save_checkpoint(Path(root) / "a.ckpt")
    box.fail_on_load = rank == 0
    coordinator.load_checkpoint(Path(root) / "a.ckpt")


def test_load_failure_on_one_rank_raises_on_all(tmp_path: Path) -> None:
    with pytest.raises(WorkerFailed) as failure:
        run_distributed(_load_failure_worker, 2, str(tmp_path), timeout=90)
    assert sorted(failure.value.errors) == [0, 1]
    for kind, message, _ in failure.value.errors.values():
        assert kind == "DistributedCheckpointError"
        assert "failed on rank 0" in message and "injected load failure" in message


def _mismatched_declarations_worker(rank: int, world_size: int, root: str):
    from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent

    pattern = SharingPattern.PER_RANK if rank == 1 else SharingPattern.REPLICATED
    CheckpointCoordinator([StateComponent("box", Box(), pattern)]).save_checkpoint(Path(root) / "a.ckpt")


def test_ranks_declaring_different_components_all_raise(tmp_path: Path) -> None:
    with pytest.raises(WorkerFailed) as failure:
        run_distributed(_mismatched_declarations_worker, 2, str(tmp_path), timeout=90)
    assert sorted(failure.value.errors) == [0, 1]
    for kind, message, _ in failure.value.errors.values():
        assert kind == "ComponentDeclarationError"
        assert "rank 1 declared" in message and "per_rank" in message


def _different_paths_worker(rank: int, world_size: int, root: str):
    from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent

    coordinator = CheckpointCoordinator([StateComponent("box", Box(), SharingPattern.REPLICATED)])
    coordinator.save_checkpoint(Path(root) / "step=1.ckpt", step=1)
    coordinator.save_checkpoint(Path(root) / "step=2.ckpt", step=2)
    # e.g. each rank ran find_latest_checkpoint() while a save was landing and saw another listing
    coordinator.load_checkpoint(Path(root) / f"step={rank + 1}.ckpt")


def test_ranks_loading_different_checkpoints_all_raise(tmp_path: Path) -> None:
    with pytest.raises(WorkerFailed) as failure:
        run_distributed(_different_paths_worker, 2, str(tmp_path), timeout=90)
    assert sorted(failure.value.errors) == [0, 1]
    for _, message, _ in failure.value.errors.values():
        assert "ranks are loading different checkpoints" in message
        assert "step=1.ckpt" in message and "step=2.ckpt" in message


class _DiesOnRank1:
    """A stateful whose state_dict() kills rank 1's process outright (no exception, no cleanup)."""

    def state_dict(self):
        import os

        import torch.distributed as dist

        if dist.get_rank() == 1:
            os._exit(3)
        return {"x": torch.ones(2)}

    def load_state_dict(self, state) -> None:
        raise AssertionError("never loaded")


def _dying_rank_worker(rank: int, world_size: int, root: str):
    from lightning_sharing import CheckpointCoordinator, CheckpointManifest, SharingPattern, StateComponent
    from lightning_sharing.cli import verify_checkpoint

    box = Box(f"rank{rank}", torch.full((2,), float(rank)))
    CheckpointCoordinator([StateComponent("box", box, SharingPattern.PER_RANK)]).save_checkpoint(
        Path(root) / "last.ckpt", step=1)
    components = [StateComponent("box", box, SharingPattern.PER_RANK),
                  StateComponent("dies", _DiesOnRank1(), SharingPattern.PER_RANK)]
    started = time.monotonic()
    try:
        CheckpointCoordinator(components).save_checkpoint(Path(root) / "last.ckpt", step=2)
    except Exception as exc:  # the test inspects what the surviving rank saw
        # The process group is broken now: check the old checkpoint without collectives.
        _, problems = verify_checkpoint(Path(root) / "last.ckpt")
        step = CheckpointManifest.load(Path(root) / "last.ckpt").step
        return (type(exc).__name__, str(exc), time.monotonic() - started, problems, step,
                sorted(p.name for p in Path(root).iterdir()))
    return None


def test_a_rank_dying_mid_save_makes_the_others_raise_not_hang(tmp_path: Path) -> None:
    with pytest.raises(WorkerFailed) as failure:
        run_distributed(_dying_rank_worker, 2, str(tmp_path), timeout=90)
    assert failure.value.errors == {1: ("ProcessDied", "exit code 3", "")}
    kind, message, _elapsed, problems, step, entries = failure.value.results[0]
    assert kind == "DistributedCheckpointError" and "Connection" in message  # gloo reports the lost peer
    assert "another rank probably crashed" in message
    assert problems == [] and step == 1  # the previous checkpoint is intact and still the one at last.ckpt
    assert entries == ["last.ckpt"]  # rank 0 removed the staging directory of the failed save

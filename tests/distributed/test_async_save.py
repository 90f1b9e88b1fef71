"""Asynchronous saves with real gloo processes: what is written, when it is committed, how failures surface."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from support.dist_harness import run_distributed
from support.statefuls import Box

from lightning_sharing import BackgroundSaver, CheckpointManifest, ComponentDeclarationError


def _components(rank: int, seed: int):
    import torch

    from lightning_sharing import SharingPattern, StateComponent

    torch.manual_seed(seed)
    model = torch.nn.Linear(6, 4)
    box = Box(f"rank{rank}", torch.full((3,), float(rank + seed)))
    return model, box, [
        StateComponent("model", model, SharingPattern.REPLICATED, validate_replication=True),
        StateComponent("box", box, SharingPattern.PER_RANK),
    ]


def _hold_writes(write_plan) -> threading.Event:
    """Make the background writer wait until the returned event is set."""
    release = threading.Event()
    original = write_plan.write_tensors

    def held(sink, tensors, metadata=None):
        assert release.wait(30), "the test never released the background writer"
        return original(sink, tensors, metadata)

    write_plan.write_tensors = held
    return release


def _staged_copy_worker(rank: int, world_size: int, root: str):
    import torch

    import lightning_sharing.engine.copy_format as write_plan
    from lightning_sharing import CheckpointCoordinator

    target = Path(root) / "step=1.ckpt"
    model, box, components = _components(rank, seed=1)
    coordinator = CheckpointCoordinator(components, async_save=True)
    release = _hold_writes(write_plan)
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_values = box.values.clone()

    coordinator.save_checkpoint(target, step=1)  # returns with the write still held
    pending_before = (coordinator._saver.has_pending(), target.exists())
    with torch.no_grad():  # "training" goes on and changes the state in place
        model.weight.mul_(-3.0)
        box.values.add_(100.0)
    release.set()
    coordinator.wait()

    fresh_model, fresh_box, fresh = _components(rank, seed=99)
    CheckpointCoordinator(fresh).load_checkpoint(target)
    same_model = all(torch.equal(fresh_model.state_dict()[k], v) for k, v in saved_weights.items())
    return pending_before, same_model, torch.equal(fresh_box.values, saved_values), fresh_box.label


def test_async_save_writes_the_state_as_it_was_when_the_save_started(tmp_path: Path) -> None:
    results = run_distributed(_staged_copy_worker, 2, str(tmp_path), timeout=90)
    for rank, (pending_before, same_model, same_box, label) in enumerate(results):
        assert pending_before == (True, False), "save_checkpoint must return before the checkpoint is committed"
        assert same_model and same_box, f"rank {rank} loaded state changed after the save started"
        assert label == f"rank{rank}"
    assert CheckpointManifest.load(tmp_path / "step=1.ckpt").step == 1


def _failure_worker(rank: int, world_size: int, root: str, fault: str):
    import time

    import torch

    from lightning_sharing import CheckpointCoordinator, DistributedCheckpointError

    model, _box, components = _components(rank, seed=1)
    coordinator = CheckpointCoordinator(components, async_save=True)
    coordinator.save_checkpoint(Path(root) / "step=1.ckpt", step=1)
    coordinator.wait()
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    with torch.no_grad():
        model.weight.add_(1.0)
    os.environ["LIGHTNING_SHARING_FAULTS"] = fault
    coordinator.save_checkpoint(Path(root) / "step=2.ckpt", step=2)  # fails later, in the background
    raised_at, message = None, ""
    for step in range(500):  # the training loop: one poll per step boundary
        time.sleep(0.01)
        try:
            coordinator._saver.poll()
        except DistributedCheckpointError as exc:
            raised_at, message = step, str(exc)
            break
    pending_after = coordinator._saver.has_pending()
    os.environ.pop("LIGHTNING_SHARING_FAULTS")

    # The previous checkpoint is intact, and saving works again.
    fresh_model, _, fresh = _components(rank, seed=99)
    CheckpointCoordinator(fresh).load_checkpoint(Path(root) / "step=1.ckpt")
    intact = all(torch.equal(fresh_model.state_dict()[k], v) for k, v in saved.items())
    coordinator.save_checkpoint(Path(root) / "step=3.ckpt", step=3)
    coordinator.wait()
    return raised_at, message, pending_after, intact


@pytest.mark.parametrize("point", ["save:write", "save:sync"])  # a write, or the deferred fsync of a written file
def test_background_failure_raises_on_every_rank_at_the_same_step(tmp_path: Path, point: str) -> None:
    results = run_distributed(_failure_worker, 2, str(tmp_path), f"{point}@1:eio", timeout=90)
    steps = {raised_at for raised_at, *_ in results}
    assert len(steps) == 1 and None not in steps, f"ranks raised at different steps: {results}"
    for _step, message, pending_after, intact in results:
        assert "writing checkpoint files failed on rank 1" in message
        assert f"Input/output error (injected at {point} on rank 1)" in message
        if point == "save:sync":
            assert " durable (fsync) failed: [Errno 5] " in message
        assert not pending_after and intact
    assert not (tmp_path / "step=2.ckpt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=1.ckpt", "step=3.ckpt"]  # staging cleaned


def _back_to_back_worker(rank: int, world_size: int, root: str):
    import torch

    from lightning_sharing import CheckpointCoordinator

    model, box, components = _components(rank, seed=1)
    saver = BackgroundSaver()
    coordinator = CheckpointCoordinator(components, async_save=saver)
    target = Path(root) / "last.ckpt"
    coordinator.save_checkpoint(target, step=1)
    with torch.no_grad():
        model.weight.add_(1.0)
    box.values.add_(1.0)
    # The second save waits for the first (max_pending=1: one staged copy at most), then replaces it.
    coordinator.save_checkpoint(target, step=2)
    in_flight = len(saver.pending_targets)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.zero_()
    coordinator.load_checkpoint(target)  # waits for the pending save, then reads it
    same = all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    return CheckpointManifest.load(target).step, in_flight, same, saver.has_pending()


def test_next_save_and_load_wait_for_the_pending_save(tmp_path: Path) -> None:
    results = run_distributed(_back_to_back_worker, 2, str(tmp_path), timeout=90)
    for step, in_flight, same, pending in results:
        assert in_flight == 1  # the first save had finished before the second was staged
        assert step == 2 and same and not pending
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_background_saver_rejects_a_bad_bound() -> None:
    with pytest.raises(ComponentDeclarationError, match="max_pending must be a positive integer"):
        BackgroundSaver(0)


def _background_staging_worker(rank: int, world_size: int, root: str):
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from lightning_sharing import CheckpointCoordinator, CheckpointError, SharingPattern, StateComponent

    def build(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.randn(5, 6)).sum().backward()
        optimizer.step()  # the moments exist
        box = Box(f"rank{rank}", torch.full((3,), float(rank + seed)))
        return model, optimizer, box, [StateComponent("model", model, SharingPattern.REPLICATED),
                                       StateComponent("optimizer", optimizer, SharingPattern.REPLICATED),
                                       StateComponent("box", box, SharingPattern.PER_RANK)]

    def snapshot(model, optimizer, box):
        return ({k: v.clone() for k, v in model.state_dict().items()},
                {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(optimizer.state.values())},
                box.values.clone())

    def same(a, b) -> bool:
        return (all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[0].keys() == b[0].keys()
                and all(torch.equal(a[1][i][k], b[1][i][k]) for i in a[1] for k in a[1][i]) and torch.equal(a[2], b[2]))

    model, optimizer, box, components = build(seed=1)
    saver = BackgroundSaver(background_staging=True)
    coordinator = CheckpointCoordinator(components, async_save=saver)
    release, copied = threading.Event(), threading.Event()
    copy = saver._copy_deferred

    def held_copy(copies):
        assert release.wait(30), "the test never released the background copy"
        copy(copies)
        copied.set()

    saver._copy_deferred = held_copy
    # Global step pre-hooks run in the order registered, then the optimizer's own: this one (registered before the
    # saver's, at its first save) sees the step begin and only then releases the copy; the optimizer's own hook
    # sees whether the saver's hook held the step until the copy was made. No timing involved.
    at_step_start: list[bool] = []
    seen_at_step: list[bool] = []

    def release_at_first_step(*_: object) -> None:
        if armed and not at_step_start:
            at_step_start.append(copied.is_set())
            release.set()

    armed = False
    releaser = register_optimizer_step_pre_hook(release_at_first_step)
    optimizer.register_step_pre_hook(lambda *_: seen_at_step.append(copied.is_set()))

    # 1. The save returns before the parameters and moments are copied; buffers and user tensors are copied.
    expected = snapshot(model, optimizer, box)
    coordinator.save_checkpoint(Path(root) / "step=1.ckpt", step=1)
    returned_before_copy = not copied.is_set()
    model.train()
    model(torch.randn(5, 6)).sum().backward()  # the forward changes BatchNorm's running stats in place
    box.values.add_(100.0)
    armed = True
    optimizer.step()  # releases the copy (the hook above), then waits for it (the saver's hook)
    armed = False
    coordinator.wait()
    fresh = build(seed=99)
    CheckpointCoordinator(fresh[3]).load_checkpoint(Path(root) / "step=1.ckpt")
    first = (returned_before_copy, at_step_start == [False], seen_at_step == [True],
             same(snapshot(*fresh[:3]), expected))

    # 2. A parameter changed in place outside optimizer.step() before it is copied (on rank 0, the writer of the
    #    REPLICATED model) fails the save on every rank; the checkpoint before it is intact, the next save works.
    release.clear()
    coordinator.save_checkpoint(Path(root) / "step=2.ckpt", step=2)
    if rank == 0:
        with torch.no_grad():
            model[0].weight.mul_(2.0)
    release.set()
    try:
        coordinator.wait()
        message = None
    except CheckpointError as exc:
        message = str(exc)
    fresh = build(seed=99)
    CheckpointCoordinator(fresh[3]).load_checkpoint(Path(root) / "step=1.ckpt")
    intact = same(snapshot(*fresh[:3]), expected)
    if rank == 0:  # the replicas agree again (exactly: a power of two)
        with torch.no_grad():
            model[0].weight.mul_(0.5)
    after = snapshot(model, optimizer, box)
    coordinator.save_checkpoint(Path(root) / "step=3.ckpt", step=3)
    coordinator.wait()
    fresh = build(seed=99)
    CheckpointCoordinator(fresh[3]).load_checkpoint(Path(root) / "step=3.ckpt")
    saver.close()
    releaser.remove()
    return first, message, intact, same(snapshot(*fresh[:3]), after)


def test_background_staging_returns_before_the_copy_and_the_next_optimizer_step_waits(tmp_path: Path) -> None:
    results = run_distributed(_background_staging_worker, 2, str(tmp_path), timeout=90)
    for rank, (first, message, intact, third_saved) in enumerate(results):
        returned_before_copy, step_began_before_copy, step_ran_after_copy, first_saved = first
        assert returned_before_copy and step_began_before_copy and step_ran_after_copy, f"rank {rank}: {first}"
        assert first_saved, f"rank {rank}: step=1 does not hold the state as it was when the save started"
        assert message is not None and "staging the state in the background failed on rank 0" in message
        assert ("1 tensor(s) were changed in place after save_checkpoint returned and before the background "
                "staging copied them (first: '0.weight')") in message
        assert intact and third_saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=1.ckpt", "step=3.ckpt"]


def test_background_staging_must_be_a_bool() -> None:
    from lightning_sharing import CheckpointOptions

    with pytest.raises(ComponentDeclarationError, match="background_staging must be True or False, got 'yes'"):
        BackgroundSaver(background_staging="yes")  # type: ignore[arg-type]
    with pytest.raises(ComponentDeclarationError, match="background_staging must be True or False, got 1"):
        CheckpointOptions(background_staging=1)  # type: ignore[arg-type]

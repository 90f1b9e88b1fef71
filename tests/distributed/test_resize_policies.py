"""on_resize: rank-specific state saved on 2 ranks, loaded on 3 (and 1), as each component's policy says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.dist_harness import WorkerFailed, run_distributed

from lightning_sharing import StateComponent
from lightning_sharing.errors import ComponentDeclarationError


class Notes:
    """A plain stateful: a list of what this rank saw."""

    def __init__(self, items: list[int]) -> None:
        self.items = items

    def state_dict(self) -> dict:
        return {"items": torch.tensor(self.items, dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        self.items = state["items"].tolist()


def _merge_notes(states: list[dict]) -> dict:
    return {"items": torch.cat([state["items"] for state in states])}


def _components(rank: int, policies: dict[str, object]):
    import torchmetrics

    from lightning_sharing import RNGState, SharingPattern, StateComponent

    total = torchmetrics.SumMetric(sync_on_compute=False)
    seen = Notes([])
    cache = Notes([])
    components = [
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK, on_resize=policies.get("rng", "error")),
        StateComponent("total", total, SharingPattern.PER_RANK, on_resize=policies.get("total", "error")),
        StateComponent("seen", seen, SharingPattern.PER_RANK, on_resize=policies.get("seen", "error")),
        StateComponent("cache", cache, SharingPattern.PER_RANK, on_resize=policies.get("cache", "error")),
    ]
    return components, total, seen, cache


def _worker(rank: int, world_size: int, root: str, phase: str):
    from lightning_sharing import CheckpointCoordinator

    path = Path(root) / "resize.ckpt"
    policies = {"rng": "reseed", "total": "merge", "seen": _merge_notes, "cache": "drop"}
    if phase == "save":
        components, total, seen, cache = _components(rank, {})
        total.update(torch.tensor(float(10 * (rank + 1))))
        total.update(torch.tensor(1.0))
        seen.items, cache.items = [rank, rank + 100], [rank]
        CheckpointCoordinator(components).save_checkpoint(path)
        return None
    if phase == "refuse":
        components, *_ = _components(rank, {**policies, "cache": "error"})
        CheckpointCoordinator(components).load_checkpoint(path)
    components, total, seen, cache = _components(rank, policies)
    result = CheckpointCoordinator(components).load_checkpoint(path)
    first_draw = torch.rand(4)
    again, *_ = _components(rank, policies)
    CheckpointCoordinator(again).load_checkpoint(path)
    return (sorted(result.loaded), result.resized, float(total.compute()), int(total._update_count), seen.items,
            cache.items, first_draw, torch.rand(4))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resize")
    run_distributed(_worker, 2, str(root), "save")
    return root


def test_policies_when_loading_on_more_and_fewer_ranks(saved: Path) -> None:
    for world in (3, 1):
        results = run_distributed(_worker, world, str(saved), "load")
        draws = []
        for rank, (loaded, resized, total, count, seen, cache, first, second) in enumerate(results):
            assert loaded == ["cache", "rng", "seen", "total"]
            assert resized["cache"] == ("it was saved at world_size=2; this run has world_size="
                                        f"{world}; on_resize='drop': it starts fresh")
            assert "on_resize='reseed'" in resized["rng"] and "on_resize='merge'" in resized["total"]
            if rank == 0:  # every rank's saved state merged, once: 10 + 1 from rank 0, 20 + 1 from rank 1
                assert (total, count, sorted(seen)) == (32.0, 4, [0, 1, 100, 101])
            else:  # the other ranks start empty
                assert (total, count, seen) == (0.0, 0, [])
            assert cache == []  # dropped: the fresh value
            assert torch.equal(first, second)  # reseeded deterministically: the same draw after the same load
            draws.append(first)
        assert len({tuple(d.tolist()) for d in draws}) == world  # and differently on every rank


def test_error_stays_the_default_and_names_both_sizes(saved: Path) -> None:
    with pytest.raises(WorkerFailed) as failure:
        run_distributed(_worker, 3, str(saved), "refuse")
    assert sorted(failure.value.errors) == [0, 1, 2]
    for kind, message, _ in failure.value.errors.values():
        assert kind == "DistributedTopologyMismatchError"
        assert "'cache' is PER_RANK" in message and "world_size=2" in message and "world_size=3" in message
        assert "on_resize=" in message


def test_policies_are_checked_when_declared() -> None:
    with pytest.raises(ComponentDeclarationError, match="only applies to rank-specific state"):
        StateComponent("weights", Notes([]), "replicated", on_resize="drop")
    with pytest.raises(ComponentDeclarationError, match=r"needs a stateful with merge_state\(\)"):
        StateComponent("notes", Notes([]), "per_rank", on_resize="merge")
    with pytest.raises(ComponentDeclarationError, match=r"needs a stateful with reseed\(\)"):
        StateComponent("notes", Notes([]), "per_rank", on_resize="reseed")
    with pytest.raises(ComponentDeclarationError, match="on_resize='shuffle' is not one of"):
        StateComponent("notes", Notes([]), "per_rank", on_resize="shuffle")
    assert StateComponent("notes", Notes([]), "per_node", on_resize=_merge_notes).resize_policy.value == "merge"

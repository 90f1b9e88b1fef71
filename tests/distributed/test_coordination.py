"""O(N) coordination, counted: the collectives of a save and a load, and the bytes they deliver to a rank.

Real gloo process groups; ``support.collective_spy`` wraps ``torch.distributed`` in each worker (it only counts and
calls through). A repeat save is two synchronisation steps: the agreement (one all-reduce) and the commit (a gather
to rank 0 and rank 0's verdict broadcast); a load is two all-reduces. What a rank other than 0 receives per save or
load is the same at 2, 4 and 8 ranks. Counts are exact: they are the design (no timing is asserted).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.dist_harness import run_distributed
from support.statefuls import Box, Holder

WORLDS = (2, 4, 8)
# The calls the package makes, by operation (every world size).
FIRST_SAVE = {"all_reduce": 3, "gather": 2, "broadcast": 2}  # topology (3), the agreement, the reports' size, commit
REPEAT_SAVE = {"all_reduce": 1, "gather": 1, "broadcast": 1}  # the agreement; the commit: reports in, verdict out
LOAD = {"all_reduce": 2}  # the plan's agreement (declarations, checkpoint identity), the load's agreement
ASYNC_REPEAT = {"all_reduce": 2, "gather": 1, "broadcast": 1}  # + the write root's agreement on the saver's thread


def _components(rank: int):
    from lightning_sharing import RNGState, SharingPattern, StateComponent

    torch.manual_seed(0)
    model = Holder({f"layer{i}.weight": torch.randn(4, 4) for i in range(8)})
    optimizer = Holder({"step": 3, "moments": {f"m{i}": torch.zeros(4) for i in range(4)}})
    return [StateComponent("model", model, SharingPattern.REPLICATED, validate_replication=True),
            StateComponent("optimizer", optimizer, SharingPattern.REPLICATED),
            StateComponent("extra", Box(f"rank{rank}", torch.full((2,), float(rank))), SharingPattern.PER_RANK),
            StateComponent("rng", RNGState(), SharingPattern.PER_RANK)]


def _counting_worker(rank: int, world_size: int, root: str):
    from support.collective_spy import install

    from lightning_sharing import BackgroundSaver, CheckpointCoordinator

    spy = install()
    coordinator = CheckpointCoordinator(_components(rank))
    seen = {}
    for name, work in [("first save", lambda: coordinator.save_checkpoint(Path(root) / "a.ckpt", step=1)),
                       ("repeat save", lambda: coordinator.save_checkpoint(Path(root) / "b.ckpt", step=2)),
                       ("load", lambda: coordinator.load_checkpoint(Path(root) / "b.ckpt"))]:
        spy.reset()
        work()
        seen[name] = spy.snapshot()
        seen[name]["plans"] = coordinator.plan_stats
    saver = BackgroundSaver()
    background = CheckpointCoordinator(_components(rank), async_save=saver)
    background.save_checkpoint(Path(root) / "c.ckpt", step=3)
    background.wait()
    spy.reset()
    background.save_checkpoint(Path(root) / "d.ckpt", step=4)
    background.wait()
    seen["async repeat save"] = spy.snapshot()
    saver.close()
    return seen


@pytest.fixture(scope="module")
def counted(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    return {world: run_distributed(_counting_worker, world, str(tmp_path_factory.mktemp(f"count{world}")),
                                   timeout=240) for world in WORLDS}


@pytest.mark.parametrize("world", WORLDS)
def test_a_repeat_save_is_two_synchronisation_steps_and_a_load_two_all_reduces(counted, world: int) -> None:
    for rank, seen in enumerate(counted[world]):
        assert seen["first save"]["calls"] == FIRST_SAVE, (rank, seen["first save"])
        assert seen["repeat save"]["calls"] == REPEAT_SAVE, (rank, seen["repeat save"])
        assert seen["load"]["calls"] == LOAD, (rank, seen["load"])
        assert seen["async repeat save"]["calls"] == ASYNC_REPEAT, (rank, seen["async repeat save"])
        # No object collective in a success path: nothing that hands every rank every rank's data.
        for operation in seen.values():
            assert not {"all_gather", "all_gather_object", "broadcast_object_list"} & set(operation["wire"])
        assert seen["first save"]["plans"]["reused"] == 0 and seen["first save"]["plans"]["planned"] > 0
        assert seen["repeat save"]["plans"] == {"planned": 0, "reused": seen["first save"]["plans"]["planned"]}


def test_what_a_rank_other_than_0_receives_does_not_grow_with_the_world_size(counted) -> None:
    for operation in ("repeat save", "load", "async repeat save"):
        received = {world: {seen[operation]["received"] for seen in counted[world][1:]} for world in WORLDS}
        assert all(len(sizes) == 1 for sizes in received.values()), (operation, received)
        assert len({sizes.pop() for sizes in received.values()}) == 1, (operation, received)
    # Rank 0 receives every rank's report: it grows with the world size, linearly.
    zero = [counted[world][0]["repeat save"]["received"] for world in WORLDS]
    assert zero[0] < zero[1] < zero[2]
    # Only the first save grows elsewhere: the topology (O(N), once per coordinator) is part of the global plan.
    first = [counted[world][1]["first save"]["received"] for world in WORLDS]
    assert first == sorted(first)


def _replanning_worker(rank: int, world_size: int, root: str):
    from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent
    from lightning_sharing.engine.plan_cache import PlanCache

    box = Box(f"rank{rank}", torch.full((3,), float(rank)))
    counter = Holder({"step": 0, "w": torch.ones(2)})
    cache = PlanCache()

    def coordinator(pattern=SharingPattern.PER_RANK, **options):
        return CheckpointCoordinator([StateComponent("box", box, pattern),
                                      StateComponent("counter", counter, SharingPattern.REPLICATED)],
                                     plan_cache=cache, **options)

    same = coordinator()
    stats, loaded = {}, {}

    def save(name: str, coord=same) -> None:
        counter.state["step"] += 1
        counter.state["w"] = counter.state["w"] + 1
        coord.save_checkpoint(Path(root) / f"{name}.ckpt", step=counter.state["step"])
        stats[name] = coord.plan_stats
        fresh_box, fresh_counter = Box(), Holder()
        CheckpointCoordinator([StateComponent("box", fresh_box, coord.components[0].sharing_pattern),
                               StateComponent("counter", fresh_counter, SharingPattern.REPLICATED)]
                              ).load_checkpoint(Path(root) / f"{name}.ckpt")
        loaded[name] = (fresh_box.values.clone(), dict(fresh_counter.state))

    save("first")
    save("same")  # new values and a new step, the same layout: reused, and what was written is the new state
    box.values = torch.zeros(5)
    save("shape")
    box.values = box.values.double()
    save("dtype")
    save("declaration", coordinator(SharingPattern.GLOBAL))  # a coordinator made per save, sharing the cache
    save("option", coordinator(max_shard_size=1 << 20))
    save("again", coordinator(max_shard_size=1 << 20))
    return stats, {name: (values.tolist(), str(values.dtype), state["step"], state["w"].tolist())
                   for name, (values, state) in loaded.items()}


def test_a_changed_shape_dtype_declaration_or_option_plans_again(tmp_path: Path) -> None:
    for rank, (stats, loaded) in enumerate(run_distributed(_replanning_worker, 2, str(tmp_path), timeout=180)):
        box_copy = 1  # each rank writes its PER_RANK copy of the box (rank 0 alone once it is GLOBAL)
        assert stats["first"] == {"planned": box_copy + 1, "reused": 0}  # + its share of the REPLICATED counter
        assert stats["same"] == {"planned": 0, "reused": 2}
        assert stats["shape"] == {"planned": 1, "reused": 1}
        assert stats["dtype"] == {"planned": 1, "reused": 1}
        assert stats["declaration"] == ({"planned": 1, "reused": 1} if rank == 0 else {"planned": 0, "reused": 1})
        assert stats["option"] == {"planned": 2, "reused": 0}  # both copies again (rank 1's box is PER_RANK again)
        assert stats["again"] == {"planned": 0, "reused": 2}
        steps = [state for _, _, state, _ in loaded.values()]
        assert steps == list(range(1, len(loaded) + 1))  # every save wrote its own step and weights
        assert [w for _, _, _, w in loaded.values()] == [[float(s + 1)] * 2 for s in steps]
        box_rank = 0 if rank else rank  # a GLOBAL box is rank 0's
        assert loaded["same"][:2] == ([float(rank)] * 3, "torch.float32")
        assert loaded["shape"][:2] == ([0.0] * 5, "torch.float32")
        assert loaded["dtype"][:2] == ([0.0] * 5, "torch.float64")
        assert loaded["declaration"][:2] == ([0.0] * 5, "torch.float64") and box_rank == 0


def _resizing_worker(rank: int, world_size: int, root: str):
    import torch.distributed as dist

    from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent

    box = Box(f"rank{rank}", torch.full((3,), float(rank)))
    coordinator = CheckpointCoordinator([StateComponent("box", box, SharingPattern.PER_RANK)])
    coordinator.save_checkpoint(Path(root) / "four.ckpt")
    coordinator.save_checkpoint(Path(root) / "four-again.ckpt")
    reused = coordinator.plan_stats
    dist.destroy_process_group()
    if rank >= 2:
        return reused, None, None
    # The same coordinator in a job of two ranks: a new topology, so a new plan.
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)
    coordinator.save_checkpoint(Path(root) / "two.ckpt")
    return reused, coordinator.plan_stats, coordinator.topology.world_size


def test_a_changed_world_size_plans_again(tmp_path: Path) -> None:
    results = run_distributed(_resizing_worker, 4, str(tmp_path), timeout=180)
    for rank, (reused, replanned, world) in enumerate(results):
        assert reused == {"planned": 0, "reused": 1}
        if rank < 2:
            assert replanned == {"planned": 1, "reused": 0} and world == 2
    # The two-rank checkpoint holds exactly the two ranks' copies (no file planned for the old world's ranks).
    assert sorted(p.name for p in (tmp_path / "two.ckpt" / "box").iterdir()) == sorted(
        name for r in (0, 1) for name in (f"rank-{r:05d}-00001-of-00001.safetensors", f"rank-{r:05d}.json",
                                          f"rank-{r:05d}.safetensors.index.json"))

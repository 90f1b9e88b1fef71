"""``LocalTier``: the settings validate themselves, with messages that say what to pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_sharing import CheckpointCoordinator, ComponentDeclarationError, LocalTier


def test_defaults_and_node_placeholder(tmp_path: Path) -> None:
    tier = LocalTier(tmp_path / "{node}" / "ckpt")
    assert (tier.replicas, tier.keep, tier.every_n_steps) == (1, 2, None)
    assert tier.directory_for(1) == str(tmp_path / "1" / "ckpt")
    assert LocalTier("/local/ckpt").directory_for(5) == "/local/ckpt"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"directory": ""}, "directory must be a non-empty path on node-local storage"),
    ({"directory": 3}, "directory must be a non-empty path"),
    ({"directory": "s3://bucket/run"}, "the local tier lives on node-local storage, not a URL"),
    ({"directory": "/local/{rank}"}, "the only placeholder a directory may hold is {node}"),
    ({"replicas": -1}, "LocalTier(replicas=-1): replicas must be an integer >= 0"),
    ({"replicas": True}, "replicas must be an integer >= 0"),
    ({"keep": 0}, "LocalTier(keep=0): keep must be a positive integer"),
    ({"every_n_steps": 0}, "LocalTier(every_n_steps=0): every_n_steps must be a positive integer"),
    ({"every_n_steps": 2.5}, "every_n_steps must be a positive integer"),
])
def test_bad_settings_are_refused_with_what_to_pass(kwargs: dict, message: str) -> None:
    settings = {"directory": "/local/ckpt/{node}", **kwargs}
    with pytest.raises(ComponentDeclarationError) as error:
        LocalTier(**settings)
    assert message in str(error.value)


def test_save_local_needs_a_tier_and_restore_without_one_finds_nothing(tmp_path: Path) -> None:
    from support.statefuls import Box

    from lightning_sharing import SharingPattern, StateComponent

    coordinator = CheckpointCoordinator([StateComponent("box", Box("a"), SharingPattern.GLOBAL)])
    with pytest.raises(ComponentDeclarationError, match=r"save_local needs a local tier"):
        coordinator.save_local(3)
    assert coordinator.restore(tmp_path / "none") is None
    with pytest.raises(ComponentDeclarationError, match=r"local_tier must be a LocalTier"):
        CheckpointCoordinator([], local_tier="/local")


def test_one_process_round_trip(tmp_path: Path) -> None:
    import torch
    from support.statefuls import Box

    from lightning_sharing import SharingPattern, StateComponent

    box, mine = Box("a", torch.arange(3.0)), Box("r", torch.ones(2))
    components = [StateComponent("box", box, SharingPattern.GLOBAL), StateComponent("mine", mine,
                                                                                     SharingPattern.PER_RANK)]
    coordinator = CheckpointCoordinator(components, local_tier=LocalTier(tmp_path / "local" / "{node}"))
    coordinator.save_checkpoint(tmp_path / "ckpts" / "step=1.ckpt", step=1)
    coordinator.save_local(2)
    box.values, mine.values = torch.zeros(3), torch.zeros(2)
    assert coordinator.restore(tmp_path / "ckpts") == 2
    assert torch.equal(box.values, torch.arange(3.0)) and torch.equal(mine.values, torch.ones(2))
    assert sorted(p.name for p in (tmp_path / "local" / "0" / "own" / "step_2").iterdir()) == [
        "COMPLETE.json", "node.safetensors", "rank-00000.safetensors", "rank-00000.safetensors.sum"]

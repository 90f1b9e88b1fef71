"""``FabricSharingStrategy(local_tier=...)`` in one process: ``save_local`` every N steps, ``restore`` the newest."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_sharing import LocalTier
from lightning_sharing.fabric.strategy import FabricSharingStrategy


@pytest.mark.parametrize("async_save", [False, True])
def test_save_local_when_due_and_restore_the_newest_tier(tmp_path: Path, async_save: bool) -> None:
    strategy = FabricSharingStrategy(local_tier=LocalTier(tmp_path / "local" / "{node}", every_n_steps=2),
                                     async_save=async_save)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)

    def train() -> None:
        optimizer.zero_grad()
        model(torch.ones(4, 3)).sum().backward()
        optimizer.step()

    train()
    strategy.save_checkpoint(tmp_path / "ckpts" / "step=1.ckpt", {"model": model, "optimizer": optimizer, "step": 1})
    train()
    assert strategy.save_local({"model": model, "optimizer": optimizer, "step": 2}, 2) is True
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    # With async_save the write runs on the strategy's background saver; training changes the state meanwhile and
    # the staged copy is what is saved (restore waits for it).
    assert strategy._host.saver is None if not async_save else strategy._host.saver.has_pending()
    train()
    assert strategy.save_local({"model": model, "optimizer": optimizer, "step": 3}, 3) is False  # not due
    assert not (tmp_path / "local" / "0" / "own" / "step_3").exists()
    train()
    state = {"model": model, "optimizer": optimizer, "step": 0}
    assert strategy.restore(tmp_path / "ckpts", state) == 2  # local 2 is newer than persistent 1
    assert state["step"] == 2
    for name, value in saved[0].items():
        assert torch.equal(model.state_dict()[name], value)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved[1]["state"][0]["exp_avg"])
    # A newer persistent checkpoint wins.
    strategy.save_checkpoint(tmp_path / "ckpts" / "step=5.ckpt", {"model": model, "optimizer": optimizer, "step": 5})
    state = {"model": model, "optimizer": optimizer, "step": 0}
    assert strategy.restore(tmp_path / "ckpts", state) == 5 and state["step"] == 5


def test_every_strategy_takes_a_local_tier_and_refuses_anything_else(tmp_path: Path) -> None:
    import pytest

    from lightning_sharing import (
        ComponentDeclarationError,
        FabricSharingModelParallelStrategy,
        SharingModelParallelStrategy,
        SharingStrategy,
    )

    tier = LocalTier(tmp_path / "{node}", every_n_steps=5)
    made = [SharingStrategy(local_tier=tier), SharingModelParallelStrategy(local_tier=tier),
            FabricSharingStrategy(local_tier=tier),
            FabricSharingModelParallelStrategy(parallelize_fn=lambda module, mesh: module, local_tier=tier)]
    assert [strategy.local_tier for strategy in made] == [tier] * 4
    for make in (SharingStrategy, FabricSharingStrategy):
        with pytest.raises(ComponentDeclarationError, match="local_tier must be a LocalTier, got str"):
            make(local_tier=str(tmp_path))
    with pytest.raises(ComponentDeclarationError, match=r"save_local needs FabricSharingStrategy\(local_tier="):
        FabricSharingStrategy().save_local({}, 1)

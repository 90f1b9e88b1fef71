"""A torchmetrics Metric declared as a stateful saves its accumulators; a stateful that saves nothing is named."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torchmetrics

from lightning_sharing import CheckpointCoordinator, MetricState, SharingPattern, StateComponent


def test_a_plain_metric_declared_directly_saves_its_accumulators(tmp_path: Path) -> None:
    metric = torchmetrics.MeanMetric()  # not persistent: its own state_dict() is empty
    assert metric.state_dict() == {}
    for value in (1.0, 2.0, 4.5):
        metric.update(torch.tensor(value))
    component = StateComponent("ppl_metric", metric, SharingPattern.PER_RANK)
    assert isinstance(component.stateful, MetricState) and component.stateful.metric is metric
    CheckpointCoordinator([component]).save_checkpoint(tmp_path / "m.ckpt")

    fresh = torchmetrics.MeanMetric()
    CheckpointCoordinator([StateComponent("ppl_metric", fresh, "per_rank")]).load_checkpoint(tmp_path / "m.ckpt")
    assert torch.equal(fresh.mean_value, metric.mean_value) and torch.equal(fresh.weight, metric.weight)
    assert fresh.update_count == 3 and torch.equal(fresh.compute(), metric.compute())


class _Empty:
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_a_stateful_that_saves_nothing_is_named_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    coordinator = CheckpointCoordinator([StateComponent("cache", _Empty(), "global")])
    with caplog.at_level(logging.WARNING, logger="lightning_sharing"):
        coordinator.save_checkpoint(tmp_path / "a.ckpt")
        coordinator.save_checkpoint(tmp_path / "b.ckpt")
    warnings = [r.getMessage() for r in caplog.records if "nothing of it is saved" in r.getMessage()]
    assert warnings == ["component 'cache': _Empty.state_dict() returned {}, so nothing of it is saved; return its "
                        "state from state_dict() (a torchmetrics Metric: declare it directly or as "
                        "MetricState(metric))"]

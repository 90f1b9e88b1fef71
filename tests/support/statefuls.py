"""Small stateful objects shared by the multi-process tests."""

from __future__ import annotations

from typing import Any

import torch


class Box:
    """A stateful holding a tensor and a label, so a test can tell whose state it got back."""

    def __init__(self, label: str = "", values: torch.Tensor | None = None) -> None:
        self.label = label
        self.values = values if values is not None else torch.zeros(3)
        self.fail_on_load = False

    def state_dict(self) -> dict[str, Any]:
        return {"label": self.label, "values": self.values.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.fail_on_load:
            raise RuntimeError("injected load failure")
        self.label = state["label"]
        self.values = state["values"]


class FailingState:
    """A stateful whose ``state_dict()`` raises: a rank-local failure during save."""

    def state_dict(self) -> dict[str, Any]:
        raise RuntimeError("injected state_dict failure")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise AssertionError("never loaded")

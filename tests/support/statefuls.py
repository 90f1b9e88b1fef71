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


class Holder:
    """A stateful that holds a state dict as it is."""

    def __init__(self, state: Any = None) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


class ValueState:
    """A minimal stateful: ``{"value": value}``."""

    def __init__(self, value: Any = 0) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]

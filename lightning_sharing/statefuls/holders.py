"""``ValueHolder``: a stateful around a plain value (what adapters use for state that is not an object).

Example:
    >>> holder = ValueHolder({"epoch": 3})
    >>> holder.load_state_dict({"epoch": 4}); holder.value, holder.loaded
    ({'epoch': 4}, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ValueHolder"]


class ValueHolder:
    """A stateful that saves a given value and keeps what it is loaded with.

    ``exempt`` names entries left out of the replication check (see ``replicated_view``); ``source_module`` is the
    module ``value`` is the state dict of, where there is one (what the save describes when it wraps a
    ``transformers`` model, see ``engine.hf_model``).
    """

    def __init__(self, value: Any = None, exempt: frozenset[str] = frozenset(), source_module: Any = None) -> None:
        self.value = value
        self.loaded = False
        self.exempt = exempt
        self.source_module = source_module

    def replicated_view(self, state: Any) -> Any:
        if not self.exempt or not isinstance(state, Mapping):
            return state
        return {k: v for k, v in state.items() if k not in self.exempt}

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, state: Any) -> None:
        self.value = state
        self.loaded = True

"""``OptimizerState``: an optimizer's state keyed by parameter name (FQN), not by parameter index.

``torch.optim.Optimizer.state_dict()`` numbers parameters 0, 1, 2... in the order they were given, so a
checkpoint only loads into an optimizer built the same way, and two pipeline stages both have a
"parameter 0". Keyed by FQN (``layers.0.weight``, with DDP's ``module.`` and FSDP/compile wrappers
taken off, as ``torch.distributed.checkpoint.state_dict`` does), the state loads into any optimizer over
a model with those names: plain, DDP, FSDP2 or tensor parallel. Under FSDP2 / tensor parallelism the
per-parameter tensors (``exp_avg``, ...) are DTensors laid out like their parameters, so a SHARDED
component holding this state reshards like the model.

The state is one flat mapping, one entry per parameter and value (``state.layers.0.weight.exp_avg``,
``param_groups.layers.0.weight.lr``): the entries of two pipeline stages never share a name, so their
saved states join into the state of an unsplit model, and a stage takes exactly its own entries.

``state_dict()`` on an optimizer that has not taken a step yet first creates its state (one step with
zero gradients and a learning rate of 0, which leaves the parameters unchanged), so that a loader can
read saved tensors straight into it; ``load_state_dict`` then restores every value, param groups
(learning rates, betas, ...) included.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> state = OptimizerState(model, torch.optim.AdamW(model.parameters()))
    >>> sorted(k for k in state.state_dict() if k.startswith("state.weight."))
    ['state.weight.exp_avg', 'state.weight.exp_avg_sq', 'state.weight.step']
    >>> state.state_dict()["param_groups.weight.lr"]
    0.001
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lightning_sharing.errors import CheckpointError
from lightning_sharing.sharded.redistribute import shard_like, shard_state_like
from lightning_sharing.statefuls.modules import has_dtensors

__all__ = ["OptimizerState", "is_fqn_state", "is_torch_form"]


class OptimizerState:
    """A stateful for ``StateComponent``: ``optimizer``'s state keyed by the FQNs of ``model``'s parameters.

    Declare it SHARDED for FSDP2 / tensor-parallel models and for the stages of a pipeline (with the
    stage's data-parallel group as ``process_group_name``), REPLICATED (or SHARDED) under DDP.
    ``state_dict()`` returns ``{"state.<fqn>.exp_avg": tensor, ..., "param_groups.<fqn>.lr": 0.01, ...}``
    holding the optimizer's own tensors (not copies).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state keyed by FQN; creates the state of an optimizer that has not stepped yet."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(flatten_optimizer_state_dict=True))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict`` (as returned by ``state_dict()``, possibly from another layout or world size).

        Also takes torch's own form (parameters numbered, as ``optimizer.state_dict()`` and Lightning's DDP
        checkpoints hold it), matched to names by position in this optimizer's param groups; whole tensors for
        DTensor parameters (a DDP checkpoint loaded under FSDP2) keep this rank's piece.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if is_torch_form(state_dict):
            set_optimizer_state_dict(self.model, self.optimizer, self._by_name(state_dict))
            return
        if has_dtensors(self.model):
            state_dict = shard_state_like(state_dict, self.state_dict())
        set_optimizer_state_dict(self.model, self.optimizer, state_dict,
                                 options=StateDictOptions(flatten_optimizer_state_dict=True))

    def _by_name(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        """torch's numbered form keyed by this model's names (``set_optimizer_state_dict``'s unflattened form)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        live = get_optimizer_state_dict(self.model, self.optimizer)
        saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
        live_sizes = [len(group["params"]) for group in live["param_groups"]]
        if saved_sizes != live_sizes:
            raise CheckpointError(
                f"the checkpoint's optimizer has param groups of {saved_sizes} parameters, this one {live_sizes}; "
                "build the optimizer over the same parameters, in the same order, as when it was saved")
        state, groups = {}, []
        for saved_group, live_group in zip(saved["param_groups"], live["param_groups"], strict=True):
            for index, name in zip(saved_group["params"], live_group["params"], strict=True):
                values = saved["state"].get(index, saved["state"].get(str(index), {}))
                like = live["state"].get(name, {})
                state[name] = {key: shard_like(f"{name}.{key}", value, like.get(key))
                               for key, value in values.items()}
            groups.append({**{k: v for k, v in saved_group.items() if k != "params"},
                           "params": list(live_group["params"])})
        return {"state": state, "param_groups": groups}


def is_torch_form(state: Any) -> bool:
    """Whether ``state`` is ``torch.optim.Optimizer.state_dict()``'s form (parameters numbered).

    Example:
        >>> is_torch_form({"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]})
        True
    """
    return isinstance(state, Mapping) and set(state) == {"state", "param_groups"}


def is_fqn_state(state: Any) -> bool:
    """Whether ``state`` is an ``OptimizerState.state_dict()`` (keyed by name) rather than torch's own form.

    Example:
        >>> is_fqn_state({"state.weight.step": 1.0, "param_groups.weight.lr": 0.1}), is_fqn_state({"state": {}})
        (True, False)
    """
    return isinstance(state, dict) and bool(state) and all(
        isinstance(key, str) and key.startswith(("state.", "param_groups.")) for key in state)

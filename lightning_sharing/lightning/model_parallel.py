"""``SharingModelParallelStrategy``: Lightning's ModelParallelStrategy (FSDP2 x tensor parallel) with our checkpoints.

``configure_model`` parallelizes the module on ``self.device_mesh`` as with ``ModelParallelStrategy``; checkpoints
are lightning_sharing directories with these defaults (``configure_state_components()`` re-declares any of them):

=============== ============================================================= ==========================================
key             holds                                                         default
=============== ============================================================= ==========================================
``model``       the module's state dict (DTensors)                            SHARDED: each chunk once, loads at any
                                                                              mesh, world size or into one process
``optimizer``   each optimizer's state keyed by parameter name (OptimizerState) SHARDED
``scheduler``   ``lr_schedulers``                                             GLOBAL
``dataloader``  the train loader's position                                   PER_GROUP over the tensor-parallel group
                                                                              (its ranks consume the same batches)
``rng``         each process's RNGs                                           PER_RANK
``trainer``     loops, callbacks, hyper-parameters                            GLOBAL
=============== ============================================================= ==========================================

The mesh's dimensions are the named groups (``"data_parallel"``, ``"tensor_parallel"``), joined by those of
``process_groups=`` / ``configure_process_groups()``. Everything else (``ModelCheckpoint``, ``ckpt_path="last"``,
``async_save``, preemption, fallback, ``storage_options``) is as for ``SharingStrategy``.

Example:
    >>> from lightning_sharing import SharingModelParallelStrategy
    >>> strategy = SharingModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)
    >>> trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=4)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn

from lightning_sharing.core.declarations import SharingPattern, StateComponent
from lightning_sharing.integration.common import register_strategy, with_mesh_groups
from lightning_sharing.integration.compat import trainer_of
from lightning_sharing.lightning.base import SharingStrategyBase
from lightning_sharing.lightning.builtins import BuiltinState
from lightning_sharing.statefuls.modules import ShardedModuleState
from lightning_sharing.statefuls.optimizer import OptimizerState

__all__ = ["SharingModelParallelStrategy"]

log = logging.getLogger(__name__)


class _OptimizersState:
    """Every optimizer's ``OptimizerState`` (keyed by parameter name), as one list."""

    def __init__(self, model: Any, optimizers: list[Any]) -> None:
        self.states = [OptimizerState(model, getattr(o, "_optimizer", o)) for o in optimizers]

    def state_dict(self) -> list[dict[str, Any]]:
        return [state.state_dict() for state in self.states]

    def load_state_dict(self, saved: list[dict[str, Any]]) -> None:
        if not isinstance(saved, list) or len(saved) != len(self.states):
            count = len(saved) if isinstance(saved, list) else type(saved).__name__
            raise ValueError(f"the checkpoint holds the state of {count} optimizer(s), this run has "
                             f"{len(self.states)}; configure_optimizers() must return as many as when it was saved")
        for state, value in zip(self.states, saved, strict=True):
            state.load_state_dict(value)


class SharingModelParallelStrategy(SharingStrategyBase, ModelParallelStrategy):
    """``ModelParallelStrategy`` whose checkpoints are lightning_sharing directories (see the module docstring).

    Args:
        data_parallel_size, tensor_parallel_size: the device mesh, as for ``ModelParallelStrategy``.
        process_groups, validation_level, max_shard_size, verify, strict, fallback, async_save, max_pending_saves,
            background_staging, read_once, incremental, preemption_checkpoint, storage_options: as for
            ``SharingStrategy``.
        **kwargs: the other arguments of ``ModelParallelStrategy`` (``process_group_backend``, ``timeout``).

    Example:
        >>> strategy = SharingModelParallelStrategy(2, 2, async_save=True)
        >>> trainer = pl.Trainer(strategy=strategy, devices=4)  # doctest: +SKIP
    """

    strategy_name = "sharing_model_parallel"

    def __init__(self, data_parallel_size: Literal["auto"] | int = "auto",
                 tensor_parallel_size: Literal["auto"] | int = "auto", **kwargs: Any) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)

    # ------------------------------------------------------------------ the differences, as data
    def builtin_defaults(self) -> dict[str, StateComponent]:
        tensor_parallel = self.device_mesh.mesh_dim_names[-1]
        return {"model": StateComponent("model", BuiltinState(), SharingPattern.SHARDED),
                "optimizer": StateComponent("optimizer", BuiltinState(), SharingPattern.SHARDED),
                "scheduler": StateComponent("scheduler", BuiltinState(), SharingPattern.GLOBAL),
                "dataloader": StateComponent("dataloader", BuiltinState(), SharingPattern.PER_GROUP,
                                             process_group_name=tensor_parallel)}

    def live_statefuls(self, overrides: dict[str, StateComponent]) -> tuple[dict[str, Any], set[str],
                                                                             dict[str, StateComponent]]:
        strict = bool(getattr(self.lightning_module, "strict_loading", True))
        live: dict[str, Any] = {"model": ShardedModuleState(self.model, strict)}
        skip: set[str] = set()
        trainer = trainer_of(self.lightning_module)
        if trainer is not None and trainer.state.fn != TrainerFn.FITTING:
            # validate/test/predict restore the model (and callbacks) only: the training state is not read, so a
            # checkpoint of another layout evaluates without strict=False.
            skip |= {"optimizer", "dataloader", "rng"}
        elif self.optimizers:
            live["optimizer"] = _OptimizersState(self.model, self.optimizers)
        else:
            skip.add("optimizer")
        return live, skip, overrides

    def unreplicated_entries(self) -> frozenset[str]:
        return frozenset()  # SHARDED state is not validated across ranks

    def _resolve_process_groups(self) -> Any:
        return with_mesh_groups(self.device_mesh, super()._resolve_process_groups())

    # ------------------------------------------------------------------ Lightning's state, in our form
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's sharded state dict (DTensors, where they are: no copy to the CPU)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimizer's state keyed by parameter name (``OptimizerState``), DTensors like their parameters."""
        return OptimizerState(self.model, getattr(optimizer, "_optimizer", optimizer)).state_dict()

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        # The model itself was loaded in place by load_checkpoint; what remains here are per-rank metric states.
        states = checkpoint.get("state_dict")
        if isinstance(states, Mapping) and states:
            self.lightning_module.load_state_dict(dict(states), strict=False)


register_strategy(StrategyRegistry, "sharing_model_parallel", SharingModelParallelStrategy,
                  "ModelParallelStrategy (FSDP2 x tensor parallel) with lightning_sharing checkpoints")

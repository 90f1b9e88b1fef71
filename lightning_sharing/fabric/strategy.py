"""``FabricSharingStrategy``: Lightning Fabric's DDP strategy, checkpointing through ``CheckpointCoordinator``.

``fabric.save(path, state)`` and ``fabric.load(path, state)`` keep their usual signatures, but the checkpoint is a
``lightning_sharing`` directory: every rank takes part, each piece of state is written by the ranks its sharing
pattern names (per-rank RNG and metric state included), the commit is atomic, and a failure on any rank is an
error on every rank instead of a hang.

How the values of Fabric's ``state`` dict are declared:

=====================================================  ============================================================
value                                                  component
=====================================================  ============================================================
``StateComponent``                                     used as declared (its ``key`` must equal the dict key)
``nn.Module`` (also Fabric-wrapped, DDP, compiled)     ``REPLICATED``; its parameters are validated across ranks
                                                       at ``QUICK``, its buffers are not (BatchNorm running
                                                       statistics follow each rank's batches; rank 0's copy, the
                                                       one DDP broadcasts at the next forward, is saved); saved as
                                                       the unwrapped module's state dict (no ``module.`` prefixes);
                                                       ``SHARDED`` when its parameters are DTensors (FSDP2, tensor
                                                       parallel: ``FabricSharingModelParallelStrategy``)
``torchmetrics`` ``Metric``                            ``PER_RANK`` through ``MetricState``: this rank's raw
                                                       accumulators and update count (``persistent`` or not)
``torchmetrics`` ``MetricCollection``                  ``PER_RANK``, its own ``state_dict()`` (call
                                                       ``persistent(True)`` on it, or declare a ``MetricState`` per
                                                       metric)
``Optimizer`` (also Fabric-wrapped)                    ``REPLICATED``; over DTensors ``SHARDED``, as the
                                                       ``OptimizerState`` of the module in ``state`` holding them
``DataLoader`` with ``state_dict()`` (torchdata's      ``PER_RANK``: each rank reads its own shard of the data
``StatefulDataLoader``)
any other object with ``state_dict()`` and             ``REPLICATED``
``load_state_dict()`` (a scheduler, ...)
anything else (ints, floats, strings, tensors, and     all collected into one ``GLOBAL`` component ``"extra"`` (a
lists, tuples and dicts of them)                       dict keyed by the state keys), written by rank 0
=====================================================  ============================================================

The strategy adds its own components to every save and load: those passed as ``components=`` and, unless
``rng=False``, ``RNGState()`` as the ``PER_RANK`` component ``"rng"``. The keys ``"extra"`` and (with ``rng=True``)
``"rng"`` are therefore reserved for stateful values. Plain values are taken from rank 0: declare a ``PER_RANK``
``StateComponent`` for values that differ between ranks.

Example (under ``torchrun``, or with Fabric's own launcher and ``devices=2``):
    >>> from lightning.fabric import Fabric
    >>> from lightning_sharing import FabricSharingStrategy
    >>> fabric = Fabric(accelerator="cpu", devices=2, strategy=FabricSharingStrategy())    # doctest: +SKIP
    >>> fabric.launch()                                                                    # doctest: +SKIP
    >>> model, optimizer = fabric.setup(model, optimizer)                                  # doctest: +SKIP
    >>> fabric.save("ckpt/step=100.ckpt", {"model": model, "optimizer": optimizer, "step": 100})  # doctest: +SKIP
    >>> fabric.load("ckpt/step=100.ckpt", {"model": model, "optimizer": optimizer})        # doctest: +SKIP
    {'step': 100}

Importing this module also registers the strategy in Fabric's strategy registry as ``"sharing"``, so
``Fabric(strategy="sharing")`` works (with the default arguments).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.fabric.accelerators.accelerator import Accelerator
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.plugins.environments.cluster_environment import ClusterEnvironment
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.precision import Precision
from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy

from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.local_tier import LocalTier
from lightning_sharing.core.options import DEFAULT_MAX_SHARD_SIZE, checkpoint_options
from lightning_sharing.fabric.base import RNG_KEY, FabricSharingBase
from lightning_sharing.fabric.state import EXTRA_KEY
from lightning_sharing.integration.common import register_strategy

if TYPE_CHECKING:  # Fabric's registry type, for annotations only (private in Fabric)
    from lightning.fabric.strategies.registry import _StrategyRegistry

__all__ = ["EXTRA_KEY", "REGISTRY_NAME", "RNG_KEY", "FabricSharingStrategy"]

log = logging.getLogger(__name__)

#: The name under which the strategy is registered in Fabric's strategy registry.
REGISTRY_NAME = "sharing"


class FabricSharingStrategy(FabricSharingBase, DDPStrategy):
    """Fabric's ``DDPStrategy`` whose ``fabric.save`` and ``fabric.load`` use ``lightning_sharing`` checkpoints.

    Args:
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision, process_group_backend,
            timeout, start_method, **kwargs: as for ``lightning.fabric.strategies.DDPStrategy`` (``kwargs`` go to
            ``DistributedDataParallel``). ``checkpoint_io`` is only used to read single-file checkpoints (see
            ``load_checkpoint``).
        components: extra ``StateComponent``s added to every save and load (e.g. a ``PER_NODE`` cache).
        process_groups: named groups for ``PER_GROUP`` components: ``{name: ProcessGroup}`` holding the group
            *this rank* belongs to, a ``DeviceMesh`` with dimension names, or a callable returning either. A
            callable is called once, on every rank, at the first save or load (the default process group exists
            by then); it may create groups with ``dist.new_group``.
        rng: save each rank's Python, NumPy, torch and CUDA generators as the ``PER_RANK`` component ``"rng"``
            and restore them on load when the checkpoint has them.
        max_shard_size: the largest safetensors shard in bytes.
        verify: ``"checksum"`` (default) or ``"size"``: how files are checked before they are read.
        async_save, max_pending_saves: as for ``CheckpointCoordinator``/``SharingStrategy``: ``fabric.save``
            returns once the state is copied; the next save, ``fabric.load``, ``wait_for_checkpoint()`` and
            teardown wait for it and raise its failure on every rank.
        background_staging: with ``async_save``, the weights and optimizer state are copied in the background too;
            the next ``optimizer.step()`` waits for the copy (as for ``SharingStrategy``).
        read_once: ``fabric.load`` fetches each file every rank reads once, on one rank, and broadcasts it
            (``None``, the default: on for object-store URLs and multi-node jobs; as for ``SharingStrategy``).
        incremental: unchanged files are linked or copied server-side, not written again (as for ``SharingStrategy``).
        storage_options: fsspec filesystem arguments for checkpoint URLs (``s3://...``: ``endpoint_url``, ``key``,
            ``secret``, ...), used for every save and load of a URL (a ``storage_options`` given to one
            ``save_checkpoint`` replaces them for it). Local paths do not use them. Default: fsspec's own
            configuration (for S3: the environment).
        local_tier: a ``LocalTier``: ``fabric.strategy.save_local(state, step)`` saves into node-local storage (every
            ``every_n_steps``-th step), copied to peer nodes, and ``fabric.strategy.restore(directory, state)`` loads
            the newest of it and the persistent checkpoints under ``directory`` (docs/local_tier.md).

    Example:
        >>> from lightning.fabric import Fabric
        >>> from lightning_sharing import FabricSharingStrategy, SharingPattern, StateComponent
        >>> strategy = FabricSharingStrategy(process_group_backend="gloo")
        >>> fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)  # doctest: +SKIP
        >>> fabric.launch()                                                   # doctest: +SKIP
        >>> metric = StateComponent("metric", mean_metric, SharingPattern.PER_RANK)  # doctest: +SKIP
        >>> fabric.save("run/step=10.ckpt", {"model": model, "optimizer": opt, "metric": metric, "step": 10})
        ... # doctest: +SKIP
    """

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        *,
        components: list[StateComponent] | None = None,
        process_groups: Any = None,
        rng: bool = True,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        verify: str = "checksum",
        async_save: bool = False,
        max_pending_saves: int = 1,
        background_staging: bool = False,
        read_once: bool | None = None,
        incremental: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        local_tier: LocalTier | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            options=checkpoint_options(max_shard_size=max_shard_size, verify=verify, async_save=async_save,
                                       max_pending_saves=max_pending_saves, background_staging=background_staging,
                                       read_once=read_once, incremental=incremental),
            components=components,
            process_groups=process_groups,
            rng=rng,
            storage_options=storage_options,
            local_tier=local_tier,
            **kwargs,
        )
    # ------------------------------------------------------------------ registry
    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """Register this strategy as ``"sharing"`` (not the ``ddp*`` names, which stay Fabric's ``DDPStrategy``)."""
        register_strategy(strategy_registry, REGISTRY_NAME, cls, "DDP with lightning_sharing checkpoints "
                          "(sharing patterns, per-rank RNG, atomic, verified)")


FabricSharingStrategy.register_strategies(STRATEGY_REGISTRY)

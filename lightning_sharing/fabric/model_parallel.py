"""``FabricSharingModelParallelStrategy``: Fabric's ModelParallelStrategy (FSDP2 x tensor parallel), our checkpoints.

``fabric.setup(model)`` applies ``parallelize_fn(model, device_mesh)`` as Fabric's ``ModelParallelStrategy`` does;
``fabric.save(path, state)`` / ``fabric.load(path, state)`` go through the coordinator as with
``FabricSharingStrategy``. A module whose parameters are DTensors is SHARDED (each rank writes the chunks it holds;
it loads at any mesh or world size), an optimizer over them SHARDED too (``OptimizerState``: keyed by parameter name,
so the module must be in the same ``state``), the RNG PER_RANK, plain values GLOBAL. The mesh's dimensions
(``"data_parallel"``, ``"tensor_parallel"``) are named groups for PER_GROUP components, with ``process_groups=``.

Example:
    >>> strategy = FabricSharingModelParallelStrategy(parallelize, data_parallel_size=2, tensor_parallel_size=1)
    >>> fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)                    # doctest: +SKIP
    >>> model = fabric.setup(model); optimizer = fabric.setup_optimizers(optimizer)        # doctest: +SKIP
    >>> fabric.save("ckpt/step=10.ckpt", {"model": model, "optimizer": optimizer, "step": 10})  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from lightning.fabric.strategies import ModelParallelStrategy

from lightning_sharing.core.options import DEFAULT_MAX_SHARD_SIZE, checkpoint_options
from lightning_sharing.fabric.base import FabricSharingBase
from lightning_sharing.integration.common import with_mesh_groups

__all__ = ["FabricSharingModelParallelStrategy"]


class FabricSharingModelParallelStrategy(FabricSharingBase, ModelParallelStrategy):
    """Fabric's ``ModelParallelStrategy`` whose ``fabric.save``/``fabric.load`` write lightning_sharing checkpoints.

    Args:
        parallelize_fn, data_parallel_size, tensor_parallel_size: as for Fabric's ``ModelParallelStrategy``.
        components, process_groups, rng, max_shard_size, verify, async_save, max_pending_saves, background_staging,
            read_once, incremental, storage_options: as for ``FabricSharingStrategy``.
        **kwargs: ``process_group_backend``, ``timeout`` of ``ModelParallelStrategy``.
    """

    def __init__(self, parallelize_fn: Callable[[Any, Any], Any], data_parallel_size: Literal["auto"] | int = "auto",
                 tensor_parallel_size: Literal["auto"] | int = "auto", *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                 verify: str = "checksum", async_save: bool = False, max_pending_saves: int = 1,
                 background_staging: bool = False, read_once: bool | None = None, incremental: bool = False,
                 **kwargs: Any) -> None:
        options = checkpoint_options(max_shard_size=max_shard_size, verify=verify, async_save=async_save,
                                     max_pending_saves=max_pending_saves, background_staging=background_staging,
                                     read_once=read_once, incremental=incremental)
        super().__init__(parallelize_fn=parallelize_fn, data_parallel_size=data_parallel_size,
                         tensor_parallel_size=tensor_parallel_size, options=options, **kwargs)

    def _process_groups(self) -> Any:
        return with_mesh_groups(self.device_mesh, super()._process_groups())

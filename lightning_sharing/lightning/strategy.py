"""``SharingStrategy``: Lightning's DDP strategy with lightning_sharing checkpoints.

``pl.Trainer(strategy=SharingStrategy())`` (or ``strategy="sharing"`` once ``lightning_sharing`` is
imported) and nothing else changes: ``ModelCheckpoint``, ``trainer.save_checkpoint`` and
``trainer.fit(ckpt_path=...)`` write and read directory checkpoints in which every piece of state is
saved from the right ranks (see ``lightning_layout`` for the built-in components). Modules and
datamodules add or re-declare components in ``configure_state_components()`` and name process groups
in ``configure_process_groups()``. What it shares with ``SharingModelParallelStrategy`` lives in
``lightning/base.py`` and ``lightning/restore.py``.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_sharing import SharingStrategy
    >>> trainer = pl.Trainer(strategy=SharingStrategy(), accelerator="cpu", devices=2)  # doctest: +SKIP
    >>> trainer.fit(model, ckpt_path="last")                                            # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from lightning_sharing.errors import ComponentDeclarationError
from lightning_sharing.integration.common import register_strategy
from lightning_sharing.lightning.base import SharingStrategyBase
from lightning_sharing.statefuls.optimizer import OptimizerState, is_fqn_state

__all__ = ["MODEL_PARALLEL_HINT", "SharingStrategy"]

log = logging.getLogger(__name__)

#: The pointer every refusal of a sharded (DTensor) model under DDP gives.
MODEL_PARALLEL_HINT = ("use strategy=SharingModelParallelStrategy(data_parallel_size=..., tensor_parallel_size=...) "
                       "(or strategy=\"sharing_model_parallel\") and parallelize the model in configure_model() on "
                       "self.device_mesh")


class SharingStrategy(SharingStrategyBase, DDPStrategy):
    """DDP whose checkpoints are lightning_sharing directories, saved and restored on every rank.

    Args:
        process_groups: named groups for PER_GROUP components: a dict of this rank's
            ``ProcessGroup`` per name, a ``DeviceMesh``, or a callable returning either (called once,
            on every rank, after the default process group exists). Defaults to the module's or
            datamodule's ``configure_process_groups()``.
        validation_level: replication check of the model weights at each save (default QUICK).
        max_shard_size: the largest safetensors shard, in bytes.
        verify: ``"checksum"`` (default) or ``"size"``: how files are checked on load.
        fallback: when the checkpoint to resume from is corrupt or incomplete, resume from the newest
            other complete checkpoint in the same directory instead of failing (logged as an error).
            Off by default: a damaged checkpoint is an error unless you opt in.
        async_save: save in the background. ``trainer.save_checkpoint`` (and ``ModelCheckpoint``) return
            once the state is copied; files are written and committed while training continues. A failed
            background save raises on every rank at the next step boundary; the next save, a load, the
            end of ``fit`` and teardown wait for a pending save; checkpoints that retention removes are
            removed only after the newer save has committed.
        max_pending_saves: with ``async_save``, how many saves may be in flight at once; each holds one
            copy of the state this rank writes (default 1: staging memory is at most one copy).
        background_staging: with ``async_save``, the weights and optimizer state are copied in the background
            too: the save returns before they are copied and the next optimizer step waits for the copy (the
            forward and backward passes run beside it). A weight changed in place outside ``optimizer.step()``
            before it is copied fails that save on every rank. Off by default.
        read_once: on resume, each file every rank reads (the model's and optimizer's REPLICATED state, GLOBAL
            state) is fetched from storage by one rank and broadcast to the others. ``None`` (default, auto): on
            for object-store URLs and multi-node jobs, off for one node on a local disk.
        incremental: a save hard-links (local) or copies server-side (object store) the files whose content equals
            the newest complete checkpoint's in the same directory instead of writing them again; every checkpoint
            stays self-contained (docs/storage.md). Off by default.
        strict: the loading rules on resume (see docs/patterns.md). ``False`` skips what cannot be
            loaded (undeclared or missing components, rank-specific state saved under another
            topology), logging each skip, instead of refusing the checkpoint.
        preemption_checkpoint: on SIGTERM every rank stops after the same step and this final checkpoint is
            written (exit status 0): ``True`` (default) beside the ModelCheckpoint's checkpoints, where
            ``ckpt_path="last"`` finds it when ``save_last`` is set (Lightning's ``hpc_ckpt_{n}.ckpt`` under
            ``SLURMEnvironment(auto_requeue=True)``); a ``.ckpt`` path (``{step}``/``{epoch}`` filled in) or a
            directory; ``False``: stop without it. See ``lightning_sharing.lightning.preemption``.
        elastic_data: the sampler Lightning inserts for training (``use_distributed_sampler=True``) is an
            ``ElasticSampler`` (the same order as its ``DistributedSampler``) whose position every checkpoint
            records as GLOBAL state, so a resume at another world size continues the epoch where it stopped: every
            sample once, the batch counters fitted to the new size, RNG reseeded, in-module metrics merged onto
            rank 0 (docs/patterns.md, "Resuming at another world size"). ``False`` keeps Lightning's sampler.
        storage_options: fsspec filesystem arguments for checkpoint URLs (``ModelCheckpoint(dirpath="s3://...")``:
            ``endpoint_url``, ``key``, ``secret``, ``client_kwargs``, ...), used for every save, load, removal,
            ``ckpt_path="last"`` and fallback on a URL, and by ``ModelCheckpoint`` itself to list its directory.
            ``trainer.save_checkpoint(path, storage_options=...)`` replaces them for that save. Local paths do not
            use them. Default: fsspec's own configuration (for S3: the environment, ``AWS_ENDPOINT_URL``, ...).
        **kwargs: everything ``DDPStrategy`` accepts.

    Example:
        >>> trainer = pl.Trainer(strategy=SharingStrategy(validation_level="tensor"), devices=2)  # doctest: +SKIP
    """

    strategy_name = "sharing"

    def setup(self, trainer: Any) -> None:
        # configure_model has run: refuse a sharded module before DDP fails deep inside its wrapper.
        sharded = _dtensor_parameters(self.model)
        if sharded:
            raise ComponentDeclarationError(
                f"SharingStrategy is DDP and cannot train a module whose parameters are DTensors (FSDP2 fully_shard "
                f"or tensor parallelism, e.g. {sharded[:3]}): {MODEL_PARALLEL_HINT}"
            )
        super().setup(trainer)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Lightning's optimizer restore, also from a model-parallel checkpoint (optimizer state keyed by name)."""
        states = checkpoint.get("optimizer_states")
        if isinstance(states, list) and states and all(is_fqn_state(state) for state in states):
            if len(states) != len(self.optimizers):
                raise ComponentDeclarationError(
                    f"the checkpoint holds the state of {len(states)} optimizer(s), this run has "
                    f"{len(self.optimizers)}; configure_optimizers() must return as many as when it was saved")
            for optimizer, state in zip(self.optimizers, states, strict=True):
                OptimizerState(self.model, getattr(optimizer, "_optimizer", optimizer)).load_state_dict(state)
            return
        super().load_optimizer_state_dict(checkpoint)


def _dtensor_parameters(model: Any) -> list[str]:
    from torch.distributed.tensor import DTensor

    if model is None:
        return []
    return [name for name, parameter in model.named_parameters() if isinstance(parameter, DTensor)]


register_strategy(StrategyRegistry, "sharing", SharingStrategy,
                  "DDP with lightning_sharing checkpoints (explicit sharing patterns)")

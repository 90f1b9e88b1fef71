"""The local tier under the Trainer: a local save every N training steps, and ``ckpt_path="last"`` across both tiers.

``SharingStrategy(local_tier=LocalTier("/local/ckpt/{node}", every_n_steps=50))`` (and
``SharingModelParallelStrategy``) adds ``LocalTierSaves`` to the Trainer's callbacks: after every N-th training
step, Lightning's checkpoint dict (the one ``ModelCheckpoint`` would save at that point) is split into the built-in
components, as for a persistent save, and saved with the coordinator's ``save_local``; with the strategy's
``async_save=True``, on its background saver (staged, then written behind training, as persistent async saves are).
A failed local save (a full local disk) is an error on every rank, logged (``log_failed_local_save``, also for a
background one); training continues and persistent saves are unaffected.

``fit(ckpt_path="last")`` cannot agree on anything across ranks when it resolves the path (the process group does
not exist yet), so it resolves to a marker (``LOCAL_TIER_MARKER`` and the tier's directory) remembering the newest
complete persistent checkpoint of the ModelCheckpoint directories; the strategy's ``load_checkpoint`` then restores
the newest local step every node can get when it is at least as new as that checkpoint, and that checkpoint
otherwise (``load_local``).

Example:
    >>> strategy = SharingStrategy(local_tier=LocalTier("/local/ckpt/{node}", every_n_steps=50))   # doctest: +SKIP
    >>> pl.Trainer(strategy=strategy, ...).fit(model, ckpt_path="last")                          # doctest: +SKIP
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_sharing.checkpoint.discovery import complete_checkpoints
from lightning_sharing.core.declarations import StateComponent, ValidationLevel
from lightning_sharing.core.local_tier import NODE_PLACEHOLDER, LocalTier
from lightning_sharing.distributed.async_save import BackgroundSaver
from lightning_sharing.distributed.collectives import any_rank, node_index_from_env
from lightning_sharing.engine.coordinator import CheckpointCoordinator
from lightning_sharing.engine.local_tier import LocalTierRunner
from lightning_sharing.errors import CheckpointError
from lightning_sharing.integration.compat import checkpoint_dir, dump_checkpoint, restore_from
from lightning_sharing.lightning.builtins import BUILTIN_KEYS, builtin_components, join_checkpoint
from lightning_sharing.lightning.checkpoint_io import save_holders
from lightning_sharing.statefuls.holders import ValueHolder
from lightning_sharing.statefuls.rng import RNGHolder

__all__ = ["LOCAL_TIER_MARKER", "LocalResume", "LocalTierSaves", "agree_on_last", "load_local",
           "log_failed_local_save", "resolve_last", "save_local"]

log = logging.getLogger(__name__)

#: What ``ckpt_path="last"`` resolves to with a local tier: this prefix and the tier's directory.
LOCAL_TIER_MARKER = "lightning_sharing local tier + newest persistent checkpoint: "


@dataclass(frozen=True)
class LocalResume:
    """What ``ckpt_path="last"`` found: the marker it returned and the newest persistent checkpoint (or None)."""

    marker: str
    persistent: str | None
    persistent_step: int | None


class LocalTierSaves(Callback):
    """Saves into the strategy's local tier after every ``every_n_steps``-th training step (added by the strategy)."""

    def __init__(self, strategy: Any, every_n_steps: int) -> None:
        self.strategy = strategy
        self.every_n_steps = every_n_steps
        self._last: int | None = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step <= 0 or step % self.every_n_steps or step == self._last:
            return
        self._last = step
        try:
            self.strategy.save_local(trainer)
        except CheckpointError as exc:  # raised alike on every rank (agreed): every rank goes on training
            log_failed_local_save(step, exc)


def log_failed_local_save(step: int, error: CheckpointError, background: bool = False) -> None:
    """What every rank logs when a local save failed (agreed on every rank), and then goes on training."""
    log.error("the local save of step %d failed on every rank%s; training continues and the persistent checkpoints "
              "are unaffected: %s", step, " (written in the background)" if background else "", error)


def save_local(trainer: Any, runner: LocalTierRunner, user: list[StateComponent],
               overrides: Mapping[str, StateComponent], groups: Any, saver: BackgroundSaver | None = None,
               staging_roots: Sequence[Any] = (), **holder_args: Any) -> None:
    """Collective: the Trainer's state now (as ``ModelCheckpoint`` would save it) into the local tier; with
    ``saver``, staged now and written in the background (``staging_roots`` as for persistent saves)."""
    holders = save_holders(dump_checkpoint(trainer), **holder_args)
    for key in BUILTIN_KEYS:  # every built-in, present or not: the restore declares the same components
        holders.setdefault(key, ValueHolder(None))
    components = builtin_components(list(BUILTIN_KEYS), holders, overrides, ValidationLevel.NONE) + list(user)
    coordinator = CheckpointCoordinator(components, groups, local_tier=runner, async_save=saver)
    coordinator.staging_roots = list(staging_roots)
    coordinator.save_local(trainer.global_step)


def load_local(runner: LocalTierRunner, user: list[StateComponent], overrides: Mapping[str, StateComponent],
               groups: Any, live: Mapping[str, Any], newer_than: int | None) -> tuple[dict[str, Any], Any] | None:
    """Collective: Lightning's checkpoint dict and this rank's RNG state from the newest local step every rank can
    get (not older than ``newer_than``); None when there is none. ``live``: built-ins loaded in place."""
    holders: dict[str, Any] = {key: live[key] if key in live else ValueHolder() for key in BUILTIN_KEYS}
    holders["rng"] = RNGHolder()
    components = builtin_components(list(BUILTIN_KEYS), holders, overrides, ValidationLevel.NONE) + list(user)
    if CheckpointCoordinator(components, groups, local_tier=runner).restore_local(newer_than) is None:
        return None
    parts = {key: holder.value for key, holder in holders.items()
             if key not in live and key != "rng" and holder.value is not None}
    return join_checkpoint(parts), holders["rng"].value


def resolve_last(trainer: Any, tier: LocalTier, persistent: Any, options_for: Any) -> LocalResume | None:
    """``ckpt_path="last"`` with a local tier (rank-local, before the process group exists): the marker to resume
    from, or None (nothing in either tier that this rank can see). ``persistent``: what the strategy's own
    resolution found (``NotImplemented``: every directory is local, searched here)."""
    found: tuple[Any, int] | None = None
    if persistent is NotImplemented:
        directories = [d for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
                       if (d := checkpoint_dir(cb, trainer))]
        candidates = [c for d in directories for c in complete_checkpoints(d, options_for(d))[:1]]
        found = max(candidates, key=lambda c: c[1]) if candidates else None
    elif persistent is not None:
        listed = complete_checkpoints(os.path.dirname(str(persistent).rstrip("/")), options_for(persistent))
        found = next(((p, s) for p, s in listed if str(p).rstrip("/") == str(persistent).rstrip("/")), (persistent, -1))
    # This node's directory only (the others are on other machines in a real job): the strategy agrees on the answer
    # once the process group exists (``agree_on_last``), so a node that lost its disk resumes with the others.
    node = node_index_from_env()
    pattern = tier.directory_for(node) if node is not None else \
        str(os.fspath(tier.directory)).replace(NODE_PLACEHOLDER, "*")
    if found is None and not glob.glob(os.path.join(pattern, "*", "step_*")):
        return None
    return LocalResume(_marker(tier), None if found is None else str(found[0]), None if found is None else found[1])


def agree_on_last(trainer: Any, tier: LocalTier, mine: LocalResume | None) -> LocalResume | None:
    """Collective (once the process group exists, before the restore): ``ckpt_path="last"`` as every rank resolved
    it. Resolved on each rank alone from what its node holds, it differs where a node lost its local disk and no
    persistent checkpoint exists (the persistent ones are on shared storage, seen alike): the other nodes found local
    steps, this one nothing. Then this rank resumes too (from the peers' replicas, or the restore refuses on every
    rank alike) instead of starting afresh beside ranks that restore. Returns this rank's resolution."""
    if not any_rank(mine is not None, phase='agreeing on what ckpt_path="last" resumes from')[0] or mine is not None:
        return mine
    marker = _marker(tier)
    log.warning('ckpt_path="last": this node holds no local step and no persistent checkpoint exists, but other '
                "nodes hold local steps: resuming with them (this node's state comes from their replicas)")
    restore_from(trainer, marker)
    return LocalResume(marker, None, None)


def _marker(tier: LocalTier) -> str:
    """What ``ckpt_path="last"`` resolves to with ``tier``."""
    return f"{LOCAL_TIER_MARKER}{os.fspath(tier.directory)}"

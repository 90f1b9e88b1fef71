"""The checkpointing plumbing the Trainer and Fabric adapters share.

- ``CheckpointHost``: one ``CheckpointOptions`` and (with ``async_save``) one ``BackgroundSaver``, the
  coordinators built from them, and waiting for / closing pending saves;
- ``LazyProcessGroups``: the ``process_groups=`` argument (or the module's ``configure_process_groups()``),
  resolved once, on every rank, when first needed;
- ``check_storage_options``: what a strategy does with Lightning's ``storage_options``;
- ``register_strategy``: putting ``"sharing"`` (and friends) into Lightning's registries.

Example:
    >>> host = CheckpointHost(CheckpointOptions(verify="size"))
    >>> host.coordinator([], None).verify
    SIZE
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.options import CheckpointOptions
from lightning_sharing.distributed.async_save import BackgroundSaver
from lightning_sharing.engine.coordinator import CheckpointCoordinator

__all__ = ["LAZY_FLAG", "CheckpointHost", "LazyProcessGroups", "check_storage_options", "register_strategy"]

#: Marks the factories ``lightning_sharing._registration`` puts in Lightning's registries before our adapters
#: are imported; ``register_strategy`` replaces them with the real class.
LAZY_FLAG = "__lightning_sharing_lazy__"

log = logging.getLogger(__name__)


class CheckpointHost:
    """Options and the background saver of one strategy (or ``SharingCheckpointIO``), and its coordinators."""

    def __init__(self, options: CheckpointOptions) -> None:
        self.options = options
        self.saver = BackgroundSaver(options.max_pending_saves) if options.async_save else None

    def coordinator(self, components: list[StateComponent], process_groups: Any,
                    storage_options: dict[str, Any] | None = None) -> CheckpointCoordinator:
        """A coordinator for ``components`` that shares this host's options and saver."""
        return CheckpointCoordinator(components, process_groups, options=self.options,
                                     async_save=self.saver or False, storage_options=storage_options)

    def wait(self) -> None:
        """Block until pending background saves are committed; raise a failed one's error (every rank)."""
        if self.saver is not None:
            self.saver.wait()

    def poll(self) -> None:
        """Collective while a save is pending: surface its outcome once every rank's save is done."""
        if self.saver is not None:
            self.saver.poll()

    def close(self) -> None:
        """Wait for pending saves, then stop the background thread (it starts again on the next save)."""
        if self.saver is not None:
            self.saver.close()


class LazyProcessGroups:
    """The named process groups of a strategy, resolved once on every rank when first needed.

    ``arg`` is what the user passed: None (then the first of ``owners`` with a
    ``configure_process_groups()`` hook provides them), a mapping, a ``DeviceMesh``, or a callable
    returning either (called after the default process group exists; it may create groups).
    """

    def __init__(self, arg: Any) -> None:
        self._arg = arg
        self._value: Any = None
        self._resolved = False

    def resolve(self, owners: Iterable[Any] = ()) -> Any:
        if not self._resolved:
            groups = self._arg
            if groups is None:
                for owner in owners:
                    hook = getattr(owner, "configure_process_groups", None)
                    if callable(hook):
                        groups = hook()
                        break
            elif callable(groups) and not hasattr(groups, "mesh_dim_names"):
                groups = groups()
            self._value, self._resolved = groups, True
        return self._value


def check_storage_options(storage_options: Any) -> None:
    """lightning_sharing writes local/shared-filesystem directories and takes no storage options."""
    if storage_options is not None:
        raise TypeError(
            f"storage_options={storage_options!r} is not supported by lightning_sharing: checkpoints are "
            "directories on a filesystem every rank can see; configure the path instead"
        )


def register_strategy(registry: Any, name: str, cls: type, description: str) -> None:
    """Register ``cls`` as ``name`` unless another strategy already holds the name (then warn and skip)."""
    entry = registry[name] if name in registry else None
    if entry is not None and not getattr(entry.get("strategy"), LAZY_FLAG, False):
        holder = entry.get("strategy")
        if f"{getattr(holder, '__module__', '')}.{getattr(holder, '__qualname__', '')}" != \
                f"{cls.__module__}.{cls.__qualname__}":
            log.warning("Lightning's strategy registry already holds %r (%r); %s was not registered under that "
                        "name: pass %s() as the strategy", name, holder, cls.__name__, cls.__name__)
            return
    registry.register(name, cls, description=description, override=True)

"""The checkpointing plumbing the Trainer and Fabric adapters share.

- ``CheckpointHost``: one ``CheckpointOptions`` and (with ``async_save``) one ``BackgroundSaver``, the
  coordinators built from them, and waiting for / closing pending saves;
- ``LazyProcessGroups``: the ``process_groups=`` argument (or the module's ``configure_process_groups()``),
  resolved once, on every rank, when first needed;
- ``check_storage_options``, ``StorageOptions``: the fsspec options of checkpoint URLs (``s3://...``): a strategy's
  own (constructor) and Lightning's per-call ``storage_options``, and which apply to a path;
- ``location_key``: a checkpoint location in a form that compares equal for equal locations (local or URL);
- ``register_strategy``: putting ``"sharing"`` (and friends) into Lightning's registries.

Example:
    >>> host = CheckpointHost(CheckpointOptions(verify="size"), storage_options={"anon": True})
    >>> host.coordinator([], None).verify
    SIZE
    >>> host.storage_options_for("s3://bucket/run/last.ckpt"), host.storage_options_for("runs/last.ckpt")
    ({'anon': True}, None)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.options import CheckpointOptions
from lightning_sharing.distributed.async_save import BackgroundSaver
from lightning_sharing.engine.coordinator import CheckpointCoordinator
from lightning_sharing.engine.plan_cache import PlanCache
from lightning_sharing.integration import LAZY_FLAG
from lightning_sharing.storage import MANIFEST_NAME, is_url, store_for

__all__ = ["CheckpointHost", "LazyProcessGroups", "check_storage_options", "is_object_url",
           "is_plain_object", "is_sharing_checkpoint_url", "location_key", "register_strategy", "with_mesh_groups"]

#: Marks the factories ``lightning_sharing._registration`` puts in Lightning's registries before our adapters
#: are imported; ``register_strategy`` replaces them with the real class.

log = logging.getLogger(__name__)


class CheckpointHost:
    """Options and the background saver of one strategy (or ``SharingCheckpointIO``), and its coordinators.

    ``storage_options`` are the fsspec options (credentials, endpoint) of checkpoint URLs: used for every save,
    load, removal and discovery of a URL unless a call passes its own (``storage_options_for``).
    """

    def __init__(self, options: CheckpointOptions, storage_options: Mapping[str, Any] | None = None) -> None:
        self.options = options
        self.storage_options = check_storage_options(storage_options)
        self.saver = BackgroundSaver.for_options(options) if options.async_save else None
        #: Shared by the coordinators made one per save: a repeat save reuses the last plan and the topology.
        self.plans = PlanCache()

    def storage_options_for(self, path: Any, given: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The storage options for ``path``: ``given`` (a call's own) if not None, else this host's for a URL.

        A local path gets the host's options never (they are for object stores): only an explicit per-call value
        reaches a local path, where it is refused as a mistake (``store_for``).
        """
        if given is not None:
            return check_storage_options(given)
        return self.storage_options if is_object_url(path) else None

    def coordinator(self, components: list[StateComponent], process_groups: Any,
                    storage_options: dict[str, Any] | None = None) -> CheckpointCoordinator:
        """A coordinator for ``components`` that shares this host's options and saver."""
        return CheckpointCoordinator(components, process_groups, options=self.options, async_save=self.saver,
                                     storage_options=storage_options, plan_cache=self.plans)

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


def with_mesh_groups(mesh: Any, groups: Any) -> Any:
    """A model-parallel strategy's named groups: its ``DeviceMesh``'s dimensions, joined by the user's ``groups``.

    None gives the mesh itself; a mapping is added to the mesh's groups (its names win); a ``DeviceMesh`` of the
    user's own replaces the strategy's.
    """
    from lightning_sharing.distributed.collectives import resolve_process_groups

    if groups is None:
        return mesh
    if isinstance(groups, Mapping):
        return {**resolve_process_groups(mesh), **resolve_process_groups(groups)}
    return groups


def check_storage_options(storage_options: Any) -> dict[str, Any] | None:
    """``storage_options`` as a dict (None stays None): the keyword arguments of the fsspec filesystem.

    Example:
        >>> check_storage_options({"endpoint_url": "http://127.0.0.1:9000"})
        {'endpoint_url': 'http://127.0.0.1:9000'}
    """
    if storage_options is None:
        return None
    if not isinstance(storage_options, Mapping) or not all(isinstance(key, str) for key in storage_options):
        raise TypeError(
            f"storage_options must be a dict of fsspec filesystem arguments (e.g. {{'endpoint_url': ...}}), "
            f"not {type(storage_options).__name__} ({storage_options!r})"
        )
    return dict(storage_options)


def is_object_url(path: Any) -> bool:
    """Whether ``path`` is an object-store URL (``s3://``, ``memory://``, ...; not a local path or ``file://``)."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    text = os.fspath(path)
    return is_url(text) and not text.startswith("file://")


def location_key(path: Any, storage_options: Mapping[str, Any] | None = None) -> str:
    """``path`` in a form that is equal for equal locations: the real path of a local one, the store's normalized
    URL of an object-store one (never ``Path()`` of a URL: ``Path("s3://b/x")`` is ``s3:/b/x``).

    Example:
        >>> location_key("memory://run/last.ckpt/")
        'memory://run/last.ckpt'
    """
    text = os.fspath(path)
    if is_object_url(text):
        return store_for(text, check_storage_options(storage_options)).normalize(text)
    return os.path.realpath(text[len("file://"):] if text.startswith("file://") else text)


def is_plain_object(path: Any, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``path`` is a regular file (at a URL: an object of that exact name that is no checkpoint directory;
    over http(s) a directory's URL also answers, with its index page, so its manifest is what tells them apart)."""
    if not is_object_url(path):
        return os.path.isfile(path)
    store = store_for(path, dict(storage_options) if storage_options else None)
    location = store.normalize(os.fspath(path))
    if store.size(store.join(location, MANIFEST_NAME)) is not None:
        return False
    return store.size(location) is not None


def is_sharing_checkpoint_url(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether an object-store ``url`` is for lightning_sharing to read: a prefix holding objects, not a plain object.

    Example:
        >>> is_sharing_checkpoint_url("memory://nothing/here.ckpt")
        False
    """
    store = store_for(url, dict(storage_options) if storage_options else None)
    location = store.normalize(url)
    return store.size(location) is None and store.is_dir(location)


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

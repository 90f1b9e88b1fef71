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
                                                       the unwrapped module's state dict (no ``module.`` prefixes)
``torchmetrics`` ``Metric``                            ``PER_RANK`` through ``MetricState``: this rank's raw
                                                       accumulators and update count (``persistent`` or not)
``torchmetrics`` ``MetricCollection``                  ``PER_RANK``, its own ``state_dict()`` (call
                                                       ``persistent(True)`` on it, or declare a ``MetricState`` per
                                                       metric)
``Optimizer`` (also Fabric-wrapped)                    ``REPLICATED``
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

import dataclasses
import logging
import os
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
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from lightning_sharing.core.declarations import SharingPattern, StateComponent, ValidationLevel, check_unique_keys
from lightning_sharing.distributed.async_save import BackgroundSaver
from lightning_sharing.engine.coordinator import CheckpointCoordinator
from lightning_sharing.engine.load_plan import LoadResult
from lightning_sharing.errors import CheckpointError, ComponentDeclarationError
from lightning_sharing.fabric.state import (
    Filtered,
    FilterFn,
    ModuleState,
    check_filter,
    filtered,
    is_stateful,
    metric_kind,
)
from lightning_sharing.format.layout import DEFAULT_MAX_SHARD_SIZE
from lightning_sharing.format.manifest import CheckpointManifest
from lightning_sharing.lightning._compat import (
    allow_launch_under_fabric_cli,
    unwrap_fabric_objects,
)
from lightning_sharing.lightning.cleanup import adopt_default_group, default_group_exists
from lightning_sharing.lightning.data import loader_state, replace_shuffle_wrapper
from lightning_sharing.lightning.layout import ValueHolder
from lightning_sharing.statefuls.metrics import MetricState
from lightning_sharing.statefuls.rng import RNGState

if TYPE_CHECKING:  # Fabric's registry type, for annotations only (private in Fabric)
    from lightning.fabric.strategies.registry import _StrategyRegistry

__all__ = ["EXTRA_KEY", "REGISTRY_NAME", "RNG_KEY", "FabricSharingStrategy"]

log = logging.getLogger(__name__)

#: The component holding the plain (non-stateful) values of ``state``.
EXTRA_KEY = "extra"
#: The component holding each rank's random number generators (with ``rng=True``).
RNG_KEY = "rng"
#: The name under which the strategy is registered in Fabric's strategy registry.
REGISTRY_NAME = "sharing"
# state keys whose int value becomes the manifest's step (``find_latest_checkpoint`` orders by it)
_STEP_KEYS = ("step", "global_step")



class FabricSharingStrategy(DDPStrategy):
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
            **kwargs,
        )
        self._components = check_unique_keys(components or [])
        reserved = {EXTRA_KEY} | ({RNG_KEY} if rng else set())
        for component in self._components:
            if component.key in reserved:
                hint = " (or pass rng=False to declare your own RNG component)" if component.key == RNG_KEY else ""
                raise ComponentDeclarationError(
                    f"FabricSharingStrategy(components=...): the key {component.key!r} is reserved by the "
                    f"strategy; rename the component{hint}"
                )
        self._rng = bool(rng)
        self._rng_state = RNGState()
        self._process_groups_arg = process_groups
        self._process_groups_resolved: Any = None if callable(process_groups) else process_groups
        self._process_groups_done = not callable(process_groups)
        # Check max_shard_size and verify now rather than at the first save (no collective happens here).
        CheckpointCoordinator([], max_shard_size=max_shard_size, verify=verify)
        self._max_shard_size = int(max_shard_size)
        self._verify = verify
        self._saver = BackgroundSaver(max_pending_saves) if async_save else None
        #: What the last ``load_checkpoint`` of a checkpoint directory loaded and skipped (with reasons).
        self.last_load_result: LoadResult | None = None

    # ------------------------------------------------------------------ registry
    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """Register this strategy as ``"sharing"`` (not the ``ddp*`` names, which stay Fabric's ``DDPStrategy``)."""
        _register(cls, strategy_registry)

    # ------------------------------------------------------------------ environment
    def setup_environment(self) -> None:
        """Fabric's setup (the process group), and a clean exit: a group created here is destroyed at exit."""
        existed = default_group_exists()
        super().setup_environment()
        adopt_default_group(existed)
        if allow_launch_under_fabric_cli():
            log.debug("launched by `fabric run`: the script's fabric.launch() only finishes the setup")

    def process_dataloader(self, dataloader: DataLoader) -> DataLoader:
        """Fabric's ``setup_dataloaders`` hook: a shuffled stateful loader gets an epoch-seeded sampler and a
        generator of its own, so that its order and the global RNG resume exactly (see ``lightning/data.py``)."""
        dataloader = super().process_dataloader(dataloader)
        replace_shuffle_wrapper(dataloader, own_generator=True)
        return dataloader

    # ------------------------------------------------------------------ save
    def save_checkpoint(
        self,
        path: str | os.PathLike[str],
        state: dict[str, Any],
        storage_options: Any | None = None,
        filter: dict[str, FilterFn] | None = None,
    ) -> None:
        """Collective: save ``state`` as a ``lightning_sharing`` checkpoint directory at ``path`` (every rank calls it).

        Fabric calls this on every rank from ``fabric.save(path, state, filter=...)``. ``filter`` works as in
        Fabric: for each key it names, only the top-level items of that value's state dict (or of a plain dict
        value) for which ``filter[key](name, value)`` is true are saved. ``storage_options`` is refused: there is
        no ``CheckpointIO`` to pass them to. An int ``state["step"]`` (or ``"global_step"``) is recorded as the
        checkpoint's step.

        Example:
            >>> fabric.save("run/step=5.ckpt", {"model": model, "optimizer": optimizer, "step": 5})  # doctest: +SKIP
        """
        if storage_options is not None:
            raise TypeError(
                f"FabricSharingStrategy.save_checkpoint does not support storage_options (got {storage_options!r}): "
                "checkpoints are written by lightning_sharing's CheckpointCoordinator, not by a CheckpointIO "
                "plugin; call it without storage_options"
            )
        if not isinstance(state, Mapping):
            raise TypeError(
                f"FabricSharingStrategy.save_checkpoint expects state to be a dict of name -> object, got "
                f"{type(state).__name__}; e.g. fabric.save(path, {{'model': model, 'optimizer': optimizer}})"
            )
        filters = check_filter(filter, state)
        components, plain = self._declare(state, filters, strict=True, loading=False)
        if plain:
            components.append(StateComponent(EXTRA_KEY, ValueHolder(plain), SharingPattern.GLOBAL))
        step = next((plain[k] for k in _STEP_KEYS if type(plain.get(k)) is int), None)
        log.debug("saving %s with components %s", path, [(c.key, c.sharing_pattern.name) for c in components])
        self._coordinator(components).save_checkpoint(path, step=step)

    # ------------------------------------------------------------------ load
    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        state: nn.Module | Optimizer | dict[str, Any] | None = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Collective: restore the objects in ``state`` from the checkpoint at ``path``; return what was not restored.

        Fabric calls this on every rank from ``fabric.load(path, state, strict)``. Following Fabric's contract:

        - modules, optimizers, other statefuls and ``StateComponent``s in ``state`` are restored in place, as are
          the strategy's own components (``components=`` and the ``"rng"`` generators when present);
        - a plain value in ``state`` (say ``state["step"]``) is replaced by the saved one;
        - the return value holds the saved plain values that ``state`` did not ask for, e.g. ``{"step": 5}``;
        - ``state=None`` (or ``{}``) restores only the strategy's own components and returns everything else
          in the checkpoint: ``{key: state dict}`` per component and the plain values at the top level.

        ``strict=True`` refuses a checkpoint that lacks something ``state`` asks for, that holds components
        ``state`` does not name, or whose rank-specific state was saved under another topology; ``strict=False``
        skips those components (each skip is logged, and listed in ``self.last_load_result.skipped``) and loads
        modules with ``strict=False``.

        A ``path`` that is a regular file is not a ``lightning_sharing`` checkpoint: it is loaded the way
        ``DDPStrategy`` does (``torch.load`` through the ``CheckpointIO``, honouring ``weights_only``), so
        ``fabric.load_raw("weights.pt", model)`` and old single-file checkpoints keep working. A checkpoint
        directory is never unpickled; ``weights_only`` does not apply to it.

        Example:
            >>> remainder = fabric.load("run/step=5.ckpt", {"model": model, "optimizer": optimizer})  # doctest: +SKIP
            >>> remainder                                                                          # doctest: +SKIP
            {'step': 5}
        """
        self.wait_for_checkpoint()
        if os.path.isfile(path):
            log.info("%s is a file, not a lightning_sharing checkpoint directory: loading it as DDPStrategy does", path)
            # Never unpickle arbitrary objects by default, whatever torch's own default is (False before 2.6).
            safe = True if weights_only is None else weights_only
            return super().load_checkpoint(path, state=state, strict=strict, weights_only=safe)
        if isinstance(state, (nn.Module, Optimizer)):
            raise TypeError(
                f"{path} is a lightning_sharing checkpoint directory, but a single {type(state).__name__} was "
                "passed (fabric.load_raw): load_raw reads a raw state-dict file. Name the object instead, e.g. "
                "fabric.load(path, {'model': model}, strict=False) to load only the model"
            )
        if state is not None and not isinstance(state, Mapping):
            raise TypeError(
                f"FabricSharingStrategy.load_checkpoint expects state to be None or a dict of name -> object, "
                f"got {type(state).__name__}"
            )
        full = not state
        components, plain = self._declare(state or {}, {}, strict=strict, loading=True)
        extra = ValueHolder()
        components.append(StateComponent(EXTRA_KEY, extra, SharingPattern.GLOBAL, required=False))
        captures: dict[str, ValueHolder] = {}
        if full:
            for key, pattern, group in self._saved_components(path, {c.key for c in components}):
                captures[key] = ValueHolder()
                components.append(StateComponent(key, captures[key], pattern, process_group_name=group))
        result = self._coordinator(components).load_checkpoint(path, strict=strict, verify=None)
        self.last_load_result = result
        saved_plain = extra.value if extra.loaded else {}
        if not isinstance(saved_plain, dict):  # not written by this strategy: hand it back as it is
            saved_plain = {EXTRA_KEY: saved_plain}
        if full:
            remainder = {key: capture.value for key, capture in captures.items() if capture.loaded}
            remainder.update(saved_plain)
            return remainder
        missing = [key for key in plain if key not in saved_plain]
        if strict and missing:
            raise KeyError(
                f"The requested state contains the keys {missing} that do not exist in the loaded checkpoint "
                f"{path} (its plain values are {sorted(saved_plain)}). To disable strict loading, set `strict=False`."
            )
        for key in plain:
            if key in saved_plain:
                state[key] = saved_plain[key]  # type: ignore[index]  # Fabric copies these back to the caller
        return {key: value for key, value in saved_plain.items() if key not in state}  # type: ignore[operator]

    # ------------------------------------------------------------------ helpers
    def _strategy_components(self, loading: bool) -> list[StateComponent]:
        components = list(self._components)
        if self._rng:
            # Not required: a checkpoint saved with rng=False still loads; the generators are then left alone.
            components.append(StateComponent(RNG_KEY, self._rng_state, SharingPattern.PER_RANK, required=not loading))
        return components

    def _declare(self, state: Mapping[str, Any], filters: Mapping[str, FilterFn], strict: bool,
                 loading: bool) -> tuple[list[StateComponent], dict[str, Any]]:
        """Map Fabric's ``state`` to components; returns them (with the strategy's own) and the plain values."""
        components = self._strategy_components(loading)
        own = {c.key for c in components}
        plain: dict[str, Any] = {}
        for key, value in state.items():
            if not isinstance(key, str):
                raise ComponentDeclarationError(f"state keys must be strings, got {key!r}")
            component = self._component_for(key, value, strict)
            if component is None:
                plain[key] = filtered(value, filters.get(key))
                continue
            if key == EXTRA_KEY or key in own:
                what = "the plain values of state" if key == EXTRA_KEY else (
                    "the RNG state (pass rng=False to save your own)" if key == RNG_KEY and self._rng
                    else "a component passed to FabricSharingStrategy(components=...)")
                raise ComponentDeclarationError(
                    f"state[{key!r}] holds a {type(value).__name__}, but the key {key!r} is reserved for {what}; "
                    "use another key"
                )
            if key in filters:
                component = dataclasses.replace(component, stateful=Filtered(component.stateful, filters[key]))
            components.append(component)
        return check_unique_keys(components), plain

    def _component_for(self, key: str, value: Any, strict: bool) -> StateComponent | None:
        """The component for ``state[key]``, or None for a plain value."""
        if isinstance(value, StateComponent):
            if value.key != key:
                raise ComponentDeclarationError(
                    f"state[{key!r}] is a StateComponent with key {value.key!r}; the dict key and the component "
                    f"key must be equal: use state[{value.key!r}] = component, or StateComponent({key!r}, ...)"
                )
            stateful = unwrap_fabric_objects(value.stateful)
            if isinstance(stateful, DistributedDataParallel):
                stateful = ModuleState(self, stateful, strict)
            return value if stateful is value.stateful else dataclasses.replace(value, stateful=stateful)
        value = unwrap_fabric_objects(value)
        if isinstance(value, nn.Module):
            kind = metric_kind(value)
            if kind == "metric":  # its raw accumulators and update count, whether persistent or not
                return StateComponent(key, MetricState(value), SharingPattern.PER_RANK)
            if kind == "collection":
                return StateComponent(key, value, SharingPattern.PER_RANK)
            return StateComponent(key, ModuleState(self, value, strict), SharingPattern.REPLICATED,
                                  validate_replication=True, validation_level=ValidationLevel.QUICK)
        if isinstance(value, Optimizer):
            if callable(getattr(value, "consolidate_state_dict", None)):
                raise ComponentDeclarationError(
                    f"state[{key!r}] is a {type(value).__name__}, whose state is sharded across ranks; "
                    "FabricSharingStrategy saves optimizers as REPLICATED. Use a regular optimizer, or wrap this "
                    "one in a StateComponent with the pattern that fits its state"
                )
            return StateComponent(key, value, SharingPattern.REPLICATED)
        if is_stateful(value):
            if isinstance(value, DataLoader):  # with its sampler's epoch when it came from setup_dataloaders
                return StateComponent(key, loader_state(value), SharingPattern.PER_RANK)
            return StateComponent(key, value, SharingPattern.REPLICATED)
        return None

    def _saved_components(self, path: str | os.PathLike[str],
                          declared: set[str]) -> list[tuple[str, SharingPattern, str | None]]:
        """Key, pattern and group of what the checkpoint holds beyond ``declared`` (for ``state=None``).

        Reads the manifest on this rank without raising: if it cannot be read (or ranks read different ones), the
        coordinator's collective load reports that on every rank.
        """
        try:
            manifest = CheckpointManifest.load(path)
        except (CheckpointError, OSError):
            return []
        groups = self._process_groups()
        names = set(groups) if isinstance(groups, Mapping) else set(getattr(groups, "mesh_dim_names", None) or ())
        return [(key, saved.pattern, saved.group_name) for key, saved in manifest.components.items()
                # a group this run does not know: the load refuses the component (strict) or skips it
                if key not in declared and (saved.group_name is None or saved.group_name in names)]

    def _process_groups(self) -> Any:
        if not self._process_groups_done:
            self._process_groups_resolved = self._process_groups_arg()
            self._process_groups_done = True
        return self._process_groups_resolved

    def _coordinator(self, components: list[StateComponent]) -> CheckpointCoordinator:
        return CheckpointCoordinator(components, self._process_groups(), max_shard_size=self._max_shard_size,
                                     verify=self._verify, async_save=self._saver or False)

    def wait_for_checkpoint(self) -> None:
        """Block until pending ``async_save`` saves are committed; raise a failed one's error on every rank."""
        if self._saver is not None:
            self._saver.wait()

    def teardown(self) -> None:
        if self._saver is not None:
            self._saver.close()
        super().teardown()


def _register(cls: type[FabricSharingStrategy], registry: _StrategyRegistry) -> None:
    """Register ``cls`` as ``"sharing"`` unless another strategy already holds the name (then warn and skip)."""
    entry = registry[REGISTRY_NAME] if REGISTRY_NAME in registry else None
    if entry is not None:
        holder = entry.get("strategy")
        if f"{getattr(holder, '__module__', '')}.{getattr(holder, '__qualname__', '')}" != \
                f"{cls.__module__}.{cls.__qualname__}":
            log.warning("Fabric's strategy registry already holds %r (%r); FabricSharingStrategy was not registered "
                        "under that name: pass FabricSharingStrategy() to Fabric(strategy=...)", REGISTRY_NAME, holder)
            return
    registry.register(REGISTRY_NAME, cls, description="DDP with lightning_sharing checkpoints "
                      "(sharing patterns, per-rank RNG, atomic, verified)", override=True)


FabricSharingStrategy.register_strategies(STRATEGY_REGISTRY)

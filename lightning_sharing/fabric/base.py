"""``FabricSharingBase``: what ``FabricSharingStrategy`` (DDP) and ``FabricSharingModelParallelStrategy`` share.

``fabric.save``/``fabric.load`` through the coordinator, the strategy's own components (``components=``, the RNG),
process groups, storage options, async saves and clean exits. Put it first in a strategy's bases, before the Fabric
strategy it extends. How each value of Fabric's ``state`` becomes a component is in ``fabric/state.py``: a module
whose parameters are DTensors (and the optimizers over them) is SHARDED, whatever the strategy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from lightning_sharing.checkpoint.manifest import CheckpointManifest
from lightning_sharing.core.declarations import SharingPattern, StateComponent, check_unique_keys
from lightning_sharing.core.local_tier import LocalTier
from lightning_sharing.core.options import CheckpointOptions
from lightning_sharing.distributed.collectives import on_rank_zero
from lightning_sharing.engine.coordinator import CheckpointCoordinator
from lightning_sharing.engine.load_plan import LoadResult
from lightning_sharing.engine.local_tier import LocalTierRunner, newest_persistent
from lightning_sharing.errors import CheckpointError, ComponentDeclarationError
from lightning_sharing.fabric.state import EXTRA_KEY, FilterFn, check_filter, declare_state
from lightning_sharing.integration.cleanup import adopt_default_group, default_group_exists
from lightning_sharing.integration.common import (
    CheckpointHost,
    LazyProcessGroups,
    check_storage_options,
    is_plain_object,
)
from lightning_sharing.integration.compat import allow_launch_under_fabric_cli
from lightning_sharing.integration.data import replace_shuffle_wrapper
from lightning_sharing.statefuls.holders import ValueHolder
from lightning_sharing.statefuls.rng import RNGState

__all__ = ["RNG_KEY", "FabricSharingBase"]

log = logging.getLogger(__name__)

#: The component holding each rank's random number generators (with ``rng=True``).
RNG_KEY = "rng"
# state keys whose int value becomes the manifest's step (``find_latest_checkpoint`` orders by it)
_STEP_KEYS = ("step", "global_step")


class FabricSharingBase:
    """Mixin: ``fabric.save``/``fabric.load`` as lightning_sharing checkpoints (see ``FabricSharingStrategy``).

    ``options`` is the one ``CheckpointOptions`` the strategy built from its keyword arguments
    (``checkpoint_options``); the other arguments are ``FabricSharingStrategy``'s, the rest go to the Fabric strategy.
    """

    def __init__(self, *, options: CheckpointOptions, components: list[StateComponent] | None = None,
                 process_groups: Any = None, rng: bool = True, storage_options: Mapping[str, Any] | None = None,
                 local_tier: LocalTier | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._components = check_unique_keys(components or [])
        reserved = {EXTRA_KEY} | ({RNG_KEY} if rng else set())
        for component in self._components:
            if component.key in reserved:
                hint = " (or pass rng=False to declare your own RNG component)" if component.key == RNG_KEY else ""
                raise ComponentDeclarationError(
                    f"{type(self).__name__}(components=...): the key {component.key!r} is reserved by the "
                    f"strategy; rename the component{hint}"
                )
        self._rng = bool(rng)
        self._rng_state = RNGState()
        self._groups = LazyProcessGroups(process_groups)
        self._host = CheckpointHost(options, storage_options)
        #: What the last ``load_checkpoint`` of a checkpoint directory loaded and skipped (with reasons).
        self.last_load_result: LoadResult | None = None
        if local_tier is not None and not isinstance(local_tier, LocalTier):
            raise ComponentDeclarationError(f"local_tier must be a LocalTier, got {type(local_tier).__name__}")
        #: The fast recovery tier (``LocalTier``), or None; its runner keeps the tier's process group between saves.
        self.local_tier = local_tier
        self._local_runner = LocalTierRunner(local_tier) if local_tier is not None else None

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
        generator of its own, so that its order and the global RNG resume exactly (see ``integration/data.py``)."""
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
        value) for which ``filter[key](name, value)`` is true are saved. ``storage_options`` replace the strategy's
        own for this save. An int ``state["step"]`` (or ``"global_step"``) is recorded as the checkpoint's step.

        Example:
            >>> fabric.save("run/step=5.ckpt", {"model": model, "optimizer": optimizer, "step": 5})  # doctest: +SKIP
        """
        storage_options = check_storage_options(storage_options)
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
        self._coordinator(components, path, storage_options).save_checkpoint(path, step=step)

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
        ``fabric.load_raw("weights.pt", model)`` and old single-file checkpoints keep working (a single object on an
        object store too, read by Fabric through fsspec's default configuration: the strategy's storage options do
        not reach it). A checkpoint directory is never unpickled; ``weights_only`` does not apply to it.

        Example:
            >>> remainder = fabric.load("run/step=5.ckpt", {"model": model, "optimizer": optimizer})  # doctest: +SKIP
            >>> remainder                                                                          # doctest: +SKIP
            {'step': 5}
        """
        self.wait_for_checkpoint()
        if is_plain_object(path, self._host.storage_options_for(path)):
            log.info("%s is a file, not a lightning_sharing checkpoint directory: loading it as Fabric does", path)
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
        result = self._coordinator(components, path).load_checkpoint(path, strict=strict, verify=None)
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

    # ------------------------------------------------------------------ the local tier
    def save_local(self, state: dict[str, Any], step: int) -> bool:
        """Collective: save ``state`` into the local tier as step ``step`` when it is due (``every_n_steps`` divides
        it, or is None); returns whether it saved. A failure on any rank (a full local disk) raises on every rank.
        With the strategy's ``async_save=True`` it returns once the state is staged; the write runs on the strategy's
        background saver, and a failure is raised, on every rank, by the next save, load, restore or
        ``wait_for_checkpoint()``.

        Example:
            >>> state = {"model": model, "optimizer": optimizer, "step": step}     # doctest: +SKIP
            >>> fabric.strategy.save_local(state, step)                           # doctest: +SKIP
        """
        if self._local_runner is None:
            raise ComponentDeclarationError(f"save_local needs {type(self).__name__}(local_tier=LocalTier(...))")
        every = self._local_runner.tier.every_n_steps
        if every and step % every:
            return False
        components, plain = self._declare(state, {}, strict=True, loading=False)
        components.append(StateComponent(EXTRA_KEY, ValueHolder(plain), SharingPattern.GLOBAL))
        self._local_coordinator(components).save_local(step)
        return True

    def restore(self, directory: str | os.PathLike[str], state: dict[str, Any], strict: bool = True) -> int | None:
        """Collective: restore ``state`` in place (as ``fabric.load``) from the newest of the local tier and the
        checkpoints under ``directory``; returns the step restored (None: nothing; ``state`` is left alone).

        Example:
            >>> state = {"model": model, "optimizer": optimizer}                  # doctest: +SKIP
            >>> step = fabric.strategy.restore("checkpoints", state)              # doctest: +SKIP
        """
        if self._local_runner is None:
            raise ComponentDeclarationError(f"restore needs {type(self).__name__}(local_tier=LocalTier(...))")
        self.wait_for_checkpoint()
        components, plain = self._declare(state, {}, strict=strict, loading=True)
        extra = ValueHolder()
        components.append(StateComponent(EXTRA_KEY, extra, SharingPattern.GLOBAL, required=False))
        persistent = on_rank_zero("finding the newest persistent checkpoint", lambda: newest_persistent(
            directory, self._host.storage_options_for(directory)))
        step = self._local_coordinator(components).restore_local(None if persistent is None else persistent[1])
        if step is None:
            if persistent is None:
                return None
            self.load_checkpoint(persistent[0], state, strict=strict)
            return persistent[1]
        saved_plain = extra.value if isinstance(extra.value, dict) else {}
        for key in plain:
            if key in saved_plain:
                state[key] = saved_plain[key]
        return step

    def _local_coordinator(self, components: list[StateComponent]) -> CheckpointCoordinator:
        return CheckpointCoordinator(components, self._process_groups(), local_tier=self._local_runner,
                                     async_save=self._host.saver)

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
        return declare_state(self, self._strategy_components(loading), state, filters, strict,
                             rng_key=RNG_KEY if self._rng else None)

    def _saved_components(self, path: str | os.PathLike[str],
                          declared: set[str]) -> list[tuple[str, SharingPattern, str | None]]:
        """Key, pattern and group of what the checkpoint holds beyond ``declared`` (for ``state=None``).

        Reads the manifest on this rank without raising: if it cannot be read (or ranks read different ones), the
        coordinator's collective load reports that on every rank.
        """
        try:
            manifest = CheckpointManifest.load(path, self._host.storage_options_for(path))
        except (CheckpointError, OSError):
            return []
        groups = self._process_groups()
        names = set(groups) if isinstance(groups, Mapping) else set(getattr(groups, "mesh_dim_names", None) or ())
        return [(key, saved.pattern, saved.group_name) for key, saved in manifest.components.items()
                # a group this run does not know: the load refuses the component (strict) or skips it
                if key not in declared and (saved.group_name is None or saved.group_name in names)]

    def _process_groups(self) -> Any:
        return self._groups.resolve()

    def _coordinator(self, components: list[StateComponent], path: Any,
                     storage_options: Mapping[str, Any] | None = None) -> CheckpointCoordinator:
        return self._host.coordinator(components, self._process_groups(),
                                      self._host.storage_options_for(path, storage_options))

    @property
    def storage_options(self) -> dict[str, Any] | None:
        """The fsspec options used for checkpoint URLs (``storage_options=`` of the constructor)."""
        return self._host.storage_options

    def wait_for_checkpoint(self) -> None:
        """Block until pending ``async_save`` saves are committed; raise a failed one's error on every rank."""
        self._host.wait()

    def teardown(self) -> None:
        self._host.close()
        super().teardown()



"""Deciding what to load from a checkpoint: the strict/non-strict rules and the topology check.

Pure functions of the manifest, the declarations and the current topology, so every rank
reaches the same decisions without talking to the others.

Example:
    >>> plan = plan_load(manifest, components, topology, strict=False)           # doctest: +SKIP
    >>> [c.key for c, _ in plan.to_load], plan.skipped                          # doctest: +SKIP
    (['model', 'optimizer'], {'rng': 'topology changed: ...'})
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from lightning_sharing.checkpoint.manifest import CheckpointManifest, ComponentManifest
from lightning_sharing.core.declarations import ResizePolicy, StateComponent
from lightning_sharing.core.rules import file_regex, rule
from lightning_sharing.core.topology import Topology
from lightning_sharing.errors import (
    ComponentDeclarationError,
    CorruptCheckpointError,
    TopologyMismatchError,
)
from lightning_sharing.storage import CheckpointStore

__all__ = ["LoadPlan", "LoadResult", "check_listed_files", "plan_load"]


@dataclass
class LoadResult:
    """What ``load_checkpoint`` did: the components loaded and those skipped, with the reason."""

    path: Path
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    manifest: CheckpointManifest | None = None
    #: Components saved at another topology and handled by their ``on_resize`` policy: key -> what was done.
    resized: dict[str, str] = field(default_factory=dict)
    #: Whether files every rank reads were fetched once and broadcast (``read_once``, resolved).
    read_once: bool = False
    #: With ``read_once``: how many files every rank read, each fetched by one rank; and the bytes of those this
    #: rank fetched from storage.
    shared_files: int = 0
    shared_bytes_fetched: int = 0
    #: With ``read_once``: pieces of SHARDED chunk files this rank loads that another rank read and sent it, and
    #: the bytes this rank read and sent to others (``engine/shared_pieces.py``).
    received_pieces: int = 0
    sent_piece_bytes: int = 0


@dataclass
class LoadPlan:
    """Components to load (with their saved record) and components skipped (with the reason)."""

    to_load: list[tuple[StateComponent, ComponentManifest]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    #: Saved at another topology, handled by the component's ``on_resize`` policy: (component, saved, why).
    resized: list[tuple[StateComponent, ComponentManifest, str]] = field(default_factory=list)


def plan_load(manifest: CheckpointManifest, components: list[StateComponent], current: Topology,
              strict: bool, ignore: Collection[str] = ()) -> LoadPlan:
    """Apply the loading rules; raises on what ``strict`` refuses, records skips otherwise.

    Saved components named in ``ignore`` (and not declared) are left out without a refusal or a skip record.
    """
    plan = LoadPlan()
    saved_topology = Topology.from_json(manifest.topology)
    declared = {c.key for c in components}
    undeclared = sorted(set(manifest.components) - declared - set(ignore))
    if undeclared:
        if strict:
            raise ComponentDeclarationError(
                f"the checkpoint holds components {undeclared} that are not declared here; declare "
                "them, or load with strict=False to ignore them"
            )
        for key in undeclared:
            plan.skipped[key] = "in the checkpoint but not declared"
    for component in components:
        saved = manifest.components.get(component.key)
        if saved is None:
            reason = "not in the checkpoint"
            if component.required and strict:
                raise ComponentDeclarationError(
                    f"required component {component.key!r} is not in the checkpoint (it holds "
                    f"{sorted(manifest.components)}); mark it required=False, or load with strict=False"
                )
            plan.skipped[component.key] = reason
            continue
        problem = None
        if (saved.pattern in rule(component.sharing_pattern).reads_saved
                and saved.group_name == component.process_group_name):
            component = dataclasses.replace(component, sharing_pattern=saved.pattern)  # read as it was saved
        if saved.sharing_pattern != component.sharing_pattern.value:
            problem = (f"it was saved as {saved.pattern.name} but is declared "
                       f"{component.sharing_pattern.name}")
        elif saved.group_name != component.process_group_name and rule(component.sharing_pattern).group_bound:
            problem = (f"it was saved for group {saved.group_name!r} but is declared for group "
                       f"{component.process_group_name!r}")
        if problem is not None:
            if strict:
                raise ComponentDeclarationError(
                    f"component {component.key!r}: {problem}; declare the pattern it was saved with, "
                    "or load with strict=False to skip it"
                )
            plan.skipped[component.key] = problem
            continue
        check = rule(component.sharing_pattern).topology_change
        if check is not None:
            problem = check(saved_topology, current, component.process_group_name)
            if problem is not None and component.resize_policy is not ResizePolicy.ERROR:
                plan.resized.append((component, saved, problem))
                continue
            if problem is not None:
                if strict:
                    raise TopologyMismatchError(
                        f"component {component.key!r} is {component.sharing_pattern.name} and {problem}. "
                        f"Saved topology: {saved_topology.describe(component.process_group_name)}; current "
                        f"topology: {current.describe(component.process_group_name)}. Rank-specific state "
                        "cannot be redistributed automatically: resume with the same layout, declare what a "
                        "resize does (StateComponent(..., on_resize=\"reseed\" | \"merge\" | \"drop\")), or load "
                        "with strict=False to skip it (it keeps its current value)"
                    )
                plan.skipped[component.key] = f"topology changed: {problem}"
                continue
        plan.to_load.append((component, saved))
    return plan


def _allowed_file_re(key: str) -> re.Pattern[str]:
    """The files any copy format may write for component ``key`` (the rule table's ``files`` records)."""
    return re.compile(file_regex(key))


def check_listed_files(store: CheckpointStore, root: str, manifest: CheckpointManifest) -> None:
    """Refuse files the format never writes, and files on disk that the manifest does not list."""
    for key, component in manifest.components.items():
        allowed = _allowed_file_re(key)
        for entry in component.files:
            if not allowed.fullmatch(entry.path):
                raise CorruptCheckpointError(
                    f"component {key!r} lists {entry.path!r}, which is not a file lightning_sharing "
                    "writes (only .json and .safetensors); refusing a checkpoint that may carry "
                    "executable content such as a pickle"
                )
    listed = {f.path for f in manifest.all_files()}
    unlisted = [p for p in store.list_files(root) if p not in listed]
    if unlisted:
        raise CorruptCheckpointError(
            f"{root} holds files the manifest does not list: {unlisted[:10]}; a checkpoint must hold "
            "exactly what was saved (remove the extra files if you added them, otherwise the checkpoint "
            "was tampered with or mixed with another)"
        )

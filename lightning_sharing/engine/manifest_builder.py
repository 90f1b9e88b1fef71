"""The manifest of a save, built on rank 0 from what every rank wrote (and nothing else, but a transformers model's
description read from its component).

``build_manifest`` describes every component (pattern, group, writer ranks, replicas, files with their sizes and
checksums) from the ``WrittenCopy`` records gathered at the commit, plus the files rank 0 itself wrote there
(the merged indexes). The store's ``commit`` then writes it last. A component that wraps a ``transformers`` model
gets its ``hf_model`` record (``engine.hf_model``), which the export turns into ``config.json``.

Example:
    >>> manifest = build_manifest(components, topology, copies, extra_files, step=500, metadata={})
    ... # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import torch

from lightning_sharing._version import __version__
from lightning_sharing.checkpoint.hf_record import HFModelRecord
from lightning_sharing.checkpoint.manifest import CheckpointManifest, ComponentManifest, FileEntry
from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.rules import Placement, Replicas, placements, rule
from lightning_sharing.core.topology import Topology
from lightning_sharing.engine.copy_format import WrittenCopy
from lightning_sharing.engine.hf_model import describe_hf_model
from lightning_sharing.format.copy_files import tree_name

__all__ = ["build_manifest"]

log = logging.getLogger(__name__)


def build_manifest(components: list[StateComponent], topology: Topology, copies: list[WrittenCopy],
                   extra_files: dict[str, list[FileEntry]], step: int | None,
                   metadata: dict[str, Any] | None) -> CheckpointManifest:
    """Describe the checkpoint: every component's pattern, writers and files (``extra_files``: rank 0's own)."""
    records: dict[str, ComponentManifest] = {}
    for component in components:
        mine = sorted((c for c in copies if c.key == component.key), key=lambda c: c.stem)
        files = sorted((entry for copy in mine for entry in copy.files), key=lambda e: e.path)
        files.extend(extra_files.get(component.key, []))
        plan = placements(component.key, component.sharing_pattern, topology, component.process_group_name)
        has_tree = any(tree_name(c.stem) in {f.path for f in c.files} for c in mine)
        records[component.key] = ComponentManifest(
            key=component.key,
            sharing_pattern=component.sharing_pattern.value,
            ranks=sorted({entry.rank for entry in files} or {p.writer for p in plan}),
            group_name=component.process_group_name,
            replicated_across=_replicated_across(component, plan),
            required=component.required,
            storage="tree" if has_tree else "tensors",
            validation=component.effective_validation.value,
            files=files,
            metadata=dict(component.metadata),
            hf_model=_hf_model(component),
        )
    return CheckpointManifest(
        world_size=topology.world_size,
        topology=topology.to_json(),
        components=records,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        step=step,
        library_version=__version__,
        torch_version=torch.__version__,
        metadata=dict(metadata or {}),
    )


def _replicated_across(component: StateComponent, plan: tuple[Placement, ...]) -> list[Any] | None:
    replicas = rule(component.sharing_pattern).replicas
    if replicas is Replicas.ONE_LIST:
        return list(plan[0].readers)
    if replicas is Replicas.PER_COPY:
        return [list(p.readers) for p in plan]
    return None


def _hf_model(component: StateComponent) -> HFModelRecord | None:
    """The record of the ``transformers`` model ``component`` wraps, if any; describing it never fails a save."""
    try:
        return describe_hf_model(component.stateful)
    except Exception as exc:  # a model we cannot describe still saves; only its export lacks config.json
        log.warning("component %r: cannot describe its transformers model for the export (%s: %s)",
                    component.key, type(exc).__name__, exc)
        return None

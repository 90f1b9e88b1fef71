"""The rule table: what each sharing pattern means, as data, one record per pattern.

Every other module asks this table, never the pattern itself: who writes, who reads, the file stem,
whether the copies depend on the topology (and how a change is judged), whether a copy may be
spread over its readers, whether it may be validated, and how the manifest records replicas.
Adding a pattern is adding a row. The table is a pure function of the topology, tested without
any process group:

=========== ============================== ============================ ==========================
pattern     writes                          file stem                    reads
=========== ============================== ============================ ==========================
GLOBAL      global rank 0                   ``{key}``                    every rank
REPLICATED  one copy, spread over all ranks ``{key}``                    every rank
PER_RANK    every rank                      ``{key}/rank-{r:05d}``       each rank its own
PER_GROUP   lowest rank of each instance    ``{key}/{group}-{i:05d}``    members of that instance
PER_NODE    local rank 0 of each node       ``{key}/node-{n:05d}``       every rank of that node
SHARDED     each chunk once, by a holder    ``{key}/chunks-{r:05d}`` +   every rank, what overlaps
                                            ``{key}/index.json``         what it holds now
=========== ============================== ============================ ==========================

Example:
    >>> from lightning_sharing.core.topology import Topology
    >>> topo = Topology.build(4, group_members={"dp": [[0, 2], [1, 3]]})
    >>> [(p.stem, p.writer, p.readers) for p in placements("data", "per_group", topo, "dp")]
    [('data/dp-00000', 0, (0, 2)), ('data/dp-00001', 1, (1, 3))]
    >>> RULES[SharingPattern.PER_RANK].rank_specific
    True
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from lightning_sharing.core.patterns import SharingPattern
from lightning_sharing.core.topology import Instances, Topology
from lightning_sharing.errors import ComponentDeclarationError

__all__ = [
    "RULES",
    "SHARD_GROUPS",
    "ChunkFiles",
    "CopyFiles",
    "Placement",
    "Replicas",
    "Rule",
    "WholeTensorFiles",
    "file_regex",
    "placement_for_reader",
    "placements",
    "rank_specific",
    "rule",
    "stem_regex",
]


class Replicas(str, Enum):
    """How the manifest's ``replicated_across`` records the ranks that hold each copy."""

    NONE = "none"          # not recorded
    ONE_LIST = "one_list"  # one list: the readers of the single copy
    PER_COPY = "per_copy"  # a list per copy: the members of each instance


@dataclass(frozen=True)
class Placement:
    """One copy of a component: the file stem, the rank that writes it, the ranks that read it.

    ``spread`` lists the ranks among which the copy's tensor shards are divided when every reader
    holds the same state (REPLICATED); empty means the ``writer`` writes the whole copy.
    """

    stem: str
    writer: int
    readers: tuple[int, ...]
    spread: tuple[int, ...] = ()

    @property
    def writers(self) -> tuple[int, ...]:
        """Every rank that writes part of this copy; ``writer`` (the lead) writes its index and structure."""
        return self.spread or (self.writer,)


#: The shard groups of an incremental save: tensors that do not require grad (``frozen``) and tensors seen unchanged
#: since the previous save (``stable``) go to shards of their own, so that whole files stay unchanged.
SHARD_GROUPS = ("frozen", "stable")

# The files any copy ``S`` may have besides its tensors: the structure of a non-flat state (``S.json``) and a
# Hugging Face index (``S.safetensors.index.json``).
_STRUCTURE_SUFFIXES = (r"\.json", r"\.safetensors\.index\.json")


@dataclass(frozen=True)
class WholeTensorFiles:
    """The copy format of whole tensors: Hugging Face sharded safetensors per copy ``S``.

    ``S-0000k-of-0000N.safetensors`` (no larger than the options' shard size; a larger tensor gets its own),
    ``S.safetensors.index.json`` and, for a non-flat state, ``S.json``. The engine's ``WholeTensorFormat``.
    An incremental save keeps tensors that do not change in shards of their own group (``SHARD_GROUPS``), numbered
    apart: ``S-frozen-0000k-of-0000N.safetensors`` (``engine/incremental.py``).

    Example:
        >>> WholeTensorFiles().shard_for("model", 1, 2)
        'model-00001-of-00002.safetensors'
        >>> WholeTensorFiles().shard_for("model", 1, 1, "frozen")
        'model-frozen-00001-of-00001.safetensors'
    """

    shard: str = "{stem}-{group}{number:05d}-of-{count:05d}.safetensors"

    def shard_for(self, stem: str, number: int, count: int, group: str = "") -> str:
        """Shard ``number`` (from 1) of ``count`` of copy ``stem`` (of shard group ``group``: "" or one of
        ``SHARD_GROUPS``)."""
        return self.shard.format(stem=stem, number=number, count=count, group=f"{group}-" if group else "")

    def regex(self, key: str) -> str:
        """A regular expression matching every file this format may write for component ``key``."""
        groups = "(?:(?:" + "|".join(SHARD_GROUPS) + ")-)?"
        suffixes = (*_STRUCTURE_SUFFIXES, _FIELD_RE.sub(lambda m: groups if m[1] == "group" else r"\d{5}",
                                                        _escape_literals(self.shard.replace("{stem}", ""))))
        return stem_regex(key) + "(" + "|".join(suffixes) + ")"


@dataclass(frozen=True)
class ChunkFiles:
    """The copy format of chunks (SHARDED): each writing rank's chunk file and the merged chunk index.

    A copy's tensors (``DTensor`` or plain) are written as chunks, each once, by a rank holding it; the index
    records every chunk's global offsets. A non-flat state's structure is ``S.json`` and, when every tensor is
    whole, a Hugging Face index ``{key}.safetensors.index.json`` points into the chunk files. The engine's
    ``ChunkFormat``.

    An incremental save puts the chunks of tensors that do not change in a file of their own per group
    (``SHARD_GROUPS``): ``{key}/chunks-frozen-{rank:05d}.safetensors``.

    Example:
        >>> ChunkFiles().file_for("model", 3), ChunkFiles().index_for("model")
        ('model/chunks-00003.safetensors', 'model/index.json')
        >>> ChunkFiles().file_for("model", 3, "frozen")
        'model/chunks-frozen-00003.safetensors'
    """

    file: str = "{key}/chunks-{group}{rank:05d}.safetensors"
    index: str = "{key}/index.json"

    def file_for(self, key: str, rank: int, group: str = "") -> str:
        """The chunk file global ``rank`` writes for component ``key`` (of shard group ``group``)."""
        return self.file.format(key=key, rank=rank, group=f"{group}-" if group else "")

    def index_for(self, key: str) -> str:
        """The merged chunk index of component ``key`` (written by rank 0 at commit)."""
        return self.index.format(key=key)

    def regex(self, key: str) -> str:
        """A regular expression matching every file this format may write for component ``key``."""
        parts = {"key": re.escape(key), "rank": r"\d{5}", "group": "(?:(?:" + "|".join(SHARD_GROUPS) + ")-)?"}
        names = sorted({_FIELD_RE.sub(lambda m: parts[m[1]], _escape_literals(name)) for name in (self.file,
                                                                                                  self.index)})
        return "(?:" + stem_regex(key) + "(" + "|".join(_STRUCTURE_SUFFIXES) + "))|" + "|".join(names)


#: A pattern's copy format, as data: which files its copies' tensors go to.
CopyFiles = WholeTensorFiles | ChunkFiles


InstancesFn = Callable[[Topology, "str | None"], Instances]
TopologyCheck = Callable[[Topology, Topology, "str | None"], "str | None"]


@dataclass(frozen=True)
class Rule:
    """What one sharing pattern means.

    Attributes:
        instances: the sets of ranks that share one copy, under a topology (and a group name).
        stem: the copy's file stem, formatted with ``key``, ``index`` (of the instance) and ``group``.
        grouped_stem: the stem when the optional group is named (None: ``stem`` either way).
        needs_group: the pattern names a process group (``process_group_name`` is required).
        optional_group: ``process_group_name`` may be given (its instances then hold separate parts).
        group_bound: a saved copy loads only into a declaration naming the same group.
        topology_change: why a saved copy no longer fits the current topology (None: it fits), or
            None when copies load under any topology.
        spread: a copy's tensor shards are divided among its readers (they hold identical state).
        validated: ``validate_replication`` may check that every reader holds the same state.
        merge_index: copies holding disjoint tensor names (pipeline stages) get one merged HF index.
        replicas: how the manifest records the ranks holding each copy.
        files: the copy format: ``WholeTensorFiles()`` (whole tensors in Hugging Face sharded safetensors) or
            ``ChunkFiles()`` (chunks, each written once by a rank holding it, with a merged index of global
            offsets; a load reads what overlaps each rank's live tensors). The engine picks its copy-format
            implementation from this record (``engine.formats.format_for``).
        reads_saved: other patterns whose copies a declaration of this one loads, read as they were saved
            (a DDP checkpoint's whole tensors into a sharded module, and the reverse).
    """

    pattern: SharingPattern
    instances: InstancesFn
    stem: str
    grouped_stem: str | None = None
    needs_group: bool = False
    optional_group: bool = False
    group_bound: bool = True
    topology_change: TopologyCheck | None = None
    spread: bool = False
    validated: bool = False
    merge_index: bool = False
    replicas: Replicas = Replicas.NONE
    files: CopyFiles = WholeTensorFiles()
    reads_saved: frozenset[SharingPattern] = frozenset()

    @property
    def takes_group(self) -> bool:
        """True when ``process_group_name`` may (or must) be given."""
        return self.needs_group or self.optional_group

    def stem_for(self, key: str, index: int, group: str | None) -> str:
        """The file stem of copy ``index`` of component ``key``."""
        template = self.grouped_stem if group is not None and self.grouped_stem is not None else self.stem
        return template.format(key=key, index=index, group=group)

    @property
    def rank_specific(self) -> bool:
        """True when the saved copies depend on the topology (so a topology change matters)."""
        return self.topology_change is not None


def _whole_world(topology: Topology, _group: str | None) -> Instances:
    return (tuple(range(topology.world_size)),)


def _each_rank(topology: Topology, _group: str | None) -> Instances:
    return tuple((r,) for r in range(topology.world_size))


def _each_node(topology: Topology, _group: str | None) -> Instances:
    return topology.nodes


def _each_group_instance(topology: Topology, group: str | None) -> Instances:
    if group is None:
        raise ComponentDeclarationError("PER_GROUP needs a process_group_name")
    if group not in topology.groups:
        known = ", ".join(sorted(topology.groups)) or "none"
        raise ComponentDeclarationError(f"no process group named {group!r} (known: {known})")
    return topology.groups[group]


def _world_or_group_instances(topology: Topology, group: str | None) -> Instances:
    return _whole_world(topology, group) if group is None else _each_group_instance(topology, group)


def _world_size_changed(saved: Topology, now: Topology, _group: str | None) -> str | None:
    if saved.world_size == now.world_size:
        return None
    return f"it was saved at world_size={saved.world_size}; this run has world_size={now.world_size}"


def _nodes_changed(saved: Topology, now: Topology, _group: str | None) -> str | None:
    if saved.nodes == now.nodes:
        return None
    return f"it was saved with nodes {[list(n) for n in saved.nodes]}; this run has {[list(n) for n in now.nodes]}"


def _group_changed(saved: Topology, now: Topology, group: str | None) -> str | None:
    name = group or ""
    before, after = saved.groups.get(name), now.groups.get(name)
    if before == after:
        return None
    shown = [list(i) for i in before] if before is not None else "absent"
    return f"group {name!r} was saved as {shown}; this run has {[list(i) for i in after or ()]}"


RULES: Mapping[SharingPattern, Rule] = MappingProxyType({rule.pattern: rule for rule in (
    Rule(SharingPattern.GLOBAL, _whole_world, "{key}"),
    Rule(SharingPattern.REPLICATED, _whole_world, "{key}", spread=True, validated=True, replicas=Replicas.ONE_LIST,
         reads_saved=frozenset({SharingPattern.SHARDED})),
    Rule(SharingPattern.PER_RANK, _each_rank, "{key}/rank-{index:05d}", topology_change=_world_size_changed,
         merge_index=True),
    Rule(SharingPattern.PER_GROUP, _each_group_instance, "{key}/{group}-{index:05d}", needs_group=True,
         topology_change=_group_changed, merge_index=True, replicas=Replicas.PER_COPY),
    Rule(SharingPattern.PER_NODE, _each_node, "{key}/node-{index:05d}", topology_change=_nodes_changed,
         merge_index=True),
    # The group, when named, is the one whose members hold the same tensors (a pipeline stage's data
    # parallel replicas); its instances hold tensors of different names. Loading reshards: any topology.
    Rule(SharingPattern.SHARDED, _world_or_group_instances, "{key}", grouped_stem="{key}/{group}-{index:05d}",
         optional_group=True, group_bound=False, spread=True, validated=True, files=ChunkFiles(),
         reads_saved=frozenset({SharingPattern.REPLICATED})),
)})


def rule(pattern: SharingPattern | str) -> Rule:
    """The rule of ``pattern`` (an enum member or its string)."""
    return RULES[SharingPattern.parse(pattern)]


def placements(
    key: str,
    pattern: SharingPattern | str,
    topology: Topology,
    group: str | None = None,
) -> tuple[Placement, ...]:
    """Every copy of component ``key`` under ``topology``, in stem order.

    The writer is the lowest global rank of its instance: rank 0 for single-copy patterns, local rank 0
    for nodes (ranks are numbered node by node), the group leader for groups.
    """
    pattern_rule = rule(pattern)
    instances = pattern_rule.instances(topology, group)
    spread = pattern_rule.spread and topology.world_size > 1
    return tuple(
        Placement(stem=pattern_rule.stem_for(key, index, group), writer=min(inst),
                  readers=tuple(sorted(inst)), spread=tuple(sorted(inst)) if spread else ())
        for index, inst in enumerate(instances)
    )


def placement_for_reader(all_placements: tuple[Placement, ...], rank: int) -> Placement:
    """The copy that ``rank`` reads."""
    for placement in all_placements:
        if rank in placement.readers:
            return placement
    raise ComponentDeclarationError(f"rank {rank} reads no copy (placements: {all_placements})")


def stem_regex(key: str) -> str:
    """A regular expression matching every stem any pattern gives component ``key`` (for refusing strange files)."""
    parts = {"key": re.escape(key), "index": r"\d{5}", "group": r"[A-Za-z0-9_\-]+"}
    stems = {stem for r in RULES.values() for stem in (r.stem, r.grouped_stem) if stem is not None}
    alternatives = sorted({_FIELD_RE.sub(lambda m: parts[m[1]], _escape_literals(stem)) for stem in stems})
    return "(?:" + "|".join(alternatives) + ")"


def file_regex(key: str) -> str:
    """A regular expression matching every file any pattern's copy format may write for component ``key``."""
    formats = {r.files for r in RULES.values()}
    return "|".join(f"(?:{files.regex(key)})" for files in sorted(formats, key=repr))


_FIELD_RE = re.compile(r"\{(\w+)(?::[^}]*)?\}")


def _escape_literals(stem: str) -> str:
    """``stem`` with its literal text regex-escaped and its ``{field}`` placeholders kept."""
    pieces = _FIELD_RE.split(stem)
    return "".join(re.escape(piece) if i % 2 == 0 else "{" + piece + "}" for i, piece in enumerate(pieces))


def rank_specific(pattern: SharingPattern | str) -> bool:
    """True when the saved copies depend on the topology (so a topology change matters)."""
    return rule(pattern).rank_specific

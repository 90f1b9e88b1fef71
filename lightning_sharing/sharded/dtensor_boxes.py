"""Where the pieces of a sharded tensor live: its global shape, dtype, and the box each rank holds.

A ``DTensor`` on a ``DeviceMesh`` is split by its placements: ``Shard(d)`` (and FSDP2's
``_StridedShard(d, split_factor)``, which shards right to left) cuts tensor dim ``d`` along a mesh
dim, ``Replicate()`` copies it. Every rank can work out, for *every* coordinate of the mesh, which
box of the global tensor that coordinate holds, from DTensor's own per-placement arithmetic
(``Shard.local_shard_size_and_offset``, ``_StridedShard.local_shard_size_and_offset``), with no
communication. Coordinates that differ only along ``Replicate`` dims hold the same box: one *chunk*
with several holders (so do the matching ranks of other slices of the mesh a DTensor's mesh was cut
from). A plain tensor is one chunk, the whole tensor, held by every rank of the component's group
(the replicas of a DDP model).

Example:
    >>> import torch
    >>> layout = tensor_layout("w", torch.zeros(4, 3), rank=0, group_ranks=(0, 1))
    >>> layout.local, [c.holders for c in layout.chunks]
    (Box(offsets=(0, 0), sizes=(4, 3)), [(0, 1)])
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_sharing.errors import UnsupportedStateError

__all__ = ["Box", "Chunk", "ChunkGroups", "TensorLayout", "group_chunks", "has_dtensors", "is_dtensor", "local_box",
           "local_tensor", "tensor_layout"]


@dataclass(frozen=True)
class Box:
    """A rectangular piece of a tensor: ``offsets`` and ``sizes`` per dim (both empty for a 0-d tensor)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @functools.cached_property
    def numel(self) -> int:  # cached: a job's chunks share their boxes, and planning asks each chunk's size
        return math.prod(self.sizes)

    def intersect(self, other: Box) -> Box | None:
        """The common part of two boxes of the same tensor, or None if they do not overlap."""
        offsets, sizes = [], []
        for o1, s1, o2, s2 in zip(self.offsets, self.sizes, other.offsets, other.sizes, strict=True):
            lo, hi = max(o1, o2), min(o1 + s1, o2 + s2)
            if hi <= lo:
                return None
            offsets.append(lo)
            sizes.append(hi - lo)
        return Box(tuple(offsets), tuple(sizes))

    def relative_to(self, origin: Box) -> Box:
        """This box with offsets counted from ``origin``'s corner."""
        return Box(tuple(o - b for o, b in zip(self.offsets, origin.offsets, strict=True)), self.sizes)

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes, strict=True))


@dataclass(frozen=True)
class Chunk:
    """One distinct non-empty piece of a tensor in the job and the global ranks that hold a copy of it."""

    box: Box
    holders: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class ChunkGroups:
    """A layout's chunks as a save plans them: those several ranks hold (one of them writes each), and per rank
    the chunks it alone holds (it writes them) with their elements summed, so a plan need not list other ranks'."""

    shared: tuple[Chunk, ...]
    alone: Mapping[int, tuple[Chunk, ...]]
    alone_numel: Mapping[int, int]


def group_chunks(chunks: Sequence[Chunk]) -> ChunkGroups:
    """``chunks`` split into ``ChunkGroups``."""
    alone: dict[int, list[Chunk]] = {}
    numel: dict[int, int] = {}
    for chunk in chunks:
        if len(chunk.holders) == 1:
            holder = chunk.holders[0]
            alone.setdefault(holder, []).append(chunk)
            numel[holder] = numel.get(holder, 0) + chunk.box.numel
    return ChunkGroups(tuple(c for c in chunks if len(c.holders) > 1),
                       {rank: tuple(found) for rank, found in alone.items()}, numel)


@dataclass(frozen=True)
class TensorLayout:
    """A tensor's global shape and dtype, the box this rank holds, and every non-empty chunk in the job."""

    name: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    local: Box
    chunks: tuple[Chunk, ...]
    placements: str
    #: ``chunks`` grouped (shared by the tensors of one layout, computed once with them); None: group on demand.
    grouped: ChunkGroups | None = None

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    @property
    def chunk_groups(self) -> ChunkGroups:
        return self.grouped if self.grouped is not None else group_chunks(self.chunks)


def is_dtensor(value: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (without importing it where it is not loaded)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no DTensor
        return False
    return isinstance(value, DTensor)


def has_dtensors(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (FSDP2, tensor parallel)."""
    return any(is_dtensor(parameter) for parameter in module.parameters())


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The memory this rank holds of ``tensor``: ``to_local()`` of a DTensor, the tensor itself otherwise.

    Detached, so it can be read into in place; it shares storage with the live parameter.
    """
    with torch.no_grad():
        if is_dtensor(tensor):
            return tensor.detach().to_local()
        return tensor.detach()


def tensor_layout(name: str, tensor: torch.Tensor, *, rank: int, group_ranks: Sequence[int]) -> TensorLayout:
    """The layout of one state tensor as seen from global ``rank``.

    ``group_ranks`` are the global ranks over which the component's state is spread (the world,
    or one pipeline stage's ranks). They hold a plain tensor whole. A DTensor is held by the ranks of
    its mesh and, when that mesh is a slice of a bigger mesh (FSDP's ``mesh["dp"]`` inside a
    ``("dp", "tp")`` mesh, for parameters that tensor parallelism left alone), by the matching ranks
    of every other slice of it within ``group_ranks`` as well: they hold the same tensor there.

    Raises ``UnsupportedStateError`` for a ``Partial`` placement (a pending reduction, not data), a
    placement this module does not know, a rank outside the tensor's mesh, or a placement combination
    that gives a rank a non-contiguous piece.
    """
    group = tuple(sorted(set(group_ranks)))
    if not is_dtensor(tensor):
        shape = tuple(tensor.shape)
        box = Box((0,) * len(shape), shape)
        chunks = (Chunk(box, group),) if box.numel and group else ()
        return TensorLayout(name, shape, tensor.dtype, box, chunks, "plain", group_chunks(chunks))
    mesh = tensor.device_mesh
    ranks, boxes = _dtensor_boxes(name, tensor, rank)
    local = boxes[ranks.index(rank)]
    _replicas(name, mesh, ranks, rank)  # refuses a mesh whose other holders cannot be told
    chunks, grouped = _chunks(tuple(tensor.shape), tuple(tensor.placements), mesh, group)
    described = f"{tuple(tensor.placements)} on a mesh of shape {tuple(mesh.shape)}"
    return TensorLayout(name, tuple(tensor.shape), tensor.dtype, local, chunks, described, grouped)


# The chunks of a DTensor depend on its shape, placements, mesh and group only, not on the rank asking: the many
# tensors of a model that share those (every layer's q_proj, ...) share one computation, which is O(ranks). Uncached,
# that was O(tensors x ranks) per rank and save: a 70B model on 4,096 ranks spent most of its planning here.
@functools.lru_cache(maxsize=1024)
def _chunks(shape: tuple[int, ...], placements: tuple[object, ...], mesh: Any,
            group: tuple[int, ...]) -> tuple[tuple[Chunk, ...], ChunkGroups]:
    ranks = _mesh_ranks(mesh)
    boxes = _mesh_boxes(shape, tuple(mesh.shape), placements)
    replicas = _replicas("", mesh, ranks, None)
    members = set(group)
    holders: dict[Box, set[int]] = {}
    for box, holding in zip(boxes, replicas, strict=True):
        if box.numel:
            holders.setdefault(box, set()).update(r for r in holding if r in members)
    chunks = tuple(Chunk(box, tuple(sorted(rs))) for box, rs in sorted(holders.items(), key=lambda kv: kv[0].offsets)
                   if rs)
    return chunks, group_chunks(chunks)


def local_box(name: str, tensor: torch.Tensor, *, rank: int) -> Box:
    """The box of the global tensor that global ``rank`` holds: all of a plain tensor, a DTensor's piece.

    Raises ``UnsupportedStateError`` as ``tensor_layout`` does.

    Example:
        >>> local_box("w", torch.zeros(2, 3), rank=0)
        Box(offsets=(0, 0), sizes=(2, 3))
    """
    if not is_dtensor(tensor):
        return Box((0,) * tensor.dim(), tuple(tensor.shape))
    ranks, boxes = _dtensor_boxes(name, tensor, rank)
    return boxes[ranks.index(rank)]


def _dtensor_boxes(name: str, tensor: torch.Tensor, rank: int) -> tuple[tuple[int, ...], tuple[Box, ...]]:
    """The ranks of a DTensor's mesh and the box each holds, checked against what DTensor reports here."""
    mesh = tensor.device_mesh
    placements = tuple(tensor.placements)
    ranks = _mesh_ranks(mesh)
    described = f"{placements} on a mesh of shape {tuple(mesh.shape)}"
    if rank not in ranks:
        raise UnsupportedStateError(
            f"tensor {name!r} is a DTensor on mesh ranks {list(ranks)}, which do not include this rank "
            f"({rank}); a SHARDED component may hold only DTensors whose mesh includes the rank holding them"
        )
    try:
        boxes = _mesh_boxes(tuple(tensor.shape), tuple(mesh.shape), placements)
    except UnsupportedStateError as exc:
        raise UnsupportedStateError(f"tensor {name!r}: {exc}") from None
    _check_against_dtensor(name, tensor, boxes[ranks.index(rank)], described, rank)
    return ranks, boxes


# A model has thousands of DTensors on a handful of meshes, and asking a mesh for its ranks or DTensor for a local
# layout goes through torch's layout algebra each time (~0.1-0.3 ms): per save, that was a fifth of a 0.5 GB FSDP2
# save. Equal meshes (DeviceMesh's __eq__: same rank map, layout, dim names and thread) answer the same.
@functools.lru_cache(maxsize=256)
def _mesh_ranks(mesh: Any) -> tuple[int, ...]:
    return tuple(int(r) for r in mesh.mesh.flatten().tolist())


@functools.lru_cache(maxsize=256)
def _root_mesh(mesh: Any) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """(shape, ranks) of the root mesh ``mesh`` was cut from, and whether it is ``mesh`` itself."""
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
    return tuple(root.mesh.shape), _mesh_ranks(root), root is mesh


@functools.lru_cache(maxsize=4096)
def _reported_piece(shape: tuple[int, ...], mesh: Any, placements: tuple[object, ...],
                    rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local sizes, global offsets) that DTensor computes for this rank."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sizes, offsets = compute_local_shape_and_global_offset(shape, mesh, placements)
    return tuple(sizes), tuple(offsets)


def _replicas(name: str, mesh: object, ranks: tuple[int, ...], rank: int | None) -> tuple[tuple[int, ...], ...]:
    """For each coordinate of ``mesh`` (row-major), the global ranks holding it: its own rank, and the
    ranks at the same place of every other slice of the root mesh that ``mesh`` was cut from (``rank``, when
    given, must be one of them at its own coordinate)."""
    root_shape, root_ranks, is_root = _root_mesh(mesh)
    if is_root or root_ranks == ranks:
        return _singletons(ranks)
    table = _slice_table(root_shape, root_ranks, ranks)
    if table is None or (rank is not None and rank not in table[ranks.index(rank)]):
        raise UnsupportedStateError(
            f"tensor {name!r} is a DTensor on mesh ranks {list(ranks)}, which is not a slice of its root mesh "
            f"(ranks {list(root_ranks)}); cannot tell which other ranks hold the same pieces"
        )
    return table


@functools.lru_cache(maxsize=64)
def _singletons(ranks: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple((r,) for r in ranks)


@functools.lru_cache(maxsize=1024)
def _slice_table(root_shape: tuple[int, ...], root_ranks: tuple[int, ...],
                 ranks: tuple[int, ...]) -> tuple[tuple[int, ...], ...] | None:
    # The root dims along which the slice's ranks vary are the slice's dims (flattened ones included);
    # every root rank with the same coordinates along those dims sits at the same place of its slice.
    coordinates = dict(zip(root_ranks, itertools.product(*(range(n) for n in root_shape)), strict=True))
    if not all(r in coordinates for r in ranks):
        return None
    own = [coordinates[r] for r in ranks]
    varying = [d for d in range(len(root_shape)) if len({c[d] for c in own}) > 1]
    place = {tuple(c[d] for d in varying): i for i, c in enumerate(own)}
    if len(place) != len(ranks):
        return None
    holders: list[list[int]] = [[] for _ in ranks]
    for r in root_ranks:
        i = place.get(tuple(coordinates[r][d] for d in varying))
        if i is None:  # not a slice along whole root dims (a diagonal, say): nothing to infer
            return None
        holders[i].append(r)
    return tuple(tuple(h) for h in holders)


def _check_against_dtensor(name: str, tensor: torch.Tensor, local: Box, described: str, rank: int) -> None:
    """The box computed here must be what DTensor itself reports for this rank and what it holds."""
    sizes, offsets = _reported_piece(tuple(tensor.shape), tensor.device_mesh, tuple(tensor.placements), rank)
    held = tuple(local_tensor(tensor).shape)
    same_offsets = tuple(offsets) == local.offsets or local.numel == 0
    if tuple(sizes) != local.sizes or held != local.sizes or not same_offsets:
        raise UnsupportedStateError(
            f"tensor {name!r} ({described}): this rank holds a local piece of shape {held}, DTensor reports "
            f"shape {tuple(sizes)} at offsets {tuple(offsets)}, but its placements give shape {local.sizes} at "
            f"offsets {local.offsets}; this layout is not supported (redistribute it to Shard/Replicate placements)"
        )


@functools.lru_cache(maxsize=4096)
def _mesh_boxes(shape: tuple[int, ...], mesh_shape: tuple[int, ...], placements: tuple[object, ...]) -> tuple[Box, ...]:
    """The box held at every mesh coordinate, in row-major coordinate order (the order of ``mesh.mesh``).

    Cached: a model has few distinct (shape, mesh, placements) triples, and a job many ranks.
    """
    return tuple(_box_at(shape, mesh_shape, coordinate, placements)
                 for coordinate in itertools.product(*(range(n) for n in mesh_shape)))


@functools.lru_cache(maxsize=8192)
def _strided_picks(placement: Any, length: int, parts: int, index: int) -> tuple[int, ...]:
    """The positions along a dim of ``length`` that ``_StridedShard`` gives part ``index`` of ``parts``.

    As torch's ``_StridedShard._split_tensor`` picks them (``torch.chunk`` into ``split_factor`` pieces, each of those
    into ``parts``, part ``index`` of every piece, in order), computed here: torch's own
    ``local_shard_size_and_offset`` splits a tensor of every position for each part asked, O(parts) tensor ops a call,
    which a mesh asks for each of its parts (a 70B model's first save at 4,096 ranks spent most of its 53 s there).
    ``tests/unit/test_sharded_layout.py`` checks the two agree. Cached: coordinates that differ only along later mesh
    dims, and shapes with the same length along the dim, ask the same question.
    """
    factor = int(placement.split_factor)
    first = -(-length // factor)  # torch.chunk: pieces of ceil(length / n), the last ones short or empty
    picks: list[int] = []
    for piece in range(factor):
        start, end = min(first * piece, length), min(first * (piece + 1), length)
        second = -(-(end - start) // parts)
        low, high = min(second * index, end - start), min(second * (index + 1), end - start)
        picks.extend(range(start + low, start + high))
    return tuple(picks)


def _box_at(shape: tuple[int, ...], mesh_shape: tuple[int, ...], coordinate: tuple[int, ...],
            placements: tuple[object, ...]) -> Box:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    # The global indices held along each tensor dim, narrowed placement by placement, left to right,
    # as DTensor applies them (a _StridedShard encodes right-to-left sharding in this order).
    held: list[Sequence[int]] = [range(n) for n in shape]
    for mesh_dim, placement in enumerate(placements):
        parts, index = mesh_shape[mesh_dim], coordinate[mesh_dim]
        if isinstance(placement, Replicate):
            continue
        if isinstance(placement, _StridedShard):
            current = held[placement.dim]
            held[placement.dim] = [current[i] for i in _strided_picks(placement, len(current), parts, index)]
        elif isinstance(placement, Shard):
            current = held[placement.dim]
            size, start = Shard.local_shard_size_and_offset(len(current), parts, index)
            held[placement.dim] = current[start:start + size]
        else:
            kind = "a pending reduction (Partial), not data" if placement.is_partial() else "not supported"
            raise UnsupportedStateError(
                f"placement {placement} on mesh dim {mesh_dim} is {kind}; a SHARDED "
                "component stores DTensors with Shard and Replicate placements (redistribute it first)"
            )
    offsets, sizes = [], []
    for dim, indices in enumerate(held):
        size = len(indices)
        first = indices[0] if size else 0
        if size and list(indices) != list(range(first, first + size)):
            raise UnsupportedStateError(
                f"placements {placements} on a mesh of shape {mesh_shape} give coordinate "
                f"{coordinate} a non-contiguous piece of dim {dim} (global indices {list(indices)[:8]}...); "
                "only contiguous pieces can be stored as chunks (redistribute it to Shard/Replicate first)"
            )
        offsets.append(first)
        sizes.append(size)
    return Box(tuple(offsets), tuple(sizes))

"""Chunk geometry of DTensor placements, checked against DTensor's own arithmetic, with no process group.

``_mesh_boxes`` gives the box every mesh coordinate holds; here it is compared, coordinate by
coordinate, with ``torch.distributed.tensor._utils._compute_local_shape_and_global_offset`` (what a
DTensor reports for its own rank) and with the pieces torch.chunk makes when sharding by hand.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

from lightning_sharing.errors import UnsupportedStateError
from lightning_sharing.sharded import Box, plan_writes, tensor_layout
from lightning_sharing.sharded.dtensor_boxes import _mesh_boxes, _slice_table

CASES = [
    ((7, 5), (2,), (Shard(0),)),
    ((7, 5), (4,), (Shard(0),)),  # 2, 2, 2, 1
    ((1, 3), (4,), (Shard(0),)),  # one row: three empty pieces
    ((3, 7), (4,), (Shard(1),)),
    ((7, 6), (2, 2), (Shard(0), Shard(1))),
    ((7, 6), (2, 2), (Shard(0), Replicate())),
    ((7, 6), (2, 2), (Replicate(), Shard(0))),
    ((7, 6), (2, 3), (Shard(1), Shard(0))),
    ((9, 2), (2, 2), (Shard(0), Shard(0))),
    ((0, 4), (2,), (Shard(0),)),
    ((), (2,), (Replicate(),)),
]
STRIDED = [(n, (2, 2)) for n in (1, 3, 5, 6, 7, 9, 16)] + [(10, (2, 3)), (11, (3, 2))]


def _coordinates(mesh_shape):
    return list(itertools.product(*(range(n) for n in mesh_shape)))


@pytest.mark.parametrize(("shape", "mesh_shape", "placements"), CASES)
def test_boxes_match_dtensor(shape, mesh_shape, placements):
    boxes = _mesh_boxes(shape, mesh_shape, placements)
    covered = torch.zeros(shape, dtype=torch.int64)
    for coordinate, box in zip(_coordinates(mesh_shape), boxes, strict=True):
        sizes, offsets = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coordinate), placements)
        assert box.sizes == tuple(sizes)
        if box.numel:
            assert box.offsets == tuple(offsets)
            covered[box.slices()] += 1
    replicas = 1
    for n, p in zip(mesh_shape, placements, strict=True):
        replicas *= n if isinstance(p, Replicate) else 1
    assert bool((covered == replicas).all())  # every element held once per replica


@pytest.mark.parametrize(("rows", "mesh_shape"), STRIDED)
def test_fsdp_over_tp_strided_pieces_are_tp_first_then_fsdp(rows, mesh_shape):
    # FSDP2 on top of tensor parallelism: tp (mesh dim 1) splits the rows first, then dp (dim 0) splits
    # each tp piece; torch expresses that as (_StridedShard(0, split_factor=tp), Shard(0)).
    dp, tp = mesh_shape
    placements = (_StridedShard(0, split_factor=tp), Shard(0))
    boxes = _mesh_boxes((rows, 3), mesh_shape, placements)
    index = torch.arange(rows)
    for (i, j), box in zip(_coordinates(mesh_shape), boxes, strict=True):
        tp_piece = _pieces(index, tp)[j]
        expected = _pieces(tp_piece, dp)[i]
        assert box.sizes[0] == len(expected)
        if len(expected):
            assert list(range(box.offsets[0], box.offsets[0] + box.sizes[0])) == expected.tolist()
        sizes, offsets = _compute_local_shape_and_global_offset((rows, 3), mesh_shape, [i, j], placements)
        assert box.sizes == tuple(sizes) and (not len(expected) or box.offsets == tuple(offsets))


def _pieces(index: torch.Tensor, parts: int) -> list[torch.Tensor]:
    chunks = list(torch.chunk(index, parts)) if len(index) else []
    return chunks + [index[:0]] * (parts - len(chunks))


def test_strided_picks_are_torchs():
    from torch.distributed.tensor.placement_types import _StridedShardOffsetMode

    from lightning_sharing.sharded.dtensor_boxes import _strided_picks

    for length in (0, 1, 5, 7, 16, 29):
        for factor in (1, 2, 3, 8):
            placement = _StridedShard(0, split_factor=factor)
            for parts in (1, 2, 3, 4, 9):
                for index in range(parts):
                    _, torchs = placement.local_shard_size_and_offset(length, parts, index,
                                                                      _StridedShardOffsetMode.ALL)
                    assert list(_strided_picks(placement, length, parts, index)) == list(torchs or []), (
                        length, factor, parts, index)


def test_non_contiguous_pieces_refused():
    # A _StridedShard with no sharding to its right: every coordinate holds every other pair of rows.
    with pytest.raises(UnsupportedStateError, match=r"give coordinate \(0,\) a non-contiguous piece of dim 0"):
        _mesh_boxes((8, 2), (2,), (_StridedShard(0, split_factor=2),))


def test_partial_refused():
    with pytest.raises(UnsupportedStateError, match=r"on mesh dim 0 is a pending reduction \(Partial\), not data"):
        _mesh_boxes((4,), (2,), (Partial(),))


def test_slice_replicas():
    # Root mesh [[0, 1], [2, 3]] ("dp", "tp"): the dp slice through rank 0 is ranks (0, 2); the tp rank
    # beside each of them holds the same piece.
    assert _slice_table((2, 2), (0, 1, 2, 3), (0, 2)) == ((0, 1), (2, 3))
    assert _slice_table((2, 2), (0, 1, 2, 3), (1, 3)) == ((0, 1), (2, 3))
    assert _slice_table((2, 2), (0, 1, 2, 3), (0, 1)) == ((0, 2), (1, 3))
    assert _slice_table((2, 4), tuple(range(8)), (4, 5, 6, 7)) == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert _slice_table((2, 2), (0, 1, 2, 3), (0, 3)) is None  # a diagonal is not a slice
    assert _slice_table((2, 2), (0, 1, 2, 3), (0, 9)) is None


def test_plain_tensor_layout_and_writers():
    layout = tensor_layout("w", torch.zeros(4, 3), rank=1, group_ranks=[2, 0, 1])
    assert layout.local == Box((0, 0), (4, 3)) and [c.holders for c in layout.chunks] == [(0, 1, 2)]
    assert tensor_layout("e", torch.zeros(0, 3), rank=0, group_ranks=[0]).chunks == ()
    # Largest first, each to the least-loaded holder: 40 -> 0, 24 -> 1, 16 -> 2, 8 -> 2, 4 -> 1.
    state = {"a": torch.zeros(10), "b": torch.zeros(6), "c": torch.zeros(4), "d": torch.zeros(2), "e": torch.zeros(1)}
    plan = plan_writes(state, rank=0, group_ranks=[0, 1, 2])
    assert {w.name: w.writer for w in plan.writes} == {"a": 0, "b": 1, "c": 2, "d": 2, "e": 1}
    assert plan.bytes_by_rank() == {0: 40, 1: 28, 2: 24}
    assert [w.name for w in plan.mine()] == ["a"]

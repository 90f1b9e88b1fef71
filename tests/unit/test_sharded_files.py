"""Chunk files, the chunk index and verified partial reads, in one process (no process group).

Saved tensors are cut into arbitrary grids of chunks here; live pieces are arbitrary boxes, so every
overlap shape the readers can meet (whole rows, column pieces, pieces of single rows) is exercised.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from lightning_sharing.errors import CheckpointError, CorruptCheckpointError, ManifestError
from lightning_sharing.format.safetensors_io import file_checksum
from lightning_sharing.sharded import (
    Box,
    ChunkRecord,
    FileRecord,
    LocalFiles,
    ShardedIndex,
    TensorRecord,
    load_sharded,
    merge_indexes,
    plan_reads,
    plan_writes,
    read_chunks,
    write_chunks,
)
from lightning_sharing.sharded.chunkfile import write_chunk_file
from lightning_sharing.sharded.load import ReadPlan, plan_box


def _grid_boxes(shape: tuple[int, ...], cuts: list[list[int]]) -> list[Box]:
    intervals = [list(itertools.pairwise(c)) for c in cuts]
    return [Box(tuple(lo for lo, _ in parts), tuple(hi - lo for lo, hi in parts))
            for parts in itertools.product(*intervals)] if shape else [Box((), ())]


def save_grid(root: Path, name: str, full: torch.Tensor, cuts: list[list[int]], block_size: int,
              files: int = 2) -> ShardedIndex:
    """Save ``full`` as the chunks of a grid (boundaries per dim), spread over ``files`` files."""
    boxes = [b for b in _grid_boxes(tuple(full.shape), cuts) if b.numel]
    per_file: dict[str, list[Box]] = {}
    for i, box in enumerate(boxes):
        per_file.setdefault(f"t/chunks-{i % files:05d}.safetensors", []).append(box)
    chunks, records = [], {}
    for file, file_boxes in per_file.items():
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        entries = [(f"{name}@{','.join(map(str, b.offsets))}", full[b.slices()].contiguous()) for b in file_boxes]
        info = write_chunk_file(root / file, entries, block_size=block_size)
        records[file] = FileRecord(file, info.size, info.checksum, block_size, 0)
        chunks += [ChunkRecord(b.offsets, b.sizes, file, e.key, e.begin, e.length, 0, e.blocks)
                   for b, e in zip(file_boxes, info.entries, strict=True)]
    from lightning_sharing.format.safetensors_io import dtype_name

    index = ShardedIndex({name: TensorRecord(dtype_name(full.dtype), tuple(full.shape), tuple(chunks))}, records)
    return ShardedIndex.from_json(json.loads(json.dumps(index.to_json())))


def read_box(root: Path, index: ShardedIndex, name: str, live: Box, window: int = 1 << 20):
    record = index.tensors[name]
    target = torch.zeros(live.sizes, dtype=record.torch_dtype)
    plan = ReadPlan((plan_box(name, record, live, target),))
    with LocalFiles(root) as files:
        stats = read_chunks(plan, index, files, window=window)
    return target, stats


@st.composite
def _case(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 7)) for _ in range(ndim))
    cuts = [sorted({0, n, *draw(st.lists(st.integers(1, max(1, n - 1)), max_size=3))}) for n in shape]
    lo = [draw(st.integers(0, n - 1)) for n in shape]
    hi = [draw(st.integers(a + 1, n)) for a, n in zip(lo, shape, strict=True)]
    return shape, cuts, Box(tuple(lo), tuple(b - a for a, b in zip(lo, hi, strict=True))), draw(
        st.sampled_from([8, 16, 24, 64])), draw(st.sampled_from([4, 12, 1 << 20]))


@settings(max_examples=60, deadline=None)
@given(_case())
def test_any_live_box_from_any_chunk_grid(tmp_path_factory, case):
    shape, cuts, live, block, window = case
    root = tmp_path_factory.mktemp("grid")
    full = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    index = save_grid(root, "t", full, cuts, block)
    got, stats = read_box(root, index, "t", live, window)
    assert torch.equal(got, full[live.slices()])
    assert stats.bytes_needed == live.numel * 4 <= stats.bytes_read


def test_dim0_overlap_read_into_place_with_at_most_one_extra_block_each_side(tmp_path):
    full = torch.arange(100 * 6, dtype=torch.float32).reshape(100, 6)
    index = save_grid(tmp_path, "t", full, [[0, 50, 100], [0, 6]], block_size=64)
    live = Box((13, 0), (60, 6))  # rows 13..72 of chunks 0..49 and 50..99
    got, stats = read_box(tmp_path, index, "t", live)
    assert torch.equal(got, full[13:73])
    assert stats.bytes_needed == 60 * 24
    assert stats.bytes_read <= stats.bytes_needed + 4 * 64  # two partial blocks per chunk at most
    assert stats.bytes_by_file.keys() == {"t/chunks-00000.safetensors", "t/chunks-00001.safetensors"}


def test_column_piece_of_wide_rows_reads_only_needed_blocks(tmp_path):
    full = torch.arange(4 * 1000, dtype=torch.float32).reshape(4, 1000)
    index = save_grid(tmp_path, "t", full, [[0, 4], [0, 1000]], block_size=64, files=1)
    live = Box((0, 100), (4, 10))
    got, stats = read_box(tmp_path, index, "t", live, window=512)  # a row (4000 bytes) > window
    assert torch.equal(got, full[:, 100:110])
    assert stats.bytes_read <= 4 * 2 * 64  # each row's 40 bytes lie in at most two blocks


def test_chunk_file_is_plain_safetensors_with_block_digests(tmp_path):
    tensors = [("a@0", torch.arange(10, dtype=torch.int64)), ("b", torch.tensor(1.5, dtype=torch.bfloat16)),
               ("c", torch.tensor([True, False]))]
    info = write_chunk_file(tmp_path / "f.safetensors", tensors, block_size=16)
    raw = (tmp_path / "f.safetensors").read_bytes()
    assert info.size == len(raw) and info.checksum == file_checksum(tmp_path / "f.safetensors")
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as handle:
        assert sorted(handle.keys()) == ["a@0", "b", "c"]
        for key, tensor in tensors:
            assert torch.equal(handle.get_tensor(key), tensor)
    for entry in info.entries:
        data = raw[entry.begin:entry.begin + entry.length]
        assert entry.blocks == tuple(xxhash.xxh3_128(data[i:i + 16]).hexdigest() for i in range(0, len(data), 16))
    assert [e.key for e in info.entries] == ["a@0", "b", "c"]


def test_large_chunk_file_hashed_on_a_helper_thread_has_the_same_digests(tmp_path):
    # Files of at least 4 write pieces (64 MiB) are hashed on a thread while the next piece is written; the digests
    # must be those of the bytes on disk, block by block, whatever the order the pieces were hashed in.
    generator = torch.Generator().manual_seed(3)
    tensors = [("big", torch.randint(-2**31, 2**31 - 1, (18 << 20,), dtype=torch.int32, generator=generator)),
               ("empty", torch.empty(0)), ("odd", torch.arange(1001, dtype=torch.float64))]
    block = 1 << 20
    info = write_chunk_file(tmp_path / "big.safetensors", tensors, block_size=block)
    raw = (tmp_path / "big.safetensors").read_bytes()
    assert info.size == len(raw) > 64 << 20 and info.checksum == file_checksum(tmp_path / "big.safetensors")
    for entry in info.entries:
        data = raw[entry.begin:entry.begin + entry.length]
        assert entry.blocks == tuple(xxhash.xxh3_128(data[i:i + block]).hexdigest()
                                     for i in range(0, len(data), block))
    assert [len(e.blocks) for e in info.entries] == [72, 0, 1]


def test_plain_state_round_trip_with_writes_spread_over_holders(tmp_path):
    state = {"big": torch.randn(7, 5), "scalar": torch.tensor(3.0), "empty": torch.empty(0, 4),
             "flags": torch.tensor([True, False, True]), "half": torch.randn(3, dtype=torch.bfloat16)}
    parts = []
    for rank in (0, 1):
        plan = plan_writes(state, rank=rank, group_ranks=[0, 1])
        parts.append(write_chunks(tmp_path, f"m/chunks-{rank:05d}.safetensors", plan, state, block_size=8))
    assert {w.name: w.writer for w in plan.writes} == {"big": 0, "half": 1, "flags": 1, "scalar": 1}
    index = ShardedIndex.from_json(json.loads(json.dumps(merge_indexes(parts).to_json())))
    assert index.tensors["empty"].chunks == () and index.tensors["empty"].shape == (0, 4)
    live = {k: torch.zeros_like(v) for k, v in state.items()}
    stats = load_sharded(tmp_path, index, live)
    for key, value in state.items():
        assert torch.equal(live[key], value), key
    assert stats.bytes_read == stats.bytes_needed == 140 + 6 + 3 + 4


def test_through_a_checkpoint_store(tmp_path):
    from lightning_sharing.storage import LocalStore

    store = LocalStore()
    state = {"w": torch.randn(9, 4), "b": torch.randn(4)}
    plans = [plan_writes(state, rank=r, group_ranks=[0, 1]) for r in (0, 1)]
    parts = [write_chunks(str(tmp_path), f"m/chunks-{p.rank:05d}.safetensors", p, state, block_size=16, store=store)
             for p in plans]
    index = merge_indexes(parts)
    live = {k: torch.zeros_like(v) for k, v in state.items()}
    stats = load_sharded(str(tmp_path), index, live, store=store)
    assert all(torch.equal(live[k], state[k]) for k in state) and stats.bytes_read == stats.bytes_needed
    path = tmp_path / index.tensors["w"].chunks[0].file
    path.rename(tmp_path / "elsewhere")
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CorruptCheckpointError, match="is a symbolic link; checkpoint files must be regular files"):
        load_sharded(str(tmp_path), index, live, store=store)


def test_plan_writes_refusals():
    from lightning_sharing.errors import UnsupportedStateError

    with pytest.raises(UnsupportedStateError, match="rank 2 is not one of group_ranks"):
        plan_writes({"a": torch.ones(1)}, rank=2, group_ranks=[0, 1])
    with pytest.raises(UnsupportedStateError, match="state entry 'n' is a int, not a tensor"):
        plan_writes({"n": 3}, rank=0, group_ranks=[0])
    with pytest.raises(UnsupportedStateError, match=r"tensor 'z'.*complex128"):
        plan_writes({"z": torch.zeros(2, dtype=torch.complex128)}, rank=0, group_ranks=[0])


@pytest.fixture
def saved(tmp_path):
    full = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    return tmp_path, save_grid(tmp_path, "w", full, [[0, 4, 8], [0, 6]], block_size=16), full


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_corrupt_block_refused_only_where_read(saved):
    root, index, full = saved
    chunk = index.tensors["w"].chunks[1]  # rows 4..7: 96 bytes, blocks of 16 = 4 rows of 6 floats
    _flip(root / chunk.file, chunk.begin + 70)  # block 4 = bytes 64..79 = row 6 (bytes 72..95 is row 7)
    got, _ = read_box(root, index, "w", Box((4, 0), (2, 6)))  # rows 4-5: blocks 0..2 only
    assert torch.equal(got, full[4:6])
    with pytest.raises(CorruptCheckpointError) as caught:
        read_box(root, index, "w", Box((5, 0), (2, 6)))
    message = str(caught.value)
    assert f"tensor 'w', chunk at offsets [4, 0] in {chunk.file}: block 4 (bytes" in message
    assert "the file is corrupt (altered after the save)" in message


def test_truncated_and_missing_files_refused(saved):
    root, index, _ = saved
    chunk = index.tensors["w"].chunks[0]
    path = root / chunk.file
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CorruptCheckpointError, match=r"is \d+ bytes but the index records \d+: the file is truncated"):
        load_sharded(root, index, {"w": torch.zeros(8, 6)})
    path.unlink()
    with pytest.raises(CorruptCheckpointError, match=r"chunk file t/chunks-00000\.safetensors is missing"):
        load_sharded(root, index, {"w": torch.zeros(8, 6)})


def test_symlinked_chunk_file_refused(saved):
    root, index, _ = saved
    path = root / index.tensors["w"].chunks[0].file
    path.rename(root / "elsewhere")
    path.symlink_to(root / "elsewhere")
    with pytest.raises(CorruptCheckpointError, match="must be regular files inside it"):
        load_sharded(root, index, {"w": torch.zeros(8, 6)})


def test_shape_dtype_and_name_mismatches(saved):
    _, index, _ = saved
    with pytest.raises(CheckpointError, match=r"tensor 'w' has global shape \[8, 6\] in the checkpoint but \[8, 5\]"):
        plan_reads(index, {"w": torch.zeros(8, 5)})
    with pytest.raises(CheckpointError,
                       match=r"tensor 'w' has dtype torch\.float32 in the checkpoint but torch\.float16"):
        plan_reads(index, {"w": torch.zeros(8, 6, dtype=torch.float16)})
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \['extra'\], not in the live state none"):
        plan_reads(index, {"w": torch.zeros(8, 6), "extra": torch.zeros(1)})
    plan = plan_reads(index, {"extra": torch.zeros(1)}, strict=False)
    assert plan.reads == () and plan.skipped == ("w",)


def _tampered(index: ShardedIndex, change) -> dict:
    data = copy.deepcopy(index.to_json())
    change(data)
    return data


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["tensors"]["w"]["chunks"][1]["offsets"].__setitem__(0, 3), "chunks at offsets"),
    (lambda d: d["tensors"]["w"]["chunks"].pop(), "has 48 elements but its chunks hold 24"),
    (lambda d: d["files"][0].__setitem__("path", "../evil"), "not a normalised relative path"),
    (lambda d: d["files"][0].__setitem__("path", "/abs"), "not a normalised relative path"),
    (lambda d: d["tensors"]["w"]["chunks"][0].__setitem__("length", 95), "length 95 is not 24 elements of 4 bytes"),
    (lambda d: d["tensors"]["w"]["chunks"][0]["blocks"].pop(), "blocks must be 6 xxh3-128 hex digests"),
    (lambda d: d["tensors"]["w"]["chunks"][0]["blocks"].__setitem__(0, "xyz"), "hex digests"),
    (lambda d: d["tensors"]["w"]["chunks"][0].__setitem__("begin", 10**9), "lie outside"),
    (lambda d: d["tensors"]["w"]["chunks"][0].__setitem__("file", "t/other"), "which the index does not list"),
    (lambda d: d["tensors"]["w"]["chunks"][0]["sizes"].__setitem__(1, 7), "lies outside the shape"),
    (lambda d: d["tensors"]["w"]["chunks"][0].__setitem__("writer", True), "writer is True"),
    (lambda d: d["tensors"]["w"].__setitem__("extra", 1), "has fields"),
    (lambda d: d["tensors"]["w"].__setitem__("dtype", "F99"), "unknown dtype 'F99'"),
    (lambda d: d.__setitem__("version", 2), "version 2 is not supported"),
    (lambda d: d["files"].append(dict(d["files"][0])), "is listed twice"),
])
def test_index_parsing_is_strict(saved, change, message):
    _, index, _ = saved
    with pytest.raises(ManifestError, match=message.replace("[", r"\[").replace("(", r"\(")):
        ShardedIndex.from_json(_tampered(index, change))


def test_merge_refuses_disagreeing_ranks(saved):
    _, index, _ = saved
    record = index.tensors["w"]
    other = ShardedIndex({"w": TensorRecord("F32", (8, 7), ())}, {})
    with pytest.raises(CheckpointError, match=r"tensor 'w' has global shape \[8, 6\] and dtype F32 on one rank"):
        merge_indexes([index, other])
    twice = ShardedIndex({"w": TensorRecord("F32", (8, 6), record.chunks[:1])}, {})
    with pytest.raises(CheckpointError,
                       match=r"the ranks' chunks do not add up: .* has 48 elements but its chunks hold 72"):
        merge_indexes([index, twice])
    with pytest.raises(CheckpointError, match="was written by ranks 0 and 0"):
        merge_indexes([index, ShardedIndex({}, dict(index.files))])

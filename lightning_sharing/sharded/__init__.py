"""SHARDED state: DTensor chunks written once each, indexed, and read back under any mesh.

The pieces, bottom up:

- ``layout``: the global shape, dtype and box of every chunk of a tensor (DTensor or plain), per rank.
- ``save``: ``plan_writes`` (who writes each chunk: exactly once, balanced, no communication) and
  ``write_chunks`` (this rank's chunks into one safetensors file, with block checksums).
- ``index``: ``ShardedIndex``, the JSON chunk index (strictly parsed), and ``merge_indexes``.
- ``load``: ``plan_reads`` and ``read_chunks``: only the overlapping bytes, verified, into the live tensors.
- ``chunkfile``: the safetensors chunk file writer (to a local file or any ``ByteSink``) and the
  block-verified ranged reader (``LocalFiles``, or ``StoreFiles`` over a ``CheckpointStore``).

Example (every rank; ``state`` maps names to DTensors or tensors):
    >>> plan = plan_writes(state)                                                    # doctest: +SKIP
    >>> part = write_chunks(root, f"model/chunks-{plan.rank:05d}.safetensors", plan, state)  # doctest: +SKIP
    >>> index = merge_indexes(all_gathered_parts)     # rank 0, or every rank         # doctest: +SKIP
    >>> load_sharded(root, ShardedIndex.from_json(index.to_json()), new_state)       # doctest: +SKIP
"""

from lightning_sharing.sharded.chunkfile import DEFAULT_BLOCK_SIZE, ByteSource, ChunkStore, LocalFiles, StoreFiles
from lightning_sharing.sharded.dtensor_boxes import Box, Chunk, TensorLayout, is_dtensor, tensor_layout
from lightning_sharing.sharded.index import ChunkRecord, FileRecord, ShardedIndex, TensorRecord, merge_indexes
from lightning_sharing.sharded.load import ReadPlan, ReadStats, load_sharded, plan_reads, read_chunks
from lightning_sharing.sharded.save import ChunkWrite, WritePlan, plan_writes, write_chunks

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "Box",
    "ByteSource",
    "Chunk",
    "ChunkRecord",
    "ChunkStore",
    "ChunkWrite",
    "FileRecord",
    "LocalFiles",
    "ReadPlan",
    "ReadStats",
    "ShardedIndex",
    "StoreFiles",
    "TensorLayout",
    "TensorRecord",
    "WritePlan",
    "is_dtensor",
    "load_sharded",
    "merge_indexes",
    "plan_reads",
    "plan_writes",
    "read_chunks",
    "tensor_layout",
    "write_chunks",
]
